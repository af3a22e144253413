"""PII detection and typed redaction, vectorized (Rust regex through Polars; Luhn as list arithmetic).

Types and placeholders (applied in this order, so a key is not half-eaten by the phone pattern):
`secret` → `<SECRET>` (sk-…, AKIA…, ghp_/gho_/…, xox?-…, AIza…, and `key/token/secret/password = value`
with a value mixing letters and digits — the key name is kept, only the value is replaced),
`email` → `<EMAIL>`, `credit_card` → `<CREDIT_CARD>` (a run of 13–19 digits, optionally grouped by spaces or
dashes, Luhn-valid; a longer grouped run is a tracking number, not a card), `ip_address` → `<IP_ADDRESS>` (IPv4 with octets ≤ 255, IPv6 full and `::`
forms), `phone` → `<PHONE>` (a `+country` number, `(area) xxx-xxxx`, `xxx-xxx-xxxx` with separators, or a
0-prefixed national number with a separator).

Precision over recall on identifiers that look numeric: order numbers ("#A7X-20931"), ticket ids,
tracking numbers (long digit runs without a word boundary inside), dates (2024-03-15, 15.03.2024) and
prices do not match. A bare 10-digit run is *not* taken as a phone (it is more often an order or account
number in support chats); written with separators it is.
"""

from __future__ import annotations

import polars as pl

PII_TYPES = ("secret", "email", "credit_card", "ip_address", "phone")
PLACEHOLDERS = {
    "secret": "<SECRET>",
    "email": "<EMAIL>",
    "credit_card": "<CREDIT_CARD>",
    "ip_address": "<IP_ADDRESS>",
    "phone": "<PHONE>",
}

_KEY_VALUE_CHARS = r"[A-Za-z0-9_\-/+=.]"
SECRET_PATTERNS = (
    r"\bsk-(?:proj-|live-|test-)?[A-Za-z0-9_\-]{20,}",
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    r"\bgh[pousr]_[A-Za-z0-9]{30,}\b",
    r"\bgithub_pat_[A-Za-z0-9_]{30,}",
    r"\bxox[abprs]-[A-Za-z0-9\-]{10,}",
    r"\bAIza[0-9A-Za-z_\-]{35}",
)
# `api_key = abc123...`: keep the key and separator, replace the value (letters and digits mixed, ≥ 8).
SECRET_KEY_VALUE = (
    r"(?i)(\b(?:api[_\-]?key|apikey|secret(?:[_\-]?key)?|access[_\-]?key|auth[_\-]?token|token|password|passwd|pwd)"
    r"\s*[:=]\s*[\"']?)"
    r"((?:" + _KEY_VALUE_CHARS + r"*[A-Za-z]" + _KEY_VALUE_CHARS + r"*\d|" + _KEY_VALUE_CHARS + r"*\d"
    + _KEY_VALUE_CHARS + r"*[A-Za-z])" + _KEY_VALUE_CHARS + r"*)"
)
EMAIL = r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}\b"
# A whole run of digit groups, so a 22-digit tracking number written in groups is one candidate (and
# not a card) rather than a 16-digit prefix that may pass Luhn by chance.
CARD_CANDIDATE = r"\b\d(?:[ \-]?\d){12,}\b"
CARD_DIGITS = (13, 19)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = r"\b" + _OCTET + r"(?:\." + _OCTET + r"){3}\b"
_H = r"[0-9A-Fa-f]{1,4}"
IPV6 = (
    r"(?:\b(?:" + _H + r":){7}" + _H + r"\b"
    r"|\b(?:" + _H + r":){1,6}:(?:" + _H + r"(?::" + _H + r"){0,5})?(?:\b|$)"
    r"|::(?:" + _H + r"(?::" + _H + r"){0,6})\b)"
)
PHONE = (
    r"(?:\+\d{1,3}[ .\-]?(?:\(\d{1,4}\)[ .\-]?)?\d{1,4}(?:[ .\-]?\d{2,4}){1,4}\b"
    r"|\(\d{3}\)[ .\-]?\d{3}[ .\-]\d{4}\b"
    r"|\b\d{3}[ .\-]\d{3}[ .\-]\d{4}\b"
    r"|\b0\d{2,4}[ /\-]\d{5,8}\b)"
)
_MARK = "\x00"  # wraps card candidates so the text can be split into (text, candidate) pieces


