"""`train` against hostile or damaged input, through `train.cli.main`: a checkpoint never runs code, a
damaged one is skipped or refused in one line, a corrupt Parquet file is named, configs are bounded, a
diverging run stops without saving, and truncation that removes targets is counted (issue 11, classes
2, 7, 8, 9)."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from train.cli import _config_from_args, build_parser, main
from train.loop import run_fingerprint

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import one_torch_thread  # noqa: E402,F401  (autouse fixture)
from train_helpers import make_tiny_model, pref_pairs, sft_conversations, write_pref_split, write_sft_split  # noqa: E402

# Hand-written single-turn conversations in three shapes: one that fits in 40 tokens, one whose answer
# is cut at 40 tokens, one whose prompt alone is longer than 40 tokens.
SHORT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"}]
CUT_ANSWER = [
    {"role": "user", "content": "My refund is late."},
    {"role": "assistant", "content": "Sorry about the refund. Open Settings, then Billing, then Refunds, and pick the order to see where it is."},
]
LONG_PROMPT = [
    {"role": "system", "content": "You are a support agent for a shop that sells shoes, bags and hats in many countries."},
    {"role": "user", "content": "I need help with the invoice copy for order 1042 and the shipping delay."},
    {"role": "assistant", "content": "Sure, done."},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_safety")
    return {
        "model": make_tiny_model(root / "model"),
        "sft": write_sft_split(root / "sft", sft_conversations(12), sft_conversations(4, offset=100)),
        "shapes": write_sft_split(root / "shapes", [SHORT, CUT_ANSWER, LONG_PROMPT], [SHORT]),
        "pref": write_pref_split(root / "pref", pref_pairs(6), pref_pairs(2, offset=100)),
    }


def _argv(tiny, out: Path, *extra: str, split: str = "sft", steps: int = 6, verb: str = "sft") -> list[str]:
    """Flags for a tiny run; `extra` comes last, so its --lr / --max-seq-len win."""
    return [verb, "--model", str(tiny["model"]), "--data", str(tiny[split]) if split in tiny else split,
            "--output-dir", str(out), "--max-steps", str(steps), "--max-seq-len", "128", "--lr", "0.01",
            *(["--no-progress"] if verb in ("sft", "dpo") else []),
            "--set", "threads=1", "--set", "eval.samples=0", "--set", "optim.batch_rows=2", "--set", "lora.r=4",
            "--set", "eval.at_end=false", *extra]  # fmt: skip


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# --------------------------------------------------------------------------------- no code from a file
class _CreatesFileWhenUnpickled:
    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_pickled_state_in_a_checkpoint_is_never_unpickled(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*_argv(tiny, out), "--stop-at-step", "2"]) == 0
    good = out / "checkpoints" / "step-000002"
    config = _config_from_args(build_parser().parse_args(_argv(tiny, out)))
    fingerprint = run_fingerprint(config, "sft", 1)
    # A newer checkpoint in the old pickle format, with the right fingerprint: loading it would run code.
    crafted = out / "checkpoints" / "step-000004"
    shutil.copytree(good / "adapter", crafted / "adapter")
    sentinel = tmp_path / "code-ran"
    torch.save({"fingerprint": fingerprint, "step": 4, "payload": _CreatesFileWhenUnpickled(sentinel)}, crafted / "state.pt")
    capsys.readouterr()

    assert main([*_argv(tiny, out), "--resume-from", str(crafted)]) == 2
    assert _one_line(capsys.readouterr().err) == f"error: {crafted}: no manifest.json (an older pickle-based state.pt, never loaded)"
    assert not sentinel.exists()

    assert main(_argv(tiny, out)) == 0
    captured = capsys.readouterr()
    assert _one_line(captured.err) == (
        f"warning: resuming from step-000002, set aside as damaged-step-000004: {crafted}: "
        "no manifest.json (an older pickle-based state.pt, never loaded)"
    )
    assert not sentinel.exists()
    assert (out / "checkpoints" / "damaged-step-000004" / "state.pt").is_file()
    assert re.search(r"resumed from step\s+│\s+2\s", captured.out)


# ------------------------------------------------------------------------------- damaged checkpoints
@pytest.fixture(scope="module")
def straight_losses(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main([*_argv(tiny, out), "--set", "checkpoint.every=2"]) == 0
    return _losses(out)


@pytest.mark.parametrize("damaged", ["state.safetensors", "adapter/adapter_model.safetensors", "state.json"])
def test_a_truncated_latest_checkpoint_falls_back_to_the_previous_one(tiny, tmp_path, capsys, straight_losses, damaged):
    out = tmp_path / "run"
    assert main([*_argv(tiny, out), "--set", "checkpoint.every=2", "--stop-at-step", "4"]) == 0
    target = out / "checkpoints" / "step-000004" / damaged
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    capsys.readouterr()

    assert main([*_argv(tiny, out), "--set", "checkpoint.every=2"]) == 0
    captured = capsys.readouterr()
    assert _one_line(captured.err) == (
        f"warning: resuming from step-000002, set aside as damaged-step-000004: {target}: "
        "damaged (size or sha256 differs from manifest.json)"
    )
    assert re.search(r"resumed from step\s+│\s+2\s", captured.out)
    assert _losses(out) == straight_losses  # the fallback resumes exactly
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_no_intact_checkpoint_is_one_line_and_touches_nothing(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*_argv(tiny, out), "--set", "checkpoint.every=2", "--stop-at-step", "2"]) == 0
    weights = out / "checkpoints" / "step-000002" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(b"\0" * 16)
    capsys.readouterr()
    assert main(_argv(tiny, out)) == 2
    assert _one_line(capsys.readouterr().err) == (
        f"error: no intact checkpoint in {out / 'checkpoints'}: {weights}: damaged (size or sha256 differs from "
        "manifest.json); use --no-resume to start over"
    )
    assert weights.read_bytes() == b"\0" * 16 and not (out / "adapter").exists()


# ------------------------------------------------------------------------------------ corrupt Parquet
def _damaged_copy(split: Path, into: Path, name: str) -> Path:
    shutil.copytree(split, into)
    data = (split / "train-00000.parquet").read_bytes()
    (into / name).write_bytes(data[: len(data) // 2])
    return into / name


def test_a_truncated_shard_in_the_split_dir_is_named(tiny, tmp_path, capsys):
    bad = _damaged_copy(tiny["sft"], tmp_path / "split", "train-00001.parquet")
    assert main(_argv(tiny, tmp_path / "run", split=str(tmp_path / "split"))) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"error: {bad}: not a readable Parquet file (")
    assert not (tmp_path / "run").exists()


def test_a_messages_column_of_the_wrong_type_is_named(tiny, tmp_path, capsys):
    import polars as pl

    split = tmp_path / "split"
    shutil.copytree(tiny["sft"], split)
    pl.DataFrame({"messages": ["not a conversation"]}).write_parquet(split / "train-00001.parquet")
    assert main(_argv(tiny, tmp_path / "run", split=str(split))) == 2
    assert _one_line(capsys.readouterr().err) == (
        f"error: {split / 'train-00001.parquet'}: column 'messages' is String, expected a list of {{role, content}} strings"
    )


def test_a_corrupt_general_set_in_eval_is_named(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(tiny, out, steps=1)) == 0
    general = tmp_path / "general"
    general.mkdir()
    data = (tiny["sft"] / "validation-00000.parquet").read_bytes()
    (general / "validation-00000.parquet").write_bytes(data[:-40])  # the footer is gone
    capsys.readouterr()
    assert main([*_argv(tiny, out, verb="eval"), "--set", f"eval.general_set={general}"]) == 2
    assert _one_line(capsys.readouterr().err).startswith(f"error: {general / 'validation-00000.parquet'}: not a readable Parquet file (")


# ----------------------------------------------------------------------------------- config bounds
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lr", "inf"], "optim.lr: Input should be a finite number, got inf"),
        (["--set", "optim.max_grad_norm=.nan"], "optim.max_grad_norm: Input should be a finite number, got nan"),
        (["--set", "optim.betas=[1.5, 0.9]"], "optim.betas.0: Input should be less than 1, got 1.5"),
        (["--set", "optim.eps=0"], "optim.eps: Input should be greater than 0, got 0"),
        (["--set", "optim.max_grad_norm=0"], "optim.max_grad_norm: Input should be greater than 0, got 0"),
        (["--set", "lora.dropout=1.0"], "lora.dropout: Input should be less than 1, got 1.0"),
        (["--set", "eval.early_stopping_min_delta=-1"], "eval.early_stopping_min_delta: Input should be greater than or equal to 0, got -1"),
        (["--set", "seed=-3"], "seed: Input should be greater than or equal to 0, got -3"),
        (["--set", "dpo.beta=.inf"], "dpo.beta: Input should be a finite number, got inf"),
        (["--set", "threads=0"], "threads: Input should be greater than or equal to 1, got 0"),
    ],
)
def test_out_of_range_config_is_one_line_before_anything_loads(tiny, tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    assert main([*_argv(tiny, out), *flags]) == 2
    line = _one_line(capsys.readouterr().err)
    assert re.fullmatch(rf"error: {re.escape(message)} \(\d problem\(s\)\)", line), line
    assert not out.exists()


# ------------------------------------------------------------------------------- non-finite training
@pytest.mark.parametrize("clip", ["1.0", "null"])
def test_a_diverging_run_stops_without_saving_a_poisoned_adapter(tiny, tmp_path, capsys, clip):
    out = tmp_path / "run"
    code = main([*_argv(tiny, out), "--lr", "1e30", "--set", f"optim.max_grad_norm={clip}", "--set", "checkpoint.every=1"])
    assert code == 2
    line = _one_line(capsys.readouterr().err)
    assert re.fullmatch(r"error: step (\d+): loss \S+ / gradient norm \S+ is not finite; stopped before the update "
                        r"\((checkpoint step-\d{6} is the last saved|nothing was saved)\); lower optim.lr \(now 1e\+30\).*", line), line  # fmt: skip
    stopped_at = int(re.match(r"error: step (\d+)", line).group(1))
    assert not (out / "adapter").exists()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == stopped_at - 1 and all(math.isfinite(r["loss"]) for r in records)
    from safetensors.torch import load_file

    for checkpoint in (out / "checkpoints").glob("step-*"):
        assert int(checkpoint.name[5:]) < stopped_at
        weights = load_file(checkpoint / "adapter" / "adapter_model.safetensors")
        assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("clip", ["1.0", "null"])
def test_a_non_finite_step_between_logging_steps_is_caught_before_any_save(tiny, tmp_path, capsys, clip):
    """With log_every past the run's end, the device is first read at the last step, before its save:
    the bad step's update was applied, but no checkpoint, adapter or metrics record is written."""
    out = tmp_path / "run"
    code = main([*_argv(tiny, out), "--lr", "1e30", "--set", f"optim.max_grad_norm={clip}", "--set", "log_every=100"])
    assert code == 2
    line = _one_line(capsys.readouterr().err)
    match = re.fullmatch(r"error: step (\d+): loss \S+ / gradient norm \S+ is not finite; seen at step 6 \(the loss is read on "
                         r"logging steps and before saves\), stopped before saving \(nothing was saved\); lower optim.lr \(now 1e\+30\).*", line)  # fmt: skip
    assert match, line
    assert 1 < int(match.group(1)) < 6  # the first step starts from finite weights; lr 1e30 poisons the next
    assert not (out / "adapter").exists() and not list((out / "checkpoints").glob("step-*"))
    assert (out / "metrics.jsonl").read_text() == ""


