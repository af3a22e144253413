"""Benchmark: datasketch's per-record MinHash + MinHashLSH path vs curate's vectorized dedup.

Corpus (synthetic, seeded): base texts of 30–120 words drawn from a 20,000-word vocabulary, laid out in
families: a base followed by 0–3 copies, each copy with 10% of its words replaced, in 1–3 contiguous
spans (so copies land on both sides of the threshold: word 3-gram Jaccard ~0.45–0.85). Ground truth =
every pair with exact Jaccard ≥ threshold on word 3-gram sets, found exhaustively with a sparse
matrix product (independent of both methods).

Baseline: for each record, shingle in Python, `MinHash(num_perm).update_batch(...)` (sha1, datasketch's
default), `MinHashLSH.query` then `insert` (datasketch's optimal bands for the threshold). Its predicted
pairs are the query hits. If `--baseline-records` is smaller than `--records`, the baseline runs on
that prefix (whole families) and its time is extrapolated linearly to the full size (per-record cost
is constant: one sketch, one query, one insert); the output says so.

Ours: `curate.dedup.deduplicate` on the canonical frame (word 3-grams, xxh32 and sha1 hashes),
timed end to end (normalization, shingling, hashing, signatures, banding, candidates, exact-Jaccard
verification, clustering, keep policy); predicted pairs = verified edges.

Each method runs in its own spawned process so peak RSS (VmHWM) is its own; each runs `--repeat` times
(default 2) and its fastest run counts, which damps noise from other load on the machine.

    .venv/bin/python bench/dedup.py                  # 100k records, baseline on 20k prefix
    .venv/bin/python bench/dedup.py --baseline-records 100000
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time

import numpy as np


def build_corpus(records: int, seed: int, edit_fraction: float = 0.1) -> list[str]:
    rng = np.random.default_rng(seed)
    # Letters only: records that differ only in numbers are never near duplicates (the number-variant rule).
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocabulary = np.unique(np.array(["".join(word) for word in letters[rng.integers(0, 26, (21_000, 6))]]))[:20_000]
    texts: list[str] = []
    while len(texts) < records:
        base = rng.integers(0, len(vocabulary), int(rng.integers(30, 121)))
        texts.append(" ".join(vocabulary[base]))
        for _ in range(int(rng.choice([0, 0, 1, 1, 2, 3]))):
            if len(texts) >= records:
                break
            copy = base.copy()
            edits = max(1, round(edit_fraction * len(copy)))
            spans = int(rng.integers(1, 4))
            per_span = np.diff(np.linspace(0, edits, spans + 1).round().astype(int))
            for span in per_span:
                if span == 0:
                    continue
                start = int(rng.integers(0, len(copy) - span + 1))
                copy[start : start + span] = rng.integers(0, len(vocabulary), span)
            texts.append(" ".join(vocabulary[copy]))
    return texts


def ground_truth(texts: list[str], threshold: float) -> set[tuple[int, int]]:
    """All pairs with word 3-gram Jaccard ≥ threshold, exhaustively (sparse X·Xᵀ)."""
    import polars as pl
    from scipy.sparse import csr_matrix

    frame = (
        pl.DataFrame({"text": texts})
        .with_row_index("doc")
        .select("doc", pl.col("text").str.split(" ").alias("w"))
        .select(
            "doc",
            pl.col("w")
            .list.eval(pl.concat_str([pl.element(), pl.element().shift(-1), pl.element().shift(-2)], separator=" ").drop_nulls())
            .alias("g"),
        )
        .explode("g")
        .unique(["doc", "g"])
        .with_columns(pl.col("g").rank("dense").cast(pl.Int64).alias("gid") - 1)
    )
    docs = frame["doc"].to_numpy().astype(np.int64)
    grams = frame["gid"].to_numpy()
    matrix = csr_matrix((np.ones(len(docs), dtype=np.int32), (docs, grams)), shape=(len(texts), int(grams.max()) + 1))
    sizes = np.asarray(matrix.sum(axis=1)).ravel()
    product = (matrix @ matrix.T).tocoo()
    upper = product.row < product.col
    rows, cols, inter = product.row[upper], product.col[upper], product.data[upper]
    jaccard = inter / (sizes[rows] + sizes[cols] - inter)
    keep = jaccard >= threshold
    return set(zip(rows[keep].tolist(), cols[keep].tolist()))


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM; unlike ru_maxrss it does not carry the parent's peak over exec)."""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_baseline(texts: list[str], threshold: float, num_perm: int, repeat: int, queue) -> None:
    from datasketch import MinHash, MinHashLSH

    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        lsh, pairs, minhash = baseline_once(texts, threshold, num_perm, MinHash, MinHashLSH)
        times.append(time.perf_counter() - started)
    seconds = min(times)
    state = num_perm * minhash.hashvalues.itemsize
    queue.put(
        {"seconds": seconds, "pairs": pairs, "rss_mb": peak_rss_mb(),
         "signature_bytes": state, "bands_rows": (lsh.b, lsh.r)}
    )


