"""Continual fine-tuning through the CLI: `--init-adapter` starts from an adapter's weights (fresh
optimizer), records its lineage, refuses another LoRA shape, and combines with resume."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from train.cli import main
from train.config import load_config
from train.data import load_sft_split
from train.models import load_tokenizer
from train.packing import plan_packing

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import one_torch_thread  # noqa: E402,F401  (autouse fixture)
from train_helpers import base_config, make_tiny_model, sft_conversations, write_sft_split  # noqa: E402


def _write_config(path: Path, model: Path, split: Path, out: Path, **optim) -> Path:
    tree = base_config(model, split, out, **optim)
    tree["eval"]["samples"] = 0
    path.write_text(yaml.safe_dump(tree))
    return path


def _first_loss(run: Path) -> float:
    return next(r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r)


@pytest.fixture(scope="module")
def adapter_a(tmp_path_factory):
    """Adapter A trained on split S1; split S2 trains on S1's validation rows (the same parquet file)."""
    root = tmp_path_factory.mktemp("continual")
    model = make_tiny_model(root / "model")
    s1 = write_sft_split(root / "s1", sft_conversations(16), sft_conversations(5, offset=100))
    s2 = root / "s2"
    s2.mkdir()
    shutil.copy(s1 / "validation-00000.parquet", s2 / "train-00000.parquet")
    shutil.copy(s1 / "validation-00000.parquet", s2 / "validation-00000.parquet")
    config_a = _write_config(root / "a.yaml", model, s1, root / "run_a")
    assert main(["sft", "--config", str(config_a), "--max-steps", "8"]) == 0
    return {"root": root, "model": model, "s1": s1, "s2": s2, "config_a": config_a, "adapter": root / "run_a" / "adapter"}


def _s2_config(a, name: str, out: Path) -> Path:
    # One optimizer step covers every packed row of S2 exactly once, so its loss is the eval loss.
    config = load_config(None, base=base_config(a["model"], a["s2"], out))
    data = load_sft_split(load_tokenizer(config.model), a["s2"], "train", None, True)
    rows = plan_packing(data.lengths, config.data.max_seq_len).num_rows
    return _write_config(a["root"] / name, a["model"], a["s2"], out, batch_rows=rows, grad_accum=1)


