"""Ingest: read raw files of any supported container and format into canonical records.

Every raw row ends in exactly one of two tables: the canonical records (`id`, `kind`, `messages` /
`prompt`+`chosen`+`rejected`, `source`) or the quarantine (file, row, reason, field, detail, raw text).
Blank lines in JSONL files are not rows; they are counted separately.

Containers: JSONL (plain, .gz, .zst), JSON arrays, CSV, Parquet, folders saved by
`datasets.save_to_disk`, folders and globs of those. Formats: see curate.formats.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl

from curate.errors import InputFileError
from curate.formats import (
    FORMATS,
    FormatPlan,
    canonical_columns_from,
    detect_format,
    diagnose_row,
    plan_format,
    scalar_for_string_pattern,
)
from curate.records import normalize_messages_series, with_record_id
from schemas import CANONICAL_SCHEMA, QUARANTINE_SCHEMA

SUPPORTED_SUFFIXES = (
    ".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson", ".ndjson.gz", ".ndjson.zst",
    ".json", ".json.gz", ".json.zst", ".csv", ".csv.gz", ".csv.zst", ".parquet",
)  # fmt: skip
CANONICAL_FORMAT = "canonical"  # a Parquet file this tool wrote (a stage's data.parquet)
READ_BLOCK_BYTES = 16 << 20


@dataclass(frozen=True)
class InputSpec:
    path: str
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    name: str | None = None


@dataclass(frozen=True)
class IngestOptions:
    max_row_bytes: int = 200_000
    quarantine_raw_chars: int = 2_000
    chunk_rows: int = 50_000


@dataclass
class FileReport:
    file: str
    format: str
    rows: int = 0
    kept: int = 0
    quarantined: int = 0
    blank_lines: int = 0
    quarantine_reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class IngestBatch:
    records: pl.DataFrame
    quarantine: pl.DataFrame


# ---------------------------------------------------------------------------------------------------
# Finding files


def expand_inputs(specs: list[InputSpec], base_dir: Path) -> list[tuple[Path, str, InputSpec]]:
    """Resolve paths, folders and globs into (absolute path, display name, spec), in a stable order.

    The display name is relative to `base_dir` where possible, so `source.file` (and so the outputs)
    do not depend on where the project is checked out."""
    resolved: list[tuple[Path, str, InputSpec]] = []
    for spec in specs:
        pattern = Path(spec.path).expanduser()
        absolute = pattern if pattern.is_absolute() else base_dir / pattern
        if any(char in spec.path for char in "*?["):
            matches = sorted(Path(p) for p in glob.glob(str(absolute), recursive=True))
            matches = [m for m in matches if m.is_file() or _is_datasets_dir(m)]
            if not matches:
                raise InputFileError(f"{spec.path}: the glob matches no files")
        elif absolute.is_dir() and not _is_datasets_dir(absolute):
            matches = sorted(p for p in absolute.rglob("*") if p.is_file() and _supported(p))
            if not matches:
                raise InputFileError(f"{spec.path}: the folder holds no supported files ({', '.join(SUPPORTED_SUFFIXES)})")
        elif absolute.exists():
            matches = [absolute]
        else:
            raise InputFileError(f"{spec.path}: no such file or folder")
        for match in matches:
            resolved.append((match, _display_name(match, base_dir), spec))
    return resolved


def _supported(path: Path) -> bool:
    return path.name.lower().endswith(SUPPORTED_SUFFIXES)


def _is_datasets_dir(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _display_name(path: Path, base_dir: Path) -> str:
    try:
        return os.path.relpath(path, base_dir) if not os.path.relpath(path, base_dir).startswith("..") else str(path)
    except ValueError:
        return str(path)


# ---------------------------------------------------------------------------------------------------
# Containers: each yields chunks of (row number, raw JSON text per row, utf8_ok)


@dataclass
class RawChunk:
    rows: pl.DataFrame  # __row (Int64), __raw (String), __utf8_ok (Boolean)
    blank_lines: int = 0


def _open_binary(path: Path):
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), read_across_frames=True, closefd=True)
    return open(path, "rb")


def _container_of(path: Path) -> str:
    if path.is_dir():
        return "datasets"
    name = path.name.lower()
    for suffix in (".gz", ".zst"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(".json"):
        # A .json file may hold one array, or one object per line.
        with _open_binary(path) as handle:
            head = handle.read(4096).lstrip()
        return "json_array" if head.startswith(b"[") else "jsonl"
    return "jsonl"


def _jsonl_chunks(path: Path, display: str, chunk_rows: int) -> Iterator[RawChunk]:
    """Stream a JSONL file in blocks split at newlines; memory stays bounded by the block size."""
    line_offset = 0
    pending = b""
    try:
        handle = _open_binary(path)
    except OSError as error:
        raise InputFileError(f"{display}: cannot open ({error.strerror or error})") from None
    with handle:
        while True:
            try:
                block = handle.read(READ_BLOCK_BYTES)
            except (OSError, EOFError, gzip.BadGzipFile) as error:
                raise InputFileError(f"{display}: cannot decompress/read after line {line_offset} ({error})") from None
            except Exception as error:  # zstandard raises its own ZstdError
                raise InputFileError(f"{display}: cannot decompress/read after line {line_offset} ({error})") from None
            if not block:
                break
            data = pending + block
            cut = data.rfind(b"\n")
            if cut < 0:
                pending = data
                continue
            pending = data[cut + 1 :]
            for chunk in _lines_to_chunks(data[: cut + 1], line_offset, chunk_rows, final=False):
                line_offset += chunk.rows.height + chunk.blank_lines
                yield chunk
        if pending:
            for chunk in _lines_to_chunks(pending, line_offset, chunk_rows, final=True):
                yield chunk


def _lines_to_chunks(data: bytes, line_offset: int, chunk_rows: int, final: bool) -> Iterator[RawChunk]:
    # bytes.split and bytes.decode run in C: no Python work per line on the hot path.
    if data.endswith(b"\n"):
        data = data[:-1]
    byte_lines = data.split(b"\n")
    text_lines = data.decode("utf-8", errors="replace").split("\n")
    if len(text_lines) != len(byte_lines):  # cannot happen: U+FFFD never introduces a newline
        raise AssertionError("line split mismatch")
    frame = pl.DataFrame({"__raw": text_lines}).with_row_index("__index")
    frame = frame.with_columns((pl.col("__index").cast(pl.Int64) + 1 + line_offset).alias("__row"))
    suspect = frame.filter(pl.col("__raw").str.contains("\ufffd", literal=True))["__index"].to_list()
    bad_utf8 = np.zeros(frame.height, dtype=bool)
    for index in suspect:  # only lines with a replacement character: rare
        try:
            byte_lines[index].decode("utf-8")
        except UnicodeDecodeError:
            bad_utf8[index] = True
    frame = frame.with_columns(pl.Series("__utf8_ok", ~bad_utf8))
    blank = frame["__raw"].str.strip_chars().str.len_bytes() == 0
    for start in range(0, frame.height, chunk_rows):
        piece = frame.slice(start, chunk_rows)
        piece_blank = blank.slice(start, chunk_rows)
        yield RawChunk(
            rows=piece.filter(~piece_blank).select("__row", "__raw", "__utf8_ok"),
            blank_lines=int(piece_blank.sum()),
        )


def _frame_to_json_rows(frame: pl.DataFrame, first_row: int = 1) -> pl.DataFrame:
    """Rows of a typed table → JSON text per row (vectorized), so formats decode every container alike."""
    return frame.select(
        (pl.int_range(pl.len(), dtype=pl.Int64) + first_row).alias("__row"),
        pl.struct(pl.all()).struct.json_encode().alias("__raw"),
        pl.lit(True).alias("__utf8_ok"),
    )


def _json_array_chunks(path: Path, display: str, chunk_rows: int) -> Iterator[RawChunk]:
    with _open_binary(path) as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputFileError(f"{display}: not UTF-8 at byte {error.start}; a JSON array must be valid UTF-8 as a whole") from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputFileError(f"{display}: not a valid JSON array (line {error.lineno}, column {error.colno}: {error.msg})") from None
    if not isinstance(items, list):
        raise InputFileError(f"{display}: expected a JSON array of records, got {type(items).__name__}")
    # A JSON array is parsed whole (it has no line structure to stream); each element is re-encoded
    # with the C encoder so malformed elements are diagnosed exactly like JSONL lines.
    for start in range(0, len(items), chunk_rows):
        piece = items[start : start + chunk_rows]
        raw = [json.dumps(item, ensure_ascii=False) for item in piece]
        yield RawChunk(
            rows=pl.DataFrame(
                {
                    "__row": pl.Series(np.arange(start + 1, start + 1 + len(piece), dtype=np.int64)),
                    "__raw": raw,
                    "__utf8_ok": pl.Series([True] * len(piece), dtype=pl.Boolean),
                }
            )
        )


def _csv_chunks(path: Path, display: str, chunk_rows: int) -> Iterator[RawChunk]:
    with _open_binary(path) as handle:
        data = handle.read()
    try:
        frame = pl.read_csv(io.BytesIO(data), infer_schema=False, encoding="utf8")
    except (pl.exceptions.PolarsError, UnicodeDecodeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputFileError(f"{display}: not readable as CSV ({first_line})") from None
    for start in range(0, frame.height, chunk_rows):
        yield RawChunk(rows=_frame_to_json_rows(frame.slice(start, chunk_rows), first_row=start + 1))


def _parquet_chunks(path: Path, display: str, chunk_rows: int) -> Iterator[RawChunk]:
    try:
        lazy = pl.scan_parquet(path, glob=False)
        height = lazy.select(pl.len()).collect().item()
    except pl.exceptions.PolarsError as error:
        raise InputFileError(f"{display}: not readable as Parquet ({str(error).splitlines()[0]})") from None
    for start in range(0, height, chunk_rows):
        piece = lazy.slice(start, chunk_rows).collect()
        yield RawChunk(rows=_frame_to_json_rows(piece, first_row=start + 1))


def _datasets_chunks(path: Path, display: str, chunk_rows: int) -> Iterator[RawChunk]:
    """A folder written by `datasets.save_to_disk` (Arrow IPC stream files), or a DatasetDict of them."""
    arrow_files = sorted(path.rglob("*.arrow"))
    if not arrow_files:
        raise InputFileError(f"{display}: a datasets folder without .arrow files")
    row = 1
    for arrow_file in arrow_files:
        try:
            frame = pl.read_ipc_stream(arrow_file)
        except pl.exceptions.PolarsError as error:
            raise InputFileError(f"{display}: cannot read {arrow_file.name} ({str(error).splitlines()[0]})") from None
        for start in range(0, frame.height, chunk_rows):
            piece = frame.slice(start, chunk_rows)
            yield RawChunk(rows=_frame_to_json_rows(piece, first_row=row))
            row += piece.height


CONTAINERS = {
    "jsonl": _jsonl_chunks,
    "json_array": _json_array_chunks,
    "csv": _csv_chunks,
    "parquet": _parquet_chunks,
    "datasets": _datasets_chunks,
}


def _is_canonical_parquet(path: Path) -> bool:
    if not path.name.endswith(".parquet"):
        return False
    try:
        names = set(pl.read_parquet_schema(path))
    except Exception:
        return False
    return set(CANONICAL_SCHEMA) <= names


# ---------------------------------------------------------------------------------------------------
# Decoding and validation


def _decode_strict(raw: pl.Series, dtype: pl.DataType) -> tuple[pl.Series, np.ndarray]:
    """Decode JSON texts with a strict dtype; returns decoded values and a mask of rows that failed.

    One vectorized decode per chunk; when it fails (a malformed or wrong-typed row somewhere), the
    chunk is bisected so only the failing rows are isolated: O(bad rows × log chunk) decodes."""
    failed = np.zeros(len(raw), dtype=bool)
    pieces: list[tuple[int, pl.Series]] = []

    def visit(start: int, stop: int) -> None:
        piece = raw.slice(start, stop - start)
        try:
            pieces.append((start, piece.str.json_decode(dtype)))
            return
        except (pl.exceptions.PolarsError, OverflowError, ValueError):
            pass
        if stop - start == 1:
            failed[start] = True
            pieces.append((start, pl.Series([None], dtype=dtype)))
            return
        middle = (start + stop) // 2
        visit(start, middle)
        visit(middle, stop)

    if len(raw):
        visit(0, len(raw))
    pieces.sort(key=lambda item: item[0])
    decoded = pl.concat([piece for _, piece in pieces]) if pieces else pl.Series([], dtype=dtype)
    return decoded.alias("__rec"), failed


def _first_true(conditions: list[tuple[str, pl.Expr]]) -> pl.Expr:
    """The label of the first condition that holds, else null."""
    expression = pl.lit(None, dtype=pl.String)
    for label, condition in reversed(conditions):
        expression = pl.when(condition).then(pl.lit(label)).otherwise(expression)
    return expression


def _messages_problems(column: str, expect: str) -> list[tuple[str, pl.Expr, pl.Expr]]:
    """(reason, condition, field-description) checks on one canonical messages column.

    expect: 'conversation' (user/assistant alternating, ending with assistant), 'prompt' (ending with
    user), 'reply' (exactly one assistant message)."""
    messages = pl.col(column)
    roles = messages.list.eval(pl.element().struct.field("role"))
    contents = messages.list.eval(pl.element().struct.field("content"))
    unknown_role_at = roles.list.eval(pl.element().is_null()).list.arg_max()
    empty_at = contents.list.eval(pl.element().is_null() | (pl.element().str.len_chars() == 0)).list.arg_max()
    has_unknown = roles.list.eval(pl.element().is_null()).list.any()
    has_empty = (messages.list.len() == 0) | contents.list.eval(
        pl.element().is_null() | (pl.element().str.len_chars() == 0)
    ).list.any()
    if expect == "reply":
        order_ok = (messages.list.len() == 1) & (roles.list.first() == "assistant")
    else:
        turns = roles.list.eval(pl.element().filter(pl.element() != "system"))
        alternating = turns.list.eval(
            pl.element()
            == pl.when(pl.int_range(pl.len()) % 2 == 0).then(pl.lit("user")).otherwise(pl.lit("assistant"))
        ).list.all()
        system_count = roles.list.eval((pl.element() == "system").cast(pl.Int32)).list.sum()
        system_ok = (system_count == 0) | ((system_count == 1) & (roles.list.first() == "system"))
        if expect == "conversation":
            shape_ok = (turns.list.len() >= 2) & (turns.list.len() % 2 == 0)
        else:
            shape_ok = turns.list.len() % 2 == 1
        order_ok = alternating & system_ok & shape_ok
    return [
        ("unknown_role", has_unknown, pl.format(f"{column}[{{}}].role", unknown_role_at)),
        ("empty_content", has_empty, pl.format(f"{column}[{{}}].content", empty_at.fill_null(0))),
        ("broken_turn_order", ~order_ok, pl.lit(f"{column}")),
    ]


def _nested_missing(column: str) -> tuple[pl.Expr, pl.Expr]:
    """(has a message with a null role/content, 'column[i].role|content' of the first such message)."""
    messages = pl.col(column)
    null_at = messages.list.eval(
        pl.element().struct.field("role").is_null() | pl.element().struct.field("content").is_null()
    )
    index = null_at.list.arg_max()
    role_missing = messages.list.get(index, null_on_oob=True).struct.field("role").is_null()
    which = pl.when(role_missing).then(pl.lit("role")).otherwise(pl.lit("content"))
    has = null_at.list.any().fill_null(False)
    return has, pl.when(has).then(pl.format(f"{column}[{{}}].{{}}", index, which))


def _role_details(column: str) -> pl.Expr:
    return pl.col(column).list.eval(pl.element().struct.field("role").fill_null("?")).list.join(",")


def decode_chunk(
    chunk: pl.DataFrame, plan: FormatPlan, display: str, options: IngestOptions
) -> IngestBatch:
    """Turn one chunk of raw rows into canonical records and quarantine entries."""
    raw = chunk.with_columns(pl.col("__raw").str.len_bytes().alias("__bytes"))
    too_large = raw["__bytes"] > options.max_row_bytes
    utf8_bad = ~raw["__utf8_ok"]
    precheck_bad = (too_large | utf8_bad).to_numpy()

    # Decode everything that passed the byte-level checks; huge rows are not even parsed.
    decodable = raw["__raw"].set(pl.Series(precheck_bad), "{}") if precheck_bad.any() else raw["__raw"]
    decoded, failed = _decode_strict(decodable, plan.struct_dtype())
    failed &= ~precheck_bad

    diagnosis: dict[int, tuple[str, str, str]] = {}
    candidates = set(np.flatnonzero(failed).tolist())
    scalar_pattern = scalar_for_string_pattern(plan)
    if scalar_pattern is not None:
        suspicious = raw["__raw"].str.contains(scalar_pattern).fill_null(False).to_numpy() & ~precheck_bad
        candidates |= set(np.flatnonzero(suspicious).tolist())
    raw_texts = raw["__raw"]
    for index in sorted(candidates):  # rows that failed the strict decode: rare, explained one by one
        found = diagnose_row(raw_texts[index], plan)
        if found is not None:
            diagnosis[index] = found
        elif failed[index]:
            diagnosis[index] = ("wrong_type", "", "does not match the format's field types")

    n = raw.height
    pre_reason = np.full(n, None, dtype=object)
    pre_field = np.full(n, None, dtype=object)
    pre_detail = np.full(n, None, dtype=object)
    pre_reason[utf8_bad.to_numpy()] = "invalid_utf8"
    pre_detail[utf8_bad.to_numpy()] = "bytes that are not valid UTF-8"
    large = too_large.to_numpy() & ~utf8_bad.to_numpy()
    pre_reason[large] = "row_too_large"
    pre_detail[large] = [f"{size} bytes > max_row_bytes {options.max_row_bytes}" for size in raw["__bytes"].to_numpy()[large]]
    for index, (reason, field_name, detail) in diagnosis.items():
        pre_reason[index], pre_field[index], pre_detail[index] = reason, field_name, detail

    frame = raw.with_columns(
        decoded,
        pl.Series("__pre_reason", pre_reason.tolist(), dtype=pl.String),
        pl.Series("__pre_field", pre_field.tolist(), dtype=pl.String),
        pl.Series("__pre_detail", pre_detail.tolist(), dtype=pl.String),
    )

    # Missing required fields (a JSON null or an absent key decode to null).
    missing_conditions = [
        (spec.name, pl.col("__rec").struct.field(spec.name).is_null()) for spec in plan.fields if spec.required
    ]
    missing_field = _first_true(missing_conditions) if missing_conditions else pl.lit(None, dtype=pl.String)
    frame = frame.with_columns(
        pl.when(pl.col("__pre_reason").is_null() & missing_field.is_not_null())
        .then(pl.lit("missing_field"))
        .otherwise(pl.col("__pre_reason"))
        .alias("__pre_reason"),
        pl.when(pl.col("__pre_reason").is_null()).then(missing_field).otherwise(pl.col("__pre_field")).alias("__pre_field"),
        pl.when(pl.col("__pre_reason").is_null() & missing_field.is_not_null())
        .then(pl.lit("required field is missing or null"))
        .otherwise(pl.col("__pre_detail"))
        .alias("__pre_detail"),
    )

    ok_so_far = pl.col("__pre_reason").is_null()
    content = canonical_columns_from(plan)
    frame = frame.with_columns(
        *[pl.when(ok_so_far).then(expr).otherwise(pl.lit(None, dtype=expr_dtype(name))).alias(name)
          for name, expr in content.items()]
    )  # fmt: skip
    # A message without a role or content key decodes to nulls: name it before normalization turns
    # unknown roles into nulls too.
    if plan.format != "transcript":
        nested = [_nested_missing(name) for name in ("messages", "prompt", "chosen", "rejected") if name in content]
        nested_field = pl.coalesce([field_name for _, field_name in nested])
        frame = frame.with_columns(
            pl.when(ok_so_far & nested_field.is_not_null()).then(pl.lit("missing_field")).otherwise(pl.col("__pre_reason")).alias("__pre_reason"),
            pl.when(ok_so_far & nested_field.is_not_null()).then(nested_field).otherwise(pl.col("__pre_field")).alias("__pre_field"),
            pl.when(ok_so_far & nested_field.is_not_null()).then(pl.lit("message has no role or content")).otherwise(pl.col("__pre_detail")).alias("__pre_detail"),
        )
        ok_so_far = pl.col("__pre_reason").is_null()
    frame = frame.with_columns(
        normalize_messages_series(frame[name])
        for name in ("messages", "prompt", "chosen", "rejected", "__rejected_prompt")
        if name in content
    )

    checks: list[tuple[str, pl.Expr, pl.Expr]] = []
    if plan.kind == "sft":
        checks += _messages_problems("messages", "conversation")
        details = {"broken_turn_order": pl.format("roles: {}", _role_details("messages"))}
    else:
        checks += _messages_problems("prompt", "prompt")
        checks += _messages_problems("chosen", "reply")
        checks += _messages_problems("rejected", "reply")
        if "__rejected_prompt" in content:
            checks.append(
                (
                    "transcript_prompt_mismatch",
                    pl.col("prompt") != pl.col("__rejected_prompt"),
                    pl.lit("chosen/rejected"),
                )
            )
        details = {"broken_turn_order": pl.lit("prompt must end with a user turn; chosen/rejected one assistant turn")}
    # Order matters: the first failing check names the row's reason.
    ordered = sorted(checks, key=lambda item: ["unknown_role", "empty_content", "broken_turn_order", "transcript_prompt_mismatch"].index(item[0]))
    reason = _first_true([(label, condition) for label, condition, _ in ordered])
    where = pl.lit(None, dtype=pl.String)
    for label, condition, field_description in reversed(ordered):
        where = pl.when(condition).then(field_description).otherwise(where)
    detail = pl.when(reason == "broken_turn_order").then(details["broken_turn_order"]).otherwise(
        pl.when(reason == "unknown_role").then(pl.lit("role is not one of user/assistant/system (or an alias)"))
        .when(reason == "empty_content").then(pl.lit("message content is empty after whitespace normalization"))
        .when(reason == "transcript_prompt_mismatch").then(pl.lit("chosen and rejected transcripts differ before the last assistant turn"))
    )  # fmt: skip
    frame = frame.with_columns(
        pl.when(ok_so_far).then(reason).otherwise(pl.col("__pre_reason")).alias("__reason"),
        pl.when(ok_so_far).then(where).otherwise(pl.col("__pre_field")).alias("__field"),
        pl.when(ok_so_far).then(detail).otherwise(pl.col("__pre_detail")).alias("__detail"),
    )

    quarantine = frame.filter(pl.col("__reason").is_not_null()).select(
        pl.lit(display).alias("file"),
        pl.col("__row").alias("row"),
        pl.col("__reason").alias("reason"),
        pl.col("__field").fill_null("").alias("field"),
        pl.col("__detail").fill_null("").alias("detail"),
        pl.col("__raw").str.slice(0, options.quarantine_raw_chars).alias("raw"),
    )
    records = frame.filter(pl.col("__reason").is_null()).select(
        pl.lit(plan.kind).alias("kind"),
        pl.col("messages"),
        pl.col("prompt"),
        pl.col("chosen"),
        pl.col("rejected"),
        pl.struct(
            pl.lit(display).alias("file"), pl.col("__row").alias("row"), pl.lit(plan.format).alias("format")
        ).alias("source"),
    )
    records = with_record_id(records).select(
        *[pl.col(name).cast(dtype) for name, dtype in CANONICAL_SCHEMA.items()]
    )
    return IngestBatch(records=records, quarantine=quarantine.cast(QUARANTINE_SCHEMA))


def expr_dtype(name: str) -> pl.DataType:
    return CANONICAL_SCHEMA.get(name, CANONICAL_SCHEMA["prompt"])


# ---------------------------------------------------------------------------------------------------
# Whole files


def _sample_rows(chunk: pl.DataFrame, limit: int = 200) -> list[dict]:
    sample = []
    for text in chunk.filter(pl.col("__utf8_ok"))["__raw"].head(limit).to_list():
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            continue
        if isinstance(value, dict):
            sample.append(value)
    return sample


def ingest_file(
    path: Path, display: str, spec: InputSpec, options: IngestOptions
) -> Iterator[tuple[IngestBatch, FileReport]]:
    """Yield (batch, running report) per chunk of one raw file."""
    if spec.format not in ("auto", *FORMATS):
        raise InputFileError(f"{display}: unknown format {spec.format!r}; expected auto or one of {', '.join(FORMATS)}")
    if not os.access(path, os.R_OK):
        raise InputFileError(f"{display}: not readable (permission denied)")
    if path.is_file() and _is_canonical_parquet(path):
        frame = pl.read_parquet(path, glob=False)
        report = FileReport(file=display, format=CANONICAL_FORMAT, rows=frame.height, kept=frame.height)
        yield IngestBatch(records=frame, quarantine=pl.DataFrame(schema=QUARANTINE_SCHEMA)), report
        return
    container = _container_of(path)
    chunks = CONTAINERS[container](path, display, options.chunk_rows)
    plan: FormatPlan | None = None
    report = FileReport(file=display, format=spec.format)
    for chunk in chunks:
        report.blank_lines += chunk.blank_lines
        if chunk.rows.height == 0:
            continue
        if plan is None:
            sample = _sample_rows(chunk.rows)
            fmt = spec.format
            if fmt == "auto":
                fmt = detect_format(sample, spec.columns)
                if fmt is None:
                    keys = sorted({key for row in sample for key in row})[:12]
                    raise InputFileError(
                        f"{display}: cannot detect the record format from fields {keys}; set `format:` "
                        f"(one of {', '.join(FORMATS)}) and `columns:` for this input"
                    )
            plan = plan_format(fmt, sample, spec.columns)
            report.format = fmt
        batch = decode_chunk(chunk.rows, plan, display, options)
        report.rows += chunk.rows.height
        report.kept += batch.records.height
        report.quarantined += batch.quarantine.height
        for reason, count in batch.quarantine.group_by("reason").len().iter_rows():
            report.quarantine_reasons[reason] = report.quarantine_reasons.get(reason, 0) + count
        yield batch, report
    if plan is None and report.blank_lines == 0:
        # An empty file is not an error, but the manifest says so.
        report.format = spec.format if spec.format != "auto" else "empty"
    yield IngestBatch(records=pl.DataFrame(schema=CANONICAL_SCHEMA), quarantine=pl.DataFrame(schema=QUARANTINE_SCHEMA)), report


def read_canonical(
    paths: list[str | Path], format: str = "auto", columns: dict[str, str] | None = None, base_dir: Path | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Read raw files into (canonical records, quarantine) in memory: the library entry point for
    small inputs such as evaluation sets. Pipelines stream through the runner instead."""
    base = Path(base_dir) if base_dir else Path.cwd()
    specs = [InputSpec(path=str(p), format=format, columns=dict(columns or {})) for p in paths]
    records, quarantine = [], []
    for path, display, spec in expand_inputs(specs, base):
        for batch, _ in ingest_file(path, display, spec, IngestOptions()):
            records.append(batch.records)
            quarantine.append(batch.quarantine)
    return (
        pl.concat(records, how="diagonal_relaxed") if records else pl.DataFrame(schema=CANONICAL_SCHEMA),
        pl.concat(quarantine) if quarantine else pl.DataFrame(schema=QUARANTINE_SCHEMA),
    )
