"""Property-based safety suite (issue 11): hostile bytes, truncated containers, random record shapes and
random config values, all through the `curate` CLI in-process (`curate.cli.main`).

Every run must end in one of two ways:
  * exit 0, with every input row accounted for: the row numbers in `ingest/data.parquet` (source.row) and
    `quarantine.parquet` (row) are exactly the input's rows, each once, counted here from the input bytes
    and the output Parquet files, never from the manifest;
  * exit 2, with ONE line on stderr (`error: ...`) naming the file at fault.
An exception escaping `main()` is the traceback a user would see: always a failure. Around every run the
whole temporary folder is snapshotted (path -> sha256, mode); only paths under the run directory may change.

CI runs a small, derandomized number of examples per property (the same examples on every run). For a
longer, randomized local hunt:

    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/test_safety_properties.py -q

(`long` multiplies the examples by 25, draws fresh ones each run and shrinks failures to a minimal example.)
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import json
import math
import os
import re
import stat
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
import yaml
import zstandard
from hypothesis import HealthCheck, Phase, example, given, note, settings
from hypothesis import strategies as st

from curate.cli import main

LONG_RUN = os.environ.get("HYPOTHESIS_PROFILE", "ci") == "long"
QUARANTINE_RAW_CHARS = 2_000  # IngestOptions.quarantine_raw_chars default: quarantine keeps this much


def bounded(examples: int):
    """Settings for one property: few deterministic examples in CI, and no shrinking there (a failing
    example is reported as found, so a regression cannot blow the CI time); many random, shrunk ones with `long`."""
    return settings(
        max_examples=examples * 25 if LONG_RUN else examples,
        derandomize=not LONG_RUN,
        phases=list(Phase) if LONG_RUN else [Phase.explicit, Phase.reuse, Phase.generate],
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        print_blob=LONG_RUN,
    )


# --------------------------------------------------------------------------------------------- running


@dataclass
class Outcome:
    code: int | None
    stdout: str
    stderr: str
    escaped: str | None  # the exception that escaped main(), formatted as a user would see it


def run_curate(argv: list[str], cwd: Path) -> Outcome:
    """`curate ARGV` in-process from `cwd`; whatever escapes `main()` is recorded, never raised."""
    out, err = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code, escaped = main(argv), None
    except KeyboardInterrupt:
        raise
    except BaseException as error:  # Polars panics are BaseException (pyo3 PanicException)
        code = getattr(error, "code", None) if isinstance(error, SystemExit) else None
        escaped = "".join(traceback.format_exception(error)[-3:])
    finally:
        os.chdir(previous)
    return Outcome(code=code, stdout=out.getvalue(), stderr=err.getvalue(), escaped=escaped)


def assert_exit_0_or_one_line_error(outcome: Outcome, names: str | None) -> None:
    """Exit 0, or exit 2 with one `error:` line on stderr naming `names` (a file name) where given."""
    assert outcome.escaped is None, f"uncaught exception (a traceback for the user):\n{outcome.escaped}"
    assert outcome.code in (0, 2), f"exit {outcome.code}; stderr: {outcome.stderr!r}"
    if outcome.code == 2:
        lines = outcome.stderr.strip().splitlines()
        assert len(lines) == 1, f"expected one error line, got {len(lines)}: {outcome.stderr!r}"
        assert lines[0].startswith("error:"), lines[0]
        if names is not None:
            assert names in lines[0], f"the error does not name {names!r}: {lines[0]!r}"


def assert_one_line_error(outcome: Outcome, names: str) -> None:
    assert_exit_0_or_one_line_error(outcome, names)
    assert outcome.code == 2, f"expected exit 2 naming {names!r}, got exit {outcome.code}"


# --------------------------------------------------------------------------------------------- snapshots


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every path under root (itself included) → (sha256 or kind, permission bits)."""
    found: dict[str, tuple[str, int]] = {}
    for path in [root, *root.rglob("*")]:
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            kind = "link:" + os.readlink(path)
        elif stat.S_ISDIR(info.st_mode):
            kind = "dir"
        else:
            kind = hashlib.sha256(path.read_bytes()).hexdigest()
        found[str(path.relative_to(root))] = (kind, stat.S_IMODE(info.st_mode))
    return found


def changed_outside(before: dict, after: dict, root: Path, run_dir: Path | None) -> list[str]:
    """Paths created, removed or modified outside `run_dir` (a path under root, or None: nothing may change)."""
    own = str(run_dir.relative_to(root)) if run_dir is not None else None

    def ours(relative: str) -> bool:
        return own is not None and (relative == own or relative.startswith(own + os.sep))

    def new_parent_folder(relative: str) -> bool:  # `runs/` created on the way to `runs/x`
        return own is not None and relative not in before and after.get(relative, ("",))[0] == "dir" and (own + os.sep).startswith(relative + os.sep)

    differing = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    return sorted(p for p in differing if not ours(p) and not new_parent_folder(p))


