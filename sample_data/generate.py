"""Deterministic generator for the Northwind Cloud sample data set.

Run `python sample_data/generate.py` to (re)write sample_data/raw/, sample_data/eval/ and
sample_data/planted.json. Same seed, same bytes: every random choice comes from one
`random.Random(2026)` and the compressors are configured without timestamps.

The data is customer-service support traffic for a fictional company, Northwind Cloud, with
deliberately planted problems (duplicates, junk, PII, broken rows, eval contamination, ...)
whose positions are recorded in planted.json so tests can check the curation pipeline.
"""

from __future__ import annotations

import copy
import csv
import gzip
import io
import json
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from support_templates import (  # noqa: E402 (sibling module)
    AREA_FOLLOWUPS,
    BOILERPLATE,
    CLOSERS,
    CONNECTORS,
    DETAILS,
    GREETINGS,
    INTENTS,
    NON_ENGLISH,
    OPENERS,
    REJECTED,
    SHORT_OPENERS,
    SIGNOFFS,
    SYSTEM_PROMPTS,
    make_slots,
)

SEED = 2026
ROOT = Path(__file__).resolve().parent

F_ALPACA = "raw/support_alpaca.jsonl"
F_OPENAI = "raw/support_chat_openai.jsonl.gz"
F_SHAREGPT = "raw/support_sharegpt.json"
F_CSV = "raw/tickets_export.csv"
F_TRANSCRIPTS = "raw/transcripts.jsonl.zst"
F_PREF = "raw/preferences.jsonl"
F_PREF_PARQUET = "raw/preferences_messages.parquet"
F_PREF_HH = "raw/preferences_hh.jsonl"
F_EVAL = "eval/support_eval.jsonl"

# ---------------------------------------------------------------------------------------------
# Text helpers


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def shingles(text: str, n: int = 5) -> set[tuple[str, ...]]:
    w = words(text)
    if len(w) < n:
        return {tuple(w)}
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def jaccard(a: str, b: str, n: int = 5) -> float:
    sa, sb = shingles(a, n), shingles(b, n)
    return len(sa & sb) / max(1, len(sa | sb))


def normalize(text: str) -> str:
    return " ".join(text.lower().split())


SYNONYMS = {
    "please": "kindly", "check": "verify", "verify": "confirm", "usually": "typically",
    "within": "in", "help": "assist", "issue": "problem", "problem": "issue", "receive": "get",
    "get": "receive", "select": "choose", "choose": "pick", "tap": "press", "click": "select",
    "open": "go to", "quick": "short", "sure": "certain", "once": "after", "then": "next",
    "make": "ensure", "see": "find", "show": "display", "new": "fresh", "send": "email",
    "fix": "resolve", "update": "upgrade", "wait": "hold on", "try": "attempt", "also": "additionally",
    "can": "could", "will": "should", "your": "the", "account": "profile", "few": "couple of",
    "minutes": "mins", "hours": "hrs", "soon": "shortly", "again": "once more", "start": "begin",
}
FILLERS = ["just", "really", "also", "then", "simply", "actually", "now", "first", "quickly", "definitely"]


