"""The Ray engine gives the same run as the local engine: kept rows in order, dropped rows with stage and
reason, quarantine, split assignments and accounting, on hand-written inputs (tests/fixtures/engines).

One local Ray cluster (2 CPUs) serves the module. Row-local stages run on it in batches of 10 rows, so
every stage is cut into several batches that two workers finish in any order: the outputs must still
come out in input order."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from curate.cli import main
from curate.errors import ConfigError
from curate.runner import RunEvents, run_pipeline

pytestmark = pytest.mark.ray

FIXTURES = Path(__file__).parent / "fixtures" / "engines"
RAY_STAGES = {"dedup", "pii", "reply_words", "mentions", "tag", "decontaminate", "filter"}  # row-local or distributed


@pytest.fixture(scope="module")
def ray_engine():
    from curate.engines import get_engine

    engine = get_engine("ray", num_cpus=2, batch_rows=10)
    yield engine
    engine.close()


def sample_like_pipeline(tmp_path: Path) -> Path:
    """The sample pipeline's shape (dedup, pii, tag, decontaminate, filter, split) with two row-local
    plugin stages in between."""
    pipeline = {
        "name": "engines",
        "seed": 7,
        "inputs": [{"path": str(FIXTURES / name)} for name in ("chats.jsonl", "alpaca.jsonl", "prefs.jsonl")],
        "stages": [
            {"type": "dedup"},
            {"type": "pii", "config": {"mode": "redact"}},
            {"name": "reply_words", "type": "engine_plugins:reply_words", "config": {"min_words": 3}},
            {"name": "mentions", "type": "engine_plugins:mentions", "config": {"slow_batches_with": "Order #HB-10233 left"}},
            {"type": "tag"},
            {"type": "decontaminate", "config": {"eval_files": [str(FIXTURES / "eval.jsonl")]}},
            {"type": "filter", "config": {"preset": "chat", "languages": ["en"]}},
            {"type": "split", "config": {"train": 0.6, "validation": 0.2, "test": 0.2}},
        ],
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    return path


def stage_records(manifest: dict, run_dir: Path) -> str:
    """Stage records without what may differ between engines (timings, which engine path ran, the run dir)."""
    drop = {"seconds", "skipped"}
    records = {
        record["name"]: {
            **{key: value for key, value in record.items() if key not in drop | {"report"}},
            "report": {key: value for key, value in (record.get("report") or {}).items() if key != "executed_on"},
        }
        for record in manifest["stages"]
    }
    return json.dumps(records, indent=1, sort_keys=True).replace(str(run_dir), "RUN_DIR")


def test_both_engines_give_the_same_run(tmp_path, ray_engine):
    pipeline = sample_like_pipeline(tmp_path)
    local = run_pipeline(pipeline, run_dir=tmp_path / "local", report=False)
    phases = []
    events = RunEvents(phase_progress=lambda stage, phase, done, total, unit: phases.append((stage, phase, done, total)))
    on_ray = run_pipeline(pipeline, run_dir=tmp_path / "ray", report=False, engine=ray_engine, events=events)

    assert on_ray.manifest["accounting"] == local.manifest["accounting"]
    assert stage_records(on_ray.manifest, tmp_path / "ray") == stage_records(local.manifest, tmp_path / "local")
    # The fixtures exercise every stage: something is dropped by each dropping stage, and quarantined.
    by_stage = local.manifest["accounting"]["dropped_by_stage_reason"]
    assert {"dedup", "reply_words", "decontaminate", "filter"} <= set(by_stage)
    assert local.manifest["accounting"]["quarantined_by_reason"] == {"empty_content": 1, "malformed_json": 2}

    for record in on_ray.manifest["stages"][1:]:
        name = record["name"]
        local_kept = pl.read_parquet(tmp_path / "local" / name / "data.parquet")
        ray_kept = pl.read_parquet(tmp_path / "ray" / name / "data.parquet")
        assert ray_kept["id"].to_list() == local_kept["id"].to_list(), name  # same rows, same order
        assert ray_kept.equals(local_kept), name  # and every column (scores, redacted text) the same
        assert ray_kept.schema == local_kept.schema, name
        local_dropped = pl.read_parquet(tmp_path / "local" / name / "dropped.parquet")
        ray_dropped = pl.read_parquet(tmp_path / "ray" / name / "dropped.parquet")
        assert ray_dropped.select("id", "stage", "reason").rows() == local_dropped.select("id", "stage", "reason").rows(), name
        assert record["report"]["executed_on"] == ("ray" if _runs_on_cluster(record["type"]) else "driver"), name

    assert pl.read_parquet(tmp_path / "ray" / "quarantine.parquet").equals(pl.read_parquet(tmp_path / "local" / "quarantine.parquet"))
    splits = [pl.read_parquet(tmp_path / run / "split" / "data.parquet").select("id", "split", "dup_cluster") for run in ("local", "ray")]
    assert splits[0].equals(splits[1]) and splits[0]["split"].n_unique() == 3
    exports = sorted((tmp_path / "local").glob("sft/*.parquet")) + sorted((tmp_path / "local").glob("pref/*.parquet"))
    assert {path.parent.name for path in exports} == {"sft", "pref"}
    for export in exports:
        twin = tmp_path / "ray" / export.relative_to(tmp_path / "local")
        assert pl.read_parquet(twin).equals(pl.read_parquet(export)), export.name

    # Progress: each stage on the cluster counted its rows as batches finished, up to the total.
    counted = {(stage, phase): (done, total) for stage, phase, done, total in phases}
    assert counted[("reply_words", "transform")] == (29, 29)
    assert counted[("mentions", "transform")] == (27, 27)
    assert not list((tmp_path / "ray").rglob("*.tmp")), "the workers' parts are gone"


def _runs_on_cluster(type_name: str) -> bool:
    return type_name.split(":")[-1] in RAY_STAGES  # split (no distributed form) runs on the driver


def small_pipeline(tmp_path: Path, stages: list[dict]) -> Path:
    pipeline = {"name": "small", "run_dir": "out", "inputs": [{"path": str(FIXTURES / "chats.jsonl")}], "stages": stages}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline))
    return path


def test_ray_writes_the_local_engines_bytes_whatever_the_batch_size(tmp_path, ray_engine):
    pipeline = small_pipeline(tmp_path, [{"name": "words", "type": "engine_plugins:reply_words", "config": {"min_words": 4}}])
    run_pipeline(pipeline, run_dir=tmp_path / "local", report=False)
    run_pipeline(pipeline, run_dir=tmp_path / "batches-of-10", report=False, engine=ray_engine)
    assert main(["run", str(pipeline), "--engine", "ray", "--quiet"]) == 0  # one batch: the default size
    for name in ("data.parquet", "dropped.parquet"):
        local = (tmp_path / "local" / "words" / name).read_bytes()
        assert (tmp_path / "batches-of-10" / "words" / name).read_bytes() == local
        assert (tmp_path / "out" / "words" / name).read_bytes() == local
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    report = manifest["stages"][1]["report"]
    assert (report["dropped"], report["min_words"], report["executed_on"]) == (2, 4, "ray")  # summarize ran on the outputs
    assert manifest["accounting"]["reconciled"]


def test_empty_input_gives_the_stage_columns_on_both_engines(tmp_path, ray_engine):
    # Everything goes in the first stage, so the second sees no rows at all (no batch reaches a worker).
    pipeline = small_pipeline(
        tmp_path,
        [
            {"name": "words", "type": "engine_plugins:reply_words", "config": {"min_words": 1000}},
            {"name": "mentions", "type": "engine_plugins:mentions"},
        ],
    )
    run_pipeline(pipeline, run_dir=tmp_path / "local", report=False)
    run_pipeline(pipeline, run_dir=tmp_path / "ray", report=False, engine=ray_engine)
    for name in ("words", "mentions"):
        for output in ("data.parquet", "dropped.parquet"):
            local, on_ray = (pl.read_parquet(tmp_path / run / name / output) for run in ("local", "ray"))
            assert on_ray.equals(local), (name, output)
    assert "mentions" in pl.read_parquet(tmp_path / "ray" / "mentions" / "data.parquet").columns


def test_a_stage_error_on_a_worker_is_one_line(tmp_path, ray_engine, capsys):
    pipeline = small_pipeline(tmp_path, [{"name": "check", "type": "engine_plugins:fail_on", "config": {"needle": "prepaid label"}}])
    assert main(["run", str(pipeline), "--engine", "ray", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: row ") and "field messages: contains 'prepaid label'" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "Ray" not in err
    assert not (tmp_path / "out" / "check" / "data.parquet").exists()


def test_unreachable_address_is_a_one_line_error_without_credentials(tmp_path, capsys):
    pipeline = small_pipeline(tmp_path, [{"name": "words", "type": "engine_plugins:reply_words"}])
    assert main(["run", str(pipeline), "--engine", "ray", "--address", "ray://admin:hunter2@127.0.0.1:1", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not reachable" in err and "127.0.0.1:1" in err and "hunter2" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--address", "auto"], "--address and --num-cpus go with --engine ray"),
        (["--engine", "ray", "--address", "somewhere"], "expected auto, HOST:PORT"),
        (["--engine", "ray", "--num-cpus", "0"], "--num-cpus: expected at least 1"),
        (["--engine", "ray", "--address", "auto", "--num-cpus", "2"], "--num-cpus sizes a local Ray cluster"),
    ],
)
def test_engine_flag_mistakes(tmp_path, capsys, flags, message):
    pipeline = small_pipeline(tmp_path, [{"name": "words", "type": "engine_plugins:reply_words"}])
    assert main(["run", str(pipeline), "--quiet", *flags]) == 2
    assert message in capsys.readouterr().err


def test_without_ray_installed_get_engine_says_how_to_install(monkeypatch):
    from curate.engines import get_engine

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where the extra is missing
    monkeypatch.delitem(sys.modules, "curate.engines.ray", raising=False)
    with pytest.raises(ConfigError, match=r"pip install 'curate\[ray\]'"):
        get_engine("ray")

