"""The messy sample data: every planted broken row is quarantined with its reason, nothing is lost,
the generator is deterministic, and the full sample pipeline reconciles every row."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from curate.runner import run_pipeline

BROKEN_KINDS = {"malformed_json", "wrong_type", "missing_field", "unknown_role", "broken_turn_order", "invalid_utf8", "row_too_large"}


@pytest.fixture(scope="module")
def planted(sample_data) -> dict:
    return json.loads((sample_data / "planted.json").read_text())


@pytest.fixture(scope="module")
def ingest_run(sample_data, tmp_path_factory) -> Path:
    """The sample pipeline's inputs with no stages: what ingest alone makes of them."""
    pipeline = yaml.safe_load((sample_data / "pipeline.yaml").read_text())
    pipeline["stages"] = []
    run_dir = tmp_path_factory.mktemp("ingest") / "run"
    run_pipeline(pipeline, run_dir=run_dir, base_dir=sample_data, report=False)
    return run_dir


def test_every_planted_broken_row_is_quarantined_with_its_reason(ingest_run, planted):
    quarantine = pl.read_parquet(ingest_run / "quarantine.parquet")
    got = {(row["file"], row["row"]): row["reason"] for row in quarantine.to_dicts()}
    expected = {(item["file"], item["row"]): item["kind"] for item in planted["planted"] if item["kind"] in BROKEN_KINDS}
    assert len(expected) >= 60
    assert {key: got.get(key) for key in expected} == expected
    # Nothing clean is quarantined: the only other quarantined rows are planted empty responses.
    kinds = {(item["file"], item["row"]): item["kind"] for item in planted["planted"]}
    others = {key: reason for key, reason in got.items() if key not in expected}
    assert {kinds.get(key) for key in others} <= {"empty_response", "pref_empty"}
    assert set(others.values()) <= {"empty_content", "missing_field"}


def test_quarantine_keeps_the_raw_text_and_file_row(ingest_run):
    quarantine = pl.read_parquet(ingest_run / "quarantine.parquet")
    assert quarantine.filter(pl.col("raw").str.len_chars() == 0).height == 0
    assert quarantine["raw"].str.len_chars().max() <= 2000
    too_large = quarantine.filter(pl.col("reason") == "row_too_large").row(0, named=True)
    assert "bytes > max_row_bytes" in too_large["detail"]


def test_ingest_counts_match_the_raw_files(ingest_run, planted):
    manifest = json.loads((ingest_run / "manifest.json").read_text())
    by_file = {entry["file"]: entry for entry in manifest["inputs"]}
    for name, facts in planted["files"].items():
        if not name.startswith("raw/"):
            continue
        assert by_file[name]["rows"] == facts["rows"], name
        assert by_file[name]["kept"] + by_file[name]["quarantined"] == facts["rows"], name
    accounting = manifest["accounting"]
    assert accounting["rows_in"] == 6000
    assert accounting["kept"] + accounting["quarantined"] == 6000


def test_generator_is_deterministic(sample_data, tmp_path):
    copy = tmp_path / "sample_data"
    shutil.copytree(sample_data, copy, ignore=shutil.ignore_patterns("__pycache__"))
    for path in (copy / "raw").iterdir():
        path.unlink()
    subprocess.run([sys.executable, str(copy / "generate.py")], check=True, capture_output=True, cwd=copy)
    for original in sorted((sample_data / "raw").iterdir()) + [sample_data / "planted.json"]:
        regenerated = copy / original.relative_to(sample_data)
        assert hashlib.sha256(regenerated.read_bytes()).hexdigest() == hashlib.sha256(original.read_bytes()).hexdigest(), original.name


def test_full_sample_pipeline_reconciles_every_row(sample_run):
    manifest = json.loads((sample_run / "manifest.json").read_text())
    accounting = manifest["accounting"]
    assert accounting["reconciled"] is True
    dropped = sum(s.get("rows_dropped", 0) for s in manifest["stages"])
    assert accounting["rows_in"] + accounting["rows_added"] == accounting["kept"] + dropped + accounting["quarantined"]
    # Every stage's own books balance too.
    for stage in manifest["stages"][1:]:
        assert stage["rows_in"] + stage.get("rows_added", 0) == stage["rows_out"] + stage["rows_dropped"], stage["name"]
    # And the tables on disk agree with the manifest.
    on_disk_dropped = sum(
        pl.scan_parquet(path).select(pl.len()).collect().item() for path in sample_run.glob("*/dropped.parquet")
    )
    assert on_disk_dropped == dropped
    assert pl.scan_parquet(sample_run / "quarantine.parquet").select(pl.len()).collect().item() == accounting["quarantined"]
