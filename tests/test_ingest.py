"""Ingest through the CLI and the library: every container, every format, every malformation kind."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import polars as pl
import pytest
import zstandard

from curate.cli import main
from curate.ingest import read_canonical
from curate.records import canonical_frame


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [row if isinstance(row, (str, bytes)) else json.dumps(row) for row in rows]
    data = b"\n".join(line.encode() if isinstance(line, str) else line for line in lines) + b"\n"
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    elif path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    # `source.file` is relative to where the command runs, as for a user in their data folder.
    monkeypatch.chdir(tmp_path)


def ingest(tmp_path: Path, *args: str) -> tuple[int, pl.DataFrame, pl.DataFrame, dict]:
    out = tmp_path / "run"
    code = main(["ingest", *args, "--out", str(out)])
    if code != 0:
        return code, pl.DataFrame(), pl.DataFrame(), {}
    manifest = json.loads((out / "manifest.json").read_text())
    return code, pl.read_parquet(out / "ingest" / "data.parquet"), pl.read_parquet(out / "quarantine.parquet"), manifest


def without_unset_fields(value):
    """Messages as plain dicts: the tool fields a turn does not use (null) left out."""
    if isinstance(value, list):
        return [without_unset_fields(item) for item in value]
    if isinstance(value, dict):
        return {key: without_unset_fields(item) for key, item in value.items() if item is not None or key in ("role", "content")}
    return value


def messages_of(frame: pl.DataFrame) -> list:
    return without_unset_fields(frame["messages"].to_list())


# --------------------------------------------------------------------------------------------- formats


def test_alpaca_jsonl_maps_instruction_input_output(tmp_path):
    path = write_jsonl(
        tmp_path / "alpaca.jsonl",
        [
            {"instruction": "Reset my password", "input": "", "output": "Open Settings > Security."},
            {"instruction": "Summarize the ticket", "input": "Card declined twice", "output": "The card was declined."},
        ],
    )
    code, records, quarantine, manifest = ingest(tmp_path, str(path))
    assert code == 0 and quarantine.height == 0
    assert messages_of(records) == [
        [{"role": "user", "content": "Reset my password"}, {"role": "assistant", "content": "Open Settings > Security."}],
        [
            {"role": "user", "content": "Summarize the ticket\n\nCard declined twice"},
            {"role": "assistant", "content": "The card was declined."},
        ],
    ]
    assert records["source"].to_list()[1] == {"file": "alpaca.jsonl", "row": 2, "format": "alpaca"}
    assert manifest["inputs"][0]["format"] == "alpaca"


def test_sharegpt_json_array_with_system_and_role_aliases(tmp_path):
    path = tmp_path / "share.json"
    path.write_text(
        json.dumps(
            [
                {
                    "conversations": [
                        {"from": "system", "value": "You are a support agent."},
                        {"from": "human", "value": "Where is my order?"},
                        {"from": "gpt", "value": "It ships today."},
                        {"from": "user", "value": "Thanks!"},
                        {"from": "bot", "value": "You're welcome."},
                    ]
                }
            ]
        )
    )
    code, records, quarantine, _ = ingest(tmp_path, str(path))
    assert code == 0 and quarantine.height == 0
    assert [m["role"] for m in messages_of(records)[0]] == ["system", "user", "assistant", "user", "assistant"]


def test_openai_messages_gzip_and_normalization(tmp_path):
    decomposed = "Cafe\u0301"  # e + combining acute: NFC turns it into one code point
    path = write_jsonl(
        tmp_path / "chat.jsonl.gz",
        [{"messages": [{"role": "USER ", "content": f"  {decomposed}\u00a0 menu \r\n\r\n\r\n\r\nplease  "}, {"role": "assistant", "content": "Here\t it is."}]}],
    )
    code, records, quarantine, _ = ingest(tmp_path, str(path))
    assert code == 0 and quarantine.height == 0
    assert messages_of(records)[0] == [
        # NFC, CRLF, outer and trailing whitespace cleaned; the NBSP, blank lines and tab are content.
        {"role": "user", "content": "Caf\u00e9\u00a0 menu\n\n\n\nplease"},
        {"role": "assistant", "content": "Here\t it is."},
    ]


def test_csv_prompt_response_with_configured_columns(tmp_path):
    path = tmp_path / "tickets.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ticket_id", "customer_message", "agent_reply"])
        writer.writerow(["T-1", 'My "order", it is late', "Sorry, it ships\ntomorrow."])
        writer.writerow(["T-2", "Refund please", "Done."])
    code, records, quarantine, _ = ingest(
        tmp_path, str(path), "--format", "prompt_response", "--column", "prompt=customer_message", "--column", "response=agent_reply"
    )
    assert code == 0 and quarantine.height == 0
    assert messages_of(records)[0][0]["content"] == 'My "order", it is late'
    assert messages_of(records)[0][1]["content"] == "Sorry, it ships\ntomorrow."
    assert records["source"].struct.field("row").to_list() == [1, 2]


def test_preference_strings_and_messages_parquet(tmp_path):
    strings = write_jsonl(tmp_path / "pref.jsonl", [{"prompt": "Can I get a refund?", "chosen": "Yes, within 30 days.", "rejected": "No."}])
    pl.DataFrame(
        {
            "prompt": [[{"role": "user", "content": "Cancel my plan"}]],
            "chosen": [[{"role": "assistant", "content": "Done, it ends on the 30th."}]],
            "rejected": [[{"role": "assistant", "content": "Figure it out."}]],
        }
    ).write_parquet(tmp_path / "pref.parquet")
    code, records, quarantine, _ = ingest(tmp_path, str(strings), str(tmp_path / "pref.parquet"))
    assert code == 0 and quarantine.height == 0
    assert records["kind"].to_list() == ["preference", "preference"]
    assert without_unset_fields(records["prompt"].to_list())[0] == [{"role": "user", "content": "Can I get a refund?"}]
    assert without_unset_fields(records["rejected"].to_list())[1] == [{"role": "assistant", "content": "Figure it out."}]


def test_transcripts_zstd_single_and_hh_pairs(tmp_path):
    single = write_jsonl(
        tmp_path / "t.jsonl.zst",
        [{"text": "\n\nHuman: My app crashes\n\nAssistant: Which version?\n\nHuman: 2.3\n\nAssistant: Update to 2.4."}],
    )
    pairs = write_jsonl(
        tmp_path / "hh.jsonl",
        [
            {"chosen": "\n\nHuman: Late order\n\nAssistant: I am sorry, it arrives Friday.", "rejected": "\n\nHuman: Late order\n\nAssistant: Not my problem."},
            {"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": "\n\nHuman: different\n\nAssistant: C"},
        ],
    )
    code, records, quarantine, _ = ingest(tmp_path, str(single), str(pairs))
    assert code == 0
    sft = records.filter(pl.col("kind") == "sft")
    assert [m["role"] for m in messages_of(sft)[0]] == ["user", "assistant", "user", "assistant"]
    pref = records.filter(pl.col("kind") == "preference")
    assert without_unset_fields(pref["chosen"].to_list()) == [[{"role": "assistant", "content": "I am sorry, it arrives Friday."}]]
    assert quarantine["reason"].to_list() == ["transcript_prompt_mismatch"]


def test_datasets_save_to_disk_folder_and_globs(tmp_path):
    import datasets

    datasets.Dataset.from_list(
        [{"instruction": "Track parcel", "input": "", "output": "Use the tracking page."}]
    ).save_to_disk(str(tmp_path / "saved"))
    for index in range(3):
        write_jsonl(tmp_path / f"part-{index}.jsonl", [{"messages": [{"role": "user", "content": f"q{index}"}, {"role": "assistant", "content": "a"}]}])
    code, records, _, manifest = ingest(tmp_path, str(tmp_path / "saved"), str(tmp_path / "part-*.jsonl"))
    assert code == 0
    assert records.height == 4
    assert [entry["format"] for entry in manifest["inputs"]] == ["alpaca", "openai", "openai", "openai"]


def test_an_existing_path_with_glob_characters_is_that_file_not_a_pattern(tmp_path):
    def chat(text):
        return [{"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "a"}]}]

    write_jsonl(tmp_path / "chats[2].jsonl", chat("the bracketed file"))
    write_jsonl(tmp_path / "chats2.jsonl", chat("what the pattern chats[2] matches"))
    code, records, _, manifest = ingest(tmp_path, str(tmp_path / "chats[2].jsonl"))
    assert code == 0
    assert [m[0]["content"] for m in messages_of(records)] == ["the bracketed file"]
    assert [Path(entry["file"]).name for entry in manifest["inputs"]] == ["chats[2].jsonl"]
    code, records, _, _ = ingest(tmp_path, str(tmp_path / "chats?.jsonl"))  # no such file: a pattern
    assert code == 0 and [m[0]["content"] for m in messages_of(records)] == ["what the pattern chats[2] matches"]


def test_explicit_format_overrides_detection(tmp_path):
    # Has both `text` and `prompt`/`response`: detection picks prompt_response; --format says transcript.
    path = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "p", "response": "r", "text": "\n\nHuman: hi\n\nAssistant: hello"}])
    _, records, _, _ = ingest(tmp_path, str(path))
    assert messages_of(records)[0][0]["content"] == "p"
    _, records, _, _ = ingest(tmp_path, str(path), "--format", "transcript")
    assert messages_of(records)[0][0]["content"] == "hi"


# --------------------------------------------------------------------------------------------- quarantine


def test_every_malformation_kind_is_quarantined_with_reason_field_and_raw(tmp_path):
    good = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]}
    rows = [
        good,  # 1
        '{"messages": [{"role": "user", "content": "cut off',  # 2 malformed_json
        {"messages": "hello"},  # 3 wrong_type
        {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]},  # 4 wrong_type (scalar)
        {"other": 1},  # 5 missing_field
        {"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "x"}]},  # 6 empty_content
        {"messages": [{"role": "narrator", "content": "q"}, {"role": "assistant", "content": "x"}]},  # 7 unknown_role
        {"messages": [{"role": "assistant", "content": "q"}, {"role": "user", "content": "x"}]},  # 8 broken_turn_order
        b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "x"}]}',  # 9 invalid_utf8
        {"messages": [{"role": "user", "content": "x" * 5000}, {"role": "assistant", "content": "y"}]},  # 10 too large
        "",  # 11 blank line: not a row
        good,  # 12
    ]
    path = write_jsonl(tmp_path / "messy.jsonl", rows)
    code, records, quarantine, manifest = ingest(tmp_path, str(path), "--max-row-bytes", "4000")
    assert code == 0
    by_row = {row["row"]: row for row in quarantine.to_dicts()}
    assert {row: by_row[row]["reason"] for row in by_row} == {
        2: "malformed_json",
        3: "wrong_type",
        4: "wrong_type",
        5: "missing_field",
        6: "empty_content",
        7: "unknown_role",
        8: "broken_turn_order",
        9: "invalid_utf8",
        10: "row_too_large",
    }
    assert by_row[3]["field"] == "messages"
    assert by_row[5]["field"] == "messages"
    assert by_row[7]["field"] == "messages[0].role"
    assert by_row[2]["raw"].startswith('{"messages"')
    assert len(by_row[10]["raw"]) <= 2000  # raw text is truncated
    assert records["source"].struct.field("row").to_list() == [1, 12]
    # Nothing lost: 11 rows (the blank line is not a row) = 2 kept + 9 quarantined.
    files = manifest["inputs"][0]
    assert (files["rows"], files["kept"], files["quarantined"], files["blank_lines"]) == (11, 2, 9, 1)
    assert manifest["accounting"]["reconciled"] is True


def test_preference_rows_with_wrong_shapes(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "q", "chosen": "a", "rejected": "b"},
            {"prompt": "q", "chosen": ["not", "a", "string"], "rejected": "b"},
            {"prompt": "q", "chosen": "a", "rejected": ""},
        ],
    )
    _, records, quarantine, _ = ingest(tmp_path, str(path))
    assert records.height == 1
    assert quarantine.select("row", "reason", "field").rows() == [(2, "wrong_type", "chosen"), (3, "empty_content", "rejected[0].content")]


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "setup, expected",
    [
        (lambda d: None, "missing.jsonl: no such file or folder"),
        (lambda d: (d / "missing.jsonl").write_bytes(b"\x1f\x8b\x08garbage"), "cannot detect the record format"),
        (lambda d: (d / "missing.jsonl").write_text('{"foo": 1}\n'), "cannot detect the record format"),
    ],
)
def test_unreadable_input_is_one_line_error_and_nonzero_exit(tmp_path, capsys, setup, expected):
    setup(tmp_path)
    code = main(["ingest", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert code == 2
    assert expected in captured.err
    assert "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_corrupt_gzip_names_the_file(tmp_path, capsys):
    (tmp_path / "broken.jsonl.gz").write_bytes(b"\x1f\x8b\x08\x00not really gzip")
    code = main(["ingest", str(tmp_path / "broken.jsonl.gz"), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "broken.jsonl.gz" in err and "Traceback" not in err


def test_ids_are_content_hashes_shared_by_exact_duplicates(tmp_path):
    a = {"messages": [{"role": "user", "content": "Where is my order?"}, {"role": "assistant", "content": "On its way."}]}
    b = {"messages": [{"role": "human", "content": " Where is my order?\r\n"}, {"role": "gpt", "content": "On its way. "}]}
    path = write_jsonl(tmp_path / "d.jsonl", [a, b])
    _, records, _, _ = ingest(tmp_path, str(path))
    assert records["id"][0] == records["id"][1]
    assert records["id"][0] == canonical_frame([a])["id"][0]
    assert len(records["id"][0]) == 32


def test_read_canonical_library_entry_point(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "i", "output": "o"}, "{oops"])
    records, quarantine = read_canonical([path])
    assert records.height == 1 and quarantine["reason"].to_list() == ["malformed_json"]


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_extra_columns_of_tables_are_kept_in_metadata_like_json(tmp_path, suffix):
    """CSV and Parquet inputs keep unused columns (a raw `id`, a score) in `metadata`, as JSON inputs do;
    before, only the columns format detection sampled were looked at, and extras were lost."""
    table = pl.DataFrame({"id": ["q-1", "q-2"], "instruction": ["2+2?", "3+3?"], "output": ["4", "6"], "difficulty": ["easy", "hard"]})
    path = tmp_path / f"qa.{suffix}"
    table.write_csv(path) if suffix == "csv" else table.write_parquet(path)
    records, _ = read_canonical([path])
    assert records["metadata"].to_list() == [{"difficulty": "easy", "id": "q-1"}, {"difficulty": "hard", "id": "q-2"}]


def test_fast_normalization_equals_the_reference_expression():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from curate.records import normalize_messages, normalize_messages_series
    from schemas import MESSAGES_DTYPE

    pieces = st.sampled_from(list("ab Z.\n\r\t") + ["\u00a0", "\u200b", "e\u0301", "\u00e9", "  ", "\n\n\n", "\u3000"])
    text = st.lists(pieces, max_size=12).map("".join) | st.none()
    role = st.sampled_from(["user", " Human", "GPT", "bot", "narrator", "system"]) | st.none()
    message = st.fixed_dictionaries({"role": role, "content": text})
    column = st.lists(st.lists(message, max_size=4) | st.none(), min_size=1, max_size=6)

    @settings(max_examples=200, deadline=None)
    @given(column)
    def check(rows):
        series = pl.Series("messages", rows, dtype=MESSAGES_DTYPE)
        reference = pl.select(normalize_messages(pl.lit(series))).to_series()
        assert normalize_messages_series(series).to_list() == reference.to_list()

    check()


def test_message_lists_concatenate_as_polars_concat_list():
    """Ingest joins a format's message lists (system + turns) with records.concat_lists, built from
    offsets because Polars' concat_list goes row by row on structs: it must give concat_list's result,
    nulls, empty lists, tool calls and sliced/multi-chunk columns included."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from curate.records import concat_lists
    from schemas import MESSAGES_DTYPE

    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    message = st.fixed_dictionaries({
        "role": st.sampled_from(["user", "assistant", "tool"]) | st.none(),
        "content": st.sampled_from(["", "a", "b c", "\u00e9"]) | st.none(),
        "tool_calls": st.none() | st.just([call]),
    }) | st.none()  # fmt: skip
    column = st.lists(st.lists(message, max_size=4) | st.none(), min_size=1, max_size=8)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(column, min_size=1, max_size=4), st.integers(0, 3), st.booleans())
    def check(columns, offset, chunked):
        rows = min(len(values) for values in columns)
        frame = pl.DataFrame({f"p{i}": values[:rows] for i, values in enumerate(columns)}, schema={f"p{i}": MESSAGES_DTYPE for i in range(len(columns))})
        frame = frame.slice(min(offset, rows - 1))
        if chunked:
            frame = pl.concat([frame, frame.tail(2)], rechunk=False)
        reference = frame.select(pl.concat_list(frame.columns).alias("p0")).to_series()
        joined = concat_lists([frame[name] for name in frame.columns])
        assert joined.dtype == reference.dtype
        assert joined.to_list() == reference.to_list()

    check()


