"""`train refresh`: one command for a new batch of data. Curate it against everything curated before,
continue the current adapter on it with replay, compare new and previous adapter, and promote the new
one only if it did not forget beyond a tolerance.

The state folder (owned like every output folder: safety/ownership.py) holds one folder per generation
and a `current.json` naming the promoted one:

    state/
      current.json               {"generation": 2, "adapter": ".../gen-0002/train/adapter", ...}
      gen-0001/
        request.json             what was asked (inputs, configs and their hashes: the fingerprint)
        curate/                  the curate run dir (its dedup index and cumulative sft/ pref/ exports)
        split/                   this batch's own rows of the export: what this generation trains on
        train/                   the training run (checkpoints, adapter, train_config.json)
        trained.json             written once training finished (steps, adapter weights sha256)
        eval.json                the forgetting table, cached by the two adapters' weights
        decision.json            promoted or not, the metric and why
        report.json, report.md   what changed

Generation N curates its batch with every dedup stage's `index_path` on generation N-1's saved index
(the saved index is extended, so it holds every row kept so far) and the split stage's
`previous_splits` on generation N-1's run (whose exports are cumulative, so earlier rows, their
clusters and their prompts keep their split). It trains on its own rows (split/) starting from the
current adapter, with `data.replay` of generation N-1's cumulative train split.

Every step is resumable: curate skips finished stages, training resumes from its newest checkpoint,
`trained.json`, `eval.json` and `decision.json` mark the rest done; `current.json` is written once,
after decision.json, and a rerun that finds the decision only makes current.json agree with it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from curate.atomic import atomic_dir, write_json, write_parquet, write_text
from curate.errors import CurateError
from curate.runner import file_sha256
from safety.locking import exclusive_lock
from safety.ownership import claim_dir, record, recorded, remove_leftover_temps, remove_recorded
from train.errors import DataError, TrainConfigError, TrainError

CURRENT = "current.json"
GENERATION_PREFIX = "gen-"
NOT_PROMOTED_EXIT = 3  # `train refresh` exit status when the new adapter is kept out (not an error)
SPLITS = ("train", "validation", "test")
SPLIT_ROWS = ("this batch (trained on)", "all data so far")  # the report's split-size rows


@dataclass
class RefreshRequest:
    pipeline: Path
    train_config: Path
    state_dir: Path
    new_inputs: list[str] = field(default_factory=list)  # empty: the pipeline's own inputs
    tolerance: float = 0.05
    replay: float | None = None  # None: the config's data.replay.fraction, else DEFAULT_REPLAY
    overrides: dict = field(default_factory=dict)  # --set key=value on the training config
    discard_unfinished: bool = False  # drop an unfinished generation started with another request


DEFAULT_REPLAY = 0.2


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------ pipeline
def _pipeline_tree(request: RefreshRequest, parent_run: Path | None) -> dict:
    """The user's pipeline with the new batch as inputs and dedup / split chained to the parent run."""
    from curate.runner import load_pipeline, read_pipeline_yaml

    path = request.pipeline
    tree = read_pipeline_yaml(path)  # its ConfigError becomes refresh()'s one-line TrainError
    if not isinstance(tree, dict) or not isinstance(tree.get("stages"), list):
        raise TrainConfigError(f"{path}: expected a pipeline mapping with `inputs:` and `stages:`")
    if request.new_inputs:
        tree["inputs"] = [{"path": str(Path(p).expanduser().resolve())} for p in request.new_inputs]
    stages = [s for s in tree["stages"] if isinstance(s, dict) and s.get("enabled", True)]
    types = [s.get("type") for s in stages]
    if "dedup" not in types or types.count("split") != 1:
        raise TrainConfigError(f"{path}: train refresh needs a dedup stage and exactly one split stage (found: {', '.join(map(str, types)) or 'none'})")
    for stage in stages:
        config = stage.setdefault("config", {}) or {}
        stage["config"] = config
        if stage["type"] == "dedup":
            config["save_index"] = True  # the next generation deduplicates against it
            config["extend_index"] = True
            if parent_run is not None:
                config["index_path"] = str(parent_run / stage.get("name", "dedup") / "index")
        elif stage["type"] == "split":
            config["include_previous"] = True  # exports stay cumulative: the next previous_splits
            if parent_run is not None:
                config["previous_splits"] = str(parent_run)
    load_pipeline(tree, base_dir=path.parent)  # a bad pipeline fails here, before any state is written
    return tree


