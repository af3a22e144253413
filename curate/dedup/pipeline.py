"""The whole deduplication of a set of rows: exact keys, signatures, candidates, verification,
components and keep decisions, report and index, each step its own function over numpy/Polars columns.

Callers hold either the canonical rows (`deduplicate(frame, ...)`) or only their per-row features
(`deduplicate_features(features, ...)`, what the out-of-core stage reads back from Parquet): the
features are row-local (`feature_columns`), everything after them is global.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import polars as pl

from curate.dedup.banding import BucketGuard, band_table_from, candidate_pairs
from curate.dedup.clusters import component_leaders, greedy_clusters
from curate.dedup.config import DedupConfig
from curate.dedup.index import MinHashIndex, dedup_against_redis, empty_index_records
from curate.dedup.settings import MinHashSettings
from curate.dedup.signatures import minhash_signatures
from curate.dedup.text import (
    FIELD_SEPARATOR,
    MESSAGE_SEPARATOR,
    PART_NAMES,
    ShingleSets,
    hash_code,
    join_parts,
    key_hash,
    key_text,
    number_masked,
    numbers_in,
    shingle_sets,
    simplified_parts,
)
from curate.dedup.verify import NodeFeatures
from curate.errors import ConfigError
from curate.stage import Phase

PART_COLUMNS = [f"__part_{name}" for name in PART_NAMES]
VERIFY_CHUNK = 200_000  # candidate pairs verified (and counted) per step
SIGNATURE_CHUNK = 20_000  # rows shingled and signed per step


def silent_phase(name: str, total: int | None = None, unit: str = "rows") -> Phase:
    return Phase(name, total, unit, lambda *args: None)


@dataclass
class DedupOutcome:
    decisions: pl.DataFrame  # __row, dup_cluster, reason, duplicate_of, jaccard_estimated, jaccard_verified
    report: dict
    index: MinHashIndex | None
    # Verified near-duplicate edges between rows of this frame (row_left < row_right, similarity), before
    # clustering: what LSH + verification found, for benchmarks and debugging.
    edges: pl.DataFrame | None = None


# --------------------------------------------------------------------------------------------------
# Row-local features


def response_length() -> pl.Expr:
    """Characters of the answer: assistant turns of an SFT row, the chosen answer of a preference row."""
    assistant = (
        pl.col("messages")
        .list.eval(
            pl.when(pl.element().struct.field("role") == "assistant")
            .then(pl.element().struct.field("content").str.len_chars())
            .otherwise(0)
        )
        .list.sum()
    )
    chosen = pl.col("chosen").list.eval(pl.element().struct.field("content").str.len_chars()).list.sum()
    return pl.when(pl.col("kind") == "sft").then(assistant).otherwise(chosen).fill_null(0)


def keep_key(config: DedupConfig, columns: list[str]) -> pl.Expr:
    """The per-row value the keep policy ranks on (higher first; ties go to the earliest row)."""
    if config.keep == "longest_response":
        return response_length().alias("__keep")
    if config.keep == "highest_score":
        if config.score_column not in columns:
            raise ConfigError(
                f"dedup keep: highest_score: score column {config.score_column!r} is not in the input "
                f"(columns: {', '.join(c for c in columns if not c.startswith('__'))})"
            )
        return pl.col(config.score_column).alias("__keep")
    return pl.lit(0).alias("__keep")


def feature_columns(config: DedupConfig, columns: list[str]) -> list[pl.Expr]:
    """Everything the global steps need of a row, as row-local expressions over the canonical columns
    (plus `__row`): simplified key text and parts, exact/number/digit key hashes, keep key."""
    settings = config.settings()
    parts = [part.alias(column) for part, column in zip(simplified_parts(settings), PART_COLUMNS)]
    text = join_parts([pl.col(column) for column in PART_COLUMNS])
    return [
        pl.col("__row"),
        pl.col("id"),
        keep_key(config, columns),
        *parts,
        text.alias("text"),
        key_hash(text).alias("key_hash"),
        key_hash(number_masked(text)).alias("number_hash"),
        key_hash(numbers_in(text)).alias("digits_hash"),
    ]


def features_of(frame: pl.LazyFrame, config: DedupConfig) -> pl.LazyFrame:
    """`frame` (with `__row`) reduced to its features; two steps so each expression sees its inputs."""
    columns = frame.collect_schema().names()
    expressions = feature_columns(config, columns)
    staged = frame.select(expressions[0], expressions[1], expressions[2], *expressions[3:6])
    return staged.with_columns(*expressions[6:])


KEY_CODE_COLUMNS = ["key_hi", "key_lo"]
HASH_COLUMNS = ["key_hash", "number_hash", "digits_hash"]


def key_code_columns(key_hash: pl.Expr) -> list[pl.Expr]:
    """A 128-bit hex key hash as two uint64 columns: equal codes exactly when the hashes are equal, at
    16 bytes a row instead of a 32-character string."""
    return [
        key_hash.str.slice(start, 16).str.to_integer(base=16, dtype=pl.UInt64).alias(name)
        for start, name in zip((0, 16), KEY_CODE_COLUMNS)
    ]


def code_columns() -> list[pl.Expr]:
    """What the global steps need of a row's hashes, as integers (`RowFeatures.read`)."""
    first_64_bits = lambda column: pl.col(column).str.slice(0, 16).str.to_integer(base=16, dtype=pl.UInt64)  # noqa: E731
    return [*key_code_columns(pl.col("key_hash")), first_64_bits("number_hash").alias("number_code"), first_64_bits("digits_hash").alias("digits_code")]


