"""The local engine streams row-local stages: bounded batches, the same bytes whatever the batch size,
counted progress, and per-stage resources (eval sets) loaded once, not per batch."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml
from filters_helpers import chat, train_tiny_tokenizer

import stage_plugins
from curate.filters import decontam
from curate.runner import RunEvents, run_pipeline

EVAL_ITEM = "The warranty covers accidental damage for two full years after the purchase date when registered online within thirty days"


def write_rows(folder: Path, count: int = 60) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        if i % 9 == 0:
            rows.append(chat(f"Mail me at user{i}@example.com about order {i}", f"Sure, I wrote to user{i}@example.com just now."))
        elif i % 11 == 0:
            rows.append(chat(f"What does the warranty cover, case {i}?", EVAL_ITEM + "."))
        elif i % 5 == 0:
            rows.append(chat(f"Hi {i}", "Ok."))
        else:
            rows.append(chat(f"How do I reset my router, ticket {i}?", f"Hold the reset button for ten seconds, then wait {i % 7 + 1} minutes for the lights."))
    (folder / "chats.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "eval.jsonl").write_text(json.dumps({"id": "warranty", "instruction": "What does the warranty cover?", "output": EVAL_ITEM}) + "\n")


def write_pipeline(folder: Path, stages: list[dict], batch_rows: int | None, run_dir: str) -> Path:
    pipeline = {"name": "s", "run_dir": run_dir, "inputs": [{"path": "chats.jsonl"}], "stages": stages}
    if batch_rows is not None:
        pipeline["engine"] = {"batch_rows": batch_rows}
    path = folder / f"{run_dir}.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    return path


def builtin_stages(folder: Path) -> list[dict]:
    return [
        {"type": "pii", "config": {"mode": "redact"}},
        {"type": "tag", "config": {"tokenizer": str(train_tiny_tokenizer(folder / "tokenizer.json"))}},
        {"type": "decontaminate", "config": {"eval_files": ["eval.jsonl"], "mode": "flag"}},
        {"name": "pii_drop", "type": "pii", "config": {"mode": "drop"}},
        {"type": "filter", "config": {"preset": "chat"}},
    ]


def stage_reports(manifest: dict) -> dict:
    return {record["name"]: {k: v for k, v in record.items() if k not in ("seconds", "skipped")} for record in manifest["stages"]}


def test_builtin_row_stages_give_the_same_bytes_and_reports_whatever_the_batch_size(tmp_path):
    write_rows(tmp_path)
    stages = builtin_stages(tmp_path)
    small = run_pipeline(write_pipeline(tmp_path, stages, 7, "small"), report=False)
    whole = run_pipeline(write_pipeline(tmp_path, stages, None, "whole"), report=False)
    reports = stage_reports(small.manifest), stage_reports(whole.manifest)
    assert reports[0] == reports[1]  # fingerprints included: the output bytes are the same
    for name in ("pii", "tag", "decontaminate", "pii_drop", "filter"):
        for output in ("data.parquet", "dropped.parquet"):
            assert (small.run_dir / name / output).read_bytes() == (whole.run_dir / name / output).read_bytes(), (name, output)
    by_name = reports[0]
    # The reports say what happened (so equal reports are not equal because empty).
    assert by_name["pii"]["report"]["rows_with_pii"] == 7 and by_name["pii"]["report"]["rows_redacted"] == 7
    assert by_name["pii"]["report"]["messages_redacted_by_column"]["messages"] == 14
    assert by_name["decontaminate"]["report"]["contaminated_rows"] == 5
    assert by_name["tag"]["report"]["token_count"]["max"] > 0 and "lang" in by_name["tag"]["report"]["score_columns"]
    assert by_name["filter"]["rows_dropped"] > 0 and by_name["filter"]["report"]["funnel"]


def test_a_row_stage_never_sees_more_than_batch_rows_and_matches_one_batch(tmp_path):
    write_rows(tmp_path, count=50)
    stages = [{"name": "length", "type": "stage_plugins:min_length_rows", "config": {"min_chars": 10}}]
    stage_plugins.BATCH_HEIGHTS.clear()
    small = run_pipeline(write_pipeline(tmp_path, stages, 7, "small"), report=False)
    assert max(stage_plugins.BATCH_HEIGHTS) <= 7 and sum(stage_plugins.BATCH_HEIGHTS) == 50
    stage_plugins.BATCH_HEIGHTS.clear()
    whole = run_pipeline(write_pipeline(tmp_path, stages, None, "whole"), report=False)
    assert stage_plugins.BATCH_HEIGHTS == [50]
    for output in ("data.parquet", "dropped.parquet"):
        assert (small.run_dir / "length" / output).read_bytes() == (whole.run_dir / "length" / output).read_bytes()
    assert stage_reports(small.manifest)["length"] == stage_reports(whole.manifest)["length"]
    assert small.manifest["stages"][-1]["report"]["dropped"] == 8  # the "Ok." answers (i % 5 == 0, not taken by the other shapes)


def test_a_row_stage_reports_monotone_row_counts_ending_at_its_input(tmp_path):
    write_rows(tmp_path, count=50)
    calls: list[tuple] = []
    events = RunEvents(phase_progress=lambda *call: calls.append(call))
    stages = [{"name": "length", "type": "stage_plugins:min_length_rows", "config": {"min_chars": 10}}]
    run_pipeline(write_pipeline(tmp_path, stages, 7, "run"), events=events, report=False)
    counted = [(done, total, unit) for stage, phase, done, total, unit in calls if stage == "length"]
    assert counted[0] == (0, 50, "rows") and counted[-1] == (50, 50, "rows")
    dones = [done for done, _, _ in counted]
    assert dones == sorted(dones)


def test_an_empty_input_still_writes_both_outputs_with_the_stage_columns(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "chats.jsonl").write_text(json.dumps(chat("Mail a@example.com", "Done, wrote to a@example.com.")) + "\n{broken\n")
    stages = [{"type": "pii", "config": {"mode": "drop"}}, {"type": "tag"}, {"type": "filter", "config": {"preset": "chat"}}]
    result = run_pipeline(write_pipeline(tmp_path, stages, 7, "run"), report=False)
    tagged = pl.read_parquet(result.run_dir / "tag" / "data.parquet")
    assert tagged.height == 0 and "assistant_word_count" in tagged.columns
    assert pl.read_parquet(result.run_dir / "filter" / "dropped.parquet").height == 0
    assert result.manifest["accounting"] | {"dropped_by_stage_reason": None} == {
        "rows_in": 2, "rows_added": 0, "kept": 0, "dropped": 1, "quarantined": 1, "dropped_by_stage_reason": None,
        "quarantined_by_reason": result.manifest["accounting"]["quarantined_by_reason"], "reconciled": True,
    }


def test_eval_items_are_read_once_per_stage_run_not_per_batch(tmp_path, monkeypatch):
    write_rows(tmp_path)
    reads: list[int] = []
    load = decontam.load_eval_items

    def counted_load(*args, **kwargs):
        reads.append(1)
        return load(*args, **kwargs)

    monkeypatch.setattr(decontam, "load_eval_items", counted_load)
    stages = [{"type": "decontaminate", "config": {"eval_files": ["eval.jsonl"]}}]
    result = run_pipeline(write_pipeline(tmp_path, stages, 7, "run"), report=False)
    assert result.manifest["stages"][-1]["rows_dropped"] == 5
    assert len(reads) == 1  # nine batches, the summary included


@pytest.mark.parametrize("batch_rows", [0, "many"])
def test_batch_rows_must_be_a_positive_integer(tmp_path, batch_rows):
    from curate.errors import ConfigError

    write_rows(tmp_path, count=3)
    with pytest.raises(ConfigError, match="engine.batch_rows"):
        run_pipeline(write_pipeline(tmp_path, [{"type": "tag"}], batch_rows, "run"), report=False)


def test_ingest_reports_bytes_read_ending_at_the_inputs_size(tmp_path):
    write_rows(tmp_path, count=40)
    calls: list[tuple] = []
    run_pipeline(write_pipeline(tmp_path, [], None, "run"), events=RunEvents(phase_progress=lambda *call: calls.append(call)), report=False)
    counted = [(phase, done, total, unit) for stage, phase, done, total, unit in calls if stage == "ingest"]
    size = (tmp_path / "chats.jsonl").stat().st_size
    assert counted[0] == ("reading inputs", 0, size, "bytes") and counted[-1] == ("reading inputs", size, size, "bytes")
    assert [done for _, done, _, _ in counted] == sorted(done for _, done, _, _ in counted)


def test_ingest_is_a_registered_stage_that_cannot_be_listed_among_the_stages(tmp_path):
    from curate.errors import ConfigError
    from curate.stage import get_stage

    assert get_stage("ingest").kind == "source"
    write_rows(tmp_path, count=3)
    with pytest.raises(ConfigError, match=r"stages\.0\.type: 'ingest' always runs first; configure it under `ingest:`"):
        run_pipeline(write_pipeline(tmp_path, [{"name": "again", "type": "ingest"}], None, "run"), report=False)


def test_the_documented_batch_rows_default_is_the_engines():
    from curate.engines.local import DEFAULT_BATCH_ROWS
    from schemas import load_schema

    assert load_schema("pipeline")["properties"]["engine"]["properties"]["batch_rows"]["default"] == DEFAULT_BATCH_ROWS


def test_the_live_view_shows_a_bar_per_phase_with_count_percentage_and_eta():
    from rich.console import Console

    from curate.display import PhaseBars

    bars = PhaseBars()
    bars.update("tag", "transform", 0, 1000, "rows")
    bars.update("tag", "transform", 400, 1000, "rows")
    bars.update("ingest", "reading [bold]inputs", 3_000_000, 10_000_000, "bytes")
    console = Console(width=140, record=True, force_terminal=False)
    console.print(bars.progress)
    text = console.export_text()
    assert "tag: transform" in text and "400/1,000 rows" in text and "40%" in text and "-:--:--" in text
    assert "ingest: reading [bold]inputs" in text and "3.0 MB/10.0 MB" in text and "30%" in text  # no markup
    bars.finish_stage("tag")
    console.print(bars.progress)
    assert "tag: transform" not in console.export_text()


def test_a_crash_in_a_later_batch_leaves_no_partial_output_and_rerun_resumes(tmp_path, monkeypatch):
    write_rows(tmp_path, count=50)
    stages = [{"name": "length", "type": "stage_plugins:min_length_rows", "config": {"min_chars": 10}}]
    pipeline = write_pipeline(tmp_path, stages, 7, "run")
    stage_plugins.BATCH_HEIGHTS.clear()
    monkeypatch.setenv("CRASH_STAGE", "length")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pipeline(pipeline, report=False)
    assert sorted(path.name for path in (tmp_path / "run" / "length").iterdir()) == []  # no partial or temp file
    monkeypatch.delenv("CRASH_STAGE")
    result = run_pipeline(pipeline, report=False)
    assert [record.get("skipped") for record in result.manifest["stages"]] == [True, False]
    assert result.manifest["accounting"]["reconciled"]


def test_a_stage_context_travels_to_another_process_and_caches_there_afresh(tmp_path):
    import pickle

    from curate.stage import StageContext

    ctx = StageContext(name="tag", run_dir=tmp_path, stage_dir=tmp_path / "tag", pipeline_dir=tmp_path, progress=print, phase_progress=print)
    assert ctx.cached("items", lambda: [1, 2]) == [1, 2]
    copy = pickle.loads(pickle.dumps(ctx))
    assert copy.name == "tag" and copy.stage_dir == tmp_path / "tag"
    assert copy.cached("items", lambda: ["rebuilt"]) == ["rebuilt"]


def test_dedup_outputs_are_written_batch_by_batch_with_the_rows_its_lazy_outputs_hold(tmp_path):
    """dedup's outputs go through `split_batch` (input batches beside the decisions): the same bytes for
    any batch size, and the same rows as the stage's lazy `kept`/`dropped`."""
    from curate.stage import StageContext, get_stage

    write_rows(tmp_path, count=80)
    answer = "Open the app, go to Settings, then Billing, choose the invoice for {month} and press download; it arrives as a PDF"
    copies = [chat(f"Where is my {month} invoice?", answer.format(month=month)) for month in ("March", "April") for _ in range(4)]
    copies += [chat("Where is my March invoice please?", answer.format(month="March") + " within a minute")] * 2
    with (tmp_path / "chats.jsonl").open("a") as rows:
        rows.write("".join(json.dumps(row) + "\n" for row in copies))
    stages = [{"type": "dedup", "config": {"keep": "longest_response"}}]
    small = run_pipeline(write_pipeline(tmp_path, stages, 7, "small"), report=False)
    whole = run_pipeline(write_pipeline(tmp_path, stages, None, "whole"), report=False)
    for output in ("data.parquet", "dropped.parquet"):
        assert (small.run_dir / "dedup" / output).read_bytes() == (whole.run_dir / "dedup" / output).read_bytes(), output
    spec = get_stage("dedup")
    ctx = StageContext(name="dedup", run_dir=tmp_path, stage_dir=tmp_path / "direct", pipeline_dir=tmp_path)
    ctx.stage_dir.mkdir()
    lazy = spec.run(pl.scan_parquet(whole.run_dir / "ingest" / "data.parquet"), spec.config_model.model_validate(stages[0]["config"]), ctx)
    kept, dropped = pl.read_parquet(whole.run_dir / "dedup" / "data.parquet"), pl.read_parquet(whole.run_dir / "dedup" / "dropped.parquet")
    assert dropped.height > 5 and kept.height > 20
    assert kept.equals(lazy.kept.collect()) and dropped.equals(lazy.dropped.collect())


