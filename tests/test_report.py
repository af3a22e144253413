"""The run report: a self-contained report.html with the funnel, drop and quarantine reasons, split
sizes, length histograms, cluster sizes, language and label plots; `curate report RUN_DIR`; and a
render check in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

import pytest

from curate.cli import main
from curate.report import build_report, write_report
from split_helpers import write_run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return write_run_dir(tmp_path_factory.mktemp("report") / "run")


def _sections(page: str) -> list[str]:
    return re.findall(r"<h2>(.*?)</h2>", page)


def test_report_has_every_section_with_plots(run_dir):
    page = build_report(run_dir)
    assert _sections(page) == ["Funnel", "Quarantine", "Examples per reason", "Splits", "Lengths per split", "Near-duplicate clusters", "Languages and labels"]
    # funnel numbers and reasons come from the run's files
    for text in ("near_duplicate", "lang_not_allowed", "too_short", "invalid_json", "topic_label", "n_tokens"):
        assert text in page
    assert re.search(r"<td>dedup</td><td>dedup</td><td class=\"num\">420</td><td class=\"num\">320</td><td class=\"num\">100</td>", page)
    assert page.count("<svg") >= 10
    assert "sft: characters per row" in page and "pref: n_tokens" in page


def test_report_is_self_contained_and_deterministic(run_dir):
    page = build_report(run_dir)
    assert "<script" not in page and "<link" not in page and "<img" not in page
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:|//|file:)", page)
    assert "@import" not in page
    assert all(target.startswith("#") for target in re.findall(r"url\(([^)]*)\)", page))  # only in-page refs
    assert build_report(run_dir) == page


def test_report_escapes_text_from_the_data(tmp_path):
    from split_helpers import planted_frame

    frame = planted_frame(sft=30, pref=10)
    import polars as pl

    frame = frame.with_columns(
        pl.struct(pl.lit("<script>alert(1)</script>.jsonl").alias("file"), pl.col("source").struct.field("row"),
                  pl.col("source").struct.field("format")).alias("source")
    )
    run = write_run_dir(tmp_path / "run", frame)
    page = build_report(run)
    assert "<script>alert" not in page


def test_cli_report_regenerates_and_refreshes_cards(run_dir, capsys):
    target = run_dir / "report.html"
    target.unlink(missing_ok=True)
    card = run_dir / "sft" / "README.md"
    card.write_text(card.read_text().split("## Pipeline")[0])
    assert main(["report", str(run_dir)]) == 0
    assert str(target) in capsys.readouterr().out
    assert target.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    refreshed = card.read_text()
    assert "pipeline config hash: `abc123`" in refreshed and "| filter | filter |" in refreshed and '"min_tokens": 27' in refreshed


def test_cli_report_without_manifest_is_a_one_line_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no manifest.json" in err and "\n" not in err


def test_report_of_a_run_without_splits_or_clusters(tmp_path):
    from curate.runner import run_pipeline

    source = tmp_path / "chats.jsonl"
    source.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n{broken\n"
    )
    result = run_pipeline({"name": "bare", "inputs": [{"path": str(source)}], "stages": []}, run_dir=tmp_path / "run")
    page = (result.run_dir / "report.html").read_text()
    assert "No dup_cluster column" in page and "No lang or label columns" in page
    assert "1 raw rows could not be read" in page


def _png_size_and_colours(path: Path) -> tuple[int, int, int]:
    """Width, height and the number of distinct colours sampled from a PNG (8-bit RGB/RGBA, no deps)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks = 8, {}
    idat = b""
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        body = data[position + 8 : position + 8 + length]
        if kind == b"IDAT":
            idat += body
        else:
            chunks.setdefault(kind, body)
        position += 12 + length
    width, height, depth, colour_type = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    channels = {2: 3, 6: 4}[colour_type]
    raw = zlib.decompress(idat)
    stride = width * channels
    colours = set()
    previous = bytearray(stride)
    offset = 0
    for _ in range(height):
        filter_type, line = raw[offset], bytearray(raw[offset + 1 : offset + 1 + stride])
        offset += 1 + stride
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up = previous[i]
            up_left = previous[i - channels] if i >= channels else 0
            if filter_type == 1:
                line[i] = (line[i] + left) & 0xFF
            elif filter_type == 2:
                line[i] = (line[i] + up) & 0xFF
            elif filter_type == 3:
                line[i] = (line[i] + ((left + up) >> 1)) & 0xFF
            elif filter_type == 4:
                p = left + up - up_left
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else up_left)) & 0xFF
        for x in range(0, width, 7):
            colours.add(bytes(line[x * channels : x * channels + 3]))
        previous = line
    return width, height, len(colours)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed (Debian: apt-get install -y chromium)")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    report = write_report(run_dir)
    screenshot = tmp_path / "report.png"
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    try:
        completed = subprocess.run(
            [
                _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
                f"--screenshot={screenshot}", "--window-size=1280,2400", report.resolve().as_uri(),
            ],
            capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": profile},
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert screenshot.exists(), completed.stderr[-2000:]
    width, height, colours = _png_size_and_colours(screenshot)
    assert (width, height) == (1280, 2400)
    # a rendered page with tables and coloured plots, not a blank or error page
    assert colours > 40


def test_only_categorical_label_columns_are_plotted(tmp_path):
    import polars as pl

    from split_helpers import planted_frame

    frame = planted_frame(sft=60, pref=20).with_columns(
        pl.when(pl.int_range(pl.len()) % 2 == 0).then(pl.lit("keep")).otherwise(pl.lit("discard")).alias("label_decision"),
        ("free text " + pl.int_range(pl.len()).cast(pl.String)).alias("label_original_response"),
        pl.int_range(pl.len()).alias("label_record_id"),
    )
    page = build_report(write_run_dir(tmp_path / "run", frame))
    assert "label_decision in the final rows" in page
    assert "label_original_response in" not in page and "label_record_id in" not in page


def test_a_dedup_stage_that_receives_no_rows_still_gets_a_report(tmp_path, capsys):
    """Every row quarantined at ingest: dedup sees nothing, and the report says so instead of crashing."""
    (tmp_path / "raw.jsonl").write_text('{"instruction": 7, "output": "a"}\nnot json\n', encoding="utf-8")
    (tmp_path / "pipeline.yaml").write_text(
        "name: empty\nrun_dir: run\ninputs:\n  - path: raw.jsonl\n    format: alpaca\nstages:\n  - type: dedup\n",
        encoding="utf-8",
    )
    assert main(["run", str(tmp_path / "pipeline.yaml"), "--quiet"]) == 0
    page = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert "Stage dedup received no rows; no clusters to show." in page
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["accounting"]["quarantined"] == 2 and manifest["accounting"]["kept"] == 0
