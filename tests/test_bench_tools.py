"""bench/run_all.py's table round trip and bench/curation_ablation.py's ROUGE-L (bench code the docs quote)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

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


@pytest.mark.parametrize(
    ("candidate", "reference", "expected"),
    [("a b c d", "a b c d", 1.0), ("a x c", "a b c", 2 / 3), ("", "a", 0.0), ("q r", "a b", 0.0), ("b a", "a b", 0.5)],
)
def test_rouge_l_f1(candidate, reference, expected):
    assert _load("curation_ablation").rouge_l_f1(candidate, reference) == pytest.approx(expected)
