"""Ingest: read raw files of any supported container and format into canonical records.

Every raw row ends in exactly one of two tables: the canonical records (`id`, `kind`, `messages` /
`prompt`+`chosen`+`rejected`, `source`) or the quarantine (file, row, reason, field, detail, raw text).
Blank lines in JSONL files are not rows; they are counted separately.

Containers: JSONL (plain, .gz, .zst), JSON arrays, CSV, Parquet, folders saved by
`datasets.save_to_disk`, folders and globs of those. Formats: see curate.formats.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import zstandard

from pydantic import Field

from curate.errors import InputFileError
from curate.formats import (
    DEFAULT_COLUMNS,
    FORMATS,
    FormatPlan,
    canonical_columns_from,
    coerce_row_text,
    detect_format,
    diagnose_row,
    plan_format,
    metadata_column,
    metadata_fields,
    scalar_for_string_pattern,
    split_shared_prefix,
)
from curate.mapping import Mapping, RepairCounts, RowProblem, map_row_text
from curate.parallel import ordered_map
from curate.records import concat_lists, normalize_messages_series, normalize_role, with_message_fields, with_record_id
from curate.stage import StageConfig
from schemas import CANONICAL_SCHEMA, QUARANTINE_SCHEMA

SUPPORTED_SUFFIXES = (
    ".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson", ".ndjson.gz", ".ndjson.zst",
    ".json", ".json.gz", ".json.zst", ".csv", ".csv.gz", ".csv.zst", ".parquet",
)  # fmt: skip
CANONICAL_FORMAT = "canonical"  # a Parquet file this tool wrote (a stage's data.parquet)
READ_BLOCK_BYTES = 4 << 20  # raw bytes split into lines at a time (16 MB blocks peaked ~130 MB higher)
# Chunks decoded at once: decoding is Polars calls that release the GIL (two threads: ~1.7x on two cores);
# each chunk in flight holds tens of KB per row.
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class InputSpec:
    path: str
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    name: str | None = None
    # Unconsumed input fields kept in `metadata`: None keeps them all, [] none.
    keep_columns: list[str] | None = None
    mapping: Mapping | None = None  # the mapping language (curate.mapping); None: the format's own fields


class IngestOptions(StageConfig):
    """The pipeline's `ingest:` block: the ingest stage's config (its schema is generated from here)."""

    max_row_bytes: int = Field(
        200_000, ge=1, le=1 << 30,
        description="Raw rows larger than this are quarantined as row_too_large: a single pasted log file is not a conversation.",
    )
    quarantine_raw_chars: int = Field(2_000, ge=0, le=1 << 30, description="How much of a quarantined row's raw text is kept.")
    chunk_rows: int = Field(
        2_000, ge=1, le=100_000_000,
        description="Rows decoded per batch; bounds memory on large inputs. Decoding takes tens of KB per ~1 KB chat row "
        "in flight, and up to 4 batches decode at once (one per core): on 300k records ingest peaked at ~370 MB with "
        "2,000 rows decoded one batch at a time and ~690 MB with 10,000 (for ~35% more ingest CPU time); two at once on "
        "2 cores, ~480 MB with 2,000.",
    )


def input_spec_json(spec: InputSpec) -> dict:
    """An input as config writes it (options left at their defaults are left out, so configs written
    before an option existed keep their config hash): for the manifest, fingerprints and child processes."""
    source = dict(path=spec.path, format=spec.format, columns=spec.columns, name=spec.name)
    if spec.keep_columns is not None:
        source["keep_columns"] = list(spec.keep_columns)
    if spec.mapping is not None:
        source["mapping"] = spec.mapping.as_config()
    return source


def input_spec_from_json(source: dict, where: str) -> InputSpec:
    """The inverse of `input_spec_json`."""
    return InputSpec(
        path=source["path"], format=source.get("format", "auto"), columns=dict(source.get("columns") or {}), name=source.get("name"),
        keep_columns=source.get("keep_columns"),
        mapping=Mapping.from_config(source["mapping"], where) if source.get("mapping") else None,
    )  # fmt: skip


@dataclass
class FileReport:
    file: str
    format: str
    rows: int = 0
    kept: int = 0
    quarantined: int = 0
    blank_lines: int = 0
    quarantine_reasons: dict[str, int] = field(default_factory=dict)
    sha256: str | None = None  # of the bytes the rows were read from
    rows_added: int = 0  # records beyond one per raw row (a mapping's `answers: explode`)
    repairs: RepairCounts = field(default_factory=RepairCounts)
    bytes_read: int = 0  # of the file as stored, so far (for progress; typed sources report it at the end)

    @classmethod
    def from_dict(cls, values: dict) -> "FileReport":
        """The inverse of `dataclasses.asdict` (a report sent back by a stage's own process)."""
        return cls(**{**values, "repairs": RepairCounts(**values["repairs"])})


@dataclass
class IngestBatch:
    records: pl.DataFrame
    quarantine: pl.DataFrame
    added: int = 0  # records beyond one per raw row


# ---------------------------------------------------------------------------------------------------
# Finding files


def expand_inputs(specs: list[InputSpec], base_dir: Path) -> list[tuple[Path, str, InputSpec]]:
    """Resolve paths, folders and globs into (absolute path, display name, spec), in a stable order.

    Each file is read once: a file reached twice (two specs, or symlinks to it) keeps its first
    place. The display name is relative to `base_dir` where possible, so `source.file` (and so the
    outputs) do not depend on where the project is checked out. A path that exists as written is taken
    literally even with glob characters in its name (`chats[2024].jsonl` is that file, not a pattern that
    would read `chats2.jsonl` instead)."""
    resolved: list[tuple[Path, str, InputSpec]] = []
    seen: set[str] = set()
    for spec in specs:
        pattern = Path(spec.path).expanduser()
        absolute = pattern if pattern.is_absolute() else base_dir / pattern
        if any(char in spec.path for char in "*?[") and not absolute.exists():
            matches = [m for m in _glob(absolute) if m.is_file() or _is_datasets_dir(m)]
            if not matches:
                raise InputFileError(f"{spec.path}: the glob matches no files")
        elif absolute.is_dir() and not _is_datasets_dir(absolute):
            # rglob does not descend into symlinked folders: a link back up would loop.
            matches = sorted(p for p in absolute.rglob("*") if p.is_file() and _supported(p))
            if not matches:
                raise InputFileError(f"{spec.path}: the folder holds no supported files ({', '.join(SUPPORTED_SUFFIXES)})")
        elif absolute.exists():
            matches = [absolute]
        else:
            raise InputFileError(f"{spec.path}: no such file or folder")
        for match in matches:
            real = os.path.realpath(match)
            if real not in seen:
                seen.add(real)
                resolved.append((match, _display_name(match, base_dir), spec))
    return resolved


def _glob(absolute: Path) -> list[Path]:
    """Sorted matches of a glob. `**` does not descend into symlinked folders (glob.glob does, and a
    link back up repeats the tree until the path is too long); hidden names match only explicitly."""
    parts = absolute.parts
    first_magic = next(index for index, part in enumerate(parts) if any(char in part for char in "*?["))
    root, pattern = Path(*parts[:first_magic]), parts[first_magic:]
    explicit_hidden = any(part.startswith(".") for part in pattern)
    matches = [
        match
        for match in root.glob(str(Path(*pattern)))
        if explicit_hidden or not any(part.startswith(".") for part in match.relative_to(root).parts)
    ]
    return sorted(matches)


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
# Bytes: JSONL, JSON and CSV files (plain, .gz, .zst) are read through InputBytes, which hashes the file
# as it reads it (the manifest's sha256 then describes the very bytes the rows came from), fails a
# truncated or corrupt archive, and drops a leading UTF-8 byte order mark.

RAW_READ_BYTES = 1 << 20
# Compressed input is fed in small pieces: each piece's output is held at once, and a highly
# compressible piece expands a thousandfold.
DECOMPRESS_FEED_BYTES = 64 << 10
UTF8_BOM = b"\xef\xbb\xbf"


class InputBytes:
    """The decompressed bytes of one raw file, read from start to end in one pass."""

    def __init__(self, path: Path, display: str):
        self.path, self.display = path, display
        self.sha256: str | None = None  # of the file as stored, set once it has been read to its end
        self.bytes_read = 0  # of the file as stored, by the current pass (for progress)
        name = path.name.lower()
        self.codec = "gzip" if name.endswith(".gz") else "zstd" if name.endswith(".zst") else None

    def blocks(self) -> Iterator[bytes]:
        digest = hashlib.sha256()
        self.bytes_read = 0
        try:
            handle = open(self.path, "rb")
        except OSError as error:
            raise InputFileError(f"{self.display}: cannot open ({error.strerror or error})") from None
        with handle:
            blocks = self._counted(_hashed_blocks(handle, digest, self.display))
            if self.codec is not None:
                blocks = _decompressed_blocks(blocks, self.codec, self.display)
            yield from _without_bom(blocks)
        self.sha256 = digest.hexdigest()

    def _counted(self, blocks: Iterator[bytes]) -> Iterator[bytes]:
        for block in blocks:
            self.bytes_read += len(block)
            yield block

    def read_all(self) -> bytes:
        return b"".join(self.blocks())

    def head(self, size: int) -> bytes:
        """The first `size` bytes, without reading (or checking) the rest."""
        data = b""
        blocks = self.blocks()
        for block in blocks:
            data += block
            if len(data) >= size:
                break
        blocks.close()
        return data[:size]


def _hashed_blocks(handle, digest, display: str) -> Iterator[bytes]:
    while True:
        try:
            block = handle.read(RAW_READ_BYTES)
        except OSError as error:
            raise InputFileError(f"{display}: cannot read ({error.strerror or error})") from None
        if not block:
            return
        digest.update(block)
        yield block


def _new_decompressor(codec: str):
    if codec == "gzip":
        return zlib.decompressobj(wbits=31)  # gzip header and trailer: CRC-32 and length are checked
    return zstandard.ZstdDecompressor().decompressobj()


def _decompressed_blocks(blocks: Iterator[bytes], codec: str, display: str) -> Iterator[bytes]:
    """Decompress gzip members / zstd frames one after the other. A file that ends inside one is
    truncated: stream readers (zstandard's stream_reader) return that as a clean end of data."""
    unit = "member" if codec == "gzip" else "frame"
    decompressor, started, complete = _new_decompressor(codec), False, 0
    for block in blocks:
        for offset in range(0, len(block), DECOMPRESS_FEED_BYTES):
            data = block[offset : offset + DECOMPRESS_FEED_BYTES]
            while data:
                if codec == "gzip" and not started:
                    data = data.lstrip(b"\0")  # gzip allows zero padding after a member
                    if not data:
                        break
                try:
                    out = decompressor.decompress(data)
                except (zlib.error, zstandard.ZstdError) as error:
                    raise InputFileError(f"{display}: corrupt {codec} data ({error})") from None
                started = True
                if out:
                    yield out
                if not decompressor.eof:
                    break
                complete += 1
                data = decompressor.unused_data  # the next member/frame starts right here
                decompressor, started = _new_decompressor(codec), False
    if started:
        raise InputFileError(f"{display}: truncated {codec} data (the file ends inside a {unit}); the file is incomplete")
    if complete == 0:
        raise InputFileError(f"{display}: empty {codec} file: not even one complete {unit}")


def _without_bom(blocks: Iterator[bytes]) -> Iterator[bytes]:
    head = b""
    for block in blocks:
        head += block
        if len(head) >= len(UTF8_BOM) or not UTF8_BOM.startswith(head):
            break
    head = head[len(UTF8_BOM) :] if head.startswith(UTF8_BOM) else head
    if head:
        yield head
    yield from blocks


def _coalesced(blocks: Iterator[bytes], size: int) -> Iterator[bytes]:
    """Join small blocks (decompressor output comes in pieces) into blocks of at least `size` bytes."""
    pending: list[bytes] = []
    held = 0
    for block in blocks:
        pending.append(block)
        held += len(block)
        if held >= size:
            yield b"".join(pending)
            pending, held = [], 0
    if pending:
        yield b"".join(pending)


def path_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents) in sorted order."""
    digest = hashlib.sha256()
    if path.is_dir():
        for child in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(child.relative_to(path)).encode())
            digest.update(path_sha256(child).encode())
        return digest.hexdigest()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(RAW_READ_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Text containers (JSONL, JSON array): chunks of (row number, raw JSON text per row, utf8_ok)


@dataclass
class RawChunk:
    rows: pl.DataFrame  # __row (Int64), __raw (String), __utf8_ok (Boolean)
    blank_lines: int = 0


def _container_of(path: Path, display: str) -> str:
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
        head = InputBytes(path, display).head(4096).lstrip()
        return "json_array" if head.startswith(b"[") else "jsonl"
    return "jsonl"


def _jsonl_chunks(source: InputBytes, chunk_rows: int) -> Iterator[RawChunk]:
    """Stream a JSONL file in blocks split at newlines; memory stays bounded by the block size."""
    line_offset = 0
    pending = b""
    for block in _coalesced(source.blocks(), READ_BLOCK_BYTES):
        data = pending + block
        cut = data.rfind(b"\n")
        if cut < 0:
            pending = data
            continue
        pending = data[cut + 1 :]
        for chunk in _lines_to_chunks(data[: cut + 1], line_offset, chunk_rows):
            line_offset += chunk.rows.height + chunk.blank_lines
            yield chunk
    if pending:
        yield from _lines_to_chunks(pending, line_offset, chunk_rows)


def _lines_to_chunks(data: bytes, line_offset: int, chunk_rows: int) -> Iterator[RawChunk]:
    # bytes.split and bytes.decode run in C: no Python work per line on the hot path.
    if data.endswith(b"\n"):
        data = data[:-1]
    text_lines = data.decode("utf-8", errors="replace").split("\n")
    frame = pl.DataFrame({"__raw": text_lines}).with_row_index("__index")
    frame = frame.with_columns((pl.col("__index").cast(pl.Int64) + 1 + line_offset).alias("__row"))
    suspect = frame.filter(pl.col("__raw").str.contains("\ufffd", literal=True))["__index"].to_list()
    bad_utf8 = np.zeros(frame.height, dtype=bool)
    byte_lines = data.split(b"\n") if suspect else []
    if len(byte_lines) not in (0, len(text_lines)):  # cannot happen: U+FFFD never introduces a newline
        raise AssertionError("line split mismatch")
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


def _json_array_chunks(source: InputBytes, chunk_rows: int) -> Iterator[RawChunk]:
    # A JSON array is parsed whole (it has no line structure to stream); each element's own text is
    # then decoded exactly like a JSONL line.
    data = source.read_all()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputFileError(f"{source.display}: not UTF-8 at byte {error.start}; a JSON array must be valid UTF-8 as a whole") from None
    elements = _json_array_elements(text, source.display)
    first_row = 1
    while piece := list(itertools.islice(elements, chunk_rows)):
        yield RawChunk(
            rows=pl.DataFrame(
                {
                    "__row": pl.Series(np.arange(first_row, first_row + len(piece), dtype=np.int64)),
                    "__raw": pl.Series(piece, dtype=pl.String),
                    "__utf8_ok": pl.Series([True] * len(piece), dtype=pl.Boolean),
                }
            )
        )
        first_row += len(piece)


_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_JSON_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)


def _json_array_elements(text: str, display: str) -> Iterator[str]:
    """The text of each element of a top-level JSON array, found by the C scanner element by element."""
    decoder = json.JSONDecoder()
    position = _JSON_SPACE.match(text).end()
    if not text.startswith("[", position):
        raise InputFileError(f"{display}: expected a JSON array of records or one JSON object per line")
    position = _JSON_SPACE.match(text, position + 1).end()
    if text.startswith("]", position):
        position += 1
    else:
        while True:
            try:
                end = decoder.raw_decode(text, position)[1]
            except RecursionError:
                end = _end_of_nested_value(text, position)  # too deep for the scanner: a quarantined row
            except json.JSONDecodeError as error:
                raise InputFileError(f"{display}: not a valid JSON array (line {error.lineno}, column {error.colno}: {error.msg})") from None
            yield text[position:end]
            position = _JSON_SPACE.match(text, end).end()
            if text.startswith(",", position):
                position = _JSON_SPACE.match(text, position + 1).end()
            elif text.startswith("]", position):
                position += 1
                break
            else:
                line = text.count("\n", 0, position) + 1
                raise InputFileError(f"{display}: not a valid JSON array (line {line}: expected ',' or ']' after an element)")
    if text[position:].strip():
        raise InputFileError(f"{display}: not a valid JSON array (text after the closing ']')")


def _end_of_nested_value(text: str, start: int) -> int:
    """End of the array/object at `start`, by bracket depth (strings skipped): no recursion."""
    depth = 0
    for match in _JSON_STRING_OR_BRACKET.finditer(text, start):
        token = match.group()
        if token in "[{":
            depth += 1
        elif token in "]}":
            depth -= 1
        if depth == 0:
            return match.end()
    return len(text)


# ---------------------------------------------------------------------------------------------------
# Typed containers (CSV, Parquet, datasets folders): column names and types are known before any row is
# read, so a column JSON cannot carry (image bytes, dates) is read only when the format needs it, and
# then its values become {"unsupported_type": ...}: a wrong_type row, never a crash or a stringified value.


@dataclass
class TypedSource:
    names: list[str]
    json_native: set[str]  # the columns whose type JSON carries as it is
    # (columns, rows per batch, json_safe) -> frames; json_safe replaces types JSON cannot carry.
    batches: Callable[[list[str], int, bool], Iterator[pl.DataFrame]]
    # sha256 of the bytes the rows came from, once every batch has been read.
    sha256: Callable[[], str]


ARROW_ERRORS = (pa.ArrowException, OSError, ValueError)
ARROW_STREAM_END = b"\xff\xff\xff\xff\x00\x00\x00\x00"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _csv_source(path: Path, display: str) -> TypedSource:
    source = InputBytes(path, display)
    data = source.read_all()
    try:
        # Every cell is text (CSV has no other type); an empty cell is null, a quoted "" the empty string.
        frame = pl.read_csv(io.BytesIO(data), infer_schema=False, encoding="utf8")
    except (pl.exceptions.PolarsError, UnicodeDecodeError) as error:
        raise InputFileError(f"{display}: not readable as CSV ({_first_line(error)})") from None

    def batches(columns: list[str], rows: int, json_safe: bool = True) -> Iterator[pl.DataFrame]:
        for start in range(0, frame.height, rows):
            yield frame.select(columns).slice(start, rows)

    return TypedSource(frame.columns, set(frame.columns), batches, lambda: source.sha256)


def _parquet_source(path: Path, display: str) -> TypedSource:
    try:
        # pre_buffer=False: pyarrow's default keeps every column chunk read cached while iterating (memory
        # that grows with the file; curate/engines/local.py read_batches).
        parquet = pq.ParquetFile(path, page_checksum_verification=True, pre_buffer=False)
        schema = parquet.schema_arrow
    except ARROW_ERRORS as error:
        raise InputFileError(f"{display}: not readable as Parquet ({_first_line(error)})") from None

    def batches(columns: list[str], rows: int, json_safe: bool = True) -> Iterator[pl.DataFrame]:
        try:
            for table in _rebatched(parquet.iter_batches(batch_size=rows, columns=columns), rows):
                yield _arrow_to_polars(table, json_safe)
        except ARROW_ERRORS as error:
            raise InputFileError(f"{display}: corrupt Parquet data ({_first_line(error)})") from None

    # Parquet is read by random access, not in one pass: the file is hashed again once read.
    return TypedSource(schema.names, _json_native_names(schema), batches, lambda: path_sha256(path))


def _datasets_source(path: Path, display: str) -> TypedSource:
    """A folder written by `datasets.save_to_disk` (Arrow IPC stream files), or a DatasetDict of them."""
    arrow_files = sorted(path.rglob("*.arrow"))
    if not arrow_files:
        raise InputFileError(f"{display}: a datasets folder without .arrow files")
    names: list[str] = []
    json_native: set[str] = set()
    for arrow_file in arrow_files:
        with _arrow_stream(arrow_file, f"{display}/{arrow_file.relative_to(path)}") as reader:
            names += [name for name in reader.schema.names if name not in names]
            json_native |= _json_native_names(reader.schema)

    def batches(columns: list[str], rows: int, json_safe: bool = True) -> Iterator[pl.DataFrame]:
        for arrow_file in arrow_files:
            where = f"{display}/{arrow_file.relative_to(path)}"
            with _arrow_stream(arrow_file, where) as reader:
                present = [name for name in columns if name in reader.schema.names] or reader.schema.names[:1]
                try:
                    for table in _rebatched((batch.select(present) for batch in reader), rows):
                        yield _arrow_to_polars(table, json_safe)
                except ARROW_ERRORS as error:
                    raise InputFileError(f"{where}: corrupt Arrow data ({_first_line(error)})") from None

    return TypedSource(names, json_native, batches, lambda: path_sha256(path))


@contextlib.contextmanager
def _arrow_stream(arrow_file: Path, where: str):
    try:
        with open(arrow_file, "rb") as handle:
            # A stream cut at a batch boundary reads as complete: its end-of-stream marker tells.
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(size - len(ARROW_STREAM_END), 0))
            if handle.read() != ARROW_STREAM_END:
                raise InputFileError(f"{where}: truncated Arrow stream (no end-of-stream marker)")
            handle.seek(0)
            try:
                reader = pa.ipc.open_stream(handle)
            except ARROW_ERRORS as error:
                raise InputFileError(f"{where}: not an Arrow IPC stream ({_first_line(error)})") from None
            yield reader
    except OSError as error:
        raise InputFileError(f"{where}: cannot read ({error.strerror or error})") from None


def _rebatched(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in batches:
        pending.append(batch)
        held += batch.num_rows
        if held >= rows:
            yield pa.Table.from_batches(pending)
            pending, held = [], 0
    if pending:
        yield pa.Table.from_batches(pending)


def _json_native(kind: pa.DataType) -> bool:
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return True
    if pa.types.is_boolean(kind) or pa.types.is_integer(kind) or pa.types.is_null(kind):
        return True
    if pa.types.is_floating(kind):
        return not pa.types.is_float16(kind)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        return _json_native(kind.value_type)
    if pa.types.is_struct(kind):
        return all(_json_native(kind.field(index).type) for index in range(kind.num_fields))
    return False


def _json_native_names(schema: pa.Schema) -> set[str]:
    return {
        field.name
        for field in schema
        if _json_native(field.type.value_type if pa.types.is_dictionary(field.type) else field.type)
    }


def _arrow_to_polars(table: pa.Table, json_safe: bool) -> pl.DataFrame:
    # Arrow readers trust offsets and lengths as stored; a damaged file can hold invalid arrays that
    # crash the conversion outright. Full validation turns them into an ArrowInvalid for this file.
    table.validate(full=True)
    if not json_safe:
        return pl.from_arrow(table)
    unsupported: dict[str, str] = {}
    columns = []
    for name, column in zip(table.column_names, table.columns):
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        if not _json_native(column.type):
            unsupported[name] = str(column.type)
            column = pc.is_valid(column)
        columns.append(column)
    frame = pl.from_arrow(pa.table(columns, names=table.column_names))
    return frame.with_columns(
        pl.when(pl.col(name)).then(pl.struct(pl.lit(kind).alias("unsupported_type"))).alias(name)
        for name, kind in unsupported.items()
    )


def _frame_to_json_rows(frame: pl.DataFrame, first_row: int = 1) -> pl.DataFrame:
    """Rows of a typed table → JSON text per row (vectorized), so formats decode every container alike."""
    return frame.select(
        (pl.int_range(pl.len(), dtype=pl.Int64) + first_row).alias("__row"),
        pl.struct(pl.all()).struct.json_encode().alias("__raw"),
        pl.lit(True).alias("__utf8_ok"),
    )


TYPED_SOURCES: dict[str, Callable[[Path, str], TypedSource]] = {
    "csv": _csv_source,
    "parquet": _parquet_source,
    "datasets": _datasets_source,
}


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


def _turn_kinds(messages: pl.Expr) -> pl.Expr:
    """Per message: its role, or `call` for an assistant turn that carries tool_calls."""
    role = pl.element().struct.field("role")
    calls = pl.element().struct.field("tool_calls").list.len().fill_null(0) > 0
    return messages.list.eval(pl.when((role == "assistant") & calls).then(pl.lit("call")).otherwise(role))


# The turn orders each kind of messages column may have, over its turn kinds joined by commas. A tool
# call and its results (`call,tool[,tool...]`) belong to the assistant's reply: they may stand before
# any user or assistant turn and are not turns of the alternation; a result follows a call or another
# result, and every call gets one. A system turn may only open a conversation or a prompt. One regex
# over one string per row: the list.eval form of the same rules (filter, positions, shifts) was a third
# of ingest's format step.
_TOOL_BLOCKS = r"(?:call(?:,tool)+,)*"
TURN_ORDERS = {
    # user/assistant alternating from user, ending with assistant.
    "conversation": rf"^(?:system,)?{_TOOL_BLOCKS}user,{_TOOL_BLOCKS}assistant(?:,{_TOOL_BLOCKS}user,{_TOOL_BLOCKS}assistant)*$",
    # the same, ending with user (tool results of a call made after it may follow).
    "prompt": rf"^(?:system,)?{_TOOL_BLOCKS}user(?:,{_TOOL_BLOCKS}assistant,{_TOOL_BLOCKS}user)*(?:,call(?:,tool)+)*$",
    # one assistant message, after any tool calls and their results.
    "reply": rf"^{_TOOL_BLOCKS}assistant$",
}


def _messages_problems(column: str, expect: str) -> list[tuple[str, pl.Expr, pl.Expr]]:
    """(reason, condition, field-description) checks on one canonical messages column.

    expect: 'conversation', 'prompt' or 'reply' (TURN_ORDERS). A message with an unknown role is
    reported as such before its order is judged."""
    messages = pl.col(column)
    roles = messages.list.eval(pl.element().struct.field("role"))
    # Content may be empty only on a turn that calls tools.
    empty = pl.element().struct.field("content").is_null() | (pl.element().struct.field("content").str.len_chars() == 0)
    calls = pl.element().struct.field("tool_calls").list.len().fill_null(0) > 0
    empty_flags = messages.list.eval(empty & ~calls)
    unknown_role_at = roles.list.eval(pl.element().is_null()).list.arg_max()
    empty_at = empty_flags.list.arg_max()
    has_unknown = roles.list.eval(pl.element().is_null()).list.any()
    has_empty = (messages.list.len() == 0) | empty_flags.list.any()
    order_ok = _turn_kinds(messages).list.join(",").str.contains(TURN_ORDERS[expect])
    return [
        ("unknown_role", has_unknown, pl.format(f"{column}[{{}}].role", unknown_role_at)),
        ("empty_content", has_empty, pl.format(f"{column}[{{}}].content", empty_at.fill_null(0))),
        ("broken_turn_order", ~order_ok, pl.lit(f"{column}")),
    ]


def _nested_missing(column: str) -> tuple[pl.Expr, pl.Expr]:
    """(has a message with a null role/content, 'column[i].role|content' of the first such message)."""
    messages = pl.col(column)
    calls = pl.element().struct.field("tool_calls").list.len().fill_null(0) > 0
    null_at = messages.list.eval(
        pl.element().struct.field("role").is_null() | (pl.element().struct.field("content").is_null() & ~calls)
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
    frame = _decoded_content(chunk, plan, options)
    frame = frame.with_columns(
        pl.lit(plan.kind).alias("kind"),
        pl.struct(
            pl.lit(display).alias("file"), pl.col("__row").alias("row"), pl.lit(plan.format).alias("format")
        ).alias("source"),
    )
    return _checked_batch(frame, display, options, kinds=(plan.kind,), check_nested=plan.format != "transcript")


def _coerced_rows(texts: pl.Series, failed: np.ndarray, plan: FormatPlan) -> tuple[pl.Series, np.ndarray]:
    """Rewrite the rows the strict decode rejected whose messages use an OpenAI spelling the decode
    cannot read (coerce_row_text); returns the texts and a mask of rows rewritten."""
    coerced = np.zeros(len(texts), dtype=bool)
    if not any(spec.shape == "messages" for spec in plan.fields):
        return texts, coerced
    replacements = {}
    for index in np.flatnonzero(failed).tolist():
        rewritten = coerce_row_text(texts[index], plan)
        if rewritten is not None:
            replacements[index] = rewritten
    if not replacements:
        return texts, coerced
    indices = sorted(replacements)
    coerced[indices] = True
    return texts.scatter(indices, [replacements[i] for i in indices]), coerced


def _decoded_content(chunk: pl.DataFrame, plan: FormatPlan, options: IngestOptions) -> pl.DataFrame:
    """Raw rows → canonical content columns, with __pre_reason/__pre_field/__pre_detail for rows that
    fail before any content check (bytes, JSON, types, missing fields)."""
    raw = chunk.with_columns(pl.col("__raw").str.len_bytes().alias("__bytes"))
    too_large = raw["__bytes"] > options.max_row_bytes
    utf8_bad = ~raw["__utf8_ok"]
    map_bad = raw["__map_reason"].is_not_null() if "__map_reason" in raw.columns else pl.Series([False] * raw.height)
    too_large = too_large & ~map_bad
    precheck_bad = (too_large | utf8_bad | map_bad).to_numpy()

    # Decode everything that passed the byte-level checks; huge rows are not even parsed.
    decodable = raw["__raw"].set(pl.Series(precheck_bad), "{}") if precheck_bad.any() else raw["__raw"]
    decoded, failed = _decode_strict(decodable, plan.struct_dtype())
    failed &= ~precheck_bad
    decodable, coerced = _coerced_rows(decodable, failed, plan)
    if coerced.any():  # OpenAI spellings (content parts, object arguments): decode again as rewritten
        decoded, failed = _decode_strict(decodable, plan.struct_dtype())
        failed &= ~precheck_bad

    diagnosis: dict[int, tuple[str, str, str]] = {}
    candidates = set(np.flatnonzero(failed).tolist())
    scalar_pattern = scalar_for_string_pattern(plan)
    if scalar_pattern is not None:
        suspicious = raw["__raw"].str.contains(scalar_pattern).fill_null(False).to_numpy() & ~precheck_bad
        candidates |= set(np.flatnonzero(suspicious).tolist())
    raw_texts = decodable
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
    if map_bad.any():
        where = map_bad.to_numpy()
        pre_reason[where] = raw["__map_reason"].to_numpy()[where]
        pre_field[where] = raw["__map_field"].to_numpy()[where]
        pre_detail[where] = raw["__map_detail"].to_numpy()[where]

    if plan.metadata:
        raw = raw.with_columns(metadata_column(raw["__raw"].set(pl.Series(precheck_bad), "{}") if precheck_bad.any() else raw["__raw"], plan.metadata))
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
    frame = _with_pre_problem(frame, _first_true(missing_conditions) if missing_conditions else None,
                              "missing_field", pl.lit("required field is missing or null"))  # fmt: skip
    content = canonical_columns_from(plan)
    pieces = frame.select(expr.alias(f"{name}.{index}") for name, parts in content.items() for index, expr in enumerate(parts))
    ok_so_far = frame["__pre_reason"].is_null()
    frame = frame.with_columns(
        pl.when(pl.lit(ok_so_far))
        .then(pl.lit(concat_lists([pieces[f"{name}.{index}"] for index in range(len(parts))]).cast(expr_dtype(name))))
        .otherwise(pl.lit(None, dtype=expr_dtype(name)))
        .alias(name)
        for name, parts in content.items()
    )
    frame = split_shared_prefix(frame, plan)
    if plan.variant.get("prompt") == "implicit":
        no_user_turn = ~pl.col("prompt").list.eval(normalize_role(pl.element().struct.field("role")) == "user").list.any()
        frame = _with_pre_problem(frame, pl.when(no_user_turn).then(pl.lit("chosen/rejected")), "no_shared_prompt",
                                  pl.lit("chosen and rejected share no prompt (no user turn before the replies)"))  # fmt: skip
    return frame.drop("__rec", "__bytes", "__utf8_ok")


def _with_pre_problem(frame: pl.DataFrame, field_name: pl.Expr | None, reason: str, detail: pl.Expr) -> pl.DataFrame:
    """Record `reason` on rows without an earlier problem where `field_name` (the field at fault) is set."""
    if field_name is None:
        return frame
    # The field is computed once (it is often a list.eval over every message), then used twice.
    frame = frame.with_columns(field_name.alias("__hit_field"))
    hit = pl.col("__pre_reason").is_null() & pl.col("__hit_field").is_not_null()
    return frame.with_columns(
        pl.when(hit).then(pl.lit(reason)).otherwise(pl.col("__pre_reason")).alias("__pre_reason"),
        pl.when(hit).then(pl.col("__hit_field")).otherwise(pl.col("__pre_field")).alias("__pre_field"),
        pl.when(hit).then(detail).otherwise(pl.col("__pre_detail")).alias("__pre_detail"),
    ).drop("__hit_field")


CONTENT_COLUMNS = ("messages", "prompt", "chosen", "rejected")
CHECK_ORDER = ("unknown_role", "empty_content", "broken_turn_order", "transcript_prompt_mismatch")
CHECK_DETAILS = {
    "unknown_role": "role is not one of user/assistant/system/tool (or an alias)",
    "empty_content": "message content is empty after whitespace normalization",
    "transcript_prompt_mismatch": "chosen and rejected transcripts differ before the last assistant turn",
}


def _content_checks(kinds: tuple[str, ...], transcript_pair: bool) -> list[tuple[str, pl.Expr, pl.Expr, pl.Expr]]:
    """(reason, condition, field, detail) per content check, each applying to rows of its own kind; in
    the order in which the first failing check names a row's reason."""
    checks = []
    if "sft" in kinds:
        order_detail = pl.format("roles: {}", _role_details("messages"))
        for label, condition, where in _messages_problems("messages", "conversation"):
            detail = order_detail if label == "broken_turn_order" else pl.lit(CHECK_DETAILS[label])
            checks.append((label, (pl.col("kind") == "sft") & condition, where, detail))
    if "preference" in kinds:
        order_detail = pl.lit("prompt must end with a user turn; chosen/rejected one assistant turn")
        problems = [
            *_messages_problems("prompt", "prompt"),
            *_messages_problems("chosen", "reply"),
            *_messages_problems("rejected", "reply"),
        ]
        if transcript_pair:
            mismatch = pl.col("prompt") != pl.col("__rejected_prompt")
            problems.append(("transcript_prompt_mismatch", mismatch, pl.lit("chosen/rejected")))
        for label, condition, where in problems:
            detail = order_detail if label == "broken_turn_order" else pl.lit(CHECK_DETAILS[label])
            checks.append((label, (pl.col("kind") == "preference") & condition, where, detail))
    return sorted(checks, key=lambda check: CHECK_ORDER.index(check[0]))