def run_and_check_foreign_files(argv: list[str], root: Path, cwd: Path, run_dir: Path | None) -> Outcome:
    """Run curate, then demand that nothing outside `run_dir` was created, deleted or modified."""
    before = snapshot(root)
    outcome = run_curate(argv, cwd)
    after = snapshot(root)
    outside = changed_outside(before, after, root, run_dir)
    removed = [p for p in outside if p not in after]
    modified = [p for p in outside if p in before and p in after]
    created = [p for p in outside if p not in before]
    assert not outside, (
        f"outside the run directory: removed {removed[:6]}, modified {modified[:6]}, created {created[:6]} "
        f"(exit {outcome.code}, stderr {outcome.stderr.strip()!r})"
    )
    return outcome


# --------------------------------------------------------------------------------------------- oracles
# What the inputs hold, computed here from the bytes we wrote (never from the tool's manifest).

# Unicode White_Space: a line holding only these is a blank line, not a row.
WHITE_SPACE = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]*")
BOM = b"\xef\xbb\xbf"


class ContainerBroken(Exception):
    """The container itself is damaged (truncated/corrupt compression, not an array): the file must fail."""


def strict_decompress(name: str, data: bytes) -> bytes:
    """The payload of a .gz/.zst file, refusing truncated or corrupt streams; other files as they are."""
    if name.endswith(".gz"):
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, gzip.BadGzipFile, ValueError) as error:
            raise ContainerBroken(str(error)) from None
    if name.endswith(".zst"):
        payload = []
        while data:  # frame by frame: every frame must be complete
            reader = zstandard.ZstdDecompressor().decompressobj()
            try:
                payload.append(reader.decompress(data))
            except zstandard.ZstdError as error:
                raise ContainerBroken(str(error)) from None
            if not reader.eof:
                raise ContainerBroken("incomplete zstd frame")
            data = reader.unused_data
        return b"".join(payload)
    return data


def jsonl_rows(payload: bytes) -> dict[int, bytes]:
    """Line number → raw line bytes, for the non-blank lines of a JSONL payload (a leading BOM is not content)."""
    if payload.startswith(BOM):
        payload = payload[len(BOM) :]
    lines = payload.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline ends the last line; it does not start another
    rows = {}
    for number, line in enumerate(lines, start=1):
        if not WHITE_SPACE.fullmatch(line.decode("utf-8", errors="replace")):
            rows[number] = line
    return rows


def json_file_rows(payload: bytes) -> dict[int, bytes] | None:
    """Rows of a .json payload: an array's elements, else (not starting with `[`) its JSONL lines."""
    body = payload[len(BOM) :] if payload.startswith(BOM) else payload
    if not body.lstrip().startswith(b"["):
        return jsonl_rows(payload)
    try:
        items = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise ContainerBroken(f"not a JSON array: {error}") from None
    if not isinstance(items, list):
        raise ContainerBroken("not an array")
    return {number: b"" for number in range(1, len(items) + 1)}


def csv_rows(payload: bytes) -> dict[int, bytes]:
    """Data records of a CSV payload (header excluded, empty lines skipped), per Python's csv module.
    Bytes that are not UTF-8 are kept opaque: rows holding them may be quarantined, not lost."""
    text = payload.decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    records = [record for record in csv.reader(io.StringIO(text, newline="")) if record]
    return {number: b"" for number in range(1, len(records))}


def expected_rows(name: str, data: bytes) -> dict[int, bytes]:
    """The rows an input file holds, keyed by the row number the quarantine/source must carry."""
    payload = strict_decompress(name, data)
    stem = name.removesuffix(".gz").removesuffix(".zst")
    if stem.endswith(".jsonl"):
        return jsonl_rows(payload)
    if stem.endswith(".json"):
        return json_file_rows(payload)
    if stem.endswith(".csv"):
        try:
            return csv_rows(payload)
        except csv.Error as error:
            raise ContainerBroken(str(error)) from None
    if stem.endswith(".parquet"):
        try:
            height = pl.read_parquet(io.BytesIO(payload)).height
        except BaseException as error:  # noqa: BLE001 - any failure means "not a Parquet file" here
            if isinstance(error, KeyboardInterrupt):
                raise
            raise ContainerBroken(str(error)) from None
        return {number: b"" for number in range(1, height + 1)}
    raise AssertionError(name)