def _stage_names(tree: dict, kind: str) -> list[str]:
    return [s.get("name", s["type"]) for s in tree["stages"] if s.get("type") == kind and s.get("enabled", True)]


def _input_files(tree: dict, base: Path) -> list[Path]:
    from curate.runner import load_pipeline
    from curate.ingest import expand_inputs

    pipeline = load_pipeline(tree, base_dir=base)
    return sorted({Path(p).resolve() for p, _, _ in expand_inputs(pipeline.inputs, pipeline.base_dir)})


def _fingerprint(request: RefreshRequest, files: list[Path]) -> dict:
    """What this refresh was asked to do; a rerun with the same fingerprint resumes or does nothing."""
    asked = {
        "pipeline": str(request.pipeline), "pipeline_sha256": file_sha256(request.pipeline),
        "train_config": str(request.train_config), "train_config_sha256": file_sha256(request.train_config),
        "inputs": {str(p): file_sha256(p) for p in files},
        "overrides": {k: request.overrides[k] for k in sorted(request.overrides)},
        "tolerance": request.tolerance, "replay": request.replay,
    }  # fmt: skip
    asked["fingerprint"] = hashlib.sha256(json.dumps(asked, sort_keys=True, default=str).encode()).hexdigest()
    return asked


# ----------------------------------------------------------------------------------------- state
def _generations(state: Path) -> list[int]:
    names = [n for n in recorded(state) if n.startswith(GENERATION_PREFIX) and n[len(GENERATION_PREFIX):].isdigit()]
    return sorted(int(n[len(GENERATION_PREFIX):]) for n in names if (state / n).is_dir())


def _gen_dir(state: Path, number: int) -> Path:
    return state / f"{GENERATION_PREFIX}{number:04d}"


def read_current(state: str | Path) -> dict | None:
    """The promoted generation (`current.json`), or None before the first promotion."""
    return _read_json(Path(state) / CURRENT)


def _choose_generation(state: Path, asked: dict, discard_unfinished: bool) -> tuple[int, bool]:
    """(generation, already finished): the unfinished last generation when this is its request again,
    the last one when it finished this very request, else a new one. A different request while the last
    generation is unfinished is refused: its rows are half-curated into the chain."""
    numbers = _generations(state)
    if not numbers:
        return 1, False
    last = numbers[-1]
    folder = _gen_dir(state, last)
    same = (_read_json(folder / "request.json") or {}).get("fingerprint") == asked["fingerprint"]
    finished = (folder / "decision.json").is_file()
    if same:
        return last, finished
    if not finished and discard_unfinished:
        remove_recorded(state, folder.name, forget=True)  # ours: recorded in the state's marker
        return last, False
    if not finished:
        raise TrainError(
            f"{folder}: generation {last} of this refresh is unfinished and was started with other inputs or configs; "
            "rerun that same command to finish it, or add --discard-unfinished to drop it"
        )
    return last + 1, False


# ------------------------------------------------------------------------------------------- steps
def _curate(tree: dict, request: RefreshRequest, gen: Path, console) -> dict:
    from curate.runner import run_pipeline

    if console is not None:
        console.print(f"curating the new batch into {gen / 'curate'}")
    return run_pipeline(tree, run_dir=gen / "curate", base_dir=request.pipeline.parent).manifest


def _own_rows(run: Path, split_stage: str, gen: Path) -> dict:
    """This batch's kept SFT rows out of the cumulative sft/ export, into gen/split (what this
    generation trains and is validated on); returns their counts per split."""
    if not (gen / "split").is_dir():  # written once, after the curate run finished; a resume reuses it
        batch = pl.scan_parquet(run / split_stage / "data.parquet").filter(pl.col("kind") == "sft").select("id").unique()
        with atomic_dir(gen / "split") as tmp:
            for split in SPLITS:
                shards = sorted((run / "sft").glob(f"{split}-*.parquet"))
                if not shards:
                    continue
                rows = pl.scan_parquet(shards).join(batch, on="id", how="semi", maintain_order="left").collect()
                if rows.height:
                    write_parquet(rows, tmp / f"{split}-00000-of-00001.parquet")
    counts = _split_counts(gen / "split")
    if (counts["train"] or counts["validation"]) and not (counts["train"] and counts["validation"]):
        raise DataError(
            f"{run}: the new batch left {counts['train']} train and {counts['validation']} validation sft rows after curation; "
            "refresh needs both, or none (see its manifest.json; the split stage's min_validation_rows can reserve validation rows)"
        )
    return counts