def baseline_once(texts, threshold, num_perm, MinHash, MinHashLSH):
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    pairs = []
    minhash = None
    for index, text in enumerate(texts):
        words = text.split(" ")
        grams = {" ".join(words[i : i + 3]) for i in range(len(words) - 2)} or {text}
        minhash = MinHash(num_perm=num_perm)
        minhash.update_batch([gram.encode("utf-8") for gram in grams])
        for other in lsh.query(minhash):
            pairs.append((other, index))
        lsh.insert(index, minhash)
    return lsh, pairs, minhash


def run_ours(texts: list[str], threshold: float, num_perm: int, hash_name: str, repeat: int, queue) -> None:
    import polars as pl

    from curate.dedup import DedupConfig, deduplicate
    # A canonical-shaped frame (one assistant message per record); ids only need to be distinct here.
    from schemas import CANONICAL_SCHEMA

    frame = pl.DataFrame(
        {
            "id": [f"{index:032x}" for index in range(len(texts))],
            "kind": ["sft"] * len(texts),
            "messages": [[{"role": "assistant", "content": text}] for text in texts],
        },
        schema={key: CANONICAL_SCHEMA[key] for key in ("id", "kind", "messages")},
    ).with_columns(
        pl.lit(None, dtype=CANONICAL_SCHEMA[name]).alias(name) for name in ("prompt", "chosen", "rejected", "source")
    ).with_row_index("__row")
    config = DedupConfig(
        shingle="word", ngram=3, num_perm=num_perm, threshold=threshold, hash=hash_name, save_index=False
    )
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        outcome = deduplicate(frame, config)
        times.append(time.perf_counter() - started)
    seconds = min(times)
    edges = outcome.edges
    pairs = list(zip(edges["row_left"].to_list(), edges["row_right"].to_list())) if edges is not None else []
    queue.put(
        {"seconds": seconds, "pairs": pairs, "rss_mb": peak_rss_mb(),
         "signature_bytes": num_perm * 4, "bands_rows": (outcome.report["lsh"]["bands"], outcome.report["lsh"]["rows"]),
         "removed": outcome.report["near_duplicates"] + outcome.report["exact_duplicates"]}
    )


def in_process(target, *args):
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except Exception:  # queue.Empty: check the child did not die
            if not process.is_alive():
                raise SystemExit(f"{target.__name__} failed (exit code {process.exitcode})") from None
    process.join()
    return result


def quality(pairs, truth: set[tuple[int, int]]) -> tuple[float, float]:
    predicted = {(min(a, b), max(a, b)) for a, b in pairs}
    true_positives = len(predicted & truth)
    precision = true_positives / len(predicted) if predicted else 1.0
    recall = true_positives / len(truth) if truth else 1.0
    return precision, recall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--baseline-records", type=int, default=20_000)
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=2, help="runs per method; the fastest counts (both methods)")
    args = parser.parse_args()

    texts = build_corpus(args.records, args.seed)
    started = time.perf_counter()
    truth = ground_truth(texts, args.threshold)
    print(f"corpus: {len(texts):,} records, {len(truth):,} ground-truth pairs (word 3-gram Jaccard ≥ {args.threshold}, "
          f"exhaustive, {time.perf_counter() - started:.1f}s)")

    subset = min(args.baseline_records, len(texts))
    base = in_process(run_baseline, texts[:subset], args.threshold, args.num_perm, args.repeat)
    truth_subset = {pair for pair in truth if pair[1] < subset}
    base_precision, base_recall = quality(base["pairs"], truth_subset)
    base_seconds = base["seconds"] * len(texts) / subset
    note = "" if subset == len(texts) else f" (measured on the first {subset:,} records: {base['seconds']:.1f}s, extrapolated ×{len(texts) / subset:.1f})"
    print(f"baseline datasketch MinHash+MinHashLSH per record (sha1, bands×rows={base['bands_rows']}): "
          f"{base_seconds:.1f}s{note}, precision {base_precision:.4f}, recall {base_recall:.4f}, "
          f"peak RSS {base['rss_mb']:.0f} MB, signature {base['signature_bytes']} B/record")

    results = {}
    for hash_name in ("xxh32", "sha1"):
        ours = in_process(run_ours, texts, args.threshold, args.num_perm, hash_name, args.repeat)
        precision, recall = quality(ours["pairs"], truth)
        results[hash_name] = ours
        print(f"ours curate.dedup ({hash_name}, bands×rows={ours['bands_rows']}, verified): {ours['seconds']:.2f}s, "
              f"precision {precision:.4f}, recall {recall:.4f}, peak RSS {ours['rss_mb']:.0f} MB, "
              f"signature {ours['signature_bytes']} B/record, rows removed {ours['removed']:,}")

    for hash_name, ours in results.items():
        print(f"speedup ({hash_name}): {base_seconds / ours['seconds']:.1f}× faster than the datasketch baseline")


if __name__ == "__main__":
    main()
