"""Connected components and keep decisions of the dedup stage on a Ray cluster (Ray Data).

**Components: alternating large-star / small-star** (Kiveris et al., "Connected Components in
MapReduce and Beyond", 2014), over the verified edges (pairs of row ids) as a Ray Dataset. Each
operation is one shuffle of the edges by a node id; every shuffle partition runs the operation
vectorized (Polars) over all its nodes:

- *large-star*: every node `u` links each neighbour `v > u` to `m(u)`, the smallest of `u` and its
  neighbours;
- *small-star*: every node `u` links itself and each neighbour `v < u` to the smallest of them.

Both keep the components and shrink their depth; the edges converge to one star per component whose
centre is the component's smallest row id. A large-star pass also counts the nodes that break "star
forest" (a node with a smaller and a larger neighbour, or with two smaller ones); when it counts
none, its input was already the final stars and the rounds stop (O(log n) rounds, counted on the
`connected components` progress phase). A last pass labels every node with its component (the smallest of itself and its
neighbours, on the stars).

**Keep decisions**: each component's greedy keep (`clusters.greedy_clusters`) is independent of the
others, so the rows of the components (their sketches) and the candidate pairs that start at them
are shuffled together by component (`groupby(partition).map_groups`, several whole components per
partition) and each partition runs the local engine's very code over its components. Only the
decisions of the rows in a component come back to the driver.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa

from curate.dedup.clusters import component_leaders, greedy_clusters
from curate.dedup.config import DedupConfig
from curate.dedup.pipeline import VerifiedPairs
from curate.dedup.text import PART_NAMES

EDGES_PER_PARTITION = 2_000_000  # edge rows per shuffle partition
NODE_COLUMNS = ["__row", "id", "__keep", "multipart", "number_hash", "digits_hash", "signature", "shingles", *[f"shingles_{name}" for name in PART_NAMES]]
DECISION_SCHEMA = {
    "__row": pl.UInt32,
    "dup_cluster": pl.String,
    "reason": pl.String,
    "duplicate_of": pl.String,
    "jaccard_estimated": pl.Float64,
    "jaccard_verified": pl.Float64,
}


# --------------------------------------------------------------------------------------------------
# Components (run per shuffle partition on workers)


def _both_directions(table: pa.Table, partitions: int) -> pa.Table:
    """Each undirected edge (a, b) as (u=a, v=b) and (u=b, v=a), keyed by u's partition."""
    frame = pl.from_arrow(table)
    both = pl.concat([frame.select(pl.col("a").alias("u"), pl.col("b").alias("v")), frame.select(pl.col("b").alias("u"), pl.col("a").alias("v"))])
    return both.with_columns((pl.col("u") % partitions).cast(pl.Int64).alias("partition")).to_arrow()


def _larger_first(table: pa.Table, partitions: int) -> pa.Table:
    """Each undirected edge as (u=larger end, v=smaller end), keyed by u's partition."""
    frame = pl.from_arrow(table).select(pl.max_horizontal("a", "b").alias("u"), pl.min_horizontal("a", "b").alias("v"))
    return frame.with_columns((pl.col("u") % partitions).cast(pl.Int64).alias("partition")).to_arrow()


def _neighbourhoods(table: pa.Table) -> tuple[pl.DataFrame, pl.DataFrame]:
    edges = pl.from_arrow(table).select("u", "v").unique()
    per_node = edges.group_by("u").agg(
        pl.min_horizontal(pl.col("v").min(), pl.col("u").first()).alias("m"),
        (pl.col("v") < pl.col("u")).sum().alias("smaller"),
        (pl.col("v") > pl.col("u")).sum().alias("larger"),
    )
    return edges, per_node


def _large_star(table: pa.Table) -> pa.Table:
    """Large-star over one partition's nodes, with the count of nodes that break "star forest"."""
    edges, per_node = _neighbourhoods(table)
    violations = per_node.filter(((pl.col("smaller") > 0) & (pl.col("larger") > 0)) | (pl.col("smaller") > 1)).height
    out = edges.join(per_node, on="u").filter(pl.col("v") > pl.col("u")).select(pl.col("v").alias("a"), pl.col("m").alias("b"))
    return _with_count(out, "violations", violations)


