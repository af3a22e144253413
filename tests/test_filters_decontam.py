"""Decontamination: rows covering most 12-grams of an evaluation item are flagged/dropped with its id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from filters_helpers import chat, run_stage

from curate.errors import InputFileError

EVAL_ANSWER = (
    "PAY-417 means the card's billing address didn't match what the bank has on file, so please update "
    "the address in Settings and retry the payment."
)


def write_eval(path: Path, with_ids: bool = True) -> Path:
    items = [
        {"messages": [{"role": "user", "content": "Why is my card rejected with PAY-417?"}, {"role": "assistant", "content": EVAL_ANSWER}]},
        {"messages": [{"role": "user", "content": "How do I export my photos?"}, {"role": "assistant", "content": "Open Photos, select them all and choose Export from the menu at the top right."}]},
    ]
    if with_ids:
        items[0]["id"], items[1]["id"] = "eval-0001", "eval-0002"
    path.write_text("\n".join(json.dumps(item) for item in items) + "\n")
    return path


def training_rows() -> list[dict]:
    eleven = "match what the bank has on file, so please update the"  # 11 normalized words of the answer
    assert eleven in EVAL_ANSWER
    return [
        # a verbatim copy of question and answer, different case and punctuation, with a greeting added
        chat("Why is my card rejected with PAY-417?", "Hello! " + EVAL_ANSWER.upper().replace(",", "") + " Anything else?"),
        # 11 consecutive eval words only: below the 12-gram
        chat("Card trouble", "Sorry, " + eleven + " form and then call us."),
        chat("Where is my parcel?", "It shipped yesterday and should arrive on Friday."),
        # the first half of the answer only: shares 12-grams, but well under min_overlap of the item
        chat("Card?", " ".join(EVAL_ANSWER.split()[:16]) + " Let us know."),
    ]


def test_flag_mode_marks_matching_row_with_eval_id(tmp_path):
    eval_file = write_eval(tmp_path / "eval.jsonl")
    kept, dropped, report = run_stage("decontaminate", training_rows(), {"eval_files": [str(eval_file)], "mode": "flag"}, tmp_path)
    assert dropped is None
    assert kept["contamination_eval_id"].to_list() == ["eval-0001", None, None, None]
    assert kept["contamination_overlap"][0] > 0.6  # 12-grams across the inserted greeting do not match
    assert kept["contamination_ngram_matches"][1] == 0 and kept["contamination_overlap"][1] == 0.0
    assert 0 < kept["contamination_overlap"][3] < 0.6 and kept["contamination_ngram_matches"][3] > 0
    assert report["contaminated_rows"] == 1 and report["eval_items"] == 2


def test_drop_mode_and_file_row_ids(tmp_path):
    eval_file = write_eval(tmp_path / "eval.jsonl", with_ids=False)
    kept, dropped, report = run_stage("decontaminate", training_rows(), {"eval_files": [str(eval_file)]}, tmp_path, name="decon")
    assert kept.height == 3 and dropped.height == 1
    assert dropped["reason"].to_list() == ["contaminated"] and dropped["stage"].to_list() == ["decon"]
    assert dropped["contamination_eval_id"].to_list() == [f"{eval_file}:1"]


def test_smaller_ngram_and_overlap_catch_shorter_copies(tmp_path):
    eval_file = write_eval(tmp_path / "eval.jsonl")
    config = {"eval_files": [str(eval_file)], "ngram": 8, "min_overlap": 0.1, "mode": "flag"}
    kept, _, _ = run_stage("decontaminate", training_rows(), config, tmp_path)
    assert kept["contamination_eval_id"].to_list() == ["eval-0001", "eval-0001", None, "eval-0001"]


def test_missing_eval_file_is_a_one_line_error(tmp_path):
    with pytest.raises(InputFileError, match="not found"):
        run_stage("decontaminate", training_rows(), {"eval_files": [str(tmp_path / "none.jsonl")]}, tmp_path)


@pytest.mark.parametrize("container", ["jsonl.gz", "json-lines", "csv", "parquet"])
def test_eval_ids_come_from_the_ingested_rows_in_any_container(tmp_path, container):
    """The raw `id` travels on the row ingest makes (its `metadata`); before, decontam re-read the raw file
    itself and lost ids in what only ingest can read (compressed files, a .json file of JSON lines)."""
    import gzip

    import polars as pl

    items = json.loads("[" + ",".join(write_eval(tmp_path / "plain.jsonl").read_text().splitlines()) + "]")
    if container == "jsonl.gz":
        eval_file = tmp_path / "eval.jsonl.gz"
        eval_file.write_bytes(gzip.compress("".join(json.dumps(item) + "\n" for item in items).encode()))
    elif container == "json-lines":
        eval_file = tmp_path / "eval.json"
        eval_file.write_text("".join(json.dumps(item) + "\n" for item in items))
    else:
        flat = pl.DataFrame(
            {"id": [item["id"] for item in items],
             "instruction": [item["messages"][0]["content"] for item in items],
             "output": [item["messages"][1]["content"] for item in items]}
        )  # fmt: skip
        eval_file = tmp_path / f"eval.{container}"
        flat.write_csv(eval_file) if container == "csv" else flat.write_parquet(eval_file)
    kept, _, report = run_stage("decontaminate", training_rows(), {"eval_files": [str(eval_file)], "mode": "flag"}, tmp_path)
    assert kept["contamination_eval_id"].to_list() == ["eval-0001", None, None, None]
    assert report["eval_items"] == 2


def test_eval_ids_of_a_file_this_tool_wrote_are_its_row_ids(tmp_path):
    from curate.ingest import read_canonical

    records, _ = read_canonical([write_eval(tmp_path / "eval.jsonl", with_ids=False)])
    written = tmp_path / "eval.parquet"
    records.drop("metadata", strict=False).write_parquet(written)
    kept, _, _ = run_stage("decontaminate", training_rows(), {"eval_files": [str(written)], "mode": "flag"}, tmp_path)
    assert kept["contamination_eval_id"].to_list() == [records["id"][0], None, None, None]