TURN_KINDS = ("user", "assistant", "system", "tool", "call")


def _turn(kind: str) -> dict:
    if kind == "call":
        return {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]}
    if kind == "tool":
        return {"role": "tool", "content": "42", "tool_call_id": "c1"}
    return {"role": kind, "content": f"a {kind} turn"}


def _order_ok(kinds: list[str], expect: str) -> bool:
    """The turn-order rules, one message at a time (the reference the vectorized check must equal)."""
    for index, kind in enumerate(kinds):
        if kind == "tool" and (index == 0 or kinds[index - 1] not in ("call", "tool")):
            return False  # a result without a call before it
        if kind == "call" and (index + 1 == len(kinds) or kinds[index + 1] != "tool"):
            return False  # a call nobody answered
    if expect == "reply":
        return kinds[-1] == "assistant" and all(kind in ("call", "tool") for kind in kinds[:-1])
    if kinds.count("system") > 1 or ("system" in kinds and kinds[0] != "system"):
        return False
    turns = [kind for kind in kinds if kind in ("user", "assistant")]
    if any(turn != ("user", "assistant")[position % 2] for position, turn in enumerate(turns)):
        return False
    if expect == "conversation":
        return len(turns) >= 2 and len(turns) % 2 == 0 and kinds[-1] == "assistant"
    return len(turns) % 2 == 1 and kinds[-1] not in ("call", "assistant")