@dataclass
class RowFeatures:
    """The features of every row, position = `__row`: ids (one Arrow string column) and integers; the
    key hash strings only where the caller holds them anyway (in memory: the index and Redis need them)."""

    ids: pl.Series  # String
    key_codes: pl.DataFrame  # KEY_CODE_COLUMNS: the exact key
    number_code: np.ndarray  # uint64: first 64 bits of the number-masked key's hash
    digits_code: np.ndarray  # uint64: first 64 bits of the hash of the key's digits
    multipart: np.ndarray  # bool: preference pairs, compared part by part
    priority: np.ndarray  # rank under the keep policy, 0 = kept first
    hashes: pl.DataFrame | None = None  # HASH_COLUMNS as strings (None out of core: read back from disk)
    texts: pl.Series | None = None  # simplified key texts (None out of core: they stay on disk)
    part_texts: pl.DataFrame | None = None  # simplified parts (prompt, chosen, rejected); null where absent

    def __len__(self) -> int:
        return len(self.ids)

    def id_of(self, rows: np.ndarray) -> np.ndarray:
        """The ids of some rows, as an object array (for the sparse per-row decision arrays)."""
        return self.ids.gather(rows).to_numpy() if len(rows) else np.empty(0, dtype=object)

    @classmethod
    def read(cls, features: pl.DataFrame) -> "RowFeatures":
        """From `features_of` output (in memory), or from `__row, id, __keep, multipart` and
        `code_columns()` (out of core)."""
        order = features.select(pl.arg_sort_by(["__keep", "__row"], descending=[True, False], nulls_last=True))
        priority = np.empty(features.height, dtype=np.int64)
        priority[order.to_series().to_numpy()] = np.arange(features.height)
        with_texts = "text" in features.columns
        codes = features.select(code_columns()) if "key_hash" in features.columns else features
        return cls(
            ids=features["id"],
            key_codes=codes.select(KEY_CODE_COLUMNS),
            number_code=codes["number_code"].to_numpy(),
            digits_code=codes["digits_code"].to_numpy(),
            multipart=features["multipart"].to_numpy() if not with_texts else features[PART_COLUMNS[1]].is_not_null().to_numpy(),
            priority=priority,
            hashes=features.select(HASH_COLUMNS) if "key_hash" in features.columns else None,
            texts=features["text"] if with_texts else None,
            part_texts=features.select(PART_COLUMNS) if with_texts else None,
        )


