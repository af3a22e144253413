"""Hostile input at the CLI boundary: user text that looks like rich markup, a full disk, a manifest of
the wrong shape, and out-of-range numbers in stage configs. Each ends as the stated outcome (exit code,
one line on stderr, no traceback), through `curate`/`train` `main(argv)` on real files."""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from curate.cli import main as curate_main
from curate.stage import registered_stages
from train.cli import main as train_main

REPO_ROOT = Path(__file__).resolve().parent.parent


def write_rows(path: Path, count: int = 12, extra_key: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        row = {"instruction": f"Question number {i} about billing", "output": f"A long enough answer number {i}."}
        if extra_key:
            row[extra_key] = "value"
        rows.append(json.dumps(row))
    path.write_text("\n".join(rows) + "\n{broken\n", encoding="utf-8")


def write_pipeline(folder: Path, stages: list | None = None, **top) -> Path:
    pipeline = {"name": "t", "run_dir": "out", "inputs": [{"path": "in/a.jsonl"}], "stages": stages or [], **top}
    path = folder / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline), encoding="utf-8")
    return path


def assert_one_line_error(err: str, *fragments: str) -> None:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ------------------------------------------------------------------------------------ rich markup


def test_json_key_with_markup_is_quoted_literally(tmp_path, capsys):
    raw = tmp_path / "odd.jsonl"
    raw.write_text(json.dumps({"[/x]": "hello there", "[bold]zzz": "hi, how can I help?"}) + "\n")
    assert curate_main(["ingest", str(raw), "--out", str(tmp_path / "out")]) == 2
    assert_one_line_error(capsys.readouterr().err, "['[/x]', '[bold]zzz']")