def test_continuing_starts_from_the_adapter_weights(adapter_a, tmp_path):
    a = adapter_a
    assert main(["eval", "--config", str(a["config_a"]), "--adapter", str(a["adapter"]), "--task-prompts", "0", "--json", str(tmp_path / "a.json")]) == 0
    eval_loss = json.loads((tmp_path / "a.json").read_text())["validation"]["adapter_loss"]

    config = _s2_config(a, "cont.yaml", tmp_path / "cont")
    assert main(["sft", "--config", str(config), "--init-adapter", str(a["adapter"]), "--max-steps", "1"]) == 0
    assert abs(_first_loss(tmp_path / "cont") - eval_loss) < 1e-5

    assert main(["sft", "--config", str(config), "--output-dir", str(tmp_path / "fresh"), "--max-steps", "1"]) == 0
    assert _first_loss(tmp_path / "fresh") > eval_loss + 0.1  # a fresh LoRA starts at the base's loss

    recorded = json.loads((tmp_path / "cont" / "train_config.json").read_text())
    lineage = recorded["init_adapter_lineage"]
    import hashlib

    assert lineage["sha256"] == hashlib.sha256((a["adapter"] / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert lineage["path"] == str(a["adapter"]) and lineage["split_dir"] == str(a["s1"])
    assert lineage["output_dir"] == str(a["root"] / "run_a")
    card = (tmp_path / "cont" / "adapter" / "README.md").read_text()
    assert "## Continued from" in card and lineage["sha256"] in card
    assert json.loads((tmp_path / "fresh" / "train_config.json").read_text())["init_adapter_lineage"] is None


def test_a_different_lora_shape_or_a_pickle_is_refused_in_one_line(adapter_a, tmp_path, capsys):
    a = adapter_a
    config = _s2_config(a, "shape.yaml", tmp_path / "shape")
    assert main(["sft", "--config", str(config), "--init-adapter", str(a["adapter"]), "--set", "lora.r=4"]) == 2
    err = capsys.readouterr().err
    assert "r=8" in err and "lora.r=4" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "shape").exists()  # refused before anything was written

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(a["adapter"] / "adapter_config.json", pickled / "adapter_config.json")
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    assert main(["sft", "--config", str(config), "--init-adapter", str(pickled)]) == 2
    assert "adapter_model.safetensors" in capsys.readouterr().err


def test_resume_continues_its_own_checkpoint_and_refuses_another_init_adapter(adapter_a, tmp_path, capsys):
    a = adapter_a
    config = _write_config(tmp_path / "r.yaml", a["model"], a["s2"], tmp_path / "run", max_steps=3)
    init = ["--init-adapter", str(a["adapter"])]
    assert main(["sft", "--config", str(config), *init, "--stop-at-step", "2"]) == 0
    capsys.readouterr()
    assert main(["sft", "--config", str(config), *init]) == 0
    assert "resumed from step" in capsys.readouterr().out
    straight = tmp_path / "straight"
    assert main(["sft", "--config", str(config), *init, "--output-dir", str(straight)]) == 0
    # The resumed run continued its own weights (from step 2), not the init adapter's.
    records = lambda run: [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]  # noqa: E731
    assert records(tmp_path / "run") == pytest.approx(records(straight), abs=1e-6)

    other = tmp_path / "other"
    shutil.copytree(a["adapter"], other)
    from safetensors.torch import load_file, save_file

    weights = load_file(other / "adapter_model.safetensors")
    save_file({k: v * 0.5 for k, v in weights.items()}, other / "adapter_model.safetensors")
    assert main(["sft", "--config", str(config), "--init-adapter", str(other), "--set", "optim.max_steps=4"]) == 2
    assert "different run" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- replay
def test_replay_mixes_an_exact_share_of_the_previous_train_split(adapter_a, tmp_path, capsys):
    a = adapter_a
    new = write_sft_split(tmp_path / "new", sft_conversations(8, offset=200), sft_conversations(3, offset=300))
    config = _write_config(tmp_path / "replay.yaml", a["model"], new, tmp_path / "run", max_steps=1)
    replay = ["--set", f"data.replay.split_dir={a['s1']}"]
    assert main(["sft", "--config", str(config), *replay, "--set", "data.replay.fraction=0.2", "--init-adapter", str(a["adapter"])]) == 0
    recorded = json.loads((tmp_path / "run" / "train_config.json").read_text())
    # 8 new rows; 2 replayed make them 20% of 10.
    assert recorded["replay"] == {"split_dir": str(a["s1"]), "fraction": 0.2, "new_rows": 8, "previous_rows": 16, "rows_replayed": 2}
    assert recorded["data_stats"]["train"]["samples"] == 10
    assert recorded["data_stats"]["validation"]["samples"] == 3  # validation is never mixed

    # More than the previous split holds: all of it, once each, and a warning with the share reached.
    capsys.readouterr()
    assert main(["sft", "--config", str(config), *replay, "--set", "data.replay.fraction=0.9", "--output-dir", str(tmp_path / "all")]) == 0
    recorded = json.loads((tmp_path / "all" / "train_config.json").read_text())
    assert recorded["replay"]["rows_replayed"] == 16 and recorded["data_stats"]["train"]["samples"] == 24
    assert recorded["replay"]["fraction_reached"] == round(16 / 24, 4)
    warning = [line for line in capsys.readouterr().err.splitlines() if "data.replay.fraction=0.9" in line]
    assert len(warning) == 1 and "needs 72 rows" in warning[0] and "66.7%" in warning[0] and "upsample" in warning[0]

    # upsample: every previous row once, the rest copies sampled with replacement, up to the fraction (72 of 80).
    assert main(["sft", "--config", str(config), *replay, "--set", "data.replay.fraction=0.9", "--set", "data.replay.upsample=true",
                 "--output-dir", str(tmp_path / "up")]) == 0  # fmt: skip
    recorded = json.loads((tmp_path / "up" / "train_config.json").read_text())
    assert recorded["replay"]["rows_replayed"] == 72 and recorded["replay"]["upsampled_copies"] == 56
    assert "fraction_reached" not in recorded["replay"] and recorded["data_stats"]["train"]["samples"] == 80
    assert "data.replay.fraction" not in capsys.readouterr().err

    for bad in ("1.0", "nan", "0"):
        assert main(["sft", "--config", str(config), *replay, "--set", f"data.replay.fraction={bad}", "--output-dir", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
    capsys.readouterr()


def test_replay_sampling_is_deterministic_by_seed(adapter_a):
    from train.config import ReplayConfig
    from train.data import mix_replay, read_split

    new = read_split(adapter_a["s2"], "train", ["messages"], "sft")
    replay = ReplayConfig(split_dir=str(adapter_a["s1"]), fraction=0.5)
    first, _ = mix_replay(new, replay, ["messages"], "sft", seed=3)
    again, _ = mix_replay(new, replay, ["messages"], "sft", seed=3)
    other, _ = mix_replay(new, replay, ["messages"], "sft", seed=4)
    assert first.equals(again) and not first.equals(other)
    assert first.head(new.height).equals(new) and first.height == 2 * new.height
    previous = read_split(adapter_a["s1"], "train", ["messages"], "sft")
    replayed = first.tail(new.height)["messages"].to_list()
    assert all(row in previous["messages"].to_list() for row in replayed) and len({json.dumps(r) for r in replayed}) == len(replayed)

    upsampled, stats = mix_replay(new, replay.model_copy(update={"fraction": 0.9, "upsample": True}), ["messages"], "sft", seed=3)
    copies = upsampled.tail(stats["rows_replayed"])["messages"].to_list()
    assert {json.dumps(r) for r in copies} == {json.dumps(r) for r in previous["messages"].to_list()}  # every row at least once


# ---------------------------------------------------------------------------------------- forgetting
def test_compare_prints_and_writes_a_forgetting_table(adapter_a, tmp_path, capsys):
    a = adapter_a
    new = write_sft_split(tmp_path / "new", sft_conversations(8, offset=200), sft_conversations(3, offset=300))
    config = _write_config(tmp_path / "c.yaml", a["model"], new, tmp_path / "cont", max_steps=3)
    assert main(["sft", "--config", str(config), "--init-adapter", str(a["adapter"])]) == 0
    general = ["--set", f"eval.general_set={a['s2']}"]
    capsys.readouterr()
    out_json = tmp_path / "f.json"
    assert main(["eval", "--config", str(config), *general, "--compare", str(a["adapter"]), "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "forgetting" in printed and "previous validation" in printed and "general" in printed
    rows = {r["set"]: r for r in json.loads(out_json.read_text())["forgetting"]["rows"]}
    assert set(rows) == {"validation", "previous validation", "general"}
    assert rows["previous validation"]["split_dir"] == str(a["s1"])
    # The previous adapter on its own validation split: what `train eval` measured for it alone.
    assert main(["eval", "--config", str(a["config_a"]), "--adapter", str(a["adapter"]), "--task-prompts", "0", "--json", str(tmp_path / "a.json")]) == 0
    alone = json.loads((tmp_path / "a.json").read_text())["validation"]
    assert rows["previous validation"]["previous_loss"] == pytest.approx(alone["adapter_loss"], abs=1e-6)
    assert rows["previous validation"]["base_loss"] == pytest.approx(alone["base_loss"], abs=1e-6)
    for row in rows.values():
        assert row["change"] == pytest.approx(row["new_loss"] - row["previous_loss"])
        assert row["new_loss"] != row["previous_loss"]  # two different adapters were measured
    # The new adapter was trained on this split: it fits it better than the previous one.
    assert rows["validation"]["new_loss"] < rows["validation"]["previous_loss"]
