"""Benchmark: curate's vectorized MinHash dedup vs datasketch (per record and bulk) and datatrove, same run.

Corpus (synthetic, seeded): base texts of 30–120 words drawn from a 20,000-word vocabulary, laid out in
families: a base followed by 0–3 copies, each copy with 10% of its words replaced, in 1–3 contiguous
spans (so copies land on both sides of the threshold: word 3-gram Jaccard ~0.45–0.85). Ground truth =
every pair with exact Jaccard ≥ threshold on word 3-gram sets, found exhaustively with a sparse
matrix product (independent of every method).

Every side gets the same texts, word 3-grams, the same 32-bit shingle hash (`--hash`: xxh32 by default,
which all of them accept; sha1 on request) and the same LSH banding (bands × rows, with num_perm =
bands × rows so nobody computes permutations the others skip). Each side runs at each peer's own
banding: datasketch's optimum for the threshold, datatrove's default (14 × 8) and curate's default
(aimed lower, because curate verifies its candidates).

- **datasketch, per record**: `MinHash(...).update_batch`, `MinHashLSH.query` then `insert`; pairs = hits.
- **datasketch, bulk**: `MinHash.bulk` for all sketches, `MinHashLSH.insertion_session`, then one
  `query` per record; pairs = hits.
- **datatrove**: its four MinHash steps (signatures, buckets, clusters, filter) through
  `LocalPipelineExecutor` with `--workers` tasks (fork), on Documents held in memory, files in a temp
  folder; a whitespace word tokenizer of our own (its default needs NLTK data downloaded). Pairs = all
  pairs inside the clusters its `.dups` files form (read after the timer stops).
- **datatrove-1proc**: the same four steps called directly in one process (no executor start-up, no
  workers), which is faster on small inputs and few cores.
- **ours**: `curate.dedup.deduplicate` on the canonical frame, end to end (normalization, shingling,
  hashing, signatures, banding, candidates, exact-Jaccard verification, clustering, keep policy);
  pairs = verified edges. The library's in-memory call: the whole frame and its sketches in memory.
- **ours-stream**: the out-of-core dedup that `curate run` executes (`curate.dedup.stream`): the input
  scanned from a Parquet file in batches, signatures and band keys on disk, candidates band by band. The
  same decisions as `ours` (tested; the bench prints whether the kept rows agree); it keeps no edge list,
  so its pairs are every pair inside its clusters, as for datatrove. Its peak memory is the stage's.

Each side runs in its own subprocess, `--repeat` times in that process; the fastest run counts, the same
N for every side. Peak memory per side: bench/peak_memory.py (the larger of the side's own VmHWM and its
process tree's PSS, sampled every 50 ms or less often for large processes (peak_memory.sampled);
datatrove's workers are separate processes).
Nothing is extrapolated: `--records` is the size for every side. Ratios come last.

    .venv/bin/python bench/dedup.py                      # 100k records
    .venv/bin/python bench/dedup.py --records 3000 --repeat 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak_memory import own_peak_mb, sampled, tree_memory_mb  # noqa: E402

SIDES = ("datasketch-per-record", "datasketch-bulk", "datatrove", "datatrove-1proc", "ours", "ours-stream")


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
            texts.append(" ".join(vocabulary[edited_copy(base, edit_fraction, len(vocabulary), rng)]))
    return texts


def edited_copy(base: np.ndarray, edit_fraction: float, vocabulary_size: int, rng) -> np.ndarray:
    copy = base.copy()
    edits = max(1, round(edit_fraction * len(copy)))
    spans = int(rng.integers(1, 4))
    for span in np.diff(np.linspace(0, edits, spans + 1).round().astype(int)):
        if span:
            start = int(rng.integers(0, len(copy) - span + 1))
            copy[start : start + span] = rng.integers(0, vocabulary_size, span)
    return copy


def ground_truth(texts: list[str], threshold: float) -> set[tuple[int, int]]:
    """All pairs with word 3-gram Jaccard ≥ threshold, exhaustively (sparse X·Xᵀ)."""
    import polars as pl
    from scipy.sparse import csr_matrix

    trigram = pl.concat_str([pl.element(), pl.element().shift(-1), pl.element().shift(-2)], separator=" ")
    frame = (
        pl.DataFrame({"text": texts})
        .with_row_index("doc")
        .select("doc", pl.col("text").str.split(" ").list.eval(trigram.drop_nulls()).alias("g"))
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
    keep = inter / (sizes[rows] + sizes[cols] - inter) >= threshold
    return set(zip(rows[keep].tolist(), cols[keep].tolist()))


def word_trigrams(text: str) -> set[str]:
    words = text.split(" ")
    return {" ".join(words[i : i + 3]) for i in range(len(words) - 2)} or {text}


def shingle_hash(name: str):
    """The 32-bit shingle hash every side uses: xxhash's xxh32 (seed 0) or datasketch's sha1_hash32."""
    if name == "xxh32":
        import xxhash

        return xxhash.xxh32_intdigest
    from datasketch.hashfunc import sha1_hash32

    return sha1_hash32


# ------------------------------------------------------------------------------------------ the sides
# Each returns (predicted pairs, rows kept or None); `timed` wraps the part that is measured.


def side_datasketch_per_record(texts, bands, rows, hash_name, timed):
    from datasketch import MinHash, MinHashLSH

    hashfunc = shingle_hash(hash_name)

    def once():
        lsh = MinHashLSH(num_perm=bands * rows, params=(bands, rows))
        pairs = []
        for index, text in enumerate(texts):
            minhash = MinHash(num_perm=bands * rows, hashfunc=hashfunc)
            minhash.update_batch([gram.encode("utf-8") for gram in word_trigrams(text)])
            pairs.extend((other, index) for other in lsh.query(minhash))
            lsh.insert(index, minhash)
        return pairs

    return timed(once), None


def side_datasketch_bulk(texts, bands, rows, hash_name, timed):
    from datasketch import MinHash, MinHashLSH

    hashfunc = shingle_hash(hash_name)

    def once():
        shingles = [[gram.encode("utf-8") for gram in word_trigrams(text)] for text in texts]
        sketches = MinHash.bulk(shingles, num_perm=bands * rows, hashfunc=hashfunc)
        lsh = MinHashLSH(num_perm=bands * rows, params=(bands, rows))
        with lsh.insertion_session() as session:
            for index, sketch in enumerate(sketches):
                session.insert(index, sketch)
        return [(other, index) for index, sketch in enumerate(sketches) for other in lsh.query(sketch) if other < index]

    return timed(once), None


def side_datatrove(texts, bands, rows, hash_name, timed, workers: int):
    """datatrove's four steps through LocalPipelineExecutor, `workers` tasks (fork)."""
    from datatrove.executor import LocalPipelineExecutor

    steps, documents = datatrove_steps(texts, bands, rows, hash_name)

    def read(_data, rank: int = 0, world_size: int = 1):
        yield from documents[rank::world_size]

    def pipeline(folder: Path) -> None:
        signature, buckets, cluster, keep = steps(folder)
        for name, stage, tasks in (("1", [read, signature], workers), ("2", [buckets], bands), ("3", [cluster], 1), ("4", [read, keep], workers)):
            LocalPipelineExecutor(
                stage, tasks=tasks, workers=min(workers, tasks), logging_dir=str(folder / "logs" / name),
                start_method="fork", skip_completed=False,
            ).run()  # fmt: skip

    return datatrove_outcome(timed, pipeline, len(texts), workers)


