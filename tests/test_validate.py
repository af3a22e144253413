"""`curate validate`: record files and pipelines against the JSON Schemas."""

from __future__ import annotations

import json

import polars as pl

from curate.cli import main
from curate.records import canonical_frame
from schemas import CANONICAL_SCHEMA, MESSAGES_DTYPE, load_schema
from schemas.dtypes import dtype_from_json_schema


def test_dtypes_are_derived_from_the_json_schemas():
    assert MESSAGES_DTYPE == pl.List(dtype_from_json_schema(load_schema("message")))
    assert list(MESSAGES_DTYPE.inner.to_schema()) == ["role", "content", "tool_calls", "tool_call_id"]
    assert CANONICAL_SCHEMA["source"] == dtype_from_json_schema(load_schema("source"))
    assert set(load_schema("chat")["properties"]) <= set(CANONICAL_SCHEMA)
    assert set(load_schema("preference")["properties"]) <= set(CANONICAL_SCHEMA)


def test_a_canonical_parquet_validates(tmp_path, capsys):
    frame = canonical_frame(
        [
            {"messages": [{"role": "user", "content": "Where is my parcel?"}, {"role": "assistant", "content": "Arriving Monday."}]},
            {"prompt": "Refund?", "chosen": "Yes, within 30 days.", "rejected": "No."},
        ]
    )
    frame.write_parquet(tmp_path / "records.parquet")
    assert main(["validate", str(tmp_path / "records.parquet")]) == 0
    assert "2 rows match" in capsys.readouterr().out


def test_invalid_rows_are_listed_with_row_and_field(tmp_path, capsys):
    rows = [
        {"id": "a" * 32, "kind": "sft", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"id": "b" * 32, "kind": "sft", "messages": [{"role": "narrator", "content": "hi"}, {"role": "assistant", "content": "x"}]},
        {"id": "c" * 32, "kind": "preference", "prompt": [{"role": "user", "content": "q"}], "chosen": [], "rejected": [{"role": "assistant", "content": "r"}]},
    ]
    path = tmp_path / "records.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n{not json\n")
    assert main(["validate", str(path)]) == 2
    captured = capsys.readouterr()
    assert "row 2: messages[0].role: 'narrator' is not one of" in captured.out
    assert "row 3: chosen: [] should be non-empty" in captured.out
    assert "line 4: not valid JSON" in captured.out
    assert captured.err.strip().endswith("3 of 4 rows do not match the auto schema")
    assert len(captured.err.strip().splitlines()) == 1


def test_pipeline_yaml_validates_and_errors_name_the_field(sample_data, tmp_path, capsys):
    assert main(["validate", str(sample_data / "pipeline.yaml")]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("inputs:\n  - path: raw/x.jsonl\n    format: yaml\n")
    assert main(["validate", str(bad)]) == 2
    assert "inputs.0.format: 'yaml' is not one of" in capsys.readouterr().err
