"""The filter stages through the runner and the `curate filter` verb: threshold reruns reuse the cached
scores, and the sample data's planted junk, PII, non-English and contaminated rows are caught."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml

from curate.cli import main
from curate.runner import load_manifest, run_pipeline


def write_chat_file(path: Path) -> Path:
    rows = [
        {"instruction": "Where is my parcel? It has not arrived yet.", "output": "It shipped yesterday and arrives on Friday."},
        {"instruction": "Can you refund my last invoice please?", "output": "Done, the refund is on its way."},
        {"instruction": "How do I reset my password?", "output": "Open Settings, choose Security and press Reset."},
        {"instruction": "Can I change my plan?", "output": "Yes."},
        {"instruction": "Is the app free?", "output": "As an AI language model, I cannot know prices."},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def pipeline(folder: Path, min_words: int) -> dict:
    return {
        "name": "quality",
        "run_dir": str(folder / "run"),
        "inputs": [{"path": str(folder / "chat.jsonl")}],
        "stages": [
            {"name": "tag", "type": "tag", "config": {}},
            {"name": "quality", "type": "filter", "config": {"rules": [{"name": "min_last_assistant_words", "min": min_words}]}},
        ],
    }


def test_threshold_change_reruns_filter_only(tmp_path):
    write_chat_file(tmp_path / "chat.jsonl")
    first = run_pipeline(pipeline(tmp_path, 2), base_dir=tmp_path)
    tag_data = tmp_path / "run" / "tag" / "data.parquet"
    tag_bytes, tag_mtime = tag_data.read_bytes(), tag_data.stat().st_mtime_ns
    assert first.manifest["accounting"]["dropped_by_stage_reason"]["quality"] == {
        "drop_refusals": 1,
        "min_last_assistant_words": 1,
    }
    second = run_pipeline(pipeline(tmp_path, 8), base_dir=tmp_path)
    stages = {stage["name"]: stage for stage in second.manifest["stages"]}
    assert stages["tag"]["skipped"] is True  # no score recomputed
    assert stages["quality"]["skipped"] is False
    assert tag_data.stat().st_mtime_ns == tag_mtime and tag_data.read_bytes() == tag_bytes
    assert stages["quality"]["dropped_by_reason"] == {"min_last_assistant_words": 4, "drop_refusals": 1}
    funnel = stages["quality"]["report"]["funnel"]
    assert {step["rule"] for step in funnel} >= {"min_last_assistant_words", "drop_refusals", "languages"}
    # the same config again: everything cached, outputs byte-identical
    third = run_pipeline(pipeline(tmp_path, 8), base_dir=tmp_path)
    assert all(stage["skipped"] for stage in third.manifest["stages"])


def test_filter_verb_with_config_and_bad_config(tmp_path, capsys):
    write_chat_file(tmp_path / "chat.jsonl")
    config = tmp_path / "filters.yaml"
    config.write_text(yaml.safe_dump({"tag": {"language": None}, "filter": {"languages": None}}))
    code = main(["filter", str(tmp_path / "chat.jsonl"), "--out", str(tmp_path / "out"), "--config", str(config), "--quiet"])
    assert code == 0
    manifest = load_manifest(tmp_path / "out")
    assert [stage["name"] for stage in manifest["stages"]] == ["ingest", "tag", "filter"]
    assert manifest["accounting"]["kept"] == 3
    capsys.readouterr()
    config.write_text(yaml.safe_dump({"filter": {"disable": ["min_last_assistant_wrds"]}}))
    code = main(["filter", str(tmp_path / "chat.jsonl"), "--out", str(tmp_path / "out2"), "--config", str(config)])
    err = capsys.readouterr().err
    assert code != 0 and "min_last_assistant_wrds" in err and "Traceback" not in err
    config.write_text(yaml.safe_dump({"filters": {}}))
    assert main(["filter", str(tmp_path / "chat.jsonl"), "--out", str(tmp_path / "out3"), "--config", str(config)]) != 0
    assert "unknown section" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ sample data

EXPECTED_RULES = {
    "short_response": {"min_last_assistant_words"},
    "empty_response": {"min_last_assistant_words", "drop_turn_structure_errors"},
    "echo": {"max_response_echo_containment"},
    "boilerplate": {"drop_refusals"},
    "truncated_response": {"drop_truncated"},
    "non_english": {"languages"},
    "pref_identical": {"drop_turn_structure_errors"},
    "contamination": {"drop_contaminated"},
    "repetition": {
        "max_assistant_dup_line_fraction",
        "max_assistant_dup_paragraph_fraction",
        *(f"max_assistant_top_{n}gram_char_frac" for n in (2, 3, 4)),
        *(f"max_assistant_dup_{n}gram_char_frac" for n in range(5, 11)),
    },
}


@pytest.fixture(scope="module")
def sample_filter_run(tmp_path_factory):
    sample = Path(__file__).resolve().parent.parent / "sample_data"
    raw = sorted(p for p in (sample / "raw").iterdir() if not p.name.endswith(".csv"))  # CSV needs --column maps
    folder = tmp_path_factory.mktemp("sample-filter")
    config = folder / "filters.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "pii": {"mode": "redact"},
                "decontaminate": {"eval_files": [str(sample / "eval" / "support_eval.jsonl")], "mode": "flag"},
            }
        )
    )
    out = folder / "run"
    assert main(["filter", *map(str, raw), "--out", str(out), "--config", str(config), "--quiet"]) == 0
    planted = json.loads((sample / "planted.json").read_text())["planted"]
    return out, planted, raw


def _with_source(frame: pl.DataFrame) -> pl.DataFrame:
    # source.file is the path as given; planted.json names files relative to sample_data/
    return frame.with_columns(
        pl.col("source").struct.field("file").str.replace(r"^.*sample_data/", "").alias("file"),
        pl.col("source").struct.field("row").alias("row"),
    )


def test_sample_planted_junk_caught_with_right_reasons(sample_filter_run):
    out, planted, _ = sample_filter_run
    tagged = _with_source(pl.read_parquet(out / "tag" / "data.parquet")).select("file", "row")
    dropped = _with_source(pl.read_parquet(out / "filter" / "dropped.parquet")).select("file", "row", "reason", "reasons")
    plants = pl.DataFrame([{"file": p["file"], "row": p["row"], "planted": p["kind"]} for p in planted])
    joined = tagged.join(plants, on=["file", "row"], how="left").join(dropped, on=["file", "row"], how="left")
    for kind, rules in EXPECTED_RULES.items():
        rows = joined.filter(pl.col("planted") == kind)
        if rows.height == 0:
            continue  # this kind was quarantined by ingest (e.g. broken rows) or not planted
        caught = rows.filter(pl.col("reasons").list.eval(pl.element().is_in(list(rules))).list.any().fill_null(False))
        assert caught.height >= 0.9 * rows.height, (kind, rows.filter(~pl.col("reasons").is_not_null()))
    clean = joined.filter(pl.col("planted").is_null())
    false_drops = clean.filter(pl.col("reason").is_not_null())
    assert false_drops.height <= 0.01 * clean.height, false_drops
    manifest = load_manifest(out)
    filter_stage = next(stage for stage in manifest["stages"] if stage["name"] == "filter")
    assert sum(step["dropped"] for step in filter_stage["report"]["funnel"]) == filter_stage["rows_dropped"]


def test_sample_pii_redacted_and_never_reported(sample_filter_run):
    out, planted, raw = sample_filter_run
    pii_rows = [p for p in planted if p["kind"].startswith("pii_")]
    data = pl.read_parquet(out / "pii" / "data.parquet")
    text = "\n".join(
        data.select(
            pl.concat_list(
                [pl.col(c).list.eval(pl.element().struct.field("content")).fill_null([]) for c in ("messages", "prompt", "chosen", "rejected")]
            ).list.join("\n")
        ).to_series().to_list()
    )
    present = {p["file"] for p in pii_rows}
    leaked = [p for p in pii_rows if p["value"] in text]
    assert not leaked, leaked[:5]
    assert present
    manifest_text = (out / "manifest.json").read_text()
    assert not any(p["value"] in manifest_text for p in pii_rows)
    report = next(s for s in load_manifest(out)["stages"] if s["name"] == "pii")["report"]
    for kind in ("email", "phone", "ip_address", "credit_card", "secret"):
        assert report["rows_by_type"][kind] > 0, kind
    # order numbers planted as look-alikes stay as written
    ingested = {str(path).split("sample_data/")[-1] for path in raw}
    orders = [p for p in planted if p["kind"] == "not_pii_order_number" and "value" in p and p["file"] in ingested]
    assert orders
    assert all(p["value"] in text for p in orders), [p["value"] for p in orders if p["value"] not in text][:5]


def test_stats_shows_funnel(sample_filter_run, capsys):
    out, _, _ = sample_filter_run
    assert main(["stats", str(out), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    stage = next(s for s in payload["stages"] if s["name"] == "filter")
    assert stage["report"]["funnel"] and stage["dropped_by_reason"]


def test_all_filter_stages_are_deterministic(tmp_path):
    write_chat_file(tmp_path / "chat.jsonl")
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps({"id": "e1", "messages": [
        {"role": "user", "content": "How do I reset my password?"},
        {"role": "assistant", "content": "Open Settings, choose Security and press Reset."},
    ]}) + "\n")
    stages = [
        {"name": "pii", "type": "pii", "config": {}},
        {"name": "decon", "type": "decontaminate", "config": {"eval_files": [str(eval_file)], "ngram": 5, "mode": "flag"}},
        {"name": "tag", "type": "tag", "config": {}},
        {"name": "filter", "type": "filter", "config": {}},
    ]
    outputs = []
    for name in ("a", "b"):
        config = {"name": "det", "run_dir": str(tmp_path / name), "inputs": [{"path": str(tmp_path / "chat.jsonl")}], "stages": stages}
        result = run_pipeline(config, base_dir=tmp_path)
        outputs.append({s: (tmp_path / name / s / "data.parquet").read_bytes() for s in ("pii", "decon", "tag", "filter")})
        assert result.manifest["accounting"]["dropped_by_stage_reason"]["filter"]["drop_contaminated"] == 1
    assert outputs[0] == outputs[1]


def test_filter_verb_column_mapping(tmp_path):
    (tmp_path / "tickets.csv").write_text(
        "customer_message,agent_reply\n"
        '"My parcel has not arrived, order #A7X-20931.","It shipped yesterday and arrives on Friday."\n'
        '"Can I pay by invoice?","Ok"\n'
    )
    code = main([
        "filter", str(tmp_path / "tickets.csv"), "--out", str(tmp_path / "out"), "--format", "prompt_response",
        "--column", "prompt=customer_message", "--column", "response=agent_reply", "--languages", "en", "--quiet",
    ])
    assert code == 0
    manifest = load_manifest(tmp_path / "out")
    assert manifest["accounting"]["kept"] == 1
    assert manifest["accounting"]["dropped_by_stage_reason"]["filter"] == {"min_last_assistant_words": 1}