def side_datatrove_1proc(texts, bands, rows, hash_name, timed):
    """The same four steps called directly in this process, one rank each (no executor, no workers)."""
    from collections import deque

    steps, documents = datatrove_steps(texts, bands, rows, hash_name)

    def pipeline(folder: Path) -> None:
        signature, buckets, cluster, keep = steps(folder)
        signature.run(iter(documents), 0, 1)
        for bucket in range(bands):
            buckets.run(None, bucket, bands)
        cluster.run(None, 0, 1)
        deque(keep.run(iter(documents), 0, 1), maxlen=0)

    return datatrove_outcome(timed, pipeline, len(texts), 1)


def datatrove_steps(texts, bands, rows, hash_name):
    """(folder -> its four MinHash steps, Documents in memory) at this banding and hash."""
    from datatrove.data import Document
    from datatrove.pipeline.dedup.minhash import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.utils.hashing import HashConfig
    from datatrove.utils.word_tokenizers import WordTokenizer

    class SpaceTokenizer(WordTokenizer):
        """The corpus is lowercase words between single spaces; datatrove's default English tokenizer
        needs NLTK's punkt data, which an offline machine cannot download."""

        def word_tokenize(self, text):
            return text.split()

        def sent_tokenize(self, text):
            return [text]

        def span_tokenize(self, text):
            return [(0, len(text))]

    config = MinhashConfig(
        n_grams=3, num_buckets=bands, hashes_per_bucket=rows,
        hash_config=HashConfig(precision=32, hash_fc="xxhash" if hash_name == "xxh32" else "sha1"),
    )  # fmt: skip
    tokenizer = SpaceTokenizer()

    def steps(folder: Path):
        return (
            MinhashDedupSignature(str(folder / "sigs"), config=config, language=tokenizer),
            MinhashDedupBuckets(str(folder / "sigs"), str(folder / "buckets"), config=config),
            MinhashDedupCluster(str(folder / "buckets"), str(folder / "remove"), config=config),
            MinhashDedupFilter(str(folder / "remove")),
        )

    return steps, [Document(text=text, id=str(index)) for index, text in enumerate(texts)]


