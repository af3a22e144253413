"""`train refresh` through the CLI on a tiny local model: generation 1 from the base, a refresh with a
second batch (a duplicate of earlier data, a new answer to a generation-1 validation prompt), a refresh
whose tolerance cannot be met, reruns that do nothing new, and a generation resumed after a failure."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from train.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import one_torch_thread  # noqa: E402,F401  (autouse fixture)
from train_helpers import base_config, make_tiny_model, sft_conversations, write_sft_split  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "refresh"


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _refresh(ctx: dict, batch: Path, *extra: str) -> int:
    return main(["refresh", "--pipeline", str(FIXTURES / "pipeline.yaml"), "--train", str(ctx["config"]),
                 "--new", str(batch), "--state", str(ctx["state"]), *extra])  # fmt: skip


def _prompt(messages) -> str:
    return messages[0]["content"]


@pytest.fixture(scope="module")
def refreshed(tmp_path_factory):
    """Generation 1 on batch1, then generation 2 on batch2 plus a new answer to a gen-1 validation prompt."""
    root = tmp_path_factory.mktemp("refresh")
    model = make_tiny_model(root / "model")
    tree = base_config(model, root / "set-by-refresh", root / "set-by-refresh-too", max_steps=4, grad_accum=1)
    tree["eval"]["samples"] = 0
    tree["data"]["max_seq_len"] = 256  # the fixture's conversations whole (the tiny tokenizer is verbose)
    tree["eval"]["general_set"] = str(write_sft_split(root / "general", sft_conversations(4), sft_conversations(6, offset=50)))
    (root / "train.yaml").write_text(yaml.safe_dump(tree))
    ctx = {"root": root, "config": root / "train.yaml", "state": root / "state"}
    assert _refresh(ctx, FIXTURES / "batch1.jsonl") == 0
    gen1_validation = pl.read_parquet(ctx["state"] / "gen-0001" / "split" / "validation-*.parquet")
    asked = _prompt(gen1_validation["messages"][0])
    batch2 = root / "batch2.jsonl"
    shutil.copy(FIXTURES / "batch2.jsonl", batch2)
    with open(batch2, "a", encoding="utf-8") as handle:
        reply = "Another agent's answer: call the hotline on a weekday with the serial number from the sticker."
        handle.write(json.dumps({"messages": [{"role": "user", "content": asked}, {"role": "assistant", "content": reply}]}) + "\n")
    ctx.update(batch2=batch2, asked=asked, current_after_gen1=_json(ctx["state"] / "current.json"))
    ctx["gen2_exit"] = _refresh(ctx, batch2, "--tolerance", "10")
    return ctx


def test_refresh_promotes_the_continued_adapter_with_a_forgetting_table(refreshed, capsys):
    state = refreshed["state"]
    assert refreshed["current_after_gen1"]["generation"] == 1
    assert refreshed["gen2_exit"] == 0
    current = _json(state / "current.json")
    assert current["generation"] == 2 and current["adapter"] == str(state / "gen-0002" / "train" / "adapter")
    report = _json(state / "gen-0002" / "report.json")
    assert report["decision"]["promoted"] and report["decision"]["metric"].startswith("previous validation loss")
    assert report["training"]["init_adapter"] == refreshed["current_after_gen1"]["adapter"]
    assert report["training"]["replayed_rows"] > 0
    assert _json(state / "gen-0002" / "train" / "train_config.json")["replay"]["split_dir"] == str(state / "gen-0001" / "curate" / "sft")
    sets = {row["set"]: row for row in report["forgetting"]}
    assert set(sets) == {"new validation", "previous validation", "general"}
    assert sets["previous validation"]["split_dir"] == str(state / "gen-0001" / "split")
    for row in sets.values():
        assert row["target_tokens"] > 0
        assert all(math.isfinite(row[k]) for k in ("base_loss", "previous_loss", "new_loss"))
        assert row["change"] == pytest.approx(row["new_loss"] - row["previous_loss"])
    assert report["decision"]["change"] == sets["previous validation"]["change"]
    assert "## Forgetting" in (state / "gen-0002" / "report.md").read_text()


def test_a_duplicate_of_generation_1_data_is_dropped_as_earlier_data(refreshed):
    state = refreshed["state"]
    duplicated = json.loads((FIXTURES / "batch1.jsonl").read_text().splitlines()[3])
    gen1 = pl.read_parquet(state / "gen-0001" / "curate" / "split" / "data.parquet")
    original = gen1.filter(pl.col("messages").list.first().struct.field("content") == _prompt(duplicated["messages"]))
    assert original.height == 1
    dropped = pl.read_parquet(state / "gen-0002" / "curate" / "dedup" / "dropped.parquet")
    assert dropped.select("reason", "duplicate_of").rows() == [("exact_duplicate", original["id"][0])]
    report = _json(state / "gen-0002" / "report.json")
    assert report["batch"]["duplicates_of_earlier_data"] == 1
    assert report["batch"]["dropped"] == [{"stage": "dedup", "reason": "exact_duplicate", "rows": 1}]
    assert report["batch"]["rows_in"] == 38 and report["batch"]["kept"] == 37
    # the duplicate is not trained on again: gen 2's own rows are only the kept new ones
    assert sum(report["splits"]["this batch (trained on)"].values()) == 37


def test_a_new_answer_to_a_generation_1_validation_prompt_stays_in_validation(refreshed):
    own = pl.read_parquet(refreshed["state"] / "gen-0002" / "split" / "*.parquet", include_file_paths="file")
    asked = own.filter(pl.col("messages").list.first().struct.field("content") == refreshed["asked"])
    assert asked.height == 1 and Path(asked["file"][0]).name.startswith("validation-")


def test_a_tolerance_that_cannot_be_met_keeps_the_current_adapter_and_a_rerun_does_nothing(refreshed, capsys):
    state = refreshed["state"]
    before = (state / "current.json").read_bytes()
    capsys.readouterr()
    assert _refresh(refreshed, FIXTURES / "batch3.jsonl", "--tolerance", "-100") == 3
    out = capsys.readouterr().out
    assert "not promoted: generation 3" in out and "beyond the tolerance" in out
    assert (state / "current.json").read_bytes() == before
    decision = _json(state / "gen-0003" / "decision.json")
    assert decision["promoted"] is False and decision["previous_generation"] == 2
    # gen 3 continued the current adapter (gen 2) and replayed gen 2's cumulative train split
    assert _json(state / "gen-0003" / "trained.json")["init_adapter"] == str(state / "gen-0002" / "train" / "adapter")

    stamps = {p: p.stat().st_mtime_ns for p in (state / "gen-0003").rglob("*") if p.is_file()}
    assert _refresh(refreshed, FIXTURES / "batch3.jsonl", "--tolerance", "-100") == 3
    assert "nothing new to do" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (state / "gen-0003").rglob("*") if p.is_file()} == stamps
    assert not (state / "gen-0004").exists() and (state / "current.json").read_bytes() == before


def test_a_promotion_cut_short_by_a_kill_is_finished_by_the_next_run(refreshed, capsys):
    # killed after gen 2's decision.json, before current.json moved: current still names gen 1
    state = refreshed["state"]
    promoted = (state / "current.json").read_bytes()
    (state / "current.json").write_text(json.dumps(refreshed["current_after_gen1"]))
    assert _refresh(refreshed, FIXTURES / "batch3.jsonl", "--tolerance", "-100") == 3  # gen 3: done, nothing new
    assert (state / "current.json").read_bytes() == promoted and not (state / "gen-0004").exists()


def test_a_generation_that_failed_resumes_and_another_request_waits_for_it(refreshed, tmp_path, capsys):
    """A refresh that failed in training is rerun with its finished steps skipped; a different request
    is refused until the unfinished generation is finished or discarded."""
    state = tmp_path / "state"
    ctx = {**refreshed, "state": state}
    failing = ("--set", "data.max_seq_len=8", "--set", "data.overflow=reject")
    assert _refresh(ctx, FIXTURES / "batch1.jsonl", *failing) == 2
    assert "error:" in capsys.readouterr().err
    assert (state / "gen-0001" / "curate" / "manifest.json").is_file() and not (state / "gen-0001" / "trained.json").exists()
    assert _refresh(ctx, FIXTURES / "batch1.jsonl", *failing) == 2
    assert all(stage["skipped"] for stage in _json(state / "gen-0001" / "curate" / "manifest.json")["stages"])
    assert _refresh(ctx, FIXTURES / "batch2.jsonl") == 2
    assert "unfinished" in capsys.readouterr().err and not (state / "current.json").exists()
    assert _refresh(ctx, FIXTURES / "batch2.jsonl", "--discard-unfinished") == 0
    assert _json(state / "current.json")["generation"] == 1
    assert list(_json(state / "gen-0001" / "request.json")["inputs"]) == [str((FIXTURES / "batch2.jsonl").resolve())]
    # the same batch again (another request): nothing new survives dedup, so nothing is trained or promoted
    assert _refresh(ctx, FIXTURES / "batch2.jsonl", "--tolerance", "1") == 3
    assert "no sft rows" in capsys.readouterr().out
    assert _json(state / "current.json")["generation"] == 1 and not (state / "gen-0002" / "train").exists()
    assert _json(state / "gen-0002" / "report.json")["batch"]["duplicates_of_earlier_data"] == 37  # every row of batch2


def test_a_pipeline_refresh_cannot_chain_is_a_one_line_error(refreshed, tmp_path, capsys):
    tree = yaml.safe_load((FIXTURES / "pipeline.yaml").read_text())
    no_split = tmp_path / "no_split.yaml"
    no_split.write_text(yaml.safe_dump({**tree, "stages": tree["stages"][:1]}))
    bad_stage = tmp_path / "bad_stage.yaml"
    bad_stage.write_text(yaml.safe_dump({**tree, "stages": [{"type": "dedup", "config": {"threshold": 7}}, tree["stages"][1]]}))
    for pipeline, expected in ((no_split, "needs a dedup stage and exactly one split stage"), (bad_stage, "threshold")):
        argv = ["refresh", "--pipeline", str(pipeline), "--train", str(refreshed["config"]),
                "--new", str(FIXTURES / "batch1.jsonl"), "--state", str(tmp_path / "state")]  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "state").exists()  # refused before any state was written
