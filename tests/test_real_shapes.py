"""Real-world record shapes, each a small hand-written fixture in tests/fixtures/real_shapes, ingested
through the CLI with the config docs/formats.md gives for it; exact canonical output, rows reconcile."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
import yaml

from curate.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "real_shapes"


def plain(value):
    """Canonical values as plain Python: message fields a turn does not use (null) left out."""
    if isinstance(value, list):
        return [plain(item) for item in value]
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items() if item is not None or key in ("role", "content")}
    return value


def ingest_cli(tmp_path: Path, fixture: str, *flags: str) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    shutil.copy(FIXTURES / fixture, tmp_path / fixture)
    out = tmp_path / "run"
    assert main(["ingest", str(tmp_path / fixture), *flags, "--out", str(out)]) == 0
    return _outputs(out)


def run_cli(tmp_path: Path, fixture: str, pipeline: dict) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    shutil.copy(FIXTURES / fixture, tmp_path / fixture)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"name": "shape", "run_dir": "run", **pipeline}))
    assert main(["run", str(path)]) == 0
    return _outputs(tmp_path / "run")


def _outputs(out: Path) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    manifest = json.loads((out / "manifest.json").read_text())
    records = pl.read_parquet(out / "ingest" / "data.parquet")
    quarantine = pl.read_parquet(out / "quarantine.parquet")
    return records, quarantine, manifest


def lines_in(fixture: str) -> int:
    return sum(1 for line in (FIXTURES / fixture).read_text().splitlines() if line.strip())


# ----------------------------------------------------------------------------------- tool calling


def test_openai_tool_calls_with_null_content_parts_and_developer_role(tmp_path):
    records, quarantine, manifest = ingest_cli(tmp_path, "openai_tools.jsonl", "--format", "openai")
    assert records.height + quarantine.height == lines_in("openai_tools.jsonl") == manifest["accounting"]["rows_in"]
    assert plain(records["messages"].to_list()) == [
        [
            {"role": "system", "content": "You are a weather assistant."},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
            ]},
            {"role": "tool", "content": '{"temp_c": 18}', "tool_call_id": "call_1"},
            {"role": "assistant", "content": "It is 18 °C in Paris."},
        ],
        [
            {"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c2", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
            ]},
            {"role": "tool", "content": "5", "tool_call_id": "c2"},
            {"role": "assistant", "content": "2+3 = 5."},
        ],
    ]
    # A tool result nobody asked for, and a call whose result is missing, are broken conversations.
    assert quarantine.select("row", "reason").rows() == [(3, "broken_turn_order"), (4, "broken_turn_order")]
    # Tool calls are part of the record's identity: the two kept rows have distinct ids.
    assert records["id"].n_unique() == 2


def test_sharegpt_function_call_and_observation(tmp_path):
    records, quarantine, _ = ingest_cli(tmp_path, "sharegpt_tools.jsonl")
    assert quarantine.height == 0
    assert plain(records["messages"].to_list()) == [
        [
            {"role": "system", "content": "You can call tools."},
            {"role": "user", "content": "Convert 10 USD to EUR"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "convert", "arguments": '{"amount":10,"to":"EUR"}'}}
            ]},
            {"role": "tool", "content": '{"result": 9.2}'},
            {"role": "assistant", "content": "10 USD is about 9.20 EUR."},
        ]
    ]


# ----------------------------------------------------------------------------------- preference


def test_implicit_prompt_pairs_take_the_shared_prefix_as_prompt(tmp_path):
    records, quarantine, manifest = ingest_cli(tmp_path, "implicit_prompt.jsonl")
    assert records.height + quarantine.height == lines_in("implicit_prompt.jsonl") == manifest["accounting"]["rows_in"]
    assert records["kind"].to_list() == ["preference", "preference"]
    assert plain(records.select("prompt", "chosen", "rejected").to_dicts()) == [
        {
            "prompt": [{"role": "user", "content": "What color is the sky?"}],
            "chosen": [{"role": "assistant", "content": "It is blue."}],
            "rejected": [{"role": "assistant", "content": "It is green."}],
        },
        {
            "prompt": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Capital of France?"},
            ],
            "chosen": [{"role": "assistant", "content": "Paris."}],
            "rejected": [{"role": "assistant", "content": "I think it might be Lyon, but I am not sure."}],
        },
    ]
    # Pairs that share no prompt are not pairs: quarantined, never guessed.
    assert quarantine.select("row", "reason", "field").rows() == [(3, "no_shared_prompt", "chosen/rejected")]


def test_ultrafeedback_binarized(tmp_path):
    records, quarantine, _ = ingest_cli(tmp_path, "ultrafeedback_binarized.jsonl")
    assert quarantine.height == 0
    assert plain(records.select("prompt", "chosen", "rejected").to_dicts()) == [
        {
            "prompt": [{"role": "user", "content": "how can i develop a habit of drawing daily"}],
            "chosen": [{"role": "assistant", "content": "Start small: set a timer for 10 minutes each day and keep a sketchbook by your bed."}],
            "rejected": [{"role": "assistant", "content": "Just draw."}],
        },
        {
            "prompt": [{"role": "user", "content": "Name two prime numbers."}],
            "chosen": [{"role": "assistant", "content": "2 and 3."}],
            "rejected": [{"role": "assistant", "content": "4 and 9."}],
        },
    ]


# ----------------------------------------------------------------------------------- extra columns


EXTRA_METADATA = [
    {"annotator": {"id": "a17", "shift": "night"}, "lang": "en", "score": 4.5, "tags": ["network", "howto"]},
    {"annotator": {"id": "b02", "shift": "day"}, "lang": "de", "score": 3.0, "tags": []},
    {"annotator": {"id": "c33", "shift": "day"}, "lang": "en", "score": 2.0, "tags": ["dup"]},
    {"annotator": None, "lang": "en", "score": None, "tags": None},
]


def test_unconsumed_fields_are_kept_typed_in_metadata(tmp_path):
    records, quarantine, _ = ingest_cli(tmp_path, "openai_with_extras.jsonl")
    assert quarantine.height == 0
    assert records.schema["metadata"] == pl.Struct(
        {"annotator": pl.Struct({"id": pl.String, "shift": pl.String}), "lang": pl.String,
         "score": pl.Float64, "tags": pl.List(pl.String)}
    )  # fmt: skip
    assert records["metadata"].to_list() == EXTRA_METADATA


def test_keep_columns_selects_the_metadata(tmp_path):
    records, _, _ = ingest_cli(tmp_path, "openai_with_extras.jsonl", "--keep-columns", "score,lang")
    assert records["metadata"].to_list() == [{"lang": m["lang"], "score": m["score"]} for m in EXTRA_METADATA]
    records, _, _ = ingest_cli(tmp_path, "openai_with_extras.jsonl", "--keep-columns", "")
    assert "metadata" not in records.columns


def test_metadata_flows_through_every_stage_into_the_split_files(tmp_path):
    pipeline = {
        "inputs": [{"path": "openai_with_extras.jsonl"}],
        "stages": [
            {"type": "dedup"},
            {"type": "pii"},
            {"type": "tag"},
            {"type": "split", "config": {"train": 0.5, "validation": 0.5, "test": 0.0, "extra_columns": ["metadata"]}},
        ],
    }
    _, _, manifest = run_cli(tmp_path, "openai_with_extras.jsonl", pipeline)
    assert manifest["accounting"]["reconciled"] and manifest["accounting"]["rows_in"] == 4
    run = tmp_path / "run"
    # The exact duplicate (row 3) is dropped by dedup, and its metadata stays with it in dropped.parquet.
    dropped = pl.read_parquet(run / "dedup" / "dropped.parquet")
    assert dropped["metadata"].to_list() == [EXTRA_METADATA[2]]
    for stage in ("dedup", "pii", "tag", "split"):
        kept = pl.read_parquet(run / stage / "data.parquet").sort(pl.col("source").struct.field("row"))
        assert kept["metadata"].to_list() == [EXTRA_METADATA[0], EXTRA_METADATA[1], EXTRA_METADATA[3]], stage
    exported = pl.concat([pl.read_parquet(p) for p in sorted((run / "sft").glob("*.parquet"))])
    assert sorted(exported["metadata"].to_list(), key=str) == sorted(
        [EXTRA_METADATA[0], EXTRA_METADATA[1], EXTRA_METADATA[3]], key=str
    )
    card = (run / "sft" / "README.md").read_text()
    assert "`metadata` (annotator, lang, score, tags)" in card


# ----------------------------------------------------------------------------------- mapping language

EVAL_SYSTEM = {"role": "system", "content": "Translate to French."}


def test_eval_registry_input_plus_ideal_explodes_answers_via_cli_flags(tmp_path):
    records, quarantine, manifest = ingest_cli(
        tmp_path, "eval_registry.jsonl", "--map", "messages=input", "--map", "append=[{field: ideal}]", "--map", "answers=explode"
    )
    assert plain(records["messages"].to_list()) == [
        [{"role": "system", "content": "Answer with a single number."}, {"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}],
        *[
            [EVAL_SYSTEM, {"role": "user", "content": "cat"}, {"role": "assistant", "content": "chat"},
             {"role": "user", "content": "dog"}, {"role": "assistant", "content": answer}]
            for answer in ("chien", "le chien")
        ],
        *[[{"role": "user", "content": "Name a primary color."}, {"role": "assistant", "content": c}] for c in ("red", "blue", "yellow")],
    ]  # fmt: skip
    assert records["source"].struct.field("row").to_list() == [1, 2, 2, 3, 3, 3]
    assert quarantine.select("row", "reason", "field").rows() == [(4, "missing_field", "ideal")]
    ingest_stage = manifest["stages"][0]
    assert ingest_stage["repairs"] == {"exploded_rows": 3, "few_shot_turns": 2}
    accounting = manifest["accounting"]
    assert (accounting["rows_in"], accounting["rows_added"], accounting["kept"], accounting["quarantined"]) == (4, 3, 6, 1)
    assert accounting["reconciled"]


def test_eval_registry_first_join_and_few_shot_as_system_context(tmp_path):
    records, _, _ = ingest_cli(tmp_path, "eval_registry.jsonl", "--map", "messages=input", "--map", "append=[{field: ideal}]")
    assert [m[-1]["content"] for m in records["messages"].to_list()] == ["42", "chien", "red"]  # answers: first
    records, _, manifest = ingest_cli(
        tmp_path, "eval_registry.jsonl", "--map", "messages=input", "--map", "append=[{field: ideal}]",
        "--map", "answers=join", "--map", "join_with=' / '", "--map", "few_shot=system",
    )  # fmt: skip
    assert plain(records["messages"].to_list()[1]) == [
        {"role": "system", "content": "Translate to French.\n\nExamples:\nUser: cat\nAssistant: chat"},
        {"role": "user", "content": "dog"},
        {"role": "assistant", "content": "chien / le chien"},
    ]
    assert manifest["stages"][0]["repairs"] == {"few_shot_to_system": 1, "joined_answers": 2}


CHITCHAT_MAPPING = {
    "records": "values",
    "key_field": "dialog_id",
    "messages": "turns",
    "role_field": "speaker",
    "content_field": "text",
    "first_speaker": "user",
}


def test_chitchat_object_keyed_by_id_with_turn_groups_and_repairs(tmp_path):
    pipeline = {"inputs": [{"path": "chitchat_by_id.json", "mapping": {**CHITCHAT_MAPPING, "merge_consecutive": True, "trim_trailing_user": True}}]}
    records, quarantine, manifest = run_cli(tmp_path, "chitchat_by_id.json", pipeline)
    assert plain(records["messages"].to_list()) == [
        [
            {"role": "user", "content": "hey! any plans for the weekend\ni'm bored lol"},
            {"role": "assistant", "content": "going hiking if it doesn't rain"},
            {"role": "user", "content": "nice, where"},
            {"role": "assistant", "content": "up near the lake, the trail by the old mill"},
        ],
        [
            {"role": "user", "content": "what did you have for dinner"},
            {"role": "assistant", "content": "pasta again haha\ni cook it every tuesday"},
        ],
    ]
    assert records["metadata"].to_list() == [{"dialog_id": "dlg-0001", "topic": "weekend"}, {"dialog_id": "dlg-0002", "topic": "food"}]
    # A lone opening line is not a conversation, repaired or not.
    assert quarantine.select("row", "reason").rows() == [(3, "broken_turn_order")]
    assert manifest["stages"][0]["repairs"] == {"merged_turns": 2, "trimmed_trailing_user": 1}
    assert manifest["accounting"]["rows_in"] == 3 and manifest["accounting"]["reconciled"]


def test_chitchat_without_repairs_is_quarantined_not_guessed(tmp_path):
    records, quarantine, _ = run_cli(tmp_path, "chitchat_by_id.json", {"inputs": [{"path": "chitchat_by_id.json", "mapping": CHITCHAT_MAPPING}]})
    assert records.height == 0
    assert quarantine["reason"].to_list() == ["broken_turn_order"] * 3


def test_a_bad_mapping_is_a_one_line_config_error(tmp_path, capsys):
    shutil.copy(FIXTURES / "eval_registry.jsonl", tmp_path / "eval_registry.jsonl")
    code = main(["ingest", str(tmp_path / "eval_registry.jsonl"), "--map", "messages=input[", "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mapping path 'input['" in err[0]


def test_doc_examples_csv_qa_forum_pairs_and_role_maps(tmp_path):
    for name in ("qa.csv", "forum_pairs.jsonl", "bot_logs.jsonl"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    pipeline = {
        "inputs": [
            {"path": "qa.csv", "mapping": {"system": "context", "prompt": "question", "response": "answer"}},
            {"path": "forum_pairs.jsonl", "mapping": {"prompt": "post.body", "chosen": "answers[0].text", "rejected": "answers[-1].text"}},
            {"path": "bot_logs.jsonl", "mapping": {"messages": "log", "role_field": "who", "content_field": "msg", "roles": {"customer": "user", "agent": "assistant"}}},
        ]
    }
    records, quarantine, manifest = run_cli(tmp_path, "qa.csv", pipeline)
    assert quarantine.height == 0 and manifest["accounting"]["rows_in"] == 4
    rows = plain(records.select("messages", "prompt", "chosen", "rejected", "metadata").to_dicts())
    assert rows[0]["messages"] == [
        {"role": "system", "content": "You answer science questions briefly."},
        {"role": "user", "content": "What is the boiling point of water at sea level?"},
        {"role": "assistant", "content": "100 °C."},
    ]
    assert rows[1]["messages"] == [{"role": "user", "content": 'Who wrote "Hamlet"?'}, {"role": "assistant", "content": "William Shakespeare."}]
    assert (rows[2]["prompt"], rows[2]["chosen"], rows[2]["rejected"]) == (
        [{"role": "user", "content": "How do I undo my last commit but keep the changes?"}],
        [{"role": "assistant", "content": "git reset --soft HEAD~1 keeps your changes staged."}],
        [{"role": "assistant", "content": "Delete the repo and clone again."}],
    )
    assert rows[2]["metadata"] == {"forum": "vcs"}
    assert rows[3]["messages"] == [{"role": "user", "content": "My parcel is late."}, {"role": "assistant", "content": "Sorry! It ships tomorrow."}]


def test_canonical_parquet_from_before_tool_fields_is_read_as_the_same_records(tmp_path):
    # A stage output written by an earlier version: messages are {role, content} only.
    old = pl.DataFrame(
        {
            "id": ["0" * 32],
            "kind": ["sft"],
            "messages": [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]],
            "prompt": [None], "chosen": [None], "rejected": [None],
            "source": [{"file": "raw.jsonl", "row": 1, "format": "openai"}],
        },
        schema_overrides={name: pl.List(pl.Struct({"role": pl.String, "content": pl.String})) for name in ("messages", "prompt", "chosen", "rejected")},
    )  # fmt: skip
    old.write_parquet(tmp_path / "data.parquet")
    out = tmp_path / "run"
    assert main(["ingest", str(tmp_path / "data.parquet"), "--out", str(out)]) == 0
    records, quarantine, _ = _outputs(out)
    assert quarantine.height == 0
    assert plain(records["messages"].to_list()) == [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]]


def test_mapped_inputs_quarantine_bad_rows_with_their_raw_text(tmp_path):
    lines = [
        '{"input": [{"role": "user", "content": "ok?"}], "ideal": "ok"}',
        '{"input": [{"role": "user", "content": "broken"}], "ideal": ',
        '["not", "an", "object"]',
        '{"input": [{"role": "user", "content": "number answer"}], "ideal": 7}',
        '{"input": [{"role": "user", "content": "' + "x" * 600 + '"}], "ideal": "long"}',
    ]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    flags = ["--map", "messages=input", "--map", "append=[{field: ideal}]", "--max-row-bytes", "500"]
    assert main(["ingest", str(tmp_path / "bad.jsonl"), *flags, "--out", str(out)]) == 0
    records, quarantine, manifest = _outputs(out)
    assert records.height == 1
    assert quarantine.select("row", "reason", "field").rows() == [
        (2, "malformed_json", ""), (3, "wrong_type", ""), (4, "wrong_type", "ideal"), (5, "row_too_large", ""),
    ]  # fmt: skip
    assert quarantine["raw"].to_list()[:3] == lines[1:4]
    assert manifest["accounting"]["rows_in"] == 5 and manifest["accounting"]["reconciled"]