def _turn_sequences(seed: int = 11) -> list[list[str]]:
    """Every sequence of up to 4 turn kinds, and longer ones built to be valid, half of them then broken
    by one insertion, deletion or substitution (random sequences that long are almost never valid)."""
    import itertools
    import random

    rng = random.Random(seed)
    sequences = [list(kinds) for length in range(1, 5) for kinds in itertools.product(TURN_KINDS, repeat=length)]
    for _ in range(600):
        blocks = lambda: [kind for _ in range(rng.choice([0, 0, 1, 2])) for kind in ["call", *["tool"] * rng.randint(1, 2)]]  # noqa: E731
        shape = rng.choice(["conversation", "prompt", "reply"])
        kinds = ["system"] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 4)):
            kinds += [*blocks(), "user", *blocks(), "assistant"]
        if shape == "prompt":
            kinds = kinds[:-1] + blocks()
        elif shape == "reply":
            kinds = [*blocks(), "assistant"]
        if rng.random() < 0.5:
            where = rng.randrange(len(kinds))
            change = rng.choice(["insert", "delete", "replace"])
            if change == "insert":
                kinds.insert(where, rng.choice(TURN_KINDS))
            elif change == "delete" and len(kinds) > 1:
                del kinds[where]
            else:
                kinds[where] = rng.choice(TURN_KINDS)
        sequences.append(kinds)
    return sequences


