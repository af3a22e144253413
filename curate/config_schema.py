"""The pipeline's JSON Schema, its stage-config part generated from the stage config models.

A stage config field is declared once, on its pydantic model. `schemas/pipeline.schema.json` carries
those models' JSON Schemas under `$defs` (and the `ingest:` block, the ingest stage's config) and ties each built-in stage `type` to its definition (an
`if type == X then config: $defs/XConfig` per type), so editors and readers see every field, its
bounds and its default. That part is generated, never edited by hand:

    python -m curate.config_schema --write      # after changing a stage config model
    python -m curate.config_schema --check      # exit 1 when the file and the models disagree

tests/test_config_schema.py regenerates it and demands equality. At run time stage configs are
validated by the models alone (the runner leaves `stages.N.config` to them), so a config gets the
same one-line message whether it comes from a pipeline, `--config` or `--set`.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from curate.stage import registered_stages
from schemas.loader import SCHEMA_DIR, SCHEMA_FILES

PIPELINE_SCHEMA_PATH = SCHEMA_DIR / SCHEMA_FILES["pipeline"]


def builtin_stage_configs() -> dict[str, type[BaseModel]]:
    """Stage type → config model, for the stages shipped in curate (plugins bring their own)."""
    return {
        name: spec.config_model
        for name, spec in registered_stages().items()
        if spec.config_model.__module__.startswith("curate.") and spec.kind != "source"
    }


def pipeline_schema(hand_written: dict) -> dict:
    """`hand_written` (the pipeline schema's own part) with the generated stage-config part put in."""
    models = builtin_stage_configs()
    refs, definitions = models_json_schema(
        [(model, "validation") for model in models.values()], ref_template="#/$defs/{model}"
    )
    schema = copy.deepcopy(hand_written)
    # The source stage (ingest) is configured by the top-level `ingest:` block, not in `stages:`.
    for name, spec in registered_stages().items():
        if spec.kind == "source":
            schema["properties"][name] = spec.config_model.model_json_schema()
    schema["$defs"] = dict(sorted(definitions.get("$defs", {}).items()))
    items = schema["properties"]["stages"]["items"]
    items["allOf"] = [
        {
            "if": {"properties": {"type": {"const": name}}, "required": ["type"]},
            "then": {"properties": {"config": refs[(model, "validation")]}},
        }
        for name, model in sorted(models.items())
    ]
    return schema


def render(schema: dict) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m curate.config_schema", description=__doc__.split("\n\n")[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--write", action="store_true", help=f"regenerate {PIPELINE_SCHEMA_PATH.name}")
    action.add_argument("--check", action="store_true", help="exit 1 when the file and the models disagree")
    args = parser.parse_args(argv)
    current = PIPELINE_SCHEMA_PATH.read_text(encoding="utf-8")
    expected = render(pipeline_schema(json.loads(current)))
    if args.check:
        if current != expected:
            print(f"{PIPELINE_SCHEMA_PATH}: out of date with the stage config models; run python -m curate.config_schema --write", file=sys.stderr)
            return 1
        return 0
    if current != expected:
        from curate.atomic import write_text

        write_text(PIPELINE_SCHEMA_PATH, expected)
    return 0


if __name__ == "__main__":
    sys.exit(main())
