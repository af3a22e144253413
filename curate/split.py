"""Leak-free train/validation/test assignment and the dataset folders the trainer reads.

Rows are assigned per *group*, never per row. A row's group is the connected component of two
relations: the dedup stage's `dup_cluster` (falling back to `id`, which exact duplicates share), and
its prompt — rows whose prompts are the same or near-duplicates (`group_prompts`). The prompt is the
preference row's `prompt`, or an SFT row's messages before its final answer, simplified as dedup's
default key (case and whitespace folded); near-duplicate prompts are MinHash pairs with a verified
Jaccard of at least `prompt_threshold` (curate.dedup's signatures, banding and verification), and
every chain of them is kept together (prompts that differ only in their numbers are distinct questions,
as in dedup). So several preference pairs for one prompt, or a prompt and its
reworded variant, never end up in both train and validation (a DPO set assigned pair by pair leaks
most of its validation prompts into train). Grouping only moves rows together, it never drops any;
`group_prompts: exact` skips the MinHash step, `off` restores `dup_cluster`-only groups.

A group's key is the smallest cluster key among its members, and its split is a pure function of that
key and the seed (sha256 of both, read as a number in [0, 1) and compared with the cumulative
fractions), so adding data never moves an existing group unless new rows join it to another.
With stratification the groups of each stratum are instead ordered by that hash and cut at the
fractions by row count, which keeps small strata represented in every split.

With `previous_splits`, a group follows the earlier split of its rows' ids, of their earlier
`dup_cluster` labels and of their exact prompts (a new answer to an earlier validation question stays
in validation), by majority vote; only groups with none of these are assigned afresh.

Exports: `sft/` and `pref/` under the output folder, each with `<split>-00000-of-0000N.parquet` shards
(TRL columns plus `source` and `dup_cluster`) and a dataset card, loadable with
`datasets.load_dataset("parquet", data_files=...)`; optionally a `save_to_disk` copy in `hf_dataset/`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import numpy as np
import polars as pl
import polars_hash  # noqa: F401  (registers the .chash namespace)
from pydantic import Field, model_validator

from curate.atomic import ROW_GROUP_ROWS, atomic_dir
from curate.dedup import connected_components, key_hash, key_parts, simplify_text
from curate.dedup.near_pairs import near_duplicate_pairs
from curate.dedup.pipeline import silent_phase
from curate.dedup.stream import work_folder
from safety.ownership import is_owned, record
from curate.errors import ConfigError, RunStateError
from curate.stage import Seed, StageConfig

SPLITS: tuple[str, ...] = ("train", "validation", "test")
KIND_FOLDERS: dict[str, str] = {"sft": "sft", "preference": "pref"}
# Columns of each exported dataset, in order (TRL's conversational formats plus provenance).
EXPORT_COLUMNS: dict[str, list[str]] = {
    "sft": ["id", "messages", "source", "dup_cluster"],
    "preference": ["id", "prompt", "chosen", "rejected", "source", "dup_cluster"],
}
_HASH_HEX = 13  # 52 bits: exactly representable in a float64, so the fraction is exact and stable
_CLUSTER = "__cluster"
_PRIOR = "__prior_split"
_PROMPT_HASH = ["__ph1", "__ph2"]  # a prompt's sha256 as two integers (`prompt_hashes`)


class SplitConfig(StageConfig):
    train: float = Field(0.9, ge=0, le=1, description="Fraction of rows (by cluster) for training.")
    validation: float = Field(0.05, ge=0, le=1)
    test: float = Field(0.05, ge=0, le=1)
    seed: Seed | None = Field(None, description="Overrides the pipeline seed for the assignment hash.")
    cluster_column: str = Field("dup_cluster", description="Near-duplicate cluster id column; `id` if absent.")
    stratify_by: str | None = Field(
        None, description="`source` (the source file) or a column name (e.g. a label); balances every stratum."
    )
    min_validation_rows: int = Field(0, ge=0, description="Per dataset (sft, pref); whole clusters move from train.")
    min_test_rows: int = Field(0, ge=0)
    previous_splits: str | None = Field(
        None, description="A folder holding earlier sft/ and pref/ splits: their rows and clusters keep their split."
    )
    include_previous: bool = Field(
        True, description="With previous_splits: exported datasets also hold earlier rows absent from this input."
    )
    max_shard_rows: int = Field(100_000, ge=1, le=100_000_000)
    save_to_disk: bool = Field(False, description="Also write datasets.save_to_disk copies in <folder>/hf_dataset.")
    license: str = Field("unknown", description="License field of the dataset card.")
    extra_columns: list[str] = Field(default_factory=list, description="More columns to carry into the exports.")
    group_prompts: Literal["near", "exact", "off"] = Field(
        "near",
        description="Keep rows whose prompts are the same (`exact`) or also near-duplicates (`near`) in one split; "
        "`off`: dup_cluster only.",
    )
    prompt_threshold: float = Field(
        0.7, gt=0.0, le=1.0, description="Verified Jaccard (character 5-grams) at which two prompts are near-duplicates."
    )

    @model_validator(mode="after")
    def _fractions_sum_to_one(self):
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + validation + test must be 1, got {total:g}")
        return self


def sha256_hex(text: pl.Expr) -> pl.Expr:
    """sha256 hex digest of a string expression (polars_hash's Rust implementation)."""
    return text.chash.sha2_256()


def hash_fraction(*parts: pl.Expr) -> pl.Expr:
    """A number in [0, 1) from sha256 of the parts joined by a separator: stable across Polars versions
    and machines (unlike `Expr.hash`)."""
    key = pl.concat_str([part.cast(pl.String).fill_null("") for part in parts], separator="\x1f")
    return sha256_hex(key).str.slice(0, _HASH_HEX).str.to_integer(base=16).cast(pl.Float64) / float(16**_HASH_HEX)


def cluster_key(frame_columns: list[str], cluster_column: str) -> pl.Expr:
    """The key rows are grouped by: the dedup cluster where known, else the content id."""
    if cluster_column in frame_columns:
        return pl.coalesce(pl.col(cluster_column).cast(pl.String), pl.col("id"))
    return pl.col("id")


def prompt_text() -> pl.Expr:
    """What a row's prompt is for grouping: the preference prompt, or the SFT messages before the final
    answer (system messages left out), simplified like dedup's default key."""
    return simplify_text(key_parts("prompt", include_system=False, preference_key="prompt")[0])


def prompt_hashes(prompt: pl.Expr) -> list[pl.Expr]:
    """`__ph1`, `__ph2`: the 128 bits of sha256 of a (simplified) prompt as two integers, null for an empty
    prompt. Rows are grouped by exact prompt on these (16 B per row) instead of the texts themselves."""
    digest = key_hash(prompt)
    present = prompt.str.len_bytes() > 0
    return [
        pl.when(present).then(digest.str.slice(start, 16).str.to_integer(base=16, dtype=pl.UInt64)).alias(name)
        for name, start in (("__ph1", 0), ("__ph2", 16))
    ]


def group_keys(
    rows: pl.DataFrame, config: SplitConfig, frame: pl.LazyFrame, work_dir: Path | None = None, phase=silent_phase
) -> tuple[pl.Series, dict[str, Any]]:
    """Each row's split group (see the module docstring), from its `_CLUSTER` and prompt hash (`rows`,
    in the order of `frame`, whose prompts are read again only for the near-duplicate step).

    Nodes are rows; edges join each row to the first row of its cluster, of its exact prompt and of every
    prompt near-duplicating its own; the group key is the smallest cluster key of the component."""
    n = rows.height
    if config.group_prompts == "off" or n == 0:
        return rows[_CLUSTER], {"group_prompts": config.group_prompts}
    has_prompt = pl.col("__ph1").is_not_null()
    table = rows.with_row_index("__node").select(
        pl.col(_CLUSTER),
        pl.col("__node").first().over(_CLUSTER).cast(pl.Int64).alias("cluster_first"),
        pl.when(has_prompt).then(pl.col("__node").first().over(_PROMPT_HASH).cast(pl.Int64)).alias("prompt_first"),
    )
    left = [np.arange(n), np.arange(n)]
    # A row without a prompt is joined to itself only.
    prompt_first = table.select(pl.coalesce("prompt_first", pl.int_range(n, dtype=pl.Int64)))["prompt_first"]
    right = [table["cluster_first"].to_numpy(), prompt_first.to_numpy()]
    near_pairs = 0
    if config.group_prompts == "near":
        # One node per distinct prompt (its first row): near-duplicate pairs among distinct prompts only.
        firsts = table.select(pl.col("prompt_first").drop_nulls().unique().sort())["prompt_first"].to_numpy()
        a, b = near_prompt_pairs(frame, firsts, config.prompt_threshold, work_dir, phase)
        left.append(a)
        right.append(b)
        near_pairs = len(a)
    labels = connected_components(n, np.concatenate(left), np.concatenate(right))
    keys = (
        table.with_columns(pl.Series("__label", labels)).select(pl.col(_CLUSTER).min().over("__label"))[_CLUSTER]
    )
    sizes = keys.value_counts()["count"]
    report = {
        "group_prompts": config.group_prompts,
        "near_duplicate_prompt_pairs": near_pairs,
        "clusters": int(rows[_CLUSTER].n_unique()),
        "groups": int(keys.n_unique()),
        "largest_group": int(sizes.max()) if len(sizes) else 0,
        "rows_moved_by_prompt": int((keys != rows[_CLUSTER]).sum()),
    }
    return keys, report


def near_prompt_pairs(
    frame: pl.LazyFrame, firsts: np.ndarray, threshold: float, work_dir: Path | None, phase
) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs `(first row of a prompt, first row of a near-duplicate prompt)`, out of core: the distinct
    prompts (the rows `firsts`, ascending) are written to a Parquet file in a work folder of our own
    (under `work_dir`, the stage's folder, else the system's temp folder; removed at the end), and
    `near_duplicate_pairs` finds their pairs in bounded memory. As in dedup, prompts that differ only in
    their numbers ("What is 17+25?", "What is 18+25?") are distinct questions; without this, templated
    prompts chain into one group holding most rows."""
    work = work_folder(work_dir) if work_dir is not None else Path(tempfile.mkdtemp(prefix="curate-split."))
    try:
        path = work / "prompts.parquet"
        wanted = pl.Series(firsts, dtype=pl.UInt32).implode()
        (
            frame.with_row_index("__node")
            .filter(pl.col("__node").is_in(wanted))
            .select("__node", prompt_text().alias("prompt"))
            .sink_parquet(path, row_group_size=ROW_GROUP_ROWS, engine="streaming")
        )
        nodes = pl.read_parquet(path, columns=["__node"], glob=False)["__node"].to_numpy().astype(np.int64)
        a, b = near_duplicate_pairs(path, "prompt", threshold, work, phase=phase)
        return nodes[a], nodes[b]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def read_previous_splits(folder: Path) -> pl.DataFrame:
    """Rows of earlier exports: `id`, `dup_cluster` (string, may be null), `split`, `kind` and the hash of
    their prompt as `prompt_text` gives it (`prompt_hashes`: a new row asking an earlier prompt joins its
    split). Each shard is scanned for these columns only: the messages are read, never held."""
    frames = []
    for kind, sub in KIND_FOLDERS.items():
        for split in SPLITS:
            for path in sorted((folder / sub).glob(f"{split}-*.parquet")):
                shard = pl.scan_parquet(path, glob=False)
                schema = shard.collect_schema()
                cluster = pl.col("dup_cluster").cast(pl.String) if "dup_cluster" in schema else pl.lit(None, pl.String)
                # A shard holds only its own kind's message column; prompt_text() reads both.
                mine, other = ("messages", "prompt") if kind == "sft" else ("prompt", "messages")
                hashes = [pl.lit(None, pl.UInt64).alias(name) for name in _PROMPT_HASH]
                if mine in schema:
                    if other not in schema:
                        shard = shard.with_columns(pl.lit(None).cast(schema[mine]).alias(other))
                    hashes = prompt_hashes(prompt_text().fill_null(""))
                frames.append(
                    shard.with_columns(pl.lit(kind).alias("kind"))
                    .select(pl.col("id"), cluster.alias("dup_cluster"), pl.lit(split).alias("split"), pl.col("kind"), *hashes)
                    .collect()
                )
    if not frames:
        raise RunStateError(f"{folder}: previous_splits holds no sft/ or pref/ <split>-*.parquet shards")
    return pl.concat(frames)


def _split_order(split: pl.Expr) -> pl.Expr:
    return split.replace_strict({name: index for index, name in enumerate(SPLITS)}, return_dtype=pl.Int32)


def _prior_cluster_splits(rows: pl.DataFrame, previous: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """Per-row prior split (by id) and per-cluster prior split (majority of earlier rows in the cluster,
    by id or by the earlier cluster label; ties go to the earlier split in train/validation/test)."""
    by_id = (
        previous.sort(_split_order(pl.col("split")), maintain_order=True)
        .unique("id", keep="first", maintain_order=True)
        .select("id", pl.col("split").alias(_PRIOR))
    )
    via_id = rows.join(by_id, on="id", how="inner").group_by(_CLUSTER, _PRIOR).agg(pl.len().alias("n"))
    labels = previous.drop_nulls("dup_cluster").group_by("dup_cluster", "split").agg(pl.len().alias("n"))
    current_clusters = rows.select(_CLUSTER).unique()
    via_label = current_clusters.join(labels, left_on=_CLUSTER, right_on="dup_cluster", how="inner").select(
        _CLUSTER, pl.col("split").alias(_PRIOR), "n"
    )
    # A new row asking an earlier row's prompt (a new answer to a validation question) follows that
    # prompt's split: otherwise the prompt would be trained on and validated on (exact prompts only).
    prompts = previous.drop_nulls(_PROMPT_HASH).group_by(*_PROMPT_HASH, "split").agg(pl.len().alias("n"))
    via_prompt = (
        rows.drop_nulls(_PROMPT_HASH)
        .join(prompts, on=_PROMPT_HASH, how="inner")
        .group_by(_CLUSTER, "split")
        .agg(pl.col("n").sum())
        .select(_CLUSTER, pl.col("split").alias(_PRIOR), pl.col("n").cast(pl.UInt32))
    )
    votes = pl.concat([via_id, via_label, via_prompt]).group_by(_CLUSTER, _PRIOR).agg(pl.col("n").sum())
    conflicts = votes.group_by(_CLUSTER).len().filter(pl.col("len") > 1).height
    cluster_prior = (
        votes.sort([pl.col("n"), _split_order(pl.col(_PRIOR))], descending=[True, False])
        .unique(_CLUSTER, keep="first", maintain_order=True)
        .select(_CLUSTER, pl.col(_PRIOR).alias("__cluster_prior"))
    )
    return by_id, cluster_prior, conflicts


def _key_rows(frame: pl.LazyFrame, config: SplitConfig, columns: list[str]) -> pl.DataFrame:
    """What the decision needs of every row, collected by the streaming engine (the messages are read
    batch by batch, never held): id, kind, cluster key, stratum and the prompt's hash."""
    if config.stratify_by not in (None, "source") and config.stratify_by not in columns:
        raise ConfigError(f"split: stratify_by column {config.stratify_by!r} is not in the data")
    stratum = (
        pl.lit("")
        if config.stratify_by is None
        else pl.col("source").struct.field("file")
        if config.stratify_by == "source"
        else pl.col(config.stratify_by)
    ).cast(pl.String).fill_null("")
    return (
        frame.select(
            "id",
            "kind",
            cluster_key(columns, config.cluster_column).alias(_CLUSTER),
            stratum.alias("__stratum"),
            prompt_text().alias("__prompt"),
        )
        .select(pl.exclude("__prompt"), *prompt_hashes(pl.col("__prompt")))
        .collect(engine="streaming")
    )


def assign_splits(frame: pl.LazyFrame, config: SplitConfig, seed: int) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Add a `split` column to every row (nothing dropped); returns the frame and a report."""
    rows, report = split_assignment(frame, config, seed)
    return rows.collect(), report


def split_assignment(
    frame: pl.LazyFrame, config: SplitConfig, seed: int, work_dir: Path | None = None, phase=silent_phase
) -> tuple[pl.LazyFrame, dict[str, Any]]:
    """The lazy form of :func:`assign_splits`: the rows with their `split` column (see `row_splits`)."""
    splits, report = row_splits(frame, config, seed, work_dir, phase)
    return with_splits(frame, splits.lazy()), report


def with_splits(rows: pl.LazyFrame, splits: pl.LazyFrame) -> pl.LazyFrame:
    """`rows` with their `split` beside them, by position (`splits` holds one row per row, in order). A
    `split` column from an earlier split stage is replaced, not duplicated. Placed by position, the rows
    stream from their file into the output untouched (a join on the full rows made the streaming engine
    hold them all: 1.1 GB at 850k rows)."""
    return pl.concat([rows.drop("split", strict=False), splits], how="horizontal")


def row_splits(
    frame: pl.LazyFrame, config: SplitConfig, seed: int, work_dir: Path | None = None, phase=silent_phase
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Each row's split (a one-column frame in the frame's row order, a few bytes a row) and the report.
    Only the key columns (id, kind, cluster, stratum and a prompt hash, ~150 B per row) are collected to
    decide; the prompts themselves are grouped out of core (`near_prompt_pairs`, work files under
    `work_dir`). `phase` reports the counted phases (`StageContext.phase`)."""
    columns = frame.collect_schema().names()
    rows = _key_rows(frame, config, columns)
    groups, group_report = group_keys(rows, config, frame, work_dir, phase)
    rows = rows.with_columns(groups.alias(_CLUSTER))

    report: dict[str, Any] = {"seed": seed, "cluster_column": config.cluster_column if config.cluster_column in columns else "id"}
    report["grouping"] = group_report
    prior_row = None
    if config.previous_splits:
        previous = read_previous_splits(Path(config.previous_splits))
        by_id, cluster_prior, conflicts = _prior_cluster_splits(rows.select("id", _CLUSTER, *_PROMPT_HASH), previous)
        prior_row = by_id
        report["previous"] = {"rows": previous.height, "cluster_conflicts": conflicts}
    else:
        cluster_prior = pl.DataFrame(schema={_CLUSTER: pl.String, "__cluster_prior": pl.String})
    rows = rows.drop(_PROMPT_HASH)

    clusters = (
        rows.group_by(_CLUSTER)
        .agg(
            (pl.col("kind") == "sft").sum().alias("n_sft"),
            (pl.col("kind") == "preference").sum().alias("n_preference"),
            pl.len().alias("n"),
            pl.col("__stratum").min().alias("__stratum"),
            pl.col("kind").min().alias("__kind"),
        )
        .with_columns(hash_fraction(pl.lit(str(seed)), pl.col(_CLUSTER)).alias("__u"))
        .join(cluster_prior, on=_CLUSTER, how="left")
        .sort(_CLUSTER)
    )
    fresh = pl.col("__cluster_prior").is_null()
    bounds = (config.train, config.train + config.validation)

    def by_threshold(fraction: pl.Expr) -> pl.Expr:
        return (
            pl.when(fraction < bounds[0])
            .then(pl.lit("train"))
            .when(fraction < bounds[1])
            .then(pl.lit("validation"))
            .otherwise(pl.lit("test"))
        )

    if config.stratify_by is None:
        clusters = clusters.with_columns(by_threshold(pl.col("__u")).alias("__new"))
    else:
        # Within each (kind, stratum), clusters in hash order are cut at the fractions by row count:
        # a cluster goes where the midpoint of its rows falls.
        group = ["__kind", "__stratum"]
        clusters = (
            clusters.sort("__u", _CLUSTER)
            .with_columns(
                pl.when(fresh).then(pl.col("n")).otherwise(0).alias("__w"),
            )
            .with_columns(
                ((pl.col("__w").cum_sum().over(group) - pl.col("__w") / 2) / pl.col("__w").sum().over(group)).alias(
                    "__mid"
                )
            )
            .with_columns(by_threshold(pl.col("__mid")).alias("__new"))
            .drop("__w", "__mid")
            .sort(_CLUSTER)
        )
    clusters = clusters.with_columns(pl.coalesce("__cluster_prior", "__new").alias("split"))

    moved: dict[str, dict[str, int]] = {}
    for target, minimum in (("validation", config.min_validation_rows), ("test", config.min_test_rows)):
        if not minimum:
            continue
        for kind in KIND_FOLDERS:
            count = f"n_{kind}"
            have = clusters.filter(pl.col("split") == target)[count].sum()
            deficit = minimum - have
            if deficit <= 0:
                continue
            candidates = (
                clusters.filter((pl.col("split") == "train") & fresh & (pl.col(count) > 0))
                .sort("__u", _CLUSTER)
                .filter(pl.col(count).cum_sum() - pl.col(count) < deficit)
                .select(_CLUSTER)
            )
            clusters = clusters.with_columns(
                pl.when(pl.col(_CLUSTER).is_in(candidates[_CLUSTER].implode()))
                .then(pl.lit(target))
                .otherwise(pl.col("split"))
                .alias("split")
            )
            moved.setdefault(target, {})[kind] = candidates.height

    # Each row's split, in the frame's row order.
    rows = rows.join(clusters.select(_CLUSTER, "split"), on=_CLUSTER, how="left", maintain_order="left")
    if prior_row is not None:
        # An earlier row keeps its own split even where its cluster has since merged with another.
        rows = rows.join(prior_row, on="id", how="left", maintain_order="left").with_columns(
            pl.coalesce(_PRIOR, "split").alias("split")
        ).drop(_PRIOR)
    splits = rows.select("split")
    if prior_row is not None:
        report["previous"]["rows_matched"] = int(rows.join(prior_row, on="id", how="semi").height)
        report["previous"]["new_clusters"] = int(clusters.filter(fresh).height)

    counts = rows.group_by("kind", "split").len()
    report["clusters"] = clusters.height
    report["counts"] = {
        KIND_FOLDERS[kind]: {
            split: int(counts.filter((pl.col("kind") == kind) & (pl.col("split") == split))["len"].sum())
            for split in SPLITS
        }
        for kind in KIND_FOLDERS
    }
    if moved:
        report["clusters_moved_for_minimum"] = moved
    return splits, report


# ---------------------------------------------------------------- export


def export_frame(rows: pl.LazyFrame | pl.DataFrame, kind: str, cluster_column: str, extra_columns: list[str]) -> pl.LazyFrame:
    """Project rows of one kind onto the exported columns (dup_cluster as a string, id if unknown), lazily."""
    subset = rows.lazy().filter(pl.col("kind") == kind)
    columns = subset.collect_schema().names()
    cluster = cluster_key(columns, cluster_column).alias("dup_cluster")
    missing = [column for column in extra_columns if column not in columns]
    if missing:
        raise ConfigError(f"split: extra_columns {missing} are not in the data")
    return subset.select(*[c for c in EXPORT_COLUMNS[kind] if c != "dup_cluster"], cluster, *extra_columns, "split")


def _previous_rows(folder: Path, kind: str) -> pl.DataFrame | None:
    return read_exported(folder / KIND_FOLDERS[kind])


def _source_key(frame: pl.LazyFrame) -> pl.LazyFrame:
    return frame.select(
        "id",
        pl.col("source").struct.field("file").alias("__file"),
        pl.col("source").struct.field("row").alias("__row"),
    )


def shard_name(split: str, index: int, total: int) -> str:
    return f"{split}-{index:05d}-of-{total:05d}.parquet"


def split_counts(data: pl.LazyFrame | pl.DataFrame) -> dict[str, int]:
    """Rows per split (every split named, 0 where empty), from the `split` column alone."""
    counts = dict(data.lazy().group_by("split").len().collect().iter_rows())
    return {split: int(counts.get(split, 0)) for split in SPLITS}


def write_split_folder(
    folder: Path,
    data: pl.LazyFrame | pl.DataFrame,
    max_shard_rows: int,
    save_to_disk: bool,
    card: str,
    batches: Callable[[], Iterator[pl.DataFrame]] | None = None,
) -> list[str]:
    """Write one dataset folder atomically: shards per split, the card, and optionally a save_to_disk
    copy. An empty split gets no shard (`datasets` cannot load an empty Parquet split); returns the
    splits written.

    The shards are written in one pass over `batches()` (`data` in order, a bounded batch at a time;
    default: slices of `data`, `frame_batches`). The `save_to_disk` copy is built from each split
    collected in memory: `datasets` needs it."""
    data = data.lazy()
    counts = split_counts(data)
    written = [split for split in SPLITS if counts[split]]
    with atomic_dir(folder) as tmp:
        write_shards(tmp, (batches or (lambda: frame_batches(data)))(), counts, max_shard_rows)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        if save_to_disk and written:
            import datasets

            dataset_dict = datasets.DatasetDict(
                {split: datasets.Dataset(data.filter(pl.col("split") == split).drop("split").collect().to_arrow()) for split in written}
            )
            dataset_dict.save_to_disk(str(tmp / "hf_dataset"))
    return written


def frame_batches(frame: pl.LazyFrame, rows: int = ROW_GROUP_ROWS) -> Iterator[pl.DataFrame]:
    """`frame` as consecutive slices of `rows` rows, each collected when the consumer asks for it.
    Pulled, not pushed: `collect_batches` runs ahead of a slower consumer (the Parquet writer) and
    piled up 500 MB of batches at 850k rows. A slice of a Parquet scan reads only the row groups it
    covers; `frame` should be such a scan or in memory (a slice of a filtered plan rescans)."""
    total = frame.select(pl.len()).collect().item()
    for start in range(0, total, rows):
        yield frame.slice(start, rows).collect()


def write_shards(folder: Path, batches: Iterator[pl.DataFrame], counts: dict[str, int], max_shard_rows: int) -> None:
    """`<split>-<i>-of-<n>.parquet` shards of `max_shard_rows` rows, in the batches' order, from one
    pass: each batch's rows are appended to their split's open shard, cut into row groups of
    `ROW_GROUP_ROWS` rows whatever the batch size, so memory holds a batch and one pending row group
    per split. (A sink per shard, filtered by split, scanned the input once per shard, and a sparse
    split's rows kept the whole batches they came from alive: 940 MB to export 850k chat rows.)"""
    from curate.engines.local import ParquetAppender

    totals = {split: -(-count // max_shard_rows) for split, count in counts.items() if count}
    shards: dict[str, tuple[int, ParquetAppender]] = {}
    try:
        for batch in batches:
            for split in totals:
                part = batch.filter(pl.col("split") == split).drop("split")
                while part.height:
                    index, shard = shards.get(split, (-1, None))
                    if shard is None or shard.rows == max_shard_rows:
                        if shard is not None:
                            shard.close(fallback_schema={})
                        index += 1
                        shard = ParquetAppender(folder / shard_name(split, index, totals[split]))
                        shards[split] = (index, shard)
                    take = min(part.height, max_shard_rows - shard.rows)
                    shard.append(part.slice(0, take))
                    part = part.slice(take)
    finally:
        for _, shard in shards.values():
            shard.close(fallback_schema={})


def _config_hash(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def dataset_card(
    kind: str,
    data: pl.LazyFrame | pl.DataFrame,
    config: SplitConfig,
    seed: int,
    manifest: dict[str, Any] | None,
    stage_name: str,
) -> str:
    """README.md for one exported folder: HF front matter (license, configs), counts, sources, the
    stages applied with their configs (filters and thresholds), and config hashes. Reads only the
    `split` and `source` columns of a lazy `data`."""
    data = data.lazy()
    counts = split_counts(data)
    sources = (
        data.group_by(pl.col("source").struct.field("file").alias("file"), "split")
        .len()
        .collect()
        .pivot(on="split", index="file", values="len")
        .fill_null(0)
        .sort("file")
    )
    lines = [
        "---",
        f"license: {json.dumps(config.license)}",
        "configs:",
        "- config_name: default",
        "  data_files:",
    ]
    for split in SPLITS:
        if counts[split]:  # empty splits have no shards
            lines += [f"  - split: {split}", f"    path: {split}-*.parquet"]
    lines += ["---", "", f"# {KIND_FOLDERS[kind]} dataset", ""]
    fmt = "chat messages (`messages`)" if kind == "sft" else "preference pairs (`prompt`, `chosen`, `rejected`)"
    lines += [
        f"Conversational {fmt} in TRL's format, with `id`, `source` and `dup_cluster` (near-duplicate",
        "cluster; every cluster lies in exactly one split).",
        *_carried_columns_line(data.collect_schema(), kind),
        "",
        "```python",
        "from datasets import load_dataset",
        'ds = load_dataset("parquet", data_files={'
        + ", ".join(f'"{s}": "{KIND_FOLDERS[kind]}/{s}-*.parquet"' for s in SPLITS if counts[s])
        + "})",
        "```",
        "",
        "A split with no rows has no shard files (`datasets` cannot load an empty Parquet split).",
        "",
        "## Counts",
        "",
        "| split | rows |",
        "|---|---|",
    ]
    lines += [f"| {split} | {counts[split]} |" for split in SPLITS]
    lines += [f"| total | {sum(counts.values())} |", "", "## Sources", "", "| file | " + " | ".join(SPLITS) + " |"]
    lines += ["|---|" + "---|" * len(SPLITS)]
    for row in sources.iter_rows(named=True):
        lines.append(f"| {row['file']} | " + " | ".join(str(row.get(split, 0) or 0) for split in SPLITS) + " |")
    split_settings = config.model_dump(mode="json")
    lines += [
        "",
        "## Split",
        "",
        f"- fractions: train {config.train:g}, validation {config.validation:g}, test {config.test:g}",
        f"- seed: {seed}; assignment by sha256(seed, group): {config.cluster_column} or id, joined with rows whose "
        f"prompts match (group_prompts: {config.group_prompts}, threshold {config.prompt_threshold:g})",
        f"- stratified by: {config.stratify_by or 'none'}",
        f"- minimum validation rows: {config.min_validation_rows}; minimum test rows: {config.min_test_rows}",
        f"- previous splits: {config.previous_splits or 'none'}",
        f"- license: {config.license}",
        f"- split config hash: `{_config_hash(split_settings)}`",
    ]
    if manifest is None:
        lines += [
            "",
            "## Pipeline",
            "",
            "Written when the split stage ran; `curate report` (run at the end of every `curate run`) rewrites",
            "this card with the stages applied, their configs (filters and thresholds) and the pipeline hash.",
        ]
    else:
        lines += pipeline_card_lines(manifest, stage_name)
    return "\n".join(lines) + "\n"


def _carried_columns_line(schema: pl.Schema, kind: str) -> list[str]:
    """The input columns the split carries besides the canonical ones (`extra_columns`), struct fields named."""
    extra = [name for name in schema.names() if name not in EXPORT_COLUMNS[kind] and name != "split"]
    described = [
        f"`{name}` ({', '.join(schema[name].to_schema())})" if isinstance(schema[name], pl.Struct) else f"`{name}`"
        for name in extra
    ]
    return ["", "Carried input columns: " + ", ".join(described) + "."] if extra else []


def _stage_configs(manifest: dict[str, Any]) -> dict[str, dict]:
    pipeline = manifest.get("pipeline") if isinstance(manifest.get("pipeline"), dict) else {}
    config = pipeline.get("config") if isinstance(pipeline.get("config"), dict) else {}
    return {
        str(stage.get("name")): stage for stage in config.get("stages") or [] if isinstance(stage, dict)
    }


def pipeline_card_lines(manifest: dict[str, Any], stage_name: str) -> list[str]:
    """The card's pipeline section: config hash, then each stage up to the split with rows and config."""
    pipeline = manifest.get("pipeline") if isinstance(manifest.get("pipeline"), dict) else {}
    lines = ["", "## Pipeline", ""]
    if pipeline.get("name"):
        lines.append(f"- pipeline: {pipeline['name']}")
    if pipeline.get("config_hash"):
        lines.append(f"- pipeline config hash: `{pipeline['config_hash']}`")
    configs = _stage_configs(manifest)
    lines += ["", "### Stages applied", "", "| stage | type | rows in | kept | dropped | config |", "|---|---|---|---|---|---|"]
    for stage in manifest.get("stages") or []:
        if not isinstance(stage, dict):
            continue
        name = str(stage.get("name", ""))
        config = (configs.get(name) or {}).get("config", {})
        config_text = json.dumps(config, sort_keys=True, ensure_ascii=False).replace("|", "\\|")
        dropped = stage.get("rows_dropped", 0) or 0
        dropped += stage.get("rows_quarantined", 0) or 0
        lines.append(
            f"| {name} | {stage.get('type', '')} | {stage.get('rows_in', '')} | {stage.get('rows_out', '')} | {dropped} | `{config_text}` |"
        )
        if name == stage_name:
            break
    reasons = []
    for stage in manifest.get("stages") or []:
        if not isinstance(stage, dict):
            continue
        for reason, count in sorted((stage.get("dropped_by_reason") or {}).items()):
            reasons.append(f"| {stage.get('name', '')} | {reason} | {count} |")
        for reason, count in sorted((stage.get("quarantined_by_reason") or {}).items()):
            reasons.append(f"| {stage.get('name', '')} | quarantined: {reason} | {count} |")
        if stage.get("name") == stage_name:
            break
    if reasons:
        lines += ["", "### Rows removed, by reason", "", "| stage | reason | rows |", "|---|---|---|", *reasons]
    return lines


def scan_exported(folder: Path) -> pl.LazyFrame | None:
    """The rows of an exported folder, lazily, with `split` taken from the shard names."""
    frames = [
        pl.scan_parquet(path, glob=False).with_columns(pl.lit(split).alias("split"))
        for split in SPLITS
        for path in sorted(folder.glob(f"{split}-*.parquet"))
    ]
    return pl.concat(frames, how="diagonal_relaxed") if frames else None


def read_exported(folder: Path) -> pl.DataFrame | None:
    """The rows of an exported folder, with `split` taken from the shard names (in memory)."""
    frames = scan_exported(folder)
    return frames.collect() if frames is not None else None


def refresh_dataset_cards(run_dir: Path, manifest: dict[str, Any]) -> list[Path]:
    """Rewrite sft/README.md and pref/README.md from the finished run's manifest (the split stage runs
    before the manifest exists, so its cards cannot name the stages yet). Returns the cards written."""
    from curate.atomic import write_text

    split_stages = [s for s in manifest.get("stages") or [] if isinstance(s, dict) and s.get("type") == "split"]
    if not split_stages:
        return []
    stage_name = str(split_stages[-1].get("name"))
    raw_config = (_stage_configs(manifest).get(stage_name) or {}).get("config") or {}
    try:
        config = SplitConfig.model_validate(raw_config)
    except ValueError:
        return []
    pipeline = manifest.get("pipeline") if isinstance(manifest.get("pipeline"), dict) else {}
    pipeline_seed = (pipeline.get("config") or {}).get("seed", 0) if isinstance(pipeline.get("config"), dict) else 0
    seed = config.seed if config.seed is not None else int(pipeline_seed or 0)
    written = []
    for kind, sub in KIND_FOLDERS.items():
        data = scan_exported(run_dir / sub)  # the card reads its split and source columns only
        if data is None or not (run_dir / sub / "README.md").exists() or not is_owned(run_dir / sub, "curate"):
            continue
        target = run_dir / sub / "README.md"
        write_text(target, dataset_card(kind, data, config, seed, manifest, stage_name))
        written.append(target)
    return written


def export_splits(
    rows: pl.LazyFrame | pl.DataFrame,
    out_dir: Path,
    config: SplitConfig,
    seed: int,
    stage_name: str = "split",
) -> dict[str, Any]:
    """Write `out_dir/sft` and `out_dir/pref` from the rows with their `split` (lazy: a scan of the
    stage's output is streamed into the shards, never collected); returns counts per folder and split."""
    manifest = None  # the run's manifest is written after all stages: refresh_dataset_cards adds it
    report: dict[str, Any] = {"folders": {}}
    for kind, sub in KIND_FOLDERS.items():
        data = export_frame(rows, kind, config.cluster_column, config.extra_columns)
        absent = None
        if config.previous_splits and config.include_previous:
            absent = _absent_previous_rows(data, Path(config.previous_splits), kind)
        combined = data if absent is None else pl.concat([absent.lazy(), data], how="diagonal_relaxed")

        def batches(kind=kind, absent=absent, data=data) -> Iterator[pl.DataFrame]:
            # `rows` is sliced (a scan reads only the slice's row groups), then projected, batch by batch.
            if absent is not None:
                yield pl.concat([absent.lazy(), data.limit(0)], how="diagonal_relaxed").collect()
            for rows_batch in frame_batches(rows.lazy()):
                batch = export_frame(rows_batch, kind, config.cluster_column, config.extra_columns)
                if absent is not None:
                    batch = pl.concat([absent.clear().lazy(), batch], how="diagonal_relaxed")
                yield batch.collect()

        card = dataset_card(kind, combined, config, seed, manifest, stage_name)
        if is_owned(out_dir, "curate"):
            record(out_dir, sub)  # in a run dir: this run's export (an earlier config's is removed as stale)
        written = write_split_folder(out_dir / sub, combined, config.max_shard_rows, config.save_to_disk, card, batches)
        report["folders"][sub] = {
            "path": str(out_dir / sub),
            "splits_written": written,
            "counts": split_counts(combined),
            "carried_from_previous": 0 if absent is None else absent.height,
        }
    return report


def _absent_previous_rows(data: pl.LazyFrame, folder: Path, kind: str) -> pl.DataFrame | None:
    """The earlier export's rows that are not in this input (same id, file and row), carried over
    as-is ahead of this run's rows. The earlier export is read into memory: bounded by what was
    exported before, not streamed."""
    previous = _previous_rows(folder, kind)
    if previous is None or not previous.height:
        return None
    columns = data.collect_schema().names()
    previous = previous.select([column for column in columns if column in previous.columns])
    return (
        previous.with_columns(
            pl.col("source").struct.field("file").alias("__file"),
            pl.col("source").struct.field("row").alias("__row"),
        )
        .join(_source_key(data).collect(), on=["id", "__file", "__row"], how="anti", maintain_order="left")
        .drop("__file", "__row")
    )
