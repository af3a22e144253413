"""The `filter` stage's thresholds and the rules they become.

Every threshold reads a score column the `tag` stage (or `decontaminate`) wrote; none computes a score,
so changing one reruns only the filter stage. A threshold set to null disables its rule. A rule whose
score column is absent (e.g. `max_token_count` when the tag stage has no tokenizer) is skipped and
listed in the report. The rule name — the config field, with n filled in for the n-gram maps — is the
`reason` of a dropped row; `reasons` lists every failing rule in this order.

Defaults are chosen for short customer-support chat, not web pages: the Gopher (Rae et al. 2021) and
FineWeb anchors assume documents of hundreds of words, where one repeated phrase or a line without a
full stop means boilerplate. In a three-sentence support answer the same signals are normal, so the
repetition and line thresholds are looser, and the line-shape rules FineWeb uses are off by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
from typing import Literal

from pydantic import Field

from curate.filters.heuristics import DUP_NGRAM_SIZES, TOP_NGRAM_SIZES
from curate.stage import Fraction, StageConfig


class FilterConfig(StageConfig):
    # --- structure and emptiness (cheap and unambiguous: checked first, so they become the reason)
    drop_turn_structure_errors: bool = Field(
        True,
        description="Drop rows whose `turn_structure_error` is set (unknown role, empty message, roles not "
        "alternating, not ending with an assistant turn, chosen == rejected, ...): they cannot be trained on.",
    )
    min_last_assistant_words: int | None = Field(
        2,
        ge=0,
        description="Minimum words in the final assistant turn. 2, not Gopher's 50: support replies are short "
        "('Refund issued.' is fine) but a one-word 'ok' or an empty reply teaches nothing.",
    )
    min_user_words: int | None = Field(
        1, ge=0, description="Minimum words over all user turns: a conversation without a question is not a sample."
    )
    drop_contaminated: bool = Field(
        True,
        description="Drop rows the `decontaminate` stage flagged (non-null `contamination_eval_id`) — used when "
        "that stage runs in mode 'flag'. Training on evaluation items invalidates the evaluation.",
    )
    # --- language
    languages: list[str] | None = Field(
        default_factory=lambda: ["en"],
        description="Keep-list of ISO 639-1 codes for `lang`. Rows whose text has no letters (null `lang`) are "
        "not dropped by this rule (other rules judge them). Null keeps every language.",
    )
    min_lang_score: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Minimum lingua confidence `lang_score`. Off by default: with a dozen candidate languages "
        "a clearly English 15-word message often scores 0.6-0.8 because close languages share the mass; "
        "the label is reliable well below the confidence one would guess.",
    )
    # --- instruction checks
    drop_refusals: bool = Field(
        True,
        description="Drop rows whose assistant text contains a configured refusal/boilerplate phrase "
        "(`refusal_phrase`, e.g. 'as an AI language model'): a support assistant should not learn them.",
    )
    drop_truncated: bool = Field(
        True,
        description="Drop rows whose final assistant turn ends mid-sentence (`assistant_ends_mid_sentence`): "
        "typically a reply cut by an export or length limit; the model would learn to stop mid-thought.",
    )
    max_response_echo_containment: float | None = Field(
        0.8,
        ge=0.0,
        le=1.0,
        description="Maximum share of the last reply's distinct words found in the last user turn (checked "
        "only for replies of 5+ words). Above 0.8 the reply repeats the question instead of answering it; "
        "answers quoting an order number or product name stay far below (sample data: < 0.5).",
    )
    max_response_echo_jaccard: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Maximum word-set Jaccard between the last user and last assistant turns. Off by default: "
        "containment catches echoes even when the prompt carries extra lines (plan, device) the reply drops.",
    )
    min_response_prompt_word_ratio: float | None = Field(
        None,
        ge=0.0,
        description="Minimum assistant/user word ratio. Off by default: in support chat a long complaint "
        "answered by 'Done, refunded.' is a good sample.",
    )
    max_token_count: int | None = Field(
        4096,
        ge=1,
        description="Maximum tokens of the whole row (`token_count`, needs a tokenizer in the tag stage): rows "
        "longer than the training sequence length would be truncated. Skipped when no tokenizer is set.",
    )
    max_assistant_words: int | None = Field(
        1500,
        ge=1,
        description="Maximum assistant words: support replies of several thousand words are pasted manuals or "
        "logs, not conversation.",
    )
    # --- Gopher-style quality (assistant text: what the model learns to write)
    min_assistant_mean_word_length: float | None = Field(
        2.0,
        ge=0.0,
        description="Minimum mean word length (Gopher: 3). 2 because chat uses short words ('ok, I'll do it'), "
        "while letter soup of 1-character tokens still fails.",
    )
    max_assistant_mean_word_length: float | None = Field(
        15.0,
        gt=0.0,
        description="Maximum mean word length (Gopher: 10). 15 because support replies carry URLs, order ids and "
        "e-mail placeholders; runs of base64 or minified code still exceed it.",
    )
    max_assistant_symbol_word_ratio: float | None = Field(
        0.5,
        ge=0.0,  # symbols per word: may exceed 1
        description="Maximum (`#` + ellipses) per word (Gopher: 0.1). Short replies citing 'order #A7X-20931' "
        "reach 0.1-0.3 legitimately; hashtag spam and '...' chains exceed 0.5.",
    )
    max_assistant_non_alpha_word_ratio: float | None = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Maximum share of words without a letter (Gopher: 0.2). Prices, dates and ids are common in "
        "support; a reply that is mostly numbers or symbols is still junk.",
    )
    min_assistant_stop_words: int | None = Field(
        None,
        ge=0,
        description="Minimum English stop words (Gopher: 2). Off by default: 'Refund issued, see email.' has "
        "none, and non-English rows are the language rule's job.",
    )
    max_assistant_bullet_line_ratio: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Maximum share of bullet lines (Gopher: 0.9). Off by default: step-by-step support "
        "instructions are bullet lists.",
    )
    max_assistant_ellipsis_line_ratio: float | None = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Maximum share of lines ending with an ellipsis (Gopher: 0.3). With the 1-3 lines of a chat "
        "reply, one trailing '...' is already 0.33-1.0; 0.5 tolerates one in a multi-line reply.",
    )
    max_assistant_dup_line_fraction: float | None = Field(
        0.3, ge=0.0, le=1.0, description="Maximum share of repeated lines (Gopher: 0.3; kept — repeated lines are junk in chat too)."
    )
    max_assistant_dup_paragraph_fraction: float | None = Field(
        0.3, ge=0.0, le=1.0, description="Maximum share of repeated paragraphs (Gopher: 0.3; kept)."
    )
    # Keys: the n-gram sizes the tag stage scores (an unknown n would name a column that does not exist).
    max_assistant_top_ngram_char_frac: dict[Literal[TOP_NGRAM_SIZES], Fraction] | None = Field(
        default_factory=lambda: {2: 0.30, 3: 0.28, 4: 0.26},
        description="Maximum character share of the most frequent repeated word n-gram, n = 2, 3, 4 (Gopher: "
        "0.20, 0.18, 0.16). Looser because one repeated phrase ('your order') in a 20-word reply is a large "
        "share of a short text.",
    )
    max_assistant_dup_ngram_char_frac: dict[Literal[DUP_NGRAM_SIZES], Fraction] | None = Field(
        default_factory=lambda: {5: 0.30, 6: 0.29, 7: 0.28, 8: 0.27, 9: 0.26, 10: 0.25},
        description="Maximum character share covered by repeated word n-grams, n = 5..10 (Gopher: 0.15 .. 0.10). "
        "Looser for short texts where one repeated sentence is a third of the reply; loops of generated text "
        "are far above.",
    )
    # --- FineWeb line shape (off for chat by default)
    min_assistant_line_punct_ratio: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Minimum share of lines ending in terminal punctuation (FineWeb: 0.12). Off by default: "
        "chat lines ('Hi Sam,') often do not; cut-offs are caught by `drop_truncated`.",
    )
    max_assistant_short_line_ratio: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Maximum share of lines under 30 characters (FineWeb: 0.67). Off by default: chat lines are "
        "short by nature.",
    )


@dataclass(frozen=True)
class Rule:
    name: str
    columns: tuple[str, ...]
    fails: pl.Expr  # true when the row breaks the rule (null scores never fail)


def _min(column: str, value) -> pl.Expr:
    return pl.col(column) < value


def _max(column: str, value) -> pl.Expr:
    return pl.col(column) > value


def rules_from_config(config: FilterConfig) -> list[Rule]:
    """The enabled rules, in config field order (the order `reason` picks the first failing one from)."""
    rules: list[Rule] = []
    add = lambda name, columns, fails: rules.append(Rule(name, tuple(columns), fails))  # noqa: E731
    if config.drop_turn_structure_errors:
        add("drop_turn_structure_errors", ["turn_structure_error"], pl.col("turn_structure_error").is_not_null())
    if config.min_last_assistant_words is not None:
        add(
            "min_last_assistant_words",
            ["last_assistant_word_count"],
            _min("last_assistant_word_count", config.min_last_assistant_words),
        )
    if config.min_user_words is not None:
        add("min_user_words", ["user_word_count"], _min("user_word_count", config.min_user_words))
    if config.drop_contaminated:
        add("drop_contaminated", ["contamination_eval_id"], pl.col("contamination_eval_id").is_not_null())
    if config.languages is not None:
        keep = [code.lower() for code in config.languages]
        add("languages", ["lang"], pl.col("lang").is_not_null() & ~pl.col("lang").is_in(keep))
    if config.min_lang_score is not None:
        add("min_lang_score", ["lang_score"], _min("lang_score", config.min_lang_score))
    if config.drop_refusals:
        add("drop_refusals", ["refusal_phrase"], pl.col("refusal_phrase").is_not_null())
    if config.drop_truncated:
        add("drop_truncated", ["assistant_ends_mid_sentence"], pl.col("assistant_ends_mid_sentence"))
    if config.max_response_echo_containment is not None:
        add(
            "max_response_echo_containment",
            ["response_echo_containment", "last_assistant_word_count"],
            _max("response_echo_containment", config.max_response_echo_containment)
            & (pl.col("last_assistant_word_count") >= 5),
        )
    if config.max_response_echo_jaccard is not None:
        add(
            "max_response_echo_jaccard",
            ["response_echo_jaccard"],
            _max("response_echo_jaccard", config.max_response_echo_jaccard),
        )
    if config.min_response_prompt_word_ratio is not None:
        add(
            "min_response_prompt_word_ratio",
            ["response_prompt_word_ratio"],
            _min("response_prompt_word_ratio", config.min_response_prompt_word_ratio),
        )
    if config.max_token_count is not None:
        add("max_token_count", ["token_count"], _max("token_count", config.max_token_count))
    if config.max_assistant_words is not None:
        add("max_assistant_words", ["assistant_word_count"], _max("assistant_word_count", config.max_assistant_words))
    simple = [
        ("min_assistant_mean_word_length", "assistant_mean_word_length", _min),
        ("max_assistant_mean_word_length", "assistant_mean_word_length", _max),
        ("max_assistant_symbol_word_ratio", "assistant_symbol_word_ratio", _max),
        ("max_assistant_non_alpha_word_ratio", "assistant_non_alpha_word_ratio", _max),
        ("min_assistant_stop_words", "assistant_stop_word_count", _min),
        ("max_assistant_bullet_line_ratio", "assistant_bullet_line_ratio", _max),
        ("max_assistant_ellipsis_line_ratio", "assistant_ellipsis_line_ratio", _max),
        ("max_assistant_dup_line_fraction", "assistant_dup_line_fraction", _max),
        ("max_assistant_dup_paragraph_fraction", "assistant_dup_paragraph_fraction", _max),
    ]
    for field_name, column, compare in simple:
        value = getattr(config, field_name)
        if value is not None:
            add(field_name, [column], compare(column, value))
    for n, value in sorted((config.max_assistant_top_ngram_char_frac or {}).items()):
        column = f"assistant_top_{n}gram_char_frac"
        add(f"max_{column}", [column], _max(column, value))
    for n, value in sorted((config.max_assistant_dup_ngram_char_frac or {}).items()):
        column = f"assistant_dup_{n}gram_char_frac"
        add(f"max_{column}", [column], _max(column, value))
    if config.min_assistant_line_punct_ratio is not None:
        add(
            "min_assistant_line_punct_ratio",
            ["assistant_line_punct_ratio", "assistant_line_count"],
            _min("assistant_line_punct_ratio", config.min_assistant_line_punct_ratio)
            & (pl.col("assistant_line_count") > 0),
        )
    if config.max_assistant_short_line_ratio is not None:
        add(
            "max_assistant_short_line_ratio",
            ["assistant_short_line_ratio"],
            _max("assistant_short_line_ratio", config.max_assistant_short_line_ratio),
        )
    return rules