def luhn_valid(digits: pl.Expr) -> pl.Expr:
    """Luhn checksum of a digit string, as list arithmetic (no per-row Python)."""
    doubled = pl.element() * 2
    return (
        digits.str.reverse()
        .str.split("")
        .list.eval(pl.element().cast(pl.Int32))
        .list.eval(
            pl.when(pl.int_range(pl.len()) % 2 == 1)
            .then(doubled - pl.when(doubled > 9).then(9).otherwise(0))
            .otherwise(pl.element())
        )
        .list.sum()
        % 10
        == 0
    )


def _redact_cards(texts: pl.LazyFrame) -> pl.LazyFrame:
    """Replace Luhn-valid card candidates in `text` by <CREDIT_CARD>, count them in `credit_card`.

    Polars cannot replace a per-row list of strings, so candidates are wrapped in markers, the text is
    split into pieces (odd pieces are candidates), pieces are checked and re-joined — only for the few
    texts that hold a candidate at all."""
    texts = texts.with_columns(pl.col("text").str.contains(CARD_CANDIDATE).alias("__has_card"))
    with_candidates = texts.filter(pl.col("__has_card"))
    without = texts.filter(~pl.col("__has_card")).with_columns(pl.lit(0, dtype=pl.Int64).alias("credit_card"))
    pieces = (
        with_candidates.select(
            "__text_index",
            pl.col("text").str.replace_all(CARD_CANDIDATE, f"{_MARK}$0{_MARK}").str.split(_MARK).alias("piece"),
        )
        .explode("piece")
        .with_columns(pl.int_range(pl.len()).over("__text_index").alias("__piece_index"))
        .with_columns(
            (
                (pl.col("__piece_index") % 2 == 1)
                & pl.col("piece").str.count_matches(r"\d").is_between(*CARD_DIGITS)
                & luhn_valid(pl.col("piece").str.replace_all(r"[^0-9]", ""))
            ).alias("__is_card")
        )
        .group_by("__text_index", maintain_order=True)
        .agg(
            pl.when(pl.col("__is_card"))
            .then(pl.lit(PLACEHOLDERS["credit_card"]))
            .otherwise(pl.col("piece"))
            .str.join("")
            .alias("__redacted"),
            pl.col("__is_card").sum().cast(pl.Int64).alias("credit_card"),
        )
    )
    with_candidates = with_candidates.join(pieces, on="__text_index", how="left", maintain_order="left").with_columns(
        pl.col("__redacted").alias("text")
    ).drop("__redacted")
    return pl.concat([without, with_candidates], how="diagonal").sort("__text_index").drop("__has_card")


def redact_texts(texts: pl.LazyFrame) -> pl.LazyFrame:
    """`texts` has `__text_index` and `text`; adds one count column per PII type and redacts `text`."""
    text = pl.col("text")
    texts = texts.with_columns(
        (
            pl.sum_horizontal(text.str.count_matches(pattern) for pattern in SECRET_PATTERNS)
            + text.str.count_matches(SECRET_KEY_VALUE)
        )
        .cast(pl.Int64)
        .alias("secret")
    )
    for pattern in SECRET_PATTERNS:
        texts = texts.with_columns(text.str.replace_all(pattern, PLACEHOLDERS["secret"]))
    texts = texts.with_columns(text.str.replace_all(SECRET_KEY_VALUE, "${1}" + PLACEHOLDERS["secret"]))
    texts = texts.with_columns(
        text.str.count_matches(EMAIL).cast(pl.Int64).alias("email"),
        text.str.replace_all(EMAIL, PLACEHOLDERS["email"]),
    )
    texts = _redact_cards(texts)
    texts = texts.with_columns(
        (text.str.count_matches(IPV6) + 0).cast(pl.Int64).alias("__ipv6"),
        text.str.replace_all(IPV6, PLACEHOLDERS["ip_address"]),
    ).with_columns(
        (pl.col("__ipv6") + text.str.count_matches(IPV4)).cast(pl.Int64).alias("ip_address"),
        text.str.replace_all(IPV4, PLACEHOLDERS["ip_address"]),
    )
    texts = texts.with_columns(
        text.str.count_matches(PHONE).cast(pl.Int64).alias("phone"),
        text.str.replace_all(PHONE, PLACEHOLDERS["phone"]),
    )
    return texts.drop("__ipv6")
