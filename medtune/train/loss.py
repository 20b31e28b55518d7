"""The training loss, backend by backend: mean cross-entropy over the label (completion) tokens, without the
[tokens × vocabulary] logits ever existing at once.

The model is split into its body (embeddings + blocks + final norm: hidden states) and its head (the
vocabulary projection). Hidden states are gathered at the positions that predict a label only, and the
head + cross-entropy run over them a chunk of rows at a time; when training, each chunk's gradient with
respect to the hidden states is made in the same pass, so logits are neither kept nor recomputed: a chunk's
logits, softmax and gradient are the only vocabulary-sized arrays alive. The split is checked on the loaded model (its own logits against head(body)
on a probe): a model whose output is more than that (logit scaling or soft-capping the head does not
carry) falls back to the plain loss, which every backend keeps as the reference the tests compare against.

numpy only at import; MLX and PyTorch are imported by the functions that use them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

CHUNK_BYTES = 24 * 2**20  # float32 logits of one chunk of rows (the vocabulary-sized arrays are a few of these)
MIN_ROWS = 128  # fewer rows per chunk leave the head matmul waiting on memory (32 rows: 0.9x the plain loss's speed)
CHUNK_COPIES = 11  # chunk-sized float32 arrays alive at the loss's peak (measured: two chunks in flight, ~5.5 each)
PICK_MULTIPLE = 32  # label positions are padded to a multiple of this (fewer shapes for mx.compile)
PROBE = [[1, 2, 3, 4, 5, 6, 7, 8]]  # token ids the split is checked on


def chunk_rows(vocab: int, budget: int = CHUNK_BYTES) -> int:
    """Rows of hidden states per chunk: as many as fit `budget` in float32 logits, a multiple of 16 in
    MIN_ROWS..1024 (a large vocabulary gets MIN_ROWS, over the budget: speed before the last few MB)."""
    rows = budget // max(1, 4 * vocab)
    return int(min(1024, max(MIN_ROWS, rows - rows % 16)))


def label_picks(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(flat indices into the [batch, width-1] grid of predicting positions, weights 1/0).

    Row j's labels are its tokens at offset..length-1; position p-1 predicts token p. The indices are padded
    with 0 (weight 0) to a multiple of PICK_MULTIPLE."""
    cols = np.arange(1, width)[None, :]
    mask = (cols >= lengths[:, :1]) & (cols < lengths[:, 1:2])
    picks = np.flatnonzero(mask.reshape(-1)).astype(np.int32)
    n = len(picks)
    size = max(PICK_MULTIPLE, -(-n // PICK_MULTIPLE) * PICK_MULTIPLE)
    out = np.zeros(size, dtype=np.int32)
    out[:n] = picks
    weights = np.zeros(size, dtype=np.float32)
    weights[:n] = 1.0
    return out, weights


def spans(n: int, rows: int) -> list[tuple[int, int]]:
    return [(i, min(i + rows, n)) for i in range(0, n, rows)]


# ---- MLX ------------------------------------------------------------------------------------------------
@dataclass
class MLXSplit:
    body: object  # tokens -> final hidden states
    head: object  # hidden states -> logits
    rows: int


def mlx_split(model) -> MLXSplit | None:
    """mlx_lm's body (model.model) and head (lm_head, or the tied embedding), when model(x) is exactly
    head(body(x)) and the head has nothing to train; None otherwise (the plain loss is used). The chunk
    size follows the vocabulary, read from the probe's logits."""
    from medtune.core import runtime

    mx = runtime.mx()
    from mlx.utils import tree_flatten

    body = getattr(model, "model", None)
    if body is None or not callable(body):
        return None
    if "lm_head" in model:
        head = model.lm_head
        if tree_flatten(head.trainable_parameters()):
            return None
    elif hasattr(body, "embed_tokens") and hasattr(body.embed_tokens, "as_linear"):
        head = body.embed_tokens.as_linear
    else:
        return None
    was_training = model.training
    model.eval()
    probe = mx.array(PROBE)
    try:
        full = model(probe)
        same = mx.allclose(full, head(body(probe)), rtol=1e-5, atol=1e-5).item()
    except (TypeError, ValueError, AttributeError):
        same = False
    model.train(was_training)
    return MLXSplit(body, head, chunk_rows(full.shape[-1])) if same else None


def mlx_chunked_ce(head, h, targets, weights, rows: int, grad: bool = True):
    """Sum over rows of weights * cross-entropy(head(h), targets), chunk by chunk.

    grad: the gradient with respect to h is made in the same pass, while a chunk's logits exist (softmax
    minus one-hot, times the weights, back through the head: the two head matmuls the plain loss makes too),
    and kept as a second output of a custom function whose vjp scales it by the cotangent; the logits are
    never kept nor recomputed. mx.depends orders the chunks one after another, so one chunk's arrays are
    alive at a time. Without grad (evaluation), just the chunked sum."""
    from medtune.core import runtime

    mx = runtime.mx()
    parts = spans(h.shape[0], rows)

    def chunk(x, t, w):
        logits = head(x).astype(mx.float32)
        lse = mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = mx.take_along_axis(logits, t[:, None], axis=-1)
        loss = ((lse - picked)[:, 0] * w).sum()
        if not grad:
            return loss, None
        p = mx.exp(logits - lse)
        p = mx.put_along_axis(p, t[:, None], mx.take_along_axis(p, t[:, None], axis=-1) - 1, axis=-1) * w[:, None]
        _, (g,) = mx.vjp(head, [x], [p.astype(x.dtype)])
        return loss, g

    def chunks(h, targets, weights):
        loss, grads = None, []
        for i, j in parts:
            x = h[i:j] if loss is None else mx.depends([h[i:j]], [loss] + grads[-1:])[0]
            part, g = chunk(x, targets[i:j], weights[i:j])
            loss = part if loss is None else loss + part
            grads += [g] if grad else []
        return loss, grads

    if not grad:
        return chunks(h, targets, weights)[0]

    @mx.custom_function
    def total(h, targets, weights):  # arrays a compiled step traces must be arguments, not closures
        loss, grads = chunks(h, targets, weights)
        return loss, mx.concatenate(grads, axis=0)

    @total.vjp
    def total_vjp(primals, cotangents, outputs):
        _, targets, weights = primals
        return outputs[1] * cotangents[0].astype(outputs[1].dtype), mx.zeros_like(targets), mx.zeros_like(weights)

    return total(h, targets, weights)[0]


def mlx_plain_loss(model, batch, picks, weights):
    """The reference: the whole model's logits at every position, the label positions picked after."""
    from medtune.core import runtime

    mx = runtime.mx()
    import mlx.nn as nn

    logits = model(batch[:, :-1])
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), batch[:, 1:]).reshape(-1)[picks] * weights
    ntoks = weights.sum()
    return ce.sum() / ntoks, ntoks


