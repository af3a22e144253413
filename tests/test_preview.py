"""Seeing the data: `curate preview` (kept / dropped by reason / quarantined), examples per reason in the
report, and `curate stages` with full field names — through the CLI on a hand-written run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from curate.cli import main

ROWS = [
    {"instruction": "Where is my parcel? It has not arrived.", "output": "It shipped yesterday and arrives on Friday."},
    {"instruction": "Can you refund my invoice please?", "output": "Done, the refund is on its way."},
    {"instruction": "Is the app free?", "output": "As an AI language model, I cannot know prices."},
    {"instruction": "Can I change my plan?", "output": "ok"},
    {"instruction": "[red]hi[/red] is my question here", "output": "[b]ok[/b] it is shown as written."},
]


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    data = tmp_path / "chat.jsonl"
    lines = [json.dumps(row) for row in ROWS] + ['{"instruction": "broken', '{"instruction": "x", "output": ""}']
    data.write_text("\n".join(lines) + "\n")
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({
        "name": "preview", "run_dir": str(tmp_path / "run"), "inputs": [{"path": str(data)}],
        "stages": [{"type": "tag"}, {"type": "filter", "config": {"languages": None}}],
    }))  # fmt: skip
    assert main(["run", str(pipeline), "--quiet"]) == 0
    return tmp_path / "run"


def test_preview_kept_dropped_and_quarantined(run_dir, capsys):
    capsys.readouterr()
    assert main(["preview", str(run_dir), "-n", "10"]) == 0
    out = capsys.readouterr().out
    assert "kept by filter" in out and "Friday" in out and "AI" not in out
    assert "[red]hi[/red]" in out and "[b]ok[/b]" in out  # user text is never markup
    assert main(["preview", str(run_dir), "--reason", "drop_refusals"]) == 0
    out = capsys.readouterr().out
    assert "dropped by filter, reason drop_refusals" in out and "AI" in out and "Friday" not in out
    assert main(["preview", str(run_dir), "--stage", "filter", "--reason", "min_last_assistant_words"]) == 0
    assert "assistant: ok" in capsys.readouterr().out
    assert main(["preview", str(run_dir), "--quarantined"]) == 0
    out = capsys.readouterr().out
    assert "malformed_json" in out and "empty_content" in out and "broken" in out


@pytest.mark.parametrize(
    "argv, needle",
    [(["--stage", "nope"], "'nope'"), (["--reason", "no_such_reason"], "no_such_reason"), (["-n", "0"], "-n")],
)
def test_preview_errors_are_one_line(run_dir, capsys, argv, needle):
    capsys.readouterr()
    assert main(["preview", str(run_dir), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_report_shows_examples_per_drop_and_quarantine_reason(run_dir):
    page = (run_dir / "report.html").read_text()
    section = page[page.index("Examples per reason") :]
    assert "filter: drop_refusals (1 rows)" in section and "As an AI language model" in section
    assert "quarantine: malformed_json" in section and "broken" in section


def test_stages_prints_full_field_names(capsys):
    assert main(["stages"]) == 0
    out = capsys.readouterr().out
    from curate.stage import registered_stages

    for name, spec in registered_stages().items():
        if not spec.config_model.__module__.startswith("curate."):
            continue
        for field in spec.config_model.model_fields:
            assert field in out, (name, field)
    assert "…" not in out