@dataclass
class Decisions:
    """Per-row outcome arrays, filled step by step. The object arrays hold None (kept; own cluster) for
    most rows and a string only where a row was dropped or joined a cluster, so a row costs ~50 bytes
    here, not a Python string of its id."""

    reason: np.ndarray
    duplicate_of: np.ndarray
    cluster: np.ndarray  # None: the row's own id (a cluster of one, or a cluster named after this row)
    jaccard_estimated: np.ndarray
    jaccard_verified: np.ndarray
    exact_rep: np.ndarray  # each row's exact-duplicate representative (itself when unique)

    @classmethod
    def start(cls, n: int) -> "Decisions":
        return cls(
            reason=np.full(n, None, dtype=object),
            duplicate_of=np.full(n, None, dtype=object),
            cluster=np.full(n, None, dtype=object),
            jaccard_estimated=np.full(n, np.nan),
            jaccard_verified=np.full(n, np.nan),
            exact_rep=np.arange(n),
        )

    def __len__(self) -> int:
        return len(self.reason)

    def survivors(self) -> np.ndarray:
        return np.flatnonzero(self.reason == None)  # noqa: E711  (object array of None)

    def clusters_of(self, rows: np.ndarray, features: "RowFeatures") -> np.ndarray:
        """The dup_cluster of some rows as strings (object array)."""
        clusters = self.cluster[rows]
        own = np.flatnonzero(clusters == None)  # noqa: E711
        clusters[own] = features.id_of(rows[own])
        return clusters

    def frame(self, rows: pl.Series, ids: pl.Series) -> pl.DataFrame:
        named = pl.Series(self.cluster.tolist(), dtype=pl.String)
        return pl.DataFrame(
            {
                "__row": rows,
                "dup_cluster": pl.select(pl.coalesce(pl.lit(named), pl.lit(ids))).to_series(),
                "reason": pl.Series(self.reason.tolist(), dtype=pl.String),
                "duplicate_of": pl.Series(self.duplicate_of.tolist(), dtype=pl.String),
                "jaccard_estimated": pl.Series(self.jaccard_estimated).fill_nan(None),
                "jaccard_verified": pl.Series(self.jaccard_verified).fill_nan(None),
            }
        )


# --------------------------------------------------------------------------------------------------
# Exact duplicates


def mark_exact_duplicates(rows: RowFeatures, decided: Decisions, index_records: pl.DataFrame) -> int:
    """Drop all but the best-priority row of each exact key, and every row whose key is in the index.
    Returns how many rows were dropped."""
    n = len(rows)
    table = pl.DataFrame({"row": np.arange(n), "priority": rows.priority}).hstack(rows.key_codes)
    table = table.with_columns(pl.col("row").sort_by("priority").first().over(KEY_CODE_COLUMNS).alias("rep"))
    exact_rep = table["rep"].to_numpy().copy()
    is_dup = exact_rep != np.arange(n)
    decided.reason[is_dup] = "exact_duplicate"
    decided.duplicate_of[is_dup] = rows.id_of(exact_rep[is_dup])
    decided.jaccard_estimated[is_dup] = 1.0
    decided.jaccard_verified[is_dup] = 1.0
    dropped = int(is_dup.sum())
    if index_records.height:
        old_keys = index_records.select(*key_code_columns(pl.col("key_hash")), "id", "dup_cluster").unique(KEY_CODE_COLUMNS, keep="first")
        matched = table.select("row", *KEY_CODE_COLUMNS).join(old_keys, on=KEY_CODE_COLUMNS, how="inner").sort("row")
        if matched.height:
            rows_matched = matched["row"].to_numpy()
            decided.reason[rows_matched] = "exact_duplicate"
            decided.duplicate_of[rows_matched] = matched["id"].to_numpy()
            decided.cluster[rows_matched] = matched["dup_cluster"].to_numpy()
            decided.jaccard_estimated[rows_matched] = 1.0
            decided.jaccard_verified[rows_matched] = 1.0
            dropped += int((exact_rep[rows_matched] == rows_matched).sum())  # anchored in the index
            exact_rep[rows_matched] = rows_matched  # their own decision is final
    decided.exact_rep = exact_rep
    return dropped


# --------------------------------------------------------------------------------------------------
# Signatures of the rows that survived exact dedup


