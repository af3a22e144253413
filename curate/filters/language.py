"""Offline language identification with lingua (its models ship inside the wheel; Rust, parallel batch).

Columns: `lang` (ISO 639-1 code, lower case, e.g. "en"; null when the text has no letters) and
`lang_score` (lingua's confidence for that language among the candidates, 0..1, rounded to 4
decimals for reproducible outputs). The text scored is the
user + assistant text of the row, cut to `max_chars` characters (default 200) (language is clear long before that,
and lingua's cost grows with length).
"""

from __future__ import annotations

import polars as pl

from curate.errors import ConfigError

DEFAULT_CANDIDATES = ("en", "de", "fr", "es", "it", "pt", "nl", "pl", "ru", "zh", "ja")

_DETECTORS: dict[tuple, object] = {}
DETECT_CHUNK = 16384  # texts per lingua call: bounds the memory of its per-candidate result objects


def language_detector(candidates: tuple[str, ...], low_accuracy: bool):
    from lingua import IsoCode639_1, LanguageDetectorBuilder

    key = (tuple(candidates), low_accuracy)
    if key not in _DETECTORS:
        codes = []
        for code in candidates:
            try:
                codes.append(IsoCode639_1.from_str(code.lower()))
            except Exception:
                raise ConfigError(f"language candidate {code!r} is not an ISO 639-1 code lingua knows") from None
        if len(codes) < 2:
            raise ConfigError("language.candidates: give at least two languages (lingua needs a choice)")
        builder = LanguageDetectorBuilder.from_iso_codes_639_1(*codes)
        if low_accuracy:
            builder = builder.with_low_accuracy_mode()
        _DETECTORS[key] = builder.build()
    return _DETECTORS[key]


def language_columns(texts: pl.Series, candidates: tuple[str, ...], low_accuracy: bool) -> pl.DataFrame:
    detector = language_detector(candidates, low_accuracy)
    texts = texts.fill_null("")
    labels: list[str | None] = []
    scores: list[float] = []
    for start in range(0, len(texts), DETECT_CHUNK):
        values = detector.compute_language_confidence_values_in_parallel(texts.slice(start, DETECT_CHUNK).to_list())
        # Each row's candidates come sorted by confidence; an empty/letterless text gets all zeros.
        labels.extend(row[0].language.iso_code_639_1.name.lower() if row and row[0].value > 0 else None for row in values)
        # Rounded: lingua's parallel confidences differ in the last bits between runs, and outputs must
        # be byte-identical for the same input.
        scores.extend(round(row[0].value, 4) if row else 0.0 for row in values)
    return pl.DataFrame({"lang": pl.Series(labels, dtype=pl.String), "lang_score": pl.Series(scores, dtype=pl.Float64)})