def read_outputs(run_dir: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    return pl.read_parquet(run_dir / "ingest" / "data.parquet"), pl.read_parquet(run_dir / "quarantine.parquet")


def assert_rows_accounted(run_dir: Path, expected: dict[int, bytes], display_suffix: str) -> None:
    """Each expected row is kept or quarantined exactly once; quarantine rows carry a reason and the raw line."""
    records, quarantine = read_outputs(run_dir)
    kept_rows = [source["row"] for source in records["source"].to_list()]
    quarantined_rows = quarantine["row"].to_list()
    seen = sorted(kept_rows + quarantined_rows)
    assert seen == sorted(expected), (
        f"rows in data.parquet ({len(kept_rows)}) + quarantine.parquet ({len(quarantined_rows)}) "
        f"!= input rows ({len(expected)}); missing {sorted(set(expected) - set(seen))[:10]}, "
        f"extra or repeated {sorted(r for r in set(seen) if seen.count(r) > 1 or r not in expected)[:10]}"
    )
    for entry in quarantine.iter_rows(named=True):
        assert entry["reason"], f"quarantine row {entry['row']} has no reason"
        assert entry["file"].endswith(display_suffix), entry["file"]
        line = expected[entry["row"]]
        if line:  # JSONL: the raw text is the line itself (valid UTF-8 lines are kept verbatim)
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                assert entry["raw"], f"quarantine row {entry['row']} lost its raw text"
            else:
                # Row 1 may keep the file's byte-order mark in front of its raw text: both are the line.
                assert entry["raw"] in (text[:QUARANTINE_RAW_CHARS], ("\ufeff" + text)[:QUARANTINE_RAW_CHARS]), (
                    f"row {entry['row']}: quarantine raw {entry['raw'][:80]!r} is not the line {text[:80]!r}"
                )
        else:
            assert entry["raw"], f"quarantine row {entry['row']} lost its raw text"


# --------------------------------------------------------------------------------------------- writing


def compress(name: str, payload: bytes) -> bytes:
    if name.endswith(".gz"):
        return gzip.compress(payload, mtime=0)
    if name.endswith(".zst"):
        return zstandard.ZstdCompressor(level=3).compress(payload)
    return payload


SAMPLE_ROWS = [
    {"instruction": "How do I reset my password?", "input": "", "output": "Open Settings, choose Account, then Reset password."},
    {"instruction": "Where can I download last month's invoice?", "input": "account 1142", "output": "Billing, Invoices, then the download icon."},
    {"instruction": "Ändere meine Lieferadresse bitte.", "input": "", "output": "Gern: unter Konto → Adressen können Sie sie ändern."},
    {"instruction": "Can I pause my subscription for two months?", "input": "", "output": "Yes, Plans lets you pause it for up to three months."},
    {"instruction": "My order arrived damaged — what now? 📦", "input": "order 88", "output": "Sorry! Reply with a photo and we send a replacement."},
    {"instruction": "How do I add a second user to the team?", "input": "", "output": "Team settings, Invite, and enter their email address."},
    {"instruction": "Why was my card declined?", "input": "", "output": "Usually the bank blocked it; please call them or try another card."},
    {"instruction": "Is there a student discount?", "input": "", "output": "Yes, thirty percent off with a valid university email."},
]


def sample_container(name: str) -> bytes:
    """The hand-written sample in the container `name` names, complete and valid."""
    stem = name.removesuffix(".gz").removesuffix(".zst")
    if stem.endswith(".jsonl"):
        payload = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in SAMPLE_ROWS).encode()
    elif stem.endswith(".json"):
        payload = (json.dumps(SAMPLE_ROWS, ensure_ascii=False, indent=1) + "\n").encode()
    elif stem.endswith(".csv"):
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=["instruction", "input", "output"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(SAMPLE_ROWS)
        payload = text.getvalue().encode()
    else:
        buffer = io.BytesIO()
        pl.DataFrame(SAMPLE_ROWS).write_parquet(buffer)
        return buffer.getvalue()
    return compress(name, payload)


CONTAINERS = (".jsonl", ".json", ".csv", ".parquet", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst", ".csv.gz")
COMPRESSED = tuple(name for name in CONTAINERS if name.endswith((".gz", ".zst")))


# --------------------------------------------------------------------------------------------- 1. random bytes

# Valid rows, hostile fragments and raw noise spliced together: pure noise almost always stops at the first
# check, fragments reach the decoders.
FRAGMENTS = st.sampled_from(
    [b"\n", b"\r\n", b"\n\n", BOM, b"\x00", b"\xff\xfe", b"\xc3", b"[", b"]", b"{", b"}", b",", b'"', b"  ", b"\t",
     b'{"instruction": "a", "output": "b"}', b'{"messages": [{"role": "user", "content": "hi"}]}',
     b'{"instruction": 5, "output": null}', b'"text"', b"NaN", b"1e999", b"[" * 40, b"[" * 3000, b"instruction,output\n",
     b'"a,b"\n']
)  # fmt: skip
VALID_LINES = st.sampled_from(SAMPLE_ROWS).map(lambda row: json.dumps(row).encode() + b"\n")
PAYLOADS = st.lists(st.one_of(FRAGMENTS, VALID_LINES, st.binary(max_size=48)), max_size=14).map(b"".join)
FORMAT_FLAGS = st.sampled_from([[], [], ["--format", "alpaca"], ["--format", "openai"], ["--format", "preference"]])


@pytest.mark.parametrize("extension", CONTAINERS)
@bounded(8)
@given(
    payload=PAYLOADS,
    wrap=st.booleans(),
    format_flag=FORMAT_FLAGS,
)
# Hostile shapes every CI run tries, whatever the random draws: nesting deeper than Python's recursion
# limit, a byte-order mark before valid rows, an empty file.
@example(payload=b"[" * 5000 + b"]" * 5000, wrap=True, format_flag=[])
@example(payload=BOM + json.dumps(SAMPLE_ROWS).encode(), wrap=True, format_flag=[])
@example(payload=BOM + b"".join(json.dumps(row).encode() + b"\n" for row in SAMPLE_ROWS[:2]), wrap=True, format_flag=[])
@example(payload=b"", wrap=False, format_flag=[])
def test_random_bytes_in_every_container_are_read_whole_or_refused_in_one_line(extension, payload, wrap, format_flag):
    """Random bytes as an input file (for compressed containers: the payload inside a valid stream, or the
    raw bytes as a damaged stream): exit 0 with every row accounted for, or exit 2 naming the file."""
    name = "input" + extension
    data = compress(name, payload) if wrap and extension not in (".parquet",) else payload
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "notes.txt").write_text("not ours\n")
        (root / name).write_bytes(data)
        note(f"{name}: {data!r}")
        run_dir = root / "run"
        outcome = run_and_check_foreign_files(["ingest", name, "--out", "run", *format_flag], root, root, run_dir)
        assert_exit_0_or_one_line_error(outcome, name)
        try:
            expected = expected_rows(name, data)
        except ContainerBroken as why:
            assert outcome.code == 2, f"{name} is damaged ({why}) but was read with exit 0"
            return
        if outcome.code == 0:
            assert_rows_accounted(run_dir, expected, name)


# --------------------------------------------------------------------------------------------- 2. truncation


@pytest.mark.parametrize("extension", CONTAINERS)
@bounded(8)
@given(data=st.data())
def test_every_container_truncated_anywhere_is_detected_or_a_valid_shorter_file(extension, data):
    """The sample, cut at a random offset. What each container can tell:
    - .gz/.zst (one member/frame) and .parquet: a cut anywhere before the end is detectable (gzip trailer,
      zstd frame end, Parquet footer), so it is exit 2 naming the file; uncut, all rows;
    - .jsonl: the cut leaves a shorter file; a partial last line is that row's problem (quarantined as
      malformed or invalid UTF-8), so exit 0 with the rows the prefix holds;
    - .json (an array): a cut prefix is not a JSON array (exit 2), unless only trailing whitespace went;
    - .csv: a cut may leave a valid shorter CSV: exit 0 with its rows, or exit 2 naming the file.
    An empty file (cut at 0) may be read as empty (exit 0, no rows) or refused."""
    name = "input" + extension
    full = sample_container(name)
    offset = data.draw(st.one_of(st.integers(0, len(full)), st.sampled_from([0, 1, len(full) - 1, len(full)])), label="offset")
    data = full[:offset]
    note(f"{name} cut at {offset} of {len(full)}")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / name).write_bytes(data)
        run_dir = root / "run"
        # The format is given: with `auto`, a file cut to one partial line has nothing to detect from.
        outcome = run_and_check_foreign_files(["ingest", name, "--out", "run", "--format", "alpaca"], root, root, run_dir)
        assert_exit_0_or_one_line_error(outcome, name)
        if offset == len(full):
            assert outcome.code == 0, f"the complete {name} was refused: {outcome.stderr!r}"
            assert_rows_accounted(run_dir, {n: b"" for n in range(1, len(SAMPLE_ROWS) + 1)}, name)
            records, quarantine = read_outputs(run_dir)
            assert quarantine.height == 0, quarantine.to_dicts()[:3]
            return
        if offset == 0:
            if outcome.code == 0:
                assert_rows_accounted(run_dir, {}, name)
            return
        if extension in COMPRESSED or extension == ".parquet":
            assert outcome.code == 2, f"{name} truncated at byte {offset} of {len(full)} was read with exit 0"
            return
        if extension == ".json":
            if data.strip() == full.strip():
                assert outcome.code == 0 and read_outputs(run_dir)[0].height == len(SAMPLE_ROWS)
            else:
                assert outcome.code == 2, f"{name} truncated at byte {offset} of {len(full)} was read with exit 0"
            return
        if extension == ".jsonl":
            assert outcome.code == 0, f"a truncated JSONL is a shorter JSONL, yet: {outcome.stderr!r}"
            expected = jsonl_rows(data)
            assert_rows_accounted(run_dir, expected, name)
            last = max(expected, default=None)
            if last is not None and expected[last] != jsonl_rows(full)[last]:  # the cut fell inside this line
                _, quarantine = read_outputs(run_dir)
                reasons = dict(zip(quarantine["row"].to_list(), quarantine["reason"].to_list()))
                assert reasons.get(last) in ("malformed_json", "invalid_utf8"), (
                    f"the cut last line {last} should be quarantined as malformed, got {reasons.get(last)!r}"
                )
            return
        if outcome.code == 0:  # .csv
            try:
                expected = csv_rows(data)
            except csv.Error:
                pytest.fail(f"{name} cut mid-quote was read with exit 0")
            assert_rows_accounted(run_dir, expected, name)