def _checked_batch(
    frame: pl.DataFrame, display: str, options: IngestOptions, kinds: tuple[str, ...], check_nested: bool
) -> IngestBatch:
    """Normalize content and run the content checks; split rows into records and quarantine.

    `frame` holds __row, __raw, __pre_reason/__pre_field/__pre_detail, kind, the content columns,
    source, and (canonical inputs) extra columns that are kept as they are."""
    if check_nested:
        # A message without a role or content decodes to nulls: name it before normalization turns
        # unknown roles into nulls too.
        nested = [_nested_missing(name) for name in CONTENT_COLUMNS]
        frame = _with_pre_problem(frame, pl.coalesce([where for _, where in nested]), "missing_field",
                                  pl.lit("message has no role or content"))  # fmt: skip
    present = [name for name in (*CONTENT_COLUMNS, "__rejected_prompt") if name in frame.columns]
    frame = frame.with_columns(normalize_messages_series(frame[name]) for name in present)

    checks = _content_checks(kinds, transcript_pair="__rejected_prompt" in frame.columns)
    # Each condition is computed once into a column: reason, field and detail all read it.
    held = [f"__check_{index}" for index in range(len(checks))]
    frame = frame.with_columns(condition.alias(name) for name, (_, condition, _, _) in zip(held, checks))
    reason = _first_true([(label, pl.col(name)) for name, (label, _, _, _) in zip(held, checks)])
    where = detail = pl.lit(None, dtype=pl.String)
    for name, (_, _, field_description, description) in reversed(list(zip(held, checks))):
        where = pl.when(pl.col(name)).then(field_description).otherwise(where)
        detail = pl.when(pl.col(name)).then(description).otherwise(detail)
    ok_so_far = pl.col("__pre_reason").is_null()
    frame = frame.with_columns(
        pl.when(ok_so_far).then(reason).otherwise(pl.col("__pre_reason")).alias("__reason"),
        pl.when(ok_so_far).then(where).otherwise(pl.col("__pre_field")).alias("__field"),
        pl.when(ok_so_far).then(detail).otherwise(pl.col("__pre_detail")).alias("__detail"),
    ).drop(held)

    quarantine = frame.filter(pl.col("__reason").is_not_null()).select(
        pl.lit(display).alias("file"),
        pl.col("__row").alias("row"),
        pl.col("__reason").alias("reason"),
        pl.col("__field").fill_null("").alias("field"),
        pl.col("__detail").fill_null("").alias("detail"),
        pl.col("__orig_raw" if "__orig_raw" in frame.columns else "__raw").str.slice(0, options.quarantine_raw_chars).alias("raw"),
    )
    extra = [name for name in frame.columns if not name.startswith("__") and name not in CANONICAL_SCHEMA]
    records = frame.filter(pl.col("__reason").is_null()).select("kind", *CONTENT_COLUMNS, "source", *extra)
    records = with_record_id(records).select(
        *[pl.col(name).cast(dtype) for name, dtype in CANONICAL_SCHEMA.items()], *extra
    )
    return IngestBatch(records=records, quarantine=quarantine.cast(QUARANTINE_SCHEMA))


