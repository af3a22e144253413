"""Task metrics beyond loss: greedy replies of base and adapter to validation prompts, scored against the
reference answers with exact match, token F1 (SQuAD's definitions) and ROUGE-L (LCS F-measure)."""

from __future__ import annotations

import re
import string
from collections import Counter

import torch

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_WORD = re.compile(r"\w+")


def normalize_answer(text: str) -> list[str]:
    """SQuAD's normalization, as tokens: lower case, punctuation and the articles a/an/the removed."""
    return _ARTICLES.sub(" ", _PUNCTUATION.sub(" ", text.lower())).split()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall over the normalized tokens (multiset overlap)."""
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def longest_common_subsequence(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure over lower-cased word tokens (no stemming)."""
    pred, ref = _WORD.findall(prediction.lower()), _WORD.findall(reference.lower())
    if not pred or not ref:
        return float(pred == ref)
    lcs = longest_common_subsequence(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


METRICS = {"exact_match": exact_match, "token_f1": token_f1, "rouge_l": rouge_l}


def prompts_and_references(conversations: list[list[dict]]) -> list[tuple[list[dict], str]]:
    """(messages before the last assistant turn, that turn's text) for every conversation ending in one."""
    pairs = []
    for messages in conversations:
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is not None and last > 0:
            pairs.append((messages[:last], messages[last]["content"]))
    return pairs


def _stop_ids(model, tokenizer) -> list[int]:
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


@torch.no_grad()
def greedy_replies(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int, device) -> list[str]:
    """Greedy continuations of each chat prompt, `batch_size` prompts at a time (left-padded)."""
    pad = tokenizer.pad_token_id
    encoded = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"] for p in prompts]
    replies = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + list(ids) for ids in chunk], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=_stop_ids(model, tokenizer), use_cache=True)  # fmt: skip
        replies += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return replies


def _scores(replies: list[str], references: list[str]) -> dict:
    return {name: sum(fn(r, ref) for r, ref in zip(replies, references)) / len(references) for name, fn in METRICS.items()}


def task_metrics(peft_model, tokenizer, conversations, max_new_tokens: int, batch_size: int, device, examples: int = 3) -> dict:
    """Exact match / token F1 / ROUGE-L of base (adapter disabled) and adapter on the same prompts."""
    pairs = prompts_and_references(conversations)
    if not pairs:
        return {}
    prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
    was_training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter():
            base = greedy_replies(peft_model, tokenizer, prompts, max_new_tokens, batch_size, device)
        tuned = greedy_replies(peft_model, tokenizer, prompts, max_new_tokens, batch_size, device)
    finally:
        peft_model.train(was_training)
    rows = [{"prompt": p[-1]["content"], "reference": ref, "base": b, "adapter": a}
            for p, ref, b, a in zip(prompts[:examples], references, base, tuned)]  # fmt: skip
    return {"prompts": len(pairs), "max_new_tokens": max_new_tokens, "base": _scores(base, references),
            "adapter": _scores(tuned, references), "examples": rows}  # fmt: skip
