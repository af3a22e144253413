"""The typed manifest (curate/manifest.py) and the reading contract (schemas/manifest.schema.json) agree:
every field the schema describes is declared on the model with the same JSON type, every field the
schema requires the model requires, and what the models build passes the schema."""

from __future__ import annotations

import json

import jsonschema
import pytest

from curate.manifest import Accounting, IngestRecord, Manifest, PipelineInfo, StageRecord
from curate.runner import load_manifest, run_pipeline
from schemas import load_schema

SCHEMA = load_schema("manifest")


def _json_types(schema: dict, definitions: dict) -> set[str]:
    """The JSON types a (possibly referenced, optional or annotated) schema allows."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        return _json_types(definitions.get(name) or SCHEMA["$defs"][name], definitions)
    if "anyOf" in schema:
        return set().union(*(_json_types(option, definitions) for option in schema["anyOf"]))
    types = schema.get("type", "any")
    return set(types) if isinstance(types, list) else {types}


@pytest.mark.parametrize(
    "model, section",
    [
        (Manifest, SCHEMA),
        (PipelineInfo, SCHEMA["properties"]["pipeline"]),
        (IngestRecord, SCHEMA["properties"]["stages"]["items"]),
        (Accounting, SCHEMA["properties"]["accounting"]),
    ],
    ids=["manifest", "pipeline", "stage", "accounting"],
)
def test_the_model_declares_every_field_the_schema_describes(model, section):
    generated = model.model_json_schema()
    definitions = generated.get("$defs", {})
    for name, described in section["properties"].items():
        assert name in generated["properties"], f"{model.__name__} lacks {name}"
        declared = _json_types(generated["properties"][name], definitions) - {"null"}
        expected = _json_types(described, {}) - {"null"}
        if expected != {"any"}:
            assert declared <= expected | ({"integer"} if "number" in expected else set()), (name, declared, expected)
    assert set(section.get("required", [])) <= set(generated.get("required", [])), model.__name__


def test_plain_stage_records_require_what_the_schema_requires():
    required = set(StageRecord.model_json_schema()["required"])
    assert set(SCHEMA["properties"]["stages"]["items"]["required"]) <= required


def test_a_built_manifest_passes_the_schema_and_loads(tmp_path):
    (tmp_path / "a.jsonl").write_text(
        json.dumps({"instruction": "Reset my router?", "output": "Hold the button ten seconds."}) + "\n{broken\n"
    )
    pipeline = {"name": "m", "run_dir": "out", "inputs": [{"path": "a.jsonl"}], "stages": [{"type": "tag"}, {"type": "filter", "config": {"preset": "chat"}}]}
    result = run_pipeline(pipeline, base_dir=tmp_path, report=False)
    jsonschema.Draft202012Validator(SCHEMA).validate(result.manifest)
    loaded = load_manifest(result.run_dir)
    assert loaded["accounting"]["reconciled"] and loaded["accounting"]["quarantined"] == 1
    assert [stage["name"] for stage in loaded["stages"]] == ["ingest", "tag", "filter"]
    assert "files" not in loaded["stages"][0] and loaded["inputs"][0]["rows"] == 2


def test_accounting_that_does_not_reconcile_is_refused():
    from curate.manifest import accounting

    common = dict(version="1", fingerprint="f", output_fingerprint="o", seconds=0.0)
    ingest = IngestRecord(name="ingest", type="ingest", rows_in=3, rows_out=3, rows_quarantined=0, quarantined_by_reason={}, **common)
    lossy = StageRecord(name="x", type="x", rows_in=3, rows_out=1, rows_dropped=1, **common)
    with pytest.raises(AssertionError, match="does not reconcile"):
        accounting([ingest, lossy])