def expr_dtype(name: str) -> pl.DataType:
    return CANONICAL_SCHEMA.get(name, CANONICAL_SCHEMA["prompt"])


# ---------------------------------------------------------------------------------------------------
# Canonical Parquet (a stage's data.parquet fed back in): validated like any other input. Ids are
# recomputed from the content (an id is a hash of it), kinds, roles, turn order and content checked.


_ROLE_CONTENT_MESSAGES = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))


def _canonical_batch(frame: pl.DataFrame, first_row: int, display: str, options: IngestOptions) -> IngestBatch:
    # Files written before messages carried tool fields hold {role, content} turns: the same records.
    frame = frame.with_columns(
        with_message_fields(pl.col(name)).alias(name) for name in CONTENT_COLUMNS if frame.schema[name] == _ROLE_CONTENT_MESSAGES
    )
    for name, dtype in CANONICAL_SCHEMA.items():
        if frame.schema[name] != dtype:
            raise InputFileError(f"{display}: column {name!r} is {frame.schema[name]}, the canonical schema has {dtype}")
    is_sft, is_preference = pl.col("kind") == "sft", pl.col("kind") == "preference"
    frame = frame.with_columns(
        (pl.int_range(pl.len(), dtype=pl.Int64) + first_row).alias("__row"),
        pl.struct(*CANONICAL_SCHEMA).struct.json_encode().alias("__raw"),
        *[pl.lit(None, dtype=pl.String).alias(name) for name in ("__pre_reason", "__pre_field", "__pre_detail")],
    )
    missing = pl.lit("required field is missing or null")
    frame = _with_pre_problem(frame, pl.when(pl.col("kind").is_null()).then(pl.lit("kind")), "missing_field", missing)
    frame = _with_pre_problem(
        frame, pl.when(~is_sft & ~is_preference).then(pl.lit("kind")), "wrong_type",
        pl.format("kind {} is neither sft nor preference", pl.col("kind")),
    )  # fmt: skip
    required = [(name, is_sft & pl.col(name).is_null()) for name in ("messages",)]
    required += [(name, is_preference & pl.col(name).is_null()) for name in ("prompt", "chosen", "rejected")]
    frame = _with_pre_problem(frame, _first_true(required), "missing_field", missing)
    foreign = [(name, is_sft & pl.col(name).is_not_null()) for name in ("prompt", "chosen", "rejected")]
    foreign += [("messages", is_preference & pl.col("messages").is_not_null())]
    carries = pl.format("a {} record carries this field", pl.col("kind"))
    frame = _with_pre_problem(frame, _first_true(foreign), "wrong_type", carries)
    frame = frame.with_columns(
        pl.coalesce(
            "source",
            pl.struct(pl.lit(display).alias("file"), pl.col("__row").alias("row"), pl.lit(CANONICAL_FORMAT).alias("format")),
        ).alias("source")
    )
    return _checked_batch(frame, display, options, kinds=("sft", "preference"), check_nested=True)