def light_edit(text: str, rng: random.Random, frac: float) -> str:
    """Change about `frac` of the words in 1-3 contiguous spots (substitute, insert, delete)."""
    tokens = text.split(" ")
    n_changes = max(1, round(len(tokens) * frac))
    n_spots = min(n_changes, rng.randint(1, 3))
    per_spot = [n_changes // n_spots + (1 if i < n_changes % n_spots else 0) for i in range(n_spots)]
    for k in per_spot:
        pos = rng.randrange(max(1, len(tokens) - k))
        for j in range(k):
            i = min(pos + j, len(tokens) - 1)
            tok = tokens[i]
            core = tok.strip(string.punctuation + "\n").lower()
            op = rng.random()
            if core in SYNONYMS and op < 0.6:
                repl = SYNONYMS[core]
                tokens[i] = tok.replace(tok.strip(string.punctuation + "\n"), repl, 1) if tok[:1].islower() else tok.replace(
                    tok.strip(string.punctuation + "\n"), repl.capitalize(), 1)
            elif op < 0.8 and "\n" not in tok and len(tokens) > 12 and core:
                del tokens[i]
            else:
                tokens.insert(i, rng.choice(FILLERS))
    return " ".join(tokens)


# ---------------------------------------------------------------------------------------------
# Conversations


@dataclass
class Conv:
    system: str | None
    turns: list[list[str]]  # [[user, assistant], ...]
    intents: list[str]
    slots: dict
    lang: str = "en"
    meta: dict = field(default_factory=dict)

    def text(self) -> str:
        parts = [self.system] if self.system else []
        for u, a in self.turns:
            parts += [u, a]
        return "\n".join(parts)

    def messages(self) -> list[dict]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        for u, a in self.turns:
            msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        return msgs


def fill(template: str, slots: dict) -> str:
    return template.format_map(slots)


def customer_message(rng: random.Random, intent: str, slots: dict, first: bool = True) -> str:
    spec = INTENTS[intent]
    context = fill(rng.choice(spec["context"]), slots)
    ask = fill(rng.choice(spec["ask"]), slots)
    body = [context, ask] if rng.random() < 0.75 else [ask, context]
    if rng.random() < 0.45:
        body.insert(rng.randint(1, len(body)), fill(rng.choice(DETAILS), slots))
    if first and rng.random() < 0.7:
        greeting = fill(rng.choice(GREETINGS), slots)
        if greeting:
            body.insert(0, greeting + ("\n" if greeting.endswith(",") and rng.random() < 0.5 else ""))
    if first and rng.random() < 0.5:
        signoff = fill(rng.choice(SIGNOFFS), slots)
        if signoff:
            body.append(("\n" if rng.random() < 0.5 else "") + signoff)
    text = " ".join(body).replace(" \n", "\n").replace("\n ", "\n")
    if rng.random() < 0.08:
        text = text.lower()
    return text


def agent_answer(rng: random.Random, intent: str, slots: dict, first: bool = True) -> str:
    spec = INTENTS[intent]
    slots = dict(slots, topic=fill(rng.choice(spec["topic"]), slots))
    opener = fill(rng.choice(OPENERS if first else SHORT_OPENERS), slots)
    steps_pool = spec["steps"]
    k = min(len(steps_pool), rng.randint(3, 5))
    chosen = sorted(rng.sample(range(len(steps_pool)), k))
    steps = [fill(rng.choice(steps_pool[i]), slots) for i in chosen]
    style = rng.random()
    if style < 0.45:
        paragraphs = [opener, " ".join(steps)]
    elif style < 0.75:
        paragraphs = [opener + " Here's what to do:", "\n".join(f"{n}. {s}" for n, s in enumerate(steps, 1))]
    elif style < 0.9:
        paragraphs = [opener, "\n".join(f"- {s}" for s in steps)]
    else:
        half = max(1, len(steps) // 2)
        paragraphs = [opener + " " + " ".join(steps[:half]), " ".join(steps[half:])]
    if rng.random() < 0.8:
        paragraphs.append(fill(rng.choice(CLOSERS), slots))
    if first and rng.random() < 0.25:
        paragraphs.append(f"Best regards,\n{slots['agent']}\nNorthwind Cloud Support")
    return "\n\n".join(paragraphs)


def followup_turn(rng: random.Random, conv: Conv) -> None:
    area = INTENTS[conv.intents[0]]["area"]
    slots = conv.slots
    r = rng.random()
    if r < 0.55:
        others = [i for i, s in INTENTS.items() if s["area"] == area and i not in conv.intents]
        intent = rng.choice(others)
        connector = fill(rng.choice(CONNECTORS), slots)
        question = customer_message(rng, intent, slots, first=False)
        if connector.endswith((",", "but")) and not question.startswith(("I ", "I'", "Northwind")):
            question = question[:1].lower() + question[1:]
        user = connector + " " + question
        conv.turns.append([user, agent_answer(rng, intent, slots, first=False)])
        conv.intents.append(intent)
    else:
        q, answers = rng.choice(AREA_FOLLOWUPS[area])
        user = fill(rng.choice(q), slots)
        k = min(len(answers), rng.randint(2, 3))
        picked = sorted(rng.sample(range(len(answers)), k))
        conv.turns.append([user, " ".join(fill(rng.choice(answers[i]), slots) for i in picked)])
        conv.intents.append(conv.intents[-1])


def make_conv(rng: random.Random, turns: int = 1, system_p: float = 0.0, intent: str | None = None,
              area: str | None = None) -> Conv:
    if intent is None:
        pool = [i for i, s in INTENTS.items() if area is None or s["area"] == area]
        intent = rng.choice(pool)
    slots = make_slots(rng)
    system = fill(rng.choice(SYSTEM_PROMPTS), slots) if rng.random() < system_p else None
    conv = Conv(system, [[customer_message(rng, intent, slots), agent_answer(rng, intent, slots)]], [intent], slots)
    for _ in range(turns - 1):
        followup_turn(rng, conv)
    return conv


def make_non_english(rng: random.Random, turns: int = 1) -> Conv:
    lang = rng.choice(sorted(NON_ENGLISH))
    spec = NON_ENGLISH[lang]
    slots = make_slots(rng)
    conv = Conv(None, [], [], slots, lang=lang)
    used = rng.sample(range(len(spec["intents"])), turns)
    for t, idx in enumerate(used):
        intent = spec["intents"][idx]
        user = fill(rng.choice(intent["q"]), slots)
        if t == 0 and rng.random() < 0.7:
            user = fill(rng.choice(spec["greetings"]), slots) + " " + user
        body = [fill(rng.choice(v), slots) for v in intent["a"]]
        answer = fill(rng.choice(spec["openers"]), slots) + " " + " ".join(body)
        if rng.random() < 0.8:
            answer += "\n\n" + fill(rng.choice(spec["closers"]), slots)
        conv.turns.append([user, answer])
        conv.intents.append(f"{lang}.{idx}")
    return conv


# ---------------------------------------------------------------------------------------------
# PII and look-alikes

FIRST = ["maria", "john", "priya", "lukas", "sofia", "daniel", "aiko", "omar", "emma", "carlos", "nina", "tom",
         "fatima", "pierre", "jonas", "grace", "mateo", "ines", "olivia", "wei"]
LAST = ["lopez", "smith", "patel", "becker", "rossi", "kim", "tanaka", "haddad", "wilson", "garcia", "novak",
        "brown", "ali", "dubois", "berg", "okafor", "silva", "moreau", "jensen", "chen"]
MAIL_DOMAINS = ["example.com", "example.org", "example.net", "mail.example.com", "brightpath.example",
                "corp.example.org", "studio-nine.example"]


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return total % 10 == 0


def luhn_complete(prefix: str, length: int = 16) -> str:
    for check in "0123456789":
        if luhn_ok(prefix + check):
            return prefix + check
    raise AssertionError


def group4(digits: str, sep: str) -> str:
    return sep.join(digits[i : i + 4] for i in range(0, len(digits), 4))


def pii_value(rng: random.Random, kind: str) -> str:
    if kind == "pii_email":
        f, l = rng.choice(FIRST), rng.choice(LAST)
        local = rng.choice([f"{f}.{l}", f"{f[0]}{l}", f"{f}{rng.randint(1, 99)}", f"{f}_{l}", f"{l}.{f}"])
        return f"{local}@{rng.choice(MAIL_DOMAINS)}"
    if kind == "pii_phone":
        d2, d4 = f"{rng.randint(0, 99):02d}", f"{rng.randint(0, 9999):04d}"
        area = rng.choice(["415", "212", "312", "617", "206", "512"])
        return rng.choice([
            f"({area}) 555-01{d2}", f"{area}-555-01{d2}", f"+1 {area} 555 01{d2}", f"{area}.555.01{d2}",
            f"+44 20 7946 0{d2[0]}{d2}", f"+49 30 {rng.randint(1000, 9999)} {d4}", f"+33 1 42 68 {d2} {d4[:2]}",
            f"+34 612 {d4[:2]} {d2} {d4[2:]}", f"+55 11 9{rng.randint(1000, 9999)}-{d4}", f"+44 7700 900{rng.randint(100, 999)}",
        ])
    if kind == "pii_card":
        if rng.random() < 0.35:
            digits = rng.choice(["4111111111111111", "5555555555554444", "4242424242424242", "4012888888881881",
                                 "5105105105105100", "6011111111111117"])
        else:
            prefix = rng.choice(["4", "51", "52", "53", "54", "55"])
            body = prefix + "".join(str(rng.randint(0, 9)) for _ in range(15 - len(prefix)))
            digits = luhn_complete(body)
        assert luhn_ok(digits)
        return rng.choice([group4(digits, " "), group4(digits, "-"), digits, group4(digits, " ")])
    if kind == "pii_ip":
        return rng.choice([
            f"203.0.113.{rng.randint(2, 254)}", f"198.51.100.{rng.randint(2, 254)}", f"192.0.2.{rng.randint(2, 254)}",
            f"10.{rng.randint(0, 40)}.{rng.randint(0, 255)}.{rng.randint(2, 254)}", f"192.168.{rng.randint(0, 10)}.{rng.randint(2, 254)}",
            f"172.16.{rng.randint(0, 31)}.{rng.randint(2, 254)}",
        ])
    if kind == "pii_secret":
        alnum = string.ascii_letters + string.digits
        if rng.random() < 0.6:
            return "sk-" + rng.choice(["", "live-", "proj-"]) + "".join(rng.choice(alnum) for _ in range(40))
        return "AKIA" + "".join(rng.choice(string.ascii_uppercase + "234567") for _ in range(16))
    raise KeyError(kind)


PII_SENTENCES = {
    "pii_email": ["My account email is {v}.", "You can reach me at {v} if you need anything else.",
                  "The invoice should go to {v} instead.", "I signed up with {v}, in case that helps you find me.",
                  "Please reply to {v}, I don't check the other inbox."],
    "pii_phone": ["You can call me on {v} this afternoon.", "My phone number on file is {v}.",
                  "The SMS codes are supposed to go to {v}.", "If it's easier, call {v} and ask for me.",
                  "I'm reachable at {v} most afternoons."],
    "pii_card": ["The card you charged is {v}, expiry 08/27.", "I'd like to switch to this card: {v}.",
                 "The charge shows up on my card {v}.", "Can you refund it to {v}? That's the card I used."],
    "pii_ip": ["Our server at {v} keeps getting blocked.", "Requests come from {v}, if that helps with the logs.",
               "Our firewall logs show the calls leaving from {v}.", "I'm connecting from {v} at the office."],
    "pii_secret": ["Here's the key I'm using, maybe it's wrong: {v}", "My config has api_key = \"{v}\" and it still fails.",
                   "I set NORTHWIND_API_KEY={v} in the environment.", "The credentials in the script are {v}, is that the problem?"],
}
PII_INTENT_AREA = {"pii_email": None, "pii_phone": None, "pii_card": "billing", "pii_ip": "api", "pii_secret": "api"}

NOT_PII_SENTENCES = [
    ("tracking", "The carrier tracking number is 9400 {d4a} {d4b} {d4c} {d4d} {d2}, and it hasn't moved since {date}."),
    ("ticket", "I already have case NW-{d6} open about this, and my order is #{order}."),
    ("invoice", "The reference on the invoice is INV-2026-{d6} for order #{order}."),
    ("luhn_invalid_16_digit", "The warranty serial on the sticker is {bad16}, if you need it."),
    ("luhn_invalid_16_digit", "My gift voucher code is {bad16} but checkout rejects it."),
    ("tracking", "Tracking says 1Z{ups} is out for delivery, order #{order}."),
]


def bad16(rng: random.Random) -> str:
    while True:
        digits = rng.choice(["4", "5", "6"]) + "".join(str(rng.randint(0, 9)) for _ in range(15))
        if not luhn_ok(digits):
            return group4(digits, " ")


# ---------------------------------------------------------------------------------------------
# Items and files


@dataclass
class Item:
    conv: Conv | None = None
    pref: dict | None = None  # {"prompt": [msgs], "chosen": str, "rejected": str}
    raw: object = None  # dict (JSON object written as is) or bytes (a physical line written as is)
    tags: list = field(default_factory=list)  # dicts with kind and maybe source: Item
    blank: bool = False
    file: str = ""
    row: int = 0


def tag(item: Item, kind: str, **extra) -> Item:
    item.tags.append(dict(kind=kind, **extra))
    return item


class Layout:
    """The ordered rows of one file; planted rows are inserted among the clean ones."""

    def __init__(self, name: str, rng: random.Random):
        self.name = name
        self.rng = rng
        self.items: list[Item] = []

    def insert(self, item: Item, after: Item | None = None) -> Item:
        item.file = self.name
        lo = 0
        if after is not None and after.file == self.name:
            lo = self.items.index(after) + 1
        self.items.insert(self.rng.randint(lo, len(self.items)), item)
        return item


def edited_copy(rng: random.Random, src: Conv, frac_lo: float = 0.05, frac_hi: float = 0.1,
                min_j: float = 0.75) -> tuple[Conv, float]:
    """A lightly edited copy of src (answers mostly, sometimes the question) that stays a near-duplicate."""
    best = None
    for _ in range(40):
        c = copy.deepcopy(src)
        t = rng.randrange(len(c.turns))
        c.turns[t][1] = light_edit(c.turns[t][1], rng, rng.uniform(frac_lo, frac_hi))
        if rng.random() < 0.3:
            c.turns[0][0] = light_edit(c.turns[0][0], rng, rng.uniform(frac_lo, frac_hi))
        j = jaccard(c.text(), src.text())
        if normalize(c.text()) != normalize(src.text()) and min_j <= j < 0.98:
            return c, j
        if best is None or (j > best[1] and normalize(c.text()) != normalize(src.text())):
            best = (c, j)
    return best


def normalized_copy(rng: random.Random, src: Conv) -> Conv:
    """Differs only in whitespace or case, so it is equal after normalization."""
    c = copy.deepcopy(src)
    how = rng.choice(["case", "space", "both"])
    u = c.turns[0][0]
    if how in ("case", "both"):
        u = u.lower() if u != u.lower() else u.upper()
    if how in ("space", "both"):
        u = "  " + u.replace(" ", "  ", 2) + " \n"
    c.turns[0][0] = u
    if rng.random() < 0.5:
        c.turns[-1][1] = c.turns[-1][1] + "\n\n"
    return c


def junk_answer(rng: random.Random, kind: str, conv: Conv) -> str:
    user, good = conv.turns[-1]
    if kind == "empty_response":
        return rng.choice(["", "", " ", "\n"])
    if kind == "short_response":
        return rng.choice(["ok", "Thanks", "Done.", "Sure", "k", "Noted.", "yes", "OK!", "Thanks!", "fixed"])
    if kind == "boilerplate":
        return fill(rng.choice(BOILERPLATE), conv.slots)
    if kind == "truncated_response":
        w = good.split(" ")
        cut = max(8, int(len(w) * rng.uniform(0.35, 0.7)))
        text = " ".join(w[:cut]).rstrip(string.punctuation + " \n")
        while text.split(" ")[-1].lower() in {"a", "an"}:
            text = " ".join(text.split(" ")[:-1])
        return text
    if kind == "echo":
        return user
    if kind == "repetition":
        line = rng.choice([s for s in re.split(r"(?<=[.!?])\s+", good) if len(s.split()) > 4] or [good])
        line = line.lstrip("-0123456789. ")
        n = rng.randint(12, 30)
        return ("\n" if rng.random() < 0.6 else " ").join([line] * n)
    raise KeyError(kind)


JUNK_KINDS = ["empty_response", "short_response", "boilerplate", "truncated_response", "echo", "repetition"]
PII_KINDS = ["pii_email", "pii_phone", "pii_card", "pii_ip", "pii_secret"]


def add_pii(rng: random.Random, conv: Conv, kind: str) -> str:
    value = pii_value(rng, kind)
    sentence = rng.choice(PII_SENTENCES[kind]).format(v=value)
    if kind == "pii_secret" and rng.random() < 0.3:
        # the agent pastes the customer's key back into an example: the secret sits in the response
        conv.turns[0][1] += f"\n\nFor example:\n\nexport NORTHWIND_API_KEY={value}\nnorthwind files list --limit 10"
        return value
    u = conv.turns[0][0]
    parts = u.rsplit("\n", 1) if "\n" in u and rng.random() < 0.5 else [u]
    parts[0] = parts[0] + " " + sentence
    conv.turns[0][0] = "\n".join(parts)
    if kind in ("pii_email", "pii_phone") and rng.random() < 0.3:
        # the agent repeats the contact detail back, so it is in the response as well
        a = conv.turns[0][1]
        head, sep, tail = a.partition("\n\n")
        conv.turns[0][1] = head + sep + f"I've saved {value} as your contact {'address' if kind == 'pii_email' else 'number'}. " + tail
    return value


def add_not_pii(rng: random.Random, conv: Conv) -> tuple[str, str]:
    detail, template = rng.choice(NOT_PII_SENTENCES)
    vals = dict(conv.slots, d4a=f"{rng.randint(0, 9999):04d}", d4b=f"{rng.randint(0, 9999):04d}",
                d4c=f"{rng.randint(0, 9999):04d}", d4d=f"{rng.randint(0, 9999):04d}", d2=f"{rng.randint(0, 99):02d}",
                d6=f"{rng.randint(0, 999999):06d}", bad16=bad16(rng),
                ups="".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(16)))
    sentence = template.format_map(vals)
    conv.turns[0][0] = conv.turns[0][0] + " " + sentence
    value = re.search(r"(9400[\d ]+\d|NW-\d{6}|INV-2026-\d{6}|\d{4} \d{4} \d{4} \d{4}|1Z[A-Z0-9]{16})", sentence).group(0)
    return detail, value


# ---------------------------------------------------------------------------------------------
# Serialization


def alpaca_record(item: Item) -> dict:
    c = item.conv
    user, answer = c.turns[0]
    style = c.meta.get("alpaca_style", "plain")
    if style == "wrapped":
        return {"instruction": c.meta["wrap"], "input": user, "output": answer}
    if style == "context":
        return {"instruction": user, "input": c.meta["context"], "output": answer}
    return {"instruction": user, "input": "", "output": answer}


def openai_record(item: Item) -> dict:
    return {"messages": item.conv.messages()}


def sharegpt_record(item: Item, row: int) -> dict:
    c = item.conv
    conv = [{"from": "system", "value": c.system}] if c.system else []
    for u, a in c.turns:
        conv += [{"from": "human", "value": u}, {"from": "gpt", "value": a}]
    return {"id": f"nw-sg-{row:05d}", "conversations": conv}


def transcript_text(turns: list[list[str]]) -> str:
    return "".join(f"\n\nHuman: {u}\n\nAssistant: {a}" for u, a in turns)


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def jsonl_bytes(layout: Layout, to_record) -> bytes:
    out = io.BytesIO()
    line = 0
    for item in layout.items:
        line += 1
        item.row = line
        if item.blank:
            out.write(b"\n")
        elif isinstance(item.raw, bytes):
            out.write(item.raw + b"\n")
        elif item.raw is not None:
            out.write(dumps(item.raw).encode() + b"\n")
        else:
            out.write(dumps(to_record(item)).encode() + b"\n")
    return out.getvalue()


def pref_record(item: Item) -> dict:
    p = item.pref
    return {"prompt": p["prompt"][-1]["content"], "chosen": p["chosen"], "rejected": p["rejected"]}


def hh_record(item: Item) -> dict:
    p = item.pref
    prefix = ""
    msgs = [m for m in p["prompt"] if m["role"] != "system"]
    for m in msgs:
        prefix += f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
    return {"chosen": prefix + f"\n\nAssistant: {p['chosen']}", "rejected": prefix + f"\n\nAssistant: {p['rejected']}"}


# ---------------------------------------------------------------------------------------------
# Preferences


def rejected_answer(rng: random.Random, conv: Conv) -> tuple[str, str]:
    intent = conv.intents[-1]
    area = INTENTS[intent]["area"]
    style = rng.choice(["curt", "wrong_policy", "unhelpful", "rude", "hallucinated"])
    pool = REJECTED[style]
    if isinstance(pool, dict):
        pool = pool[area]
    slots = dict(conv.slots, topic=fill(rng.choice(INTENTS[intent]["topic"]), conv.slots))
    text = fill(rng.choice(pool), slots)
    step = fill(rng.choice(rng.choice(INTENTS[intent]["steps"])), slots)
    if style == "curt" and rng.random() < 0.5:
        text = step.split("; ")[0].split(", ")[0].rstrip(".") + "."
    elif style in ("wrong_policy", "hallucinated"):
        # a polite frame around the bad content makes the rejected answer plausible at a glance
        parts = [fill(rng.choice(OPENERS), slots)] if rng.random() < 0.6 else []
        parts.append(text)
        if style == "hallucinated" and rng.random() < 0.5:
            parts.append(step)
        if rng.random() < 0.4:
            parts.append(fill(rng.choice(CLOSERS), slots))
        text = " ".join(parts)
    elif style == "rude" and rng.random() < 0.5:
        text += " " + step
    elif style == "unhelpful" and rng.random() < 0.4:
        text = rng.choice(["Thanks for your message.", "Hello.", "Hi {name}.".format_map(slots)]) + " " + text
    return style, text


def make_pref(rng: random.Random, turns: int = 1, system_p: float = 0.0) -> dict:
    conv = make_conv(rng, turns=turns, system_p=system_p)
    prompt = conv.messages()[:-1]
    style, rejected = rejected_answer(rng, conv)
    return {"prompt": prompt, "chosen": conv.turns[-1][1], "rejected": rejected, "conv": conv, "style": style}


def pref_text(p: dict) -> str:
    return "\n".join([m["content"] for m in p["prompt"]] + [p["chosen"], p["rejected"]])


# ---------------------------------------------------------------------------------------------
# Build


def build() -> dict:
    rng = random.Random(SEED)

    # Held-out eval set first, so training rows never depend on how many eval rows there are.
    eval_rows = []
    for n in range(60):
        conv = make_conv(rng, turns=1 if n % 3 else 2, system_p=0.5)
        eval_rows.append((f"eval-{n + 1:04d}", conv))

    L = {name: Layout(name, rng) for name in (F_ALPACA, F_OPENAI, F_SHAREGPT, F_CSV, F_TRANSCRIPTS,
                                               F_PREF, F_PREF_PARQUET, F_PREF_HH)}

    plan = {
        F_ALPACA: dict(total=1400, exact=55, near=65, same=12, junk=45, nonen=22, pii=40, notpii=12, contam=4, broken=14, blank=3),
        F_OPENAI: dict(total=1400, exact=55, near=65, same=14, junk=40, nonen=22, pii=40, notpii=12, contam=5, broken=20, blank=3),
        F_SHAREGPT: dict(total=1200, exact=45, near=50, same=6, junk=30, nonen=18, pii=30, notpii=10, contam=4, broken=11, blank=0),
        F_CSV: dict(total=700, exact=20, near=30, same=8, junk=25, nonen=18, pii=20, notpii=6, contam=2, broken=3, blank=0),
        F_TRANSCRIPTS: dict(total=300, exact=5, near=10, same=0, junk=10, nonen=0, pii=5, notpii=0, contam=0, broken=6, blank=2),
    }
    turns_dist = {F_ALPACA: [1], F_CSV: [1], F_OPENAI: [1, 1, 1, 2, 2, 3], F_SHAREGPT: [1, 2, 2, 2, 3, 3],
                  F_TRANSCRIPTS: [1, 2, 2, 3, 3]}
    system_p = {F_ALPACA: 0, F_CSV: 0, F_OPENAI: 0.6, F_SHAREGPT: 0.3, F_TRANSCRIPTS: 0}
    channels = ["email", "email", "chat", "chat", "web_form", "phone_transcript"]

    def new_conv(fname: str) -> Conv:
        c = make_conv(rng, turns=rng.choice(turns_dist[fname]), system_p=system_p[fname])
        decorate(fname, c)
        return c

    def decorate(fname: str, c: Conv) -> None:
        if fname == F_ALPACA:
            r = rng.random()
            if r < 0.2:
                c.meta["alpaca_style"] = "wrapped"
                c.meta["wrap"] = rng.choice([
                    "Reply to this customer message as a Northwind Cloud support agent.",
                    "Write a helpful support reply to the following message.",
                    "You are a Northwind Cloud support agent. Answer the customer below.",
                    "Respond to the customer's question politely and give clear steps.",
                ])
            elif r < 0.35:
                c.meta["alpaca_style"] = "context"
                c.meta["context"] = fill(rng.choice([
                    "Customer plan: {plan}. Order: #{order}.", "Plan: {plan}; device: {device}; app version {app_version}.",
                    "Channel: chat. Customer since {year}.", "Account tier: {plan}. Region: {country}.",
                ]), c.slots)
        if fname == F_CSV:
            c.meta["channel"] = rng.choice(channels)
            c.meta["created_at"] = f"2026-{rng.randint(1, 10):02d}-{rng.randint(1, 28):02d}T{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z"

    clean: dict[str, list[Item]] = {}
    for fname, p in plan.items():
        n_planted = sum(v for k, v in p.items() if k not in ("total", "blank"))
        items = [Item(conv=new_conv(fname), file=fname) for _ in range(p["total"] - n_planted)]
        L[fname].items = list(items)
        clean[fname] = items

    def single_turn_sources(fname: str) -> list[Item]:
        return [it for it in clean[fname] if len(it.conv.turns) == 1 and (
            fname != F_ALPACA or it.conv.meta.get("alpaca_style", "plain") == "plain") and not it.conv.system]

    used_sources: set[int] = set()

    def pick_source(pool: list[Item]) -> Item:
        for _ in range(200):
            it = rng.choice(pool)
            if id(it) not in used_sources:
                used_sources.add(id(it))
                return it
        return rng.choice(pool)

    # Cross-file copies: the source always lives in a file that sorts earlier.
    cross = {  # target: [(source file, exact count, near count)]
        F_OPENAI: [(F_ALPACA, 5, 10)],
        F_SHAREGPT: [(F_OPENAI, 5, 12)],
        F_CSV: [(F_ALPACA, 3, 8)],
        F_TRANSCRIPTS: [(F_SHAREGPT, 2, 4)],
    }
    needs_single = {F_ALPACA, F_CSV}
    no_system = {F_ALPACA, F_CSV, F_TRANSCRIPTS}

    for fname, p in plan.items():
        lay = L[fname]
        n_exact, n_near = p["exact"], p["near"]
        jobs = []
        for src_file, ce, cn in cross.get(fname, []):
            pool = [it for it in clean[src_file] if (fname not in needs_single or len(it.conv.turns) == 1)
                    and (fname not in no_system or not it.conv.system)
                    and (src_file != F_ALPACA or it.conv.meta.get("alpaca_style", "plain") == "plain")]
            jobs += [("exact", pick_source(pool)) for _ in range(ce)] + [("near", pick_source(pool)) for _ in range(cn)]
            n_exact -= ce
            n_near -= cn
        jobs += [("exact", pick_source(clean[fname])) for _ in range(n_exact)]
        jobs += [("near", pick_source(clean[fname])) for _ in range(n_near)]
        for how, src in jobs:
            if how == "exact":
                variant = "identical" if rng.random() < 0.6 else "normalized"
                c = copy.deepcopy(src.conv) if variant == "identical" else normalized_copy(rng, src.conv)
                c.meta = {k: v for k, v in c.meta.items() if k not in ("alpaca_style", "wrap", "context")} if fname != src.file else c.meta
                decorate(fname, c) if fname == F_CSV else None
                if fname == F_ALPACA and src.file == F_ALPACA:
                    c.meta = copy.deepcopy(src.conv.meta)
                it = tag(Item(conv=c), "exact_duplicate", source=src, variant=variant)
            else:
                c, j = edited_copy(rng, src.conv)
                if fname != src.file:
                    c.meta = {}
                decorate(fname, c) if fname == F_CSV else None
                it = tag(Item(conv=c), "near_duplicate", source=src, jaccard_5gram=round(j, 3))
            lay.insert(it, after=src)

        # same prompt, different answer
        pool = single_turn_sources(fname) if fname != F_TRANSCRIPTS else []
        for _ in range(p["same"]):
            src = pick_source(pool)
            for _ in range(40):
                c = copy.deepcopy(src.conv)
                c.turns[-1][1] = agent_answer(rng, c.intents[-1], c.slots)
                if jaccard(c.turns[-1][1], src.conv.turns[-1][1]) < 0.4:
                    break
            decorate(fname, c) if fname == F_CSV else None
            lay.insert(tag(Item(conv=c), "same_prompt", source=src), after=src)

        for n in range(p["junk"]):
            kind = JUNK_KINDS[n % len(JUNK_KINDS)]
            c = new_conv(fname)
            c.turns[-1][1] = junk_answer(rng, kind, c)
            lay.insert(tag(Item(conv=c), kind, turn=len(c.turns)))

        for n in range(p["nonen"]):
            turns = 1 if fname in needs_single else rng.choice([1, 1, 2])
            c = make_non_english(rng, turns=turns)
            decorate(fname, c)
            lay.insert(tag(Item(conv=c), "non_english", lang=c.lang))

        for n in range(p["pii"]):
            kind = PII_KINDS[n % len(PII_KINDS)]
            area = PII_INTENT_AREA[kind]
            c = make_conv(rng, turns=rng.choice(turns_dist[fname]), system_p=system_p[fname], area=area)
            decorate(fname, c)
            value = add_pii(rng, c, kind)
            lay.insert(tag(Item(conv=c), kind, value=value))

        for n in range(p["notpii"]):
            c = make_conv(rng, turns=rng.choice(turns_dist[fname]), system_p=system_p[fname], area="shipping")
            decorate(fname, c)
            detail, value = add_not_pii(rng, c)
            lay.insert(tag(Item(conv=c), "not_pii_order_number", detail=detail, value=value))

    # Contamination: eval conversations planted into training files.
    contam_targets = [F_ALPACA] * plan[F_ALPACA]["contam"] + [F_OPENAI] * plan[F_OPENAI]["contam"] + \
        [F_SHAREGPT] * plan[F_SHAREGPT]["contam"] + [F_CSV] * plan[F_CSV]["contam"]
    single_eval = [(i, c) for i, c in eval_rows if len(c.turns) == 1]
    multi_eval = [(i, c) for i, c in eval_rows if len(c.turns) > 1]
    picked_eval = set()
    for fname in contam_targets:
        pool = single_eval if fname in needs_single or rng.random() < 0.5 else multi_eval
        eid, ec = rng.choice([e for e in pool if e[0] not in picked_eval])
        picked_eval.add(eid)
        c = copy.deepcopy(ec)
        if fname in no_system:
            c.system = None
        variant = "verbatim"
        if rng.random() < 0.4:
            c, _ = edited_copy(rng, c, 0.02, 0.04, min_j=0.8)
            variant = "near_verbatim"
        c.meta = {}
        decorate(fname, c)
        L[fname].insert(tag(Item(conv=c), "contamination", eval_id=eid, variant=variant))

    add_broken_sft(rng, L, plan)
    build_preferences(rng, L)

    return {"layouts": L, "eval": eval_rows}


def add_broken_sft(rng: random.Random, L: dict, plan: dict) -> None:
    def new(fname, turns=1, system=0.0):
        return make_conv(rng, turns=turns, system_p=system)

    # --- alpaca
    a = L[F_ALPACA]
    rec = lambda: alpaca_record(Item(conv=new(F_ALPACA)))
    r = rec(); line = dumps(r); a.insert(tag(Item(raw=line[: len(line) // 2].encode()), "malformed_json", detail="truncated"))
    r = rec(); a.insert(tag(Item(raw=(dumps(r) + ' }, "extra": tru').encode()), "malformed_json", detail="trailing_garbage"))
    r = rec(); a.insert(tag(Item(raw=("{'instruction': " + repr(r["instruction"]) + ", 'input': '', 'output': " + repr(r["output"]) + "}").encode()), "malformed_json", detail="single_quotes"))
    r = rec(); a.insert(tag(Item(raw=dumps(r)[:-1].encode()), "malformed_json", detail="missing_closing_brace"))
    r = rec(); r["output"] = 42; a.insert(tag(Item(raw=r), "wrong_type", field="output"))
    r = rec(); r["instruction"] = [r["instruction"]]; a.insert(tag(Item(raw=r), "wrong_type", field="instruction"))
    r = rec(); r["output"] = {"text": r["output"]}; a.insert(tag(Item(raw=r), "wrong_type", field="output"))
    r = rec(); del r["output"]; a.insert(tag(Item(raw=r), "missing_field", field="output"))
    r = rec(); del r["instruction"]; a.insert(tag(Item(raw=r), "missing_field", field="instruction"))
    r = rec(); r = {"question": r["instruction"], "answer": r["output"]}; a.insert(tag(Item(raw=r), "missing_field", field="instruction"))
    r = rec(); del r["instruction"]; del r["input"]; a.insert(tag(Item(raw=r), "missing_field", field="instruction"))
    for _ in range(2):
        r = rec()
        raw = dumps(r).encode()
        cut = raw.index(b'"output": "') + len(b'"output": "') + 20
        a.insert(tag(Item(raw=raw[:cut] + b"\xff\xfe" + raw[cut:]), "invalid_utf8"))
    a.insert(tag(Item(raw=big_alpaca_row(rng)), "row_too_large"))
    for _ in range(plan[F_ALPACA]["blank"]):
        a.insert(Item(blank=True))

    # --- openai
    o = L[F_OPENAI]
    rec = lambda turns=1: {"messages": new(F_OPENAI, turns, 0.5).messages()}
    r = rec(); line = dumps(r); o.insert(tag(Item(raw=line[: int(len(line) * 0.6)].encode()), "malformed_json", detail="truncated"))
    r = rec(); o.insert(tag(Item(raw=(dumps(r) + "garbage").encode()), "malformed_json", detail="trailing_garbage"))
    r = rec(); o.insert(tag(Item(raw=(dumps(r) + dumps(rec())).encode()), "malformed_json", detail="two_objects_one_line"))
    r = rec(); o.insert(tag(Item(raw=dumps(r).replace('"role"', "role", 1).encode()), "malformed_json", detail="unquoted_key"))
    o.insert(tag(Item(raw={"messages": "hello"}), "wrong_type", field="messages"))
    r = rec(); r["messages"][-1]["content"] = 5; o.insert(tag(Item(raw=r), "wrong_type", field="content"))
    o.insert(tag(Item(raw={"messages": None}), "missing_field", field="messages", detail="null"))
    r = rec(); r["messages"] = {"user": r["messages"][-2]["content"], "assistant": r["messages"][-1]["content"]}; o.insert(tag(Item(raw=r), "wrong_type", field="messages"))
    r = rec(); o.insert(tag(Item(raw={"conversation": r["messages"]}), "missing_field", field="messages"))
    r = rec(); del r["messages"][-1]["content"]; o.insert(tag(Item(raw=r), "missing_field", field="content"))
    r = rec(); del r["messages"][-2]["role"]; o.insert(tag(Item(raw=r), "missing_field", field="role"))
    for role in ["tool_bot", "customer", "agent"]:
        r = rec(); r["messages"][-2 if role == "customer" else -1]["role"] = role; o.insert(tag(Item(raw=r), "unknown_role", role=role))
    r = rec(); r["messages"] = [m for m in r["messages"] if m["role"] != "user"]; o.insert(tag(Item(raw=r), "broken_turn_order", detail="starts_with_assistant"))
    r = rec(2); msgs = [m for m in r["messages"] if m["role"] != "system"]; r["messages"] = [msgs[0], msgs[2], msgs[3]]; o.insert(tag(Item(raw=r), "broken_turn_order", detail="two_user_turns"))
    r = rec(); r["messages"] = r["messages"][:-1]; o.insert(tag(Item(raw=r), "broken_turn_order", detail="ends_with_user"))
    r = rec(2); r["messages"] = [m for m in r["messages"] if m["role"] != "system"]; r["messages"].insert(2, dict(r["messages"][1])); o.insert(tag(Item(raw=r), "broken_turn_order", detail="two_assistant_turns"))
    for _ in range(2):
        raw = dumps(rec()).encode()
        cut = raw.rindex(b'"content": "') + len(b'"content": "') + 15
        o.insert(tag(Item(raw=raw[:cut] + b"\xc3\x28 \xff" + raw[cut:]), "invalid_utf8"))
    for _ in range(plan[F_OPENAI]["blank"]):
        o.insert(Item(blank=True))

    # --- sharegpt (a JSON array: only structurally bad elements, the file itself parses)
    s = L[F_SHAREGPT]
    rec = lambda turns=2: sharegpt_record(Item(conv=new(F_SHAREGPT, turns)), 0)
    r = rec(); r["conversations"] = {"a": 1}; s.insert(tag(Item(raw=r), "wrong_type", field="conversations"))
    r = rec(); r["conversations"][1]["value"] = 42; s.insert(tag(Item(raw=r), "wrong_type", field="value"))
    r = rec(); r["conversations"] = "human: my order is late"; s.insert(tag(Item(raw=r), "wrong_type", field="conversations"))
    r = rec(); r = {"id": r["id"], "turns": r["conversations"]}; s.insert(tag(Item(raw=r), "missing_field", field="conversations"))
    r = rec(); del r["conversations"][1]["value"]; s.insert(tag(Item(raw=r), "missing_field", field="value"))
    r = rec(); r["conversations"].insert(0, {"from": "narrator", "value": "The customer opens the chat window on the Northwind website."}); s.insert(tag(Item(raw=r), "unknown_role", role="narrator"))
    r = rec(); r["conversations"][1]["from"] = "moderator"; s.insert(tag(Item(raw=r), "unknown_role", role="moderator"))
    r = rec(); r["conversations"][0]["from"] = "customer"; s.insert(tag(Item(raw=r), "unknown_role", role="customer"))
    r = rec(1); r["conversations"] = r["conversations"][::-1]; s.insert(tag(Item(raw=r), "broken_turn_order", detail="starts_with_gpt"))
    r = rec(2); r["conversations"] = [r["conversations"][0], r["conversations"][2], r["conversations"][3]]; s.insert(tag(Item(raw=r), "broken_turn_order", detail="two_human_turns"))
    r = rec(2); r["conversations"] = r["conversations"][:3]; s.insert(tag(Item(raw=r), "broken_turn_order", detail="ends_with_human"))

    # --- csv
    c = L[F_CSV]
    c.insert(tag(Item(raw=["NW-SHORT1", "email", new(F_CSV).turns[0][0]]), "missing_field", field="agent_reply"))
    c.insert(tag(Item(raw=["NW-SHORT2", "chat"]), "missing_field", field="customer_message"))
    cv = new(F_CSV)
    c.insert(tag(Item(raw=["NW-EMPTYQ", "web_form", "", cv.turns[0][1], "2026-05-02T10:15:00Z"]), "missing_field", field="customer_message"))

    # --- transcripts
    t = L[F_TRANSCRIPTS]
    rec = lambda turns=2: {"text": transcript_text(new(F_TRANSCRIPTS, turns).turns)}
    r = rec(); line = dumps(r); t.insert(tag(Item(raw=line[: len(line) // 3].encode()), "malformed_json", detail="truncated"))
    r = rec(); t.insert(tag(Item(raw=(dumps(r) + ",").encode()), "malformed_json", detail="trailing_comma"))
    r = rec(); t.insert(tag(Item(raw={"text": [r["text"]]}), "wrong_type", field="text"))
    r = rec(); t.insert(tag(Item(raw={"transcript": r["text"]}), "missing_field", field="text"))
    cv = new(F_TRANSCRIPTS, 2)
    t.insert(tag(Item(raw={"text": f"\n\nAssistant: {cv.turns[0][1]}\n\nHuman: {cv.turns[1][0]}\n\nAssistant: {cv.turns[1][1]}"}), "broken_turn_order", detail="starts_with_assistant"))
    cv = new(F_TRANSCRIPTS, 2)
    t.insert(tag(Item(raw={"text": f"\n\nHuman: {cv.turns[0][0]}\n\nHuman: {cv.turns[1][0]}\n\nAssistant: {cv.turns[1][1]}"}), "broken_turn_order", detail="two_human_turns"))
    for _ in range(plan[F_TRANSCRIPTS]["blank"]):
        t.insert(Item(blank=True))


def big_alpaca_row(rng: random.Random) -> dict:
    lines = []
    paths = ["Photos/IMG_{n}.jpg", "Documents/report-{n}.pdf", "Music/track{n}.flac", "Backups/hub-{n}.tar", "Videos/clip_{n}.mp4"]
    levels = ["INFO", "WARN", "WARN", "ERROR"]
    while sum(len(x) + 1 for x in lines) < 215_000:
        h, m, s = rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59)
        lvl = rng.choice(levels)
        path = rng.choice(paths).format(n=rng.randint(1000, 9999))
        status = {"INFO": "uploaded", "WARN": "retry=%d status=SYNC-204" % rng.randint(1, 5), "ERROR": "failed status=SYNC-500"}[lvl]
        lines.append(f"2026-03-14T{h:02d}:{m:02d}:{s:02d}Z {lvl} sync.worker path=/{path} {status}")
    return {
        "instruction": "The customer pasted their full sync log. Summarize the problem and tell them what to do.",
        "input": "\n".join(lines),
        "output": "The log shows the same files being retried with SYNC-204 over and over, with a few hard SYNC-500 failures. "
                  "That pattern usually means the upload session expired while a large queue was pending. Sign out of the "
                  "desktop app, sign back in, and let the queue restart; if the SYNC-500 errors persist, send us the file "
                  "names and we'll check them on our side.",
    }


def build_preferences(rng: random.Random, L: dict) -> None:
    specs = [  # file, total, exact dups, near dups, chosen == rejected, empty rejected, PII
        (F_PREF, 500, 10, 12, 6, 3, 10),
        (F_PREF_PARQUET, 400, 8, 10, 3, 2, 5),
        (F_PREF_HH, 100, 2, 3, 1, 0, 0),
    ]
    for fname, total, n_exact, n_near, n_ident, n_empty, n_pii in specs:
        lay = L[fname]
        n_broken = {F_PREF: 6, F_PREF_PARQUET: 0, F_PREF_HH: 2}[fname]
        turns = [1, 1, 1, 2] if fname != F_PREF else [1]
        sysp = 0.4 if fname == F_PREF_PARQUET else 0.0
        n_clean = total - n_exact - n_near - n_ident - n_empty - n_pii - n_broken
        clean = [Item(pref=make_pref(rng, rng.choice(turns), sysp), file=fname) for _ in range(n_clean)]
        lay.items = list(clean)
        used = set()
        for n in range(n_exact + n_near):
            src = rng.choice([c for c in clean if id(c) not in used])
            used.add(id(src))
            p = copy.deepcopy(src.pref)
            if n < n_exact:
                lay.insert(tag(Item(pref=p), "exact_duplicate", source=src, variant="identical"), after=src)
            else:
                for _ in range(40):
                    p = copy.deepcopy(src.pref)
                    p["chosen"] = light_edit(p["chosen"], rng, rng.uniform(0.05, 0.1))
                    j = jaccard(pref_text(p), pref_text(src.pref))
                    if 0.75 <= j < 0.98:
                        break
                lay.insert(tag(Item(pref=p), "near_duplicate", source=src, jaccard_5gram=round(j, 3)), after=src)
        for _ in range(n_ident):
            p = make_pref(rng, rng.choice(turns), sysp)
            p["rejected"] = p["chosen"]
            lay.insert(tag(Item(pref=p), "pref_identical"))
        for _ in range(n_empty):
            p = make_pref(rng, rng.choice(turns), sysp)
            p["rejected"] = ""
            lay.insert(tag(Item(pref=p), "pref_empty"))
        for n in range(n_pii):
            kind = PII_KINDS[n % len(PII_KINDS)]
            conv = make_conv(rng, 1, area=PII_INTENT_AREA[kind])
            value = pii_value(rng, kind)
            conv.turns[0][0] += " " + rng.choice(PII_SENTENCES[kind]).format(v=value)
            style, rej = rejected_answer(rng, conv)
            p = {"prompt": conv.messages()[:-1], "chosen": conv.turns[0][1], "rejected": rej, "conv": conv, "style": style}
            lay.insert(tag(Item(pref=p), kind, value=value))
        if fname == F_PREF:
            rec = lambda: pref_record(Item(pref=make_pref(rng)))
            r = rec(); line = dumps(r); lay.insert(tag(Item(raw=line[: len(line) // 2].encode()), "malformed_json", detail="truncated"))
            r = rec(); lay.insert(tag(Item(raw=(dumps(r) + " ]").encode()), "malformed_json", detail="trailing_garbage"))
            r = rec(); r["chosen"] = 1; lay.insert(tag(Item(raw=r), "wrong_type", field="chosen"))
            r = rec(); r["rejected"] = [r["rejected"]]; lay.insert(tag(Item(raw=r), "wrong_type", field="rejected"))
            r = rec(); del r["rejected"]; lay.insert(tag(Item(raw=r), "missing_field", field="rejected"))
            r = rec(); del r["prompt"]; lay.insert(tag(Item(raw=r), "missing_field", field="prompt"))
            lay.insert(Item(blank=True))
        if fname == F_PREF_HH:
            r = hh_record(Item(pref=make_pref(rng))); line = dumps(r)
            lay.insert(tag(Item(raw=line[: len(line) // 2].encode()), "malformed_json", detail="truncated"))
            r = hh_record(Item(pref=make_pref(rng))); del r["rejected"]
            lay.insert(tag(Item(raw=r), "missing_field", field="rejected"))


# ---------------------------------------------------------------------------------------------
# Writing


def write_all(built: dict) -> dict:
    L = built["layouts"]
    files: dict[str, bytes] = {}

    files[F_ALPACA] = jsonl_bytes(L[F_ALPACA], alpaca_record)
    files[F_OPENAI] = gzip.compress(jsonl_bytes(L[F_OPENAI], openai_record), compresslevel=9, mtime=0)
    files[F_TRANSCRIPTS] = zstandard.ZstdCompressor(level=19).compress(
        jsonl_bytes(L[F_TRANSCRIPTS], lambda it: {"text": transcript_text(it.conv.turns)}))
    files[F_PREF] = jsonl_bytes(L[F_PREF], pref_record)
    files[F_PREF_HH] = jsonl_bytes(L[F_PREF_HH], hh_record)

    # ShareGPT: a JSON array, one element per line for readable diffs.
    elements = []
    for n, it in enumerate(L[F_SHAREGPT].items, 1):
        it.row = n
        rec = dict(it.raw) if it.raw is not None else sharegpt_record(it, n)
        if "id" in rec:
            rec["id"] = f"nw-sg-{n:05d}"
        elements.append(dumps(rec))
    files[F_SHAREGPT] = ("[\n" + ",\n".join(elements) + "\n]\n").encode()

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["ticket_id", "channel", "customer_message", "agent_reply", "created_at"])
    for n, it in enumerate(L[F_CSV].items, 1):
        it.row = n
        if it.raw is not None:
            w.writerow(it.raw)
        else:
            c = it.conv
            w.writerow([f"NW-{480000 + n * 7}", c.meta["channel"], c.turns[0][0], c.turns[0][1], c.meta["created_at"]])
    files[F_CSV] = buf.getvalue().encode()

    rows = []
    for n, it in enumerate(L[F_PREF_PARQUET].items, 1):
        it.row = n
        p = it.pref
        rows.append({"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
                     "rejected": [{"role": "assistant", "content": p["rejected"]}]})
    msg = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    table = pa.Table.from_pylist(rows, schema=pa.schema([("prompt", msg), ("chosen", msg), ("rejected", msg)]))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    files[F_PREF_PARQUET] = sink.getvalue().to_pybytes()

    eval_lines = [dumps({"id": eid, "messages": c.messages()}) for eid, c in built["eval"]]
    files[F_EVAL] = ("\n".join(eval_lines) + "\n").encode()

    for rel, data in files.items():
        path = ROOT / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return ground_truth(built)


FORMATS = {
    F_ALPACA: ("alpaca", "jsonl", "sft"), F_OPENAI: ("openai_messages", "jsonl.gz", "sft"),
    F_SHAREGPT: ("sharegpt", "json_array", "sft"), F_CSV: ("csv_prompt_response", "csv", "sft"),
    F_TRANSCRIPTS: ("hh_transcript", "jsonl.zst", "sft"), F_PREF: ("preference_strings", "jsonl", "preference"),
    F_PREF_PARQUET: ("preference_messages", "parquet", "preference"), F_PREF_HH: ("hh_rlhf", "jsonl", "preference"),
}


def ground_truth(built: dict) -> dict:
    L = built["layouts"]
    planted, files = [], {}
    for name, lay in L.items():
        blank = [it.row for it in lay.items if it.blank]
        fmt, container, kind = FORMATS[name]
        files[name] = {"format": fmt, "container": container, "kind": kind,
                       "rows": sum(1 for it in lay.items if not it.blank),
                       "physical_lines": len(lay.items) if container.startswith("jsonl") else None,
                       "blank_lines": blank}
        for it in lay.items:
            for t in it.tags:
                entry = {"file": name, "row": it.row}
                for k, v in t.items():
                    entry[k] = {"file": v.file, "row": v.row} if isinstance(v, Item) else v
                planted.append(entry)
    for name in L:
        per: dict[str, int] = {}
        for p in planted:
            if p["file"] == name:
                per[p["kind"]] = per.get(p["kind"], 0) + 1
        files[name]["planted_by_kind"] = dict(sorted(per.items()))
    files[F_EVAL] = {"format": "openai_messages", "container": "jsonl", "kind": "eval", "rows": len(built["eval"]),
                     "physical_lines": len(built["eval"]), "blank_lines": []}
    counts: dict[str, int] = {}
    for p in planted:
        counts[p["kind"]] = counts.get(p["kind"], 0) + 1
    return {
        "seed": SEED,
        "generator": "sample_data/generate.py",
        "row_numbering": "1-based; JSONL: physical line (blank lines count); JSON array: element index+1; "
                         "CSV: record index+1 excluding the header; Parquet: row index+1",
        "files": files,
        "counts_by_kind": dict(sorted(counts.items())),
        "planted": planted,
    }


def main() -> None:
    built = build()
    truth = write_all(built)
    (ROOT / "planted.json").write_text(json.dumps(truth, indent=1, ensure_ascii=False) + "\n")
    total = sum(f["rows"] for f in truth["files"].values())
    print(f"wrote {len(truth['files'])} files, {total} rows, {len(truth['planted'])} planted items")


if __name__ == "__main__":
    main()