# --------------------------------------------------------------------------------------------- 3. random shapes

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),  # unbounded: 2**70 does not fit any integer column
    st.floats(allow_nan=True, allow_infinity=True),  # json.dumps writes NaN/Infinity: not JSON
    st.text(max_size=12),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)
ROLES = st.sampled_from(["user", "assistant", "system", "human", "gpt", "USER", "hacker", "", "tool"])
TEXTS = st.one_of(st.text(max_size=30), st.sampled_from(["Reset my password please.", "Open Settings then Account.", "   ", ""]))


def messages(role_key: str = "role", content_key: str = "content"):
    message = st.fixed_dictionaries(
        {},
        optional={role_key: st.one_of(ROLES, JSON_SCALARS), content_key: st.one_of(TEXTS, TEXTS, JSON_VALUES)},
    )
    return st.lists(st.one_of(message, message, message, JSON_VALUES), max_size=4)


def text_or_messages():
    return st.one_of(TEXTS, messages(), JSON_VALUES)


FORMAT_FIELDS = {
    "alpaca": {"instruction": TEXTS, "input": TEXTS, "output": TEXTS, "system": TEXTS},
    "prompt_response": {"prompt": TEXTS, "response": TEXTS, "system": TEXTS},
    "sharegpt": {"conversations": messages("from", "value"), "system": TEXTS},
    "openai": {"messages": messages()},
    "preference": {"prompt": text_or_messages(), "chosen": text_or_messages(), "rejected": text_or_messages()},
}