# ---------------------------------------------------------------------------------------------------
# Whole files


def _mapped(rows: pl.DataFrame, spec: InputSpec, options: IngestOptions, report: FileReport) -> tuple[pl.DataFrame, int]:
    """Raw rows through the input's mapping (curate.mapping): one row per record it becomes, the raw
    text kept for the quarantine, and rows it cannot map marked with why. Rows the byte checks will
    quarantine anyway (invalid UTF-8, too large) pass through untouched."""
    if spec.mapping is None:
        return rows, 0
    out: dict[str, list] = {name: [] for name in ("__row", "__raw", "__utf8_ok", "__orig_raw", "__map_reason", "__map_field", "__map_detail")}
    for row, raw, utf8_ok in rows.select("__row", "__raw", "__utf8_ok").iter_rows():
        problem, texts = None, [raw]
        if utf8_ok and len(raw.encode("utf-8")) <= options.max_row_bytes:
            try:
                texts = map_row_text(raw, spec.mapping, report.repairs)
            except RowProblem as error:
                problem, texts = error, ["{}"]
        for text in texts:
            out["__row"].append(row)
            out["__raw"].append(text)
            out["__utf8_ok"].append(utf8_ok)
            out["__orig_raw"].append(raw)
            out["__map_reason"].append(problem.reason if problem else None)
            out["__map_field"].append(problem.field_name if problem else None)
            out["__map_detail"].append(problem.detail if problem else None)
    schema = {"__row": pl.Int64, "__utf8_ok": pl.Boolean, **{name: pl.String for name in out if name not in ("__row", "__utf8_ok")}}
    mapped = pl.DataFrame(out, schema=schema)
    return mapped, mapped.height - rows.height