def test_turn_order_checks_follow_the_rules_message_by_message(tmp_path):
    """Conversations, prompts and replies with tool calls, tool results and system turns anywhere:
    exactly the rows the rules reject (checked one message at a time here) are quarantined as
    broken_turn_order, and every other row is kept."""
    sequences = _turn_sequences()
    rows, broken_expected = [], set()
    for kinds in sequences:
        rows.append({"messages": [_turn(kind) for kind in kinds]})
        broken_expected |= set() if _order_ok(kinds, "conversation") else {len(rows)}
    for kinds in sequences:
        rows.append({"prompt": [_turn(kind) for kind in kinds], "chosen": [_turn("assistant")], "rejected": [_turn("assistant")]})
        broken_expected |= set() if _order_ok(kinds, "prompt") else {len(rows)}
        rows.append({"prompt": [_turn("user")], "chosen": [_turn(kind) for kind in kinds], "rejected": [_turn("assistant")]})
        broken_expected |= set() if _order_ok(kinds, "reply") else {len(rows)}
    chats = write_jsonl(tmp_path / "chats.jsonl", rows[: len(sequences)])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows[len(sequences) :])
    records, quarantine = read_canonical([chats, pairs])
    assert records.height + quarantine.height == len(rows)
    assert set(quarantine["reason"]) == {"broken_turn_order"}
    row_numbers = quarantine.select(pl.when(pl.col("file") == "pairs.jsonl").then(pl.col("row") + len(sequences)).otherwise(pl.col("row")))
    assert set(row_numbers.to_series()) == broken_expected
    for expect in ("conversation", "prompt", "reply"):  # valid rows of every kind, not only broken ones
        assert sum(_order_ok(kinds, expect) for kinds in sequences) >= 100


def test_code_indentation_tabs_and_blank_lines_survive_ingest(tmp_path):
    """Normalization may not change meaning: indentation, tabs, runs of spaces and blank lines inside an
    answer are kept; only trailing whitespace, CRLF and a BOM/zero-width space are cleaned."""
    import polars as pl

    from curate.cli import main

    answer = "def f(x):\r\n    if x:   \r\n\treturn  x\r\n\r\n\r\n\r\n| a  | b |\u200b\r\n  "
    row = {"instruction": "  Write f.\n", "output": answer}
    (tmp_path / "code.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    assert main(["ingest", str(tmp_path / "code.jsonl"), "--out", str(tmp_path / "run"), "--format", "alpaca"]) == 0
    messages = pl.read_parquet(tmp_path / "run" / "ingest" / "data.parquet")["messages"][0]
    assert [m["content"] for m in messages] == ["Write f.", "def f(x):\n    if x:\n\treturn  x\n\n\n\n| a  | b |"]