def records_of(fmt: str):
    """Records of one format whose every field is sometimes the right type and sometimes anything."""
    fields = FORMAT_FIELDS[fmt]
    shaped = st.fixed_dictionaries({}, optional={key: st.one_of(value, value, value, JSON_VALUES) for key, value in fields.items()})
    return st.one_of(shaped, shaped, shaped, JSON_VALUES)


def is_text(value) -> bool:
    return isinstance(value, str)


def is_message_list(value, role_key="role", content_key="content") -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and is_text(m.get(role_key)) and is_text(m.get(content_key)) for m in value
    )


def text_fields_were_text(fmt: str, record) -> bool:
    """Whether every text a kept record contributes was JSON text in the input (never a number or a
    bool stringified on the way)."""
    if not isinstance(record, dict):
        return False
    optional_text = lambda key: record.get(key) is None or is_text(record.get(key))  # noqa: E731
    if fmt == "alpaca":
        return is_text(record.get("instruction")) and is_text(record.get("output")) and optional_text("input") and optional_text("system")
    if fmt == "prompt_response":
        return is_text(record.get("prompt")) and is_text(record.get("response")) and optional_text("system")
    if fmt == "sharegpt":
        return is_message_list(record.get("conversations"), "from", "value") and optional_text("system")
    if fmt == "openai":
        return is_message_list(record.get("messages"))
    return all(is_text(record.get(key)) or is_message_list(record.get(key)) for key in ("prompt", "chosen", "rejected"))


def is_strict_json(line: str) -> bool:
    def refuse(constant):
        raise ValueError(constant)

    try:
        json.loads(line, parse_constant=refuse)
    except (ValueError, RecursionError):
        return False
    return True


@pytest.mark.parametrize("fmt", sorted(FORMAT_FIELDS))
@bounded(12)
@given(data=st.data())
def test_random_record_shapes_per_format_are_kept_or_quarantined_one_for_one(data, fmt):
    """Random JSON shapes and types for each format, as JSONL with the format given: exit 0, every line
    kept or quarantined (with a reason and its raw line), and no non-text value kept as text. A UTF-8
    byte-order mark before the first line is not part of that line."""
    records = data.draw(st.lists(records_of(fmt), min_size=1, max_size=12), label="records")
    bom = data.draw(st.sampled_from(["", "", "\ufeff"]), label="bom")
    lines = [json.dumps(record, ensure_ascii=False) for record in records]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "input.jsonl").write_text(bom + "".join(line + "\n" for line in lines), encoding="utf-8")
        run_dir = root / "run"
        outcome = run_and_check_foreign_files(["ingest", "input.jsonl", "--out", "run", "--format", fmt], root, root, run_dir)
        assert_exit_0_or_one_line_error(outcome, "input.jsonl")
        assert outcome.code == 0, f"a JSONL file with --format {fmt} must be read row by row: {outcome.stderr!r}"
        expected = {number: line.encode() for number, line in enumerate(lines, start=1)}
        assert_rows_accounted(run_dir, expected, "input.jsonl")
        kept, quarantine = read_outputs(run_dir)
        reasons = dict(zip(quarantine["row"].to_list(), quarantine["reason"].to_list()))
        if is_strict_json(lines[0]):
            assert reasons.get(1) != "malformed_json", f"line 1 is valid JSON{' after a BOM' if bom else ''}, yet malformed_json"
        for source in kept["source"].to_list():
            record = records[source["row"] - 1]
            assert text_fields_were_text(fmt, record), f"line {source['row']} kept although a text field is not text: {lines[source['row'] - 1]}"


# --------------------------------------------------------------------------------------------- 3b. same record, any container

FLAT_TEXT = st.one_of(st.none(), st.text(max_size=20), st.sampled_from(["Reset my password.", "  spaced  ", "a,b", 'say "hi"', "two\nlines", ""]))
FLAT_FORMATS = {
    "alpaca": ("instruction", "input", "output"),
    "prompt_response": ("prompt", "response", "system"),
}


