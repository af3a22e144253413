"""Exact and MinHash near-deduplication of canonical records, vectorized over the whole frame.

The flow (datatrove's four MinHash steps, in one process, on columns instead of per-record objects):

1. **Key text.** Each row becomes one normalized string built from its *parts*: an SFT row has one
   part, its whole conversation (`key: conversation`) or all but its final answer (`key: prompt`); a
   preference row has three, prompt, chosen and rejected (`preference_key: pair`, the default whatever
   `key` says), or only its prompt (`preference_key: prompt`, which must be asked for). Message and
   field boundaries are marked (control characters), so text moved from one message or field to the
   next is another key. Normalization, and what each step merges:
   - Unicode NFC (done at ingest for every message): composed and decomposed accents (é / e + ◌́) —
     the same text; it cannot merge distinct items.
   - whitespace (always): runs of spaces, tabs and newlines become one space, ends are stripped — merges
     copies re-wrapped or re-indented; distinct only for whitespace-sensitive content (Python
     indentation), which chat data practically never differs in alone.
   - `lowercase` (default **on**): merges copies that differ only in letter case (a shouted or
     re-typed copy). It merges distinct items only if their entire content differs in case alone
     (case-sensitive code or identifiers); set `lowercase: false` for such data.
   - `strip_punctuation` (default **off**): punctuation and symbols to spaces — merges "17+25" with
     "17-25" and "Hello, World!" with "hello world".
   - `normalize_digits` (default **off**): every digit to `0` — merges every item of an arithmetic eval
     and every person record that differs in dates or ids. datatrove folds both for web documents;
     for conversational and eval data they merge distinct items, so they are opt-in.
   Near duplicates are found on the same normalized text (no folding of its own), so their verified
   Jaccard is measured on what the rows actually say.
2. **Exact duplicates** share the sha256 of that key; all but one (the keep policy decides) are dropped.
3. **Shingles** are built columnar in Polars (texts exploded to tokens, each n-gram the token joined to
   the next n-1 by `shift`; no Python loop over rows), hashed in bulk (xxh32 by default, sha1 —
   datasketch's default hash — on request) and reduced to sorted unique sets (CSR arrays).
4. **MinHash signatures** are computed in numpy over all sets at once: per block of sets (sized to
   stay in cache) and permutation, one multiply-add and one `np.minimum.reduceat`, blocks on threads.
   The permutations (same `RandomState` draws), the MurmurHash3 pre-mix and the uint32 arithmetic
   are exactly datasketch 2.x's default `affine32` scheme, so a signature equals
   `datasketch.MinHash(num_perm, seed, hashfunc=...)` updated with the same shingles (tests prove it
   for both hashes). Signatures are `uint32`: 4 bytes × `num_perm` per record.
5. **Candidates** come from LSH banding: each band's rows are folded into a 64-bit band hash and
   candidates are the rows sharing a band hash — one sort of the (node, band hash) column (the
   columnar group_by), never a Python dict of buckets. Bands/rows default to datasketch's optimum
   (`MinHashLSH._optimal_param`, reimplemented in numpy and tested equal) for a candidate threshold
   0.1 under the dedup threshold, weighted towards recall, because every candidate is verified.
6. **Verification and clustering.** Candidate pairs get their exact Jaccard on the (hashed) shingle
   sets (a vectorized binary search of one sorted set in the other, all pairs at once). Two preference
   pairs score the lowest of that and each part's own Jaccard (prompt, chosen, rejected), so pairs
   that share a long prompt but not their answers are not near duplicates (on the whole text the
   shared transcript dominates); a preference pair and an SFT row are never near duplicates. Two rows
   whose texts differ only in their numbers (punctuation aside: "What is 17+25? 42" / "What is
   18-25? -7", person records with other dates and ids) score 0 unless `merge_number_variants`: such
   rows are distinct items however long the text they share, and `normalize_digits: true` is the
   switch that merges them on purpose. Pairs under the threshold are discarded.
7. **Clusters and the keep policy.** `dup_cluster` is the connected component of the verified edges
   (union-find over integer node ids, vectorized), plus exact-duplicate groups, which follow their
   kept row: every member of a component carries the id of the component's kept row with the highest
   keep priority (its best row), so the split stage keeps whole components in one split. Which rows
   are kept is decided greedily per component, in keep-priority order: the best row is kept; each other
   row verified as a near duplicate of it is dropped (`duplicate_of` = that row); the rows left are
   clustered again among themselves the same way, until none is left. A chain A~B~C with A and C not
   similar therefore keeps A and C (B is dropped as A's duplicate): **a component can keep several
   rows, some of which are not near duplicates of each other** — every dropped row is a verified near
   duplicate of a kept row, and no two kept rows are near duplicates of each other through a verified
   edge the greedy saw between a kept row and its representative.
8. **Guard against candidate explosions.** A bucket with more than `max_bucket_pairs` members (text
   from a template) yields only the star from its first member instead of all its pairs; the report's
   `lsh.bucket_guard` says how many buckets were capped and how many pairs were not expanded.

The package is split by concern: `settings` (MinHashSettings), `text` (key text, normalization,
shingles), `signatures` (MinHash), `banding` (band hashes, candidates, the guard), `verify` (exact
Jaccard and its rules), `clusters` (components, keep policy), `index` (saved index, Redis), `config`
(DedupConfig), `pipeline` (the whole run), `stream` (the out-of-core form of the stage) and
`distributed` (the Ray Data form).

Why character 5-grams by default: support messages are short ("How do I reset my password?" is six
words). Word 5-grams give that question two shingles and word 3-grams four, so "How *can* I reset my
password?" scores a Jaccard of 0.0 and 0.33 against it, and the estimate moves in steps of a quarter:
near-duplicates of short messages (a typo, a changed word, another order number) never reach any
sensible threshold. Character 5-grams give one shingle per character (22 here) and score the pair
0.55; a one-word edit costs only the shingles that overlap it, so the Jaccard degrades smoothly with
the size of the edit on short messages and long conversations alike, and inflections and typos still
share most shingles. Word n-grams remain available (`shingle: word`), e.g. for long documents or to
match a ground truth defined on words (bench/dedup.py uses word 3-grams).

The index of a run (signatures, band hashes, hashed shingle sets, exact-key hashes, Parquet) can be
saved and given to a later run, which then deduplicates its new rows against it without recomputing
the old signatures, and can write an extended index.
"""