@dataclass
class SurvivorSketches:
    sets: ShingleSets  # whole key texts
    part_sets: list[ShingleSets]  # prompt, chosen, rejected (empty sets for rows compared whole)
    signatures: np.ndarray  # uint32 (len(survivors), num_perm)


def sketch_survivors(rows: RowFeatures, survivors: np.ndarray, settings: MinHashSettings, phase) -> SurvivorSketches:
    """Shingle sets and MinHash signatures of the survivors, in counted steps."""
    with phase("MinHash signatures", total=len(survivors), unit="rows") as progress:
        sets = shingle_sets(rows.texts.gather(survivors), settings)
        signatures = np.empty((len(survivors), settings.num_perm), dtype=np.uint32)
        for start in range(0, len(survivors), SIGNATURE_CHUNK):
            stop = min(start + SIGNATURE_CHUNK, len(survivors))
            chunk = sets.take(np.arange(start, stop))
            signatures[start:stop] = minhash_signatures(chunk.values, chunk.sizes, settings.num_perm, settings.seed)
            progress.advance(stop - start)
    if rows.multipart[survivors].any():
        multipart = pl.lit(pl.Series(rows.multipart, dtype=pl.Boolean))
        survivor_parts = rows.part_texts.select(
            pl.when(multipart).then(pl.col(column)).otherwise(pl.lit("")).gather(survivors) for column in PART_COLUMNS
        )
        part_sets = [shingle_sets(survivor_parts[column], settings) for column in PART_COLUMNS]
    else:
        no_sets = ShingleSets(values=np.empty(0, np.uint32), offsets=np.zeros(len(survivors) + 1, np.int64))
        part_sets = [no_sets] * len(PART_NAMES)
    return SurvivorSketches(sets=sets, part_sets=part_sets, signatures=signatures)


def no_sketches(num_perm: int) -> SurvivorSketches:
    empty = ShingleSets(values=np.empty(0, np.uint32), offsets=np.zeros(1, np.int64))
    return SurvivorSketches(sets=empty, part_sets=[empty] * len(PART_NAMES), signatures=np.empty((0, num_perm), np.uint32))


# --------------------------------------------------------------------------------------------------
# Near duplicates: the graph of index rows (nodes 0..old_count-1) and survivors (old_count..)


@dataclass
class NearGraph:
    nodes: NodeFeatures
    priority: np.ndarray  # per node; index rows first (negative), they can only be representatives
    protected: np.ndarray  # bool per node: index rows
    old_count: int
    survivors: np.ndarray  # row of each new node


def near_graph(rows, survivors, sketches, index: MinHashIndex | None, index_records, config) -> NearGraph:
    old_count = index_records.height
    old_signatures = index.signatures if index is not None else sketches.signatures[:0]
    old_sets = ShingleSets.from_lists(index_records["shingles"]) if old_count else sketches.sets.take(np.empty(0, np.int64))
    nodes = NodeFeatures(
        signatures=np.concatenate([old_signatures, sketches.signatures]) if old_count else sketches.signatures,
        sets=ShingleSets.concat([old_sets, sketches.sets]) if config.verify else None,
        part_sets=[
            ShingleSets.concat([ShingleSets.from_lists(index_records[f"shingles_{name}"]), new_part])
            for name, new_part in zip(PART_NAMES, sketches.part_sets)
        ],
        multipart=np.concatenate([index_records["shingles_chosen"].is_not_null().to_numpy(), rows.multipart[survivors]]),
        digits_code=np.concatenate([hash_code(index_records["digits_hash"]), rows.digits_code[survivors]]),
        number_code=np.concatenate([hash_code(index_records["number_hash"]), rows.number_code[survivors]]),
    )
    protected = np.zeros(old_count + len(survivors), dtype=bool)
    protected[:old_count] = True
    priority = np.concatenate([np.arange(old_count) - old_count, rows.priority[survivors]])
    return NearGraph(nodes=nodes, priority=priority, protected=protected, old_count=old_count, survivors=survivors)


