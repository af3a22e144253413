"""Read a split directory from `curate split`, render each conversation with the model's chat
template, tokenize in batch, and mark which tokens are training targets.

A split directory holds `train-*.parquet` and `validation-*.parquet` with the canonical columns: SFT rows
carry `messages`, preference rows carry `prompt`, `chosen`, `rejected`. Nothing else from curate/ is read.

Targets are found without a template-specific parser: the text of assistant turn i spans from the end of
`render(messages[:i], add_generation_prompt=True)` to the end of `render(messages[:i+1])`, so the
template's own end-of-turn token (e.g. `<|im_end|>`) is learned and every prompt token is masked. A
template that is not prefix-consistent (later turns rewrite earlier text) is reported, not guessed at.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch

from train.errors import DataError

SPLITS = ("train", "validation")


def split_files(split_dir: str | Path, split: str) -> list[Path]:
    split_dir = Path(split_dir)
    if split_dir.is_file() and split_dir.suffix == ".parquet":
        return [split_dir]
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: split directory not found (run `curate split` first)")
    return sorted(split_dir.glob(f"{split}-*.parquet")) + sorted(split_dir.glob(f"{split}.parquet"))


def _is_messages(dtype) -> bool:
    """A list of structs with string `role` and `content` (other fields are allowed and ignored)."""
    inner = getattr(dtype, "inner", None)
    fields = {f.name: f.dtype for f in getattr(inner, "fields", [])} if isinstance(dtype, pl.List) else {}
    return fields.get("role") == pl.String and fields.get("content") == pl.String


def _read_parquet_file(path: Path, columns: list[str], kind: str | None) -> pl.DataFrame:
    """`columns` of one Parquet file (only those are read), filtered to `kind`; a damaged or truncated
    file, or one without the canonical columns, is a DataError naming it."""
    try:
        schema = pl.read_parquet_schema(path)
        missing = [c for c in columns if c not in schema]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; expected canonical {kind or ''} records")
        wanted = columns + (["kind"] if kind is not None and "kind" in schema and "kind" not in columns else [])
        frame = pl.read_parquet(path, columns=wanted, glob=False)
    except DataError:
        raise
    except (pl.exceptions.PolarsError, pl.exceptions.PanicException, OSError, ValueError) as error:
        raise DataError(f"{path}: not a readable Parquet file ({type(error).__name__}: {' '.join(str(error).split())[:160]})") from None
    for column in columns:
        if not _is_messages(frame.schema[column]):
            raise DataError(f"{path}: column {column!r} is {frame.schema[column]}, expected a list of {{role, content}} strings")
    if "kind" in frame.columns and "kind" not in columns:
        frame = frame.filter(pl.col("kind") == kind).drop("kind")
    # {role, content, tools}: `tools` holds a turn's tool_calls / tool_call_id as JSON text, so shards with
    # and without tool fields (older files) concatenate.
    return frame.with_columns(pl.col(c).list.eval(_with_tool_json(frame.schema[c].inner)) for c in columns)


TOOL_FIELDS = ("tool_calls", "tool_call_id")


def _with_tool_json(message_dtype) -> pl.Expr:
    present = [f.name for f in message_dtype.fields if f.name in TOOL_FIELDS]
    element = pl.element().struct
    if present:
        is_set = pl.any_horizontal(*[element.field(name).is_not_null() for name in present])
        tools = pl.when(is_set).then(pl.struct(*[element.field(name) for name in present]).struct.json_encode())
    else:
        tools = pl.lit(None, dtype=pl.String)
    return pl.struct(element.field("role"), element.field("content"), tools.alias("tools"))


def read_split(split_dir: str | Path, split: str, columns: list[str], kind: str | None, limit: int | None = None) -> pl.DataFrame:
    """Rows of one split with `columns`; `kind` ('sft'/'preference') keeps only that kind if a `kind` column exists."""
    files = split_files(split_dir, split)
    if not files:
        if split == "train":
            raise DataError(f"{split_dir}: no {split}-*.parquet files")
        return pl.DataFrame({c: [] for c in columns})
    frames = []
    for path in files:
        frame = _read_parquet_file(path, columns, kind)
        frames.append(frame)
        if limit is not None and sum(f.height for f in frames) >= limit:
            break
    frame = pl.concat(frames)
    return frame.head(limit) if limit is not None else frame


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if any("tool_calls" in m or m["role"] == "tool" for m in messages) and not template_renders_tools(tokenizer):
        messages = plain_tool_messages(messages)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


_PROBE_NAME, _PROBE_RESULT = "probe_fn_7f3a", "probe_result_7f3a"


def template_renders_tools(tokenizer) -> bool:
    """Whether the chat template writes tool calls and tool results: a probe conversation is rendered
    and both must appear (a template that ignores `tool_calls` would silently drop the call)."""
    cached = getattr(tokenizer, "_curate_renders_tools", None)
    if cached is not None:
        return cached
    probe = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c0", "type": "function", "function": {"name": _PROBE_NAME, "arguments": {"x": 1}}}]},
        {"role": "tool", "content": _PROBE_RESULT, "tool_call_id": "c0"},
        {"role": "assistant", "content": "a"},
    ]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False)
        renders = _PROBE_NAME in text and _PROBE_RESULT in text
    except Exception:  # templates raise on roles they do not know (jinja2 exceptions, ValueError)
        renders = False
    try:
        tokenizer._curate_renders_tools = renders
    except AttributeError:
        pass
    return renders


def plain_tool_messages(messages: list[dict]) -> list[dict]:
    """The documented fallback for templates without tool support (docs/formats.md): an assistant turn's
    calls are appended to its text as `<tool_call>{"name": ..., "arguments": ...}</tool_call>` lines, and
    consecutive tool results become one user turn of `<tool_response>...</tool_response>` blocks (the
    Hermes / Qwen convention), so the model learns to write calls and never learns the results."""
    out: list[dict] = []
    for message in messages:
        if message["role"] == "tool":
            block = f"<tool_response>\n{message['content']}\n</tool_response>"
            if out and out[-1].get("_tool_results"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_results": True})
            continue
        calls = message.get("tool_calls") or []
        lines = [message["content"]] if message["content"] else []
        for call in calls:
            function = call["function"]
            payload = json.dumps({"name": function["name"], "arguments": function["arguments"]}, ensure_ascii=False)
            lines.append(f"<tool_call>\n{payload}\n</tool_call>")
        out.append({"role": message["role"], "content": "\n".join(lines)})
    return [{"role": m["role"], "content": m["content"]} for m in out]


def _as_messages(value, where: str) -> list[dict]:
    if any(m is None or m["role"] is None or m["content"] is None for m in value):
        raise DataError(f"{where}: a null message, role or content")
    return [_as_message(m) for m in value]


def _as_message(m: dict) -> dict:
    """A canonical message as a chat template takes it: tool-call arguments as an object (what Hugging
    Face templates expect), the tool fields only where set."""
    message = {"role": m["role"], "content": m["content"]}
    tools = json.loads(m["tools"]) if m.get("tools") else {}
    if tools.get("tool_calls"):
        message["tool_calls"] = [_template_call(call) for call in tools["tool_calls"]]
    if tools.get("tool_call_id"):
        message["tool_call_id"] = tools["tool_call_id"]
    return message


def _template_call(call: dict) -> dict:
    arguments = call["function"]["arguments"]
    try:
        arguments = json.loads(arguments)
    except (TypeError, json.JSONDecodeError):
        pass  # not JSON text: handed on as written
    out = {"type": call.get("type") or "function", "function": {"name": call["function"]["name"], "arguments": arguments}}
    if call.get("id"):
        out["id"] = call["id"]
    return out


def _encode(tokenizer, texts: list[str]):
    """Batch tokenization with the Rust `tokenizers` backend: ids and char offsets, no special tokens
    added (the chat template already wrote them)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"tokenizer {type(tokenizer).__name__} has no fast (tokenizers) backend")
    return backend.encode_batch(texts, add_special_tokens=False)


