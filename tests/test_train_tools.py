"""Tool-calling conversations from curate reach the trainer: rendered by a template that knows tools,
or by the documented plain fallback; calls are training targets, tool results never are."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from curate.cli import main as curate_main
from train.data import load_sft_split, template_renders_tools

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import make_tokenizer  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "real_shapes" / "openai_tools.jsonl"

# ChatML with tools, in the way Qwen-style templates write them.
TOOL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}[call {{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tool_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    shutil.copy(FIXTURE, root / FIXTURE.name)
    assert curate_main(["ingest", str(root / FIXTURE.name), "--format", "openai", "--out", str(root / "run")]) == 0
    return root / "run" / "ingest" / "data.parquet", make_tokenizer(root / "tok")


def _target_and_context(tokenizer, data, sample: int) -> tuple[str, str]:
    a, n = int(data.offsets[sample]), int(data.lengths[sample])
    ids, mask = data.tokens[a : a + n].tolist(), data.target_mask[a : a + n].tolist()
    target = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    context = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    return target, context


def test_plain_fallback_when_the_template_ignores_tools(tool_split):
    split, tokenizer = tool_split
    assert not template_renders_tools(tokenizer)  # the test template writes role + content only
    data = load_sft_split(tokenizer, split, "train")
    target, context = _target_and_context(tokenizer, data, 0)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in target
    assert "It is 18 °C in Paris." in target
    assert '<tool_response>\n{"temp_c": 18}\n</tool_response>' in context and "temp_c" not in target


def test_native_rendering_when_the_template_knows_tools(tool_split):
    split, tokenizer = tool_split
    before, tokenizer.chat_template = tokenizer.chat_template, TOOL_TEMPLATE
    tokenizer._curate_renders_tools = None
    try:
        assert template_renders_tools(tokenizer)
        data = load_sft_split(tokenizer, split, "train")
        target, context = _target_and_context(tokenizer, data, 1)
        assert '[call add {"a": 2, "b": 3}]' in target  # arguments handed over as an object
        assert "2+3 = 5." in target
        assert "<|im_start|>tool\n5<|im_end|>" in context
    finally:
        tokenizer.chat_template, tokenizer._curate_renders_tools = before, None