def _json_object_chunks(source: InputBytes, chunk_rows: int, key_field: str) -> Iterator[RawChunk]:
    """A file holding one JSON object whose values are the records (keyed by conversation id): each value
    is a row, numbered in file order, with its key added as `key_field`."""
    data = source.read_all()
    try:
        document = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise InputFileError(f"{source.display}: not UTF-8 at byte {error.start}") from None
    except (json.JSONDecodeError, RecursionError) as error:
        raise InputFileError(f"{source.display}: not a valid JSON object ({getattr(error, 'msg', 'nested too deeply')})") from None
    if not isinstance(document, dict):
        raise InputFileError(f"{source.display}: mapping.records is `values` but the file holds a JSON {type(document).__name__}, not an object")
    texts = [
        json.dumps({key_field: key, **value} if isinstance(value, dict) else value, ensure_ascii=False)
        for key, value in document.items()
    ]
    for start in range(0, len(texts), chunk_rows):
        piece = texts[start : start + chunk_rows]
        yield RawChunk(
            rows=pl.DataFrame(
                {
                    "__row": pl.Series(np.arange(start + 1, start + 1 + len(piece), dtype=np.int64)),
                    "__raw": pl.Series(piece, dtype=pl.String),
                    "__utf8_ok": pl.Series([True] * len(piece), dtype=pl.Boolean),
                }
            )
        )


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