def test_markup_in_run_dir_and_json_key_is_shown_as_written(tmp_path, capsys):
    write_rows(tmp_path / "in" / "a.jsonl", extra_key="[/bold]key")
    pipeline = write_pipeline(tmp_path)
    run_dir = tmp_path / "out[bold]x[/]"
    assert curate_main(["run", str(pipeline), "--run-dir", str(run_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"manifest: {run_dir / 'manifest.json'}" in out  # literal, brackets and all
    assert (run_dir / "manifest.json").is_file()
    assert curate_main(["stats", str(run_dir)]) == 0
    assert str(run_dir) in capsys.readouterr().out


def test_markup_in_a_config_key_is_a_one_line_error_quoting_it(tmp_path, capsys):
    write_rows(tmp_path / "in" / "a.jsonl")
    pipeline = write_pipeline(tmp_path, stages=[{"type": "tag", "config": {"[/x]": 1}}])
    assert curate_main(["run", str(pipeline), "--quiet"]) == 2
    assert_one_line_error(capsys.readouterr().err, "config.[/x]")


def test_markup_in_a_missing_input_path_is_quoted_literally(tmp_path, capsys):
    write_rows(tmp_path / "in" / "a.jsonl")
    pipeline = write_pipeline(tmp_path)
    pipeline.write_text(pipeline.read_text().replace("in/a.jsonl", "nothere[/x]/[bold]a.jsonl"))
    assert curate_main(["run", str(pipeline), "--quiet"]) == 2
    assert_one_line_error(capsys.readouterr().err, "nothere[/x]/[bold]a.jsonl")


def test_train_error_quoting_a_path_with_markup(tmp_path, capsys):
    missing = tmp_path / "split[/x]"
    code = train_main(["sft", "--config", str(REPO_ROOT / "configs" / "demo_sft.yaml"), "--data", str(missing),
                       "--output-dir", str(tmp_path / "train-out")])  # fmt: skip
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, str(missing))


# ------------------------------------------------------------------------------------ disk full


def _limit_file_size(limit: int):
    # A full disk cannot be made without root and a mount; RLIMIT_FSIZE makes the kernel fail writes past
    # `limit` bytes (EFBIG, with SIGXFSZ ignored as Python does) from the same write calls, in Python
    # and in Polars' Rust writers alike: the failure path a full disk (ENOSPC) takes.
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_disk_full_during_a_run_is_one_line_and_leaves_no_partial_outputs(tmp_path):
    rows = [
        json.dumps({"instruction": f"Question {i} " + os.urandom(48).hex(), "output": "Answer " + os.urandom(96).hex()})
        for i in range(6000)
    ]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text("\n".join(rows) + "\n")
    pipeline = write_pipeline(tmp_path, stages=[{"type": "split"}])
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "curate.cli", "run", str(pipeline), "--quiet"],
        capture_output=True, text=True, env=env, cwd=tmp_path, preexec_fn=_limit_file_size(256 * 1024), timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert_one_line_error(result.stderr, "cannot write", str(tmp_path / "out"))
    left = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*"))
    assert not [p for p in left if p.endswith(".tmp") or ".ingest-parts-" in p], left
    assert "manifest.json" not in left and "ingest/_SUCCESS.json" not in left and "ingest/data.parquet" not in left


# ------------------------------------------------------------------------------------ malformed manifest


@pytest.mark.parametrize(
    "manifest",
    [
        [1, 2],
        None,
        {"stages": []},
        {"pipeline": {"name": "x"}, "run_dir": "r", "stages": {"a": 1}, "accounting": {}},
        {"pipeline": {"name": "x"}, "run_dir": "r", "stages": [{"name": "a"}], "accounting": {}},
        {
            "pipeline": {"name": "x"},
            "run_dir": "r",
            "stages": [{"name": "a", "type": "t", "rows_in": "3", "rows_out": 1}],
            "accounting": {"rows_in": 1, "kept": 1, "dropped": 0, "quarantined": 0, "reconciled": True},
        },
    ],
    ids=["list", "null", "missing-keys", "stages-not-a-list", "stage-missing-counts", "count-is-a-string"],
)
@pytest.mark.parametrize("verb", ["stats", "report"])
def test_stats_and_report_on_a_malformed_manifest(tmp_path, capsys, manifest, verb):
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert curate_main([verb, str(tmp_path)]) == 2
    assert_one_line_error(capsys.readouterr().err, str(tmp_path / "manifest.json"))
    assert not (tmp_path / "report.html").exists()


def test_stats_on_a_manifest_that_is_not_utf8(tmp_path, capsys):
    (tmp_path / "manifest.json").write_bytes(b"\xff\xfe{")
    assert curate_main(["stats", str(tmp_path)]) == 2
    assert_one_line_error(capsys.readouterr().err, "manifest.json")


# ------------------------------------------------------------------------------------ bounds


# The smallest config each stage accepts, so a refusal below is the field's own.
BASE_CONFIGS = {
    "decontaminate": {"eval_files": ["eval.jsonl"]},
    "label_push": {"dataset": "d"},
    "label_pull": {"dataset": "d"},
    "mix": {"ratios": {"a": 1.0}},
}


def _numeric_leaves(annotation, metadata=(), path=()):
    """(path, type, bound metadata) of every int/float inside a field's type: through Optional,
    Annotated, dict values ('*' in the path) and nested config models."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        yield from _numeric_leaves(args[0], (*metadata, *annotation.__metadata__), path)
    elif origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in args:
            yield from _numeric_leaves(arg, metadata, path)
    elif origin is dict:
        yield from _numeric_leaves(args[1], (), (*path, "*"))
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        for name, field in annotation.model_fields.items():
            yield from _numeric_leaves(field.annotation, tuple(field.metadata), (*path, name))
    elif annotation in (int, float):
        yield path, annotation, metadata


def _bounds(metadata) -> dict:
    found = {}
    for item in metadata:
        for key in ("ge", "gt", "le", "lt"):
            if getattr(item, key, None) is not None:
                found[key] = getattr(item, key)
        for inner in getattr(item, "metadata", ()) or ():  # a FieldInfo inside Annotated
            found.update(_bounds([inner]))
    return found


def _curate_fields():
    for type_name, spec in registered_stages().items():
        if not spec.config_model.__module__.startswith("curate."):
            continue  # plugins registered by other test modules
        for name, field in spec.config_model.model_fields.items():
            for path, kind, metadata in _numeric_leaves(field.annotation, tuple(field.metadata), (name,)):
                yield pytest.param(type_name, path, kind, metadata, id=f"{type_name}.{'.'.join(path)}")


def test_every_stage_is_walked():
    walked = {param.values[0] for param in _curate_fields()}
    # filter has no numeric option of its own: its bounds live in rules (any finite number; see
    # test_filter_rule_bound_must_be_a_finite_number)
    assert {"ingest", "dedup", "split", "mix", "decontaminate", "tag", "label_push", "label_pull"} <= walked


def _nest(path: tuple[str, ...], value, default):
    if not path:
        return value
    if path[0] == "*":
        key = next(iter(default), "a") if isinstance(default, dict) and default else "a"
        return {key: value}
    return {path[0]: _nest(path[1:], value, (default or {}).get(path[0]) if isinstance(default, dict) else None)}


def _bad_values(kind) -> list:
    return [-1, -(2**40)] if kind is int else [-1.0, math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("type_name,path,kind,metadata", list(_curate_fields()))
def test_numeric_config_field_is_bounded_and_refused_out_of_range(tmp_path, capsys, type_name, path, kind, metadata):
    bounds = _bounds(metadata)
    assert "ge" in bounds or "gt" in bounds, f"{type_name}.{'.'.join(path)} has no lower bound"
    write_rows(tmp_path / "in" / "a.jsonl")
    spec = registered_stages()[type_name]
    defaults = spec.config_model.model_validate(BASE_CONFIGS.get(type_name, {})).model_dump()
    for bad in _bad_values(kind):
        config = {**BASE_CONFIGS.get(type_name, {}), **_nest(path, bad, defaults)}
        if spec.kind == "source":  # ingest: configured by the top-level block of the same name
            pipeline, where = write_pipeline(tmp_path, **{type_name: config}), f"{type_name}.{path[0]}"
        else:
            pipeline, where = write_pipeline(tmp_path, stages=[{"type": type_name, "config": config}]), "config." + path[0]
        assert curate_main(["run", str(pipeline), "--quiet"]) == 2, (path, bad)
        assert_one_line_error(capsys.readouterr().err, where)
    assert not (tmp_path / "out").exists()


def test_filter_rule_bound_must_be_a_finite_number(tmp_path, capsys):
    write_rows(tmp_path / "in" / "a.jsonl")
    rules = [{"name": "min_last_assistant_words", "min": math.nan}]
    pipeline = write_pipeline(tmp_path, stages=[{"type": "tag"}, {"type": "filter", "config": {"rules": rules}}])
    assert curate_main(["run", str(pipeline), "--quiet"]) == 2
    assert_one_line_error(capsys.readouterr().err, "config.rules.0.min")


def test_filter_disable_must_name_a_rule(tmp_path, capsys):
    write_rows(tmp_path / "in" / "a.jsonl")
    pipeline = write_pipeline(tmp_path, stages=[{"type": "tag"}, {"type": "filter", "config": {"disable": ["max_assistant_top_7gram_char_frac"]}}])
    assert curate_main(["run", str(pipeline), "--quiet"]) == 2
    assert_one_line_error(capsys.readouterr().err, "max_assistant_top_7gram_char_frac")


@pytest.mark.parametrize(
    "top, field",
    [({"seed": -1}, "seed"), ({"seed": 2**40}, "seed"), ({"ingest": {"chunk_rows": 0}}, "ingest.chunk_rows"),
     ({"ingest": {"max_row_bytes": -5}}, "ingest.max_row_bytes")],  # fmt: skip
)
def test_pipeline_level_numbers_are_bounded(tmp_path, capsys, top, field):
    write_rows(tmp_path / "in" / "a.jsonl")
    pipeline = write_pipeline(tmp_path, **top)
    assert curate_main(["run", str(pipeline), "--quiet"]) == 2
    assert_one_line_error(capsys.readouterr().err, field)
