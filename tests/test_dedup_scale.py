"""Dedup at scale (issue 13): dup_cluster = connected component, the candidate-explosion guard, the
out-of-core stage (same decisions as the in-memory path) and the Ray Data form (same decisions as
the local engine), on hand-written fixtures."""

from __future__ import annotations

import random
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from curate.dedup import DedupConfig, deduplicate
from curate.records import canonical_frame
from curate.split import SplitConfig, assign_splits
from curate.stage import StageContext, get_stage, parse_stage_config

WORDS = [f"{stem}{suffix}" for stem in ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf") for suffix in "abcdefghijklmnopqrstuvwxyz"]
# Word 1-grams make Jaccard easy to reason about: A={w0..w9}, B={w2..w11}, C={w4..w13} gives
# J(A,B) = J(B,C) = 8/12 ≥ 0.6 and J(A,C) = 6/14 < 0.6. 64 bands of 2 rows: every such pair a candidate.
CHAIN = {"shingle": "word", "ngram": 1, "threshold": 0.6, "bands": 64, "rows": 2}
DECISION_COLUMNS = ["id", "dup_cluster", "reason", "duplicate_of", "jaccard_estimated", "jaccard_verified"]


def chat(user: str, assistant: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], **extra}


def chain(tag: str) -> list[dict]:
    words = [f"{tag}{word}" for word in WORDS[:14]]
    return [chat(f"question {tag}", " ".join(words[start : start + 10])) for start in (0, 2, 4)]


def run_stage(frame: pl.DataFrame, config: dict, stage_dir: Path):
    spec = get_stage("dedup")
    ctx = StageContext(name="dedup", run_dir=stage_dir.parent, stage_dir=stage_dir, pipeline_dir=stage_dir.parent)
    typed = parse_stage_config(spec, {"save_index": False, **config}, "test")
    output = spec.run(frame.lazy(), typed, ctx)
    return output.kept.collect(), output.dropped.collect(), output.report


def mixed_records(seed: int = 7) -> list[dict]:
    """Unrelated rows, near copies, exact copies (case only), chains, preference pairs, and one
    templated family big enough for the bucket cap."""
    rng = random.Random(seed)
    records = []
    for index in range(40):
        words = rng.sample(WORDS, 12)
        records.append(chat(f"topic {index}", " ".join(words)))
        if index % 3 == 0:  # a near copy: one word changed
            records.append(chat(f"topic {index}", " ".join(words[:-1] + [rng.choice(WORDS)])))
        if index % 5 == 0:  # an exact copy after normalization
            records.append(chat(f"TOPIC {index}", " ".join(words).upper()))
    for tag in ("x", "y", "z"):
        records += chain(tag)
    for index in range(6):
        answer = " ".join(rng.sample(WORDS, 10))
        records.append({"prompt": f"help with item {index}", "chosen": answer, "rejected": "no"})
        records.append({"prompt": f"help with item {index}", "chosen": answer + " thanks", "rejected": "no"})
    template = " ".join(WORDS[100:115])
    records += [chat("status", f"{template} {WORDS[index % 20]}") for index in range(12)]
    rng.shuffle(records)
    return records


def decisions_of(kept: pl.DataFrame, dropped: pl.DataFrame) -> pl.DataFrame:
    both = pl.concat(
        [kept.with_columns(pl.lit(None, pl.String).alias("reason")).select("id", "dup_cluster", "reason"), dropped.select("id", "dup_cluster", "reason")]
    )
    details = dropped.select("id", "duplicate_of", "jaccard_estimated", "jaccard_verified")
    return both.join(details, on="id", how="left").select(DECISION_COLUMNS).sort("id")


def test_chain_is_one_cluster_with_both_ends_kept(tmp_path):
    frame = canonical_frame(chain("q"))
    a, b, c = frame["id"].to_list()
    kept, dropped, report = run_stage(frame, {**CHAIN, "keep": "earliest_source"}, tmp_path / "dedup")
    assert sorted(kept["id"].to_list()) == sorted([a, c])  # C is not a near duplicate of the kept A
    assert dropped["id"].to_list() == [b] and dropped["duplicate_of"].to_list() == [a]
    assert set(kept["dup_cluster"].to_list() + dropped["dup_cluster"].to_list()) == {a}
    assert report["clusters"] == 1 and report["cluster_size_histogram"] == {"3": 1}


def test_split_keeps_each_chain_in_one_split(tmp_path):
    # 30 chains; with a cluster of its own (the old star), C lands in A's split only by chance
    # (about 1/3 per chain with an even split), so all 30 together would fail nearly surely.
    records = [row for index in range(30) for row in chain(f"c{index}")]
    kept, _, _ = run_stage(canonical_frame(records), {**CHAIN, "keep": "earliest_source"}, tmp_path / "dedup")
    assert kept.height == 60
    config = SplitConfig(train=0.34, validation=0.33, test=0.33, group_prompts="off")
    assigned, _ = assign_splits(kept.lazy(), config, seed=0)
    per_cluster = assigned.group_by("dup_cluster").agg(pl.col("split").n_unique().alias("splits"), pl.len().alias("rows"))
    assert per_cluster.height == 30 and per_cluster["rows"].to_list() == [2] * 30
    assert per_cluster["splits"].max() == 1


