"""The tag stage's per-source-file evidence is a statistic of its whole input, never of a batch."""

from __future__ import annotations

import json

import polars as pl
import yaml
from filters_helpers import chat

from curate.runner import run_pipeline

OPEN_REPLY = "Thanks for the details here is what I found in the logs"  # no full stop, no other sign of a cut


def test_open_end_in_a_punctuated_source_is_flagged_whatever_the_batch_size(tmp_path):
    # 29 replies from one file end with a full stop, one does not: that file punctuates (>= 90% of >= 20
    # rows), so its open reply was cut. With batches of 7 no batch holds 20 rows of the file.
    rows = [chat(f"How do I reset my router, ticket {i}?", f"Hold the reset button for {i % 9 + 2} seconds.") for i in range(29)]
    rows.insert(17, chat("Any news on my export?", OPEN_REPLY))
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    flags = {}
    for batch_rows in (7, None):
        pipeline = {"name": "t", "run_dir": f"run-{batch_rows}", "inputs": [{"path": "chats.jsonl"}], "stages": [{"type": "tag"}]}
        if batch_rows:
            pipeline["engine"] = {"batch_rows": batch_rows}
        path = tmp_path / f"run-{batch_rows}.yaml"
        path.write_text(yaml.safe_dump(pipeline))
        result = run_pipeline(path, report=False)
        tagged = pl.read_parquet(result.run_dir / "tag" / "data.parquet")
        flags[batch_rows] = tagged.filter(pl.col("assistant_truncation").is_not_null()).select(
            pl.col("messages").list.last().struct.field("content"), "assistant_truncation"
        ).rows()
    assert flags[7] == flags[None] == [(OPEN_REPLY, "open_end_in_punctuated_source")]