def datatrove_outcome(timed, pipeline, n: int, world_size: int):
    """Time `pipeline(folder)` in a fresh temp folder per run; read its removals and pairs afterwards."""
    folders: list[Path] = []

    def once():
        for old in folders:  # the previous repeat's files (only the last run's are read afterwards)
            shutil.rmtree(old, ignore_errors=True)
        folders.append(Path(tempfile.mkdtemp(prefix="datatrove-")))
        pipeline(folders[-1])
        return folders[-1]

    folder = timed(once)
    try:
        removed = sum(path.stat().st_size // 4 for path in (folder / "remove").glob("*.remove"))
        return cluster_pairs(datatrove_edges(folder / "buckets", world_size), n), n - removed
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def datatrove_edges(buckets: Path, world_size: int) -> np.ndarray:
    """Its duplicate pairs as global row numbers: (file = rank, doc = position in that rank's share)."""
    raw = [np.fromfile(path, dtype="<u4").reshape(-1, 4) for path in sorted(buckets.glob("*.dups"))]
    raw = np.concatenate(raw) if raw else np.zeros((0, 4), np.uint32)
    return np.stack([raw[:, 0] + raw[:, 1].astype(np.int64) * world_size, raw[:, 2] + raw[:, 3].astype(np.int64) * world_size], 1)


def cluster_pairs(edges: np.ndarray, n: int) -> list[tuple[int, int]]:
    """Every pair inside the connected components of `edges` (what a cluster-based method claims)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(edges) == 0:
        return []
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    members: dict[int, list[int]] = {}
    for node in np.unique(edges):
        members.setdefault(int(labels[node]), []).append(int(node))
    return pairs_within(members.values())


def pairs_within(groups) -> list[tuple[int, int]]:
    """Every pair of members of each group (sorted row numbers), smaller row first."""
    return [(a, b) for group in groups for i, a in enumerate(group) for b in group[i + 1 :]]


def canonical_texts(texts: list[str]):
    """A canonical-shaped frame, one assistant message per record; ids only need to be distinct here."""
    import polars as pl

    from schemas import CANONICAL_SCHEMA

    return pl.DataFrame({"content": texts, "id": [f"{index:032x}" for index in range(len(texts))]}).select(
        pl.col("id"),
        pl.lit("sft").alias("kind"),
        pl.concat_list(pl.struct(pl.lit("assistant").alias("role"), pl.col("content"))).cast(CANONICAL_SCHEMA["messages"]).alias("messages"),
        *[pl.lit(None, dtype=CANONICAL_SCHEMA[name]).alias(name) for name in ("prompt", "chosen", "rejected", "source")],
    )


def ours_config(bands: int, rows: int, hash_name: str):
    from curate.dedup import DedupConfig

    return DedupConfig(shingle="word", ngram=3, num_perm=bands * rows, bands=bands, rows=rows, hash=hash_name, save_index=False)


def side_ours(texts, bands, rows, hash_name, timed):
    from curate.dedup import deduplicate

    frame = canonical_texts(texts).with_row_index("__row")
    outcome = timed(lambda: deduplicate(frame, ours_config(bands, rows, hash_name)))
    edges = outcome.edges
    pairs = list(zip(edges["row_left"].to_list(), edges["row_right"].to_list())) if edges is not None else []
    removed = outcome.report["near_duplicates"] + outcome.report["exact_duplicates"]
    return pairs, len(texts) - removed


def side_ours_stream(texts, bands, rows, hash_name, timed):
    """The out-of-core dedup `curate run` executes (curate.dedup.stream): input scanned from Parquet in
    batches, signatures and band keys on disk. Its decisions equal `ours` (tested); it keeps no edge
    list, so its pairs are every pair inside its clusters, as for datatrove."""
    import shutil

    import polars as pl

    from curate.dedup.stream import deduplicate_out_of_core

    folder = Path(tempfile.mkdtemp(prefix="dedup-stream-"))
    try:
        canonical_texts(texts).write_parquet(folder / "input.parquet", row_group_size=10_000)
        texts.clear()  # the stage reads its input from the file, as in a pipeline
        scan = pl.scan_parquet(folder / "input.parquet")
        outcome = timed(lambda: deduplicate_out_of_core(scan, ours_config(bands, rows, hash_name), folder / "dedup"))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    decisions = outcome.decisions.select("__row", "dup_cluster").drop_nulls("dup_cluster")
    members = decisions.group_by("dup_cluster").agg(pl.col("__row").sort()).filter(pl.col("__row").list.len() > 1)["__row"].to_list()
    return pairs_within(members), outcome.decisions.height - outcome.decisions["reason"].is_not_null().sum()


def run_side(args) -> None:
    """Child process: read the corpus, run one side `--repeat` times, write seconds and pairs."""
    texts = Path(args.corpus).read_text(encoding="utf-8").split("\n")
    times: list[float] = []

    def timed(fn):
        for _ in range(args.repeat):
            started = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - started)
        return result

    extra = {"workers": args.workers} if args.side == "datatrove" else {}
    side = globals()["side_" + args.side.replace("-", "_")]
    pairs, kept = side(texts, args.bands, args.rows, args.hash, timed, **extra)
    np.save(args.result + ".npy", np.asarray(pairs, dtype=np.int64).reshape(-1, 2))
    Path(args.result).write_text(json.dumps({"seconds": min(times), "kept": kept, "own_peak_mb": own_peak_mb()}))


def measure(side: str, corpus: Path, bands: int, rows: int, args, folder: Path) -> dict:
    """Run one side in its own process, sampling its memory (see `tree_memory_mb`) until it ends."""
    result = folder / f"{side}-{bands}x{rows}.json"
    command = [sys.executable, __file__, "--side", side, "--corpus", str(corpus), "--result", str(result),
               "--bands", str(bands), "--rows", str(rows), "--hash", args.hash, "--repeat", str(args.repeat),
               "--workers", str(args.workers)]  # fmt: skip
    log = folder / f"{side}-{bands}x{rows}.log"
    peak = 0.0
    with log.open("wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        while process.poll() is None:
            memory, wait = sampled(lambda: tree_memory_mb(process.pid))
            peak = max(peak, memory)
            time.sleep(wait)
    if process.returncode != 0 or not result.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise SystemExit(f"bench/dedup.py: side {side} failed (exit {process.returncode}): " + " | ".join(tail))
    outcome = json.loads(result.read_text())
    outcome["pairs"] = np.load(f"{result}.npy", allow_pickle=False)
    outcome["rss_mb"] = max(peak, outcome["own_peak_mb"])
    return outcome


def quality(pairs: np.ndarray, truth: set[tuple[int, int]]) -> tuple[float, float]:
    predicted = {(min(a, b), max(a, b)) for a, b in pairs.tolist()}
    true_positives = len(predicted & truth)
    precision = true_positives / len(predicted) if predicted else 1.0
    recall = true_positives / len(truth) if truth else 1.0
    return precision, recall


def bandings(threshold: float, num_perm: int) -> list[tuple[str, int, int]]:
    from datasketch import MinHashLSH

    from curate.dedup import DedupConfig

    from datatrove.pipeline.dedup.minhash import MinhashConfig

    datasketch = MinHashLSH(threshold=threshold, num_perm=num_perm)
    datatrove = MinhashConfig()  # its defaults, whatever the threshold: 14 buckets × 8 hashes
    ours = DedupConfig(threshold=threshold, num_perm=num_perm).band_params()
    found = [
        ("datasketch's optimum", datasketch.b, datasketch.r),
        ("datatrove's default", datatrove.num_buckets, datatrove.hashes_per_bucket),
        ("curate's default", *ours),
    ]
    return [banding for index, banding in enumerate(found) if banding[1:] not in [b[1:] for b in found[:index]]]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--num-perm", type=int, default=128, help="budget the two bandings are chosen for")
    parser.add_argument("--hash", choices=("xxh32", "sha1"), default="xxh32", help="shingle hash, every side")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=2, help="runs per side; the fastest counts (every side)")
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="datatrove tasks")
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of " + ", ".join(SIDES))
    for internal in ("--side", "--corpus", "--result"):
        parser.add_argument(internal, help=argparse.SUPPRESS)
    parser.add_argument("--bands", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.side:
        return run_side(args)
    sides = [side for side in args.sides.split(",") if side]
    texts = build_corpus(args.records, args.seed)
    started = time.perf_counter()
    truth = ground_truth(texts, args.threshold)
    print(f"corpus: {len(texts):,} records, {len(truth):,} ground-truth pairs (word 3-gram Jaccard ≥ {args.threshold}, "
          f"exhaustive, {time.perf_counter() - started:.1f}s); hash {args.hash} on every side; best of {args.repeat}; "
          f"{len(os.sched_getaffinity(0))} cores, datatrove tasks {args.workers}")  # fmt: skip
    ratios = []
    with tempfile.TemporaryDirectory() as folder:
        corpus = Path(folder) / "corpus.txt"
        corpus.write_text("\n".join(texts), encoding="utf-8")
        for label, bands, rows in bandings(args.threshold, args.num_perm):
            print(f"\n== banding {bands} bands × {rows} rows ({label}; num_perm {bands * rows}) ==")
            results = {side: measure(side, corpus, bands, rows, args, Path(folder)) for side in sides}
            for side, result in results.items():
                precision, recall = quality(result["pairs"], truth)
                kept = f", rows kept {result['kept']:,}" if result["kept"] is not None else ""
                print(f"{side:22s} {result['seconds']:8.2f} s  precision {precision:.4f}  recall {recall:.4f}  "
                      f"pairs {len(result['pairs']):,}  peak memory {result['rss_mb']:.0f} MB{kept}")  # fmt: skip
            if "ours" in results and "ours-stream" in results:
                same = results["ours"]["kept"] == results["ours-stream"]["kept"]
                print(f"ours-stream keeps the same rows as ours: {'yes' if same else 'NO'} "
                      f"({results['ours-stream']['kept']:,} and {results['ours']['kept']:,})")  # fmt: skip
            for ours in ("ours", "ours-stream"):
                if ours in results:
                    ratios += [(bands, rows, side, ours, results[side]["seconds"] / results[ours]["seconds"])
                               for side in results if not side.startswith("ours")]  # fmt: skip
    print()
    for bands, rows, side, ours, ratio in ratios:
        print(f"ratio @ {bands}×{rows} ({args.hash}): {side} / {ours} = {ratio:.1f}× (ours faster when > 1)")
    for bands, rows, ours in dict.fromkeys((b, r, o) for b, r, _, o, _ in ratios):
        for peer in ("datasketch", "datatrove"):
            modes = [(ratio, side) for b, r, side, o, ratio in ratios if (b, r, o) == (bands, rows, ours) and side.startswith(peer)]
            if modes:
                ratio, side = min(modes)
                print(f"headline @ {bands}×{rows} ({args.hash}): {peer} at its fastest ({side}) / {ours} = {ratio:.1f}×")


if __name__ == "__main__":
    main()
