"""The fused training paths give peft's and the logits path's numbers: LoRA linears (train.fused_lora) and
the LM head fused into the cross-entropy (train.packing.loss.linear_cross_entropy_sum; the whole SFT loss
through it: tests/test_train_speed.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear

from train.config import LoraSettings, ModelConfig
from train.fused_lora import FusedLoraLinear, fuse_lora_layers
from train.models import add_lora, load_adapter, load_base_model
from train.packing import linear_cross_entropy_sum, packed_causal_lm_loss, packed_forward, packed_lm_loss, use_fused_head_loss

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import one_torch_thread  # noqa: E402,F401  (autouse fixture)
from train_helpers import make_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    return {"model": make_tiny_model(root / "model")}


class Block(torch.nn.Module):
    """Two linears, one with a bias, the second fed by the first (so input gradients flow through LoRA)."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(24, 40, bias=True)
        self.down = torch.nn.Linear(40, 16, bias=False)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


def _peft_pair(dropout: float, seed: int = 0):
    """The same LoRA model twice: peft's own layers, and the fused ones (B moved off zero)."""
    models = []
    for fused in (False, True):
        torch.manual_seed(seed)
        model = get_peft_model(Block(), LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout, target_modules=["up", "down"]))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        if fused:
            assert fuse_lora_layers(model) == 2
        models.append(model.train())
    return models


def _forward_backward(model, x, seed: int):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # the same dropout masks on both sides: each layer draws once, in the same order
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).square().sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_equals_peft_outputs_and_every_gradient(dropout):
    reference, fused = _peft_pair(dropout)
    x = torch.randn(3, 7, 24)
    ref_out, ref_dx, ref_grads = _forward_backward(reference, x, seed=5)
    out, dx, grads = _forward_backward(fused, x, seed=5)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and {n for n in grads if "lora_" in n} == set(grads)
    for name in ref_grads:
        assert ref_grads[name].abs().max() > 0, name
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fused_lora_skips_the_input_gradient_nobody_needs():
    _, fused = _peft_pair(0.0)
    out = fused(torch.randn(2, 5, 24))  # an input without requires_grad, as the embeddings' output is
    out.sum().backward()
    assert all(p.grad is not None for n, p in fused.named_parameters() if "lora_" in n)


def test_fused_lora_falls_back_to_peft_where_it_is_not_plain_lora():
    reference, fused = _peft_pair(0.0)
    x = torch.randn(2, 5, 24)
    with reference.disable_adapter(), fused.disable_adapter():  # the base model (DPO's reference)
        torch.testing.assert_close(fused(x), reference(x))
        torch.testing.assert_close(fused(x), reference.get_base_model()(x))
    for model in (reference, fused):  # a second adapter active beside the first
        torch.manual_seed(1)
        model.add_adapter("second", LoraConfig(r=2, lora_alpha=2, target_modules=["up", "down"], init_lora_weights=False))
        model.base_model.set_adapter(["default", "second"])
    torch.testing.assert_close(fused(x), reference(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(fused(x), reference(x))
    fused.base_model.set_adapter("default")
    reference.base_model.set_adapter("default")
    expected = reference(x)
    fused.merge_adapter()
    torch.testing.assert_close(fused(x), expected, rtol=1e-5, atol=1e-5)


def test_trainer_models_run_fused_and_their_adapters_load_in_plain_peft(tiny, tmp_path):
    config = ModelConfig(path=str(tiny["model"]))
    model = add_lora(load_base_model(config), LoraSettings(r=4, alpha=8, dropout=0.05, target_modules="all-linear"), 0)
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert layers and all(type(m) is FusedLoraLinear for m in layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "adapter")
    plain = PeftModel.from_pretrained(load_base_model(config), tmp_path / "adapter")  # peft alone, nothing fused
    assert all(type(m) is LoraLinear for m in plain.modules() if isinstance(m, LoraLinear))
    loaded = load_adapter(load_base_model(config), tmp_path / "adapter")
    assert all(type(m) is FusedLoraLinear for m in loaded.modules() if isinstance(m, LoraLinear))
    ids = torch.randint(0, 100, (2, 9))
    expected = plain.eval()(input_ids=ids).logits
    torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.eval()(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_elements", [1 << 24, 3 * 50])  # one chunk, and 3-row chunks (the last partial)
def test_linear_cross_entropy_sum_equals_cross_entropy_over_logits(monkeypatch, chunk_elements):
    import train.packing.loss

    monkeypatch.setattr(train.packing.loss, "HEAD_CHUNK_ELEMENTS", chunk_elements)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(50, 16, generator=gen)
    hidden = (torch.randn(11, 16, generator=gen) * 3).requires_grad_(True)  # wide logits: the max shift matters
    targets = torch.randint(0, 50, (11,), generator=gen)
    expected = F.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    (expected * 0.5).backward()
    expected_grad = hidden.grad.clone()
    hidden.grad = None
    loss = linear_cross_entropy_sum(hidden, weight, targets)
    (loss * 0.5).backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(hidden.grad, expected_grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation: the same loss, no gradient work
        torch.testing.assert_close(linear_cross_entropy_sum(hidden, weight, targets), loss)
    empty = hidden[:0]
    assert float(linear_cross_entropy_sum(empty, weight, targets[:0]).detach()) == 0.0


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_a_model_that_soft_caps_its_logits_keeps_the_logits_path(softcap):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16, final_logit_softcapping=softcap, attn_implementation="eager")  # fmt: skip
    model = get_peft_model(Gemma2ForCausalLM(config), LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    fuse_lora_layers(model)
    # Soft-capped logits are not the head's product: the canary sees it. Without the cap the same model fuses.
    assert use_fused_head_loss(model) == (softcap is None)
    ids = torch.randint(0, 96, (1, 12))
    labels = ids.clone()
    labels[0, :4] = -100
    inputs = dict(input_ids=ids, position_ids=torch.arange(12)[None])
    loss, _ = packed_lm_loss(model, inputs, labels)
    expected, _ = packed_causal_lm_loss(packed_forward(model, **inputs).logits, labels)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