def test_bucket_guard_caps_templated_buckets_and_reports_it(tmp_path):
    template = (
        "Thank you for contacting Example Support. We have received your request and a member of our team will "
        "get back to you within two business days. Please keep this reference for your records: "
    )
    records = [chat(f"ticket {index}", template + f"case {index} {random.Random(index).choice(WORDS)}") for index in range(3000)]
    phases = []
    spec = get_stage("dedup")
    ctx = StageContext(
        name="dedup", run_dir=tmp_path, stage_dir=tmp_path / "dedup", pipeline_dir=tmp_path,
        phase_progress=lambda phase, done, total, unit: phases.append((phase, done, total, unit)),
    )
    typed = parse_stage_config(spec, {"save_index": False, "max_bucket_pairs": 64}, "test")
    output = spec.run(canonical_frame(records).lazy(), typed, ctx)
    guard = output.report["lsh"]["bucket_guard"]
    assert guard["max_bucket_pairs"] == 64 and guard["capped_buckets"] >= 1
    assert guard["largest_bucket"] > 64 and guard["pairs_not_expanded"] > 100_000
    # linear, not quadratic: far fewer candidates than one uncapped 3000-row bucket's 4.5M pairs
    assert output.report["lsh"]["candidate_pairs"] < 3000 * 23
    # counted phases, each ending at its total
    finished = {phase: (done, total) for phase, done, total, unit in phases}
    assert finished["MinHash signatures"] == (3000, 3000)
    done, total = finished["verifying candidate pairs"]
    assert done == total == output.report["lsh"]["candidate_pairs"]
    assert not list((tmp_path / "dedup").glob("work*"))  # the work folder is gone


@pytest.mark.parametrize(
    "config",
    [
        {**CHAIN, "keep": "earliest_source", "max_bucket_pairs": 4},
        {**CHAIN, "keep": "longest_response", "skip_verify_margin": None},
        {"keep": "longest_response"},
        {**CHAIN, "verify": False},
    ],
)
def test_out_of_core_stage_decides_exactly_as_in_memory(tmp_path, config, monkeypatch):
    import curate.dedup.stream as stream

    monkeypatch.setattr(stream, "BATCH_ROWS", 17)  # many batches, cut anywhere
    monkeypatch.setattr(stream, "VERIFY_PAIRS", 5)
    # Verification's steps estimate through the mapped file, clustering's many pairs through read_rows.
    monkeypatch.setattr(stream, "GATHER_PAIRS", 6)
    monkeypatch.setattr(stream, "READ_BLOCK_ROWS", 13)
    frame = canonical_frame(mixed_records())
    kept, dropped, report = run_stage(frame, config, tmp_path / "dedup")
    outcome = deduplicate(frame.with_row_index("__row"), DedupConfig.model_validate({"save_index": False, **config}))
    expected = frame.with_row_index("__row").join(outcome.decisions, on="__row").select(DECISION_COLUMNS).sort("id")
    assert dropped.height > 10
    assert decisions_of(kept, dropped).equals(expected)
    assert report["lsh"] == outcome.report["lsh"] and report["largest_clusters"] == outcome.report["largest_clusters"]


def test_out_of_core_index_equals_in_memory_index(tmp_path):
    from curate.dedup import MinHashIndex

    frame = canonical_frame(mixed_records())
    config = DedupConfig.model_validate({**CHAIN})
    run_stage(frame, {**CHAIN, "save_index": True}, tmp_path / "dedup")
    saved = MinHashIndex.load(tmp_path / "dedup" / "index", config.settings())
    built = deduplicate(frame.with_row_index("__row"), config).index
    assert saved.records.equals(built.records)
    assert saved.band_table.cast(built.band_table.schema).equals(built.band_table)


