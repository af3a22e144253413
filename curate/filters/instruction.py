"""Instruction-data checks: echoed or refused responses, cut-offs, turn structure, length ratios, tokens.

Columns (all computed by the `tag` stage):
- `last_assistant_word_count`: words of the final assistant turn (the one an SFT example trains on).
- `response_prompt_word_ratio`: assistant words / user words (whole conversation; user words 0 → 0).
- `response_echo_jaccard`: Jaccard similarity of the lower-cased word sets of the last user and last
  assistant turns (1.0 = the response repeats the prompt's words).
- `refusal_phrase`: the first configured refusal/boilerplate phrase found (case-insensitive) in the
  assistant text, lower-cased, or null; `refusal_phrase_count`: how many phrase occurrences.
- `assistant_ends_mid_sentence`: the last assistant turn does not end in terminal punctuation, a
  closing bracket/quote, a code fence, an emoji or symbol, and does not end in a sign-off block
  ("Best regards,\nAlex\nTeam"): a response cut off by a length limit. A reply ending in a list item
  without a full stop counts as cut (disable `drop_truncated` for data written that way).
- `assistant_truncation`: null, or the evidence that the final assistant turn was cut off:
  `unclosed_code_fence` (an odd number of ``` fences), `ends_on_connector` (last word is one no sentence
  ends on: 'the', 'and', 'your', ...), `ends_on_comma_or_colon`, or `unfinished_last_sentence` (a reply of
  25+ words whose writer ended 2+ sentences with punctuation, but not the last one), or
  `open_end_in_punctuated_source` (the turn ends without punctuation while at least 90% of the final
  assistant turns from the same source file do: a corpus written that carefully was cut here; needs
  20+ rows from that file, so the tag stage computes it over its whole input, whatever the batches). A missing final
  period alone is not evidence: casual chat lines have none ('see you tmrw').
- `last_assistant_alnum_count`: letters and digits in the final assistant turn (0: empty or symbols only).
- `last_assistant_max_char_run`: longest run of one repeated character in the final assistant turn
  (whitespace runs folded to one space; first 200 characters).
- `response_echo_containment`: share of the last assistant turn's distinct words that occur in the
  last user turn (1.0 = the reply only repeats the prompt, even when the prompt has extra lines).
- `turn_structure_error`: null, or the first structural problem found (see TURN_ERRORS).
- `token_count` / `assistant_token_count`: tokens of the row's message contents (chat: all turns;
  preference: prompt + the longer of chosen/rejected) / of the assistant turns (chosen), each content
  tokenized once with the configured `tokenizers` tokenizer in one batch (only when one is configured).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from curate.errors import ConfigError
from curate.filters.text import ASSISTANT_TEXT, LAST_ASSISTANT, LAST_USER, last_assistant_text

MESSAGE_COLUMNS = ("messages", "prompt", "chosen", "rejected")

DEFAULT_REFUSAL_PHRASES = (
    "as an ai language model",
    "as an ai model",
    "as a language model",
    "i am an ai language model",
    "i'm an ai language model",
    "as an ai assistant, i cannot",
    "as an ai, i cannot",
    "as an ai, i can't",
    "as a large language model",
    "as an ai, i don't",
    "as an ai, i do not",
    "i don't have personal experiences",
    "i do not have access to real-time",
    "this is an automated message",
    "your request has been received and will be handled",
    "i'm sorry, but i cannot",
    "i'm sorry, i can't help with that",
    "i'm sorry, i cannot help with that",
    "i cannot provide assistance with",
    "i can't provide assistance with",
    "i'm sorry, but i can't",
    "i am sorry, but i cannot",
    "i cannot fulfill that request",
    "i can't assist with that",
    "i cannot assist with that",
    "i'm unable to assist with that",
    "i am not able to provide",
    "my knowledge cutoff",
    "openai's guidelines",
    "against my programming",
)

TURN_ERRORS = (
    "no_messages",
    "unknown_role",
    "empty_message",
    "system_not_first",
    "does_not_start_with_user",
    "roles_not_alternating",
    "does_not_end_with_assistant",
    "prompt_does_not_end_with_user",
    "chosen_or_rejected_not_one_assistant_message",
    "chosen_equals_rejected",
)


LAST_USER_WORDS = "__last_user_words"
LAST_ASSISTANT_WORDS = "__last_assistant_words"
LAST_ASSISTANT_OPEN_END = "__last_assistant_open_end"
LAST_ASSISTANT_WORD_COUNT = "__last_assistant_word_count"
SHARED_COLUMNS = (LAST_USER_WORDS, LAST_ASSISTANT_WORDS, LAST_ASSISTANT_OPEN_END, LAST_ASSISTANT_WORD_COUNT)


def _words_set(text: pl.Expr) -> pl.Expr:
    return text.str.to_lowercase().str.extract_all(r"[\p{L}\p{N}']+").list.unique()


def shared_columns() -> list[pl.Expr]:
    """Temporary columns (SHARED_COLUMNS) that several scores read, materialized once: an eager
    `with_columns` does not share subexpressions, and the truncation evidence alone read the open end
    five times (measured: half of the instruction scores' CPU)."""
    return [
        _words_set(pl.col(LAST_USER)).alias(LAST_USER_WORDS),
        _words_set(pl.col(LAST_ASSISTANT)).alias(LAST_ASSISTANT_WORDS),
        ends_mid_sentence(pl.col(LAST_ASSISTANT)).alias(LAST_ASSISTANT_OPEN_END),
        pl.col(LAST_ASSISTANT).str.count_matches(r"\S+").alias(LAST_ASSISTANT_WORD_COUNT),
    ]


def instruction_scores(refusal_phrases: list[str]) -> list[pl.Expr]:
    """Needs the columns of :func:`shared_columns`, of :func:`source_punctuation` (joined by source
    file) and the `*_word_count` heuristics."""
    last_user_words = pl.col(LAST_USER_WORDS)
    last_assistant_words = pl.col(LAST_ASSISTANT_WORDS)
    intersection = last_user_words.list.set_intersection(last_assistant_words).list.len()
    union = last_user_words.list.len() + last_assistant_words.list.len() - intersection  # sets: no union needed
    user_words = pl.col("user_word_count")
    phrases = [phrase.lower() for phrase in refusal_phrases]
    # Aho-Corasick over the assistant text (one pass for all phrases); curly apostrophes are folded.
    assistant = pl.col(ASSISTANT_TEXT).str.replace_all("’", "'", literal=True)
    matches = (
        assistant.str.extract_many(phrases, ascii_case_insensitive=True)
        if phrases
        else pl.lit([], dtype=pl.List(pl.String))
    )
    return [
        pl.col(LAST_ASSISTANT_WORD_COUNT).alias("last_assistant_word_count"),
        pl.when(user_words > 0)
        .then(pl.col("assistant_word_count").cast(pl.Float64) / user_words)
        .otherwise(0.0)
        .alias("response_prompt_word_ratio"),
        pl.when(union > 0).then(intersection.cast(pl.Float64) / union).otherwise(0.0).alias("response_echo_jaccard"),
        pl.when(last_assistant_words.list.len() > 0)
        .then(intersection.cast(pl.Float64) / last_assistant_words.list.len())
        .otherwise(0.0)
        .alias("response_echo_containment"),
        matches.list.first().str.to_lowercase().alias("refusal_phrase"),
        matches.list.len().cast(pl.Int64).alias("refusal_phrase_count"),
        pl.col(LAST_ASSISTANT_OPEN_END).alias("assistant_ends_mid_sentence"),
        truncation_evidence(
            pl.col(LAST_ASSISTANT),
            open_end=pl.col(LAST_ASSISTANT_OPEN_END),
            words=pl.col(LAST_ASSISTANT_WORD_COUNT),
            source_rows=pl.col(SOURCE_ROWS),
            source_closed_share=pl.col(SOURCE_CLOSED_SHARE),
        ).alias("assistant_truncation"),
        # All characters minus the (fewer) others: one regex match per character costs twice as much.
        (pl.col(LAST_ASSISTANT).str.len_chars() - pl.col(LAST_ASSISTANT).str.count_matches(r"[^\p{L}\p{N}]"))
        .cast(pl.Int64)
        .alias("last_assistant_alnum_count"),
        max_char_run(pl.col(LAST_ASSISTANT)).alias("last_assistant_max_char_run"),
        turn_structure_error().alias("turn_structure_error"),
    ]


TERMINAL_END = r"(?:[.!?…)>\]}\"'”’*>`~]|[\p{So}\p{Sk}]|\p{Emoji_Presentation})$"
# A closing block: "Best regards,\nAlex\nNorthwind Cloud Support" — the lines after it carry no punctuation.
SIGN_OFF_BLOCK = (
    r"(?i)(?:^|\n)[^\n]{0,20}\b(?:regards|best|thanks|thank you|many thanks|cheers|sincerely|warmly|take care|"
    r"all the best|kind regards|best wishes)[,!.]?\n[^\n]{1,60}(?:\n[^\n]{1,60})?$"
)


# A last line that is a shell command or code ("northwind files list --limit 10", "x = f(y)") ends a
# reply with an example; it has no full stop by nature.
CODE_LINE = r"(?:^\$ |^```|\s--?\w|\w\s?=\s?\S|::|[{};]$|\(\)$)"


def ends_mid_sentence(text: pl.Expr) -> pl.Expr:
    """The text stops without terminal punctuation, and not after a sign-off block or on a code line.

    "Best regards,\nAlex\nNorthwind Cloud Support" ends in a signature, not a cut; "There's no" or
    "Here's what to do:" is a reply that stopped mid-thought."""
    stripped = text.str.strip_chars()
    last_line = stripped.str.split("\n").list.last().str.strip_chars()
    return (
        (last_line.str.len_chars() > 0)
        & ~last_line.str.contains(TERMINAL_END)
        & ~last_line.str.contains(CODE_LINE)
        & ~stripped.str.contains(SIGN_OFF_BLOCK)
    ).fill_null(False)


# Words no English sentence ends on: a reply stopping on one was cut ("... include the adapter and").
# Kept short on purpose: 'to', 'of', 'in', 'on', 'so' end casual lines ("I'd love to", "log in").
CONNECTOR_END = r"(?i)\b(?:the|a|an|and|or|but|your|my|our|their|its|with|from|into|whether|than)$"
SENTENCE_END = r"[.!?…](?:\s|$)"


PUNCTUATED_SOURCE_MIN_ROWS = 20
PUNCTUATED_SOURCE_MIN_SHARE = 0.9


SOURCE_FILE = "__source_file"
SOURCE_ROWS = "__source_rows"
SOURCE_CLOSED_SHARE = "__source_closed_share"


def source_punctuation(frame: pl.LazyFrame) -> pl.LazyFrame:
    """Per source file: its rows (SOURCE_ROWS) and the share of them whose final assistant turn ends
    closed (SOURCE_CLOSED_SHARE). A statistic of the whole input: computed over a batch it would change
    with where the batches are cut."""
    open_end = ends_mid_sentence(last_assistant_text())
    return frame.group_by(pl.col("source").struct.field("file").alias(SOURCE_FILE)).agg(
        pl.len().alias(SOURCE_ROWS), (1.0 - open_end.cast(pl.Float64).mean()).alias(SOURCE_CLOSED_SHARE)
    )


def truncation_evidence(
    text: pl.Expr,
    open_end: pl.Expr | None = None,
    words: pl.Expr | None = None,
    source_rows: pl.Expr | None = None,
    source_closed_share: pl.Expr | None = None,
) -> pl.Expr:
    """Why the text looks cut off (see module docstring), or null. Evidence, not style: an unpunctuated
    line is only 'unfinished' when its writer (or its source file as a whole) punctuates. `open_end`
    (:func:`ends_mid_sentence`) and `words` (count of `\\S+`) may be given as materialized columns, and
    the source file's figures as columns of :func:`source_punctuation` (else: over the frame itself)."""
    stripped = text.str.strip_chars()
    open_end = ends_mid_sentence(text) if open_end is None else open_end
    words = stripped.str.count_matches(r"\S+") if words is None else words
    source = pl.col("source").struct.field("file")
    source_rows = pl.len().over(source) if source_rows is None else source_rows
    if source_closed_share is None:
        source_closed_share = 1.0 - open_end.cast(pl.Float64).mean().over(source)
    return (
        pl.when(stripped.str.count_matches("```") % 2 == 1)
        .then(pl.lit("unclosed_code_fence"))
        .when(open_end & stripped.str.contains(CONNECTOR_END))
        .then(pl.lit("ends_on_connector"))
        .when(open_end & stripped.str.contains(r"[,:;]$"))
        .then(pl.lit("ends_on_comma_or_colon"))
        .when(open_end & (words >= 25) & (stripped.str.count_matches(SENTENCE_END) >= 2))
        .then(pl.lit("unfinished_last_sentence"))
        .when(
            open_end
            & (source_rows >= PUNCTUATED_SOURCE_MIN_ROWS)
            & (source_closed_share >= PUNCTUATED_SOURCE_MIN_SHARE)
        )
        .then(pl.lit("open_end_in_punctuated_source"))
        .otherwise(None)
    )


def max_char_run(text: pl.Expr) -> pl.Expr:
    """Longest run of one character (whitespace runs count as one space), over the first 200 chars: junk
    like "aaaa…" or "!!!!…" shows there, and the char-level split costs per character."""
    chars = text.str.slice(0, 400).str.replace_all(r"\s+", " ").str.slice(0, 200).str.split("")
    # Run lengths as counts of run ids: no struct per run (a fifth less CPU than `rle().len.max()`).
    return chars.list.eval(pl.element().rle_id().unique_counts().max()).list.first().fill_null(0).cast(pl.Int64)


def _roles(messages: pl.Expr) -> pl.Expr:
    return messages.list.eval(pl.element().struct.field("role"))


def turn_structure_error() -> pl.Expr:
    """First structural problem of the row, or null. Vectorized over the role lists."""
    sft_roles = _roles(pl.col("messages"))
    non_system = sft_roles.list.filter(pl.element() != "system")
    any_null_role = sft_roles.list.eval(pl.element().is_null()).list.any()
    empty = pl.col("messages").list.eval(pl.element().struct.field("content").fill_null("") == "").list.any()
    system_late = sft_roles.list.eval((pl.element() == "system") & (pl.int_range(pl.len()) > 0)).list.any()
    repeated_role = non_system.list.eval((pl.element() == pl.element().shift(1)).fill_null(False)).list.any()
    sft_error = (
        pl.when(pl.col("messages").is_null() | (pl.col("messages").list.len() == 0))
        .then(pl.lit("no_messages"))
        .when(any_null_role)
        .then(pl.lit("unknown_role"))
        .when(empty)
        .then(pl.lit("empty_message"))
        .when(system_late)
        .then(pl.lit("system_not_first"))
        .when(non_system.list.first() != "user")
        .then(pl.lit("does_not_start_with_user"))
        .when(repeated_role)
        .then(pl.lit("roles_not_alternating"))
        .when(non_system.list.last() != "assistant")
        .then(pl.lit("does_not_end_with_assistant"))
    )
    prompt_roles = _roles(pl.col("prompt"))
    one_assistant = lambda column: (pl.col(column).list.len() == 1) & (  # noqa: E731
        _roles(pl.col(column)).list.first() == "assistant"
    )
    chosen_text = pl.col("chosen").list.first().struct.field("content")
    rejected_text = pl.col("rejected").list.first().struct.field("content")
    preference_error = (
        pl.when(pl.col("prompt").is_null() | (pl.col("prompt").list.len() == 0))
        .then(pl.lit("no_messages"))
        .when(prompt_roles.list.eval(pl.element().is_null()).list.any())
        .then(pl.lit("unknown_role"))
        .when(pl.col("prompt").list.eval(pl.element().struct.field("content").fill_null("") == "").list.any())
        .then(pl.lit("empty_message"))
        .when(prompt_roles.list.last() != "user")
        .then(pl.lit("prompt_does_not_end_with_user"))
        .when(~(one_assistant("chosen").fill_null(False) & one_assistant("rejected").fill_null(False)))
        .then(pl.lit("chosen_or_rejected_not_one_assistant_message"))
        .when((chosen_text.fill_null("") == "") | (rejected_text.fill_null("") == ""))
        .then(pl.lit("empty_message"))
        .when(chosen_text == rejected_text)
        .then(pl.lit("chosen_equals_rejected"))
    )
    return pl.when(pl.col("kind") == "sft").then(sft_error).otherwise(preference_error).cast(pl.String)


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    if not path.is_file():
        raise ConfigError(f"tokenizer {path}: file not found (expected a tokenizers tokenizer.json)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust side raises a plain Exception with a multi-line message
        raise ConfigError(f"tokenizer {path}: cannot load as a tokenizers tokenizer.json ({error})") from None


TOKENIZE_CHUNK = 8192  # texts per encode_batch call: Encoding objects are large, only lengths are kept


def token_counts(tokenizer, texts: pl.Series) -> pl.Series:
    """Token count of every text, encoded in Rust-parallel batches (no special tokens added)."""
    values = texts.fill_null("").to_list()
    counts: list[int] = []
    for start in range(0, len(values), TOKENIZE_CHUNK):
        encodings = tokenizer.encode_batch(values[start : start + TOKENIZE_CHUNK], add_special_tokens=False)
        counts.extend(len(encoding) for encoding in encodings)
    return pl.Series(texts.name, counts, dtype=pl.Int64)


def token_columns(frame: pl.DataFrame, tokenizer) -> pl.DataFrame:
    """`token_count` and `assistant_token_count`: every message content is tokenized once, in one batch,
    and counts are summed per row (contents only — the chat template's own tokens are the trainer's).

    Chat rows: all turns / assistant turns. Preference rows: prompt + the longer of chosen and rejected
    (both pairs must fit the sequence length) / chosen."""
    indexed = frame.select(*MESSAGE_COLUMNS).with_row_index("__row")
    contents = pl.concat(
        [
            indexed.select("__row", pl.lit(column).alias("__column"), pl.col(column).alias("__message"))
            .explode("__message")
            .filter(pl.col("__message").is_not_null())
            .select(
                "__row",
                "__column",
                pl.col("__message").struct.field("role").alias("role"),
                pl.col("__message").struct.field("content").fill_null("").alias("content"),
            )
            for column in MESSAGE_COLUMNS
        ]
    )
    contents = contents.with_columns(token_counts(tokenizer, contents["content"]).alias("tokens"))
    sums = contents.group_by("__row").agg(
        *[pl.col("tokens").filter(pl.col("__column") == column).sum().alias(column) for column in MESSAGE_COLUMNS],
        pl.col("tokens").filter((pl.col("__column") == "messages") & (pl.col("role") == "assistant")).sum().alias("__assistant"),
    )
    per_row = frame.select(pl.col("kind")).with_row_index("__row").join(sums, on="__row", how="left", maintain_order="left")
    per_row = per_row.with_columns(pl.col(*MESSAGE_COLUMNS, "__assistant").fill_null(0))
    sft = pl.col("kind") == "sft"
    counts = per_row.select(
            pl.when(sft)
            .then(pl.col("messages"))
            .otherwise(pl.col("prompt") + pl.max_horizontal("chosen", "rejected"))
            .cast(pl.Int64)
            .alias("token_count"),
            pl.when(sft).then(pl.col("__assistant")).otherwise(pl.col("chosen")).cast(pl.Int64).alias("assistant_token_count"),
    )
    return frame.with_columns(counts.get_columns())
