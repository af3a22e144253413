"""The mix stage: target ratios and weights, deterministic up/down-sampling, nothing lost, and the
manifest's record of what was sampled from where."""

from __future__ import annotations

import json

import polars as pl
import pytest

from curate.errors import ConfigError
from curate.mix import MixConfig, largest_remainder, mix_sources
from curate.records import canonical_frame
from curate.runner import run_pipeline
from split_helpers import pref_records, sft_records

GROUPS = {"support": ["raw/support*"], "replay": ["replay/*"]}


def _frame() -> pl.DataFrame:
    return pl.concat(
        [
            canonical_frame(sft_records(500, cluster_size=1, prefix="s"), "raw/support_a.jsonl"),
            canonical_frame(sft_records(100, cluster_size=1, prefix="t"), "raw/support_b.jsonl"),
            canonical_frame(sft_records(60, cluster_size=1, prefix="g"), "replay/general.jsonl"),
            canonical_frame(pref_records(40, cluster_size=1), "raw/support_prefs.jsonl"),
        ],
        how="diagonal_relaxed",
    ).drop("dup_cluster")


def _by_file(frame: pl.DataFrame) -> dict[str, int]:
    return dict(frame.group_by(pl.col("source").struct.field("file")).len().iter_rows())


def _row_keys(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.select("id", pl.col("source").struct.field("file").alias("f"), pl.col("source").struct.field("row").alias("r"))


def test_ratios_downsample_to_the_largest_reachable_mix_and_lose_nothing():
    frame = _frame()
    config = MixConfig(sources=GROUPS, ratios={"support": 0.75, "replay": 0.25})
    kept, dropped, report = mix_sources(frame.lazy(), config, seed=0, stage="mix")
    kept, dropped = kept.collect(), dropped.collect()
    sft = kept.filter(pl.col("kind") == "sft")
    files = _by_file(sft)
    # replay (60 rows) limits the mix: 60 / 0.25 = 240 rows, 180 from support
    assert files["replay/general.jsonl"] == 60
    assert files["raw/support_a.jsonl"] + files["raw/support_b.jsonl"] == 180
    assert report["kinds"]["sft"]["support"] == {
        "available": 600, "target": 180, "kept_original": 180, "upsampled_copies": 0, "downsampled_away": 420, "share": 0.75
    }
    # preference rows are mixed on their own: only the support group exists there, kept whole
    assert kept.filter(pl.col("kind") == "preference").height == 40
    # nothing lost: kept + dropped is exactly the input, every drop says why
    assert (dropped["reason"] == "mix_downsampled").all() and (dropped["stage"] == "mix").all()
    assert set(dropped["mix_group"]) == {"support"}
    both = pl.concat([_row_keys(kept), _row_keys(dropped)]).sort("f", "r")
    assert both.equals(_row_keys(frame).sort("f", "r"))


def test_total_rows_upsamples_with_marked_copies():
    frame = _frame()
    config = MixConfig(sources=GROUPS, ratios={"support": 0.5, "replay": 0.5}, total_rows=300)
    kept, dropped, report = mix_sources(frame.lazy(), config, seed=1, stage="mix")
    kept = kept.collect()
    replay = kept.filter(pl.col("source").struct.field("file") == "replay/general.jsonl")
    assert replay.height == 150
    copies = replay.group_by("id").len()
    assert copies["len"].min() == 2 and copies["len"].max() == 3  # 150 = 2×60 + 30
    assert sorted(replay["mix_copy"].unique()) == [0, 1, 2]
    assert report["kinds"]["sft"]["replay"]["upsampled_copies"] == 90
    assert kept.filter(pl.col("kind") == "sft").height == 300


def test_weights_and_determinism():
    frame = _frame()
    config = MixConfig(sources={"replay": ["replay/*"]}, weights={"replay": 2.0, "raw/support_a.jsonl": 0.1, "raw/support_b.jsonl": 1, "raw/support_prefs.jsonl": 0})
    first = mix_sources(frame.lazy(), config, seed=3, stage="mix")[0].collect()
    files = _by_file(first)
    assert files == {"replay/general.jsonl": 120, "raw/support_a.jsonl": 50, "raw/support_b.jsonl": 100}
    again = mix_sources(frame.sample(fraction=1.0, shuffle=True, seed=2).lazy(), config, seed=3, stage="mix")[0].collect()
    assert _row_keys(first).sort("f", "r").equals(_row_keys(again).sort("f", "r"))
    other = mix_sources(frame.lazy(), config, seed=4, stage="mix")[0].collect()
    assert not _row_keys(first).sort("f", "r").equals(_row_keys(other).sort("f", "r"))


def test_unknown_group_and_refused_upsampling_are_config_errors():
    frame = _frame()
    with pytest.raises(ConfigError, match="have no ratio"):
        mix_sources(frame.lazy(), MixConfig(ratios={"raw/support_a.jsonl": 1}), seed=0, stage="mix")
    config = MixConfig(sources=GROUPS, ratios={"support": 0.5, "replay": 0.5}, total_rows=1000, allow_upsample=False)
    with pytest.raises(ConfigError, match="allow_upsample is off"):
        mix_sources(frame.lazy(), config, seed=0, stage="mix")
    with pytest.raises(ValueError, match="exactly one of ratios or weights"):
        MixConfig(ratios={"a": 1}, weights={"a": 1})


def test_largest_remainder_sums_exactly():
    counts = largest_remainder({"a": 1, "b": 1, "c": 1}, 100)
    assert sum(counts.values()) == 100 and sorted(counts.values()) == [33, 33, 34]


def test_mix_then_split_in_a_pipeline_records_sampling_in_the_manifest(tmp_path):
    support = tmp_path / "raw" / "support.jsonl"
    replay = tmp_path / "replay" / "general.jsonl"
    for path, prefix, count in ((support, "s", 200), (replay, "g", 30)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in sft_records(count, 1, prefix)))
    pipeline = {
        "name": "mix-test",
        "inputs": [{"path": "raw/support.jsonl"}, {"path": "replay/general.jsonl"}],
        "stages": [
            {"type": "mix", "config": {"sources": {"support": ["*raw/support*"], "replay": ["*replay/*"]},
                                       "ratios": {"support": 0.8, "replay": 0.2}, "total_rows": 200}},
            {"type": "split", "config": {"train": 0.8, "validation": 0.1, "test": 0.1}},
        ],
    }
    result = run_pipeline(pipeline, run_dir=tmp_path / "run", base_dir=tmp_path)
    mix = next(s for s in result.manifest["stages"] if s["type"] == "mix")
    assert mix["rows_added"] == 10  # 40 replay rows from 30: 10 copies; 40 support rows dropped
    assert mix["dropped_by_reason"] == {"mix_downsampled": 40}
    assert mix["report"]["kinds"]["sft"]["replay"]["target"] == 40
    assert result.manifest["accounting"]["reconciled"]
    split = pl.read_parquet(result.run_dir / "split" / "data.parquet")
    # an upsampled row and its copies share an id, hence a split: copies never leak across splits
    assert split.group_by("id").agg(pl.col("split").n_unique())["split"].max() == 1
