"""Exact and MinHash near-dedup: datasketch parity, hand-made duplicates, chains, keep policy, the saved
index, the sample data's planted duplicates, and the `curate dedup` verb."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from datasketch import MinHash
from datasketch.lsh import _optimal_param

from curate.cli import main
from curate.dedup import (
    DedupConfig,
    MinHashIndex,
    MinHashSettings,
    ShingleSets,
    candidate_pairs,
    connected_components,
    deduplicate,
    lsh_params,
    minhash_signatures,
    shingle_sets,
    signatures_of,
    verified_jaccard,
)
from curate.errors import ConfigError
from dedup_helpers import python_hashfunc, shingle_lists
from curate.records import canonical_frame
from curate.stage import StageContext, get_stage, parse_stage_config

SAMPLE_DATA = Path(__file__).resolve().parent.parent / "sample_data"


# ------------------------------------------------------------------------------------------------
# helpers


def run_stage(records_or_frame, config: dict | None = None, tmp_path: Path | None = None, name: str = "dedup"):
    """Run the registered `dedup` stage function on a frame; returns (kept, dropped, report, ctx)."""
    spec = get_stage("dedup")
    frame = records_or_frame if isinstance(records_or_frame, pl.DataFrame) else canonical_frame(records_or_frame)
    # The stage keeps its work files under its folder (out of core), so it always gets a real one.
    base = tmp_path or Path(tempfile.mkdtemp(prefix="dedup-test-"))
    ctx = StageContext(name=name, run_dir=base, stage_dir=base / name, pipeline_dir=base)
    typed = parse_stage_config(spec, {"save_index": tmp_path is not None, **(config or {})}, "test")
    out = spec.run(frame.lazy(), typed, ctx)
    return out.kept.collect(), out.dropped.collect(), out.report, ctx


def chat(user: str, assistant: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}], **extra}


def random_text(rng: random.Random) -> str:
    alphabet = "abcdefghij klmnop QRST äöü ß 😀 12 ,.!?"
    words = ["".join(rng.choice(alphabet.replace(" ", "")) for _ in range(rng.randint(1, 7))) for _ in range(rng.randint(0, 40))]
    return " ".join(words)


def reference_shingles(text: str, kind: str, ngram: int) -> set[str]:
    """Plain-Python n-grams, the definition `shingle_rows` vectorizes."""
    if not text:
        return set()
    tokens = text.split(" ") if kind == "word" else list(text)
    separator = " " if kind == "word" else ""
    if len(tokens) < ngram:
        return {text}
    return {separator.join(tokens[i : i + ngram]) for i in range(len(tokens) - ngram + 1)}


# ------------------------------------------------------------------------------------------------
# signatures, shingles, LSH parameters


@pytest.mark.parametrize("hash_name", ["xxh32", "sha1"])
@pytest.mark.parametrize("kind,ngram", [("char", 5), ("word", 3), ("word", 1)])
def test_signatures_equal_datasketch_minhash(hash_name, kind, ngram):
    rng = random.Random(f"{hash_name}{kind}{ngram}")
    texts = [random_text(rng) for _ in range(60)] + ["", "ab", "a b"]
    settings = MinHashSettings(num_perm=96, seed=rng.randrange(1, 10_000), hash=hash_name, shingle=kind, ngram=ngram)
    signatures = signatures_of(shingle_sets(texts, settings), settings)
    assert signatures.dtype == np.uint32 and signatures.shape == (len(texts), 96)
    for text, lists, ours in zip(texts, shingle_lists(texts, kind, ngram), signatures):
        theirs = MinHash(num_perm=96, seed=settings.seed, hashfunc=python_hashfunc(hash_name))
        theirs.update_batch([shingle.encode("utf-8") for shingle in lists])
        assert np.array_equal(theirs.hashvalues, ours), text


def test_sha1_signature_equals_datasketch_default_minhash():
    """With hash: sha1 nothing needs passing to datasketch: its default MinHash gives the same values."""
    texts = ["reset my password please", "where is my order"]
    settings = MinHashSettings(hash="sha1", shingle="char", ngram=5)
    ours = signatures_of(shingle_sets(texts, settings), settings)
    for text, row in zip(texts, ours):
        theirs = MinHash()
        theirs.update_batch([s.encode() for s in reference_shingles(text, "char", 5)])
        assert np.array_equal(theirs.hashvalues, row)


def test_shingles_match_the_plain_python_definition():
    rng = random.Random(3)
    texts = [random_text(rng) for _ in range(80)] + ["", "x", "two words"]
    for kind, ngram in (("char", 5), ("word", 3), ("char", 1)):
        got = shingle_lists(texts, kind, ngram)
        for text, shingles in zip(texts, got):
            assert set(shingles) == reference_shingles(text, kind, ngram)


def test_signatures_do_not_depend_on_thread_count():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**32, 5000, dtype=np.uint64).astype(np.uint32)
    counts = np.array([0, 1, 2, 4997])
    one = minhash_signatures(hashes, counts, 64, 5, threads=1)
    three = minhash_signatures(hashes, counts, 64, 5, threads=3)
    assert np.array_equal(one, three)
    assert (one[0] == np.uint32(0xFFFFFFFF)).all()  # an empty set is datasketch's empty signature


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.85])
@pytest.mark.parametrize("weights", [(0.5, 0.5), (0.2, 0.8)])
def test_lsh_params_equal_datasketch_optimum(threshold, weights):
    assert lsh_params(threshold, 128, *weights) == _optimal_param(threshold, 128, *weights)


def test_verified_jaccard_is_exact_on_sets():
    sets = ShingleSets.from_lists(pl.Series([[1, 2, 3, 4], [3, 4, 5], [], [9]], dtype=pl.List(pl.UInt32)))
    got = verified_jaccard(sets, np.array([0, 0, 2, 3]), np.array([1, 3, 3, 3]))
    assert got.tolist() == [2 / 5, 0.0, 0.0, 1.0]


def test_candidate_pairs_are_bucket_pairs_with_star_for_big_buckets():
    bands = pl.DataFrame(
        {
            "node": [0, 1, 2, 3, 4, 5, 6, 7],
            "band": [0] * 8,
            "band_hash": np.array([10, 10, 10, 20, 30, 30, 30, 30], dtype=np.uint64),
        }
    )
    left, right = candidate_pairs(bands, max_bucket_pairs=3)
    pairs = set(zip(left.tolist(), right.tolist()))
    # bucket {0,1,2}: all pairs; bucket {4,5,6,7} is larger than 3: star from 4
    assert pairs == {(0, 1), (0, 2), (1, 2), (4, 5), (4, 6), (4, 7)}
    left, right = candidate_pairs(bands, max_bucket_pairs=3, new_from=2)
    assert set(zip(left.tolist(), right.tolist())) == {(0, 2), (1, 2), (4, 5), (4, 6), (4, 7)}


def test_connected_components_labels_by_smallest_node():
    labels = connected_components(7, np.array([5, 1, 2, 6]), np.array([3, 2, 0, 3]))
    assert labels.tolist() == [0, 0, 0, 3, 4, 3, 3]


# ------------------------------------------------------------------------------------------------
# the stage on hand-made records


PASSWORD = "Go to Settings, then Account, then Reset password, and follow the link we email you."


def test_known_near_and_exact_duplicates_are_dropped_with_reasons(tmp_path):
    records = [
        chat("How do I reset my password?", PASSWORD),
        chat("How can I reset my password?", PASSWORD + " Thanks!"),  # near duplicate, longer answer
        chat("HOW DO I RESET  MY PASSWORD?", PASSWORD.upper()),  # exact after case and whitespace folding
        chat("Where is my order 12345?", "Track order 12345 on the Orders page."),
        chat("Where is my order 99881?", "Track order 99881 on the Orders page."),  # another order: kept
        chat("Can I pay my invoice by bank transfer?", "Yes: use the IBAN printed on the invoice."),
    ]
    kept, dropped, report, _ = run_stage(records, tmp_path=tmp_path)
    frame = canonical_frame(records)
    ids = frame["id"].to_list()
    assert kept.height + dropped.height == len(records)
    by_id = {row["id"]: row for row in dropped.iter_rows(named=True)}
    # the longest answer (row 2) survives its near duplicate and that one's exact twin
    assert ids[1] in kept["id"].to_list()
    near = by_id[ids[0]]
    assert near["reason"] == "near_duplicate" and near["duplicate_of"] == ids[1] and near["stage"] == "dedup"
    assert near["jaccard_verified"] >= 0.7 and 0.0 < near["jaccard_estimated"] <= 1.0
    twin = by_id[ids[2]]
    assert twin["reason"] == "exact_duplicate" and twin["jaccard_verified"] == 1.0
    assert twin["dup_cluster"] == near["dup_cluster"] == ids[1]
    # digits are not folded by default (issue 12): two orders are two items
    assert ids[3] in kept["id"].to_list() and ids[4] in kept["id"].to_list()
    assert ids[5] in kept["id"].to_list()
    # every kept row carries a cluster id; unique rows their own id
    clusters = dict(zip(kept["id"].to_list(), kept["dup_cluster"].to_list()))
    assert clusters[ids[5]] == ids[5] and clusters[ids[1]] == ids[1]
    assert report["exact_duplicates"] == 1 and report["near_duplicates"] == 1
    assert report["clusters"] == 1 and report["cluster_size_histogram"] == {"3": 1}
    assert report["largest_clusters"][0]["size"] == 3
    assert "reset my password" in report["largest_clusters"][0]["example"]


def test_unrelated_rows_are_all_kept():
    records = [chat(f"Question number {word} about {topic}", f"Answer about {topic} and {word}.") for word, topic in
               [("alpha", "billing"), ("beta", "shipping"), ("gamma", "refunds"), ("delta", "login")]]
    records[0]["messages"][0]["content"] = "Why was I charged twice this month on my card?"
    kept, dropped, report, _ = run_stage(records, {"normalize_digits": False})
    assert dropped.height == 0 and kept.height == 4
    assert report["clusters"] == 0


def test_normalization_switches_control_exact_matches():
    # Defaults (issue 12): case and whitespace fold, punctuation and digits do not.
    records = [chat("Hello, World!", "Hi."), chat("hello,   WORLD!", "hi.")]
    _, dropped, _, _ = run_stage(records, {"near": False})
    assert dropped["reason"].to_list() == ["exact_duplicate"]
    _, dropped, _, _ = run_stage(records, {"near": False, "lowercase": False})
    assert dropped.height == 0
    records = [chat("Hello, World!", "Hi."), chat("hello world", "hi")]
    _, dropped, _, _ = run_stage(records, {"near": False})
    assert dropped.height == 0
    _, dropped, _, _ = run_stage(records, {"near": False, "strip_punctuation": True})
    assert dropped["reason"].to_list() == ["exact_duplicate"]
    _, dropped, _, _ = run_stage(records, {"near": False, "strip_punctuation": True, "lowercase": False})
    assert dropped.height == 0


def test_prompt_key_treats_same_question_with_other_answer_as_duplicate():
    records = [
        chat("How do I export my contacts?", "Open Contacts, choose Export, pick CSV."),
        chat("How do I export my contacts?", "We cannot help with that today, sorry about it."),
    ]
    _, dropped, _, _ = run_stage(records)
    assert dropped.height == 0
    kept, dropped, _, _ = run_stage(records, {"key": "prompt"})
    assert dropped["reason"].to_list() == ["exact_duplicate"]
    assert kept["messages"][0][1]["content"].startswith("We cannot")  # longest response kept


def test_preference_rows_compare_prompt_chosen_and_rejected():
    records = [
        {"prompt": "Cancel my subscription", "chosen": "Done, it ends on the 31st.", "rejected": "No."},
        {"prompt": "Cancel my subscription!", "chosen": "Done, it ends on the 31st.", "rejected": "No."},
        {"prompt": "Cancel my subscription", "chosen": "Done, it ends on the 31st.", "rejected": "Figure it out."},
        chat("Cancel my subscription", "Done, it ends on the 31st."),
    ]
    kept, dropped, _, _ = run_stage(records, {"near": False, "strip_punctuation": True})
    assert dropped.height == 1 and dropped["kind"].to_list() == ["preference"]
    assert kept.height == 3
    # `key: prompt` is about SFT rows: preference pairs with other answers stay apart (issue 12) ...
    _, dropped, _, _ = run_stage(records, {"near": False, "key": "prompt", "strip_punctuation": True})
    assert dropped["kind"].to_list() == ["preference"]
    # ... unless preference pairs are keyed on their prompt explicitly
    _, dropped, _, _ = run_stage(
        records, {"near": False, "key": "prompt", "preference_key": "prompt", "strip_punctuation": True}
    )
    assert dropped.height == 3  # same prompt everywhere (the SFT row's prompt is its user turn)


def chain_records() -> list[dict]:
    # word 1-grams: A={w0..w9}, B={w2..w11}, C={w4..w13}; J(A,B)=J(B,C)=8/12, J(A,C)=6/14
    words = [f"word{chr(97 + i)}" for i in range(14)]
    return [chat("q", " ".join(words[start : start + 10])) for start in (0, 2, 4)]


CHAIN_CONFIG = {"shingle": "word", "ngram": 1, "threshold": 0.6, "bands": 64, "rows": 2, "normalize_digits": False}


def test_chain_does_not_merge_ends_that_are_not_similar():
    records = chain_records()
    ids = canonical_frame(records)["id"].to_list()
    kept, dropped, report, _ = run_stage(records, {**CHAIN_CONFIG, "keep": "earliest_source"})
    # A is kept; B joins A; C is similar to B but not to A, so it is not dropped: kept as well
    assert sorted(kept["id"].to_list()) == sorted([ids[0], ids[2]])
    assert dropped["id"].to_list() == [ids[1]] and dropped["duplicate_of"].to_list() == [ids[0]]
    # ... but all three are one connected component (A~B~C), so they share A's dup_cluster (the split
    # stage keeps the chain together); before issue 13 C had a cluster of its own.
    assert kept["dup_cluster"].to_list() == [ids[0], ids[0]] and dropped["dup_cluster"].to_list() == [ids[0]]
    assert report["lsh"]["chain_splits"] == 1
    assert report["lsh"]["verified_pairs"] == 2  # A–B and B–C; A–C is a candidate below threshold at most


def test_chain_with_middle_representative_takes_both_ends():
    records = chain_records()
    records[1]["score"] = 0.9
    records[0]["score"] = 0.1
    records[2]["score"] = 0.5
    ids = canonical_frame(records)["id"].to_list()
    kept, dropped, _, _ = run_stage(records, {**CHAIN_CONFIG, "keep": "highest_score", "score_column": "score"})
    assert kept["id"].to_list() == [ids[1]]
    assert sorted(dropped["duplicate_of"].to_list()) == [ids[1], ids[1]]


@pytest.mark.parametrize(
    "keep,expected",
    [("longest_response", 2), ("earliest_source", 0), ("highest_score", 1)],
)
def test_keep_policy_chooses_the_survivor(keep, expected):
    records = [
        chat("Is there a dark mode in the app?", "Yes, under Settings > Display.", score=0.2),
        chat("Is there a dark mode in the app?", "Yes, under Settings > Display!", score=0.9),
        chat("Is there a dark mode in the app?", "Yes, under Settings > Display. It follows the system theme.", score=0.5),
    ]
    ids = canonical_frame(records)["id"].to_list()
    config = {"keep": keep, "key": "prompt", "score_column": "score" if keep == "highest_score" else None}
    kept, dropped, _, _ = run_stage(records, config)
    assert kept["id"].to_list() == [ids[expected]]
    assert set(dropped["duplicate_of"].to_list()) == {ids[expected]}


def test_highest_score_needs_an_existing_column():
    with pytest.raises(ConfigError, match="score column 'quality'"):
        run_stage([chat("a", "b"), chat("a", "b")], {"keep": "highest_score", "score_column": "quality"})
    with pytest.raises(ConfigError, match="score_column"):
        parse_stage_config(get_stage("dedup"), {"keep": "highest_score"}, "stages[0]")


def test_no_verify_uses_estimates_and_leaves_verified_null():
    records = [chat("How do I reset my password?", PASSWORD), chat("How can I reset my password?", PASSWORD + " Thanks!")]
    _, dropped, report, _ = run_stage(records, {"verify": False, "threshold": 0.5})
    assert dropped["reason"].to_list() == ["near_duplicate"]
    assert dropped["jaccard_verified"].to_list() == [None] and dropped["jaccard_estimated"][0] >= 0.5
    assert report["lsh"]["verify"] is False


def test_output_is_deterministic():
    rng = random.Random(5)
    base = [random_text(rng) + " tail words here" for _ in range(40)]
    records = [chat("q " + text, text) for text in base] + [chat("q " + text, text + " x") for text in base[:15]]
    first = run_stage(records)
    second = run_stage(records)
    assert first[0].equals(second[0]) and first[1].equals(second[1])


# ------------------------------------------------------------------------------------------------
# incremental dedup against a saved index


def test_incremental_run_dedups_new_batch_against_saved_index(tmp_path, monkeypatch):
    old = [
        chat("How do I reset my password?", PASSWORD),
        chat("Where can I download my invoices?", "Billing > Invoices has a download button for each month."),
    ]
    _, _, report1, ctx1 = run_stage(old, tmp_path=tmp_path / "run1")
    index_dir = ctx1.stage_dir / "index"
    records = pl.read_parquet(index_dir / "records.parquet")
    assert records.schema["signature"] == pl.Array(pl.UInt32, 128)  # 512 bytes of signature per record
    assert records.height == 2 and report1["index"]["rows_after"] == 2
    meta = json.loads((index_dir / "index.json").read_text())
    assert meta["bands"] * meta["rows"] <= 128 and pl.read_parquet(index_dir / "bands.parquet").height == 2 * meta["bands"]

    new = [
        chat("How can I reset my password?", PASSWORD + " Thanks!"),  # near duplicate of an indexed row
        chat("WHERE can I download my  invoices?", "Billing > Invoices has a download button for each month."),  # exact
        chat("Can I change the email on my account?", "Yes, in Profile > Email; we send a confirmation link."),
    ]
    old_ids = canonical_frame(old)["id"].to_list()
    new_ids = canonical_frame(new)["id"].to_list()

    # Old signatures are read, not recomputed: only the new rows go through shingling.
    import curate.dedup.pipeline as dedup_module

    hashed_batches = []
    real = dedup_module.shingle_sets
    monkeypatch.setattr(dedup_module, "shingle_sets", lambda texts, settings, **kw: hashed_batches.append(len(texts)) or real(texts, settings, **kw))
    kept, dropped, report2, ctx2 = run_stage(new, {"index_path": str(index_dir)}, tmp_path=tmp_path / "run2")
    assert hashed_batches == [2]  # the exact duplicate of an indexed row never needs a signature
    by_id = {row["id"]: row for row in dropped.iter_rows(named=True)}
    assert by_id[new_ids[0]]["reason"] == "near_duplicate" and by_id[new_ids[0]]["duplicate_of"] == old_ids[0]
    assert by_id[new_ids[0]]["dup_cluster"] == old_ids[0]  # even though the new row's answer is longer
    assert by_id[new_ids[1]]["reason"] == "exact_duplicate" and by_id[new_ids[1]]["duplicate_of"] == old_ids[1]
    assert kept["id"].to_list() == [new_ids[2]]
    # the index is extended: old rows (signatures untouched) + the new kept row
    extended = pl.read_parquet(ctx2.stage_dir / "index" / "records.parquet")
    assert extended["id"].to_list() == old_ids + [new_ids[2]]
    assert extended["signature"].head(2).equals(records["signature"])
    assert report2["index"] == {**report2["index"], "rows_before": 2, "rows_after": 3}
    assert report2["largest_clusters"][0]["in_saved_index"] is True

    # a third run against the extended index drops a copy of the row added in run 2
    kept3, dropped3, _, _ = run_stage([new[2]], {"index_path": str(ctx2.stage_dir / "index")})
    assert kept3.height == 0 and dropped3["duplicate_of"].to_list() == [new_ids[2]]


def test_index_with_other_settings_is_refused(tmp_path):
    _, _, _, ctx = run_stage([chat("a question here", "an answer there")], tmp_path=tmp_path)
    with pytest.raises(ConfigError, match="num_perm"):
        run_stage([chat("x", "y")], {"index_path": str(ctx.stage_dir / "index"), "num_perm": 64})
    with pytest.raises(Exception, match="not a dedup index"):
        run_stage([chat("x", "y")], {"index_path": str(tmp_path)})


def test_index_loads_back_equal(tmp_path):
    frame = canonical_frame([chat("one two three four", "five six"), chat("seven eight", "nine ten eleven")])
    outcome = deduplicate(frame.with_row_index("__row"), DedupConfig())
    outcome.index.save(tmp_path / "index")
    loaded = MinHashIndex.load(tmp_path / "index", DedupConfig().settings())
    assert loaded.records.equals(outcome.index.records) and loaded.band_table.equals(outcome.index.band_table)
    assert loaded.signatures.dtype == np.uint32 and loaded.signatures.nbytes == 2 * 512


# ------------------------------------------------------------------------------------------------
# the runner and the CLI on the sample data


def sample_inputs() -> list[dict]:
    inputs = []
    for path in sorted((SAMPLE_DATA / "raw").iterdir()):
        entry = {"path": str(path), "format": "auto"}
        if path.name == "tickets_export.csv":
            entry = {
                "path": str(path),
                "format": "prompt_response",
                "columns": {"prompt": "customer_message", "response": "agent_reply"},
            }
        inputs.append(entry)
    return inputs


@pytest.fixture(scope="module")
def sample_dedup_run(tmp_path_factory):
    if not (SAMPLE_DATA / "planted.json").exists():
        pytest.fail("sample_data/planted.json is missing; run sample_data/generate.py")
    from curate.runner import run_pipeline

    run_dir = tmp_path_factory.mktemp("dedup-sample") / "run"
    pipeline = {"name": "dedup-sample", "inputs": sample_inputs(), "stages": [{"name": "dedup", "type": "dedup"}]}
    return run_pipeline(pipeline, run_dir=run_dir)


def _rows_by_source(run_dir: Path) -> dict[tuple[str, int], dict]:
    kept = pl.read_parquet(run_dir / "dedup" / "data.parquet")
    dropped = pl.read_parquet(run_dir / "dedup" / "dropped.parquet")
    frame = pl.concat(
        [
            kept.select("id", "source", "dup_cluster", pl.lit(None, pl.String).alias("reason"), pl.lit(None, pl.String).alias("duplicate_of")),
            dropped.select("id", "source", "dup_cluster", "reason", "duplicate_of"),
        ]
    )
    out = {}
    for row in frame.iter_rows(named=True):
        file = row["source"]["file"].replace("\\", "/").split("sample_data/")[-1]
        out[(file, row["source"]["row"])] = row
    return out


def test_sample_data_planted_duplicates_are_removed_with_reasons(sample_dedup_run):
    planted = json.loads((SAMPLE_DATA / "planted.json").read_text())["planted"]
    rows = _rows_by_source(sample_dedup_run.run_dir)
    for kind, expected_reason in (("exact_duplicate", "exact_duplicate"), ("near_duplicate", "near_duplicate")):
        pairs = [(rows.get((p["file"], p["row"])), rows.get((p["source"]["file"], p["source"]["row"]))) for p in planted if p["kind"] == kind]
        pairs = [(copy, source) for copy, source in pairs if copy is not None and source is not None]  # quarantined rows excluded
        assert len(pairs) > 50
        together = [copy["dup_cluster"] == source["dup_cluster"] for copy, source in pairs]
        assert sum(together) / len(pairs) >= 0.97, (kind, sum(together), len(pairs))
        # exactly one of each pair flows on, the other is dropped for the planted reason (or as the exact
        # twin of a row that was itself a near duplicate)
        one_dropped = [(copy["reason"] is None) != (source["reason"] is None) for copy, source in pairs]
        assert sum(one_dropped) / len(pairs) >= 0.95
        reasons = [(copy["reason"] or source["reason"]) for copy, source in pairs if (copy["reason"] or source["reason"])]
        assert reasons.count(expected_reason) / len(reasons) >= 0.9, (kind, reasons[:10])
    # same prompt, different answer: not a duplicate of the whole conversation
    same = [(rows.get((p["file"], p["row"])), rows.get((p["source"]["file"], p["source"]["row"]))) for p in planted if p["kind"] == "same_prompt"]
    same = [(a, b) for a, b in same if a is not None and b is not None]
    assert sum(a["dup_cluster"] == b["dup_cluster"] for a, b in same) <= len(same) * 0.1


def test_sample_run_manifest_has_dedup_report(sample_dedup_run):
    manifest = sample_dedup_run.manifest
    stage = next(s for s in manifest["stages"] if s["type"] == "dedup")
    report = stage["report"]
    assert report["clusters"] > 300 and report["exact_duplicates"] >= 150 and report["near_duplicates"] >= 150
    assert stage["rows_in"] == stage["rows_out"] + stage["rows_dropped"]
    assert set(stage["dropped_by_reason"]) == {"exact_duplicate", "near_duplicate"}
    assert report["largest_clusters"] and all(c["example"] for c in report["largest_clusters"])
    dropped = pl.read_parquet(sample_dedup_run.run_dir / "dedup" / "dropped.parquet")
    assert {"stage", "reason", "duplicate_of", "jaccard_estimated", "jaccard_verified", "dup_cluster"} <= set(dropped.columns)
    near = dropped.filter(pl.col("reason") == "near_duplicate")
    assert (near["jaccard_verified"] >= 0.7).all()
    # template-sharing support conversations make many candidates that the estimate rules out cheaply
    assert report["lsh"]["skipped_by_estimate"] > report["lsh"]["verified_pairs"]


def test_cli_dedup_writes_run_and_dedups_against_its_index(tmp_path, capsys):
    first = tmp_path / "first.jsonl"
    second = tmp_path / "second.jsonl"
    rows = [chat("How do I reset my password?", PASSWORD), chat("Do you ship to Canada?", "Yes, in 5 to 7 business days.")]
    first.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    second.write_text(json.dumps(chat("How can I reset my password?", PASSWORD + " Thanks!")) + "\n")
    assert main(["dedup", str(first), "--out", str(tmp_path / "run1"), "--quiet"]) == 0
    assert (tmp_path / "run1" / "dedup" / "data.parquet").exists()
    assert (tmp_path / "run1" / "dedup" / "index" / "index.json").exists()
    config = tmp_path / "dedup.yaml"
    config.write_text("threshold: 0.7\nkeep: earliest_source\n")
    code = main(
        ["dedup", str(second), "--out", str(tmp_path / "run2"), "--config", str(config),
         "--index", str(tmp_path / "run1" / "dedup" / "index"), "--quiet"]
    )
    assert code == 0
    dropped = pl.read_parquet(tmp_path / "run2" / "dedup" / "dropped.parquet")
    assert dropped["reason"].to_list() == ["near_duplicate"]
    assert "largest duplicate clusters" in capsys.readouterr().out


def test_cli_dedup_bad_config_is_one_line_error(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(chat("a", "b")) + "\n")
    config = tmp_path / "dedup.yaml"
    config.write_text("thresold: 0.7\n")
    assert main(["dedup", str(data), "--out", str(tmp_path / "run"), "--config", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "thresold" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["dedup", str(data), "--out", str(tmp_path / "run"), "--bands", "40", "--rows", "4", "--quiet"]) == 2
    assert "exceeds num_perm" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# edge cases


def test_simplify_text_matches_python_reference():
    import re

    from curate.dedup import simplify_text

    rng = random.Random(11)
    pieces = ["a", "B", "ß", " ", "  ", "\t", "\n", "\n\n", "\u3000", ",", "!?", "42", "٣", "é", "😀", "-"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 30))) for _ in range(300)]
    series = pl.lit(pl.Series(texts, dtype=pl.String))
    got = pl.select(simplify_text(series, strip_punctuation=True, normalize_digits=True)).to_series().to_list()
    for text, ours in zip(texts, got):
        expected = text.lower()
        expected = re.sub(r"[^\w\s]|_", " ", expected)  # punctuation and symbols (emoji, '-') to spaces
        expected = re.sub(r"\d", "0", expected)
        expected = " ".join(expected.split())
        assert ours == expected, repr(text)
    # the defaults fold only case and whitespace
    got = pl.select(simplify_text(series)).to_series().to_list()
    assert got == [" ".join(text.lower().split()) for text in texts]


def test_empty_and_single_row_frames():
    kept, dropped, report, _ = run_stage(canonical_frame([]).head(0))
    assert kept.height == 0 and dropped.height == 0 and report["clusters"] == 0
    kept, dropped, report, _ = run_stage([chat("only", "one")])
    assert kept["dup_cluster"].to_list() == kept["id"].to_list() and dropped.height == 0


def test_index_path_cannot_be_the_stage_own_output(tmp_path):
    with pytest.raises(ConfigError, match="own output"):
        run_stage([chat("a", "b")], {"index_path": str(tmp_path / "dedup" / "index")}, tmp_path=tmp_path)


# ------------------------------------------------------------------------------------------------
# shared Redis index (a real redis-server: REDIS_URL's, or one started here on a free port)


@pytest.fixture
def redis_server(tmp_path):
    import os
    import shutil
    import socket
    import subprocess
    import time

    redis = pytest.importorskip("redis", reason="the redis Python package is not installed")
    url = os.environ.get("REDIS_URL")
    if url:
        client = redis.Redis.from_url(url)
        host, port = client.connection_pool.connection_kwargs["host"], client.connection_pool.connection_kwargs["port"]
        yield host, port
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server) and REDIS_URL is not set")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        yield "127.0.0.1", port
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.redis
def test_shared_redis_index_across_runs(redis_server, tmp_path):
    host, port = redis_server
    basename = f"test-{tmp_path.name}"
    shared = {"redis": {"host": host, "port": port, "basename": basename}}
    first = [chat("How do I reset my password?", PASSWORD), chat("Do you ship to Canada?", "Yes, in 5 to 7 business days.")]
    kept1, dropped1, report1, _ = run_stage(first, shared)
    assert dropped1.height == 0 and report1["redis"]["added"] == 2 and report1["redis"]["size"] == 2

    # "another machine": a new batch with a near duplicate and an exact duplicate of the first batch
    second = [
        chat("How can I reset my password?", PASSWORD + " Thanks!"),
        chat("DO YOU SHIP TO  CANADA?", "YES, IN 5 TO 7 BUSINESS DAYS."),  # exact after case and whitespace folding
        chat("Can I get a refund after 30 days?", "Refunds are possible within 60 days of purchase."),
    ]
    first_ids, second_ids = canonical_frame(first)["id"].to_list(), canonical_frame(second)["id"].to_list()
    kept2, dropped2, report2, _ = run_stage(second, shared)
    by_id = {row["id"]: row for row in dropped2.iter_rows(named=True)}
    assert by_id[second_ids[0]]["reason"] == "near_duplicate" and by_id[second_ids[0]]["duplicate_of"] == first_ids[0]
    assert by_id[second_ids[0]]["jaccard_estimated"] >= 0.7 and by_id[second_ids[0]]["jaccard_verified"] is None
    assert by_id[second_ids[1]]["reason"] == "exact_duplicate" and by_id[second_ids[1]]["duplicate_of"] == first_ids[1]
    assert kept2["id"].to_list() == [second_ids[2]]
    assert report2["redis"] == {"basename": basename, "exact_duplicates": 1, "near_duplicates": 1, "added": 1, "size": 3}
    assert report2["near_duplicates"] == 1 and report2["exact_duplicates"] == 1

    with pytest.raises(ConfigError, match="index was built with settings"):
        run_stage(second, {**shared, "num_perm": 64})


def test_unreachable_redis_is_a_one_line_error():
    pytest.importorskip("redis", reason="the redis Python package is not installed")
    from curate.errors import ExternalServiceError

    with pytest.raises(ExternalServiceError, match="127.0.0.1:1"):
        run_stage([chat("a", "b")], {"redis": {"port": 1}})
