"""The runner: accounting, resume, determinism, atomic outputs, plugin stages, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml

import stage_plugins
from curate.cli import main
from curate.errors import ConfigError
from curate.runner import load_manifest, run_pipeline


def write_inputs(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"instruction": f"Question number {i} about billing", "output": "Short." if i % 3 == 0 else f"A long enough answer {i}."}
        for i in range(30)
    ]
    (folder / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    (folder / "b.jsonl").write_text(
        json.dumps({"prompt": "Refund?", "chosen": "Yes, within 30 days of purchase.", "rejected": "No."}) + "\n"
    )


def write_pipeline(folder: Path, min_chars: int = 10, extra_stages: list | None = None) -> Path:
    pipeline = {
        "name": "t",
        "run_dir": "out",
        "inputs": [{"path": "*.jsonl"}],
        "stages": [{"name": "length", "type": "stage_plugins:min_length", "config": {"min_chars": min_chars}}]
        + (extra_stages or []),
    }
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    return path


@pytest.fixture
def project(tmp_path) -> Path:
    write_inputs(tmp_path)
    return tmp_path


def test_counts_reconcile_and_outputs_exist(project):
    result = run_pipeline(write_pipeline(project))
    accounting = result.manifest["accounting"]
    assert accounting == {
        "rows_in": 32,
        "rows_added": 0,
        "kept": 21,
        "dropped": 10,
        "quarantined": 1,
        "dropped_by_stage_reason": {"length": {"too_short": 10}},
        "quarantined_by_reason": {"malformed_json": 1},
        "reconciled": True,
    }
    run_dir = project / "out"
    assert pl.read_parquet(run_dir / "length" / "dropped.parquet")["reason"].unique().to_list() == ["too_short"]
    assert pl.read_parquet(run_dir / "quarantine.parquet")["row"].to_list() == [31]
    assert result.manifest["stages"][1]["report"] == {"threshold": 10}
    assert len(result.manifest["pipeline"]["config_hash"]) == 64
    assert {f["file"] for f in result.manifest["inputs"]} == {"a.jsonl", "b.jsonl"}
    assert not list(run_dir.rglob("*.tmp")), "no temp files left behind"


def test_rerun_skips_unchanged_stages_and_threshold_change_reruns_only_that_stage(project):
    run_pipeline(write_pipeline(project))
    stage_plugins.CALLS.clear()
    again = run_pipeline(write_pipeline(project))
    assert [s["skipped"] for s in again.manifest["stages"]] == [True, True]
    assert stage_plugins.CALLS == []
    changed = run_pipeline(write_pipeline(project, min_chars=20))
    assert [s["skipped"] for s in changed.manifest["stages"]] == [True, False]
    assert changed.manifest["accounting"]["reconciled"]


def test_changed_input_file_reruns_everything(project):
    run_pipeline(write_pipeline(project))
    with (project / "b.jsonl").open("a") as handle:
        handle.write(json.dumps({"prompt": "Hi", "chosen": "Hello there, friend.", "rejected": "What."}) + "\n")
    result = run_pipeline(write_pipeline(project))
    assert [s["skipped"] for s in result.manifest["stages"]] == [False, False]
    assert result.manifest["accounting"]["rows_in"] == 33


def test_same_inputs_and_config_give_byte_identical_outputs(project, tmp_path):
    pipeline = write_pipeline(project)
    first = run_pipeline(pipeline, run_dir=tmp_path / "one").run_dir
    second = run_pipeline(pipeline, run_dir=tmp_path / "two").run_dir
    for relative in ("ingest/data.parquet", "length/data.parquet", "length/dropped.parquet", "quarantine.parquet"):
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative


def test_crash_in_a_stage_leaves_no_partial_output_and_rerun_resumes(project, monkeypatch):
    pipeline = write_pipeline(project)
    monkeypatch.setenv("CRASH_STAGE", "length")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pipeline(pipeline)
    assert (project / "out" / "ingest" / "_SUCCESS.json").exists()
    assert not (project / "out" / "length" / "data.parquet").exists()
    monkeypatch.delenv("CRASH_STAGE")
    result = run_pipeline(pipeline)
    assert [s["skipped"] for s in result.manifest["stages"]] == [True, False]


def test_tampered_output_is_recomputed(project):
    run_pipeline(write_pipeline(project))
    (project / "out" / "length" / "data.parquet").write_bytes(b"garbage")
    result = run_pipeline(write_pipeline(project))
    assert [s["skipped"] for s in result.manifest["stages"]] == [True, False]


def test_a_stage_that_loses_rows_is_refused(project):
    pipeline = write_pipeline(project, extra_stages=[{"name": "bad", "type": "stage_plugins:loses_rows"}])
    with pytest.raises(AssertionError, match="lost 1 rows"):
        run_pipeline(pipeline)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p.update(stages=[{"type": "no_such_stage"}]), "unknown stage type 'no_such_stage'"),
        (lambda p: p.update(inputs=[]), "inputs: [] should be non-empty"),
        (lambda p: p["stages"][0]["config"].update(min_chars="many"), "config.min_chars"),
        (lambda p: p["stages"][0]["config"].update(typo=1), "config.typo: Extra inputs are not permitted"),
        (lambda p: p.update(stages=p["stages"] * 2), "is used twice"),
    ],
)
def test_config_errors_are_one_line_and_name_the_field(project, capsys, edit, message):
    pipeline = yaml.safe_load(write_pipeline(project).read_text())
    edit(pipeline)
    (project / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    code = main(["run", str(project / "pipeline.yaml")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_invalid_yaml_names_the_line(project, capsys):
    (project / "pipeline.yaml").write_text("inputs:\n  - path: [unclosed\n")
    assert main(["run", str(project / "pipeline.yaml")]) == 2
    assert "line 3" in capsys.readouterr().err or "line 2" in capsys.readouterr().err


def test_stats_prints_the_summary_again(project, capsys):
    run_pipeline(write_pipeline(project))
    capsys.readouterr()
    assert main(["stats", str(project / "out")]) == 0
    out = capsys.readouterr().out
    assert "reconciled" in out and "too_short" in out and "malformed_json" in out
    assert load_manifest(project / "out")["accounting"]["kept"] == 21


def test_stats_on_a_non_run_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["stats", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_library_config_error_type(project):
    with pytest.raises(ConfigError):
        run_pipeline({"inputs": [{"path": "a.jsonl"}], "stages": [{"type": "nope"}]}, base_dir=project)