def _plan_for(sample: list[dict], keys: list[str], spec: InputSpec, display: str) -> FormatPlan:
    fmt = spec.format
    if spec.mapping is not None:
        # Mapped rows are written in the shape of these two formats.
        fmt = "preference" if spec.mapping.kind == "preference" else "openai"
    elif fmt == "auto":
        fmt = detect_format(sample, spec.columns)
        if fmt is None:
            raise InputFileError(
                f"{display}: cannot detect the record format from fields {sorted(keys)[:12]}; set `format:` "
                f"(one of {', '.join(FORMATS)}) and `columns:` for this input"
            )
    plan = plan_format(fmt, sample, spec.columns)
    return dataclasses.replace(plan, metadata=metadata_fields(sample, plan, spec.keep_columns))


def _decoded_in_order(
    pieces: Iterator[tuple[pl.DataFrame, int, int | None]], plan_of: Callable[[pl.DataFrame], FormatPlan],
    display: str, options: IngestOptions, report: FileReport,
) -> Iterator[IngestBatch]:
    """`decode_chunk` over (rows, rows added by the mapping, bytes read so far) pieces, DECODE_THREADS at
    a time, in file order; the format plan comes from the first piece (format detection needs its rows)."""
    first = next(pieces, None)
    if first is None:
        return
    plan = plan_of(first[0])

    def decoded(piece: tuple[pl.DataFrame, int, int | None]) -> tuple[IngestBatch, int | None]:
        rows, added, bytes_read = piece
        batch = decode_chunk(rows, plan, display, options)
        batch.added = added
        return batch, bytes_read

    for batch, bytes_read in ordered_map(decoded, itertools.chain([first], pieces), DECODE_THREADS, "curate-ingest"):
        if bytes_read is not None:
            report.bytes_read = bytes_read
        yield batch


