"""PII redaction: every type with its placeholder, Luhn-checked cards, no false positives on the
identifiers support chats are full of, drop mode, counts in the report and never the PII itself."""

from __future__ import annotations

import json

import polars as pl
import pytest
from filters_helpers import chat, run_stage

from curate.filters.pii import luhn_valid, redact_texts


def redact(text: str) -> dict:
    frame = pl.LazyFrame({"text": [text]}).with_row_index("__text_index")
    return redact_texts(frame).collect().row(0, named=True)


@pytest.mark.parametrize(
    "text, expected, kind",
    [
        ("Write to john.doe+billing@example.co.uk today.", "Write to <EMAIL> today.", "email"),
        ("Call +1 (555) 123-4567 please.", "Call <PHONE> please.", "phone"),
        ("Call 555-123-4567 please.", "Call <PHONE> please.", "phone"),
        ("Our Paris desk: +33 1 42 68 38 12.", "Our Paris desk: <PHONE>.", "phone"),
        ("Berlin +49 30 6583 4835 or London +44 20 7946 0443", "Berlin <PHONE> or London <PHONE>", "phone"),
        ("My IP is 192.168.10.254 now", "My IP is <IP_ADDRESS> now", "ip_address"),
        ("v6 2001:db8:85a3::8a2e:370:7334 here", "v6 <IP_ADDRESS> here", "ip_address"),
        ("Card 4111 1111 1111 1111 expires", "Card <CREDIT_CARD> expires", "credit_card"),
        ("Card 5304-6057-2231-4109.", "Card <CREDIT_CARD>.", "credit_card"),
        ("key sk-proj-5PIbqaQ8xEkH3J5rR8RSvKLg3PCVSy1Fl6PvYgSJ ok", "key <SECRET> ok", "secret"),
        ("aws AKIAIOSFODNN7EXAMPLE ok", "aws <SECRET> ok", "secret"),
        ("gh ghp_0123456789abcdefghijABCDEFGHIJ012345 ok", "gh <SECRET> ok", "secret"),
        ("config api_key=abc123def456ghi now", "config api_key=<SECRET> now", "secret"),
    ],
)
def test_each_type_is_redacted_with_its_placeholder(text, expected, kind):
    row = redact(text)
    assert row["text"] == expected
    assert row[kind] >= 1
    assert sum(row[k] for k in ("email", "phone", "ip_address", "credit_card", "secret")) == row[kind]


@pytest.mark.parametrize(
    "text",
    [
        "Your order #A7X-20931 shipped.",
        "Ticket TCK-482913 is open, case 2024-00123.",
        "Tracking 1Z999AA10123456784 and 9400111899223344556677.",
        "USPS 9400 6574 6252 7064 0692 47 (its first 16 digits pass Luhn).",
        "Ordered on 2024-03-15 (15.03.2024), delivered 3/17/2024 at 10:30.",
        "It cost $1,299.99 or €49.00, invoice INV-2024-0042.",
        "Order number 1234567890 is on its way.",
        "App version 5.3.2 on firmware 3.3.20.",
        "Card 4111 1111 1111 1112 failed the check.",  # not Luhn-valid: not a card
        "Reset your password: open Settings.",
        "Call us at ext. 1234 or option 3.",
    ],
)
def test_no_false_positives_on_support_identifiers(text):
    row = redact(text)
    assert row["text"] == text


def test_luhn_is_vectorized_and_correct():
    frame = pl.DataFrame({"d": ["4111111111111111", "4111111111111112", "79927398713", "5304605722314109"]})
    assert frame.select(luhn_valid(pl.col("d")))["d"].to_list() == [True, False, True, True]


def test_redact_mode_rewrites_every_message_and_keeps_id(tmp_path):
    records = [
        chat("I'm jane@example.com, card 4111 1111 1111 1111.", "Thanks Jane, I emailed jane@example.com."),
        chat("Order #A7X-20931 is late.", "It ships today."),
        {"prompt": "My IP is 10.0.0.7, why blocked?", "chosen": "IP 10.0.0.7 was rate limited.", "rejected": "No idea."},
    ]
    from curate.records import canonical_frame

    frame = canonical_frame(records)
    kept, dropped, report = run_stage("pii", frame, {"mode": "redact"}, tmp_path)
    assert dropped is None and kept.height == 3
    assert kept["id"].to_list() == frame["id"].to_list()
    first = kept.row(0, named=True)
    assert first["messages"][0]["content"] == "I'm <EMAIL>, card <CREDIT_CARD>."
    assert first["messages"][1]["content"] == "Thanks Jane, I emailed <EMAIL>."
    assert first["messages"][0]["role"] == "user"
    assert first["pii_email_count"] == 2 and first["pii_credit_card_count"] == 1 and first["pii_redacted"]
    assert kept.row(1, named=True)["messages"] == frame.row(1, named=True)["messages"]
    assert not kept["pii_redacted"][1]
    third = kept.row(2, named=True)
    assert third["prompt"][0]["content"] == "My IP is <IP_ADDRESS>, why blocked?"
    assert third["chosen"][0]["content"] == "IP <IP_ADDRESS> was rate limited."
    assert third["rejected"] == frame.row(2, named=True)["rejected"]
    assert kept.schema["messages"] == frame.schema["messages"]
    assert report["matches_by_type"] == {"secret": 0, "email": 2, "credit_card": 1, "ip_address": 2, "phone": 0}
    assert report["rows_redacted"] == 2 and report["rows_by_type"]["ip_address"] == 1
    dumped = json.dumps(report)
    for secret in ("jane@example.com", "4111", "10.0.0.7"):
        assert secret not in dumped


