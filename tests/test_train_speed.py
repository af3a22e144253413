"""The targets-only LM head: the loss and LoRA gradients equal the full-head ones (through the logits, and
fused into the cross-entropy), and training through the CLI projects only the positions that predict a target."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from train.cli import main
from train.config import LoraSettings, ModelConfig
from train.data import load_sft_split
from train.models import add_lora, load_base_model, load_tokenizer
from train.packing import pack_batch, packed_causal_lm_loss, packed_forward, packed_lm_loss, plan_packing, use_fused_head_loss

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import one_torch_thread  # noqa: E402,F401  (autouse fixture)
from train_helpers import make_tiny_model, sft_conversations, write_sft_split  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed")
    model = make_tiny_model(root / "model")
    sft = write_sft_split(root / "sft", sft_conversations(12), sft_conversations(4, offset=100))
    return {"model": model, "sft": sft}


def _lora_model_and_batch(tiny):
    config = ModelConfig(path=str(tiny["model"]))
    tokenizer = load_tokenizer(config)
    data = load_sft_split(tokenizer, tiny["sft"], "train", None)
    plan = plan_packing(data.lengths, 96, "truncate")
    model = add_lora(load_base_model(config), LoraSettings(r=4, alpha=8, dropout=0.0, target_modules="all-linear"), 0)
    # LoRA B starts at zero: move it so the adapter changes the logits and every LoRA gradient is non-trivial.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.train()
    batch = pack_batch(data.tokens, data.target_mask, data.offsets, plan, slice(0, 3), pad_id=tokenizer.pad_token_id, pad_to_multiple_of=8)
    return model, batch


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss_sum, n = loss_fn()
    (loss_sum / n.clamp(min=1)).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss_sum.detach(), int(n), grads


@pytest.mark.parametrize("chunk", [4096, 7])  # one cross-entropy piece, and many (the last one partial)
def test_targets_only_head_equals_full_head_loss_and_lora_gradients(tiny, monkeypatch, chunk):
    import train.packing.loss

    monkeypatch.setattr(train.packing.loss, "CE_CHUNK", chunk)
    model, batch = _lora_model_and_batch(tiny)
    inputs = batch.model_inputs("sdpa")
    assert 0 < int((batch.labels != -100).sum()) < batch.num_tokens  # assistant-only: a real subset
    assert int((batch.labels != -100).sum()) % 7 != 0

    def full_head():
        return packed_causal_lm_loss(packed_forward(model, **inputs).logits, batch.labels)

    ref_loss, ref_n, ref_grads = _loss_and_grads(model, full_head)
    loss, n, grads = _loss_and_grads(model, lambda: packed_lm_loss(model, inputs, batch.labels))
    assert n == ref_n
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in ref_grads:
        assert ref_grads[name].abs().max() > 0, name
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_batch_without_targets_gives_zero_loss_and_zero_gradients(tiny):
    model, batch = _lora_model_and_batch(tiny)
    no_targets = torch.full_like(batch.labels, -100)
    loss, n, grads = _loss_and_grads(model, lambda: packed_lm_loss(model, batch.model_inputs("sdpa"), no_targets))
    assert n == 0 and float(loss) == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in grads.values())


def test_training_projects_only_positions_that_predict_a_target(tiny, tmp_path):
    vocab = len(load_tokenizer(ModelConfig(path=str(tiny["model"]))))
    head_rows: list[tuple[int, ...]] = []

    def record_head_inputs(module, args):
        if module.training and isinstance(module, torch.nn.Linear) and module.out_features == vocab:
            head_rows.append(tuple(args[0].shape))

    handle = torch.nn.modules.module.register_module_forward_pre_hook(record_head_inputs)
    try:
        code = main(["sft", "--model", str(tiny["model"]), "--data", str(tiny["sft"]), "--output-dir", str(tmp_path / "run"),
                     "--max-steps", "2", "--no-progress"])  # fmt: skip
    finally:
        handle.remove()
    assert code == 0
    assert head_rows, "the LM head never ran in training mode"
    # Full-head training feeds [rows, width, hidden]; the targets-only head gets [n_targets, hidden].
    assert all(len(shape) == 2 for shape in head_rows), head_rows


def test_dpo_logps_from_kept_positions_equal_full_head_logps_and_gradients(tmp_path, tiny):
    from train.data import load_dpo_split
    from train.dpo import pack_pairs, pair_logps
    from train.packing import packed_dpo_logps, plan_dpo_packing
    from train_helpers import pref_pairs, write_pref_split

    model, _ = _lora_model_and_batch(tiny)
    tokenizer = load_tokenizer(ModelConfig(path=str(tiny["model"])))
    split = write_pref_split(tmp_path / "pref", pref_pairs(8), pref_pairs(2, offset=100))
    data = load_dpo_split(tokenizer, split, "train", None)
    plan = plan_dpo_packing(data.prompt_lens, data.chosen_lens, data.rejected_lens, 128, "truncate")
    batch = pack_pairs(data, plan, slice(0, 2), tokenizer.pad_token_id, torch.device("cpu"))
    assert batch.num_pairs >= 2

    def full_head():
        chosen, rejected = packed_dpo_logps(model(**batch.model_inputs("sdpa")).logits, batch)
        return (chosen - 0.5 * rejected).sum(), torch.tensor(1)

    def kept_only():
        chosen, rejected = pair_logps(model, batch)
        return (chosen - 0.5 * rejected).sum(), torch.tensor(1)

    ref_value, _, ref_grads = _loss_and_grads(model, full_head)
    value, _, grads = _loss_and_grads(model, kept_only)
    torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-4)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fused_head_loss_equals_the_logits_loss_and_lora_gradients(tiny):
    model, batch = _lora_model_and_batch(tiny)
    inputs = batch.model_inputs("sdpa")
    ref_loss, ref_n, ref_grads = _loss_and_grads(model, lambda: packed_causal_lm_loss(packed_forward(model, **inputs).logits, batch.labels))
    assert use_fused_head_loss(model) and model.training  # the canary passed and left the mode alone
    head = model.get_base_model().lm_head
    seen = []
    hook = head.register_forward_hook(lambda module, args, out: seen.append(out.shape[-1]))
    loss, n, grads = _loss_and_grads(model, lambda: packed_lm_loss(model, inputs, batch.labels))
    hook.remove()
    assert seen == [head.in_features]  # the head handed back hidden states: no logits were computed
    assert "forward" not in vars(head)  # and its own forward is back
    assert n == ref_n
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for name in ref_grads:
        assert ref_grads[name].abs().max() > 0, name
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
