"""Filter presets on hand-written data in real shapes: short-answer QA, casual chat, code, and the
stage's refusals (no tag stage before it, unknown rules, unknown language codes), through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import yaml

from curate.cli import main
from curate.runner import load_manifest

# Trivia, arithmetic, extraction and label questions with the one-word / number answers real QA sets have.
CLEAN_QA = [
    ("What is the capital of France?", "Paris"),
    ("What is 7 times 8?", "56"),
    ("Who wrote Hamlet?", "Shakespeare"),
    ("How many legs does a spider have?", "8"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("Which element has the chemical symbol Fe?", "Iron"),
    ("What year did the Second World War end?", "1945"),
    ("What is the square root of 81?", "9"),
    ("Capital of Peru?", "Lima"),
    ("What is 12 + 30?", "42"),
    ("Which ocean is the largest?", "Pacific"),
    ("What is the boiling point of water in Celsius?", "100"),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("What gas do plants absorb from the air?", "Carbon dioxide"),
    ("How many continents are there?", "7"),
    ("What is the smallest prime number?", "2"),
    ("Translate 'cat' into Spanish.", "gato"),
    ("Is the sentiment of 'I loved this film' positive or negative?", "positive"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("What is 15% of 200?", "30"),
    ("In which country are the pyramids of Giza?", "Egypt"),
    ("What is the chemical formula of water?", "H2O"),
    ("Answer with A, B, C or D. Which is a mammal? A) shark B) whale C) trout D) squid", "B"),
    ("How many sides does a hexagon have?", "6"),
    ("What is the longest river in Africa?", "Nile"),
    ("Who discovered penicillin?", "Alexander Fleming"),
    ("What currency is used in Japan?", "Yen"),
    ("What is 9 squared?", "81"),
    ("Extract the year: 'The bridge opened in 1932 after six years of work.'", "1932"),
    ("What is the freezing point of water in Fahrenheit?", "32"),
    ("Which instrument has 88 keys?", "Piano"),
    ("What is the capital of Canada?", "Ottawa"),
    ("How many minutes are in an hour?", "60"),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong"),
    ("What is 1000 times 1000?", "1000000"),
    ("Which language has the most native speakers?", "Mandarin"),
    ("What is the hardest natural substance?", "Diamond"),
    ("Quelle est la capitale de l'Italie ?", "Rome"),
    ("Wie viele Tage hat eine Woche?", "Sieben"),
    ("True or false: the Sun is a star.", "True"),
]
PLANTED_QA = {
    "…": "empty_answer",
    "???": "empty_answer",
    "aaaaaaaaaaaaaaaa": "repeated_chars",
    "Nooooooooooooooooo": "repeated_chars",
    "As an AI language model, I cannot answer questions about geography.": "boilerplate",
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def run_filter(tmp_path: Path, data: Path, sections: dict, name: str = "out") -> tuple[int, Path]:
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(sections))
    out = tmp_path / name
    return main(["filter", str(data), "--out", str(out), "--config", str(config), "--quiet"]), out


def answers(out: Path, part: str) -> list[str]:
    path = out / "filter" / f"{part}.parquet"
    frame = pl.read_parquet(path)
    return frame.select(pl.col("messages").list.last().struct.field("content")).to_series().to_list()


def test_short_answer_keeps_clean_qa_and_drops_planted_junk(tmp_path):
    rows = [{"instruction": q, "output": a} for q, a in CLEAN_QA]
    rows += [{"instruction": "What is the capital of Spain?", "output": junk} for junk in PLANTED_QA]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    code, out = run_filter(tmp_path, data, {"filter": {"preset": "short_answer"}})
    assert code == 0
    kept = set(answers(out, "data"))
    clean_kept = [a for _, a in CLEAN_QA if a in kept]
    assert len(clean_kept) >= 0.95 * len(CLEAN_QA), sorted({a for _, a in CLEAN_QA} - kept)
    dropped = pl.read_parquet(out / "filter" / "dropped.parquet")
    by_answer = dict(zip(answers(out, "dropped"), dropped["reason"]))
    assert set(by_answer) == set(PLANTED_QA)
    assert {by_answer[a] for a, kind in PLANTED_QA.items() if kind == "empty_answer"} == {"min_answer_alnum_chars"}
    assert {by_answer[a] for a, kind in PLANTED_QA.items() if kind == "repeated_chars"} == {"max_answer_char_repeat_run"}
    assert by_answer[next(a for a, k in PLANTED_QA.items() if k == "boilerplate")] == "drop_refusals"


def test_chat_default_would_drop_the_same_qa(tmp_path):
    # Why the preset exists: the chat preset's word rules reject one-word answers.
    data = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": q, "output": a} for q, a in CLEAN_QA])
    code, out = run_filter(tmp_path, data, {"filter": {"preset": "chat", "languages": None}})
    assert code == 0
    assert len(answers(out, "data")) < 0.5 * len(CLEAN_QA)


def test_short_answer_with_a_language_keep_list(tmp_path):
    rows = [
        {"instruction": "What is the capital of France?", "output": "Paris"},
        {"instruction": "대한민국의 수도는 어디입니까? 한 단어로 답하세요.", "output": "서울"},
        {"instruction": "ما هي عاصمة مصر؟ أجب بكلمة واحدة من فضلك.", "output": "القاهرة"},
    ]
    data = write_jsonl(tmp_path / "qa.jsonl", rows)
    code, out = run_filter(tmp_path, data, {"filter": {"preset": "short_answer", "languages": ["en"]}})
    assert code == 0
    assert answers(out, "data") == ["Paris"]
    assert set(pl.read_parquet(out / "filter" / "dropped.parquet")["reason"]) == {"languages"}


CASUAL_CHAT = [
    ("hey are you coming tonight", "yeah def, be there around 8"),
    ("did you see the game lol", "omg yes that last goal was insane"),
    ("can you grab milk on the way home", "sure thing, anything else"),
    ("running late sorry", "no worries take your time"),
    ("what should we cook tomorrow", "maybe pasta? we still have tomatoes"),
    ("I finally finished the book", "nice!! how was the ending"),
    ("are we still on for saturday", "yep, see you at the park"),
    ("my train got cancelled again", "ugh that's so annoying, want me to pick you up"),
]


def test_chat_preset_keeps_unpunctuated_casual_lines(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"instruction": q, "output": a} for q, a in CASUAL_CHAT])
    code, out = run_filter(tmp_path, data, {"filter": {"preset": "chat"}})
    assert code == 0
    assert sorted(answers(out, "data")) == sorted(a for _, a in CASUAL_CHAT)


TRUNCATED = {
    "To reset the router, unplug it for ten seconds and then plug in the": "ends_on_connector",
    "Here is what to do:": "ends_on_comma_or_colon",
    "Use this:\n```python\nprint(sorted(items))": "unclosed_code_fence",
    "Your refund was approved on Monday. The money goes back to the card you paid with. Banks usually take "
    "three to five business days to show it. If it has not arrived by Friday, reply here and we will ask "
    "the payment provider for a trace number so you": "unfinished_last_sentence",
}


def test_drop_truncated_fires_on_evidence_only(tmp_path):
    rows = [{"instruction": "How do I fix this problem?", "output": reply} for reply in TRUNCATED]
    rows += [{"instruction": q, "output": a} for q, a in CASUAL_CHAT[:3]]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    code, out = run_filter(tmp_path, data, {"filter": {"preset": "chat", "languages": None}})
    assert code == 0
    assert sorted(answers(out, "data")) == sorted(a for _, a in CASUAL_CHAT[:3])
    tagged = pl.read_parquet(out / "tag" / "data.parquet")
    evidence = dict(zip(tagged.select(pl.col("messages").list.last().struct.field("content")).to_series(), tagged["assistant_truncation"]))
    assert {reply: evidence[reply] for reply in TRUNCATED} == TRUNCATED
    assert all(evidence[a] is None for _, a in CASUAL_CHAT[:3])


def test_override_disable_and_added_rule(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"instruction": q, "output": a} for q, a in CASUAL_CHAT])
    sections = {
        "filter": {
            "preset": "chat",
            "languages": None,
            "rules": [
                {"name": "min_last_assistant_words", "min": 6},  # override: only the bound changes
                {"name": "max_user_words", "column": "user_word_count", "max": 5},  # a new rule
            ],
            "disable": ["drop_truncated"],
        }
    }
    code, out = run_filter(tmp_path, data, sections)
    assert code == 0
    dropped = pl.read_parquet(out / "filter" / "dropped.parquet")
    reasons = dict(zip(answers(out, "dropped"), dropped["reason"]))
    expected = {}
    for q, a in CASUAL_CHAT:
        if len(a.split()) < 6:
            expected[a] = "min_last_assistant_words"
        elif len(q.split()) > 5:
            expected[a] = "max_user_words"
    assert reasons == expected
    stage = next(s for s in load_manifest(out)["stages"] if s["name"] == "filter")
    assert "drop_truncated" not in stage["report"]["rules"] and "max_user_words" in stage["report"]["rules"]


def _assert_one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def test_filter_without_tag_stage_is_a_one_line_error(tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"instruction": q, "output": a} for q, a in CASUAL_CHAT])
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({
        "name": "no-tag", "run_dir": str(tmp_path / "run"), "inputs": [{"path": str(data)}],
        "stages": [{"type": "filter"}],
    }))  # fmt: skip
    assert main(["run", str(pipeline), "--quiet"]) == 2
    _assert_one_line_error(capsys, "turn_structure_error", "`tag` stage")


def test_language_rule_without_language_id_names_the_tag_option(tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"instruction": q, "output": a} for q, a in CASUAL_CHAT])
    code, _ = run_filter(tmp_path, data, {"tag": {"language": None}, "filter": {"languages": ["en"]}})
    assert code == 2
    _assert_one_line_error(capsys, "'lang'", "language")


@pytest.mark.parametrize(
    "filter_config, needle",
    [
        ({"preset": "qa"}, "unknown preset"),
        ({"disable": ["no_such_rule"]}, "no_such_rule"),
        ({"rules": [{"name": "brand_new", "max": 3}]}, "brand_new"),
        ({"rules": [{"name": "brand_new", "column": "user_word_count"}]}, "no test"),
        ({"languages": ["xx"]}, "'xx'"),
        ({"rules": [{"name": "min_user_words", "min": "many"}]}, "rules.0.min"),
    ],
)
def test_bad_filter_configs_are_one_line_errors(tmp_path, capsys, filter_config, needle):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"instruction": "hello there friend", "output": "hi, how are you"}])
    code, _ = run_filter(tmp_path, data, {"filter": filter_config})
    assert code == 2
    _assert_one_line_error(capsys, needle)


def test_explain_prints_rule_and_preset(capsys):
    assert main(["filter", "--explain", "drop_truncated"]) == 0
    out = capsys.readouterr().out
    assert "assistant_truncation" in out and "chat" in out and "code" in out
    assert main(["filter", "--explain", "short_answer"]) == 0
    out = capsys.readouterr().out
    assert "max_answer_char_repeat_run" in out and "min_answer_alnum_chars" in out
    assert main(["filter", "--explain", "nope"]) == 2


def test_every_preset_rule_has_a_rationale():
    from curate.filters.thresholds import PRESETS, RuleSpec, preset_rules

    for preset in PRESETS:
        for rule in preset_rules(preset):
            spec = RuleSpec.model_validate(rule)
            assert spec.column and spec.why and len(spec.why) > 30, (preset, spec.name)


def test_all_dropped_run_warns_exits_zero_and_renders_report(tmp_path, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"instruction": q, "output": a} for q, a in CLEAN_QA[:6]])
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({
        "name": "all-dropped", "run_dir": str(tmp_path / "run"), "inputs": [{"path": str(data)}],
        "stages": [
            {"type": "dedup"}, {"type": "tag"},
            {"type": "filter", "config": {"rules": [{"name": "min_last_assistant_words", "min": 50}]}},
            {"type": "split", "config": {"train": 0.8, "validation": 0.1, "test": 0.1}},
        ],
    }))  # fmt: skip
    assert main(["run", str(pipeline), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "warning: no rows survived" in out and "filter: min_last_assistant_words (6)" in out
    page = (tmp_path / "run" / "report.html").read_text()
    assert "min_last_assistant_words" in page and "No rows survived" in page


def test_all_quarantined_run_still_renders_report(tmp_path, capsys):
    # Before: the report's cluster section died with a TypeError on an empty dedup output.
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "", "output": ""}\n{"instruction": "x", "output": ""}\n')
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({
        "name": "all-quarantined", "run_dir": str(tmp_path / "run"), "inputs": [{"path": str(data)}],
        "stages": [{"type": "dedup"}, {"type": "tag"}, {"type": "filter"}],
    }))  # fmt: skip
    assert main(["run", str(pipeline), "--quiet"]) == 0
    assert "warning: no rows survived" in capsys.readouterr().out
    assert (tmp_path / "run" / "report.html").exists()


def test_open_end_counts_as_cut_only_in_a_source_that_punctuates(tmp_path):
    topics = ["router", "invoice", "password", "parcel", "refund", "plan", "app", "account", "card", "email"]
    support = [{"instruction": f"Question {i} about my {t}?", "output": f"Thanks for asking about the {t}. It is fixed now."}
               for i, t in enumerate(topics * 3)]  # fmt: skip
    support[5]["output"] = "It usually takes about a week. We'll send you a confirmation"
    casual = [{"instruction": f"hey what about the {t} {i}", "output": f"idk maybe ask about the {t} later"} for i, t in enumerate(topics * 3)]
    casual[5]["output"] = "sounds good, see you then."
    write_jsonl(tmp_path / "support.jsonl", support)
    write_jsonl(tmp_path / "casual.jsonl", casual)
    config = tmp_path / "f.yaml"
    config.write_text(yaml.safe_dump({"filter": {"preset": "chat", "languages": None}}))
    out = tmp_path / "out"
    args = ["filter", str(tmp_path / "support.jsonl"), str(tmp_path / "casual.jsonl"), "--out", str(out), "--config", str(config), "--quiet"]
    assert main(args) == 0
    dropped = pl.read_parquet(out / "filter" / "dropped.parquet")
    assert answers(out, "dropped") == ["It usually takes about a week. We'll send you a confirmation"]
    assert dropped["reason"].to_list() == ["drop_truncated"]
    tagged = pl.read_parquet(out / "tag" / "data.parquet")
    assert tagged["assistant_truncation"].drop_nulls().to_list() == ["open_end_in_punctuated_source"]


def test_code_preset_keeps_code_answers_and_drops_an_unclosed_fence(tmp_path):
    rows = [
        {"instruction": "How do I reverse a list in Python?", "output": "```python\nitems.reverse()\n```"},
        {"instruction": "Length of a list in Python?", "output": "len(items)"},
        {"instruction": "Print hello in bash please", "output": "```bash\necho hello\n```"},
        {"instruction": "Sort a dict by value?", "output": "```python\nsorted(d.items(), key=lambda kv: kv[1])"},
    ]
    data = write_jsonl(tmp_path / "code.jsonl", rows)
    code, out = run_filter(tmp_path, data, {"filter": {"preset": "code"}})
    assert code == 0
    assert answers(out, "data") == [row["output"] for row in rows[:3]]
    assert pl.read_parquet(out / "filter" / "dropped.parquet")["reason"].to_list() == ["drop_truncated"]


def test_preference_preset_judges_chosen_not_rejected(tmp_path):
    rows = [
        {"prompt": "How do I reset my password?", "chosen": "Open Settings, choose Security and press Reset.",
         "rejected": "As an AI language model, I cannot help with that"},
        {"prompt": "Can I get a refund for my order?", "chosen": "As an AI language model, I cannot do that.",
         "rejected": "Yes, refunds are possible within 30 days."},
        {"prompt": "Is there a dark mode?", "chosen": "Yes, under Settings, Appearance.", "rejected": "Yes, under Settings, Appearance."},
    ]  # fmt: skip
    data = write_jsonl(tmp_path / "pref.jsonl", rows)
    code, out = run_filter(tmp_path, data, {"filter": {"preset": "preference"}})
    assert code == 0
    kept = pl.read_parquet(out / "filter" / "data.parquet")
    assert kept.select(pl.col("chosen").list.last().struct.field("content")).to_series().to_list() == [rows[0]["chosen"]]
    dropped = pl.read_parquet(out / "filter" / "dropped.parquet")
    assert sorted(dropped["reason"].to_list()) == ["drop_refusals", "drop_turn_structure_errors"]