# --------------------------------------------------------------------------------- target counting
def _expected_cut(tiny, conversations, max_seq_len: int) -> dict:
    """Counts derived from the tokenizer alone: for a single-turn conversation whose prompt tokenizes
    as a prefix of the whole, the targets are the tokens after the prompt."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    stats = {"samples": 0, "target_tokens": 0, "samples_cut": 0, "samples_losing_targets": 0, "target_tokens_removed": 0}
    for messages in conversations:
        prompt = encode(tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True))
        full = encode(tokenizer.apply_chat_template(messages, tokenize=False))
        assert full[: len(prompt)] == prompt  # the fixture is in the shape the derivation needs
        targets = len(full) - len(prompt)
        removed = targets - max(0, min(len(full), max_seq_len) - len(prompt))
        stats["samples"] += 1
        stats["target_tokens"] += targets
        stats["samples_cut"] += len(full) > max_seq_len
        stats["samples_losing_targets"] += removed > 0
        stats["target_tokens_removed"] += removed
    stats["target_tokens_left"] = stats["target_tokens"] - stats["target_tokens_removed"]
    return stats


def test_truncation_that_removes_targets_warns_with_exact_counts(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    expected = _expected_cut(tiny, [SHORT, CUT_ANSWER, LONG_PROMPT], 40)
    assert expected["samples_cut"] == 2 and expected["samples_losing_targets"] == 2 and expected["target_tokens_left"] > 0
    assert main([*_argv(tiny, out, split="shapes", steps=2), "--max-seq-len", "40"]) == 0
    e = expected
    assert _one_line(capsys.readouterr().err) == (
        f"warning: {tiny['shapes']}/train: data.max_seq_len=40 truncates 2 of 3 samples, removing "
        f"{e['target_tokens_removed']} of {e['target_tokens']} target tokens (2 samples lose targets, "
        f"{e['target_tokens_left']} target tokens left)"
    )
    recorded = json.loads((out / "train_config.json").read_text())["data_stats"]
    assert recorded["train"] == expected
    assert recorded["validation"] == _expected_cut(tiny, [SHORT], 40)


def test_prompts_longer_than_max_seq_len_everywhere_refuse_the_run(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    e = _expected_cut(tiny, [SHORT, CUT_ANSWER, LONG_PROMPT], 8)
    assert e["target_tokens_left"] == 0
    assert main([*_argv(tiny, out, split="shapes", steps=2), "--max-seq-len", "8"]) == 2
    assert _one_line(capsys.readouterr().err) == (
        f"error: {tiny['shapes']}/train: data.max_seq_len=8 truncates 3 of 3 samples, removing {e['target_tokens']} of "
        f"{e['target_tokens']} target tokens (3 samples lose targets, 0 target tokens left): nothing to train on; "
        "raise data.max_seq_len"
    )
    assert not out.exists()


def test_dpo_truncation_counts_response_tokens(tiny, tmp_path, capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny["model"])
    render = lambda messages, gen: tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)  # noqa: E731
    count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    lengths = []
    for pair in pref_pairs(6):
        prompt = render(pair["prompt"], True)
        responses = [render(pair["prompt"] + pair[side], False)[len(prompt) :] for side in ("chosen", "rejected")]
        lengths.append((count(prompt), *map(count, responses)))
    max_seq_len = 78
    cut = sum(p + c + r > max_seq_len for p, c, r in lengths)
    targets = sum(c + r for _, c, r in lengths)
    assert 0 < cut < len(lengths)
    out = tmp_path / "run"
    assert main([*_argv(tiny, out, split="pref", steps=1, verb="dpo"), "--max-seq-len", str(max_seq_len)]) == 0
    stats = json.loads((out / "train_config.json").read_text())["data_stats"]["train"]
    assert stats["samples"] == 6 and stats["samples_cut"] == cut and stats["target_tokens"] == targets
    assert 0 < stats["target_tokens_removed"] and stats["target_tokens_removed"] + stats["target_tokens_left"] == targets
    warning = capsys.readouterr().err.strip().splitlines()[0]
    assert warning == (
        f"warning: {tiny['pref']}/train: data.max_seq_len=78 truncates {cut} of 6 samples, removing "
        f"{stats['target_tokens_removed']} of {targets} target tokens ({stats['samples_losing_targets']} samples lose "
        f"targets, {stats['target_tokens_left']} target tokens left)"
    )


def test_a_pickled_or_truncated_adapter_is_refused_in_one_line(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(tiny, out, steps=1)) == 0
    pickled, truncated = tmp_path / "pickled", tmp_path / "truncated"
    shutil.copytree(out / "adapter", pickled)
    shutil.copytree(out / "adapter", truncated)
    sentinel = tmp_path / "code-ran"
    (pickled / "adapter_model.safetensors").unlink()
    torch.save({"payload": _CreatesFileWhenUnpickled(sentinel)}, pickled / "adapter_model.bin")
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    assert main([*_argv(tiny, out, verb="eval"), "--adapter", str(pickled)]) == 2
    assert _one_line(capsys.readouterr().err) == (
        f"error: {pickled}: no adapter_model.safetensors (pickled adapter_model.bin is not loaded)"
    )
    assert not sentinel.exists()
    assert main([*_argv(tiny, out, verb="merge"), "--adapter", str(truncated), "--out", str(tmp_path / "merged")]) == 2
    assert _one_line(capsys.readouterr().err).startswith(f"error: {truncated}: cannot load adapter: ")
    assert not (tmp_path / "merged").exists()


def test_base_weights_are_read_from_safetensors_only(tiny, tmp_path, capsys):
    from safetensors.torch import load_file

    model = tmp_path / "model"
    shutil.copytree(tiny["model"], model)
    # The same weights as a (tensor-only) pickle: still a file we would have to unpickle.
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    assert main([*_argv(tiny, tmp_path / "run", steps=1), "--model", str(model)]) == 2
    assert _one_line(capsys.readouterr().err).startswith(f"error: {model}: cannot load model: ")


def test_a_metrics_line_cut_by_kill_9_does_not_stop_the_resume(tiny, tmp_path, capsys, straight_losses):
    out = tmp_path / "run"
    assert main([*_argv(tiny, out), "--set", "checkpoint.every=2", "--stop-at-step", "2"]) == 0
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"epoch": 0, "loss": 6.9, "st')  # the process died mid-line
    capsys.readouterr()
    assert main([*_argv(tiny, out), "--set", "checkpoint.every=2"]) == 0
    assert capsys.readouterr().err == ""
    assert _losses(out) == straight_losses


def test_a_hand_edited_state_json_is_one_line(tiny, tmp_path, capsys):
    import hashlib

    out = tmp_path / "run"
    assert main([*_argv(tiny, out), "--stop-at-step", "2"]) == 0
    checkpoint = out / "checkpoints" / "step-000002"
    saved = json.loads((checkpoint / "state.json").read_text())
    saved["state"]["optimizer"] = {"state": "x"}
    (checkpoint / "state.json").write_text(json.dumps(saved))
    # Consistent hashes: the content itself is what is wrong.
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    data = (checkpoint / "state.json").read_bytes()
    manifest["files"]["state.json"] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(_argv(tiny, out)) == 2
    assert _one_line(capsys.readouterr().err).startswith(f"error: {checkpoint}: state.json does not fit this run (")


def test_no_source_file_unpickles():
    """Class 2 at the source: nothing in the product loads a pickle (checkpoints are safetensors + JSON,
    numpy arrays never allow pickles, datasketch keys are not prepickled)."""
    repo = Path(__file__).resolve().parents[1]
    forbidden = re.compile(r"torch\.load\(|pickle\.loads?\(|weights_only\s*=\s*False|allow_pickle\s*=\s*True|prepickle\s*=\s*True|joblib\.load|np\.load\((?![^)]*allow_pickle=False)")
    found = [f"{path.relative_to(repo)}:{number}" for folder in ("curate", "train", "safety", "schemas", "bench", "scripts")
             for path in sorted((repo / folder).rglob("*.py"))
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if forbidden.search(line)]  # fmt: skip
    assert found == []