def _small_star(table: pa.Table) -> pa.Table:
    """Small-star over one partition's nodes (edges arrive larger end first)."""
    edges, per_node = _neighbourhoods(table)
    linked = pl.concat([edges.select("u", pl.col("v").alias("node")), per_node.select("u", pl.col("u").alias("node"))])
    out = linked.join(per_node.select("u", "m"), on="u").filter(pl.col("node") != pl.col("m"))
    return out.select(pl.col("node").alias("a"), pl.col("m").alias("b")).unique().to_arrow()


def _node_labels(table: pa.Table) -> pa.Table:
    """On the final stars: every node's component, the smallest of itself and its neighbours."""
    _, per_node = _neighbourhoods(table)
    return per_node.select(pl.col("u").alias("__row"), pl.col("m").alias("component")).to_arrow()


def _with_count(frame: pl.DataFrame, name: str, value: int) -> pa.Table:
    """Edges (a, b) with a partition's count riding on the first row (or on one null edge)."""
    if frame.height == 0:
        frame = pl.DataFrame({"a": [None], "b": [None]}, schema={"a": pl.UInt32, "b": pl.UInt32})
    counts = np.zeros(frame.height, dtype=np.int64)
    counts[0] = value
    return frame.with_columns(pl.Series(name, counts)).to_arrow()


def _edges_only(table: pa.Table) -> pa.Table:
    return pl.from_arrow(table).select("a", "b").drop_nulls().to_arrow()


def verified_edges(table: pa.Table, threshold: float) -> pa.Table:
    """The measured pairs at or above the threshold, as edges (a, b)."""
    frame = pl.from_arrow(table).filter(pl.col("similarity") >= threshold)
    return frame.select(pl.col("left").alias("a"), pl.col("right").alias("b")).to_arrow()


def component_labels(edges, partitions: int, advance=lambda rounds: None) -> tuple[Any, int]:
    """(Dataset of `__row`, `component` for every row on an edge, rounds) from a Dataset of verified
    edges `a`, `b` (row ids); see the module docstring. `advance(1)` is called once per round."""
    rounds = 0
    while True:
        rounds += 1
        advance(1)
        spread = edges.map_batches(_both_directions, batch_format="pyarrow", fn_kwargs={"partitions": partitions})
        large = spread.groupby("partition", num_partitions=partitions).map_groups(_large_star, batch_format="pyarrow").materialize()
        edges = large.map_batches(_edges_only, batch_format="pyarrow").materialize()
        if int(large.sum("violations") or 0) == 0:
            break
        oriented = edges.map_batches(_larger_first, batch_format="pyarrow", fn_kwargs={"partitions": partitions})
        edges = oriented.groupby("partition", num_partitions=partitions).map_groups(_small_star, batch_format="pyarrow").materialize()
    spread = edges.map_batches(_both_directions, batch_format="pyarrow", fn_kwargs={"partitions": partitions})
    return spread.groupby("partition", num_partitions=partitions).map_groups(_node_labels, batch_format="pyarrow").materialize(), rounds


# --------------------------------------------------------------------------------------------------
# Keep decisions (run per shuffle partition of whole components on workers)


