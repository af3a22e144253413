"""Annotator-facing settings without a server: guidelines from a Markdown file, the metadata pushed
(only the columns asked for), the A/B preference question, and `label users` argument errors."""

from __future__ import annotations

import polars as pl
import pytest

from curate.cli import main
from curate.errors import ConfigError
from curate.label.schema import (
    metadata_columns,
    question_specs,
    read_guidelines,
    record_payloads,
    with_record_keys,
)
from curate.label.users import NewUser
from curate.records import canonical_frame
from curate.runner import run_single_stage


def rows_with_extras() -> pl.DataFrame:
    """Canonical rows as ingest leaves them with extra input columns kept (`metadata` struct), plus scores."""
    frame = canonical_frame(
        [
            {"messages": [{"role": "user", "content": "Wie spät ist es?"}, {"role": "assistant", "content": "Drei Uhr."}]},
            {"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
        ]
    )
    return frame.with_columns(
        pl.Series("lang", ["de", "en"]),
        pl.Series("quality_score", [0.25, 0.75]),
        pl.Series("gopher_symbol_ratio", [0.0, 0.1]),
        pl.struct(pl.Series("topic", ["time", "geography"]), pl.Series("score", [3, 9])).alias("metadata"),
    )


def pushed_metadata(frame: pl.DataFrame, wanted):
    columns = metadata_columns(frame.schema, wanted)
    keyed = with_record_keys(frame)
    sft = record_payloads(keyed.filter(pl.col("kind") == "sft"), "sft", columns, {})
    pref = record_payloads(keyed.filter(pl.col("kind") == "preference"), "preference", columns, {})
    return [payload["metadata"] for payload in sft + pref]


def test_default_metadata_is_source_and_language_only():
    frame = rows_with_extras()
    file = frame["source"].struct.field("file").to_list()
    assert pushed_metadata(frame, None) == [
        {"source_file": file[0], "source_row": 1, "lang": "de"},
        {"source_file": file[1], "source_row": 2, "lang": "en"},
    ]
    # A frame without `lang` (no tag stage yet) still pushes: defaults that are absent are left out.
    assert list(metadata_columns(frame.drop("lang").schema, None)) == ["source_file", "source_row"]


def test_metadata_columns_asked_for_include_kept_input_fields():
    frame = rows_with_extras()
    assert pushed_metadata(frame, ["quality_score", "topic", "score", "kind"]) == [
        {"quality_score": 0.25, "topic": "time", "score": 3, "kind": "sft"},
        {"quality_score": 0.75, "topic": "geography", "score": 9, "kind": "preference"},
    ]
    assert {name: kind for name, (_, kind) in metadata_columns(frame.schema, ["score", "topic"]).items()} == {
        "score": "integer", "topic": "terms"
    }


@pytest.mark.parametrize(
    "wanted,message",
    [(["no_such_column"], "metadata column 'no_such_column' is not in the input"), (["messages"], "not a number, flag or text")],
)
def test_metadata_column_that_cannot_be_pushed_is_a_config_error(wanted, message):
    with pytest.raises(ConfigError, match=message):
        metadata_columns(rows_with_extras().schema, wanted)


def test_preference_question_defaults_to_a_b_tie_label_with_optional_rating():
    preference, quality, decision = question_specs("preference")
    assert (preference["name"], preference["type"], preference["title"]) == ("preference", "label", "Which answer is better?")
    # Stored values are what aggregation counts (response_a / response_b / tie); annotators read A / B / Tie.
    assert list(preference["labels"]) == ["response_a", "response_b", "tie"]
    assert [preference["labels"][key] for key in ("response_a", "response_b")] == ["A", "B"]
    assert preference.get("required", True) is True
    assert (quality["name"], quality["type"], quality["required"]) == ("quality", "rating", False)
    assert (decision["name"], decision["required"]) == ("decision", False)
    ranking = question_specs("preference", "ranking")[0]
    assert (ranking["type"], list(ranking["values"])) == ("ranking", ["response_a", "response_b"])
    assert [spec["name"] for spec in question_specs("sft")] == ["quality", "decision", "corrected_response"]


def test_guidelines_come_from_the_markdown_file(tmp_path):
    text = "# How to label\n\n- Prefer the answer that **solves** the problem.\n- Tie when both are wrong.\n"
    (tmp_path / "guide.md").write_text(text, encoding="utf-8")
    assert read_guidelines(tmp_path / "guide.md") == text


@pytest.mark.parametrize("content", [None, b"", b"\xff\xfe not utf-8 \x80"], ids=["missing", "empty", "binary"])
def test_bad_guidelines_file_is_a_one_line_error_before_any_server(tmp_path, monkeypatch, capsys, content):
    monkeypatch.delenv("ARGILLA_API_URL", raising=False)
    data = tmp_path / "rows.parquet"
    rows_with_extras().write_parquet(data)
    guide = tmp_path / "guide.md"
    if content is not None:
        guide.write_bytes(content)
    assert main(["label", "push", str(data), "--dataset", "support", "--guidelines", str(guide)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(guide) in err and "guidelines file" in err and len(err.splitlines()) == 1 and "Traceback" not in err
    # The stage checks the file even where no server is configured (it would otherwise skip silently).
    with pytest.raises(ConfigError, match="guidelines file"):
        run_single_stage("label_push", {"dataset": "support", "guidelines": str(guide)}, [data], tmp_path / "run")


def test_stage_config_takes_guidelines_and_metadata_columns(tmp_path, monkeypatch):
    monkeypatch.delenv("ARGILLA_API_URL", raising=False)
    data = tmp_path / "rows.parquet"
    rows_with_extras().write_parquet(data)
    (tmp_path / "guide.md").write_text("Pick the better answer.\n")
    config = {"dataset": "support", "guidelines": str(tmp_path / "guide.md"), "metadata_columns": ["lang", "topic"]}
    result = run_single_stage("label_push", config, [data], tmp_path / "run")
    assert result.manifest["stages"][-1]["report"]["skipped"] is True
    with pytest.raises(ConfigError, match="preference_question"):
        run_single_stage("label_push", {"dataset": "x", "preference_question": "stars"}, [data], tmp_path / "bad")


def test_users_add_refuses_a_bad_name_or_role_before_the_server(monkeypatch, capsys):
    monkeypatch.delenv("ARGILLA_API_URL", raising=False)
    assert main(["label", "users", "add", "../etc"]) == 2
    err = capsys.readouterr().err.strip()
    assert "user name '../etc'" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["label", "users", "add", "ann", "--role", "owner"])  # owners are made by `label serve` only
    assert main(["label", "users", "add", "ann"]) == 2
    assert "ARGILLA_API_URL" in capsys.readouterr().err


def test_new_user_repr_hides_the_credentials():
    user = NewUser(username="ann", role="annotator", workspace="curate", password="pw-123456789", api_key="key-abcdef")
    assert "pw-123456789" not in repr(user) and "key-abcdef" not in repr(user) and "ann" in repr(user)
