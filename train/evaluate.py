"""Validation metrics for the loop and `train eval`: the adapter against its own base model.

The base is the same weights with the adapter disabled (peft's `disable_adapter()`), so one model in
memory serves both sides of every comparison.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from train.dpo import batch_dpo_loss, pack_pairs, pair_logps
from train.errors import DataError
from train.packing import PACKED_SDPA, pack_batch, packed_lm_loss, without_padding


TASK_BATCH = 8  # prompts generated together: left-padded, so the batch costs about its longest prompt


def _autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def _row_limit(num_rows: int, max_rows: int | None) -> int:
    return num_rows if max_rows is None else min(num_rows, max_rows)


@torch.no_grad()
def sft_loss(model, data, plan, rows_per_batch: int, pad_id: int, device, max_rows=None, autocast_dtype=None):
    """Mean next-token loss over the target tokens of the first `max_rows` packed rows: (loss, targets)."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    try:
        tokens, mask, offsets = data.tokens.to(device), data.target_mask.to(device), data.offsets.to(device)
        for start in range(0, _row_limit(plan.num_rows, max_rows), rows_per_batch):
            stop = min(start + rows_per_batch, _row_limit(plan.num_rows, max_rows))
            batch = pack_batch(tokens, mask, offsets, plan, slice(start, stop), pad_id=pad_id, pad_to_multiple_of=8)
            if model.config._attn_implementation == PACKED_SDPA:  # as training runs it: one row, no padding
                batch = without_padding(batch)
            with _autocast(device, autocast_dtype):
                loss_sum, n = packed_lm_loss(model, batch.model_inputs(model.config._attn_implementation), batch.labels)
            total += loss_sum.double().cpu()
            count += int(n)
    finally:
        model.train(was_training)
    return (float(total / count) if count else float("nan")), count


@torch.no_grad()
def dpo_metrics(peft_model, data, plan, rows_per_batch: int, pad_id: int, device, dpo, max_rows=None, autocast_dtype=None):
    """Validation DPO loss (the run's `dpo.loss_type`), reward accuracy and margin of the adapter vs its
    base (the reference)."""
    was_training = peft_model.training
    peft_model.eval()
    losses, margins, policy_gap, base_gap = [], [], [], []
    try:
        for start in range(0, _row_limit(plan.num_rows, max_rows), rows_per_batch):
            stop = min(start + rows_per_batch, _row_limit(plan.num_rows, max_rows))
            batch = pack_pairs(data, plan, slice(start, stop), pad_id, device)
            pc, pr = pair_logps(peft_model, batch, autocast_dtype)
            with peft_model.disable_adapter():
                rc, rr = pair_logps(peft_model, batch, autocast_dtype)
            loss, cr, rj = batch_dpo_loss(dpo, batch, pc, pr, rc, rr)
            losses.append(loss.cpu())
            margins.append((cr - rj).cpu())
            policy_gap.append((pc - pr).cpu())
            base_gap.append((rc - rr).cpu())
    finally:
        peft_model.train(was_training)
    if not losses:
        return {}
    cat = lambda xs: torch.cat(xs).double()  # noqa: E731
    margin = cat(margins)
    return {
        "val_loss": float(cat(losses).mean()),
        "val_reward_margin": float(margin.mean()),
        "val_reward_accuracy": float((margin > 0).double().mean()),
        "val_logp_gap_adapter": float(cat(policy_gap).mean()),
        "val_logp_gap_base": float(cat(base_gap).mean()),
        "val_pairs": int(margin.shape[0]),
    }


def base_vs_adapter_sft(peft_model, data, plan, rows_per_batch, pad_id, device, max_rows=None, autocast_dtype=None):
    """Validation loss of the base (adapter disabled) and of the adapter, on the same packed rows."""
    with peft_model.disable_adapter():
        base, n = sft_loss(peft_model, data, plan, rows_per_batch, pad_id, device, max_rows, autocast_dtype)
    adapter, _ = sft_loss(peft_model, data, plan, rows_per_batch, pad_id, device, max_rows, autocast_dtype)
    return {"base_loss": base, "adapter_loss": adapter, "target_tokens": n}


