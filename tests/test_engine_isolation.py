"""The local engine can run each stage in a process of its own (`engine: isolate_stages`), so every stage
starts from a fresh heap: the same run (every output byte, record and export), the same progress, and
the same one-line errors as in one process; a stage whose process dies is an error naming the stage."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml

import stage_plugins
from curate.cli import main
from curate.engines.isolation import StageProcessError
from curate.engines.local import ISOLATE_FROM_ROWS, LocalEngine
from curate.runner import RunEvents, run_pipeline

FIXTURES = Path(__file__).parent / "fixtures" / "engines"


def pipeline_file(tmp_path: Path, stages: list[dict], isolate, name: str = "pipeline") -> Path:
    pipeline = {
        "name": "isolation",
        "seed": 7,
        "inputs": [{"path": str(FIXTURES / file)} for file in ("chats.jsonl", "alpaca.jsonl", "prefs.jsonl")],
        "engine": {"batch_rows": 10, "isolate_stages": isolate},
        "stages": stages,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    return path


SAMPLE_SHAPED = [
    {"type": "dedup"},
    {"type": "pii", "config": {"mode": "redact"}},
    {"name": "length", "type": "stage_plugins:min_length_rows", "config": {"min_chars": 10}},
    {"type": "tag"},
    {"type": "decontaminate", "config": {"eval_files": [str(FIXTURES / "eval.jsonl")]}},
    # Which fields a config sets matters (a rule override merges only its set fields; `languages` unset keeps
    # the preset's language rule): the config must reach a stage's process with the same fields set.
    {"type": "filter", "config": {"preset": "chat", "rules": [{"name": "min_last_assistant_words", "min": 2}]}},
    {"type": "split", "config": {"train": 0.6, "validation": 0.2, "test": 0.2}},
]


def records_without_timings(manifest: dict) -> list[dict]:
    return [{key: value for key, value in record.items() if key not in ("seconds", "skipped")} for record in manifest["stages"]]


def test_a_process_per_stage_gives_the_same_run_and_progress(tmp_path):
    stage_plugins.BATCH_HEIGHTS.clear()
    together = run_pipeline(pipeline_file(tmp_path, SAMPLE_SHAPED, False), run_dir=tmp_path / "together", report=False)
    assert stage_plugins.BATCH_HEIGHTS, "in one process the plugin's transform ran here"

    stage_plugins.BATCH_HEIGHTS.clear()
    phases: list[tuple] = []
    events = RunEvents(phase_progress=lambda stage, phase, done, total, unit: phases.append((stage, phase, done, total, unit)))
    apart = run_pipeline(pipeline_file(tmp_path, SAMPLE_SHAPED, True), run_dir=tmp_path / "apart", events=events, report=False)
    assert stage_plugins.BATCH_HEIGHTS == [], "isolated, the transform ran in another process"

    # Same records (output fingerprints, row counts, reasons, reports), same accounting, same bytes.
    assert records_without_timings(apart.manifest) == json.loads(json.dumps(records_without_timings(together.manifest)).replace(str(tmp_path / "together"), str(tmp_path / "apart")))
    assert apart.manifest["accounting"] == together.manifest["accounting"] and apart.manifest["accounting"]["reconciled"]
    assert {"dedup", "length", "decontaminate", "filter"} <= set(apart.manifest["accounting"]["dropped_by_stage_reason"])
    outputs = [path.relative_to(tmp_path / "together") for path in (tmp_path / "together").rglob("*.parquet")]
    assert {path.parts[0] for path in outputs} >= {"ingest", "dedup", "split", "sft", "pref", "quarantine.parquet"}
    for relative in outputs:
        assert (tmp_path / "apart" / relative).read_bytes() == (tmp_path / "together" / relative).read_bytes(), relative
    assert not list((tmp_path / "apart").rglob("*.tmp"))

    # The children's progress reached this process's callbacks: every stage's counted phases, to the end.
    last = {(stage, phase): (done, total, unit) for stage, phase, done, total, unit in phases}
    input_bytes = sum((FIXTURES / file).stat().st_size for file in ("chats.jsonl", "alpaca.jsonl", "prefs.jsonl"))
    assert last[("ingest", "reading inputs")] == (input_bytes, input_bytes, "bytes")
    rows_in = {record["name"]: record["rows_in"] for record in apart.manifest["stages"]}
    assert last[("length", "transform")] == (rows_in["length"], rows_in["length"], "rows")
    assert last[("dedup", "writing")] == (rows_in["dedup"], rows_in["dedup"], "rows")
    assert ("split", "writing") in last


def test_a_cached_stage_rewrites_its_exports_from_its_own_process(tmp_path):
    stages = [{"type": "split", "config": {"train": 0.6, "validation": 0.2, "test": 0.2}}]
    first = run_pipeline(pipeline_file(tmp_path, stages, True), run_dir=tmp_path / "run", report=False)
    shards = sorted((tmp_path / "run").glob("sft/*.parquet"))
    before = {path: path.read_bytes() for path in shards}
    for path in shards:
        path.unlink()
    again = run_pipeline(pipeline_file(tmp_path, stages, True), run_dir=tmp_path / "run", report=False)
    assert [record["skipped"] for record in again.manifest["stages"]] == [True, True]
    assert {path: path.read_bytes() for path in shards} == before and first.manifest["accounting"] == again.manifest["accounting"]


def test_a_stage_error_in_its_process_is_the_same_one_line_error(tmp_path, capsys):
    stages = [{"name": "check", "type": "engine_plugins:fail_on", "config": {"needle": "prepaid label"}}]
    assert main(["run", str(pipeline_file(tmp_path, stages, True)), "--run-dir", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: row ") and "field messages: contains 'prepaid label'" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out" / "check" / "data.parquet").exists() and not list((tmp_path / "out").rglob("*.tmp"))


def test_a_stage_whose_process_is_killed_is_an_error_naming_the_stage_and_signal(tmp_path, capsys):
    stages = [{"name": "doomed", "type": "engine_plugins:dies"}]
    with pytest.raises(StageProcessError, match=r"stage 'doomed': its process ended without a result \(killed by SIGKILL: out of memory\?"):
        run_pipeline(pipeline_file(tmp_path, stages, True), run_dir=tmp_path / "out", report=False)
    assert (tmp_path / "out" / "ingest" / "data.parquet").is_file()  # the stages before it finished and stay
    assert not (tmp_path / "out" / "doomed" / "data.parquet").exists()
    assert main(["run", str(pipeline_file(tmp_path, stages, True)), "--run-dir", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "doomed" in err and "SIGKILL" in err and len(err.splitlines()) == 1


def test_auto_isolates_large_stages_only_and_rejects_other_values(tmp_path):
    from curate.errors import ConfigError
    from schemas import load_schema

    auto, never, always = LocalEngine(), LocalEngine(isolate_stages=False), LocalEngine(isolate_stages=True)
    assert (auto.isolates(ISOLATE_FROM_ROWS - 1), auto.isolates(ISOLATE_FROM_ROWS)) == (False, True)
    assert not never.isolates(10**9) and always.isolates(0)
    assert load_schema("pipeline")["properties"]["engine"]["properties"]["isolate_stages"]["default"] == "auto"
    with pytest.raises(ConfigError, match="engine.isolate_stages"):
        run_pipeline(pipeline_file(tmp_path, [], "sometimes"), run_dir=tmp_path / "out", report=False)


def test_ingest_in_its_own_process_keeps_mappings_repairs_and_quarantine(tmp_path):
    """Ingest's inputs cross to its process as JSON (mappings as their config): real shapes with mappings,
    repairs and quarantined rows give the same bytes, file reports and accounting as in one process."""
    import shutil

    shapes = Path(__file__).parent / "fixtures" / "real_shapes"
    for name in ("qa.csv", "forum_pairs.jsonl", "bot_logs.jsonl", "chitchat_by_id.json"):
        shutil.copy(shapes / name, tmp_path / name)
    chitchat = {"records": "values", "key_field": "dialog_id", "messages": "turns", "role_field": "speaker", "content_field": "text",
                "first_speaker": "user", "merge_consecutive": True, "trim_trailing_user": True}  # fmt: skip
    inputs = [
        {"path": "qa.csv", "mapping": {"system": "context", "prompt": "question", "response": "answer"}},
        {"path": "forum_pairs.jsonl", "mapping": {"prompt": "post.body", "chosen": "answers[0].text", "rejected": "answers[-1].text"}},
        {"path": "bot_logs.jsonl", "mapping": {"messages": "log", "role_field": "who", "content_field": "msg", "roles": {"customer": "user", "agent": "assistant"}}},
        {"path": "chitchat_by_id.json", "mapping": chitchat},
    ]
    runs = {}
    for isolate in (False, True):
        pipeline = {"name": "shapes", "inputs": inputs, "engine": {"isolate_stages": isolate}, "stages": []}
        runs[isolate] = run_pipeline(pipeline, run_dir=tmp_path / f"run-{isolate}", base_dir=tmp_path, report=False)
    together, apart = runs[False], runs[True]
    assert apart.manifest["inputs"] == together.manifest["inputs"] and len(apart.manifest["inputs"]) == 4
    assert apart.manifest["stages"][0]["repairs"] == {"merged_turns": 2, "trimmed_trailing_user": 1}
    assert apart.manifest["accounting"] == together.manifest["accounting"] and apart.manifest["accounting"]["quarantined"] == 1
    for relative in ("ingest/data.parquet", "quarantine.parquet"):
        assert (apart.run_dir / relative).read_bytes() == (together.run_dir / relative).read_bytes(), relative