def keep_partition(table: pa.Table, config: dict) -> pa.Table:
    """The decisions of the components in one partition: node rows (sketch columns) and pair rows
    (`left`, `right`, `similarity`, `left` a node of the partition) in one table."""
    from curate.dedup.distributed import _node_features

    dedup_config = DedupConfig.model_validate(config)
    frame = pl.from_arrow(table)
    local = frame.filter(pl.col("left").is_null()).unique("__row").sort("__row")
    pairs = frame.filter(pl.col("left").is_not_null()).select("left", "right", "similarity").unique().sort("left", "right")
    nodes = local["__row"].to_numpy().astype(np.int64)
    position = lambda rows: np.searchsorted(nodes, rows)  # noqa: E731
    inside = np.isin(pairs["right"].to_numpy(), nodes)
    left, right = pairs["left"].to_numpy().astype(np.int64)[inside], pairs["right"].to_numpy().astype(np.int64)[inside]
    similarity = pairs["similarity"].to_numpy()[inside]
    known = VerifiedPairs(position(left), position(right), similarity)
    edge = similarity >= dedup_config.threshold
    edge_left, edge_right = position(left[edge]), position(right[edge])
    order = local.select(pl.arg_sort_by(["__keep", "__row"], descending=[True, False], nulls_last=True)).to_series().to_numpy()
    priority = np.empty(len(nodes), np.int64)
    priority[order] = np.arange(len(nodes))
    features = _node_features(local, dedup_config.num_perm)
    graph = type("Graph", (), {"nodes": features})  # what `VerifiedPairs.lookup` asks of a graph
    clustering = greedy_clusters(len(nodes), edge_left, edge_right, priority, known.lookup(graph, dedup_config), dedup_config.threshold, np.zeros(len(nodes), bool))
    component_nodes, leaders = component_leaders(len(nodes), edge_left, edge_right, priority)
    ids = local["id"]
    clusters = pl.DataFrame({"__row": nodes[component_nodes], "dup_cluster": ids.gather(leaders)})
    members = pl.DataFrame(
        {
            "__row": nodes[clustering.member],
            "reason": pl.Series("reason", [], pl.String).extend_constant("near_duplicate", len(clustering.member)),
            "duplicate_of": ids.gather(clustering.representative),
            "jaccard_estimated": features.estimated(clustering.member, clustering.representative),
            "jaccard_verified": clustering.jaccard if dedup_config.verify else np.full(len(clustering.member), np.nan),
        }
    ).with_columns(pl.col("jaccard_verified").fill_nan(None))
    decided = clusters.join(members, on="__row", how="left").cast(DECISION_SCHEMA)  # type: ignore[arg-type]
    stats = np.zeros((2, max(decided.height, 1)), dtype=np.int64)
    stats[:, 0] = (clustering.chain_splits, clustering.rounds)
    if decided.height == 0:
        decided = pl.DataFrame([pl.Series(name, [None], dtype) for name, dtype in DECISION_SCHEMA.items()])
    return decided.with_columns(pl.Series("chain_splits", stats[0]), pl.Series("rounds", stats[1])).to_arrow()


def _tagged(table: pa.Table, schema: pa.Schema, partitions: int) -> pa.Table:
    """A node or pair row in the keep shuffle's one schema (the other kind's columns null)."""
    columns = [
        table.column(field.name).cast(field.type) if field.name in table.column_names else pa.nulls(table.num_rows, field.type)
        for field in schema
        if field.name != "partition"
    ]
    partition = pa.array((pl.from_arrow(table.column("component")).to_numpy() % partitions).astype(np.int64))
    return pa.table([*columns, partition], schema=schema)


def keep_decisions(sketches, labels, measured, config: DedupConfig, options: dict, partitions: int) -> tuple[pl.DataFrame, dict]:
    """(decisions of every row in a component, stats) from the components' `labels` (`__row`,
    `component`), the rows' `sketches` and the `measured` candidate pairs (`left`, `right`,
    `similarity`)."""
    node_rows = labels.join(sketches.select_columns(NODE_COLUMNS), "inner", partitions, on=("__row",)).materialize()  # its schema is read below
    pair_rows = measured.select_columns(["left", "right", "similarity"]).join(
        labels.map_batches(lambda t: t.rename_columns(["left", "component"]), batch_format="pyarrow"), "inner", partitions, on=("left",)
    )
    node_schema = node_rows.schema().base_schema
    schema = pa.schema(
        [
            *[node_schema.field(name) for name in ["component", *NODE_COLUMNS]],
            pa.field("left", pa.uint32()),
            pa.field("right", pa.uint32()),
            pa.field("similarity", pa.float64()),
            pa.field("partition", pa.int64()),
        ]
    )
    rows = node_rows.union(pair_rows).map_batches(_tagged, batch_format="pyarrow", fn_kwargs={"schema": schema, "partitions": partitions})
    decided = rows.groupby("partition", num_partitions=partitions).map_groups(keep_partition, batch_format="pyarrow", fn_kwargs={"config": options})
    tables = [pl.from_arrow(batch) for batch in decided.iter_batches(batch_format="pyarrow", batch_size=None)]
    frame = pl.concat(tables) if tables else pl.DataFrame(schema={**DECISION_SCHEMA, "chain_splits": pl.Int64, "rounds": pl.Int64})
    stats = {"chain_splits": int(frame["chain_splits"].sum()), "clustering_rounds": int(frame["rounds"].max() or 0)}
    return frame.filter(pl.col("__row").is_not_null()).select(list(DECISION_SCHEMA)).sort("__row"), stats