@torch.no_grad()
def generate_side_by_side(peft_model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, device):
    """Greedy replies of base and adapter to the prompt part of each conversation (up to its last user turn)."""
    rows = []
    peft_model.eval()
    for messages in conversations:
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None:
            continue
        prompt = messages[: last_user + 1]
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        input_ids = ids["input_ids"].to(device)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id, use_cache=True)
        with peft_model.disable_adapter():
            base = peft_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        tuned = peft_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        decode = lambda out: tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True).strip()  # noqa: E731
        rows.append({"prompt": prompt[-1]["content"], "base": decode(base), "adapter": decode(tuned)})
    return rows


def run_eval(config, adapter_dir: str | Path, console=None, task_prompts: int = 0) -> dict:
    """`train eval`: base vs adapter on the validation split (and the optional general set), plus samples;
    with `task_prompts`, exact match / token F1 / ROUGE-L of greedy replies to that many validation prompts."""
    from train.data import load_dpo_split, load_sft_split, planner_overflow, read_split, set_chat_template
    from train.models import load_adapter, load_base_model, load_tokenizer
    from train.models import set_cpu_threads
    from train.packing import plan_dpo_packing, plan_packing, prepare_packed_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        set_cpu_threads(config.threads)
    tokenizer = load_tokenizer(config.model)
    set_chat_template(tokenizer, config.data.chat_template)
    overflow = planner_overflow(config.data.overflow)  # eval never refuses: too-long samples are left out
    model = load_adapter(load_base_model(config.model).to(device), adapter_dir).to(device)
    rows = config.optim.batch_rows
    pad = tokenizer.pad_token_id
    result: dict = {"adapter": str(adapter_dir)}
    split_dir = config.data.split_dir
    is_dpo = (Path(adapter_dir) / "train_mode.txt").is_file() and (Path(adapter_dir) / "train_mode.txt").read_text().strip() == "dpo"
    if is_dpo:
        data = load_dpo_split(tokenizer, split_dir, "validation", config.data.max_val_samples)
        if data is not None:
            plan = plan_dpo_packing(data.prompt_lens, data.chosen_lens, data.rejected_lens, config.data.max_seq_len, overflow)
            result["validation"] = dpo_metrics(model, data, plan, rows, pad, device, config.dpo, config.eval.max_rows)
    else:
        # Losses as training measured them: attention per packed sample (the masked row gives the same
        # loss up to rounding, at several times the attention compute) and the fused head loss.
        prepare_packed_model(model)
        data = load_sft_split(tokenizer, split_dir, "validation", config.data.max_val_samples, config.data.completion_only_loss)
        if data is not None:
            plan = plan_packing(data.lengths, config.data.max_seq_len, overflow)
            result["validation"] = base_vs_adapter_sft(model, data, plan, rows, pad, device, config.eval.max_rows)
    if config.eval.general_set:
        general = load_sft_split(tokenizer, config.eval.general_set, "validation", config.data.max_val_samples)
        if general is None:
            general = load_sft_split(tokenizer, config.eval.general_set, "train", config.data.max_val_samples)
        if general is None:
            raise DataError(f"{config.eval.general_set}: eval.general_set has no sft rows")
        plan = plan_packing(general.lengths, config.data.max_seq_len, overflow)
        result["general"] = base_vs_adapter_sft(model, general, plan, rows, pad, device, config.eval.max_rows)
    if task_prompts:
        from train.generate import task_metrics

        plain = lambda messages: [{"role": m["role"], "content": m["content"]} for m in messages]  # noqa: E731
        if is_dpo:  # the reference answer of a preference row is its chosen reply
            frame = read_split(split_dir, "validation", ["prompt", "chosen"], "preference", task_prompts)
            conversations = [plain(p) + plain(c) for p, c in zip(frame.get_column("prompt").to_list(), frame.get_column("chosen").to_list())]
        else:
            frame = read_split(split_dir, "validation", ["messages"], "sft", task_prompts)
            conversations = [plain(c) for c in frame.get_column("messages").to_list()]
        result["task_metrics"] = task_metrics(model, tokenizer, conversations, config.eval.max_new_tokens, TASK_BATCH, device)
    if config.eval.samples:
        column = "prompt" if is_dpo else "messages"
        frame = read_split(split_dir, "validation", [column], "preference" if is_dpo else "sft", config.eval.samples)
        conversations = [[{"role": m["role"], "content": m["content"]} for m in c] for c in frame.get_column(column).to_list()]
        result["samples"] = generate_side_by_side(model, tokenizer, conversations, config.eval.max_new_tokens, device)
    return result

