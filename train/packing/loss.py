"""Token-level loss sums, so the trainer can normalize by the targets of a whole optimizer step."""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .attention import packed_forward, prepare_packed_attention

IGNORE_INDEX = -100
# Rows of logits turned into log-probabilities at a time: bounds the float32 copy of a bf16 head's
# output and the softmax buffer (4,096 x a 152k vocab = 2.4 GB in float32 otherwise for long batches).
CE_CHUNK = 4096
# Elements of one logits chunk in the fused head loss (64 MB in float32): 341 rows of a 49k vocabulary,
# 110 of a 152k one. Smaller chunks run the head's matmul with too few rows to reach the BLAS's rate.
HEAD_CHUNK_ELEMENTS = 1 << 24


def packed_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `(loss_sum, n_targets)`: summed next-token cross-entropy and the number of target tokens.

    labels use the HuggingFace unshifted convention (labels[t] is the token at t, -100 where not a
    target); the shift happens here. Both results are device tensors (no host sync). With gradient
    accumulation, divide each micro-batch's loss_sum by the step's total target count (e.g. the sum of
    `PackPlan.target_counts` over the step's micro-batches) before backward, so every target token
    weighs the same whatever micro-batch it fell in.
    """
    shift_logits = logits[..., :-1, :].reshape(-1, logits.shape[-1])
    shift_labels = labels[..., 1:].reshape(-1)
    loss_sum = F.cross_entropy(shift_logits.float(), shift_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (shift_labels != IGNORE_INDEX).sum()


def predicting_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean `[rows, width]`: the positions whose next token is a target (the only logits a loss needs)."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def _causal_lm(model):
    """The transformers causal LM under DDP and peft wrapping."""
    inner = getattr(model, "module", model)  # DistributedDataParallel
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def accepts_logits_to_keep(model) -> bool:
    """Whether the causal LM under any DDP/peft wrapping takes transformers' `logits_to_keep` argument."""
    inner = _causal_lm(model)
    try:
        return "logits_to_keep" in inspect.signature(type(inner).forward).parameters
    except (TypeError, ValueError):
        return False


def _chunked_cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if logits.shape[0] == 0:
        # A micro-batch without targets: a zero that still reaches every LoRA weight, so backward and
        # DDP's gradient all-reduce behave as with targets.
        return logits.float().sum()
    if logits.shape[0] <= CE_CHUNK:  # one piece: no split, whose backward would add a copy of the logits' grad
        return F.cross_entropy(logits.float(), targets, reduction="sum")
    pieces = zip(logits.split(CE_CHUNK), targets.split(CE_CHUNK))
    return torch.stack([F.cross_entropy(chunk.float(), target, reduction="sum") for chunk, target in pieces]).sum()


class _LinearCrossEntropySum(torch.autograd.Function):
    """`sum_i CE(hidden_i @ weight^T, target_i)` for a frozen head, one chunk of rows at a time.

    The [tokens, vocab] logits never exist whole: each chunk's logits go into one reused buffer, turn
    into exp(logit - max) in place, give the chunk's log-sum-exp and, when a gradient is wanted, the
    gradient of the hidden states right away (softmax @ weight - weight[target]), which backward only
    scales. Nothing of the vocabulary's size is kept for backward (Liger-Kernel's fused linear
    cross-entropy does the same in Triton on GPUs; this one is plain torch and runs anywhere).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, want_grad: bool):
        rows, vocab = hidden.shape[0], weight.shape[0]
        chunk = max(1, min(rows, HEAD_CHUNK_ELEMENTS // vocab))
        buffer = hidden.new_empty(chunk, vocab)
        grad = torch.empty_like(hidden) if want_grad else None
        total = hidden.new_zeros(())
        for start in range(0, rows, chunk):
            stop = min(rows, start + chunk)
            target = targets[start:stop, None]
            logits = torch.mm(hidden[start:stop], weight.t(), out=buffer[: stop - start])
            target_logit = logits.gather(1, target).squeeze(1)
            peak = logits.amax(1, keepdim=True)
            exp_sum = logits.sub_(peak).exp_().sum(1)
            total += (peak.squeeze(1) + exp_sum.log() - target_logit).sum()
            if want_grad:
                rows_grad = torch.mm(logits, weight, out=grad[start:stop])
                rows_grad.div_(exp_sum[:, None]).sub_(weight.index_select(0, target.squeeze(1)))
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the logits `hidden @ weight.T` ([rows, hidden] x [vocab, hidden], a frozen
    head) against `targets` (every row a target), without materializing the logits."""
    if hidden.shape[0] == 0:
        return hidden.sum()  # a zero that still reaches every LoRA weight (see _chunked_cross_entropy_sum)
    want_grad = torch.is_grad_enabled() and hidden.requires_grad
    return _LinearCrossEntropySum.apply(hidden, weight, targets, want_grad)


def _plain_head(model):
    """The causal LM's output layer when it can take the fused loss: a bias-free float32 `nn.Linear` with
    a frozen weight (the canary in `use_fused_head_loss` checks that the logits are just its product)."""
    inner = _causal_lm(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or head.bias is not None:
        return None
    if head.weight.requires_grad or head.weight.dtype != torch.float32:
        return None
    return head


@contextmanager
def _head_returns_hidden(head):
    """The model's forward hands back the (kept) final hidden states where it would compute logits."""
    head.forward = _hidden_states  # an instance attribute shadows nn.Linear.forward for this forward only
    try:
        yield
    finally:
        del head.forward


def _hidden_states(hidden):
    return hidden


def _fused_head(model):
    """The head to fuse into the loss for this call, or None (not checked by the canary, or autocast on)."""
    head = _plain_head(model)
    if head is None or not getattr(head, "fused_loss_checked", False):
        return None
    if torch.is_autocast_enabled(head.weight.device.type):
        return None
    return head


@torch.no_grad()
def use_fused_head_loss(model, seed: int = 0, rtol: float = 1e-5) -> bool:
    """Check once that `packed_lm_loss` may fuse this model's LM head into the loss, and allow it.

    Structure first (`_plain_head`), then numbers: on a random packed row the fused loss must equal the
    loss over the model's own logits (a model that scales or soft-caps its logits, or whose head is not
    the last step, fails here and keeps the logits path). Returns whether the fused loss is on.
    """
    head = _plain_head(model)
    if head is None or not accepts_logits_to_keep(model):
        return False
    head.fused_loss_checked = False
    gen = torch.Generator().manual_seed(seed)
    lengths = (6, 9)
    vocab = head.weight.shape[0]
    device = head.weight.device
    ids = torch.randint(0, vocab, (1, sum(lengths)), generator=gen).to(device)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    labels = ids.clone()
    labels[0, 0] = labels[0, lengths[0]] = IGNORE_INDEX  # nothing predicts a sample's first token
    inputs = dict(input_ids=ids, position_ids=positions)
    was_training = _causal_lm(model).training
    model.eval()
    try:
        reference, _ = packed_causal_lm_loss(packed_forward(model, **inputs).logits, labels)
        head.fused_loss_checked = True
        fused, _ = packed_lm_loss(model, inputs, labels)
    finally:
        model.train(was_training)
    agrees = bool(((fused - reference).abs() <= rtol * reference.abs()).item())
    head.fused_loss_checked = agrees
    return agrees


def prepare_packed_model(model) -> bool:
    """Before a model sees packed rows for its SFT loss (training, and evaluation that must measure what
    training did): attention per packed sample and its canary (`prepare_packed_attention`), then the fused
    head loss where the canary of `use_fused_head_loss` allows it. Returns whether it runs `PACKED_SDPA`."""
    packed = prepare_packed_attention(model)
    use_fused_head_loss(model)
    return packed


def packed_lm_loss(model, inputs: dict, labels: torch.Tensor, targets_only: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed forward + summed next-token cross-entropy: `(loss_sum, n_targets)`, device tensors.

    With assistant-only targets most positions predict nothing we score, and on a small model the
    vocabulary head over every position (49k x hidden per token for SmolLM2-135M) plus its softmax is the
    largest single cost of a step. So the model's own `logits_to_keep` (a boolean mask: transformers
    gathers those hidden states before `lm_head`) projects only the positions that predict a target;
    the loss is the same sum as `packed_causal_lm_loss` over full logits. Models whose forward lacks the
    argument (and `targets_only=False`) take the full-head path. A model `use_fused_head_loss` has
    checked hands back those hidden states instead, and the head and the loss run fused, chunk by chunk
    (`linear_cross_entropy_sum`): no [targets, vocab] tensor, its softmax or their gradients in memory.
    """
    if not targets_only or not accepts_logits_to_keep(model):
        logits = packed_forward(model, **inputs).logits
        return packed_causal_lm_loss(logits, labels)
    keep = predicting_positions(labels)
    targets = labels[:, 1:][keep[:, :-1]]
    count = targets.new_tensor(targets.shape[0])
    head = _fused_head(model)
    if head is not None:
        with _head_returns_hidden(head):
            hidden = packed_forward(model, **inputs, logits_to_keep=keep).logits  # [n_targets, hidden]
        return linear_cross_entropy_sum(hidden, head.weight, targets), count
    logits = packed_forward(model, **inputs, logits_to_keep=keep).logits  # [n_targets, vocab]
    return _chunked_cross_entropy_sum(logits, targets), count