def _train_config(request: RefreshRequest, gen: Path, current: dict | None, parent_run: Path | None):
    from train.config import load_config

    overrides = dict(request.overrides)
    overrides.update({"data.split_dir": str(gen / "split"), "output_dir": str(gen / "train")})
    base = load_config(request.train_config, dict(request.overrides, **{"data.split_dir": str(gen / "split")}))
    if current is not None:
        overrides["init_adapter"] = current["adapter"]
    if parent_run is not None:
        fraction = request.replay if request.replay is not None else (base.data.replay.fraction if base.data.replay else DEFAULT_REPLAY)
        upsample = bool(base.data.replay and base.data.replay.upsample)
        overrides["data.replay"] = {"split_dir": str(parent_run / "sft"), "fraction": fraction, "upsample": upsample} if fraction > 0 else None
    return load_config(request.train_config, overrides)


def _train(config, request: RefreshRequest, gen: Path, console) -> dict:
    from train.continual import weights_sha256
    from train.loop import train

    done = _read_json(gen / "trained.json")
    if done is not None:
        return done
    result = train(config, mode="sft", resume="auto", console=console, protected=(request.train_config, request.pipeline))
    if not (result.steps >= config.optim.max_steps or result.stopped_early) or not result.adapter_dir.is_dir():
        raise TrainError(f"{gen / 'train'}: training stopped at step {result.steps} of {config.optim.max_steps}; rerun to resume it")
    replay = (_read_json(result.output_dir / "train_config.json") or {}).get("replay")
    done = {"steps": result.steps, "adapter": str(result.adapter_dir), "sha256": weights_sha256(result.adapter_dir),
            "final": result.final, "replay": replay, "init_adapter": config.init_adapter}  # fmt: skip
    write_json(gen / "trained.json", done)
    return done


def _evaluate(config, gen: Path, trained: dict, current: dict | None) -> dict | None:
    """The forgetting table (train/forgetting.py) of the new vs the current adapter, cached in eval.json
    by both adapters' weights and the sets compared; None for a first generation (nothing to compare)."""
    from train.continual import weights_sha256
    from train.forgetting import compare_adapters, eval_sets

    if current is None:
        return None
    previous = Path(current["adapter"])
    key = {"new": trained["sha256"], "previous": weights_sha256(previous), "sets": eval_sets(config, previous),
           "max_seq_len": config.data.max_seq_len, "max_val_samples": config.data.max_val_samples, "max_rows": config.eval.max_rows}  # fmt: skip
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    cached = _read_json(gen / "eval.json")
    if cached is not None and cached.get("fingerprint") == fingerprint:
        return cached
    result = compare_adapters(config, trained["adapter"], previous)
    for row in result["rows"]:  # this generation's own validation set, named for the table
        row["set"] = {"validation": "new validation"}.get(row["set"], row["set"])
    payload = {"fingerprint": fingerprint, "previous_generation": current["generation"], **result}
    write_json(gen / "eval.json", payload)
    return payload


def _decide(number: int, evaluation: dict | None, tolerance: float) -> dict:
    """Promote unless the new adapter's loss on the previous validation set (the rows the current
    adapter was validated on: forgetting) is worse than the current adapter's by more than `tolerance`."""
    if evaluation is None:
        return {"generation": number, "promoted": True, "reason": "first generation: nothing to compare with", "tolerance": tolerance}
    rows = {row["set"]: row for row in evaluation["rows"]}
    measured = rows.get("previous validation") or rows["new validation"]
    promoted = measured["change"] <= tolerance
    verdict = "within" if promoted else "beyond"
    reason = (f"{measured['set']} loss {measured['previous_loss']:.4f} → {measured['new_loss']:.4f} "
              f"(change {measured['change']:+.4f}) is {verdict} the tolerance {tolerance:+.4f}")  # fmt: skip
    return {"generation": number, "promoted": promoted, "reason": reason, "tolerance": tolerance,
            "metric": f"{measured['set']} loss (mean per target token)", "previous_generation": evaluation["previous_generation"],
            "previous_loss": measured["previous_loss"], "new_loss": measured["new_loss"], "change": measured["change"]}  # fmt: skip