def index_records_shingles(index: MinHashIndex | None) -> np.ndarray:
    return index.records["shingles"].list.len().to_numpy() if index is not None else np.zeros(0, np.int64)


def graph_candidates(graph: NearGraph, sketches, index, config, guard: BucketGuard) -> tuple[np.ndarray, np.ndarray]:
    bands, rows = config.band_params()
    old_count = graph.old_count
    if index is not None and (index.bands, index.rows) == (bands, rows):
        old_bands = index.band_table.select(
            pl.col("node").cast(pl.UInt32), pl.col("band").cast(pl.UInt16), pl.col("band_hash").cast(pl.UInt64)
        )
    else:
        has_old = index_records_shingles(index) > 0
        old_bands = band_table_from(graph.nodes.signatures[:old_count], has_old, bands, rows)
    new_bands = band_table_from(sketches.signatures, sketches.sets.sizes > 0, bands, rows, offset=old_count)
    return candidate_pairs(pl.concat([old_bands, new_bands]), config.max_bucket_pairs, new_from=old_count, guard=guard)


@dataclass
class VerifiedPairs:
    left: np.ndarray
    right: np.ndarray
    similarity: np.ndarray
    skipped_by_estimate: int | None = None

    def lookup(self, graph: NearGraph, config: DedupConfig) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """Member-to-representative similarity, reusing the candidate pairs' values (a candidate skipped
        by its estimate counts as not similar, as in verification)."""
        known_keys = (self.left.astype(np.uint64) << np.uint64(32)) | self.right.astype(np.uint64)  # sorted, unique

        def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            low, high = np.minimum(a, b).astype(np.uint64), np.maximum(a, b).astype(np.uint64)
            keys = (low << np.uint64(32)) | high
            position = np.minimum(np.searchsorted(known_keys, keys), max(len(known_keys) - 1, 0))
            known = (known_keys[position] == keys) if len(known_keys) else np.zeros(len(keys), dtype=bool)
            out = np.empty(len(keys), dtype=np.float64)
            out[known] = self.similarity[position[known]]
            if (~known).any():
                out[~known] = graph.nodes.similarity(a[~known], b[~known], config.verify, config.merge_number_variants)
            return out

        return similarity


def verify_candidates(
    graph: NearGraph, left: np.ndarray, right: np.ndarray, config: DedupConfig, phase, chunk: int = VERIFY_CHUNK
) -> VerifiedPairs:
    """Similarity of every candidate pair (counted in steps); with `skip_verify_margin`, pairs whose
    signature estimate is that far under the threshold are not verified and count as 0."""
    similarity = np.zeros(len(left), dtype=np.float64)
    skipped = 0
    with phase("verifying candidate pairs", total=len(left), unit="pairs") as progress:
        for start in range(0, len(left), chunk):
            a, b = left[start : start + chunk], right[start : start + chunk]
            worth = np.ones(len(a), dtype=bool)
            if config.verify and config.skip_verify_margin is not None:
                estimate = graph.nodes.estimated(a, b)
                worth = estimate >= config.threshold - config.skip_verify_margin
                skipped += int((~worth).sum())
            similarity[start : start + len(a)][worth] = graph.nodes.similarity(
                a[worth], b[worth], config.verify, config.merge_number_variants
            )
            progress.advance(len(a))
    measured = config.verify and config.skip_verify_margin is not None
    return VerifiedPairs(left=left, right=right, similarity=similarity, skipped_by_estimate=skipped if measured else None)


def near_edges_frame(graph: NearGraph, pairs: VerifiedPairs, edge: np.ndarray) -> pl.DataFrame:
    old_count, survivors = graph.old_count, graph.survivors
    left, right = pairs.left[edge], pairs.right[edge]
    new_pair = (left >= old_count) & (right >= old_count)
    edge_rows = np.sort(np.stack([survivors[left[new_pair] - old_count], survivors[right[new_pair] - old_count]]), axis=0)
    return pl.DataFrame({"row_left": edge_rows[0], "row_right": edge_rows[1], "similarity": pairs.similarity[edge][new_pair]})


