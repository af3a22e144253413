"""The split's export streams: `export_splits` takes the rows lazily (a scan of the stage's output, as
the stage gives them) and writes the same shards, with the same rows in the same order, as from the rows
in memory; shards are written in row groups of `ROW_GROUP_ROWS` rows, so a writer holds one row group,
never a whole shard."""

from __future__ import annotations

import pyarrow.parquet as pq
import polars as pl

from curate.atomic import ROW_GROUP_ROWS
from curate.records import canonical_frame
from curate.split import SPLITS, SplitConfig, assign_splits, export_splits, read_exported
from split_helpers import planted_frame


def _files(folder):
    """Every exported file's bytes (not the ownership records, which carry their creation time)."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.startswith(".curate")
    }


def test_lazy_export_equals_the_in_memory_rows_shard_by_shard(tmp_path):
    config = SplitConfig(train=0.6, validation=0.2, test=0.2, max_shard_rows=25, extra_columns=["topic"])
    frame = planted_frame(sft=120, pref=60).with_columns((pl.col("source").struct.field("row") % 3).cast(pl.String).alias("topic"))
    rows, _ = assign_splits(frame.lazy(), config, seed=0)
    written = tmp_path / "data.parquet"
    rows.write_parquet(written)

    export_splits(pl.scan_parquet(written), tmp_path / "lazy", config, seed=0)
    export_splits(rows, tmp_path / "eager", config, seed=0)
    assert _files(tmp_path / "lazy") == _files(tmp_path / "eager")

    # Each shard holds the rows the in-memory export wrote: kind, then split, in input order, cut every 25.
    for kind, folder, columns in (("sft", "sft", ["id", "messages"]), ("preference", "pref", ["id", "prompt", "chosen", "rejected"])):
        for split in SPLITS:
            expected = rows.filter((pl.col("kind") == kind) & (pl.col("split") == split)).select(*columns, "source", "dup_cluster", "topic")
            total = -(-expected.height // 25)
            for index in range(total):
                shard = pl.read_parquet(tmp_path / "lazy" / folder / f"{split}-{index:05d}-of-{total:05d}.parquet")
                assert shard.select(*columns, "source", "dup_cluster", "topic").equals(expected.slice(index * 25, 25))
    exported = read_exported(tmp_path / "lazy" / "sft")
    assert exported.height == rows.filter(pl.col("kind") == "sft").height


def test_shards_are_written_in_bounded_row_groups(tmp_path):
    count = 2 * ROW_GROUP_ROWS + 17
    records = [
        {"messages": [{"role": "user", "content": f"question {index}?"}, {"role": "assistant", "content": f"answer {index}."}]}
        for index in range(count)
    ]
    config = SplitConfig(train=1.0, validation=0.0, test=0.0, group_prompts="exact")
    rows, _ = assign_splits(canonical_frame(records, "raw/chats.jsonl").lazy(), config, seed=0)
    rows.write_parquet(tmp_path / "data.parquet")
    report = export_splits(pl.scan_parquet(tmp_path / "data.parquet"), tmp_path / "out", config, seed=0)
    assert report["folders"]["sft"]["counts"] == {"train": count, "validation": 0, "test": 0}
    shard = pq.ParquetFile(tmp_path / "out" / "sft" / "train-00000-of-00001.parquet").metadata
    assert [shard.row_group(i).num_rows for i in range(shard.num_row_groups)] == [ROW_GROUP_ROWS, ROW_GROUP_ROWS, 17]


def test_previous_rows_then_new_rows_fill_the_shards_in_order_across_batches(tmp_path):
    """The export is one pass over bounded batches: the earlier export's rows first, then this input's
    rows batch by batch, each appended to its split's open shard; shard cuts (7,000 rows) fall inside
    batches (10,000 rows) and nothing is reordered, dropped or repeated."""

    def records(prefix: str, count: int) -> list[dict]:
        return [
            {"messages": [{"role": "user", "content": f"{prefix} question {index}?"}, {"role": "assistant", "content": f"answer {index}."}]}
            for index in range(count)
        ]

    config = SplitConfig(train=0.8, validation=0.1, test=0.1, group_prompts="exact", max_shard_rows=7_000)
    old_rows, _ = assign_splits(canonical_frame(records("old", 300), "raw/old.jsonl").lazy(), config, seed=0)
    export_splits(old_rows, tmp_path / "v1", config, seed=0)
    new_config = config.model_copy(update={"previous_splits": str(tmp_path / "v1")})
    rows, _ = assign_splits(canonical_frame(records("new", ROW_GROUP_ROWS + 4_000), "raw/new.jsonl").lazy(), new_config, seed=0)
    rows.write_parquet(tmp_path / "data.parquet", row_group_size=ROW_GROUP_ROWS)

    report = export_splits(pl.scan_parquet(tmp_path / "data.parquet"), tmp_path / "v2", new_config, seed=0)
    assert report["folders"]["sft"]["carried_from_previous"] == 300
    previous = read_exported(tmp_path / "v1" / "sft")
    for split in SPLITS:
        expected = pl.concat([previous.filter(pl.col("split") == split).select("id"), rows.filter(pl.col("split") == split).select("id")])
        shards = sorted((tmp_path / "v2" / "sft").glob(f"{split}-*.parquet"))
        assert len(shards) == -(-expected.height // 7_000)
        assert [pq.ParquetFile(shard).metadata.num_rows for shard in shards[:-1]] == [7_000] * (len(shards) - 1)
        exported = pl.concat([pl.read_parquet(shard, columns=["id"]) for shard in shards])
        assert exported["id"].to_list() == expected["id"].to_list()
