"""The texts scores are computed on, taken from either record kind as Polars expressions.

For chat rows (`kind == "sft"`) the user text is every user turn and the assistant text every assistant
turn, joined by a blank line; the *last* user / assistant turns are what an SFT example is trained to
answer. For preference rows the user text is the prompt's user turns and the assistant text is the
`chosen` response (the one the model learns to prefer); `rejected` is expected to be worse and is not
scored for quality.
"""

from __future__ import annotations

import polars as pl

TURN_SEPARATOR = "\n\n"

# Temporary columns the tag stage materializes once and drops at the end.
USER_TEXT = "__user_text"
ASSISTANT_TEXT = "__assistant_text"
LAST_USER = "__last_user"
LAST_ASSISTANT = "__last_assistant"
ALL_TEXT = "__all_text"
TEMP_COLUMNS = (USER_TEXT, ASSISTANT_TEXT, LAST_USER, LAST_ASSISTANT, ALL_TEXT)


def _role(messages: pl.Expr) -> pl.Expr:
    return messages.list.eval(pl.element().struct.field("role"))


def contents_of(messages: pl.Expr, role: str | None = None) -> pl.Expr:
    """List of message contents, optionally of one role only."""
    if role is not None:
        messages = messages.list.filter(pl.element().struct.field("role") == role)
    return messages.list.eval(pl.element().struct.field("content"))


def _by_kind(sft: pl.Expr, preference: pl.Expr) -> pl.Expr:
    return pl.when(pl.col("kind") == "sft").then(sft).otherwise(preference)


def user_text() -> pl.Expr:
    return _by_kind(
        contents_of(pl.col("messages"), "user").list.join(TURN_SEPARATOR),
        contents_of(pl.col("prompt"), "user").list.join(TURN_SEPARATOR),
    ).fill_null("")


def assistant_text() -> pl.Expr:
    return _by_kind(
        contents_of(pl.col("messages"), "assistant").list.join(TURN_SEPARATOR),
        contents_of(pl.col("chosen"), "assistant").list.join(TURN_SEPARATOR),
    ).fill_null("")


def last_user_text() -> pl.Expr:
    return _by_kind(
        contents_of(pl.col("messages"), "user").list.last(),
        contents_of(pl.col("prompt"), "user").list.last(),
    ).fill_null("")


def last_assistant_text() -> pl.Expr:
    return _by_kind(
        contents_of(pl.col("messages"), "assistant").list.last(),
        contents_of(pl.col("chosen"), "assistant").list.last(),
    ).fill_null("")


def all_text() -> pl.Expr:
    """Every content of the row (system, user, assistant; for preference rows prompt + chosen + rejected)."""
    return _by_kind(
        contents_of(pl.col("messages")).list.join(TURN_SEPARATOR),
        pl.concat_list(
            contents_of(pl.col("prompt")), contents_of(pl.col("chosen")), contents_of(pl.col("rejected"))
        ).list.join(TURN_SEPARATOR),
    ).fill_null("")


def with_role_texts(frame: pl.LazyFrame) -> pl.LazyFrame:
    return frame.with_columns(
        user_text().alias(USER_TEXT),
        assistant_text().alias(ASSISTANT_TEXT),
        last_user_text().alias(LAST_USER),
        last_assistant_text().alias(LAST_ASSISTANT),
        all_text().alias(ALL_TEXT),
    )
