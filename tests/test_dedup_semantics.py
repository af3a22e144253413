"""What dedup calls a duplicate (issue 12, item 5), through `curate dedup` on hand-written files in the
shapes users bring: distinct items that differ only in numbers stay, preference pairs that share a prompt
but not their answers stay, true duplicates (whitespace, Unicode composition, case) go as exact
duplicates, near-duplicate pairs go as near duplicates."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from curate.cli import main


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def dedup(tmp_path: Path, data: Path | list[Path], *flags: str, out: str = "run") -> tuple[pl.DataFrame, pl.DataFrame]:
    """Run `curate dedup`; returns (kept, dropped) with each row's file name as `file` and 0-based
    position in its file as `row`. Nothing may be quarantined: these fixtures are all valid."""
    files = [str(path) for path in (data if isinstance(data, list) else [data])]
    assert main(["dedup", *files, "--out", str(tmp_path / out), "--quiet", *flags]) == 0
    assert pl.read_parquet(tmp_path / out / "quarantine.parquet").height == 0
    kept = pl.read_parquet(tmp_path / out / "dedup" / "data.parquet")
    dropped = pl.read_parquet(tmp_path / out / "dedup" / "dropped.parquet")
    where = [
        pl.col("source").struct.field("file").str.split("/").list.last().alias("file"),
        (pl.col("source").struct.field("row") - 1).alias("row"),  # source rows count from 1
    ]
    return kept.with_columns(where), dropped.with_columns(where)


def chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


# An arithmetic eval: every item is the same template with other numbers.
ARITHMETIC = [
    chat("What is 17+25?", "42"),
    chat("What is 18+25?", "43"),
    chat("What is 17*25?", "425"),
    chat("What is 170+250?", "420"),
    chat("What is 1.5+2.5?", "4"),
]

# Word problems long enough that one changed number leaves most character 5-grams shared.
WORD_PROBLEM = (
    "A farmer keeps {cows} cows in the north field and {more} more in the south field. Every evening all of "
    "them walk back to the barn along the river path. How many cows walk back to the barn each evening?"
)
WORD_PROBLEMS = [
    chat(WORD_PROBLEM.format(cows=17, more=25), "They walk back together: 17 + 25 = 42 cows each evening."),
    chat(WORD_PROBLEM.format(cows=18, more=25), "They walk back together: 18 + 25 = 43 cows each evening."),
]

# FEBRL-style person records (given name, surname, street number, street, suburb, postcode, state,
# date of birth, social security id): relatives at one address differ in numbers only.
PERSON = "{number} keats street, kensington, {postcode} nsw; born {dob}; soc_sec_id {ssid}"
PEOPLE = [
    {"instruction": "Normalize this person record to JSON.", "input": "rec-101-org: tracey mcconnell, " + PERSON.format(number=12, postcode=2033, dob=19640523, ssid=4108127),
     "output": '{"given_name": "tracey", "surname": "mcconnell", "street_number": 12, "postcode": "2033", "date_of_birth": "1964-05-23", "soc_sec_id": "4108127"}'},
    {"instruction": "Normalize this person record to JSON.", "input": "rec-102-org: tracey mcconnell, " + PERSON.format(number=14, postcode=2033, dob=19910817, ssid=6614902),
     "output": '{"given_name": "tracey", "surname": "mcconnell", "street_number": 14, "postcode": "2033", "date_of_birth": "1991-08-17", "soc_sec_id": "6614902"}'},
    {"instruction": "Normalize this person record to JSON.", "input": "rec-103-org: tracey mcconnell, " + PERSON.format(number=12, postcode=2033, dob=19640523, ssid=4108172),
     "output": '{"given_name": "tracey", "surname": "mcconnell", "street_number": 12, "postcode": "2033", "date_of_birth": "1964-05-23", "soc_sec_id": "4108172"}'},
]


def test_rows_differing_only_in_numbers_are_all_kept(tmp_path):
    data = write_jsonl(tmp_path / "arithmetic.jsonl", ARITHMETIC + WORD_PROBLEMS)
    kept, dropped = dedup(tmp_path, data)
    assert dropped.height == 0 and kept.height == len(ARITHMETIC) + len(WORD_PROBLEMS)


def test_person_records_differing_only_in_numbers_are_all_kept(tmp_path):
    data = write_jsonl(tmp_path / "people.jsonl", PEOPLE)
    kept, dropped = dedup(tmp_path, data)
    assert dropped.height == 0 and sorted(kept["row"].to_list()) == [0, 1, 2]


def test_number_folding_merges_them_only_when_asked(tmp_path):
    data = [
        write_jsonl(tmp_path / "arithmetic.jsonl", ARITHMETIC + WORD_PROBLEMS),
        write_jsonl(tmp_path / "people.jsonl", PEOPLE),
    ]

    def dropped_rows(dropped: pl.DataFrame) -> list[tuple[str, int]]:
        return sorted(zip(dropped["file"].to_list(), dropped["row"].to_list()))

    # --normalize-digits: number-only variants become exact duplicates (the old default); 170+250 has
    # more digits than 17+25, so it is still another text
    _, dropped = dedup(tmp_path, data, "--normalize-digits", out="digits")
    assert set(dropped["reason"].to_list()) == {"exact_duplicate"}
    assert dropped_rows(dropped) == [("arithmetic.jsonl", 1), ("arithmetic.jsonl", 6), ("people.jsonl", 1), ("people.jsonl", 2)]
    # --merge-number-variants: long texts that differ in a few digits become near duplicates; the short
    # sums differ in too large a share of their characters to reach the threshold
    _, dropped = dedup(tmp_path, data, "--merge-number-variants", out="variants")
    assert set(dropped["reason"].to_list()) == {"near_duplicate"}
    assert ("arithmetic.jsonl", 6) in dropped_rows(dropped)
    assert all(file == "people.jsonl" or row >= 5 for file, row in dropped_rows(dropped))
    assert (dropped["jaccard_verified"] >= 0.7).all()


# Human preference data in Anthropic HH form: one multi-turn transcript, two different final replies per
# pair, several pairs per prompt.
HH_PROMPT = (
    "\n\nHuman: My kitchen sink drains very slowly and smells bad. I have tried boiling water twice already "
    "and it did not help at all. What else can I try before I call a plumber?"
    "\n\nAssistant: Sorry to hear that. Is it a double sink, and do you have a garbage disposal?"
    "\n\nHuman: Yes, it is a double sink with a disposal on the left side. The right side is the slow one."
)


def hh(chosen: str, rejected: str, prompt: str = HH_PROMPT) -> dict:
    return {"chosen": prompt + "\n\nAssistant: " + chosen, "rejected": prompt + "\n\nAssistant: " + rejected}


HH_PAIRS = [
    hh("Run the disposal with cold water first, then try a plunger on the right side while you hold a wet "
       "cloth over the left drain.", "Just call the plumber."),
    hh("Pour half a cup of baking soda and then a cup of vinegar into the right drain, wait fifteen minutes "
       "and flush with hot water.", "Boiling water always works, try it again."),
    hh("Take off the P-trap under the right basin with a bucket underneath and clear it out by hand.",
       "I can't help with plumbing."),
]


def test_preference_pairs_sharing_a_prompt_with_other_answers_are_all_kept(tmp_path):
    data = write_jsonl(tmp_path / "hh.jsonl", HH_PAIRS)
    kept, dropped = dedup(tmp_path, data)
    assert dropped.height == 0 and kept.height == 3
    assert kept["prompt"].list.len().to_list() == [3, 3, 3]  # the shared transcript became the prompt
    # `--key prompt` is about SFT rows: preference pairs still compare their answers ...
    kept, dropped = dedup(tmp_path, data, "--key", "prompt", out="prompt-key")
    assert dropped.height == 0 and kept.height == 3
    # ... and collapse by prompt only when asked for explicitly
    kept, dropped = dedup(tmp_path, data, "--preference-key", "prompt", out="prompt-only")
    assert kept.height == 1 and dropped["reason"].to_list() == ["exact_duplicate", "exact_duplicate"]


def test_true_duplicate_pair_is_an_exact_duplicate(tmp_path):
    prompt = "Is the café on Rue Cler open on Sundays?"
    original = {"prompt": prompt, "chosen": "Yes, from 9:00 to 14:00.", "rejected": "No idea."}
    # the same triple with decomposed é (e + combining acute), doubled spaces and trailing whitespace
    copy = {
        "prompt": "Is the  cafe\u0301 on Rue Cler open on Sundays? ",
        # (the doubled space is in the prompt: the keep policy prefers the longest answer, and ingest keeps
        # inner spaces, so a doubled space in `chosen` would make the copy the one kept)
        "chosen": "Yes, from 9:00 to 14:00.\n",
        "rejected": "No idea. ",
    }
    shouting = {"prompt": prompt.upper(), "chosen": "YES, FROM 9:00 TO 14:00.", "rejected": "NO IDEA."}
    other_hours = {"prompt": prompt, "chosen": "Yes, from 9:00 to 15:00.", "rejected": "No idea."}
    data = write_jsonl(tmp_path / "pairs.jsonl", [original, copy, shouting, other_hours])
    kept, dropped = dedup(tmp_path, data)
    assert sorted(kept["row"].to_list()) == [0, 3]
    assert dropped.sort("row")["row"].to_list() == [1, 2]
    assert set(dropped["reason"].to_list()) == {"exact_duplicate"}
    assert (dropped["jaccard_verified"] == 1.0).all()
    original_id = kept.filter(pl.col("row") == 0)["id"][0]
    assert set(dropped["duplicate_of"].to_list()) == {original_id}
    # case folding is an option: without it the shouted copy is no exact duplicate
    _, dropped = dedup(tmp_path, data, "--no-lowercase", "--no-near", out="case")
    assert dropped["row"].to_list() == [1]


def test_near_duplicate_triples_are_removed(tmp_path):
    first = hh(
        "Run the disposal with cold water first, then try a plunger on the right side while you hold a wet "
        "cloth over the left drain.",
        "Just call the plumber.",
    )
    edited_prompt = HH_PROMPT.replace("very slowly", "really slowly").replace("What else", "What")
    near = hh(
        "Run the disposal with cold water first, then use a plunger on the right side while you hold a wet "
        "cloth over the left drain!",
        "Just call the plumber.",
        prompt=edited_prompt,
    )
    # same prompt and chosen, a different rejected answer: a different pair
    other_rejected = hh(
        "Run the disposal with cold water first, then try a plunger on the right side while you hold a wet "
        "cloth over the left drain.",
        "Pour bleach into both drains and leave it overnight.",
    )
    data = write_jsonl(tmp_path / "near.jsonl", [first, near, other_rejected])
    kept, dropped = dedup(tmp_path, data, "--threshold", "0.7")
    assert dropped["reason"].to_list() == ["near_duplicate"]
    assert sorted(kept["row"].to_list()) == [0, 2] or sorted(kept["row"].to_list()) == [1, 2]
    assert dropped["jaccard_verified"][0] >= 0.7


def test_saved_index_compares_preference_pairs_part_by_part_too(tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", HH_PAIRS[:1])
    dedup(tmp_path, first, out="run1")
    near_copy = hh(
        "Run the disposal with cold water first, then try a plunger on the right side while you hold a wet "
        "cloth over the left drain!",
        "Just call the plumber.",
    )
    other_rejected = hh(
        "Run the disposal with cold water first, then try a plunger on the right side while you hold a wet "
        "cloth over the left drain.",
        "Pour bleach into both drains and leave it overnight.",
    )
    second = write_jsonl(tmp_path / "second.jsonl", [near_copy, other_rejected])
    kept, dropped = dedup(tmp_path, second, "--index", str(tmp_path / "run1" / "dedup" / "index"), out="run2")
    assert dropped["row"].to_list() == [0] and dropped["reason"].to_list() == ["near_duplicate"]
    assert kept["row"].to_list() == [1]


def test_tool_conversations_differing_only_in_call_arguments_are_both_kept(tmp_path):
    def weather(city: str, temperature: str) -> dict:
        return {"messages": [
            {"role": "user", "content": "What's the weather like?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": temperature},
            {"role": "assistant", "content": "It is mild today."},
        ]}

    rows = [weather("Paris", "18C"), weather("Lyon", "18C"), weather("Paris", "18C")]
    kept, dropped = dedup(tmp_path, write_jsonl(tmp_path / "tools.jsonl", rows))
    reasons = dict(zip(dropped["row"].to_list(), dropped["reason"].to_list()))
    assert 0 in kept["row"].to_list() and reasons[2] == "exact_duplicate"
    # Lyon is another call, never an exact copy of Paris (before, tool calls were left out of the key and
    # it was dropped as exact_duplicate with jaccard_verified 1.0); in a conversation this short, one word
    # of difference may still make it a verified near duplicate.
    assert reasons.get(1) != "exact_duplicate"
    if 1 in reasons:
        assert dropped.filter(pl.col("row") == 1)["jaccard_verified"][0] < 1.0