def mlx_loss(split: MLXSplit | None, grad: bool = True):
    """loss(model, batch, lengths, picks, weights) -> (mean over label tokens, label tokens); grad: it will be
    differentiated (training), else only evaluated."""
    if split is None:
        return lambda model, batch, lengths, picks, weights: mlx_plain_loss(model, batch, picks, weights)

    def loss(model, batch, lengths, picks, weights):
        h = split.body(batch[:, :-1])
        h = h.reshape(-1, h.shape[-1])[picks]
        targets = batch[:, 1:].reshape(-1)[picks]
        ntoks = weights.sum()
        return mlx_chunked_ce(split.head, h, targets, weights, split.rows, grad) / ntoks, ntoks

    return loss


# ---- PyTorch --------------------------------------------------------------------------------------------
@dataclass
class TorchSplit:
    body: object  # transformers' decoder (input_ids -> last_hidden_state)
    head: object  # the output embedding (nn.Linear), frozen
    rows: int


def torch_split(model) -> TorchSplit | None:
    """transformers' decoder and output embedding of the (PEFT-wrapped) model, when its logits are exactly
    head(decoder(x)) and the head is frozen; None otherwise (the plain loss is used). The chunk size follows
    the vocabulary, read from the probe's logits."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if body is None or head is None or any(p.requires_grad for p in head.parameters()):
        return None
    was_training = model.training
    model.eval()
    device = next(head.parameters()).device
    probe = torch.tensor(PROBE, device=device)
    try:
        with torch.no_grad():
            full = base(input_ids=probe, use_cache=False).logits
            mine = head(body(input_ids=probe, use_cache=False).last_hidden_state)
            same = full.shape == mine.shape and torch.allclose(full.float(), mine.float(), rtol=1e-4, atol=1e-4)
    except (TypeError, ValueError, AttributeError, RuntimeError):
        same = False
    model.train(was_training)
    return TorchSplit(body, head, chunk_rows(full.shape[-1])) if same else None


def torch_chunked_ce(head, h, targets, rows: int):
    """Sum of cross-entropy(head(h), targets) over the rows, a chunk at a time. When it will be
    differentiated, the gradient with respect to h is made in the same pass, while a chunk's logits exist,
    and kept for backward (which scales it by the incoming gradient): the logits are neither kept nor
    recomputed. Otherwise (evaluation) just the chunked sum."""
    import torch

    if not (torch.is_grad_enabled() and h.requires_grad):
        return sum(_chunk_sum(head, h[i:j], targets[i:j]) for i, j in spans(h.shape[0], rows))
    return _torch_chunked_ce_class().apply(h, targets, head, rows)


def _chunk_sum(head, x, t):
    import torch

    return torch.nn.functional.cross_entropy(head(x).float(), t, reduction="sum")


@functools.cache
def _torch_chunked_ce_class():
    """The autograd Function, defined on first use (torch is imported only by the torch backend)."""
    import torch

    class ChunkedCE(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, targets, head, rows):
            total, dh = torch.zeros((), dtype=torch.float32, device=h.device), torch.empty_like(h)
            for i, j in spans(h.shape[0], rows):
                x = h[i:j].detach().requires_grad_(True)
                with torch.enable_grad():  # autocast, if on, is the caller's and still applies here
                    part = _chunk_sum(head, x, targets[i:j])
                (dh[i:j],) = torch.autograd.grad(part, x)
                total += part.detach()
            ctx.save_for_backward(dh)
            return total

        @staticmethod
        def backward(ctx, grad):
            (dh,) = ctx.saved_tensors
            return dh * grad.to(dh.dtype), None, None, None

    return ChunkedCE