def test_global_stages_written_batch_by_batch_give_their_whole_table_rows(tmp_path):
    """dedup and split hand the engine `split_batch`: their outputs, written from the input batch by batch
    beside the stage's decisions, are the rows of the stage's lazy whole-table output, for any batch size."""
    from curate.stage import StageContext, get_stage

    write_rows(tmp_path, count=80)
    stages = [{"type": "dedup"}, {"type": "split", "config": {"train": 0.5, "validation": 0.25, "test": 0.25}}]
    small = run_pipeline(write_pipeline(tmp_path, stages, 7, "small"), report=False)
    whole = run_pipeline(write_pipeline(tmp_path, stages, None, "whole"), report=False)
    for name in ("dedup", "split"):
        for output in ("data.parquet", "dropped.parquet"):
            assert (small.run_dir / name / output).read_bytes() == (whole.run_dir / name / output).read_bytes(), (name, output)
    for name, previous in (("dedup", "ingest"), ("split", "dedup")):
        spec = get_stage(name)
        entry = next(e for e in yaml.safe_load((tmp_path / "whole.yaml").read_text())["stages"] if e["type"] == name)
        ctx = StageContext(name=name, run_dir=tmp_path / "lazy", stage_dir=tmp_path / "lazy" / name, pipeline_dir=tmp_path)
        ctx.stage_dir.mkdir(parents=True)
        output = spec.run(pl.scan_parquet(whole.run_dir / previous / "data.parquet"), spec.config_model.model_validate(entry.get("config") or {}), ctx)
        written = pl.read_parquet(whole.run_dir / name / "data.parquet")
        assert written.equals(output.kept.collect()), name
        assert written.height > 0 and (name != "split" or written["split"].n_unique() == 3)
        if output.dropped is not None:
            assert pl.read_parquet(whole.run_dir / name / "dropped.parquet").equals(output.dropped.collect()), name


@pytest.mark.parametrize("name", ["dedup", "split"])
def test_split_batch_refuses_a_batch_its_decisions_do_not_cover(tmp_path, name):
    """A batch past the end of the stage's decisions is a bug: it must fail, not be padded with null
    decisions (for dedup: kept; for split: no split)."""
    from curate.stage import StageContext, get_stage

    write_rows(tmp_path, count=20)
    result = run_pipeline(write_pipeline(tmp_path, [], None, "ingest_only"), report=False)
    rows = pl.read_parquet(result.run_dir / "ingest" / "data.parquet")
    spec = get_stage(name)
    ctx = StageContext(name=name, run_dir=tmp_path / "lazy", stage_dir=tmp_path / "lazy" / name, pipeline_dir=tmp_path)
    ctx.stage_dir.mkdir(parents=True)
    output = spec.run(rows.lazy(), spec.config_model(), ctx)
    covered = output.split_batch(rows.slice(15, 5), 15)  # the last five rows: covered
    assert covered.kept.height + (covered.dropped.height if covered.dropped is not None else 0) == 5
    with pytest.raises(AssertionError, match=rf"{name}: {rows.height} decisions for input rows 17\.\.22"):
        output.split_batch(rows.slice(15, 5), 17)