def node_cluster_ids(graph: NearGraph, nodes: np.ndarray, rows: RowFeatures, index_records: pl.DataFrame):
    """(id, dup_cluster) of graph nodes: an index row's own, or this run's row id (twice)."""
    ids = np.empty(len(nodes), dtype=object)
    clusters = np.empty(len(nodes), dtype=object)
    is_old = nodes < graph.old_count
    if is_old.any():
        ids[is_old] = index_records["id"].to_numpy()[nodes[is_old]]
        clusters[is_old] = index_records["dup_cluster"].to_numpy()[nodes[is_old]]
    new_rows = graph.survivors[nodes[~is_old] - graph.old_count]
    ids[~is_old] = rows.id_of(new_rows)
    clusters[~is_old] = ids[~is_old]
    return ids, clusters


def mark_near_duplicates(rows, decided, graph, pairs, config, index_records) -> tuple[int, dict, pl.DataFrame]:
    """Keep decisions (greedy, per component) and dup_cluster = connected component of the verified
    edges. Returns (rows dropped, clustering report, verified edges between this frame's rows)."""
    edge = pairs.similarity >= config.threshold
    left, right = pairs.left[edge], pairs.right[edge]
    clustering = greedy_clusters(
        len(graph.priority), left, right, graph.priority, pairs.lookup(graph, config), config.threshold, graph.protected
    )
    member_rows = graph.survivors[clustering.member - graph.old_count]
    rep_ids, _ = node_cluster_ids(graph, clustering.representative, rows, index_records)
    decided.reason[member_rows] = "near_duplicate"
    decided.duplicate_of[member_rows] = rep_ids
    decided.jaccard_estimated[member_rows] = graph.nodes.estimated(clustering.member, clustering.representative)
    if config.verify:
        decided.jaccard_verified[member_rows] = clustering.jaccard
    # Every node of a component (kept or not) shares the cluster id of its best-priority node.
    members, leaders = component_leaders(len(graph.priority), left, right, graph.priority)
    _, leader_clusters = node_cluster_ids(graph, leaders, rows, index_records)
    new_member = members >= graph.old_count
    decided.cluster[graph.survivors[members[new_member] - graph.old_count]] = leader_clusters[new_member]
    report = {
        "verified_pairs": int(edge.sum()),
        "chain_splits": clustering.chain_splits,
        "clustering_rounds": clustering.rounds,
        "components": int(len(np.unique(leaders))) if len(leaders) else 0,
    }
    return len(member_rows), report, near_edges_frame(graph, pairs, edge)


# --------------------------------------------------------------------------------------------------
# Report and index


def _size_histogram(sizes: pl.Series) -> dict[str, int]:
    counts = sizes.value_counts().sort(sizes.name)
    return {str(size): int(count) for size, count in counts.iter_rows()}


def cluster_report(decisions: pl.DataFrame, config: DedupConfig, example_texts: Callable[[list[int]], list[str]]) -> dict:
    sizes = decisions.group_by("dup_cluster").agg(pl.len().alias("size"), pl.col("reason").is_null().any().alias("has_kept"))
    # A cluster anchored in the saved index has no kept row here: count its index row as a member.
    sizes = sizes.with_columns((pl.col("size") + (~pl.col("has_kept")).cast(pl.UInt32)).alias("size"))
    multi = sizes.filter(pl.col("size") > 1).sort(["size", "dup_cluster"], descending=[True, False])
    chosen = []
    for cluster_id, size, has_kept in multi.head(config.examples).iter_rows():
        rows_in_cluster = decisions.filter(pl.col("dup_cluster") == cluster_id)
        kept_rows = rows_in_cluster.filter(pl.col("reason").is_null())["__row"]
        chosen.append((cluster_id, int(size), not has_kept, int(kept_rows[0] if len(kept_rows) else rows_in_cluster["__row"][0])))
    texts = example_texts([row for *_, row in chosen]) if chosen else []
    examples = [
        {
            "dup_cluster": cluster_id,
            "size": size,
            "in_saved_index": in_index,
            "example": text.replace(FIELD_SEPARATOR, "\n").replace(MESSAGE_SEPARATOR, "\n")[:200],
        }
        for (cluster_id, size, in_index, _), text in zip(chosen, texts)
    ]
    histogram = _size_histogram(multi["size"])
    return {
        "clusters": int(multi.height),
        "cluster_size_histogram": histogram,
        # One-line forms of the above for the summary tables of `curate run` / `curate stats`.
        "cluster_sizes": " ".join(f"{size}×{count}" for size, count in histogram.items()) or "none",
        "largest_cluster": (f"{examples[0]['size']} rows: {' '.join(examples[0]['example'].split())[:80]}" if examples else "none"),
        "largest_clusters": examples,
    }