from curate.dedup.banding import BucketGuard, band_hashes, band_table_from, candidate_pairs, lsh_params, sorted_unique
from curate.dedup.clusters import Clustering, component_leaders, connected_components, greedy_clusters
from curate.dedup.config import DedupConfig, RedisIndexConfig
from curate.dedup.index import INDEX_FORMAT, INDEX_VERSION, MinHashIndex, dedup_against_redis, empty_index_records
from curate.dedup.pipeline import DedupOutcome, deduplicate, deduplicate_features, features_of, response_length
from curate.dedup.settings import MinHashSettings
from curate.dedup.signatures import estimated_jaccard, fmix32, fmix64, minhash_signatures, permutations, signatures_of
from curate.dedup.text import (
    FIELD_SEPARATOR,
    MESSAGE_SEPARATOR,
    PART_NAMES,
    ShingleSets,
    dedup_text,
    hash_shingles,
    key_hash,
    key_parts,
    key_text,
    number_masked,
    number_variant,
    numbers_in,
    shingle_rows,
    shingle_sets,
    simplify_text,
)
from curate.dedup.verify import similar_pairs, verified_jaccard

__all__ = [
    "BucketGuard",
    "Clustering",
    "DedupConfig",
    "DedupOutcome",
    "FIELD_SEPARATOR",
    "INDEX_FORMAT",
    "INDEX_VERSION",
    "MESSAGE_SEPARATOR",
    "MinHashIndex",
    "MinHashSettings",
    "PART_NAMES",
    "RedisIndexConfig",
    "ShingleSets",
    "band_hashes",
    "band_table_from",
    "candidate_pairs",
    "component_leaders",
    "connected_components",
    "dedup_against_redis",
    "dedup_text",
    "deduplicate",
    "deduplicate_features",
    "empty_index_records",
    "estimated_jaccard",
    "features_of",
    "fmix32",
    "fmix64",
    "greedy_clusters",
    "hash_shingles",
    "key_hash",
    "key_parts",
    "key_text",
    "lsh_params",
    "minhash_signatures",
    "number_masked",
    "number_variant",
    "numbers_in",
    "permutations",
    "response_length",
    "shingle_rows",
    "shingle_sets",
    "signatures_of",
    "similar_pairs",
    "simplify_text",
    "sorted_unique",
    "verified_jaccard",
]
