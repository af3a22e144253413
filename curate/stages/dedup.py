"""The `dedup` stage: exact and MinHash near-duplicate removal in one pass (logic in `curate.dedup`).

One stage type with switches (`exact`, `near`) rather than two types, because both share the key text,
the keep policy and the cluster ids: an exact duplicate of a row that is itself a near duplicate must
end up in the same `dup_cluster`, which two separate stages could not see.

Kept rows gain `dup_cluster` (the id of the cluster's kept row; a unique row's own id), which the split
stage uses to keep a cluster inside one split. Dropped rows carry `reason` (`exact_duplicate` or
`near_duplicate`), `duplicate_of` (the id they duplicate: the kept row, or for an exact duplicate its
exact twin), `jaccard_estimated` (from the signatures) and `jaccard_verified` (exact, on the shingle
sets; null when `verify: false`), and their `dup_cluster`.

What counts as a duplicate (normalizations, preference pairs, number variants): curate.dedup's module
docstring and docs/dedup.md.

With `save_index: true` (default) the stage writes `<stage dir>/index/` (signatures, band hashes,
shingle-hash sets and exact-key hashes as Parquet); give that folder as `index_path` to a later run to
deduplicate a new batch against everything kept so far.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from curate.dedup import DedupConfig, MinHashIndex, deduplicate
from curate.errors import ConfigError
from curate.stage import StageContext, StageOutput, drop_rows, register_stage

DETAIL_COLUMNS = ("duplicate_of", "jaccard_estimated", "jaccard_verified")


def _index_files(config: DedupConfig, ctx: StageContext) -> list[Path]:
    if not config.index_path:
        return []
    return MinHashIndex.files(ctx.resolve(config.index_path))


@register_stage("dedup", config=DedupConfig, version="2", extra_inputs=_index_files)
def dedup_stage(frame: pl.LazyFrame, config: DedupConfig, ctx: StageContext) -> StageOutput:
    """Remove exact and MinHash near duplicates; every row gets a dup_cluster id."""
    data = frame.collect().with_row_index("__row")
    index = None
    if config.index_path:
        index_dir = ctx.resolve(config.index_path)
        if index_dir.resolve() == (ctx.stage_dir / "index").resolve():
            raise ConfigError(
                f"stage {ctx.name!r}: index_path {config.index_path} is this stage's own output; point it at an "
                "earlier run's index (this stage writes the extended index to its own folder)"
            )
        index = MinHashIndex.load(index_dir, config.settings())
    outcome = deduplicate(data, config, index=index, progress=ctx.progress)
    if outcome.index is not None:
        target = ctx.stage_dir / "index"
        outcome.index.save(target)
        outcome.report["index"]["path"] = str(target)
    # Replace any dup_cluster from an earlier dedup stage with this stage's decision.
    joined = data.drop("dup_cluster", strict=False).join(outcome.decisions, on="__row", how="left").sort("__row")
    kept = joined.filter(pl.col("reason").is_null()).drop("__row", "reason", *DETAIL_COLUMNS)
    dropped_rows = joined.filter(pl.col("reason").is_not_null()).drop("__row")
    dropped = drop_rows(dropped_rows.lazy(), ctx.name, pl.col("reason"))
    return StageOutput(kept=kept.lazy(), dropped=dropped, report=outcome.report)
