"""One config system: the stage-config part of schemas/pipeline.schema.json is generated from the
stage config models and must equal a fresh regeneration; stage configs are validated by the models
alone at run time; `--set KEY=VALUE` reaches any field from the standalone verbs."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from curate import config_schema
from curate.cli import main
from curate.errors import ConfigError
from curate.runner import load_pipeline

REPO = Path(__file__).resolve().parents[1]
# The smallest config each stage accepts (the others have no required field).
BASE_CONFIGS = {
    "decontaminate": {"eval_files": ["eval.jsonl"]},
    "label_push": {"dataset": "d"},
    "label_pull": {"dataset": "d"},
    "mix": {"ratios": {"a": 1.0}},
}


def committed() -> dict:
    return json.loads(config_schema.PIPELINE_SCHEMA_PATH.read_text(encoding="utf-8"))


def test_committed_schema_equals_a_regeneration_from_the_models():
    text = config_schema.PIPELINE_SCHEMA_PATH.read_text(encoding="utf-8")
    assert config_schema.render(config_schema.pipeline_schema(json.loads(text))) == text
    assert config_schema.main(["--check"]) == 0


def test_check_fails_when_a_model_field_is_missing_from_the_file(tmp_path, monkeypatch, capsys):
    stale = committed()
    del stale["$defs"]["DedupConfig"]["properties"]["threshold"]
    path = tmp_path / "pipeline.schema.json"
    path.write_text(config_schema.render(stale), encoding="utf-8")
    monkeypatch.setattr(config_schema, "PIPELINE_SCHEMA_PATH", path)
    assert config_schema.main(["--check"]) == 1
    assert "out of date" in capsys.readouterr().err
    assert config_schema.main(["--write"]) == 0
    assert "threshold" in json.loads(path.read_text())["$defs"]["DedupConfig"]["properties"]


def test_every_builtin_stage_type_points_at_its_model_definition():
    schema = committed()
    rules = {rule["if"]["properties"]["type"]["const"]: rule["then"]["properties"]["config"]["$ref"]
             for rule in schema["properties"]["stages"]["items"]["allOf"]}  # fmt: skip
    models = config_schema.builtin_stage_configs()
    assert set(rules) == set(models) >= {"dedup", "tag", "filter", "split", "decontaminate", "label_push"}
    for stage_type, model in models.items():
        definition = schema["$defs"][rules[stage_type].removeprefix("#/$defs/")]
        fields = {field.alias or name for name, field in model.model_fields.items()}
        assert set(definition["properties"]) == fields, stage_type
        assert definition["additionalProperties"] is False  # unknown keys are refused in both


def pipeline_with(stage_type: str, config: dict) -> dict:
    return {"inputs": [{"path": "raw.jsonl"}], "stages": [{"type": stage_type, "config": config}]}


@pytest.mark.parametrize("stage_type", sorted(config_schema.builtin_stage_configs()))
def test_each_stage_default_config_is_valid_under_the_schema(stage_type):
    model = config_schema.builtin_stage_configs()[stage_type]
    dumped = model.model_validate(BASE_CONFIGS.get(stage_type, {})).model_dump(mode="json", by_alias=True, exclude_none=True)
    errors = list(jsonschema.Draft202012Validator(committed()).iter_errors(pipeline_with(stage_type, dumped)))
    assert errors == [], [error.message for error in errors]


def test_shipped_pipeline_is_valid_under_the_full_schema():
    raw = yaml.safe_load((REPO / "sample_data" / "pipeline.yaml").read_text())
    assert list(jsonschema.Draft202012Validator(committed()).iter_errors(raw)) == []


def test_schema_and_model_refuse_the_same_config_and_the_model_words_the_error(tmp_path):
    bad = pipeline_with("dedup", {"threshold": 1.5})
    schema_errors = list(jsonschema.Draft202012Validator(committed()).iter_errors(bad))
    assert [list(error.absolute_path) for error in schema_errors] == [["stages", 0, "config", "threshold"]]
    with pytest.raises(ConfigError, match=r"stages\.0 \(dedup\): config\.threshold: Input should be less than or equal to 1"):
        load_pipeline(bad, base_dir=tmp_path)


def write_inputs(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "qa.jsonl"
    rows = [{"instruction": "What is 2+2?", "output": "It is 4."}, {"instruction": "What is 3+3?", "output": "It is 6."}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def stage_config(run_dir: Path, stage_type: str) -> dict:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return next(stage["config"] for stage in manifest["pipeline"]["config"]["stages"] if stage["type"] == stage_type)


def test_set_reaches_any_dedup_field_and_wins_over_flags(tmp_path):
    data = write_inputs(tmp_path / "in")
    argv = ["dedup", str(data), "--out", str(tmp_path / "out"), "--threshold", "0.5", "--quiet",
            "--set", "threshold=0.9", "--set", "exact=false", "--set", "false_negative_weight=0.6"]  # fmt: skip
    assert main(argv) == 0
    config = stage_config(tmp_path / "out", "dedup")
    assert (config["threshold"], config["exact"], config["false_negative_weight"]) == (0.9, False, 0.6)


def test_set_of_a_filter_section_field(tmp_path):
    data = write_inputs(tmp_path / "in")
    argv = ["filter", str(data), "--out", str(tmp_path / "out"), "--quiet", "--set", "filter.preset=short_answer"]
    assert main(argv) == 0
    assert stage_config(tmp_path / "out", "filter")["preset"] == "short_answer"


@pytest.mark.parametrize(
    "verb,item,message",
    [
        ("dedup", "nope=1", "config.nope: Extra inputs are not permitted"),
        ("dedup", "threshold", "--set 'threshold': expected KEY=VALUE"),
        ("dedup", "threshold=[1,", "--set threshold: cannot parse the value"),
        ("split", "train=2", "config.train"),
        ("filter", "preset=code", "expected SECTION.FIELD=VALUE"),
    ],
)
def test_bad_set_item_is_a_one_line_error(tmp_path, capsys, verb, item, message):
    data = write_inputs(tmp_path / "in")
    assert main([verb, str(data), "--out", str(tmp_path / "out"), "--quiet", "--set", item]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("verb", ["dedup", "split"])
def test_flags_take_fields_choices_and_defaults_from_the_model(verb):
    import argparse
    import typing

    from curate.cli import build_parser
    from curate.commands import dedup, split

    module = {"dedup": dedup, "split": split}[verb]
    model = config_schema.builtin_stage_configs()[verb]
    assert set(module.FLAG_FIELDS) <= set(model.model_fields)  # every flag sets a declared field
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for action in subparsers.choices[verb]._actions:
        if action.dest not in module.FLAG_FIELDS or action.nargs == 0:
            continue
        field = model.model_fields[action.dest]
        literal = [a for a in (field.annotation, *typing.get_args(field.annotation)) if typing.get_origin(a) is typing.Literal]
        if literal:
            assert list(action.choices) == list(typing.get_args(literal[0])), action.dest
        if field.default is not None:
            assert action.help.endswith(f"(default {field.default})") and action.help.count("default") == 1, action.help


def test_a_stage_config_that_is_not_a_mapping_is_named_as_such(tmp_path):
    with pytest.raises(ConfigError, match=r"stages\.0\.config: 5 is not of type 'object'"):
        load_pipeline({"inputs": [{"path": "raw.jsonl"}], "stages": [{"type": "dedup", "config": 5}]}, base_dir=tmp_path)
