"""Splits grouped by prompt (issue 12, item 6): every row whose prompt is the same as, or a near-duplicate
of, another row's prompt lands in the same split, for preference pairs and SFT chats alike, joined with
the dedup clusters. Run through `curate split` on hand-written files; with grouping off the same data
leaks prompts across splits, so the tests can tell."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from curate.cli import main
from curate.records import canonical_frame
from curate.split import SplitConfig, assign_splits, read_exported

# Customer questions; several preference pairs are written for each.
PROMPTS = [
    "My package was marked as delivered yesterday but it is not at my door. What should I do?",
    "How do I export all my contacts from the app to a CSV file?",
    "Can I change the email address on my account without losing my order history?",
    "Why was I charged twice for the same order this month?",
    "The app crashes every time I open the camera tab on my Pixel 7.",
    "Is there a way to pause my subscription while I travel for two months?",
    "I forgot my password and the reset email never arrives.",
    "Do you ship to Norway, and how long does it usually take?",
    "How can I add a second user to our team plan?",
    "My discount code SPRING10 says it is invalid at checkout.",
    "Can I get an invoice with my company's VAT number on it?",
    "How do I turn off the weekly summary emails?",
    "The tracking page has not updated in six days. Is my parcel lost?",
    "Can I return a jacket I bought on sale?",
    "Two-factor codes from the authenticator app are always rejected.",
    "How do I delete my account and all of my data?",
]
# Reworded variants of three of the questions (verified Jaccard of character 5-grams ≥ 0.7).
VARIANTS = {
    0: "My package was marked as delivered yesterday, but it isn't at my door. What should I do now?",
    1: "How do I export all of my contacts from the app into a CSV file?",
    2: "Can I change the e-mail address on my account without losing my order history?",
}
HELPFUL = [
    "I'm sorry about that. Please check with neighbours and your building's mailroom first; if it has not "
    "turned up within 48 hours, reply here and we will open a claim with the carrier.",
    "Open Contacts, tap the three dots, choose Export and pick CSV. The file lands in your Downloads folder.",
    "Yes. Go to Settings > Account > Email, enter the new address and confirm the link we send; your orders stay.",
    "The second charge is a pending authorization that drops off within 3 to 5 business days.",
    "Thanks for the details. Please update to version 5.2.1, which fixes a camera-permission crash on Pixel phones.",
    "Yes: Settings > Subscription > Pause lets you pause for up to three months at no cost.",
    "Please check your spam folder and add no-reply@example.com to your contacts, then request the email again.",
    "We ship to Norway; delivery usually takes 4 to 7 business days, plus customs.",
    "Open Team > Members > Invite and enter their email; the seat is added to your next invoice.",
    "SPRING10 expired on 31 May. I have added a 10% credit to your account instead.",
    "Yes. Add your VAT number under Billing > Company details and download the invoice again.",
    "Go to Settings > Notifications and switch off Weekly summary.",
    "Parcels sometimes stop scanning in transit. If it has not moved in 7 days we will send a replacement.",
    "Sale items can be returned within 14 days for store credit.",
    "Your phone's clock is probably off. Turn on automatic time, then try a fresh code.",
    "Go to Settings > Privacy > Delete account. Everything is erased within 30 days.",
]
CLOSINGS = ["", " Let me know if that helps.", " Have a great day!", " Anything else I can do?"]
REJECTED = ["Not sure, try again later.", "Read the FAQ.", "That is not something we handle.", "Just restart it."]


def preference_rows() -> list[dict]:
    rows = []
    for index, prompt in enumerate(PROMPTS):
        for variant in range(3):
            rows.append(
                {"prompt": prompt, "chosen": HELPFUL[index] + CLOSINGS[variant], "rejected": REJECTED[variant]}
            )
        if index in VARIANTS:
            rows.append({"prompt": VARIANTS[index], "chosen": HELPFUL[index] + CLOSINGS[3], "rejected": REJECTED[3]})
    return rows


def chat_rows() -> list[dict]:
    rows = []
    for index, prompt in enumerate(PROMPTS):
        for closing in CLOSINGS[:2]:
            rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": HELPFUL[index] + closing}]})
    return rows


def question_of(text: str) -> int:
    """Which hand-written question (or its reworded variant) a prompt text is."""
    for index, prompt in enumerate(PROMPTS):
        if text == prompt or text == VARIANTS.get(index):
            return index
    raise AssertionError(f"unknown prompt {text!r}")


def split_files(tmp_path: Path, *flags: str, out: str = "run") -> pl.DataFrame:
    """`curate split` on the hand-written preference and chat files; every exported row with its split
    and the question its prompt asks."""
    pref = tmp_path / "pairs.jsonl"
    chats = tmp_path / "chats.jsonl"
    pref.write_text("".join(json.dumps(row) + "\n" for row in preference_rows()))
    chats.write_text("".join(json.dumps(row) + "\n" for row in chat_rows()))
    args = ["split", str(pref), str(chats), "--out", str(tmp_path / out), "--train", "0.5", "--validation", "0.25", "--test", "0.25"]
    assert main([*args, "--quiet", *flags]) == 0
    exported_pref = read_exported(tmp_path / out / "pref")
    exported_sft = read_exported(tmp_path / out / "sft")
    pref_rows = exported_pref.select(
        pl.col("prompt").list.first().struct.field("content").alias("prompt"), "split", pl.lit("preference").alias("kind")
    )
    sft_rows = exported_sft.select(
        pl.col("messages").list.first().struct.field("content").alias("prompt"), "split", pl.lit("sft").alias("kind")
    )
    rows = pl.concat([pref_rows, sft_rows])
    assert rows.height == len(preference_rows()) + len(chat_rows())
    return rows.with_columns(pl.col("prompt").map_elements(question_of, return_dtype=pl.Int64).alias("question"))


def splits_per(rows: pl.DataFrame, column: str) -> pl.DataFrame:
    return rows.group_by(column).agg(pl.col("split").n_unique().alias("splits"), pl.col("split").unique().alias("which"))


def test_no_prompt_or_prompt_cluster_is_in_two_splits(tmp_path):
    rows = split_files(tmp_path)
    # the same prompt text, in preference pairs and chats alike
    assert splits_per(rows, "prompt").filter(pl.col("splits") > 1).is_empty()
    # a question and its reworded variant (a near-duplicate prompt)
    assert splits_per(rows, "question").filter(pl.col("splits") > 1).is_empty()
    # still a real split, not everything in one place
    assert rows["split"].n_unique() == 3
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    grouping = next(s for s in manifest["stages"] if s["type"] == "split")["report"]["grouping"]
    assert grouping["groups"] == len(PROMPTS) and grouping["near_duplicate_prompt_pairs"] >= len(VARIANTS)


def test_per_pair_assignment_leaks_prompts_across_splits(tmp_path):
    rows = split_files(tmp_path, "--group-prompts", "off", out="ungrouped")
    leaked = splits_per(rows, "prompt").filter(pl.col("splits") > 1)
    assert leaked.height >= len(PROMPTS) // 2  # most prompts have a pair in more than one split
    pref = rows.filter(pl.col("kind") == "preference")
    validation = set(pref.filter(pl.col("split") == "validation")["prompt"])
    train = set(pref.filter(pl.col("split") == "train")["prompt"])
    assert validation & train  # the DPO leak of issue 12: validation prompts also in train


def test_exact_prompt_grouping_keeps_identical_prompts_but_not_variants_together(tmp_path):
    rows = split_files(tmp_path, "--group-prompts", "exact", out="exact")
    assert splits_per(rows, "prompt").filter(pl.col("splits") > 1).is_empty()
    # with this seed, some reworded variants land apart from their question: what `near` prevents
    assert not splits_per(rows, "question").filter(pl.col("splits") > 1).is_empty()
    manifest = json.loads((tmp_path / "exact" / "manifest.json").read_text())
    grouping = next(s for s in manifest["stages"] if s["type"] == "split")["report"]["grouping"]
    assert grouping["groups"] == len(PROMPTS) + len(VARIANTS)  # each variant is its own group


def test_groups_join_prompt_clusters_with_dup_clusters():
    # Row 0 asks question 0; row 1 asks question 1 but dedup put it in row 0's cluster; row 2 asks
    # question 1 again. All three form one group, whatever the hash would say for each alone.
    records = [
        {"prompt": PROMPTS[0], "chosen": HELPFUL[0], "rejected": REJECTED[0], "dup_cluster": "cluster-a"},
        {"prompt": PROMPTS[1], "chosen": HELPFUL[1], "rejected": REJECTED[0], "dup_cluster": "cluster-a"},
        {"prompt": PROMPTS[1], "chosen": HELPFUL[1] + CLOSINGS[1], "rejected": REJECTED[1], "dup_cluster": "cluster-b"},
    ]
    filler = [
        {"prompt": prompt, "chosen": HELPFUL[index], "rejected": REJECTED[2], "dup_cluster": f"other-{index}"}
        for index, prompt in enumerate(PROMPTS[2:], start=2)
    ]
    frame = canonical_frame(records + filler)
    for seed in range(8):
        rows, report = assign_splits(frame.lazy(), SplitConfig(train=0.34, validation=0.33, test=0.33), seed=seed)
        assert rows["split"].head(3).n_unique() == 1
        assert report["grouping"]["groups"] == len(filler) + 1
    # without prompt grouping only the dup_cluster ties hold: row 2 goes its own way for some seed
    apart = [
        assign_splits(frame.lazy(), SplitConfig(train=0.34, validation=0.33, test=0.33, group_prompts="off"), seed=seed)[0]["split"]
        for seed in range(8)
    ]
    assert any(split[1] != split[2] for split in apart) and all(split[0] == split[1] for split in apart)
