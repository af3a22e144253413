"""The `dedup` stage: exact and MinHash near-duplicate removal in one pass (logic in `curate.dedup`).

One stage type with switches (`exact`, `near`) rather than two types, because both share the key text,
the keep policy and the cluster ids: an exact duplicate of a row that is itself a near duplicate must
end up in the same `dup_cluster`, which two separate stages could not see.

Every row gets `dup_cluster`: the connected component of verified near-duplicate edges (and exact
twins) it belongs to, named by the id of the component's best kept row (a unique row: its own id).
The split stage keeps a component inside one split. Dropped rows carry `reason` (`exact_duplicate` or
`near_duplicate`), `duplicate_of` (the id they duplicate: the kept row, or for an exact duplicate its
exact twin), `jaccard_estimated` (from the signatures) and `jaccard_verified` (exact, on the shingle
sets; null when `verify: false`). Which rows of a component are kept: curate/dedup/__init__.py and
docs/dedup.md.

On the local engine the stage runs out of core (curate/dedup/stream.py): the input is never collected,
sketches live in a work folder of its own under the stage folder (removed at the end), and the decisions
(a few small columns per row) are joined back to the rows lazily, so the engine streams the outputs.
On the Ray engine, `curate.dedup.distributed` is its distributed form (same decisions).

With `save_index: true` (default) the stage writes `<stage dir>/index/` (signatures, band hashes,
shingle-hash sets and exact-key hashes as Parquet); give that folder as `index_path` to a later run to
deduplicate a new batch against everything kept so far.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from curate.dedup import DedupConfig, MinHashIndex
from curate.dedup.distributed import dedup_distributed
from curate.dedup.stream import deduplicate_out_of_core
from curate.errors import ConfigError
from curate.stage import BatchOutput, StageContext, StageOutput, decisions_for_batch, drop_rows, register_stage

DETAIL_COLUMNS = ("duplicate_of", "jaccard_estimated", "jaccard_verified")


def _index_files(config: DedupConfig, ctx: StageContext) -> list[Path]:
    if not config.index_path:
        return []
    return MinHashIndex.files(ctx.resolve(config.index_path))


def load_index(config: DedupConfig, ctx: StageContext) -> MinHashIndex | None:
    if not config.index_path:
        return None
    index_dir = ctx.resolve(config.index_path)
    if index_dir.resolve() == (ctx.stage_dir / "index").resolve():
        raise ConfigError(
            f"stage {ctx.name!r}: index_path {config.index_path} is this stage's own output; point it at an "
            "earlier run's index (this stage writes the extended index to its own folder)"
        )
    return MinHashIndex.load(index_dir, config.settings())


def split_decided(rows: pl.LazyFrame, decisions: pl.LazyFrame, stage_name: str) -> tuple[pl.LazyFrame, pl.LazyFrame]:
    """Rows side by side with their decisions (one per row, in input order): (kept, dropped), both
    lazy. A horizontal concat streams both in lockstep; a join would build a table of one side."""
    # Replace any dup_cluster from an earlier dedup stage with this stage's decision.
    joined = pl.concat([rows.drop("dup_cluster", strict=False), decisions.drop("__row")], how="horizontal")
    kept = joined.filter(pl.col("reason").is_null()).drop("reason", *DETAIL_COLUMNS)
    dropped = drop_rows(joined.filter(pl.col("reason").is_not_null()), stage_name, pl.col("reason"))
    return kept, dropped


@register_stage("dedup", config=DedupConfig, version="3", extra_inputs=_index_files, distributed=dedup_distributed)
def dedup_stage(frame: pl.LazyFrame, config: DedupConfig, ctx: StageContext) -> StageOutput:
    """Remove exact and MinHash near duplicates; every row gets a dup_cluster id."""
    index = load_index(config, ctx)
    outcome = deduplicate_out_of_core(frame, config, ctx.stage_dir, index=index, progress=ctx.progress, phase=ctx.phase)
    if "index" in outcome.report:
        outcome.report["index"]["path"] = str(ctx.stage_dir / "index")
    decisions = outcome.decisions
    kept, dropped = split_decided(frame, decisions.lazy(), ctx.name)

    def split_batch(batch: pl.DataFrame, offset: int) -> BatchOutput:
        part = decisions_for_batch(decisions, offset, batch.height, "dedup")
        batch_kept, batch_dropped = split_decided(batch.lazy(), part.lazy(), ctx.name)
        return BatchOutput(kept=batch_kept.collect(), dropped=batch_dropped.collect())

    return StageOutput(kept=kept, dropped=dropped, report=outcome.report, split_batch=split_batch)
