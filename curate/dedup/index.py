"""Indexes of rows kept by earlier runs: the saved Parquet index (`MinHashIndex`) and the shared Redis
index (datasketch `MinHashLSH` with Redis storage)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from curate.dedup.config import DedupConfig
from curate.dedup.settings import MinHashSettings
from curate.dedup.text import PART_NAMES
from curate.errors import ConfigError, RunStateError
from safety.redact import redact

INDEX_FORMAT = "curate-minhash-index"
INDEX_VERSION = 2  # 2: number_hash, digits_hash and per-part shingle sets


@dataclass
class MinHashIndex:
    """Rows already kept by earlier runs: id, dup_cluster, key_hash, signature, shingles; plus the
    settings they were computed with and their band hashes."""

    settings: MinHashSettings
    records: pl.DataFrame  # id, dup_cluster, key_hash, signature (Array[UInt32]), shingles (List[UInt32])
    bands: int
    rows: int
    band_table: pl.DataFrame  # node, band, band_hash

    @property
    def signatures(self) -> np.ndarray:
        column = self.records["signature"]
        if len(column) == 0:
            return np.empty((0, self.settings.num_perm), dtype=np.uint32)
        return column.to_numpy().astype(np.uint32).reshape(len(column), self.settings.num_perm)

    def save(self, target: Path) -> None:
        from curate.atomic import atomic_dir

        with atomic_dir(target) as tmp:
            self.records.write_parquet(tmp / "records.parquet", compression="zstd", statistics=True)
            self.band_table.write_parquet(tmp / "bands.parquet", compression="zstd", statistics=True)
            meta = {
                "format": INDEX_FORMAT,
                "version": INDEX_VERSION,
                "settings": self.settings.as_dict(),
                "bands": self.bands,
                "rows": self.rows,
                "records": self.records.height,
            }
            (tmp / "index.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @staticmethod
    def files(path: Path) -> list[Path]:
        return [path / "index.json", path / "records.parquet", path / "bands.parquet"]

    @classmethod
    def load(cls, path: Path, expected: MinHashSettings) -> "MinHashIndex":
        meta_path = path / "index.json"
        if not meta_path.is_file():
            raise RunStateError(f"{path}: not a dedup index (no index.json); save one with a dedup stage first")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise RunStateError(f"{meta_path}: unreadable dedup index metadata ({error})") from None
        if meta.get("format") != INDEX_FORMAT or meta.get("version") != INDEX_VERSION:
            raise RunStateError(f"{meta_path}: not a {INDEX_FORMAT} version {INDEX_VERSION} file")
        stored = meta.get("settings", {})
        for name, value in expected.as_dict().items():
            if stored.get(name) != value:
                raise ConfigError(
                    f"{meta_path}: index was built with {name}={stored.get(name)!r} but this stage uses "
                    f"{name}={value!r}; signatures are only comparable with identical settings"
                )
        try:
            records = pl.read_parquet(path / "records.parquet", glob=False)
            band_table = pl.read_parquet(path / "bands.parquet", glob=False)
        except (OSError, pl.exceptions.PolarsError) as error:
            raise RunStateError(f"{path}: unreadable dedup index ({error})") from None
        return cls(
            settings=expected, records=records, bands=int(meta["bands"]), rows=int(meta["rows"]), band_table=band_table
        )


def empty_index_records(num_perm: int) -> pl.DataFrame:
    return pl.DataFrame(
        schema={
            "id": pl.String,
            "dup_cluster": pl.String,
            "key_hash": pl.String,
            "number_hash": pl.String,
            "digits_hash": pl.String,
            "signature": pl.Array(pl.UInt32, num_perm),
            "shingles": pl.List(pl.UInt32),
            **{f"shingles_{name}": pl.List(pl.UInt32) for name in PART_NAMES},
        }
    )



def dedup_against_redis(
    config: DedupConfig,
    settings: MinHashSettings,
    band_params: tuple[int, int],
    survivors: np.ndarray,
    signatures: np.ndarray,
    has_shingles: np.ndarray,
    ids: np.ndarray,
    keys: pl.Series,
    reason: np.ndarray,
    duplicate_of: np.ndarray,
    cluster: np.ndarray,
    jaccard_estimated: np.ndarray,
) -> dict:
    """Drop rows this run kept that duplicate a row in the shared Redis index, then add the rest.

    datasketch's `MinHashLSH` with Redis storage holds the band buckets (same bands/rows as here);
    beside it three Redis hashes hold each indexed id's signature, `dup_cluster` and exact key, so a
    hit is confirmed by its estimated Jaccard (the shingle sets are not shared; `jaccard_verified`
    stays null) and exact keys match directly. datasketch's API is per record, so this path is a
    Python loop over the rows that survived the local dedup: the price of a shared index. Without the
    shingle sets, the per-part check of preference pairs and the number-variant rule do not apply here:
    a hit is judged on the whole-text estimate."""
    try:
        import redis
    except ImportError as error:  # pragma: no cover - redis is an optional dependency
        raise ConfigError(f"dedup redis: the `redis` Python package is needed ({error})") from None
    from curate.errors import ExternalServiceError

    options = config.redis
    client = redis.Redis(**options.connection_kwargs())
    decided = (reason, duplicate_of, cluster, jaccard_estimated)
    try:
        lsh = _redis_lsh(client, config, settings, band_params)
        kept = survivors[reason[survivors] == None]  # noqa: E711
        node_of_row = {int(row): node for node, row in enumerate(survivors.tolist())}
        found, added = _query_redis(client, lsh, config, settings, kept, node_of_row, signatures, has_shingles, ids, keys, decided)
        _store_in_redis(client, options.basename, added, node_of_row, signatures, ids, keys, cluster)
        size = client.hlen(f"{options.basename}:signature")
    except redis.exceptions.RedisError as error:
        raise ExternalServiceError(
            f"dedup redis {options.display()}: {type(error).__name__}: {redact(str(error))}"
        ) from None
    return {
        "basename": options.basename,
        "exact_duplicates": found["exact"],
        "near_duplicates": found["near"],
        "added": len(added),
        "size": int(size),
    }


def _redis_lsh(client, config: DedupConfig, settings: MinHashSettings, band_params: tuple[int, int]):
    """The shared `MinHashLSH`, after checking the index was built with the same settings."""
    from datasketch import MinHashLSH

    options = config.redis
    meta_key = f"{options.basename}:settings"
    wanted = json.dumps({**settings.as_dict(), "bands": band_params[0], "rows": band_params[1]}, sort_keys=True)
    stored = client.get(meta_key)
    if stored is None:
        client.set(meta_key, wanted)
    elif stored.decode() != wanted:
        raise ConfigError(
            f"dedup redis {options.display()} {options.basename!r}: index was built with settings "
            f"{stored.decode()} but this stage uses {wanted}"
        )
    return MinHashLSH(
        threshold=config.threshold,
        num_perm=settings.num_perm,
        params=band_params,
        storage_config={"type": "redis", "basename": options.basename.encode(), "redis": options.connection_kwargs()},
        prepickle=False,  # keys stay our own bytes; prepickling would unpickle whatever the Redis holds
    )


def _query_redis(client, lsh, config, settings, kept, node_of_row, signatures, has_shingles, ids, keys, decided):
    """Per kept row: an exact-key hit, else the best LSH hit at the threshold, else insert it."""
    from datasketch import LeanMinHash

    reason, duplicate_of, cluster, jaccard_estimated = decided
    basename = config.redis.basename
    exact_hits = client.hmget(f"{basename}:exact", [keys[int(row)] for row in kept]) if len(kept) else []
    added, found = [], {"exact": 0, "near": 0}
    with lsh.insertion_session() as session:
        for row, exact_hit in zip(kept.tolist(), exact_hits):
            node = node_of_row[row]
            if exact_hit is not None:
                hit_id = exact_hit.decode()
                reason[row], duplicate_of[row] = "exact_duplicate", hit_id
                cluster[row] = (client.hget(f"{basename}:cluster", hit_id) or exact_hit).decode()
                jaccard_estimated[row] = 1.0
                found["exact"] += 1
                continue
            if not has_shingles[node]:
                added.append(row)
                continue
            signature = np.ascontiguousarray(signatures[node])
            sketch = LeanMinHash(seed=settings.seed, hashvalues=signature, scheme="affine32")
            best_id, best = _best_redis_hit(client, basename, sorted(key.decode() for key in lsh.query(sketch)), signature)
            if best_id is not None and best >= config.threshold:
                reason[row], duplicate_of[row] = "near_duplicate", best_id
                cluster[row] = (client.hget(f"{basename}:cluster", best_id) or best_id.encode()).decode()
                jaccard_estimated[row] = best
                found["near"] += 1
                continue
            session.insert(str(ids[row]).encode(), sketch, check_duplication=False)
            added.append(row)
    return found, added


def _best_redis_hit(client, basename: str, hits: list[str], signature: np.ndarray) -> tuple[str | None, float]:
    best_id, best = None, -1.0
    if hits:
        for hit_id, raw in zip(hits, client.hmget(f"{basename}:signature", hits)):
            if raw is None:
                continue
            estimate = float((np.frombuffer(raw, dtype=np.uint32) == signature).mean())
            if estimate > best:
                best_id, best = hit_id, estimate
    return best_id, best


def _store_in_redis(client, basename, added, node_of_row, signatures, ids, keys, cluster) -> None:
    if not added:
        return
    pipe = client.pipeline(transaction=True)
    for row in added:
        row_id = str(ids[row])
        pipe.hset(f"{basename}:signature", row_id, np.ascontiguousarray(signatures[node_of_row[row]]).tobytes())
        pipe.hset(f"{basename}:cluster", row_id, str(cluster[row]))
        pipe.hsetnx(f"{basename}:exact", keys[row], row_id)
    pipe.execute()
