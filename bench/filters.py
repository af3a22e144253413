"""Benchmark: tag + filter (curate's Polars expressions, fastText lid.176, batch tokenizers) against a per-row
Python implementation of the same heuristics, in the same run.

Corpus: the canonical records of sample_data/raw (support conversations of every kind, with the planted
junk) tiled to `--records` rows (≥ 200k by default). Tiling keeps the text distribution of the sample;
the scores' cost does not depend on rows being distinct.

Ours: `tag` stage (per-role Gopher/FineWeb scores, repetition, instruction checks, fastText language
id, token counts with a `tokenizers` BPE in batch) then `filter` stage with the default `chat` preset, timed end to end on the in-memory frame (no parquet I/O: that is the runner's, not the
stage's, cost).

Baseline: one Python function per row computing the same scores (str.split, re, Counter, fastText's
single-text `predict`, `Tokenizer.encode` per text) and the same rule bounds (read from the preset).
Both sides run on the same `--records` rows: nothing is extrapolated (the per-row baseline takes a few
minutes at the default size). The keep/drop decisions of both are compared row by row (agreement
printed) as a cross-check that the two compute the same thing.

Each method runs in its own spawned process, so peak RSS (ru_maxrss) is its own.

    .venv/bin/python bench/filters.py                          # 50k records, both sides
    .venv/bin/python bench/filters.py --no-language --no-tokenizer   # the Polars heuristics alone
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import resource
import tempfile
import time
from collections import Counter
from pathlib import Path
from queue import Empty

import polars as pl

REPO = Path(__file__).resolve().parent.parent


def build_corpus(records: int) -> pl.DataFrame:
    from curate.ingest import read_canonical

    raw = sorted(p for p in (REPO / "sample_data" / "raw").iterdir() if not p.name.endswith(".csv"))
    frame, _ = read_canonical(raw)
    repeats = -(-records // frame.height)
    return pl.concat([frame] * repeats).head(records)


def train_tokenizer(path: Path, frame: pl.DataFrame) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    texts = frame.head(3000).select(
        pl.col("messages").list.eval(pl.element().struct.field("content")).list.join("\n")
    ).to_series().drop_nulls().to_list()
    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4000, special_tokens=["[UNK]"]))
    tokenizer.save(str(path))
    return path


# ------------------------------------------------------------------------------------------- ours


def run_ours(frame: pl.DataFrame, tokenizer: str, language: bool) -> dict:
    from curate.stage import StageContext, get_stage

    def context(name: str) -> StageContext:
        # One per stage, as the runner gives: a stage's `input_schema` is its own input's (the filter's
        # rules check it for the columns tag wrote).
        return StageContext(name=name, run_dir=Path("."), stage_dir=Path("."), pipeline_dir=Path("."))

    tag, filt = get_stage("tag"), get_stage("filter")
    tag_config = tag.config_model.model_validate(
        {"tokenizer": tokenizer or None, "language": {} if language else None}
    )
    filter_config = filt.config_model.model_validate({} if language else {"languages": None})
    cpu_started = cpu_seconds()
    started = time.perf_counter()
    tagged = tag.run(frame.lazy(), tag_config, context("tag")).kept.collect()
    tag_seconds = time.perf_counter() - started
    output = filt.run(tagged.lazy(), filter_config, context("filter"))
    kept = output.kept.collect()
    dropped = output.dropped.collect()
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "tag_seconds": tag_seconds,
        "kept": kept.height,
        "dropped": dropped.height,
        "decisions": dropped.select("id", pl.col("source").struct.field("row"), pl.col("source").struct.field("file"), "reason"),
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cpu_seconds": cpu_seconds() - cpu_started,
    }


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -------------------------------------------------------------------------------- per-row baseline

STOP = re.compile(r"(?i)\b(?:the|be|to|of|and|that|have|with)\b")
WORD = re.compile(r"[\w']+")
TERMINAL = re.compile(r"(?:[.!?…)>\]}\"'”’*>`~]|[^\w\s\d.,;:!?])$")
CODE = re.compile(r"(?:^\$ |^```|\s--?\w|\w\s?=\s?\S|::|[{};]$|\(\)$)")
SIGN_OFF = re.compile(
    r"(?i)(?:^|\n)[^\n]{0,20}\b(?:regards|best|thanks|thank you|many thanks|cheers|sincerely|warmly|take care|"
    r"all the best|kind regards|best wishes)[,!.]?\n[^\n]{1,60}(?:\n[^\n]{1,60})?$"
)


def text_scores_py(text: str, prefix: str) -> dict:
    words = text.split()
    n = len(words)
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    ratio = lambda a, b: a / b if b else 0.0  # noqa: E731
    return {
        f"{prefix}_word_count": n,
        f"{prefix}_mean_word_length": ratio(sum(len(w) for w in words), n),
        f"{prefix}_symbol_word_ratio": ratio(text.count("#") + text.count("...") + text.count("…"), n),
        f"{prefix}_non_alpha_word_ratio": ratio(sum(not any(c.isalpha() for c in w) for w in words), n),
        f"{prefix}_stop_word_count": len(STOP.findall(text)),
        f"{prefix}_line_count": len(lines),
        f"{prefix}_bullet_line_ratio": ratio(sum(line[0] in "•‣-*·" for line in lines), len(lines)),
        f"{prefix}_ellipsis_line_ratio": ratio(sum(line.endswith(("...", "…")) for line in lines), len(lines)),
        f"{prefix}_dup_line_fraction": ratio(len(lines) - len(set(lines)), len(lines)),
        f"{prefix}_dup_paragraph_fraction": ratio(len(paragraphs) - len(set(paragraphs)), len(paragraphs)),
        f"{prefix}_line_punct_ratio": ratio(sum(line.endswith(tuple(".!?\"')”’…")) for line in lines), len(lines)),
        f"{prefix}_short_line_ratio": ratio(sum(len(line) < 30 for line in lines), len(lines)),
    }


def repetition_py(text: str) -> dict:
    words = text.split()
    lowered = [w.lower() for w in words]
    total = sum(len(w) for w in words)
    scores = {}
    for n in (2, 3, 4):
        grams = [tuple(lowered[i : i + n]) for i in range(len(words) - n + 1)]
        counts = Counter(grams)
        best = 0
        if counts:
            top_count = max(counts.values())
            if top_count >= 2:
                best = top_count * max(sum(len(w) for w in g) for g, c in counts.items() if c == top_count)
        scores[f"assistant_top_{n}gram_char_frac"] = best / total if total else 0.0
    for n in range(5, 11):
        seen, covered = set(), [False] * len(words)
        for i in range(len(words) - n + 1):
            gram = tuple(lowered[i : i + n])
            if gram in seen:
                for j in range(i, i + n):
                    covered[j] = True
            seen.add(gram)
        chars = sum(len(w) for w, c in zip(words, covered) if c)
        scores[f"assistant_dup_{n}gram_char_frac"] = chars / total if total else 0.0
    return scores


CONNECTOR = re.compile(r"(?i)\b(?:the|a|an|and|or|but|your|my|our|their|its|with|from|into|whether|than)$")
SENTENCE_END = re.compile(r"[.!?…](?:\s|$)")


def truncation_py(last_assistant: str, open_end: bool, source_closed_share: float, source_rows: int) -> bool:
    stripped = last_assistant.strip()
    return (
        stripped.count("```") % 2 == 1
        or (open_end and bool(CONNECTOR.search(stripped)))
        or (open_end and stripped.endswith((",", ":", ";")))
        or (open_end and len(stripped.split()) >= 25 and len(SENTENCE_END.findall(stripped)) >= 2)
        or (open_end and source_rows >= 20 and source_closed_share >= 0.9)
    )


def open_end_py(last_assistant: str) -> bool:
    stripped = last_assistant.strip()
    last_line = stripped.split("\n")[-1].strip()
    return bool(last_line) and not TERMINAL.search(last_line) and not CODE.search(last_line) and not SIGN_OFF.search(stripped)


def last_assistant_py(row: dict) -> str:
    turns = row["messages"] if row["kind"] == "sft" else row["chosen"]
    return ([m["content"] for m in turns if m["role"] == "assistant"] or [""])[-1]


def row_decision_py(row: dict, phrases: list[str], detector, tokenizer, bound: dict, source_stats: dict) -> str | None:
    if row["kind"] == "sft":
        messages = row["messages"]
        users = [m["content"] for m in messages if m["role"] == "user"]
        assistants = [m["content"] for m in messages if m["role"] == "assistant"]
        roles = [m["role"] for m in messages]
        non_system = [r for r in roles if r != "system"]
        if any(r is None for r in roles):
            structure = "unknown_role"
        elif any(not m["content"] for m in messages):
            structure = "empty_message"
        elif "system" in roles[1:]:
            structure = "system_not_first"
        elif not non_system or non_system[0] != "user":
            structure = "does_not_start_with_user"
        elif any(a == b for a, b in zip(non_system, non_system[1:])):
            structure = "roles_not_alternating"
        elif non_system[-1] != "assistant":
            structure = "does_not_end_with_assistant"
        else:
            structure = None
        all_contents = [m["content"] for m in messages]
    else:
        users = [m["content"] for m in row["prompt"] if m["role"] == "user"]
        assistants = [m["content"] for m in row["chosen"]]
        structure = "chosen_equals_rejected" if row["chosen"][0]["content"] == row["rejected"][0]["content"] else None
        all_contents = [m["content"] for m in row["prompt"] + row["chosen"] + row["rejected"]]
    user_text, assistant_text = "\n\n".join(users), "\n\n".join(assistants)
    last_user, last_assistant = (users or [""])[-1], (assistants or [""])[-1]
    scores = {**text_scores_py(user_text, "user"), **text_scores_py(assistant_text, "assistant"), **repetition_py(assistant_text)}
    u, a = set(WORD.findall(last_user.lower())), set(WORD.findall(last_assistant.lower()))
    containment = len(u & a) / len(a) if a else 0.0
    lowered = assistant_text.lower().replace("’", "'")
    refusal = next((p for p in phrases if p in lowered), None)
    closed_share, source_rows = source_stats[row["source"]["file"]]
    truncated = truncation_py(last_assistant, open_end_py(last_assistant), closed_share, source_rows)
    lang = None
    if detector is not None:
        text = " ".join((user_text + "\n" + assistant_text)[:500].split())
        best = detector(text + "\n", 1, 0.0, "strict") if re.search(r"[^\W\d_]", text) else ()
        lang = best[0][1].removeprefix("__label__") if best and best[0][0] >= 0.5 else None
    tokens = 0
    if tokenizer is not None:
        # the same per-content counts the tag stage keeps (row total; assistant total)
        counts = [len(tokenizer.encode(text, add_special_tokens=False)) for text in all_contents]
        # chat: all turns; preference: prompt + the longer of chosen and rejected (contents in that order)
        tokens = sum(counts) if row["kind"] == "sft" else sum(counts[:-2]) + max(counts[-2:])
        sum(len(tokenizer.encode(text, add_special_tokens=False)) for text in assistants)
    words = lambda text: len(text.split())  # noqa: E731
    checks = [
        ("drop_turn_structure_errors", structure is not None),
        ("min_last_assistant_words", words(last_assistant) < bound["min_last_assistant_words"]),
        ("min_user_words", scores["user_word_count"] < bound["min_user_words"]),
        ("languages", detector is not None and lang not in bound["languages"]),
        ("drop_refusals", refusal is not None),
        ("drop_truncated", truncated),
        ("max_response_echo_containment", containment > bound["max_response_echo_containment"] and words(last_assistant) >= 5),
        ("max_token_count", tokens > bound["max_token_count"]),
        ("max_assistant_words", scores["assistant_word_count"] > bound["max_assistant_words"]),
        ("min_assistant_mean_word_length", scores["assistant_mean_word_length"] < bound["min_assistant_mean_word_length"]),
        *[
            (name, scores[name.removeprefix("max_")] > bound[name])
            for name in bound
            if name.startswith("max_assistant_") and name != "max_assistant_words" and name.removeprefix("max_") in scores
        ],
    ]
    return next((name for name, failed in checks if failed), None)


def run_baseline(frame: pl.DataFrame, tokenizer_path: str, language: bool) -> dict:
    from tokenizers import Tokenizer

    from curate.filters.instruction import DEFAULT_REFUSAL_PHRASES
    from curate.filters.language import _model
    from curate.filters.thresholds import preset_rules

    tokenizer = Tokenizer.from_file(tokenizer_path) if tokenizer_path else None
    detector = _model().f.predict if language else None
    bound = {rule["name"]: rule.get("min", rule.get("max", rule.get("in"))) for rule in preset_rules("chat")}
    rows = frame.to_dicts()  # conversion outside the timed loop: the baseline gets Python objects for free
    cpu_started = cpu_seconds()
    started = time.perf_counter()
    # the source-level truncation evidence needs each file's share of punctuated endings first
    open_ends: dict[str, list[bool]] = {}
    for row in rows:
        open_ends.setdefault(row["source"]["file"], []).append(open_end_py(last_assistant_py(row)))
    source_stats = {file: (1 - sum(flags) / len(flags), len(flags)) for file, flags in open_ends.items()}
    reasons = [row_decision_py(row, list(DEFAULT_REFUSAL_PHRASES), detector, tokenizer, bound, source_stats) for row in rows]
    seconds = time.perf_counter() - started
    decisions = frame.select("id", pl.col("source").struct.field("row"), pl.col("source").struct.field("file")).with_columns(
        pl.Series("reason", reasons, dtype=pl.String)
    )
    return {
        "seconds": seconds,
        "dropped": sum(r is not None for r in reasons),
        "decisions": decisions.filter(pl.col("reason").is_not_null()),
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cpu_seconds": cpu_seconds() - cpu_started,
    }


def _worker(name: str, corpus_path: str, tokenizer: str, language: bool, queue) -> None:
    frame = pl.read_parquet(corpus_path)
    result = (run_ours if name == "ours" else run_baseline)(frame, tokenizer, language)
    result["decisions"] = result["decisions"].to_dicts()
    queue.put(result)


def in_process(name: str, corpus_path: str, tokenizer: str, language: bool) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_worker, args=(name, corpus_path, tokenizer, language, queue))
    process.start()
    while True:  # a worker that died (an error in a side) must not leave the bench waiting forever
        try:
            result = queue.get(timeout=5)
            break
        except Empty:
            if not process.is_alive():
                raise SystemExit(f"bench/filters.py: the {name} side failed (exit code {process.exitcode}); its error is above")
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=50_000, help="rows for both sides (nothing is extrapolated)")
    parser.add_argument("--no-language", action="store_true", help="leave language identification out of both")
    parser.add_argument("--no-tokenizer", action="store_true", help="leave token counting out of both")
    args = parser.parse_args()
    language = not args.no_language
    with tempfile.TemporaryDirectory() as folder:
        corpus = build_corpus(args.records)
        corpus_path = str(Path(folder) / "corpus.parquet")
        corpus.write_parquet(corpus_path)
        tokenizer = "" if args.no_tokenizer else str(train_tokenizer(Path(folder) / "tokenizer.json", corpus))
        print(
            f"corpus: {corpus.height:,} canonical records (sample_data/raw tiled), language id "
            f"{'on (fastText lid.176)' if language else 'off'}, "
            f"{'no tokenizer' if args.no_tokenizer else 'byte-level BPE tokenizer (4k vocab, trained on the corpus)'}"
        )
        base = in_process("baseline", corpus_path, tokenizer, language)
        base_rate = args.records / base["seconds"]
        print(
            f"baseline per-row Python on {args.records:,} records: {base['seconds']:.2f}s "
            f"({base_rate:,.0f} records/s; {args.records / base['cpu_seconds']:,.0f} records per CPU-second), "
            f"dropped {base['dropped']:,}, peak RSS {base['rss_mib']:,.0f} MiB"
        )
        ours = in_process("ours", corpus_path, tokenizer, language)
        rate = args.records / ours["seconds"]
        print(
            f"ours tag+filter on {args.records:,} records: {ours['seconds']:.2f}s (tag {ours['tag_seconds']:.2f}s), "
            f"{rate:,.0f} records/s ({args.records / ours['cpu_seconds']:,.0f} records per CPU-second), kept {ours['kept']:,}, "
            f"dropped {ours['dropped']:,}, peak RSS {ours['rss_mib']:,.0f} MiB"
        )
        # Cross-check: same rows dropped, same first reason?
        key = lambda d: (d["file"], d["row"], d["id"])  # noqa: E731
        prefix = {key(d) for d in corpus.select("id", pl.col("source").struct.field("row"), pl.col("source").struct.field("file")).to_dicts()}
        ours_prefix = {key(d): d["reason"] for d in ours["decisions"] if key(d) in prefix}
        base_prefix = {key(d): d["reason"] for d in base["decisions"]}
        same_drop = len(prefix) - len(set(ours_prefix) ^ set(base_prefix))
        same_reason = sum(ours_prefix.get(k) == base_prefix.get(k) for k in prefix)
        print(
            f"agreement on all {args.records:,} records: keep/drop {same_drop / len(prefix):.2%}, "
            f"first reason {same_reason / len(prefix):.2%}"
        )
        load = os.getloadavg()[0]
        print(f"machine: {os.cpu_count()} cores, load average {load:.1f} at the end (other work on the box slows both)")
        cpu_ratio = (args.records / ours["cpu_seconds"]) / (args.records / base["cpu_seconds"])
        print(f"speedup: {rate / base_rate:.1f}× more records/s than the per-row Python baseline ({cpu_ratio:.1f}× per CPU-second)")


if __name__ == "__main__":
    main()