def _sampled_plan(spec: InputSpec, display: str, report: FileReport) -> Callable[[pl.DataFrame], FormatPlan]:
    def plan_of(rows: pl.DataFrame) -> FormatPlan:
        sample = _sample_rows(rows)
        plan = _plan_for(sample, list({key for row in sample for key in row}), spec, display)
        report.format = "mapping" if spec.mapping is not None else plan.format
        return plan

    return plan_of


def _text_batches(
    path: Path, display: str, container: str, spec: InputSpec, options: IngestOptions, report: FileReport
) -> Iterator[IngestBatch]:
    source = InputBytes(path, display)
    chunks = _jsonl_chunks if container == "jsonl" else _json_array_chunks
    if spec.mapping is not None and spec.mapping.records == "values":
        chunks = lambda source, rows: _json_object_chunks(source, rows, spec.mapping.key_field)  # noqa: E731

    def pieces() -> Iterator[tuple[pl.DataFrame, int, int | None]]:
        for chunk in chunks(source, options.chunk_rows):
            report.blank_lines += chunk.blank_lines
            if chunk.rows.height:
                rows, added = _mapped(chunk.rows, spec, options, report)
                yield rows, added, source.bytes_read

    yield from _decoded_in_order(pieces(), _sampled_plan(spec, display, report), display, options, report)
    report.sha256 = source.sha256