def build_index(rows, decided, survivors, sketches, index, index_records, config) -> MinHashIndex:
    """The index of everything kept so far: the old index's rows (with `extend_index`) + this run's kept."""
    settings = config.settings()
    bands, band_rows = config.band_params()
    kept_new = np.flatnonzero(decided.reason[survivors] == None)  # noqa: E711
    kept_rows = survivors[kept_new]
    kept_multipart = pl.Series(rows.multipart[kept_rows])
    new_records = pl.DataFrame(
        {
            "id": rows.ids.gather(kept_rows),
            "dup_cluster": pl.Series(decided.clusters_of(kept_rows, rows).tolist(), dtype=pl.String),
            **{column: rows.hashes[column].gather(kept_rows) for column in HASH_COLUMNS},
            "signature": pl.Series(
                np.ascontiguousarray(sketches.signatures[kept_new]), dtype=pl.Array(pl.UInt32, settings.num_perm)
            ),
            "shingles": sketches.sets.to_lists(kept_new),
            **{
                f"shingles_{name}": pl.select(pl.when(pl.lit(kept_multipart)).then(pl.lit(part.to_lists(kept_new)))).to_series()
                for name, part in zip(PART_NAMES, sketches.part_sets)
            },
        }
    )
    base = index_records if (config.extend_index and index is not None) else empty_index_records(settings.num_perm)
    records = pl.concat([base, new_records])
    signatures = (
        records["signature"].to_numpy().astype(np.uint32).reshape(records.height, settings.num_perm)
        if records.height
        else np.empty((0, settings.num_perm), dtype=np.uint32)
    )
    has = records["shingles"].list.len().to_numpy() > 0
    return MinHashIndex(
        settings=settings, records=records, bands=bands, rows=band_rows, band_table=band_table_from(signatures, has, bands, band_rows)
    )


# --------------------------------------------------------------------------------------------------
# The whole run


@dataclass
class NearOutcome:
    dropped: int = 0
    report: dict = field(default_factory=dict)
    edges: pl.DataFrame | None = None


def find_near_duplicates(rows, decided, survivors, sketches, index, index_records, config, phase, guard) -> NearOutcome:
    graph = near_graph(rows, survivors, sketches, index, index_records, config)
    left, right = graph_candidates(graph, sketches, index, config, guard)
    pairs = verify_candidates(graph, left, right, config, phase)
    with phase("clustering", total=None, unit="pairs"):
        dropped, report, edges = mark_near_duplicates(rows, decided, graph, pairs, config, index_records)
    report = {"candidate_pairs": int(len(left)), **report, "verify": config.verify}
    if pairs.skipped_by_estimate is not None:
        report["skipped_by_estimate"] = pairs.skipped_by_estimate
    return NearOutcome(dropped=dropped, report=report, edges=edges)


def lsh_settings_report(config: DedupConfig) -> dict:
    bands, band_rows = config.band_params()
    return {
        "bands": bands,
        "rows": band_rows,
        "num_perm": config.num_perm,
        "threshold": config.threshold,
        "candidate_threshold": config.effective_candidate_threshold() if config.bands is None else None,
    }


def finish_clusters(rows: RowFeatures, decided: Decisions) -> None:
    """Exact duplicates follow their representative's final cluster."""
    exact_members = np.flatnonzero(decided.exact_rep != np.arange(len(rows)))
    decided.cluster[exact_members] = decided.clusters_of(decided.exact_rep[exact_members], rows)