def write_container(path: Path, records: list[dict]) -> None:
    name = path.name
    stem = name.removesuffix(".gz").removesuffix(".zst")
    if stem.endswith(".jsonl"):
        payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    elif stem.endswith(".json"):
        payload = json.dumps(records, ensure_ascii=False).encode()
    elif stem.endswith(".csv"):
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=list(records[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
        payload = text.getvalue().encode()
    else:
        pl.DataFrame(records, schema={key: pl.String for key in records[0]}).write_parquet(path)
        return
    path.write_bytes(compress(name, payload))


def content_by_row(run_dir: Path) -> tuple[dict[int, list], set[int]]:
    kept, quarantine = read_outputs(run_dir)
    content = {source["row"]: messages for source, messages in zip(kept["source"].to_list(), kept["messages"].to_list())}
    return content, set(quarantine["row"].to_list())


@pytest.mark.parametrize("fmt", sorted(FLAT_FORMATS))
@bounded(6)
@given(data=st.data())
def test_the_same_records_decode_to_the_same_content_in_every_container(fmt, data):
    """The same text records written as JSONL, JSON array, CSV and Parquet (and compressed): each container
    keeps the same rows with the same messages (CSV cannot tell "" from a missing value, so for CSV only
    rows whose fields are all non-empty text are compared)."""
    keys = FLAT_FORMATS[fmt]
    records = data.draw(st.lists(st.fixed_dictionaries({key: FLAT_TEXT for key in keys}), min_size=1, max_size=8), label="records")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        results = {}
        for extension in CONTAINERS:
            name = "input" + extension
            write_container(root / name, records)
            run_dir = root / ("run" + extension.replace(".", "_"))
            outcome = run_curate(["ingest", name, "--out", run_dir.name, "--format", fmt], root)
            assert_exit_0_or_one_line_error(outcome, name)
            assert outcome.code == 0, f"{name}: {outcome.stderr!r}"
            results[extension] = content_by_row(run_dir)
        reference_content, reference_quarantined = results[".jsonl"]
        comparable = {n for n, r in enumerate(records, start=1) if all(isinstance(v, str) and v for v in r.values())}
        for extension, (content, quarantined) in results.items():
            rows = comparable if extension.startswith(".csv") else set(range(1, len(records) + 1))
            assert {n: content.get(n) for n in rows} == {n: reference_content.get(n) for n in rows}, f"{extension} decodes differently from .jsonl"
            assert quarantined & rows == reference_quarantined & rows, f"{extension} quarantines other rows than .jsonl"


# --------------------------------------------------------------------------------------------- 3c. Parquet columns

# Columns a Parquet export may carry beside the text: every Arrow type a user's table could hold.
EXTRA_COLUMNS = {
    "binary": (pl.Binary, st.binary(max_size=16)),  # e.g. image bytes
    "int": (pl.Int64, st.integers(-(2**63), 2**63 - 1)),
    "float": (pl.Float64, st.floats(allow_nan=True, allow_infinity=True)),
    "bool": (pl.Boolean, st.booleans()),
    "null": (pl.Null, st.none()),
    "list": (pl.List(pl.String), st.lists(st.text(max_size=5), max_size=3)),
    "struct": (pl.Struct({"a": pl.Int64, "b": pl.String}), st.fixed_dictionaries({"a": st.integers(-5, 5), "b": st.text(max_size=5)})),
    "date": (pl.Date, st.dates()),
    "decimal": (pl.Decimal(10, 2), st.decimals(min_value=-1000, max_value=1000, places=2, allow_nan=False)),
}


@bounded(15)
@given(
    data=st.data(),
    extra=st.lists(st.sampled_from(sorted(EXTRA_COLUMNS)), min_size=1, max_size=3, unique=True),
    text_type=st.sampled_from(["string", "string", "binary", "int"]),
    format_flag=st.sampled_from([[], ["--format", "alpaca"]]),
)
def test_parquet_inputs_with_columns_of_any_type_are_read_or_refused_in_one_line(data, extra, text_type, format_flag):
    """A Parquet file holding the alpaca fields (as text, or as bytes/integers) beside columns of other
    Arrow types (bytes, nested, decimals, ...): exit 0 with every row accounted for, or exit 2 naming the
    file; never a panic. An unused column of any type must not stop the read."""
    height = data.draw(st.integers(1, 6), label="rows")
    text_values = {"string": st.text(max_size=20), "binary": st.binary(max_size=20), "int": st.integers(-5, 5)}[text_type]
    text_dtype = {"string": pl.String, "binary": pl.Binary, "int": pl.Int64}[text_type]
    columns = {key: pl.Series(key, data.draw(st.lists(text_values, min_size=height, max_size=height), label=key), dtype=text_dtype) for key in ("instruction", "output")}
    for kind in extra:
        dtype, values = EXTRA_COLUMNS[kind]
        columns["extra_" + kind] = pl.Series("extra_" + kind, data.draw(st.lists(values, min_size=height, max_size=height), label=kind), dtype=dtype)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        pl.DataFrame(list(columns.values())).write_parquet(root / "input.parquet")
        run_dir = root / "run"
        outcome = run_and_check_foreign_files(["ingest", "input.parquet", "--out", "run", *format_flag], root, root, run_dir)
        assert_exit_0_or_one_line_error(outcome, "input.parquet")
        if outcome.code == 0:
            assert_rows_accounted(run_dir, {n: b"" for n in range(1, height + 1)}, "input.parquet")
        if text_type == "string" and format_flag:
            assert outcome.code == 0, f"a Parquet file with text alpaca fields and {extra} columns was refused: {outcome.stderr!r}"


# --------------------------------------------------------------------------------------------- 4. config values

HOSTILE_NUMBERS = st.one_of(
    st.sampled_from([-1, -3, 0, -0.5, 10**30, 2**63, -(2**63), 1e308, float("nan"), float("inf"), float("-inf")]),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(min_value=-10.0, max_value=10.0),
)
WRONG_TYPES = st.sampled_from(["abc", "", [1, 2], {"a": 1}, True, None, "1e3", "nan"])

# Numeric fields of the stages a local pipeline runs (label stages need a server, mix needs named sources).
STAGE_NUMBER_FIELDS = {
    "dedup": ["ngram", "num_perm", "seed", "threshold", "candidate_threshold", "bands", "rows", "false_positive_weight",
              "false_negative_weight", "skip_verify_margin", "max_bucket_pairs", "examples"],
    "filter": ["min_last_assistant_words", "min_user_words", "min_lang_score", "max_response_echo_containment",
               "max_response_echo_jaccard", "min_response_prompt_word_ratio", "max_token_count", "max_assistant_words",
               "min_assistant_mean_word_length", "max_assistant_mean_word_length", "max_assistant_symbol_word_ratio",
               "max_assistant_non_alpha_word_ratio", "min_assistant_stop_words", "max_assistant_bullet_line_ratio",
               "max_assistant_ellipsis_line_ratio", "max_assistant_dup_line_fraction",
               "max_assistant_dup_paragraph_fraction", "min_assistant_line_punct_ratio", "max_assistant_short_line_ratio"],
    "split": ["train", "validation", "test", "seed", "min_validation_rows", "min_test_rows", "max_shard_rows"],
    "decontaminate": ["ngram", "min_overlap", "min_matching_ngrams"],
    "ingest": ["max_row_bytes", "quarantine_raw_chars", "chunk_rows"],  # the pipeline's `ingest:` options
    "pipeline": ["seed"],  # the pipeline's top-level seed
}  # fmt: skip
SEED_FIELDS = {"seed"}


STAGES_NEEDED = {  # the stage under test and the stages whose columns it reads
    "dedup": [{"type": "dedup", "config": {}}],
    "decontaminate": [{"type": "decontaminate", "config": {"eval_files": ["eval.jsonl"]}}],
    "filter": [{"type": "tag", "config": {}}, {"type": "filter", "config": {"languages": None}}],
    "split": [{"type": "dedup", "config": {}}, {"type": "split", "config": {}}],
    "ingest": [{"type": "dedup", "config": {}}],
    "pipeline": [{"type": "dedup", "config": {}}, {"type": "split", "config": {}}],
}


def pipeline_with(stage_type: str, overrides: dict) -> dict:
    stages = json.loads(json.dumps(STAGES_NEEDED[stage_type]))
    pipeline = {"name": "props", "run_dir": "runs/props", "inputs": [{"path": "raw/input.jsonl", "format": "alpaca"}], "stages": stages}
    if stage_type == "ingest":
        pipeline["ingest"] = overrides
    elif stage_type == "pipeline":
        pipeline.update(overrides)
    else:
        stages[-1]["config"].update(overrides)
    return pipeline


# What reaches the stages: the sample, nothing at all (every row quarantined), or an empty file.
PROJECT_INPUTS = {
    "sample": sample_container("input.jsonl"),
    "all_quarantined": b'{"instruction": 1}\n{"output": "no instruction"}\n',
    "empty": b"",
}


def write_project(root: Path, raw: bytes = PROJECT_INPUTS["sample"]) -> Path:
    """A project folder: raw data, an eval set, an unrelated file; returns the project folder."""
    project = root / "project"
    (project / "raw").mkdir(parents=True)
    (project / "raw" / "input.jsonl").write_bytes(raw)
    (project / "eval.jsonl").write_text(json.dumps({"instruction": "What is the capital of France?", "output": "Paris."}) + "\n")
    (project / "notes.txt").write_text("my notes: not the tool's\n")
    return project


@pytest.mark.parametrize("stage_type", sorted(STAGE_NUMBER_FIELDS))
@bounded(8)
@given(data=st.data())
def test_random_stage_config_values_run_or_are_refused_in_one_line(stage_type, data):
    """Random numbers (negative, zero, huge, NaN, inf) and wrong types in stage configs, ingest options and
    the seed, over an input that leaves rows, none, or is empty: exit 0 or one line naming the pipeline
    file, never a traceback; a non-finite number is never a meaningful setting and a negative
    count/ratio/size is not either (seeds aside), so both must be refused."""
    fields = data.draw(st.lists(st.sampled_from(STAGE_NUMBER_FIELDS[stage_type]), min_size=1, max_size=2, unique=True), label="fields")
    overrides = {name: data.draw(st.one_of(HOSTILE_NUMBERS, HOSTILE_NUMBERS, WRONG_TYPES), label=name) for name in fields}
    raw = data.draw(st.sampled_from(["sample", "sample", "all_quarantined", "empty"]), label="input")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        project = write_project(root, PROJECT_INPUTS[raw])
        (project / "pipeline.yaml").write_text(yaml.safe_dump(pipeline_with(stage_type, overrides), sort_keys=False))
        note((project / "pipeline.yaml").read_text())
        run_dir = project / "runs" / "props"
        outcome = run_and_check_foreign_files(["run", "pipeline.yaml", "--quiet"], root, project, run_dir)
        assert_exit_0_or_one_line_error(outcome, None)
        numbers = {k: v for k, v in overrides.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        non_finite = {k: v for k, v in numbers.items() if not math.isfinite(v)}
        negative = {k: v for k, v in numbers.items() if k not in SEED_FIELDS and math.isfinite(v) and v < 0}
        if non_finite or negative:
            assert outcome.code == 2, f"{stage_type} config {non_finite or negative} was accepted (exit 0)"
            assert "pipeline.yaml" in outcome.stderr, outcome.stderr


# --------------------------------------------------------------------------------------------- 5. foreign files
# Not random: the whole (target × verb) matrix is small enough to run every case.

RUN_DIR_TARGETS = {
    # name → (run dir relative to the project, whether the tool may write there)
    "fresh": ("runs/new", True),
    "project": (".", False),
    "parent": ("..", False),
    "raw": ("raw", False),
    "unrelated": ("../mine", False),
    "foreign_manifest": ("../foreign", False),
    "foreign_ingest": ("../foreign2", False),
}


def plant_foreign_folders(root: Path) -> None:
    (root / "mine").mkdir()
    (root / "mine" / "thesis.txt").write_text("years of work\n")
    (root / "foreign").mkdir()
    (root / "foreign" / "manifest.json").write_text('{"mine": true}\n')
    (root / "foreign" / "keep.csv").write_text("a,b\n1,2\n")
    (root / "foreign2" / "ingest").mkdir(parents=True)
    (root / "foreign2" / "ingest" / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a run")


@pytest.mark.parametrize("verb", ["run", "run --clean", "ingest", "dedup"])
@pytest.mark.parametrize("target", sorted(RUN_DIR_TARGETS))
def test_no_run_deletes_or_modifies_a_file_it_did_not_create(target, verb):
    """Whatever run directory a user points a verb at, files the tool did not create are never deleted
    or modified: a fresh folder is written (exit 0, changes only inside it); a folder that holds other
    things (the project itself, its parent, the raw data, a folder of one's own, a folder that merely
    looks like a run) is refused in one line (exit 2) with nothing changed anywhere."""
    relative, writable = RUN_DIR_TARGETS[target]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        project = write_project(root)
        plant_foreign_folders(root)
        (project / "pipeline.yaml").write_text(yaml.safe_dump(pipeline_with("dedup", {})))
        if verb.startswith("run"):
            argv = ["run", "pipeline.yaml", "--run-dir", relative, "--quiet", *verb.split()[1:]]
        else:
            argv = [verb, "raw/input.jsonl", "--out", relative]
        run_dir = (project / relative).resolve()
        allowed = run_dir if writable else None
        outcome = run_and_check_foreign_files(argv, root, project, allowed)
        assert_exit_0_or_one_line_error(outcome, None)
        if writable:
            assert outcome.code == 0, outcome.stderr
        else:
            assert outcome.code == 2, f"`curate {' '.join(argv)}` into {target} ({relative}) was not refused"


@pytest.mark.parametrize("target", sorted(RUN_DIR_TARGETS))
def test_a_rerun_with_clean_never_removes_what_an_earlier_run_wrote_beside(target):
    """`curate run` into a folder, then `curate run --clean` into the same folder: whatever the first run
    left there, the second may only remove what the tool created (for the project folder itself, the raw
    data, the pipeline and the user's notes must survive both calls)."""
    relative, writable = RUN_DIR_TARGETS[target]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        project = write_project(root)
        plant_foreign_folders(root)
        (project / "pipeline.yaml").write_text(yaml.safe_dump(pipeline_with("dedup", {})))
        run_dir = (project / relative).resolve()
        before = snapshot(root)
        first = run_curate(["run", "pipeline.yaml", "--run-dir", relative, "--quiet"], project)
        second = run_curate(["run", "pipeline.yaml", "--run-dir", relative, "--quiet", "--clean"], project)
        after = snapshot(root)
        outside = changed_outside(before, after, root, run_dir if writable else None)
        lost = [p for p in outside if p in before and p not in after]
        assert not outside, (
            f"after run + run --clean into {relative}: removed {lost[:8]}, changed or created "
            f"{[p for p in outside if p not in lost][:4]} (exits {first.code}, {second.code}; {second.stderr.strip()!r})"
        )
        for outcome in (first, second):
            assert_exit_0_or_one_line_error(outcome, None)
            assert outcome.code == (0 if writable else 2), outcome.stderr
