"""Task metrics beyond loss: the metric functions on hand-computed examples, and `train eval` scoring
greedy replies of base and adapter against the validation references."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from train.cli import main
from train.generate import exact_match, longest_common_subsequence, prompts_and_references, rouge_l, token_f1

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import one_torch_thread  # noqa: E402,F401  (autouse fixture)
from train_helpers import make_tiny_model, sft_conversations, write_sft_split  # noqa: E402


def test_exact_match_normalizes_case_punctuation_and_articles():
    assert exact_match("The Cat!", "cat") == 1.0
    assert exact_match("  a  cat. ", "CAT") == 1.0
    assert exact_match("cat sat", "cat") == 0.0
    assert exact_match("", "") == 1.0


def test_token_f1_hand_computed():
    # normalized: [cat, sat, on, mat] vs [cat, on, mat]: 3 common, P = 3/4, R = 1, F1 = 6/7
    assert token_f1("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # multiset overlap: "the" is an article (dropped); [dog, dog] vs [dog]: 1 common, P = 1/2, R = 1
    assert token_f1("dog dog", "the dog") == pytest.approx(2 / 3)
    assert token_f1("blue", "red") == 0.0
    assert token_f1("", "red") == 0.0
    assert token_f1("", "") == 1.0


def test_rouge_l_hand_computed():
    assert longest_common_subsequence(list("abcde"), list("ace")) == 3
    assert longest_common_subsequence(list("abc"), list("xyz")) == 0
    # LCS of [police, killed, the, gunman] and [the, gunman, police, killed] is 2: P = R = F = 1/2
    assert rouge_l("police killed the gunman", "the gunman police killed") == pytest.approx(0.5)
    # [open, settings, then, returns] vs [open, settings, returns]: LCS 3, P = 3/4, R = 1, F = 6/7
    assert rouge_l("Open Settings, then returns.", "open settings returns") == pytest.approx(6 / 7)
    assert rouge_l("same words", "Same words!") == 1.0
    assert rouge_l("", "x") == 0.0


def test_prompts_and_references_take_the_last_assistant_turn():
    convo = [{"role": "system", "content": "s"}, {"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
             {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]  # fmt: skip
    [(prompt, reference)] = prompts_and_references([convo, convo[:2]])  # the second has no reply: skipped
    assert reference == "a2" and prompt == convo[:4]


def test_cli_eval_scores_base_and_adapter_side_by_side(tmp_path, capsys):
    model = make_tiny_model(tmp_path / "model")
    memo = sft_conversations(4)
    split = write_sft_split(tmp_path / "memo", memo, memo)  # validation = train: the adapter can learn the answers
    common = ["--model", str(model), "--data", str(split), "--output-dir", str(tmp_path / "run"), "--max-seq-len", "128"]
    assert main(["sft", *common, "--max-steps", "40", "--lr", "0.01", "--no-progress", "--set", "eval.at_end=false"]) == 0
    capsys.readouterr()
    assert main(["eval", *common, "--task-prompts", "3", "--max-new-tokens", "24", "--set", "eval.samples=0", "--json", str(tmp_path / "e.json")]) == 0
    printed = capsys.readouterr().out
    assert "task metrics" in printed and "rouge_l" in printed and "token_f1" in printed
    task = json.loads((tmp_path / "e.json").read_text())["task_metrics"]
    assert task["prompts"] == 3 and task["max_new_tokens"] == 24
    for side in ("base", "adapter"):
        assert set(task[side]) == {"exact_match", "token_f1", "rouge_l"}
        assert all(0.0 <= v <= 1.0 for v in task[side].values())
    # A random base cannot answer; the adapter trained on these very conversations mostly can.
    assert task["adapter"]["rouge_l"] > task["base"]["rouge_l"] + 0.3
    [first, *_] = task["examples"]
    assert first["reference"] == memo[0][-1]["content"] and first["prompt"] == memo[0][-2]["content"]
    assert {"base", "adapter"} <= first.keys() and "task examples" in printed


def test_cli_eval_of_a_dpo_adapter_scores_against_the_chosen_reply(tmp_path):
    from train_helpers import pref_pairs, write_pref_split

    model = make_tiny_model(tmp_path / "model")
    validation = pref_pairs(2, offset=100)
    split = write_pref_split(tmp_path / "pref", pref_pairs(8), validation)
    common = ["--model", str(model), "--data", str(split), "--output-dir", str(tmp_path / "run"), "--max-seq-len", "128"]
    assert main(["dpo", *common, "--max-steps", "2", "--no-progress", "--set", "eval.at_end=false"]) == 0
    assert main(["eval", *common, "--task-prompts", "2", "--max-new-tokens", "4", "--set", "eval.samples=0", "--json", str(tmp_path / "e.json")]) == 0
    task = json.loads((tmp_path / "e.json").read_text())["task_metrics"]
    assert task["prompts"] == 2
    assert [row["reference"] for row in task["examples"]] == [pair["chosen"][0]["content"] for pair in validation]
