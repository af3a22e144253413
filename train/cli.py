"""The `train` command line: `train sft | dpo | eval | merge | refresh`, YAML config with flags on top.

User errors (bad config, missing split, unloadable model) are one-line messages without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from safety.disk import disk_error_message
from safety.errors import SafetyError
from safety.ownership import claim_file
from safety.redact import redact
from train.errors import TrainError

# Markup off: tables show model outputs, prompts and paths, which are printed as written, never styled.
console = Console(highlight=False, markup=False)
error_console = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


def print_error(message: str) -> None:
    """`error: <message>` on stderr, one line, credentials redacted."""
    error_console.print(Text.assemble(("error:", "bold red"), " ", redact(" ".join(str(message).split()))))

# Flags that are shortcuts for config keys (everything else: --set key.sub=value).
SHORTCUTS = {
    "model": "model.path",
    "data": "data.split_dir",
    "output_dir": "output_dir",
    "max_steps": "optim.max_steps",
    "lr": "optim.lr",
    "max_seq_len": "data.max_seq_len",
    "seed": "seed",
    "max_new_tokens": "eval.max_new_tokens",
    "init_adapter": "init_adapter",
}


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML config file (see configs/demo_sft.yaml)")
    parser.add_argument("--model", help="base model: HF folder, .gguf file, or 'smollm2-135m-instruct'")
    parser.add_argument("--data", help="split directory from `curate split` (train-*.parquet, validation-*.parquet)")
    parser.add_argument("--output-dir", help="where checkpoints, adapter, metrics.jsonl and loss.png go")
    parser.add_argument("--max-steps", type=int, help="optimizer steps")
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--max-seq-len", type=int, help="packed row length in tokens")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any config key, e.g. --set lora.r=8 (repeatable)")


# `train eval --tasks` reads no split: a config without data.split_dir gets this placeholder.
NO_SPLIT = "(no split: train eval --tasks)"


def _config_from_args(args, needs_data: bool = True):
    from train.config import load_config, parse_override

    overrides = {SHORTCUTS[name]: getattr(args, name) for name in SHORTCUTS if getattr(args, name, None) is not None}
    for item in args.set:
        key, value = parse_override(item)
        overrides[key] = value
    if args.config is None and not needs_data:
        overrides.setdefault("data.split_dir", NO_SPLIT)
    if args.config is None and ("model.path" not in overrides or "data.split_dir" not in overrides):
        raise TrainError("give --config FILE, or at least --model and --data" + ("" if needs_data else " (--tasks: --model is enough)"))
    return load_config(args.config, overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train", description="Train LoRA adapters (SFT, DPO) on curated splits; evaluate and merge them.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mode, text in (("sft", "supervised fine-tuning on the sft/ split (loss on assistant tokens only)"), ("dpo", "DPO on the pref/ split (reference = base with the adapter disabled)")):
        p = sub.add_parser(mode, help=text, description=f"Train a LoRA adapter: {text}. Resumes from the newest checkpoint in output_dir. Run data-parallel with `torchrun --nproc-per-node N -m train.cli {mode} ...`.")
        _add_config_args(p)
        p.add_argument("--no-resume", action="store_true", help="start over, deleting checkpoints in output_dir")
        p.add_argument("--resume-from", help="resume from this checkpoint folder instead of the newest")
        p.add_argument("--stop-at-step", type=int, help="checkpoint and stop at this step (the schedule still targets max_steps)")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--init-adapter", help="continue this adapter (same base model and LoRA shape) on this run's data, with a fresh optimizer and schedule")
        p.set_defaults(handler=lambda a, m=mode: cmd_train(a, m))
    p = sub.add_parser("eval", help="base vs adapter validation loss (and a general set), generated samples side by side", description="Compare the base model and the adapter on the validation split (and eval.general_set, to see forgetting), with a few generated samples side by side.")
    _add_config_args(p)
    p.add_argument("--adapter", help="adapter folder (default: <output_dir>/adapter)")
    p.add_argument("--json", dest="json_out", help="also write the results to this JSON file")
    p.add_argument("--task-prompts", type=int, default=32, help="validation prompts answered greedily by base and adapter, scored by exact match / token F1 / ROUGE-L against the reference reply (SFT: the last assistant turn; DPO: the chosen reply; 0: off)")
    p.add_argument("--max-new-tokens", type=int, help="reply length limit for samples and task metrics (eval.max_new_tokens)")
    p.add_argument("--tasks", metavar="TASK_YAML", help="instead: lm-evaluation-harness tasks on base and adapter: an lm_eval task YAML (task or group) or a folder of them, over local data files (offline); see docs/training.md")
    p.add_argument("--limit", type=int, help="--tasks: at most N examples per task (lm_eval's --limit)")
    p.add_argument("--chat-template", action="store_true", help="--tasks: render each prompt as a user turn through the tokenizer's chat template (lm_eval's --apply_chat_template), as an instruct model is served")
    p.add_argument("--compare", metavar="PREVIOUS_ADAPTER", help="forgetting table instead: validation loss of base, PREVIOUS_ADAPTER and --adapter on the validation split, the previous adapter's validation split and eval.general_set")
    p.set_defaults(handler=cmd_eval)
    p = sub.add_parser("merge", help="merge the adapter into the base (a safetensors model folder), or combine adapters into one", description="Fold the LoRA adapter into the base weights (the output folder loads with AutoModelForCausalLM.from_pretrained); or, with --adapters A B ..., combine adapters trained on the same base into one new adapter folder (peft's add_weighted_adapter).")
    _add_config_args(p)
    p.add_argument("--adapter", help="adapter folder (default: <output_dir>/adapter)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="weights of the merged model (merged in fp32, then cast)")
    p.add_argument("--adapters", nargs="+", metavar="ADAPTER", help="combine these adapters into one adapter folder instead of merging into the base")
    p.add_argument("--method", choices=["linear", "ties", "dare_ties", "dare_linear"], default="linear", help="how --adapters are combined")
    p.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per adapter (default: 1 each)")
    p.add_argument("--density", type=float, help="ties/dare: share of each adapter's weights kept, in (0, 1]")
    p.set_defaults(handler=cmd_merge)
    p = sub.add_parser(
        "refresh", help="one command for a new batch: curate it, continue the current adapter with replay, compare, promote if it did not forget",
        description="Curate a new batch with PIPELINE (deduplicated against everything curated before; earlier rows and prompts keep "
        "their split), continue the current adapter on it with replay of the previous train split, compare new and current adapter on "
        "the previous and the new validation set (and eval.general_set), and promote the new one only if its loss on the previous "
        "validation set is not worse by more than --tolerance. Resumable: rerun the same command after a kill; a rerun of a finished "
        "refresh changes nothing. Exit 0: promoted; 3: not promoted (current.json unchanged); 2: an error.",
    )  # fmt: skip
    p.add_argument("--pipeline", required=True, help="curate pipeline YAML with a dedup and a split stage (its inputs are replaced by --new)")
    p.add_argument("--train", dest="train_config", required=True, help="training config YAML (model, LoRA, optim; data.split_dir and output_dir are set by refresh)")
    p.add_argument("--new", nargs="+", default=[], metavar="FILE", help="the new batch's files (default: the pipeline's own inputs)")
    p.add_argument("--state", default="runs/refresh", help="refresh state folder: one gen-NNNN folder per refresh and current.json (default: runs/refresh)")
    p.add_argument("--tolerance", type=float, default=0.05, help="largest allowed rise of validation loss on the previous validation set (nats per target token; negative: demand an improvement)")
    p.add_argument("--replay", type=float, help="share of the train split replayed from the previous one (default: the config's data.replay.fraction, else 0.2; 0: off)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a training config key, e.g. --set optim.max_steps=20 (repeatable)")
    p.add_argument("--discard-unfinished", action="store_true", help="drop an unfinished generation that was started with other inputs or configs")
    p.set_defaults(handler=cmd_refresh)
    return parser


def write_json(path: str | Path, payload: dict) -> None:
    from curate.atomic import write_json as atomic_write_json  # temp file + rename: never a half-written file

    atomic_write_json(path, payload)


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def cmd_train(args, mode: str) -> int:
    from train.loop import train

    config = _config_from_args(args)
    if args.no_progress:
        config.progress = False
    resume = "never" if args.no_resume else (args.resume_from or "auto")
    protected = (args.config,) if args.config else ()
    result = train(config, mode=mode, resume=resume, stop_at_step=args.stop_at_step, console=console, protected=protected)
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    table = Table(title=f"train {mode}", show_header=False)
    table.add_row("steps", str(result.steps) + (" (stopped early)" if result.stopped_early else ""))
    if result.resumed_from is not None:
        table.add_row("resumed from step", str(result.resumed_from))
    losses = [r["loss"] for r in result.history if "loss" in r]
    if losses:
        table.add_row("train loss first → last", f"{losses[0]:.4f} → {losses[-1]:.4f}")
    for key, value in result.final.items():
        table.add_row(key.replace("_", " "), _fmt(value))
    if (result.steps >= config.optim.max_steps or result.stopped_early) and result.adapter_dir.is_dir():
        table.add_row("adapter", str(result.adapter_dir))
    table.add_row("metrics", str(result.output_dir / "metrics.jsonl"))
    stats = result.data_stats
    for split, numbers in stats.items():
        if numbers["samples_cut"]:
            table.add_row(f"{split}: cut by max_seq_len", f"{numbers['samples_cut']} of {numbers['samples']} samples, {numbers['target_tokens_removed']} target tokens")
    console.print(table)
    if mode == "sft" and "base_loss" in result.final:
        console.print(f"validation loss: base {result.final['base_loss']:.4f} → adapter {result.final['adapter_loss']:.4f}")
    return 0


def cmd_eval(args) -> int:
    from train.evaluate import run_eval

    if args.tasks and args.compare:
        raise TrainError("--tasks and --compare are two different reports: give one")
    if args.limit is not None and not args.tasks:
        raise TrainError("--limit applies to --tasks")
    if args.chat_template and not args.tasks:
        raise TrainError("--chat-template applies to --tasks")
    config = _config_from_args(args, needs_data=not args.tasks)
    adapter = Path(args.adapter or Path(config.output_dir) / "adapter")
    if args.json_out:  # checked before the evaluation: a file train did not write is never overwritten
        claim_file(args.json_out, "train", protected=[p for p in (args.config, adapter, args.compare, args.tasks) if p])
    if args.compare:
        return _compare(config, adapter, Path(args.compare), args.json_out)
    if args.tasks:
        return _lm_eval_tasks(config, adapter, args.tasks, args.limit, args.json_out, args.chat_template)
    result = run_eval(config, adapter, console, task_prompts=args.task_prompts)
    table = Table(title="base vs adapter")
    table.add_column("set")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for section in ("validation", "general"):
        for key, value in (result.get(section) or {}).items():
            table.add_row(section, key, _fmt(value))
    console.print(table)
    if result.get("task_metrics"):
        _print_task_metrics(result["task_metrics"])
    if result.get("samples"):
        samples = Table(title="samples", show_lines=True)
        for column in ("prompt", "base", "adapter"):
            samples.add_column(column, overflow="fold")
        for row in result["samples"]:
            samples.add_row(row["prompt"], row["base"], row["adapter"])
        console.print(samples)
    if args.json_out:
        write_json(args.json_out, result)
    return 0


def _lm_eval_tasks(config, adapter: Path, tasks: str, limit: int | None, json_out: str | None, chat_template: bool = False) -> int:
    from train.lm_tasks import run_lm_eval_tasks

    result = run_lm_eval_tasks(config, adapter, tasks, limit, chat_template)
    how = "".join((f", limit {limit}" if limit else "", ", chat template" if chat_template else ""))
    table = Table(title=f"lm-evaluation-harness: base vs adapter ({tasks}{how})")
    for column in ("task", "metric", "base", "adapter", "delta"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for row in result["rows"]:
        delta = "" if row["delta"] is None else f"{row['delta']:+.4f}"
        table.add_row(row["task"], row["metric"], _fmt(row["base"]), _fmt(row["adapter"]), delta)
    console.print(table)
    samples = ", ".join(f"{task} {n.get('effective', n)}" for task, n in result["base"]["n-samples"].items())
    console.print(f"examples per task: {samples}; adapter: {adapter}")
    if json_out:
        write_json(json_out, result)
    return 0


def _compare(config, adapter: Path, previous: Path, json_out: str | None) -> int:
    from train.forgetting import compare_adapters

    result = {"forgetting": compare_adapters(config, adapter, previous)}
    _print_forgetting(result["forgetting"]["rows"])
    console.print(f"previous: {previous}\nnew: {adapter}\n" + "\n".join(f"{r['set']}: {r['split_dir']} ({r['split']})" for r in result["forgetting"]["rows"]))
    if json_out:
        write_json(json_out, result)
    return 0


def _print_forgetting(rows: list[dict]) -> None:
    table = Table(title="forgetting: validation loss of base, previous and new adapter (change = new - previous; > 0: worse)")
    table.add_column("set", no_wrap=True)
    for column in ("target tokens", "base", "previous", "new", "change"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["set"], str(row["target_tokens"]), _fmt(row["base_loss"]),
                      _fmt(row["previous_loss"]), _fmt(row["new_loss"]), f"{row['change']:+.4f}")  # fmt: skip
    console.print(table)


def _print_task_metrics(task: dict) -> None:
    table = Table(title=f"task metrics: greedy replies to {task['prompts']} validation prompts (≤{task['max_new_tokens']} new tokens)")
    for column in ("metric", "base", "adapter"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for name in task["base"]:
        table.add_row(name, _fmt(task["base"][name]), _fmt(task["adapter"][name]))
    console.print(table)
    examples = Table(title="task examples", show_lines=True)
    for column in ("prompt", "reference", "base", "adapter"):
        examples.add_column(column, overflow="fold")
    for row in task["examples"]:
        examples.add_row(row["prompt"], row["reference"], row["base"], row["adapter"])
    console.print(examples)


def cmd_merge(args) -> int:
    from train.merge import DTYPES, combine_adapters, merge_adapter

    config = _config_from_args(args)
    protected = [p for p in (args.config, config.model.path) if p and Path(p).exists()]
    if args.adapters:
        if args.adapter or args.dtype != "fp32":
            raise TrainError("--adapters combines adapters into a new adapter; --adapter and --dtype apply to merging one into the base")
        out = combine_adapters(config.model, args.adapters, args.out, args.method, args.weights, args.density, config.seed, protected)
        console.print(f"combined adapter ({args.method}) written to {out}")
        return 0
    if args.weights or args.density is not None or args.method != "linear":
        raise TrainError("--method, --weights and --density apply to --adapters A B ...")
    adapter = Path(args.adapter or Path(config.output_dir) / "adapter")
    out = merge_adapter(config.model, adapter, args.out, DTYPES[args.dtype], protected=protected)
    console.print(f"merged model ({args.dtype}) written to {out}")
    return 0


def cmd_refresh(args) -> int:
    import math

    from train.config import parse_override
    from train.refresh import NOT_PROMOTED_EXIT, RefreshRequest, refresh

    if not math.isfinite(args.tolerance) or (args.replay is not None and not 0 <= args.replay <= 0.9):
        raise TrainError("--tolerance must be a finite number and --replay a share in [0, 0.9]")
    overrides = dict(parse_override(item) for item in args.set)
    request = RefreshRequest(Path(args.pipeline), Path(args.train_config), Path(args.state), args.new, args.tolerance, args.replay, overrides, args.discard_unfinished)
    report = refresh(request, console)
    decision = report["decision"]
    if report["already_done"]:
        console.print(f"generation {decision['generation']} already refreshed with these inputs and configs: nothing new to do")
    if "batch" in report:
        _print_refresh_report(report)
    console.print(f"{'promoted' if decision['promoted'] else 'not promoted'}: generation {decision['generation']}: {decision['reason']}")
    return 0 if decision["promoted"] else NOT_PROMOTED_EXIT


def _print_refresh_report(report: dict) -> None:
    from train.refresh import SPLIT_ROWS

    batch = report["batch"]
    table = Table(title=f"refresh, generation {report['generation']}: the new batch", show_header=False)
    table.add_column()
    table.add_column(overflow="fold")  # adapter paths whole
    for key in ("rows_in", "quarantined", "kept", "duplicates_of_earlier_data"):
        table.add_row(key.replace("_", " "), str(batch[key]))
    by_stage: dict[str, list[tuple[str, int]]] = {}  # one line per stage; report.md lists every reason
    for dropped in batch["dropped"]:
        by_stage.setdefault(dropped["stage"], []).append((dropped["reason"], dropped["rows"]))
    for stage, reasons in by_stage.items():
        reasons.sort(key=lambda item: -item[1])
        shown = ", ".join(f"{reason} {count}" for reason, count in reasons[:3]) + (", ..." if len(reasons) > 3 else "")
        table.add_row(f"dropped by {stage}", f"{sum(count for _, count in reasons)} ({shown})")
    for name in SPLIT_ROWS:
        table.add_row(f"sft rows, {name}", " / ".join(f"{split} {report['splits'][name][split]}" for split in ("train", "validation", "test")))
    training = report["training"]
    if training["steps"]:
        table.add_row("trained", f"{training['steps']} steps from {training['init_adapter'] or 'the base model'}, {training['replayed_rows']} rows replayed")
    console.print(table)
    if report["forgetting"]:
        _print_forgetting(report["forgetting"])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (TrainError, SafetyError) as error:
        print_error(str(error))
        return error.exit_code
    except KeyboardInterrupt:
        error_console.print(
            Text.assemble(("interrupted", "bold red"), " (rerun the same command to resume from the last checkpoint)")
        )
        return 130
    except Exception as error:  # noqa: BLE001 - only a full disk is turned into a message; the rest re-raise
        message = disk_error_message(error)
        if message is None:
            raise
        print_error(message)
        return 2


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
