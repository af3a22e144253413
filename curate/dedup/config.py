"""Config of the `dedup` stage (one place: the JSON Schema, CLI flags and docs derive from it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from curate.dedup.banding import lsh_params
from curate.dedup.settings import HashName, KeyName, MinHashSettings, PreferenceKeyName, ShingleKind
from curate.stage import Seed, StageConfig
from safety.redact import redact


class RedisIndexConfig(StageConfig):
    """A shared index in Redis (datasketch `MinHashLSH` with Redis storage), for several machines."""

    host: str = "127.0.0.1"
    port: int = Field(6379, ge=1, le=65535)
    db: int = Field(0, ge=0, le=1_000_000)
    # `redis://[user:password@]host:port/db` (or rediss://) instead of host/port/db, for a server that
    # needs a password. The stage fingerprint hashes it; every output shows it redacted.
    url: str | None = Field(None, pattern=r"^rediss?://")
    basename: str = Field("curate-dedup", min_length=1)

    def connection_kwargs(self) -> dict:
        """Keyword arguments of `redis.Redis` (datasketch's Redis storage takes the same)."""
        if self.url is None:
            return {"host": self.host, "port": self.port, "db": self.db}
        from redis.connection import parse_url

        params = parse_url(self.url)
        if params.pop("connection_class", None) is not None:  # rediss://: `redis.Redis` takes ssl=True
            params["ssl"] = True
        return params

    def display(self) -> str:
        """Where the index lives, without credentials (for messages)."""
        return redact(self.url) if self.url else f"{self.host}:{self.port}"


class DedupConfig(StageConfig):
    """Config of the `dedup` stage (exact and near dedup in one pass; switch either off)."""

    exact: bool = True
    near: bool = True
    key: KeyName = Field(
        "conversation", description="SFT rows: the whole conversation, or `prompt` (all but the final answer)."
    )
    preference_key: PreferenceKeyName = Field(
        "pair",
        description="Preference rows: `pair` = prompt + chosen + rejected, each part similar for a near duplicate; "
        "`prompt` = pairs sharing a prompt are duplicates whatever their answers.",
    )
    lowercase: bool = Field(True, description="Fold letter case (merges copies that differ only in case).")
    strip_punctuation: bool = Field(False, description="Punctuation and symbols to spaces (merges 17+25 with 17-25).")
    normalize_digits: bool = Field(False, description="Every digit to 0 (merges items that differ only in numbers).")
    merge_number_variants: bool = Field(
        False, description="Let rows that differ only in their numbers be near duplicates (off: distinct items)."
    )
    include_system: bool = False
    shingle: ShingleKind = "char"
    ngram: int = Field(5, ge=1, le=64)
    num_perm: int = Field(128, ge=2, le=1024)
    seed: Seed = 1
    hash: HashName = "xxh32"
    threshold: float = Field(0.7, gt=0.0, le=1.0)
    # Banding: explicit, or datasketch's optimum (with these weights) for `candidate_threshold`, which
    # defaults to threshold - 0.1. Candidates are aimed below the threshold and recall is weighted up,
    # because every candidate is verified: a false candidate costs a little sorting, a missed pair is
    # lost for good. At 0.7 / 128 perms this gives 23 bands × 5 rows: a pair at Jaccard 0.7 becomes a
    # candidate with probability 0.985 (datasketch's own 0.7 optimum, 14 × 9: 0.44).
    candidate_threshold: float | None = Field(None, gt=0.0, le=1.0)
    bands: int | None = Field(None, ge=1, le=1024)  # bands × rows ≤ num_perm ≤ 1024
    rows: int | None = Field(None, ge=1, le=1024)
    false_positive_weight: float = Field(0.2, ge=0.0, le=1.0)
    false_negative_weight: float = Field(0.8, ge=0.0, le=1.0)
    verify: bool = True
    # Candidates whose signature estimate is this far under the threshold are not verified (treated as
    # not similar): with 128 permutations the estimate's standard error is at most 0.044, so a pair at
    # the threshold is skipped with probability ~1e-4, while template-sharing support conversations
    # (many candidates at Jaccard 0.3-0.5) skip most of the verification work. null: verify all.
    skip_verify_margin: float | None = Field(0.15, ge=0.0, le=1.0)
    max_bucket_pairs: int = Field(64, ge=2, le=1_000_000)
    keep: Literal["longest_response", "highest_score", "earliest_source"] = "longest_response"
    score_column: str | None = None
    # A saved index (a previous dedup stage's `index/` folder): new rows are deduplicated against it.
    index_path: str | None = None
    save_index: bool = True
    extend_index: bool = True  # the saved index holds the old index's rows plus this run's kept rows
    examples: int = Field(5, ge=0, le=1000)  # largest clusters listed in the report
    # Also dedup against (and add this run's kept rows to) a shared Redis index. Its answers depend on
    # what other runs stored there, so a cached result of this stage is only as fresh as its run.
    redis: RedisIndexConfig | None = None

    @model_validator(mode="after")
    def _consistent(self):
        if not (self.exact or self.near):
            raise ValueError("at least one of exact and near must be true")
        if (self.bands is None) != (self.rows is None):
            raise ValueError("set both bands and rows, or neither")
        if self.bands is not None and self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands × rows = {self.bands * self.rows} exceeds num_perm = {self.num_perm}")
        if self.false_positive_weight + self.false_negative_weight <= 0:
            raise ValueError("false_positive_weight + false_negative_weight must be > 0")
        if self.keep == "highest_score" and not self.score_column:
            raise ValueError("keep: highest_score needs score_column")
        return self

    def settings(self) -> MinHashSettings:
        return MinHashSettings(
            num_perm=self.num_perm,
            seed=self.seed,
            hash=self.hash,
            shingle=self.shingle,
            ngram=self.ngram,
            key=self.key,
            preference_key=self.preference_key,
            lowercase=self.lowercase,
            strip_punctuation=self.strip_punctuation,
            normalize_digits=self.normalize_digits,
            include_system=self.include_system,
        )

    def band_params(self) -> tuple[int, int]:
        if self.bands is not None:
            return self.bands, self.rows
        return lsh_params(
            self.effective_candidate_threshold(), self.num_perm, self.false_positive_weight, self.false_negative_weight
        )

    def effective_candidate_threshold(self) -> float:
        if self.candidate_threshold is not None:
            return self.candidate_threshold
        return round(max(0.05, self.threshold - 0.1), 6)