# ------------------------------------------------------------------------------------------------
# Ray Data form


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("config", [{**CHAIN, "keep": "earliest_source", "max_bucket_pairs": 4}, {"keep": "longest_response"}])
def test_distributed_dedup_decides_exactly_as_local(ray_cluster, tmp_path, config):
    import ray.data

    from curate.dedup.distributed import dedup_distributed

    frame = canonical_frame(mixed_records())
    local_kept, local_dropped, local_report = run_stage(frame, {**config, "save_index": True}, tmp_path / "local")
    dataset = ray.data.from_arrow(frame.to_arrow()).repartition(5)
    ctx = StageContext(name="dedup", run_dir=tmp_path, stage_dir=tmp_path / "ray", pipeline_dir=tmp_path)
    typed = DedupConfig.model_validate({**config, "save_index": True})
    kept_ds, dropped_ds, report = dedup_distributed(dataset, typed, ctx)
    kept = pl.from_arrow(pa.concat_tables(ray_cluster.get(kept_ds.to_arrow_refs())))
    dropped = pl.from_arrow(pa.concat_tables(ray_cluster.get(dropped_ds.to_arrow_refs())))
    assert decisions_of(kept, dropped).equals(decisions_of(local_kept, local_dropped))
    assert kept.columns == local_kept.columns and dropped.columns == local_dropped.columns
    assert kept["id"].to_list() == local_kept["id"].to_list()  # input order kept
    for key in ("rows_in", "kept", "exact_duplicates", "near_duplicates", "clusters", "cluster_size_histogram", "largest_clusters"):
        assert report[key] == local_report[key], key
    assert report["lsh"]["bucket_guard"] == local_report["lsh"]["bucket_guard"]
    assert report["lsh"]["candidate_pairs"] == local_report["lsh"]["candidate_pairs"]
    assert pl.read_parquet(tmp_path / "ray" / "index" / "records.parquet").equals(pl.read_parquet(tmp_path / "local" / "index" / "records.parquet"))


def test_distributed_dedup_refuses_a_saved_index(ray_cluster, tmp_path):
    import ray.data

    from curate.dedup.distributed import dedup_distributed
    from curate.errors import ConfigError

    ctx = StageContext(name="dedup", run_dir=tmp_path, stage_dir=tmp_path / "ray", pipeline_dir=tmp_path)
    with pytest.raises(ConfigError, match="not supported with --engine ray yet"):
        dedup_distributed(ray.data.from_items([{"a": 1}]), DedupConfig(index_path=str(tmp_path)), ctx)


def path_records(tag: str, length: int) -> list[dict]:
    """`length` rows in a path: each shares 8 of its 10 words with the next (J = 8/12 ≥ 0.6), rows
    two apart share 6 (J = 6/14 < 0.6), so the graph is one long chain, not a clique."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = [f"{tag}{letters[index // 26]}{letters[index % 26]}" for index in range(2 * length + 10)]  # no digits: numbers are normalized
    return [chat(f"question {tag}", " ".join(words[2 * start : 2 * start + 10])) for start in range(length)]


def test_distributed_components_of_long_chains_decide_exactly_as_local(ray_cluster, tmp_path, monkeypatch):
    """A 40-row path and shorter ones, shuffled: the component labels need several large-star /
    small-star rounds, and the keep decisions per component must equal the local engine's."""
    import ray.data

    import curate.dedup.distributed as distributed
    from curate.dedup.distributed import dedup_distributed

    monkeypatch.setattr(distributed, "KEYS_PER_PARTITION", 500)  # ~16 shuffle partitions: components cross them

    records = path_records("p", 40) + path_records("q", 7) + path_records("r", 3) + mixed_records()[:30]
    random.Random(3).shuffle(records)
    frame = canonical_frame(records)
    config = {**CHAIN, "keep": "longest_response"}
    local_kept, local_dropped, local_report = run_stage(frame, config, tmp_path / "local")
    ctx = StageContext(name="dedup", run_dir=tmp_path, stage_dir=tmp_path / "ray", pipeline_dir=tmp_path)
    kept_ds, dropped_ds, report = dedup_distributed(ray.data.from_arrow(frame.to_arrow()).repartition(4), DedupConfig.model_validate(config), ctx)
    kept = pl.from_arrow(pa.concat_tables(ray_cluster.get(kept_ds.to_arrow_refs())))
    dropped = pl.from_arrow(pa.concat_tables(ray_cluster.get(dropped_ds.to_arrow_refs())))
    assert decisions_of(kept, dropped).equals(decisions_of(local_kept, local_dropped))
    long_chain = frame.join(pl.concat([kept, dropped], how="diagonal").select("id", "dup_cluster"), on="id").filter(
        pl.col("messages").list.first().struct.field("content") == "question p"
    )
    assert long_chain["dup_cluster"].n_unique() == 1 and long_chain.height == 40  # one component
    # The 40-row path alone, as verified edges: several large-star / small-star rounds, same labels.
    from curate.dedup.ray_components import component_labels

    order = random.Random(5).sample(range(40), 40)
    edges = ray.data.from_arrow(pa.table({"a": pa.array(order[:-1], pa.uint32()), "b": pa.array(order[1:], pa.uint32())}))
    labels, rounds = component_labels(edges, 4)
    found = labels.take_all()
    assert rounds >= 3 and len(found) == 40 and {row["component"] for row in found} == {0}
    for key in ("components", "chain_splits", "clustering_rounds", "verified_pairs"):
        assert report["lsh"][key] == local_report["lsh"][key], key
