"""Frames with planted near-duplicate clusters, and a hand-built run directory in the layout the
runner writes (per-stage data.parquet / dropped.parquet, quarantine.parquet, manifest.json), for the
split, mix and report tests."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from curate.records import canonical_frame
from curate.split import SplitConfig, assign_splits, export_splits
from curate.stage import drop_rows

TOPICS = ["password reset", "refund", "shipping delay", "invoice copy", "account locked", "two-factor setup"]


def sft_records(count: int, cluster_size: int = 3, prefix: str = "q", file_tag: str = "") -> list[dict]:
    """`count` conversations in clusters of `cluster_size` near-duplicates (same question, small edits);
    `dup_cluster` names the cluster as a dedup stage would."""
    records = []
    for index in range(count):
        cluster = index // cluster_size
        variant = index % cluster_size
        topic = TOPICS[cluster % len(TOPICS)]
        question = f"{prefix}{cluster}{file_tag}: how do I handle a {topic} for order {cluster * 7919}?" + "!" * variant
        answer = f"For the {topic} on order {cluster * 7919}, open Settings and follow the steps." + (" " * 0) + (
            " Thanks." * variant
        ) + " Details." * (cluster % 9)
        records.append(
            {
                "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
                "dup_cluster": f"{prefix}-cluster-{cluster}{file_tag}",
            }
        )
    return records


def pref_records(count: int, cluster_size: int = 2, prefix: str = "p") -> list[dict]:
    records = []
    for index in range(count):
        cluster = index // cluster_size
        variant = index % cluster_size
        records.append(
            {
                "prompt": f"{prefix}{cluster}: my {TOPICS[cluster % len(TOPICS)]} is not working" + "?" * (variant + 1),
                "chosen": f"Sorry about the trouble with case {cluster}; here is what to do." + " Step." * (cluster % 5),
                "rejected": "Not my problem.",
                "dup_cluster": f"{prefix}-cluster-{cluster}",
            }
        )
    return records


def planted_frame(sft: int = 300, pref: int = 120, files: int = 2) -> pl.DataFrame:
    """SFT and preference rows from several source files, with planted near-duplicate clusters."""
    frames = []
    per_file = sft // files
    for file_index in range(files):
        frames.append(canonical_frame(sft_records(per_file, prefix=f"f{file_index}q"), f"raw/support_{file_index}.jsonl"))
    frames.append(canonical_frame(pref_records(pref), "raw/prefs.jsonl"))
    return pl.concat(frames, how="diagonal_relaxed")


def write_run_dir(run_dir: Path, frame: pl.DataFrame | None = None, split_config: SplitConfig | None = None) -> Path:
    """A run directory like the runner's: ingest → dedup → tag → filter → split, with real drops."""
    frame = planted_frame() if frame is None else frame
    run_dir.mkdir(parents=True, exist_ok=True)
    stages, configs = [], []

    def write_stage(name: str, stage_type: str, rows_in: int, kept: pl.DataFrame, dropped: pl.DataFrame | None, config: dict):
        folder = run_dir / name
        folder.mkdir(exist_ok=True)
        kept.write_parquet(folder / "data.parquet")
        if dropped is not None:
            dropped.write_parquet(folder / "dropped.parquet")
        reasons = {} if dropped is None else dict(dropped.group_by("reason").len().sort("reason").iter_rows())
        stages.append(
            {
                "name": name,
                "type": stage_type,
                "rows_in": rows_in,
                "rows_out": kept.height,
                "rows_dropped": 0 if dropped is None else dropped.height,
                "dropped_by_reason": reasons,
                "report": {},
            }
        )
        configs.append({"name": name, "type": stage_type, "config": config})

    pl.DataFrame(
        {
            "file": ["raw/support_0.jsonl"] * 3 + ["raw/prefs.jsonl"],
            "row": [4, 9, 17, 2],
            "reason": ["invalid_json", "invalid_json", "missing_field", "unknown_role"],
            "field": [None, None, "messages", "role"],
            "detail": ["", "", "", ""],
            "raw": ["{", "{", "{}", "{}"],
        }
    ).write_parquet(run_dir / "quarantine.parquet")
    ingested = frame.drop("dup_cluster")
    write_stage("ingest", "ingest", ingested.height, ingested, None, {})
    # dedup keeps the first row of every cluster of 3+ and drops the rest as near duplicates
    rank = pl.int_range(pl.len()).over("dup_cluster")
    kept = frame.filter((rank < 2) | (pl.col("kind") == "preference"))
    dropped = drop_rows(frame.filter(~((rank < 2) | (pl.col("kind") == "preference"))).lazy(), "dedup", "near_duplicate").collect()
    write_stage("dedup", "dedup", frame.height, kept, dropped, {"threshold": 0.8})
    chars = pl.sum_horizontal(
        pl.col(column).list.eval(pl.element().struct.field("content").str.len_chars()).list.sum().fill_null(0)
        for column in ("messages", "prompt", "chosen")
    )
    tagged = kept.with_columns(
        pl.when(pl.int_range(pl.len()) % 11 == 0).then(pl.lit("de")).otherwise(pl.lit("en")).alias("lang"),
        (chars // 4).alias("n_tokens"),
        pl.when(pl.int_range(pl.len()) % 3 == 0).then(pl.lit("billing")).otherwise(pl.lit("account")).alias("topic_label"),
    )
    write_stage("tag", "tag", kept.height, tagged, None, {})
    keep = (pl.col("lang") == "en") & (pl.col("n_tokens") > 26)
    filtered = tagged.filter(keep)
    reason = pl.when(pl.col("lang") != "en").then(pl.lit("lang_not_allowed")).otherwise(pl.lit("too_short"))
    write_stage(
        "filter", "filter", tagged.height, filtered,
        drop_rows(tagged.filter(~keep).lazy(), "filter", reason).collect(), {"min_tokens": 27, "langs": ["en"]},
    )
    stages[0].update(rows_in=ingested.height + 4, rows_quarantined=4, quarantined_by_reason={"invalid_json": 2, "missing_field": 1, "unknown_role": 1})
    config = split_config or SplitConfig(train=0.8, validation=0.1, test=0.1, min_validation_rows=5)
    rows, _ = assign_splits(filtered.lazy(), config, 7)
    write_stage("split", "split", filtered.height, rows, None, config.model_dump(mode="json"))
    export_splits(rows, run_dir, config, 7)
    dropped_total = sum(stage["rows_dropped"] for stage in stages[1:])
    manifest = {
        "pipeline": {"name": "planted", "config_hash": "abc123", "config": {"seed": 7, "stages": configs[1:]}},
        "run_dir": str(run_dir),
        "stages": stages,
        "accounting": {
            "rows_in": stages[0]["rows_in"],
            "kept": stages[-1]["rows_out"],
            "dropped": dropped_total,
            "quarantined": stages[0]["rows_quarantined"],
            "reconciled": stages[0]["rows_in"] == stages[-1]["rows_out"] + dropped_total + stages[0]["rows_quarantined"],
            "quarantined_by_reason": stages[0]["quarantined_by_reason"],
            "dropped_by_stage_reason": {s["name"]: s["dropped_by_reason"] for s in stages[1:] if s["rows_dropped"]},
        },
    }
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    return run_dir
