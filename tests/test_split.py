"""The split stage: leak-free, deterministic assignment by near-duplicate cluster, minimum sizes,
stratification, incremental splits, and the exported sft/ and pref/ datasets."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import polars as pl
import pytest

from curate.cli import main
from curate.errors import ConfigError
from curate.records import canonical_frame
from curate.runner import run_pipeline, run_single_stage
from curate.split import SPLITS, SplitConfig, assign_splits, export_splits, read_exported
from split_helpers import planted_frame, sft_records

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_data"


def _clusters_per_split(rows: pl.DataFrame, cluster: pl.Expr) -> pl.DataFrame:
    return rows.group_by(cluster.alias("cluster")).agg(pl.col("split").n_unique().alias("splits"))


def test_every_row_kept_with_a_split_and_clusters_never_cross():
    frame = planted_frame(sft=600, pref=200, files=3)
    rows, report = assign_splits(frame.lazy(), SplitConfig(train=0.6, validation=0.2, test=0.2), seed=3)
    assert rows.height == frame.height
    assert rows.drop("split").equals(frame)  # same rows, same order, nothing else changed
    assert set(rows["split"].unique()) == set(SPLITS)
    crossing = _clusters_per_split(rows, pl.col("dup_cluster")).filter(pl.col("splits") > 1)
    assert crossing.is_empty()
    assert report["counts"]["sft"]["train"] + report["counts"]["sft"]["validation"] + report["counts"]["sft"]["test"] == 600


def test_without_cluster_column_exact_duplicates_share_a_split():
    records = sft_records(300, cluster_size=1)
    frame = pl.concat([canonical_frame(records, "a.jsonl"), canonical_frame(records, "b.jsonl")]).drop("dup_cluster")
    rows, report = assign_splits(frame.lazy(), SplitConfig(train=0.5, validation=0.25, test=0.25), seed=0)
    assert report["cluster_column"] == "id"
    assert _clusters_per_split(rows, pl.col("id")).filter(pl.col("splits") > 1).is_empty()
    assert rows["split"].n_unique() == 3


def test_assignment_is_deterministic_and_seed_dependent():
    frame = planted_frame()
    config = SplitConfig(train=0.5, validation=0.25, test=0.25)
    first, _ = assign_splits(frame.lazy(), config, seed=11)
    again, _ = assign_splits(frame.sample(fraction=1.0, shuffle=True, seed=5).lazy(), config, seed=11)
    by_row = ["id", pl.col("source").struct.field("file").alias("f"), pl.col("source").struct.field("row").alias("r")]
    assert first.select(*by_row, "split").sort("id", "f", "r").equals(again.select(*by_row, "split").sort("id", "f", "r"))
    other, _ = assign_splits(frame.lazy(), config, seed=12)
    assert not first["split"].equals(other["split"])


def test_fractions_hold_on_many_clusters():
    records = sft_records(20_000, cluster_size=2)
    frame = canonical_frame(records)
    rows, _ = assign_splits(frame.lazy(), SplitConfig(train=0.8, validation=0.1, test=0.1), seed=0)
    shares = rows["split"].value_counts(normalize=True)
    share = dict(zip(shares["split"], shares["proportion"]))
    assert share["train"] == pytest.approx(0.8, abs=0.02)
    assert share["validation"] == pytest.approx(0.1, abs=0.015)
    assert share["test"] == pytest.approx(0.1, abs=0.015)


def test_stratified_by_source_balances_every_file():
    small = canonical_frame(sft_records(40, cluster_size=2, prefix="small"), "raw/small.jsonl")
    large = canonical_frame(sft_records(1000, cluster_size=2, prefix="large"), "raw/large.jsonl")
    frame = pl.concat([small, large])
    # Both files ask the same templated questions (only the prefix differs), so prompt grouping would tie
    # rows of the two strata together; this test is about the cut within a stratum.
    config = SplitConfig(train=0.5, validation=0.25, test=0.25, stratify_by="source", group_prompts="off")
    rows, _ = assign_splits(frame.lazy(), config, seed=0)
    for file, expected in (("raw/small.jsonl", 40), ("raw/large.jsonl", 1000)):
        subset = rows.filter(pl.col("source").struct.field("file") == file)
        counts = dict(subset["split"].value_counts().iter_rows())
        assert sum(counts.values()) == expected
        # cut by row count within the stratum: off by at most one cluster (2 rows) per boundary
        assert abs(counts["train"] - expected * 0.5) <= 2
        assert abs(counts["validation"] - expected * 0.25) <= 2
    assert _clusters_per_split(rows, pl.col("dup_cluster")).filter(pl.col("splits") > 1).is_empty()


def test_stratify_by_unknown_column_is_a_config_error():
    with pytest.raises(ConfigError, match="stratify_by column 'topic'"):
        assign_splits(planted_frame(sft=20, pref=4).lazy(), SplitConfig(stratify_by="topic"), seed=0)


def test_fractions_must_sum_to_one():
    with pytest.raises(ValueError, match="must be 1"):
        SplitConfig(train=0.8, validation=0.1, test=0.2)


def test_minimum_validation_moves_whole_clusters_deterministically():
    frame = planted_frame(sft=90, pref=40, files=1)
    config = SplitConfig(train=0.98, validation=0.01, test=0.01, min_validation_rows=15, min_test_rows=6)
    rows, report = assign_splits(frame.lazy(), config, seed=0)
    counts = rows.group_by("kind", "split").len()
    for kind in ("sft", "preference"):
        get = lambda split: counts.filter((pl.col("kind") == kind) & (pl.col("split") == split))["len"].sum()  # noqa: E731
        assert get("validation") >= 15
        assert get("test") >= 6
        assert get("train") > 0
    assert _clusters_per_split(rows, pl.col("dup_cluster")).filter(pl.col("splits") > 1).is_empty()
    assert report["clusters_moved_for_minimum"]["validation"]["sft"] > 0
    again, _ = assign_splits(frame.lazy(), config, seed=0)
    assert again["split"].equals(rows["split"])


def _load(folder: Path) -> datasets.DatasetDict:
    return datasets.load_dataset(
        "parquet", data_files={split: str(folder / f"{split}-*.parquet") for split in SPLITS}
    )


def test_exports_load_with_datasets_in_trl_format(tmp_path):
    frame = planted_frame(sft=120, pref=60)
    config = SplitConfig(train=0.6, validation=0.2, test=0.2, save_to_disk=True, license="cc-by-4.0", max_shard_rows=25)
    rows, _ = assign_splits(frame.lazy(), config, seed=0)
    report = export_splits(rows, tmp_path, config, seed=0)

    sft = _load(tmp_path / "sft")
    assert sft.column_names["train"] == ["id", "messages", "source", "dup_cluster"]
    assert sum(len(sft[s]) for s in SPLITS) == 120
    example = sft["train"][0]
    assert example["messages"][0]["role"] == "user" and example["messages"][-1]["role"] == "assistant"
    assert set(example["source"]) == {"file", "row", "format"}
    train_shards = sorted(p.name for p in (tmp_path / "sft").glob("train-*.parquet"))
    expected_shards = -(-report["folders"]["sft"]["counts"]["train"] // 25)
    assert train_shards == [f"train-{i:05d}-of-{expected_shards:05d}.parquet" for i in range(expected_shards)]
    assert expected_shards > 1

    pref = _load(tmp_path / "pref")
    assert pref.column_names["test"] == ["id", "prompt", "chosen", "rejected", "source", "dup_cluster"]
    pair = pref["train"][0]
    assert pair["prompt"][-1]["role"] == "user"
    assert [m["role"] for m in pair["chosen"]] == ["assistant"] and [m["role"] for m in pair["rejected"]] == ["assistant"]

    on_disk = datasets.load_from_disk(str(tmp_path / "pref" / "hf_dataset"))
    assert {s: len(on_disk[s]) for s in SPLITS} == report["folders"]["pref"]["counts"]
    card = (tmp_path / "sft" / "README.md").read_text()
    assert 'license: "cc-by-4.0"' in card and "| train |" in card and "raw/support_0.jsonl" in card


def test_an_empty_split_has_no_shards_and_the_rest_loads(tmp_path):
    frame = planted_frame(sft=30, pref=6)
    config = SplitConfig(train=1.0, validation=0.0, test=0.0)
    rows, _ = assign_splits(frame.lazy(), config, seed=0)
    report = export_splits(rows, tmp_path, config, seed=0)
    assert report["folders"]["pref"]["splits_written"] == ["train"]
    assert sorted(p.name for p in (tmp_path / "pref").glob("*.parquet")) == ["train-00000-of-00001.parquet"]
    loaded = datasets.load_dataset("parquet", data_files={"train": str(tmp_path / "pref" / "train-*.parquet")})
    assert len(loaded["train"]) == 6
    card = (tmp_path / "pref" / "README.md").read_text()
    assert "split: train" in card and "split: validation" not in card


def test_incremental_keeps_existing_rows_and_sends_new_cluster_members_along(tmp_path):
    old = canonical_frame(sft_records(300, cluster_size=3), "raw/batch1.jsonl")
    # sft_records' prompts are one template with other prefixes and numbers, so the "new clusters" below
    # ask near-duplicates of old questions and prompt grouping would merge old clusters through them;
    # this test is about dup_cluster under previous splits, so prompt grouping is off.
    config = SplitConfig(train=0.6, validation=0.2, test=0.2, group_prompts="off")
    old_rows, _ = assign_splits(old.lazy(), config, seed=1)
    export_splits(old_rows, tmp_path / "v1", config, seed=1)

    # batch 2: one new member for each of the first 60 old clusters, plus 150 rows in new clusters
    joining = canonical_frame(
        [{**r, "messages": [r["messages"][0], {"role": "assistant", "content": r["messages"][1]["content"] + " (v2)"}]}
         for r in sft_records(180, cluster_size=3)[::3]],
        "raw/batch2.jsonl",
    )
    fresh = canonical_frame(sft_records(150, cluster_size=3, prefix="new"), "raw/batch2.jsonl")
    batch2 = pl.concat([joining, fresh])
    # a different seed and fractions would move everything, if the previous splits were not honoured
    config2 = SplitConfig(
        train=0.2, validation=0.4, test=0.4, seed=99, previous_splits=str(tmp_path / "v1"), group_prompts="off"
    )

    # (a) rerun on everything: every old row keeps its split
    rows, report = assign_splits(pl.concat([old, batch2]).lazy(), config2, seed=99)
    key = ["id", pl.col("source").struct.field("row").alias("r"), pl.col("source").struct.field("file").alias("f")]
    before = old_rows.select(*key, pl.col("split").alias("before"))
    after = rows.select(*key, "split").join(before, on=["id", "r", "f"])
    assert after.height == old.height and (after["split"] == after["before"]).all()
    cluster_split = dict(old_rows.select("dup_cluster", "split").unique().iter_rows())
    joined = rows.filter(pl.col("source").struct.field("file") == "raw/batch2.jsonl").join(joining.select("id"), on="id", how="semi")
    assert joined.height == 60
    assert all(cluster_split[c] == s for c, s in joined.select("dup_cluster", "split").iter_rows())
    assert report["previous"]["cluster_conflicts"] == 0
    assert _clusters_per_split(rows, pl.col("dup_cluster")).filter(pl.col("splits") > 1).is_empty()

    # (b) only the new batch: the exported splits carry the old rows over, new cluster members join them
    rows_b, _ = assign_splits(batch2.lazy(), config2, seed=99)
    report_b = export_splits(rows_b, tmp_path / "v2", config2, seed=99)
    assert report_b["folders"]["sft"]["carried_from_previous"] == old.height
    exported = read_exported(tmp_path / "v2" / "sft")
    assert exported.height == old.height + batch2.height
    assert _clusters_per_split(exported, pl.col("dup_cluster")).filter(pl.col("splits") > 1).is_empty()
    old_exported = exported.join(before.select("id", "before"), on="id")
    assert (old_exported["split"] == old_exported["before"]).all()


def test_incremental_merged_clusters_are_reported_and_old_rows_stay(tmp_path):
    records = sft_records(200, cluster_size=1)
    old = canonical_frame(records, "a.jsonl")
    config = SplitConfig(train=0.5, validation=0.25, test=0.25)
    old_rows, _ = assign_splits(old.lazy(), config, seed=0)
    export_splits(old_rows, tmp_path / "v1", config, seed=0)
    # a later dedup merges every old row into one cluster: earlier rows must still keep their split
    merged = old.with_columns(pl.lit("one-cluster").alias("dup_cluster"))
    rows, report = assign_splits(merged.lazy(), SplitConfig(previous_splits=str(tmp_path / "v1")), seed=0)
    assert report["previous"]["cluster_conflicts"] == 1
    assert rows.select("id", "split").sort("id").equals(old_rows.select("id", "split").sort("id"))


def test_incremental_new_answer_to_an_earlier_prompt_keeps_that_prompts_split(tmp_path):
    old = canonical_frame(sft_records(120, cluster_size=1), "a.jsonl")
    config = SplitConfig(train=0.5, validation=0.25, test=0.25)
    old_rows, _ = assign_splits(old.lazy(), config, seed=0)
    export_splits(old_rows, tmp_path / "v1", config, seed=0)
    # batch 2: a new answer (new id, its own dup_cluster) to every earlier prompt, with other fractions and
    # seed: each must follow its prompt's earlier split, or a validation question would be trained on
    new = canonical_frame(
        [{"messages": [r["messages"][0], {"role": "assistant", "content": f"A new agent's reply {i}, quite unlike the first."}],
          "dup_cluster": f"new-{i}"} for i, r in enumerate(sft_records(120, cluster_size=1))],
        "b.jsonl",
    )
    config2 = SplitConfig(train=0.2, validation=0.4, test=0.4, previous_splits=str(tmp_path / "v1"))
    rows, _ = assign_splits(new.lazy(), config2, seed=5)
    prompt = pl.col("messages").list.first().struct.field("content")
    before = old_rows.select(prompt.alias("p"), pl.col("split").alias("before"))
    after = rows.select(prompt.alias("p"), "split").join(before, on="p")
    assert after.height == new.height and (after["split"] == after["before"]).all()
    assert set(after["split"]) == {"train", "validation", "test"}


def test_planted_near_duplicates_never_cross_splits(tmp_path):
    """Planted near/exact duplicates (sample_data/planted.json) end up in one split with their
    originals; the same data split by row id instead does leak, so the test can tell."""
    inputs = [SAMPLE / "raw" / "support_alpaca.jsonl", SAMPLE / "raw" / "preferences.jsonl"]
    dedup = run_single_stage("dedup", {"save_index": False}, inputs, tmp_path / "dedup_run")
    stage = dedup.run_dir / "dedup"
    # the dedup stage tags clusters and drops duplicates; put the duplicates back to split all rows
    columns = ["id", "kind", "messages", "prompt", "chosen", "rejected", "source", "dup_cluster"]
    every_row = pl.concat([pl.read_parquet(stage / "data.parquet").select(columns), pl.read_parquet(stage / "dropped.parquet").select(columns)])
    every_row.write_parquet(tmp_path / "all.parquet")

    result = run_single_stage(
        "split", {"train": 0.5, "validation": 0.25, "test": 0.25}, [tmp_path / "all.parquet"], tmp_path / "split_run"
    )
    rows = pl.read_parquet(result.run_dir / "split" / "data.parquet")
    assert rows.height == every_row.height
    where = {(Path(f).name, r): s for f, r, s in rows.select(pl.col("source").struct.field("file"), pl.col("source").struct.field("row"), "split").iter_rows()}

    planted = json.loads((SAMPLE / "planted.json").read_text())["planted"]
    names = {p.name for p in inputs}
    pairs = [
        ((Path(p["file"]).name, p["row"]), (Path(p["source"]["file"]).name, p["source"]["row"]))
        for p in planted
        if p["kind"] in ("near_duplicate", "exact_duplicate") and Path(p["file"]).name in names
    ]
    found = [(a, b) for a, b in pairs if a in where and b in where]
    assert len(found) > 50
    crossing = [(a, b) for a, b in found if where[a] != where[b]]
    assert crossing == []

    def where_without_clusters(group_prompts: str) -> dict:
        config = SplitConfig(train=0.5, validation=0.25, test=0.25, cluster_column="none", group_prompts=group_prompts)
        by_id, _ = assign_splits(rows.drop("split").lazy(), config, seed=0)
        return {(Path(f).name, r): s for f, r, s in by_id.select(pl.col("source").struct.field("file"), pl.col("source").struct.field("row"), "split").iter_rows()}

    # split by row id alone, the planted copies leak ...
    where_by_id = where_without_clusters("off")
    assert any(where_by_id[a] != where_by_id[b] for a, b in found)
    # ... and prompt grouping alone already keeps most copies with their originals
    where_by_prompt = where_without_clusters("near")
    assert sum(where_by_prompt[a] != where_by_prompt[b] for a, b in found) < sum(where_by_id[a] != where_by_id[b] for a, b in found)


def test_pipeline_with_dedup_and_split_writes_datasets_cards_and_report(tmp_path):
    pipeline = {
        "name": "split-test",
        "seed": 5,
        "inputs": [{"path": str(SAMPLE / "raw" / "support_alpaca.jsonl")}, {"path": str(SAMPLE / "raw" / "preferences_hh.jsonl")}],
        "stages": [
            {"type": "dedup", "config": {"save_index": False}},
            {"type": "split", "config": {"train": 0.8, "validation": 0.1, "test": 0.1, "min_validation_rows": 30, "license": "apache-2.0"}},
        ],
    }
    result = run_pipeline(pipeline, run_dir=tmp_path / "run")
    run_dir = result.run_dir
    split_record = next(s for s in result.manifest["stages"] if s["type"] == "split")
    assert split_record["rows_in"] == split_record["rows_out"]
    counts = split_record["report"]["folders"]
    for folder in ("sft", "pref"):
        loaded = _load(run_dir / folder)
        assert {s: len(loaded[s]) for s in SPLITS} == counts[folder]["counts"]
        assert counts[folder]["counts"]["validation"] >= 30
        card = (run_dir / folder / "README.md").read_text()
        assert 'license: "apache-2.0"' in card
        assert result.manifest["pipeline"]["config_hash"] in card
        assert "| dedup | dedup |" in card and "near_duplicate" in card
    assert (run_dir / "report.html").exists()

    # same inputs and config → byte-identical shards
    again = run_pipeline(pipeline, run_dir=tmp_path / "run2").run_dir
    for path in sorted((run_dir / "sft").glob("*.parquet")) + sorted((run_dir / "pref").glob("*.parquet")):
        assert path.read_bytes() == (again / path.parent.name / path.name).read_bytes(), path.name


def test_cli_split_writes_folders_and_summarizes(tmp_path, capsys):
    source = tmp_path / "chats.jsonl"
    rows = [{"messages": r["messages"]} for r in sft_records(60, cluster_size=1)]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = main(["split", str(source), "--out", str(tmp_path / "out"), "--validation", "0.2", "--test", "0.2", "--seed", "4", "--quiet"])
    assert code == 0
    assert "splits" in capsys.readouterr().out
    loaded = _load(tmp_path / "out" / "sft")
    assert sum(len(loaded[s]) for s in SPLITS) == 60
    assert (tmp_path / "out" / "report.html").exists()
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    config = manifest["pipeline"]["config"]["stages"][0]["config"]
    assert (config["train"], config["validation"], config["test"], config["seed"]) == (pytest.approx(0.6), 0.2, 0.2, 4)


def test_cli_split_bad_fractions_is_a_one_line_error(tmp_path, capsys):
    source = tmp_path / "chats.jsonl"
    source.write_text(json.dumps({"messages": sft_records(1)[0]["messages"]}) + "\n")
    code = main(["split", str(source), "--out", str(tmp_path / "out"), "--train", "0.9", "--validation", "0.3", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "add up to more than 1" in err and "\n" not in err and "Traceback" not in err


def test_resplitting_replaces_an_existing_split_column():
    frame = planted_frame(sft=60, pref=10)
    once, _ = assign_splits(frame.lazy(), SplitConfig(train=0.5, validation=0.25, test=0.25), seed=0)
    twice, _ = assign_splits(once.lazy(), SplitConfig(train=0.5, validation=0.25, test=0.25), seed=1)
    assert twice.columns == once.columns
    assert twice.drop("split").equals(frame)