def test_drop_mode_drops_rows_with_reason_per_type(tmp_path):
    records = [
        chat("Call me on +44 20 7946 0443.", "Will do."),
        chat("Order #A7X-20931 is late.", "It ships today."),
        chat("Mail a@b.io and AKIAIOSFODNN7EXAMPLE", "Noted."),
    ]
    kept, dropped, report = run_stage("pii", records, {"mode": "drop"}, tmp_path, name="safety")
    assert kept.height == 1 and dropped.height == 2
    assert dropped["reason"].to_list() == ["pii_phone", "pii_secret"]
    assert dropped["reasons"].to_list()[1] == ["pii_secret", "pii_email"]
    assert set(dropped["stage"]) == {"safety"}
    assert report["rows_with_pii"] == 2


def test_preference_only_input_and_running_twice(tmp_path):
    records = [{"prompt": "Mail me at x@y.org please", "chosen": "Sent to <EMAIL>.", "rejected": "No."}]
    once, _, report = run_stage("pii", records, {}, tmp_path)
    assert once["prompt"][0][0]["content"] == "Mail me at <EMAIL> please"
    assert once["messages"][0] is None and report["matches_by_type"]["email"] == 1
    twice, _, report = run_stage("pii", once, {}, tmp_path)
    assert twice.columns == once.columns and report["rows_with_pii"] == 0
    assert twice["pii_redacted"][0]  # redacted by the first run


def _tool_chat(user: str, arguments: str, call_id: str) -> dict:
    """A tool-calling conversation in OpenAI's shape: the call, the tool's answer, the reply."""
    return {"messages": [
        {"role": "user", "content": user},
        {"role": "assistant", "content": "", "tool_calls": [{"id": call_id, "type": "function", "function": {"name": "lookup_order", "arguments": arguments}}]},
        {"role": "tool", "content": '{"status": "shipped"}', "tool_call_id": call_id},
        {"role": "assistant", "content": "Your order has shipped."},
    ]}  # fmt: skip


def test_tool_call_arguments_are_scanned_and_redaction_keeps_every_message_field(tmp_path):
    from curate.records import canonical_frame

    records = [
        _tool_chat("Order 5512, I am jane.doe@example.com", '{"order_id": "5512", "email": "jane.doe@example.com", "phone": "+1 415 555 0134"}', "call_1"),
        _tool_chat("Where is order 7731?", '{"order_id": "7731", "email": "bob@example.org"}', "call_2"),  # PII only in the call
        _tool_chat("Where is order 9120?", '{"order_id": "9120"}', "call_3"),
    ]
    frame = canonical_frame(records)
    kept, dropped, report = run_stage("pii", frame, {"mode": "redact"}, tmp_path)
    assert dropped is None and kept.height == 3
    first, second, third = kept.rows(named=True)
    assert first["messages"][0]["content"] == "Order 5512, I am <EMAIL>"
    call = first["messages"][1]["tool_calls"][0]
    assert (call["id"], call["type"], call["function"]["name"]) == ("call_1", "function", "lookup_order")
    assert json.loads(call["function"]["arguments"]) == {"order_id": "5512", "email": "<EMAIL>", "phone": "<PHONE>"}
    assert first["messages"][2]["tool_call_id"] == "call_1"  # the tool's answer still names its call
    assert (first["pii_email_count"], first["pii_phone_count"]) == (2, 1) and first["pii_redacted"]
    assert json.loads(second["messages"][1]["tool_calls"][0]["function"]["arguments"]) == {"order_id": "7731", "email": "<EMAIL>"}
    assert second["messages"][2]["tool_call_id"] == "call_2" and second["pii_email_count"] == 1 and second["pii_redacted"]
    assert third["messages"] == frame.row(2, named=True)["messages"] and not third["pii_redacted"]
    assert kept.schema["messages"] == frame.schema["messages"]
    assert report["messages_redacted_by_column"]["messages"] == 3  # the user turn and two calls
    dumped = json.dumps(report)
    assert "jane.doe" not in dumped and "bob@example.org" not in dumped and "555 0134" not in dumped
    _, dropped, _ = run_stage("pii", frame, {"mode": "drop"}, tmp_path / "drop")
    assert dropped["reason"].to_list() == ["pii_email", "pii_email"]  # the second row: PII in its call only