@dataclass
class SftData:
    """All samples of one split, flat: `tokens`/`target_mask` concatenated, `offsets[i]` where sample i
    starts, `lengths[i]` its token count."""

    tokens: torch.Tensor
    target_mask: torch.Tensor
    offsets: torch.Tensor
    lengths: np.ndarray
    replay: dict | None = None  # what data.replay mixed in (train split only)

    @property
    def num_samples(self) -> int:
        return int(self.lengths.shape[0])

    def labels_of(self, i: int) -> list[int]:
        """The HF labels of sample i before packing: token id where a target, -100 elsewhere."""
        a, n = int(self.offsets[i]), int(self.lengths[i])
        ids, mask = self.tokens[a : a + n], self.target_mask[a : a + n]
        return torch.where(mask, ids, torch.full_like(ids, -100)).tolist()


def assistant_char_spans(tokenizer, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character spans of its assistant turns."""
    full = _render(tokenizer, messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise DataError(
                f"{where}: the chat template is not prefix-consistent at turn {i}; cannot locate assistant tokens"
            )
        if len(through) > len(before):
            spans.append((len(before), len(through)))
    return full, spans


def tokenize_sft(tokenizer, frame: pl.DataFrame, where: str = "data") -> SftData:
    """Render + tokenize every `messages` conversation; target_mask is True only on assistant tokens."""
    texts, span_starts, span_ends, span_conv = [], [], [], []
    for i, messages in enumerate(frame.get_column("messages").to_list()):
        if not messages:
            raise DataError(f"{where}: row {i}: empty messages")
        text, spans = assistant_char_spans(tokenizer, _as_messages(messages, f"{where}: row {i}"), f"{where}: row {i}")
        texts.append(text)
        for a, b in spans:
            span_starts.append(a)
            span_ends.append(b)
            span_conv.append(i)
    encodings = _encode(tokenizer, texts)
    lengths = np.fromiter((len(e.ids) for e in encodings), np.int64, len(encodings))
    ids = np.fromiter((t for e in encodings for t in e.ids), np.int64, int(lengths.sum()))
    tok_start = np.fromiter((o[0] for e in encodings for o in e.offsets), np.int64, int(lengths.sum()))
    # Global character coordinates: conversation i's text starts at char_base[i]; a token is a target
    # when its first character falls inside an assistant span (odd interval of the sorted boundaries).
    char_len = np.fromiter((len(t) + 1 for t in texts), np.int64, len(texts))
    char_base = np.concatenate([[0], np.cumsum(char_len)[:-1]])
    tok_conv = np.repeat(np.arange(len(texts)), lengths)
    global_start = char_base[tok_conv] + tok_start
    conv = np.asarray(span_conv, np.int64)
    bounds = np.stack(
        [char_base[conv] + np.asarray(span_starts, np.int64), char_base[conv] + np.asarray(span_ends, np.int64)], 1
    ).reshape(-1)
    target = (np.searchsorted(bounds, global_start, side="right") % 2) == 1
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return SftData(
        tokens=torch.from_numpy(ids),
        target_mask=torch.from_numpy(target),
        offsets=torch.from_numpy(offsets),
        lengths=lengths,
    )


@dataclass
class DpoData:
    """Preference pairs, flat: prompt, chosen and rejected token runs all live in `tokens`."""

    tokens: torch.Tensor
    prompt_offsets: torch.Tensor
    chosen_offsets: torch.Tensor
    rejected_offsets: torch.Tensor
    prompt_lens: np.ndarray
    chosen_lens: np.ndarray
    rejected_lens: np.ndarray
    replay: dict | None = None  # what data.replay mixed in (train split only)

    @property
    def num_samples(self) -> int:
        return int(self.prompt_lens.shape[0])


def tokenize_dpo(tokenizer, frame: pl.DataFrame, where: str = "data") -> DpoData:
    """Prompt rendered with the generation prompt; each response is the text the template adds for it."""
    prompts, chosen, rejected = [], [], []
    for i, (prompt, good, bad) in enumerate(
        zip(frame.get_column("prompt").to_list(), frame.get_column("chosen").to_list(), frame.get_column("rejected").to_list())
    ):
        if not prompt or not good or not bad:
            raise DataError(f"{where}: row {i}: preference rows need prompt, chosen and rejected")
        p = _as_messages(prompt, f"{where}: row {i}")
        prompt_text = _render(tokenizer, p, add_generation_prompt=True)
        responses = []
        for response in (good, bad):
            full = _render(tokenizer, p + _as_messages(response, f"{where}: row {i}"), add_generation_prompt=False)
            if not full.startswith(prompt_text):
                raise DataError(f"{where}: row {i}: the chat template is not prefix-consistent")
            responses.append(full[len(prompt_text) :])
        prompts.append(prompt_text)
        chosen.append(responses[0])
        rejected.append(responses[1])
    n = len(prompts)
    encodings = _encode(tokenizer, prompts + chosen + rejected)
    lengths = np.fromiter((len(e.ids) for e in encodings), np.int64, len(encodings))
    ids = np.fromiter((t for e in encodings for t in e.ids), np.int64, int(lengths.sum()))
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return DpoData(
        tokens=torch.from_numpy(ids),
        prompt_offsets=torch.from_numpy(offsets[:n].copy()),
        chosen_offsets=torch.from_numpy(offsets[n : 2 * n].copy()),
        rejected_offsets=torch.from_numpy(offsets[2 * n :].copy()),
        prompt_lens=lengths[:n].copy(),
        chosen_lens=lengths[n : 2 * n].copy(),
        rejected_lens=lengths[2 * n :].copy(),
    )


def mix_replay(frame: pl.DataFrame, replay, columns: list[str], kind: str, seed: int) -> tuple[pl.DataFrame, dict]:
    """`frame` (the new train rows) plus rows sampled with `seed` from the train split of `replay.split_dir`, so
    that they are `replay.fraction` of the result. A previous split with fewer rows than that is taken whole,
    and with `replay.upsample` topped up with copies sampled with replacement (every row at least once)."""
    previous = read_split(replay.split_dir, "train", columns, kind)
    if previous.height == 0:
        raise DataError(f"{replay.split_dir}: data.replay.split_dir has no {kind} rows in its train split")
    wanted = max(1, round(frame.height * replay.fraction / (1 - replay.fraction)))
    rng = np.random.default_rng(seed)
    if wanted <= previous.height:
        picked = np.sort(rng.choice(previous.height, size=wanted, replace=False))
    elif replay.upsample:
        picked = np.sort(np.concatenate([np.arange(previous.height), rng.choice(previous.height, size=wanted - previous.height)]))
    else:
        picked = np.arange(previous.height)
    count = len(picked)
    stats = {"split_dir": str(replay.split_dir), "fraction": replay.fraction, "new_rows": frame.height,
             "previous_rows": previous.height, "rows_replayed": count}  # fmt: skip
    if count > previous.height:
        stats["upsampled_copies"] = count - previous.height
    if count < wanted:
        stats["fraction_reached"] = round(count / (frame.height + count), 4)
    return pl.concat([frame, previous[picked]]), stats


def load_sft_split(tokenizer, split_dir, split: str, limit: int | None = None, completion_only: bool = True, replay=None, seed: int = 0) -> SftData | None:
    """One split, tokenized; `completion_only=False` makes every token a target (the packer still never
    labels the first token of a sample, which nothing before it predicts). `replay` (train only): see mix_replay."""
    frame = read_split(split_dir, split, ["messages"], "sft", limit)
    if frame.height == 0:
        return None
    stats = None
    if replay is not None and split == "train":
        frame, stats = mix_replay(frame, replay, ["messages"], "sft", seed)
    data = tokenize_sft(tokenizer, frame, where=f"{split_dir}/{split}")
    data.replay = stats
    if not completion_only:
        data.target_mask = torch.ones_like(data.target_mask)
    return data


def set_chat_template(tokenizer, choice: str | None) -> None:
    """`data.chat_template`: None keeps the tokenizer's own; a name from NAMED_TEMPLATES or a .jinja file
    replaces it (the adapter's saved tokenizer then carries the template it was trained with)."""
    import jinja2

    from train.config import NAMED_TEMPLATES

    if choice is None:
        return
    if choice in NAMED_TEMPLATES:
        tokenizer.chat_template = NAMED_TEMPLATES[choice]
        return
    path = Path(choice).expanduser()
    if not path.is_file():
        raise DataError(f"data.chat_template: {choice!r} is neither a named template ({', '.join(NAMED_TEMPLATES)}) nor a file")
    try:
        text = path.read_text(encoding="utf-8")
        jinja2.Environment().parse(text)
    except (OSError, UnicodeDecodeError, jinja2.TemplateSyntaxError) as error:
        raise DataError(f"{path}: not a readable Jinja chat template: {' '.join(str(error).split())[:200]}") from None
    tokenizer.chat_template = text


def load_dpo_split(tokenizer, split_dir, split: str, limit: int | None = None, replay=None, seed: int = 0) -> DpoData | None:
    columns = ["prompt", "chosen", "rejected"]
    frame = read_split(split_dir, split, columns, "preference", limit)
    if frame.height == 0:
        return None
    stats = None
    if replay is not None and split == "train":
        frame, stats = mix_replay(frame, replay, columns, "preference", seed)
    data = tokenize_dpo(tokenizer, frame, where=f"{split_dir}/{split}")
    data.replay = stats
    return data


# ------------------------------------------------------------------------------- what packing removes
def sft_target_stats(data: SftData, plan) -> dict:
    """Samples and target tokens of one split, and how many of them `max_seq_len` cuts (overflow
    "truncate": the tokens past the cut; "reject": whole samples). `target_tokens_left` is exactly what
    the packed batches will label."""
    mask = data.target_mask.numpy()
    offsets, lengths = data.offsets.numpy(), data.lengths
    prefix = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    total = prefix[offsets + lengths] - prefix[offsets]
    lost = np.zeros_like(total)
    if plan.num_rejected:
        lost[plan.rejected] = total[plan.rejected]
    else:
        cut_at = offsets + np.minimum(lengths, plan.max_seq_len)
        lost = prefix[offsets + lengths] - prefix[cut_at]
    return {
        "samples": data.num_samples,
        "target_tokens": int(total.sum()),
        "samples_cut": int(plan.num_truncated + plan.num_rejected),
        "samples_losing_targets": int((lost > 0).sum()),
        "target_tokens_removed": int(lost.sum()),
        "target_tokens_left": int(plan.target_counts(mask, offsets).sum()),
    }


def dpo_target_stats(data: DpoData, plan) -> dict:
    """The same for preference pairs: targets are the chosen and rejected response tokens."""
    total = data.chosen_lens + data.rejected_lens
    left = np.zeros_like(total)
    left[plan.sample] = plan.chosen_len + plan.rejected_len
    lost = total - left
    return {
        "samples": data.num_samples,
        "target_tokens": int(total.sum()),
        "samples_cut": int(plan.num_truncated + plan.num_rejected),
        "samples_losing_targets": int((lost > 0).sum()),
        "target_tokens_removed": int(lost.sum()),
        "target_tokens_left": int(left.sum()),
    }


def planner_overflow(overflow: str) -> str:
    """The packer's mode for `data.overflow`: it truncates or leaves samples out; 'reject' plans like
    'drop' so the loop can count (and refuse) what is too long."""
    return "truncate" if overflow == "truncate" else "reject"


def describe_cut(where: str, stats: dict, max_seq_len: int, overflow: str) -> str:
    """One line: how many samples and target tokens `data.max_seq_len` removed from a split."""
    verb = {"truncate": "truncates", "drop": "drops"}.get(overflow, "would cut")
    return (
        f"{where}: data.max_seq_len={max_seq_len} {verb} {stats['samples_cut']} of {stats['samples']} samples, "
        f"removing {stats['target_tokens_removed']} of {stats['target_tokens']} target tokens "
        f"({stats['samples_losing_targets']} samples lose targets, {stats['target_tokens_left']} target tokens left)"
    )
