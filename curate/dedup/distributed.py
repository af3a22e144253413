"""The dedup stage on a Ray cluster (Ray Data): the same decisions as the local engine.

1. **Row ids.** The input's blocks, in order, get `__row` = the row's position (as the local engine's
   row index), from the blocks' row counts: ties in the keep policy and the order of nodes in a bucket
   depend on it.
2. **Sketches** (`map_batches`, Arrow batches into Polars): features, shingle sets, MinHash signatures,
   per row; the very functions the local engine runs per batch.
3. **Exact duplicates**: a shuffle by key hash (`groupby(partition).map_groups`, each partition a
   vectorized group-by), best row per key kept.
4. **Candidates**: band keys of the surviving rows, shuffled by band key into partitions; each
   partition finds its buckets' pairs with `banding.candidate_pairs` (same cap), pairs de-duplicated
   by a shuffle on the pair.
5. **Verification**: the pairs joined with both rows' sketches (`Dataset.join`), similarity per batch.
6. **Components and keep decisions** on the cluster (`curate.dedup.ray_components`): large-star /
   small-star rounds over the verified edges, then one shuffle of the components' rows and pairs by
   component, each partition running the local greedy keep over its whole components.
7. **Join back**: the decisions of the rows that have one (duplicates and component members) are
   broadcast to a `map_batches` over the input, which splits kept from dropped rows.

A saved index (`index_path`) and Redis are refused with `--engine ray` (one-line ConfigError); the
index of this run (`save_index`) is written by the driver from the kept rows' sketches, streamed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from curate.dedup.banding import BucketGuard, band_hashes, candidate_pairs, sorted_unique
from curate.dedup.config import DedupConfig
from curate.dedup.pipeline import PART_COLUMNS, features_of, lsh_settings_report
from curate.dedup.signatures import minhash_signatures
from curate.dedup.text import PART_NAMES, ShingleSets, hash_code
from curate.dedup.verify import NodeFeatures
from curate.errors import ConfigError

SKETCH_COLUMNS = ["__row", "id", "__keep", "key_hash", "number_hash", "digits_hash", "multipart"]
KEYS_PER_PARTITION = 2_000_000  # band keys per shuffle partition


# --------------------------------------------------------------------------------------------------
# Row-local steps (run on workers)


def _with_row_index(dataset):
    import ray

    @ray.remote
    def add_index(block, offset: int) -> pa.Table:
        table = pl.from_arrow(block) if isinstance(block, pa.Table) else pl.from_pandas(block)
        return table.with_row_index("__row", offset=offset).to_arrow()

    materialized = dataset.materialize()
    refs, offset = [], 0
    for bundle in materialized.iter_internal_ref_bundles():
        for entry in bundle.blocks:
            block_ref, metadata = (entry.ref, entry.metadata) if hasattr(entry, "ref") else entry
            refs.append(add_index.remote(block_ref, offset))
            offset += metadata.num_rows
    if not refs:
        return materialized, 0
    return ray.data.from_arrow_refs(refs), offset


def _sketch_batch(table: pa.Table, config: dict) -> pa.Table:
    from curate.dedup.stream import _batch_sets

    dedup_config = DedupConfig.model_validate(config)
    settings = dedup_config.settings()
    features = features_of(pl.from_arrow(table).lazy(), dedup_config).collect()
    sets, part_sets = _batch_sets(features, dedup_config)
    signatures = minhash_signatures(sets.values, sets.sizes, settings.num_perm, settings.seed)
    out = features.select(*SKETCH_COLUMNS[:-1], pl.col(PART_COLUMNS[1]).is_not_null().alias("multipart")).with_columns(
        pl.Series("signature", np.ascontiguousarray(signatures).ravel()).reshape((features.height, settings.num_perm)).arr.to_list(),
        sets.to_lists().alias("shingles"),
        *[part.to_lists().alias(f"shingles_{name}") for part, name in zip(part_sets, PART_NAMES)],
    )
    return out.to_arrow()


def _band_keys_batch(table: pa.Table, config: dict, dropped_rows: np.ndarray, partitions: int) -> pa.Table:
    dedup_config = DedupConfig.model_validate(config)
    bands, band_rows = dedup_config.band_params()
    frame = pl.from_arrow(table)
    rows = frame["__row"].to_numpy()
    keep = ~np.isin(rows, dropped_rows) & (frame["shingles"].list.len().to_numpy() > 0)
    # A fixed-width array column to a 2-D numpy block: no Python list per row.
    signatures = frame["signature"].list.to_array(dedup_config.num_perm).to_numpy().astype(np.uint32)[keep] if keep.any() else None
    if signatures is None:
        return pa.table({"node": pa.array([], pa.uint32()), "band_hash": pa.array([], pa.uint64()), "partition": pa.array([], pa.int64())})
    hashes = band_hashes(signatures, bands, band_rows)
    return pa.table(
        {
            "node": np.repeat(rows[keep], bands).astype(np.uint32),
            "band_hash": hashes.ravel(),
            "partition": (hashes.ravel() % np.uint64(partitions)).astype(np.int64),
        }
    )


def _bucket_pairs(table: pa.Table, cap: int) -> pa.Table:
    """Candidate pairs of the buckets in one shuffle partition (all of a bucket's keys are here)."""
    guard = BucketGuard()
    frame = pl.from_arrow(table).select("node", pl.lit(0, pl.UInt16).alias("band"), "band_hash")
    left, right = candidate_pairs(frame, cap, guard=guard)
    keys = (left.astype(np.uint64) << np.uint64(32)) | right.astype(np.uint64)
    return _pairs_table(keys, guard)


def _pairs_table(keys: np.ndarray, guard: BucketGuard) -> pa.Table:
    """Pairs as a table, the partition's guard counts riding on the first row (or one null pair)."""
    stats = guard.as_dict()
    count = max(len(keys), 1)
    columns: dict[str, Any] = {"pair": pa.array(keys if len(keys) else [None], pa.uint64())}
    for name, value in stats.items():
        values = np.zeros(count, dtype=np.int64)
        values[0] = value
        columns[name] = values
    return pa.table(columns)


def _exact_partition(table: pa.Table) -> pa.Table:
    """Rows whose key another row of higher keep priority shares: (row, rep row, rep id)."""
    frame = pl.from_arrow(table).sort(["__keep", "__row"], descending=[True, False], nulls_last=True)
    frame = frame.with_columns(pl.col("__row").first().over("key_hash").alias("rep"), pl.col("id").first().over("key_hash").alias("rep_id"))
    return frame.filter(pl.col("rep") != pl.col("__row")).select("__row", "rep", "rep_id").to_arrow()


def _similarity_batch(table: pa.Table, config: dict) -> pa.Table:
    """Similarity of each joined pair (left columns `*_l`, right `*_r`), as the local verification."""
    dedup_config = DedupConfig.model_validate(config)
    frame = pl.from_arrow(table)
    k = frame.height
    nodes = _node_features(
        pl.concat([_side(frame, "_l"), _side(frame, "_r")], how="vertical_relaxed"), dedup_config.num_perm
    )
    a, b = np.arange(k), np.arange(k) + k
    similarity = np.zeros(k, dtype=np.float64)
    worth = np.ones(k, dtype=bool)
    if dedup_config.verify and dedup_config.skip_verify_margin is not None:
        worth = nodes.estimated(a, b) >= dedup_config.threshold - dedup_config.skip_verify_margin
    similarity[worth] = nodes.similarity(a[worth], b[worth], dedup_config.verify, dedup_config.merge_number_variants)
    # The join keys (`left`, `right`: row ids) are the pair's columns; the sides' own ids merged into them.
    return pa.table({"left": frame["left"].to_numpy(), "right": frame["right"].to_numpy(), "similarity": similarity, "skipped": ~worth})


def _side(frame: pl.DataFrame, suffix: str) -> pl.DataFrame:
    columns = ["multipart", "number_hash", "digits_hash", "signature", "shingles", *[f"shingles_{name}" for name in PART_NAMES]]
    return frame.select(pl.col(f"{name}{suffix}").alias(name) for name in columns)


def _node_features(frame: pl.DataFrame, num_perm: int) -> NodeFeatures:
    n = frame.height
    signatures = np.asarray(frame["signature"].explode().to_numpy(), dtype=np.uint32).reshape(n, num_perm) if n else np.empty((0, num_perm), np.uint32)
    return NodeFeatures(
        signatures=np.ascontiguousarray(signatures),
        sets=ShingleSets.from_lists(frame["shingles"]),
        part_sets=[ShingleSets.from_lists(frame[f"shingles_{name}"]) for name in PART_NAMES],
        multipart=frame["multipart"].to_numpy(),
        number_code=hash_code(frame["number_hash"]),
        digits_code=hash_code(frame["digits_hash"]),
    )


def _apply_decisions(table: pa.Table, decisions: pl.DataFrame, side: str, stage: str) -> pa.Table:
    frame = pl.from_arrow(table).drop("dup_cluster", strict=False)
    joined = frame.join(decisions, on="__row", how="left", maintain_order="left").with_columns(
        pl.col("dup_cluster").fill_null(pl.col("id"))
    )
    if side == "kept":
        return joined.filter(pl.col("reason").is_null()).drop("__row", "reason", "duplicate_of", "jaccard_estimated", "jaccard_verified").to_arrow()
    return joined.filter(pl.col("reason").is_not_null()).drop("__row").with_columns(pl.lit(stage).alias("stage")).to_arrow()


# --------------------------------------------------------------------------------------------------
# The driver


def dedup_distributed(dataset, config: DedupConfig, ctx) -> tuple[Any, Any, dict]:
    """(kept, dropped, report) of the dedup stage over a Ray Dataset; see the module docstring."""
    if config.index_path or config.redis is not None:
        raise ConfigError(f"stage {ctx.name!r}: dedup index_path / redis are not supported with --engine ray yet")
    from ray.data import DataContext

    DataContext.get_current().execution_options.preserve_order = True
    options = config.model_dump(mode="json")
    indexed, total = _with_row_index(dataset)
    with ctx.phase("MinHash signatures", total=total, unit="rows") as phase:
        sketches = indexed.map_batches(_sketch_batch, batch_format="pyarrow", fn_kwargs={"config": options}).materialize()
        phase.advance(total)
    partitions = max(1, total * config.band_params()[0] // KEYS_PER_PARTITION)
    exact = _exact_duplicates(sketches, partitions) if config.exact else pl.DataFrame(schema={"__row": pl.UInt32, "rep": pl.UInt32, "rep_id": pl.String})
    lsh = lsh_settings_report(config)
    near = None
    if config.near:
        near = _near_duplicates(sketches, exact, config, options, partitions, ctx)
        lsh.update(near["report"])
    else:
        lsh["bucket_guard"] = {"max_bucket_pairs": config.max_bucket_pairs, **BucketGuard().as_dict()}
    decisions = _decisions(exact, near)
    kept = indexed.map_batches(_apply_decisions, batch_format="pyarrow", fn_kwargs={"decisions": decisions, "side": "kept", "stage": ctx.name})
    dropped = indexed.map_batches(_apply_decisions, batch_format="pyarrow", fn_kwargs={"decisions": decisions, "side": "dropped", "stage": ctx.name})
    report = _report(total, exact, near, decisions, lsh, config, _raw_texts(indexed, config))
    if config.save_index:
        report["index"] = _save_index(sketches, decisions, config, ctx)
    return kept, dropped, report


def _exact_duplicates(sketches, partitions: int) -> pl.DataFrame:
    keyed = sketches.select_columns(["__row", "id", "__keep", "key_hash"]).map_batches(
        lambda table: pl.from_arrow(table).with_columns(
            (pl.col("key_hash").str.slice(0, 15).str.to_integer(base=16) % partitions).alias("partition")
        ).to_arrow(),
        batch_format="pyarrow",
    )
    found = keyed.groupby("partition", num_partitions=partitions).map_groups(_exact_partition, batch_format="pyarrow")
    tables = [pl.from_arrow(batch) for batch in found.iter_batches(batch_format="pyarrow", batch_size=None)]
    return pl.concat(tables).sort("__row") if tables else pl.DataFrame(schema={"__row": pl.UInt32, "rep": pl.UInt32, "rep_id": pl.String})


def _near_duplicates(sketches, exact: pl.DataFrame, config: DedupConfig, options: dict, partitions: int, ctx) -> dict:
    dropped_rows = exact["__row"].to_numpy()
    keys = sketches.map_batches(
        _band_keys_batch, batch_format="pyarrow", fn_kwargs={"config": options, "dropped_rows": dropped_rows, "partitions": partitions}
    )
    buckets = keys.groupby("partition", num_partitions=partitions).map_groups(_bucket_pairs, batch_format="pyarrow", fn_kwargs={"cap": config.max_bucket_pairs})
    guard, pair_keys = BucketGuard(), []
    for batch in buckets.iter_batches(batch_format="pyarrow", batch_size=None):
        frame = pl.from_arrow(batch)
        guard.add(BucketGuard(**{name: int(frame[name].sum()) for name in ("capped_buckets", "capped_rows", "pairs_not_expanded")}, largest_bucket=int(frame["largest_bucket"].max() or 0)))
        pair_keys.append(frame["pair"].drop_nulls().to_numpy())
    # Pairs (8 bytes each) are merged here; the pairs' sketches stay on the cluster.
    merged = sorted_unique(np.concatenate(pair_keys)) if pair_keys else np.empty(0, np.uint64)
    left, right = (merged >> np.uint64(32)).astype(np.int64), (merged & np.uint64(0xFFFFFFFF)).astype(np.int64)
    measured = _verify(sketches, left, right, options, partitions, ctx) if len(left) else None
    return _cluster(sketches, measured, int(len(left)), config, options, partitions, guard, ctx)


def _verify(sketches, left: np.ndarray, right: np.ndarray, options: dict, partitions: int, ctx):
    """The candidate pairs with their similarity (`left`, `right`, `similarity`, `skipped`), a
    materialized Dataset: the pairs' sketches are joined to them on the cluster."""
    import ray

    columns = ["__row", "multipart", "number_hash", "digits_hash", "signature", "shingles", *[f"shingles_{name}" for name in PART_NAMES]]
    side = sketches.select_columns(columns)
    pairs = ray.data.from_arrow(pa.table({"left": left.astype(np.uint32), "right": right.astype(np.uint32)}))
    rename = lambda suffix: (lambda table: table.rename_columns([f"{name}{suffix}" for name in table.column_names]))  # noqa: E731
    with_left = pairs.join(side.map_batches(rename("_l"), batch_format="pyarrow"), "inner", partitions, on=("left",), right_on=("__row_l",))
    both = with_left.join(side.map_batches(rename("_r"), batch_format="pyarrow"), "inner", partitions, on=("right",), right_on=("__row_r",))
    with ctx.phase("verifying candidate pairs", total=len(left), unit="pairs") as phase:
        measured = both.map_batches(_similarity_batch, batch_format="pyarrow", fn_kwargs={"config": options}).materialize()
        phase.advance(len(left))
    return measured


def _cluster(sketches, measured, candidates: int, config: DedupConfig, options: dict, partitions: int, guard: BucketGuard, ctx) -> dict:
    """Components (large-star / small-star rounds) and keep decisions per component, on the cluster."""
    from curate.dedup.ray_components import DECISION_SCHEMA, component_labels, keep_decisions, verified_edges

    # The same keys as the local engine's report (the engines' stage records are compared byte for byte);
    # the propagation rounds are counted on the progress phase instead.
    report = {"candidate_pairs": candidates, "verified_pairs": 0, "components": 0, "chain_splits": 0, "clustering_rounds": 0}
    report["verify"] = config.verify
    report["bucket_guard"] = {"max_bucket_pairs": config.max_bucket_pairs, **guard.as_dict()}
    decided = pl.DataFrame(schema=DECISION_SCHEMA)
    if candidates:
        if config.verify and config.skip_verify_margin is not None:
            report["skipped_by_estimate"] = int(measured.sum("skipped") or 0)
        edges = measured.map_batches(verified_edges, batch_format="pyarrow", fn_kwargs={"threshold": config.threshold}).materialize()
        report["verified_pairs"] = edges.count()
        if report["verified_pairs"]:
            with ctx.phase("connected components", total=None, unit="rounds") as phase:
                labels, _ = component_labels(edges, partitions, phase.advance)
            with ctx.phase("keep decisions", total=None, unit="rows"):
                decided, stats = keep_decisions(sketches, labels, measured, config, options, partitions)
            report.update(stats, components=int(decided["dup_cluster"].n_unique()))
    members = decided.filter(pl.col("reason").is_not_null()).drop("dup_cluster")
    return {"report": report, "members": members, "clusters": decided.select("__row", "dup_cluster")}


def _decisions(exact: pl.DataFrame, near: dict | None) -> pl.DataFrame:
    """The rows that have a decision: duplicates, component members, exact representatives."""
    clusters = near["clusters"] if near else pl.DataFrame(schema={"__row": pl.UInt32, "dup_cluster": pl.String})
    members = near["members"] if near else pl.DataFrame(schema={"__row": pl.UInt32, "reason": pl.String, "duplicate_of": pl.String, "jaccard_estimated": pl.Float64, "jaccard_verified": pl.Float64})
    exact = exact.with_columns(pl.col("__row").cast(pl.UInt32), pl.col("rep").cast(pl.UInt32))
    # Exact duplicates follow their representative's final cluster (its component's, or its own id).
    exact_rows = exact.join(clusters.rename({"__row": "rep"}), on="rep", how="left").select(
        "__row",
        pl.col("dup_cluster").fill_null(pl.col("rep_id")),
        pl.lit("exact_duplicate").alias("reason"),
        pl.col("rep_id").alias("duplicate_of"),
        pl.lit(1.0).alias("jaccard_estimated"),
        pl.lit(1.0).alias("jaccard_verified"),
    )
    reps = exact.select(pl.col("rep").alias("__row"), pl.col("rep_id").alias("dup_cluster")).unique("__row")
    reps = reps.join(clusters, on="__row", how="anti")
    near_rows = clusters.join(members, on="__row", how="left")
    detail = ["reason", "duplicate_of", "jaccard_estimated", "jaccard_verified"]
    schema = {"__row": pl.UInt32, "dup_cluster": pl.String, "reason": pl.String, "duplicate_of": pl.String, "jaccard_estimated": pl.Float64, "jaccard_verified": pl.Float64}
    parts = [
        exact_rows,
        near_rows.select("__row", "dup_cluster", *detail),
        reps.with_columns(*[pl.lit(None, schema[name]).alias(name) for name in detail]),
    ]
    return pl.concat([part.cast(schema) for part in parts]).sort("__row")


def _raw_texts(indexed, config: DedupConfig):
    from curate.dedup.text import key_text

    settings = config.settings()

    def read(chosen: list[int]) -> list[str]:
        raw = key_text(settings.key, settings.include_system, settings.preference_key)
        tables = [
            pl.from_arrow(batch).filter(pl.col("__row").is_in(chosen)).select("__row", raw.alias("raw"))
            for batch in indexed.iter_batches(batch_format="pyarrow", batch_size=None)
        ]
        found = pl.concat(tables)
        lookup = dict(zip(found["__row"].to_list(), found["raw"].to_list()))
        return [lookup[row] for row in chosen]

    return read


def _report(total: int, exact: pl.DataFrame, near: dict | None, decisions: pl.DataFrame, lsh: dict, config: DedupConfig, examples) -> dict:
    from curate.dedup.pipeline import cluster_report

    near_dropped = near["members"].height if near else 0
    return {
        "rows_in": total,
        "kept": total - exact.height - near_dropped,
        "exact_duplicates": exact.height,
        "near_duplicates": near_dropped,
        **cluster_report(decisions, config, examples),
        "settings": config.settings().as_dict(),
        "lsh": lsh,
        "keep": config.keep,
    }


def _save_index(sketches, decisions: pl.DataFrame, config: DedupConfig, ctx) -> dict:
    from curate.dedup.stream import write_index

    def kept_records():
        for batch in sketches.iter_batches(batch_format="pyarrow", batch_size=None):
            frame = pl.from_arrow(batch).join(decisions.select("__row", "dup_cluster", "reason"), on="__row", how="left", maintain_order="left")
            frame = frame.filter(pl.col("reason").is_null()).with_columns(pl.col("dup_cluster").fill_null(pl.col("id")))
            multipart = pl.col("multipart")
            yield frame.select(
                "id", "dup_cluster", "key_hash", "number_hash", "digits_hash",
                pl.col("signature").list.to_array(config.num_perm).cast(pl.Array(pl.UInt32, config.num_perm)),
                pl.col("shingles").cast(pl.List(pl.UInt32)),
                *[pl.when(multipart).then(pl.col(f"shingles_{name}")).cast(pl.List(pl.UInt32)).alias(f"shingles_{name}") for name in PART_NAMES],
            )

    target = ctx.stage_dir / "index"
    report = write_index(kept_records(), config, target, ctx.phase)
    return {**report, "path": str(target)}