def outcome_report(decided, decisions, config, exact_dropped: int, near_dropped: int, lsh: dict, example_texts) -> dict:
    return {
        "rows_in": len(decided),
        "kept": int((decided.reason == None).sum()),  # noqa: E711
        "exact_duplicates": exact_dropped,
        "near_duplicates": near_dropped,
        **cluster_report(decisions, config, example_texts),
        "settings": config.settings().as_dict(),
        "lsh": lsh,
        "keep": config.keep,
    }


def deduplicate_features(
    features: pl.DataFrame,
    config: DedupConfig,
    index: MinHashIndex | None = None,
    progress=lambda message: None,
    phase=silent_phase,
    example_texts: Callable[[list[int]], list[str]] | None = None,
) -> DedupOutcome:
    """Decide every row from its features (`features_of`; `__row` must be 0..n-1 in order), in memory.
    `example_texts(rows)` gives the report's example texts of those rows (default: the simplified key)."""
    settings = config.settings()
    rows = RowFeatures.read(features)
    decided = Decisions.start(len(rows))
    index_records = index.records if index is not None else empty_index_records(settings.num_perm)
    exact_dropped = mark_exact_duplicates(rows, decided, index_records) if config.exact else 0
    survivors = decided.survivors()
    need_sketches = config.near or config.save_index
    sketches = sketch_survivors(rows, survivors, settings, phase) if need_sketches else no_sketches(settings.num_perm)
    lsh_report = lsh_settings_report(config)
    guard = BucketGuard()
    near = NearOutcome()
    if config.near and len(survivors):
        progress(f"dedup: LSH candidates and verification of {len(survivors)} rows")
        near = find_near_duplicates(rows, decided, survivors, sketches, index, index_records, config, phase, guard)
        lsh_report.update(near.report)
    lsh_report["bucket_guard"] = {"max_bucket_pairs": config.max_bucket_pairs, **guard.as_dict()}
    redis_report = None
    if config.redis is not None:
        progress("dedup: shared Redis index")
        decided.cluster = decided.clusters_of(np.arange(len(rows)), rows)  # Redis stores every added row's cluster
        redis_report = dedup_against_redis(
            config, settings, config.band_params(), survivors, sketches.signatures, sketches.sets.sizes > 0, rows.ids.to_numpy(),
            rows.hashes["key_hash"], decided.reason, decided.duplicate_of, decided.cluster, decided.jaccard_estimated,
        )
    finish_clusters(rows, decided)
    decisions = decided.frame(features["__row"], rows.ids)
    if example_texts is None:
        example_texts = lambda chosen: rows.texts.gather(chosen).to_list()  # noqa: E731
    redis_exact = redis_report["exact_duplicates"] if redis_report else 0
    redis_near = redis_report["near_duplicates"] if redis_report else 0
    report = outcome_report(decided, decisions, config, exact_dropped + redis_exact, near.dropped + redis_near, lsh_report, example_texts)
    if redis_report is not None:
        report["redis"] = redis_report
    new_index = None
    if config.save_index:
        new_index = build_index(rows, decided, survivors, sketches, index, index_records, config)
        report["index"] = {
            "rows_before": index_records.height,
            "rows_after": new_index.records.height,
            "signature_bytes_per_record": settings.num_perm * 4,
        }
    return DedupOutcome(decisions=decisions, report=report, index=new_index, edges=near.edges)


def deduplicate(
    frame: pl.DataFrame, config: DedupConfig, index: MinHashIndex | None = None, progress=lambda message: None, phase=silent_phase
) -> DedupOutcome:
    """Decide, for every row of a canonical frame, whether it is kept and which cluster it belongs to.

    `frame` must carry a `__row` column 0..n-1. Rows matching an `index` row are always the ones removed
    (the index holds rows earlier runs kept)."""
    settings = config.settings()
    features = features_of(frame.lazy(), config).collect()
    raw = key_text(settings.key, settings.include_system, settings.preference_key)

    def example_texts(chosen: list[int]) -> list[str]:
        return frame[chosen].select(raw).to_series().to_list()

    return deduplicate_features(features, config, index, progress, phase, example_texts)
