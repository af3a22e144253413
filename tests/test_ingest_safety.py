"""Ingest against damaged and hostile input, through the CLI on real files: truncated and corrupt
archives fail the file with one line, canonical Parquet is validated, odd column types and deep nesting
never crash, and every input is read once, the same way, whatever its container."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
from pathlib import Path

import datasets
import polars as pl
import pytest
import zstandard

from curate.cli import main
from curate.errors import InputFileError
from curate.records import canonical_frame
from curate.runner import RunEvents, run_pipeline

datasets.disable_progress_bars()  # its bars on stderr would hide whether our error is one line

RECORDS = [
    {"instruction": "Reset my password", "input": "", "output": "Open Settings > Security > Reset."},
    {"instruction": "Summarize the ticket", "input": "Card declined twice\r\non Friday", "output": "The card was declined."},
    {"instruction": "Translate  ‘bonjour’", "input": "", "output": "Hello — in English."},
    {"instruction": "Cafe\u0301 hours?", "input": "", "output": "9am–5pm,   Monday to Friday.\n\n\n\nClosed on holidays."},
]


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def jsonl_bytes(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def csv_bytes(rows: list[dict]) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def zstd_frames(data: bytes, frames: int) -> bytes:
    """Several independent frames, as `zstd -T` or a concatenation of shards writes them."""
    step = -(-len(data) // frames)
    return b"".join(zstandard.ZstdCompressor().compress(data[i : i + step]) for i in range(0, len(data), step))


def ingest(tmp_path: Path, *inputs: str, extra: tuple[str, ...] = ()) -> tuple[int, Path]:
    out = tmp_path / "run"
    return main(["ingest", *inputs, *extra, "--out", str(out)]), out


def outputs(out: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    return pl.read_parquet(out / "ingest" / "data.parquet"), pl.read_parquet(out / "quarantine.parquet")


def assert_one_line_error(capsys, code: int, out: Path, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    # Nothing is presented as this run's result.
    assert not (out / "manifest.json").exists() and not (out / "ingest" / "data.parquet").exists()
    return err


# ------------------------------------------------------------------------------- truncation, corruption

MANY = [{"instruction": f"Question number {i} about billing", "output": f"Answer {i}: see the billing page."} for i in range(20_000)]


@pytest.mark.parametrize("frames", [1, 4])
@pytest.mark.parametrize("keep", [0.0, 0.0001, 0.01, 0.5, 0.9, 0.99999])
def test_truncated_zstd_jsonl_fails_the_file(tmp_path, capsys, frames, keep):
    data = zstd_frames(jsonl_bytes(MANY), frames)
    cut = max(int(len(data) * keep), 0)
    cut = cut if cut < len(data) else len(data) - 1
    (tmp_path / "big.jsonl.zst").write_bytes(data[:cut])
    code, out = ingest(tmp_path, "big.jsonl.zst")
    assert_one_line_error(capsys, code, out, "big.jsonl.zst", "truncated" if cut else "empty")


@pytest.mark.parametrize("name", ["small.jsonl.zst", "small.json.zst", "small.csv.zst"])
def test_truncated_small_zstd_fails_in_every_container(tmp_path, capsys, name):
    rows = RECORDS[:2]
    data = json.dumps(rows).encode() if ".json." in name else csv_bytes(rows) if ".csv" in name else jsonl_bytes(rows)
    compressed = zstandard.ZstdCompressor(write_checksum=True).compress(data)
    for cut in (3, len(compressed) // 2, len(compressed) - 1):
        (tmp_path / name).write_bytes(compressed[:cut])
        code, out = ingest(tmp_path, name)
        assert_one_line_error(capsys, code, out, name, "truncated zstd")


@pytest.mark.parametrize("name", ["t.jsonl.gz", "t.json.gz", "t.csv.gz"])
def test_truncated_or_corrupt_gzip_fails_in_every_container(tmp_path, capsys, name):
    rows = MANY[:3000]
    data = json.dumps(rows).encode() if ".json." in name else csv_bytes(rows) if ".csv" in name else jsonl_bytes(rows)
    compressed = gzip.compress(data, mtime=0)
    for cut in (5, len(compressed) // 2, len(compressed) - 4):
        (tmp_path / name).write_bytes(compressed[:cut])
        code, out = ingest(tmp_path, name)
        assert_one_line_error(capsys, code, out, name, "truncated gzip")
    corrupt = bytearray(compressed)
    corrupt[-6] ^= 0xFF  # inside the CRC-32 of the trailer: the data decompresses, the check fails
    (tmp_path / name).write_bytes(bytes(corrupt))
    code, out = ingest(tmp_path, name)
    assert_one_line_error(capsys, code, out, name, "corrupt gzip")


def test_complete_multi_frame_zstd_and_multi_member_gzip_read_every_row(tmp_path):
    data = jsonl_bytes(MANY)
    (tmp_path / "frames.jsonl.zst").write_bytes(zstd_frames(data, 5))
    half = len(data) // 2
    cut = data.index(b"\n", half) + 1
    (tmp_path / "members.jsonl.gz").write_bytes(gzip.compress(data[:cut], mtime=0) + gzip.compress(data[cut:], mtime=0))
    code, out = ingest(tmp_path, "frames.jsonl.zst", "members.jsonl.gz")
    records, quarantine = outputs(out)
    assert code == 0 and quarantine.height == 0
    assert records.group_by(pl.col("source").struct.field("file")).len().sort("file").rows() == [
        ("frames.jsonl.zst", len(MANY)),
        ("members.jsonl.gz", len(MANY)),
    ]


def write_parquet_bytes(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_parquet(buffer, row_group_size=1000)
    return buffer.getvalue()


def test_corrupt_or_truncated_parquet_fails_the_file(tmp_path, capsys):
    data = write_parquet_bytes(pl.DataFrame(MANY[:5000]))
    damaged = {
        "footer_cut.parquet": data[:-3],
        "half.parquet": data[: len(data) // 2],
        "garbage.parquet": b"PAR1" + os.urandom(64) + b"PAR1",
    }
    middle = bytearray(data)
    middle[len(data) // 3 : len(data) // 3 + 64] = b"\xff" * 64  # inside a compressed data page
    damaged["pages.parquet"] = bytes(middle)
    for name, content in damaged.items():
        (tmp_path / name).write_bytes(content)
        code, out = ingest(tmp_path, name)
        assert_one_line_error(capsys, code, out, name)


def test_truncated_arrow_stream_in_a_datasets_folder_fails(tmp_path, capsys):
    datasets.Dataset.from_list(MANY[:3000]).save_to_disk(str(tmp_path / "ds"))
    arrow_file = next((tmp_path / "ds").glob("*.arrow"))
    data = arrow_file.read_bytes()
    for cut in (len(data) - 8, len(data) // 2):  # at a batch boundary (marker gone), inside a batch
        arrow_file.write_bytes(data[:cut])
        code, out = ingest(tmp_path, "ds")
        assert_one_line_error(capsys, code, out, "ds/", arrow_file.name)


def test_arrow_arrays_with_impossible_offsets_fail_the_file_not_the_process(tmp_path, repo_root):
    import subprocess
    import sys

    import numpy as np
    import pyarrow as pa

    offsets = pa.py_buffer(np.array([0, 5, 1 << 30, 12], dtype=np.int32).tobytes())
    damaged = pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(b"hello world!")])
    batch = pa.record_batch([damaged, pa.array(["a", "b", "c"])], names=["instruction", "output"])
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "state.json").write_text("{}")
    with pa.OSFile(str(tmp_path / "ds" / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, batch.schema) as writer:
            writer.write_batch(batch)
    # In a child process: reading such arrays unchecked crashes the interpreter (SIGSEGV).
    done = subprocess.run(
        [sys.executable, "-m", "curate.cli", "ingest", "ds", "--out", "run"],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(repo_root)}, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().startswith("error: ds/data-00000-of-00001.arrow: corrupt Arrow data")
    assert len(done.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------- canonical pass-through


def test_canonical_parquet_is_validated_like_any_input(tmp_path):
    good = canonical_frame(
        [
            {"messages": [{"role": "user", "content": "How do I reset?"}, {"role": "assistant", "content": "Settings."}]},
            {"prompt": "Which plan?", "chosen": "Pro.", "rejected": "No idea."},
        ]
    ).with_columns(pl.lit(0.5).alias("quality"))
    sft, preference = good.to_dicts()
    rows = [
        dict(sft, id="0" * 32),  # forged id: recomputed from the content
        dict(sft, kind="weird"),
        dict(sft, messages=[{"role": "hacker", "content": "x"}, {"role": "assistant", "content": "y"}]),
        dict(sft, messages=[{"role": "user", "content": " \t "}, {"role": "assistant", "content": "y"}]),
        dict(sft, messages=[{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]),
        dict(preference, chosen=None),
        dict(preference, messages=sft["messages"]),
        preference,
    ]
    pl.DataFrame(rows, schema=good.schema).write_parquet(tmp_path / "forged.parquet")
    code, out = ingest(tmp_path, "forged.parquet")
    records, quarantine = outputs(out)
    assert code == 0 and records.height + quarantine.height == len(rows)
    assert records["id"].to_list() == good["id"].to_list()
    assert records["quality"].to_list() == [0.5, 0.5]  # score columns of a run's output are kept
    assert quarantine.select("row", "reason", "field").rows() == [
        (2, "wrong_type", "kind"),
        (3, "unknown_role", "messages[0].role"),
        (4, "empty_content", "messages[0].content"),
        (5, "broken_turn_order", "messages"),
        (6, "missing_field", "chosen"),
        (7, "wrong_type", "messages"),
    ]
    assert json.loads(quarantine["raw"][0])["kind"] == "weird"


def test_canonical_parquet_of_a_run_reads_back_unchanged(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(jsonl_bytes(RECORDS))
    code, out = ingest(tmp_path, "a.jsonl")
    assert code == 0
    first, _ = outputs(out)
    code = main(["ingest", str(out / "ingest" / "data.parquet"), "--out", str(tmp_path / "again")])
    again = pl.read_parquet(tmp_path / "again" / "ingest" / "data.parquet")
    assert code == 0 and again.drop("source").equals(first.drop("source"))
    assert again["source"].to_list() == first["source"].to_list()  # provenance stays the raw file's


# ------------------------------------------------------------------------------- odd types, deep nesting


def test_parquet_with_an_unused_binary_column_reads(tmp_path):
    frame = pl.DataFrame(
        {
            "instruction": ["Describe the screenshot", "Is it blurry?"],
            "output": ["A login form.", "No."],
            "image": [b"\x89PNG\r\n\x1a\n\x00\xff", None],
            "meta": [{"bytes": b"\x00", "path": "a.png"}, None],
        }
    )
    frame.write_parquet(tmp_path / "images.parquet")
    code, out = ingest(tmp_path, "images.parquet")
    records, quarantine = outputs(out)
    assert code == 0 and records.height == 2 and quarantine.height == 0


def test_binary_or_date_where_text_is_expected_is_wrong_type(tmp_path):
    import datetime

    pl.DataFrame({"instruction": [b"\x00\x01", None], "output": ["a", "b"]}).write_parquet(tmp_path / "b.parquet")
    pl.DataFrame({"instruction": ["q"], "output": [datetime.date(2024, 1, 1)]}).write_parquet(tmp_path / "d.parquet")
    code, out = ingest(tmp_path, "b.parquet", "d.parquet")
    records, quarantine = outputs(out)
    assert code == 0 and records.height == 0
    assert quarantine.select("file", "row", "reason", "field").rows() == [
        ("b.parquet", 1, "wrong_type", "instruction"),
        ("b.parquet", 2, "missing_field", "instruction"),
        ("d.parquet", 1, "wrong_type", "output"),
    ]


def test_deeply_nested_json_array_element_is_quarantined(tmp_path):
    deep = "[" * 10_000 + "]" * 10_000
    elements = [json.dumps(RECORDS[0]), deep, '{"instruction": "a [tricky] {string}", "output": "ok ]}"}']
    (tmp_path / "deep.json").write_text("[\n" + ",\n".join(elements) + "\n]")
    (tmp_path / "deep.jsonl").write_text("\n".join(elements) + "\n")
    code, out = ingest(tmp_path, "deep.json", "deep.jsonl")
    records, quarantine = outputs(out)
    assert code == 0 and records.height == 4
    assert quarantine.select("file", "row", "reason").rows() == [
        ("deep.json", 2, "malformed_json"),
        ("deep.jsonl", 2, "malformed_json"),
    ]


# ------------------------------------------------------------------------------- each input once, alike


def test_symlink_loops_and_aliases_read_each_file_once(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "a.jsonl").write_bytes(jsonl_bytes(RECORDS[:1]))
    (data / "sub" / "b.jsonl").write_bytes(jsonl_bytes(RECORDS[1:2]))
    (data / "sub" / "loop").symlink_to("..", target_is_directory=True)
    (data / "alias.jsonl").symlink_to("a.jsonl")
    for inputs in (["data"], ["data/**/*.jsonl"], ["data", "data/sub/b.jsonl", "data/**/*.jsonl"]):
        code, out = ingest(tmp_path, *inputs, extra=("--force",))
        records, quarantine = outputs(out)
        assert code == 0 and quarantine.height == 0
        assert sorted(records["source"].struct.field("file").to_list()) == ["data/a.jsonl", "data/sub/b.jsonl"]


def test_utf8_bom_is_not_part_of_the_first_row(tmp_path):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "bom.jsonl").write_bytes(bom + jsonl_bytes(RECORDS))
    (tmp_path / "bom.json").write_bytes(bom + json.dumps(RECORDS).encode())
    (tmp_path / "bom.csv").write_bytes(bom + csv_bytes(RECORDS))
    (tmp_path / "bom.jsonl.gz").write_bytes(gzip.compress(bom + jsonl_bytes(RECORDS), mtime=0))
    code, out = ingest(tmp_path, "bom.jsonl", "bom.json", "bom.csv", "bom.jsonl.gz")
    records, quarantine = outputs(out)
    assert code == 0 and quarantine.height == 0 and records.height == 4 * len(RECORDS)
    assert records["source"].struct.field("format").unique().to_list() == ["alpaca"]


def write_every_container(folder: Path, rows: list[dict]) -> list[str]:
    folder.mkdir()
    lines, array, table = jsonl_bytes(rows), json.dumps(rows, indent=2).encode(), csv_bytes(rows)
    files = {
        "r.jsonl": lines,
        "r.jsonl.gz": gzip.compress(lines, mtime=0),
        "r.jsonl.zst": zstd_frames(lines, 2),
        "r.json": array,
        "r.json.gz": gzip.compress(array, mtime=0),
        "r.json.zst": zstandard.ZstdCompressor().compress(array),
        "r.csv": table,
        "r.csv.gz": gzip.compress(table, mtime=0),
        "r.csv.zst": zstandard.ZstdCompressor().compress(table),
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    pl.DataFrame(rows).write_parquet(folder / "r.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(folder / "r_datasets"))
    return [*files, "r.parquet", "r_datasets"]


def test_the_same_record_decodes_alike_in_every_container(tmp_path):
    names = write_every_container(tmp_path / "c", RECORDS)
    code, out = ingest(tmp_path, *(f"c/{name}" for name in names))
    records, quarantine = outputs(out)
    assert code == 0 and quarantine.height == 0
    by_file = {
        file: group.sort(pl.col("source").struct.field("row")).select("id", "kind", "messages").to_dicts()
        for (file,), group in records.group_by(pl.col("source").struct.field("file"))
    }
    assert sorted(by_file) == sorted(f"c/{name}" for name in names)
    reference = by_file["c/r.jsonl"]
    assert len(reference) == len(RECORDS)
    for file, content in by_file.items():
        assert content == reference, file
    assert reference[1]["messages"][0]["content"] == "Summarize the ticket\n\nCard declined twice\non Friday"


def test_non_text_values_are_wrong_type_in_every_container(tmp_path):
    # CSV cells are text by nature, so CSV is not part of this test: "42" there is the string "42".
    rows = [
        {"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": True}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "fine"}]},
    ]
    lines = [json.dumps(row) for row in rows]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "m.json").write_text("[" + ",".join(lines) + "]")
    escaped = '{"messages": [{"role": "user", "cont\\u0065nt": 7}, {"role": "assistant", "content": "a"}]}'
    (tmp_path / "e.jsonl").write_text(escaped + "\n" + lines[2] + "\n")
    pl.DataFrame({"instruction": [1, 2], "output": ["a", "b"]}).write_parquet(tmp_path / "i.parquet")
    datasets.Dataset.from_dict({"prompt": ["q", "r"], "response": [1.5, 2.5]}).save_to_disk(str(tmp_path / "ds"))
    code, out = ingest(tmp_path, "m.jsonl", "m.json", "e.jsonl", "i.parquet", "ds")
    records, quarantine = outputs(out)
    assert code == 0 and records.height == 3
    assert set(quarantine["reason"].to_list()) == {"wrong_type"}
    assert quarantine.select("file", "row", "field").rows() == [
        ("m.jsonl", 1, "messages"),
        ("m.jsonl", 2, "messages"),
        ("m.json", 1, "messages"),
        ("m.json", 2, "messages"),
        ("e.jsonl", 1, "messages"),
        ("i.parquet", 1, "instruction"),
        ("i.parquet", 2, "instruction"),
        ("ds", 1, "response"),
        ("ds", 2, "response"),
    ]


# ------------------------------------------------------------------------------- fingerprint vs rows


@pytest.mark.parametrize("name", ["grows.jsonl", "grows.parquet"])
def test_a_file_that_changes_while_read_fails_the_run(tmp_path, name):
    path = tmp_path / name

    def write(rows):
        if name.endswith(".parquet"):
            pl.DataFrame(rows).write_parquet(path)
        else:
            path.write_bytes(jsonl_bytes(rows))

    write(RECORDS[:2])

    def change_after_fingerprint(stage: str, _type: str) -> None:
        if stage == "ingest":  # the inputs were just fingerprinted; reading starts next
            write(RECORDS)

    pipeline = {"name": "t", "inputs": [{"path": name}], "stages": []}
    with pytest.raises(InputFileError, match=f"{name}: changed while being read; rerun"):
        run_pipeline(pipeline, run_dir=tmp_path / "run", base_dir=tmp_path, events=RunEvents(stage_started=change_after_fingerprint))
    assert not (tmp_path / "run" / "manifest.json").exists()
    # Read again, unchanged, the manifest and the rows describe the same bytes.
    manifest = run_pipeline(pipeline, run_dir=tmp_path / "run", base_dir=tmp_path).manifest
    records, quarantine = outputs(tmp_path / "run")
    assert records.height + quarantine.height == len(RECORDS) == manifest["inputs"][0]["rows"]


def test_json_array_elements_decode_exactly_like_jsonl_lines(tmp_path):
    lines = [
        '{"instruction": "first", "instruction": "second", "output": "a"}',  # duplicate key
        '{"instruction": "lone \\ud800 surrogate", "output": "a"}',  # an escape Python cannot encode
        '{"instruction": "plain", "output": "b"}',
    ]
    (tmp_path / "l.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "a.json").write_text("[\n  " + ",\n  ".join(lines) + "\n]")
    code, out = ingest(tmp_path, "l.jsonl", "a.json")
    records, quarantine = outputs(out)
    assert code == 0 and quarantine.height == 0
    files = records["source"].struct.field("file")
    assert records.filter(files == "a.json")["id"].to_list() == records.filter(files == "l.jsonl")["id"].to_list()


def test_validate_reads_a_bom_and_reports_deep_nesting_in_one_line(tmp_path, capsys):
    record = canonical_frame([{"prompt": "Refund?", "chosen": "Yes.", "rejected": "No."}]).to_dicts()[0]
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + jsonl_bytes([record]))
    assert main(["validate", "bom.jsonl"]) == 0
    (tmp_path / "deep.json").write_text("[" + "[" * 10_000 + "]" * 10_000 + "]")
    assert main(["validate", "deep.json"]) == 2
    err = capsys.readouterr().err
    assert "deep.json" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
