"""bench code the docs quote: run_all.py's table round trip, scale.py's corpus and fit."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import polars as pl
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_table_rows_read_back_as_written_so_only_keeps_the_other_rows():
    run_all = _load("run_all")
    cells = {"dedup": "headline a<br>headline b (3 s)", "ingest": "ratio 1.5x (2 s)"}
    sizes = {"dedup": "quick (`--records 3000`): not a result", "ingest": "full (defaults)"}
    dates = {"dedup": "2026-01-02", "ingest": "2026-01-03"}
    text = f"intro\n{run_all.START}\n{run_all.table(cells, sizes, 'M', dates)}\n{run_all.END}\noutro\n"
    rows = run_all.previous_rows(text)
    assert set(rows) == {b.name for b in run_all.BENCHES}
    assert rows["dedup"][4:] == [cells["dedup"], sizes["dedup"], "M", "2026-01-02"]
    assert rows["ingest"][4] == "ratio 1.5x (2 s)"
    assert rows["packing"][4] == "not run"


def test_scale_growth_exponent_recovers_a_power_law():
    scale = _load("scale")
    sizes = [100_000, 300_000, 1_000_000]
    assert scale.growth_exponent(sizes, [3.0 * n**0.25 for n in sizes]) == pytest.approx(0.25)
    assert scale.growth_exponent(sizes, [0.002 * n for n in sizes]) == pytest.approx(1.0)


def test_scale_corpus_has_the_planted_shares_and_is_reproducible(tmp_path):
    scale = _load("scale")
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    scale.write_corpus(first, 4_000, seed=3, chunk_rows=1_500)
    scale.write_corpus(second, 4_000, seed=3, chunk_rows=1_500)
    assert first.read_bytes() == second.read_bytes()
    rows = pl.read_ndjson(first)
    assert rows.height == 4_000 and rows["conversation_id"].n_unique() == 4_000
    answers = rows.select(pl.col("messages").list.last().struct.field("content"))["content"]
    exact_copies = rows.height - rows["messages"].n_unique()
    assert 0.03 * rows.height < exact_copies < 0.08 * rows.height  # EXACT_COPY_SHARE, plus rare collisions
    assert 0.01 * rows.height < answers.str.starts_with("Thanks for reaching out about your order.").sum() < 0.04 * rows.height
    typical = answers.str.len_bytes().median()
    assert 700 < typical < 1300  # ~1 KB records


def test_scale_attributes_each_new_peak_to_a_phase_of_the_measured_cli_run(tmp_path):
    """bench/scale.py measures `curate run` through bench/cli_phases.py: the same CLI, printing a line per
    stage and phase, so every new peak it records names the phase it was reached in."""
    scale = _load("scale")
    result = scale.measure_size(tmp_path, 600, seed=3, engine="local")
    assert result["kept"] + result["dropped"] + result["quarantined"] == 600
    peaks = result["new_peaks"]
    assert peaks[0][0] == "imports" and len(peaks) > 1
    stages = {"ingest", "dedup", "pii", "tag", "filter", "split"}
    assert all(phase == "imports" or phase.split(":")[0] in stages for phase, _ in peaks), peaks
    assert [mb for _, mb in peaks] == sorted(mb for _, mb in peaks)  # each one a new high
    assert (tmp_path / "run-local-600" / "sft" / "README.md").is_file()  # the CLI ran the whole pipeline