def _apply(state: Path, gen: Path, decision: dict, trained: dict) -> dict | None:
    """Make current.json agree with a decision already written: it names this generation exactly when
    the decision promoted it and no later generation was promoted since. Idempotent."""
    current = read_current(state)
    if not decision["promoted"] or (current is not None and current["generation"] >= decision["generation"]):
        return current
    record(state, CURRENT)
    current = {"generation": decision["generation"], "adapter": trained["adapter"], "sha256": trained["sha256"],
               "split_dir": str(gen / "split"), "run_dir": str(gen / "curate")}  # fmt: skip
    write_json(state / CURRENT, current)
    return current


# ------------------------------------------------------------------------------------------ report
def _earlier_duplicates(tree: dict, run: Path, parent_run: Path | None) -> int:
    """Rows of this batch dropped as duplicates of a row kept by an earlier generation (in the index)."""
    if parent_run is None:
        return 0
    count = 0
    for name in _stage_names(tree, "dedup"):
        dropped, index = run / name / "dropped.parquet", parent_run / name / "index" / "records.parquet"
        if dropped.is_file() and index.is_file():
            earlier = pl.read_parquet(index, columns=["id"])["id"]
            count += pl.read_parquet(dropped, columns=["duplicate_of"]).filter(pl.col("duplicate_of").is_in(earlier.implode())).height
    return count


def _split_counts(folder: Path) -> dict:
    return {split: sum(pl.scan_parquet(p).select(pl.len()).collect().item() for p in sorted(folder.glob(f"{split}-*.parquet"))) for split in SPLITS}


def build_report(number: int, tree: dict, gen: Path, parent_run: Path | None, manifest: dict, counts: dict,
                 trained: dict, evaluation: dict | None, decision: dict) -> dict:  # fmt: skip
    stages = manifest["stages"]
    # a list, in pipeline order (report.json's keys are sorted)
    dropped = [{"stage": s["name"], "reason": reason, "rows": n} for s in stages[1:] for reason, n in (s.get("dropped_by_reason") or {}).items()]
    trained = trained or {"steps": 0, "adapter": None}
    replay = trained.get("replay") or {}
    return {
        "generation": number,
        "batch": {"rows_in": stages[0]["rows_in"], "quarantined": stages[0].get("rows_quarantined", 0), "kept": stages[-1]["rows_out"],
                  "dropped": dropped, "duplicates_of_earlier_data": _earlier_duplicates(tree, gen / "curate", parent_run)},
        "splits": dict(zip(SPLIT_ROWS, (counts, _split_counts(gen / "curate" / "sft")))),
        "training": {"steps": trained["steps"], "init_adapter": trained.get("init_adapter"), "adapter": trained["adapter"],
                     "replayed_rows": replay.get("rows_replayed", 0), "replay_split": replay.get("split_dir"),
                     **{k: v for k, v in (trained.get("final") or {}).items() if k in ("base_loss", "adapter_loss")}},
        "forgetting": (evaluation or {}).get("rows", []),
        "decision": decision,
    }  # fmt: skip