def _typed_batches(
    path: Path, display: str, container: str, spec: InputSpec, options: IngestOptions, report: FileReport
) -> Iterator[IngestBatch]:
    source = TYPED_SOURCES[container](path, display)

    def numbered(frames: Iterator[pl.DataFrame]) -> Iterator[tuple[int, pl.DataFrame]]:
        first_row = 1
        for frame in frames:
            yield first_row, frame
            first_row += frame.height

    if spec.mapping is not None:
        # A mapping reads any column; every column JSON can carry goes through it.
        columns = [name for name in source.names if name in source.json_native] or source.names[:1]
        pieces = (
            (*_mapped(_frame_to_json_rows(frame, first_row), spec, options, report), None)
            for first_row, frame in numbered(source.batches(columns, options.chunk_rows, True))
        )
        yield from _decoded_in_order(pieces, _sampled_plan(spec, display, report), display, options, report)
    elif container == "parquet" and set(CANONICAL_SCHEMA) <= set(source.names):
        report.format = CANONICAL_FORMAT
        frames = numbered(source.batches(source.names, options.chunk_rows, False))
        yield from ordered_map(lambda item: _canonical_batch(item[1], item[0], display, options), frames, DECODE_THREADS, "curate-ingest")
    else:
        # Format detection samples the first rows of the columns some format could use.
        wanted = {*(name for names in DEFAULT_COLUMNS.values() for name in names.values()), *spec.columns.values()}
        sample_columns = [name for name in source.names if name in wanted] or source.names[:1]
        with contextlib.closing(source.batches(sample_columns, 200, True)) as heads:
            head = next((frame for frame in heads if frame.height), None)
        if head is None:
            report.sha256 = source.sha256()
            return  # no rows: an empty file
        sample = head.head(200).to_dicts()
        plan = _plan_for(sample, source.names, spec, display)
        report.format = plan.format
        # Columns JSON carries are read too, so a quarantined row shows the whole record as the file
        # holds it; others (image bytes) only when the format needs them.
        fields = {field_spec.name for field_spec in plan.fields}
        columns = [name for name in source.names if name in fields or name in source.json_native] or source.names[:1]
        if set(columns) - set(sample_columns):
            # Extra columns (a raw `id`, scores) are kept in `metadata` as for JSON inputs: type them from
            # their own first rows, which the detection sample did not read.
            with contextlib.closing(source.batches(columns, 200, True)) as heads:
                head = next((frame for frame in heads if frame.height), head)
            plan = dataclasses.replace(plan, metadata=metadata_fields(head.head(200).to_dicts(), plan, spec.keep_columns))
        pieces = (
            (_frame_to_json_rows(frame, first_row), 0, None)
            for first_row, frame in numbered(source.batches(columns, options.chunk_rows, True))
        )
        yield from _decoded_in_order(pieces, lambda rows: plan, display, options, report)
    report.sha256 = source.sha256()


def ingest_file(
    path: Path, display: str, spec: InputSpec, options: IngestOptions
) -> Iterator[tuple[IngestBatch, FileReport]]:
    """Yield (batch, running report) per chunk of one raw file. The last report carries the sha256 of
    the bytes the rows were read from."""
    if spec.format not in ("auto", *FORMATS):
        raise InputFileError(f"{display}: unknown format {spec.format!r}; expected auto or one of {', '.join(FORMATS)}")
    if not os.access(path, os.R_OK):
        raise InputFileError(f"{display}: not readable (permission denied)")
    container = _container_of(path, display)
    report = FileReport(file=display, format=spec.format)
    read = _typed_batches if container in TYPED_SOURCES else _text_batches
    for batch in read(path, display, container, spec, options, report):
        report.rows += batch.records.height + batch.quarantine.height - batch.added
        report.rows_added += batch.added
        report.kept += batch.records.height
        report.quarantined += batch.quarantine.height
        for reason, count in batch.quarantine.group_by("reason").len().iter_rows() if batch.quarantine.height else ():
            report.quarantine_reasons[reason] = report.quarantine_reasons.get(reason, 0) + count
        yield batch, report
    if report.rows == 0 and report.blank_lines == 0 and report.format == "auto":
        # An empty file is not an error, but the manifest says so.
        report.format = "empty"
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