def report_markdown(report: dict) -> str:
    batch, decision = report["batch"], report["decision"]
    lines = [f"# Refresh, generation {report['generation']}", "", "## New batch", "",
             f"- rows in: {batch['rows_in']}; quarantined: {batch['quarantined']}; kept: {batch['kept']}",
             f"- duplicates of earlier data: {batch['duplicates_of_earlier_data']}"]  # fmt: skip
    lines += [f"- dropped by {d['stage']}, {d['reason']}: {d['rows']}" for d in batch["dropped"]]
    lines += ["", "## Splits (sft rows)", "", "| rows | " + " | ".join(SPLITS) + " |", "|---|" + "---:|" * len(SPLITS)]
    lines += [f"| {name} | " + " | ".join(str(report["splits"][name][s]) for s in SPLITS) + " |" for name in SPLIT_ROWS]
    training = report["training"]
    lines += ["", "## Training", ""] + (
        [f"- steps: {training['steps']}; from: {training['init_adapter'] or 'the base model'}",
         f"- replayed rows: {training['replayed_rows']} (from {training['replay_split'] or 'none'})", f"- adapter: {training['adapter']}"]
        if training["steps"] else ["- not trained: no new rows"]
    )  # fmt: skip
    if report["forgetting"]:
        lines += ["", "## Forgetting (validation loss; change = new - previous, > 0: worse)", "",
                  "| set | target tokens | base | previous | new | change |", "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        lines += [f"| {r['set']} | {r['target_tokens']} | {r['base_loss']:.4f} | {r['previous_loss']:.4f} | {r['new_loss']:.4f} | {r['change']:+.4f} |" for r in report["forgetting"]]
    lines += ["", "## Decision", "", f"{'promoted' if decision['promoted'] else 'NOT promoted'}: {decision['reason']}", ""]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- main
def refresh(request: RefreshRequest, console=None) -> dict:
    """Run (or resume, or find already done) one refresh; returns its report (with `already_done`).
    Errors are TrainError / SafetyError with one-line messages (curate's own errors included)."""
    try:
        return _refresh(request, console)
    except CurateError as error:  # a bad pipeline or batch: the same one line `curate run` would print
        raise TrainError(str(error)) from None


def _refresh(request: RefreshRequest, console) -> dict:
    request.pipeline, request.train_config = Path(request.pipeline).resolve(), Path(request.train_config).resolve()
    if not request.train_config.is_file():
        raise TrainConfigError(f"{request.train_config}: --train config file not found")
    tree = _pipeline_tree(request, None)
    files = _input_files(tree, request.pipeline.parent)
    if not files:
        raise DataError(f"{request.pipeline}: no input files for the new batch (give them with --new)")
    asked = _fingerprint(request, files)
    state = claim_dir(request.state_dir, "train", "refresh-state", [request.pipeline, request.train_config, *files], option="--state")
    with exclusive_lock(state, "train refresh"):
        remove_leftover_temps(state)
        _reconcile_current(state)
        number, finished = _choose_generation(state, asked, request.discard_unfinished)
        gen = _gen_dir(state, number)
        if finished:
            decision = _read_json(gen / "decision.json")
            return {**(_read_json(gen / "report.json") or {"decision": decision}), "already_done": True}
        return {**_run_generation(request, state, number, asked, console), "already_done": False}


def _reconcile_current(state: Path) -> None:
    """A run killed between its decision and current.json left the promotion half done: finish it
    (the newest promoted generation is current), before anything reads current.json."""
    for number in reversed(_generations(state)):
        gen = _gen_dir(state, number)
        decision = _read_json(gen / "decision.json")
        if decision is not None and decision.get("promoted"):
            _apply(state, gen, decision, _read_json(gen / "trained.json"))
            return


def _run_generation(request: RefreshRequest, state: Path, number: int, asked: dict, console) -> dict:
    gen = _gen_dir(state, number)
    record(state, gen.name)
    gen.mkdir(exist_ok=True)
    write_json(gen / "request.json", asked)
    earlier = [n for n in _generations(state) if n < number]
    parent_run = _gen_dir(state, earlier[-1]) / "curate" if earlier else None
    current = read_current(state)
    tree = _pipeline_tree(request, parent_run)
    manifest = _curate(tree, request, gen, console)
    counts = _own_rows(gen / "curate", _stage_names(tree, "split")[0], gen)
    if counts["train"]:
        config = _train_config(request, gen, current, parent_run)
        trained = _train(config, request, gen, console)
        evaluation = _evaluate(config, gen, trained, current)
        decision = _decide(number, evaluation, request.tolerance)
    else:  # every row dropped or a duplicate of earlier data: the generation ends here, data chain intact
        trained, evaluation = None, None
        reason = "the batch added no sft rows (all dropped, or duplicates of earlier data): nothing to train"
        decision = {"generation": number, "promoted": False, "reason": reason, "tolerance": request.tolerance}
    report = build_report(number, tree, gen, parent_run, manifest, counts, trained, evaluation, decision)
    write_json(gen / "report.json", report)
    write_text(gen / "report.md", report_markdown(report))
    write_json(gen / "decision.json", decision)  # last: from here on the generation is finished
    _apply(state, gen, decision, trained)
    return report
