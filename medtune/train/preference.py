"""Preference training losses (DPO, ORPO) on pairs of completions, and the sequence log-probs they need.

A pair is two SFT items, ((chosen ids, offset), (rejected ids, offset)): each side is a whole rendered
sequence whose completion tokens are those at offset..len-1, as medtune.train.data's items (so each side's
prompt may tokenize as it will at inference, and a side is scored exactly as the SFT loss would score it).

- The maths, three times with the same signatures and the same results: numpy (`dpo_loss`, `orpo_loss`: the
  reference the tests hold the others to), MLX (`mlx_dpo_loss`, `mlx_orpo_loss`) and PyTorch
  (`torch_dpo_loss`, `torch_orpo_loss`). Each returns (loss, metrics: a dict of scalars).
  DPO (Rafailov et al. 2023), sigmoid loss on summed completion log-probs, policy against a frozen reference:
      loss = mean over pairs of -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))
  ORPO (Hong et al. 2024), no reference: the SFT loss on the chosen side plus lam times the odds-ratio loss on
  length-normalised log-probs (mean per completion token, so p is a per-token probability):
      log odds(p) = log p - log(1 - p);  loss = nll_chosen + lam * mean(-log sigmoid(log odds_c - log odds_r))
- `pair_batch` (numpy): N pairs as one batch of 2N padded rows (the N chosen sides, then the N rejected ones),
  the positions that predict a completion token (medtune.train.loss.label_picks, as the SFT batch) and a
  [2N, picks] 0/1 matrix that sums each row's token log-probs. `mlx_batch` / `torch_batch` turn it into
  backend arrays in the same order: (ids, lengths, picks, segments, ref_chosen, ref_rejected).
- Sequence log-probs without [tokens x vocabulary] logits (medtune.train.loss's body/head split): the body's
  hidden states are gathered at the completion positions only, and the head + log-softmax run over them a
  chunk of rows at a time. Each row's log-prob depends on its own hidden state only, so its gradient with
  respect to that row is made in the same pass and backward scales it by the row's cotangent: logits are
  neither kept nor recomputed. A model whose logits are more than head(body) gets the plain computation.
- `mlx_preference_loss(split, method, beta)` is a loss(model, *batch) for nn.value_and_grad (and mx.compile);
  `torch_preference_loss(model, batch, method, beta, split)` the same on a transformers / PEFT model.
- `reference_logps`: DPO's reference, computed once before training with the adapter switched off (the base
  model) and stored with the run: per-pair summed completion log-probs of the chosen and rejected sides, as
  numpy arrays, pair order kept.

numpy only at import; MLX and PyTorch are imported by the functions that use them.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass

import numpy as np

from medtune.train import loss as losses
from medtune.train.data import padded

METHODS = ("dpo", "orpo")
MAX_MEAN_LOGP = (
    -1e-6
)  # ORPO: mean log-probs are clamped here (p <= 0.999999), so a certain completion's odds stay finite
LN2 = math.log(2.0)


# ---- the maths: numpy reference -------------------------------------------------------------------
def dpo_loss(pol_chosen, pol_rejected, ref_chosen, ref_rejected, beta: float):
    """(mean DPO sigmoid loss, metrics) from per-pair summed completion log-probs of the policy and the reference.

    metrics: rewards_chosen / rewards_rejected (mean of beta * (policy - reference) per side), margin (mean of
    chosen reward - rejected reward), accuracy (share of pairs whose chosen reward is above the rejected one)."""
    pc, pr, rc, rr = (np.asarray(a, dtype=np.float64) for a in (pol_chosen, pol_rejected, ref_chosen, ref_rejected))
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    z = chosen - rejected
    loss = np.logaddexp(0.0, -z).mean()  # -log sigmoid(z), stable for any z
    return float(loss), {
        "rewards_chosen": float(chosen.mean()),
        "rewards_rejected": float(rejected.mean()),
        "margin": float(z.mean()),
        "accuracy": float((z > 0).mean()),
    }


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate everywhere (Maechler 2012): log1p(-exp(x)) below -log 2, log(-expm1(x))
    above. Each branch sees an input clamped to its own side, so neither makes an inf that a gradient would meet."""
    x = np.minimum(np.asarray(x, dtype=np.float64), MAX_MEAN_LOGP)
    return np.where(x < -LN2, np.log1p(-np.exp(np.minimum(x, -LN2))), np.log(-np.expm1(np.maximum(x, -LN2))))


def orpo_loss(nll_chosen, mean_logp_chosen, mean_logp_rejected, lam: float):
    """(ORPO loss, metrics): mean(nll_chosen) (the SFT loss on the chosen side) + lam * the mean odds-ratio loss
    -log sigmoid(log odds(p_c) - log odds(p_r)), p = exp(mean per-token log-prob of the completion).

    metrics: nll, or_loss (the odds-ratio term before lam), log_odds_ratio (mean), accuracy (share of pairs whose
    chosen mean log-prob is above the rejected one), margin (mean of chosen - rejected mean log-probs)."""
    nll = np.asarray(nll_chosen, dtype=np.float64).mean()
    mc = np.minimum(np.asarray(mean_logp_chosen, dtype=np.float64), MAX_MEAN_LOGP)
    mr = np.minimum(np.asarray(mean_logp_rejected, dtype=np.float64), MAX_MEAN_LOGP)
    ratio = (mc - log1mexp(mc)) - (mr - log1mexp(mr))
    odds = np.logaddexp(0.0, -ratio).mean()
    return float(nll + lam * odds), {
        "nll": float(nll),
        "or_loss": float(odds),
        "log_odds_ratio": float(ratio.mean()),
        "accuracy": float((mc > mr).mean()),
        "margin": float((mc - mr).mean()),
    }


# ---- batches of pairs (numpy; both backends use them) -----------------------------------------------
@dataclass
class PairBatch:
    ids: np.ndarray  # [2N, width] int32: the N chosen sides, then the N rejected ones, 0-padded to a multiple of 32
    lengths: np.ndarray  # [2N, 2] int32: [offset, length] per row (completion tokens: offset..length-1)
    picks: np.ndarray  # flat indices into the [2N, width-1] grid of positions that predict a completion token
    segments: np.ndarray  # [2N, len(picks)] float32: 1 where a pick belongs to the row (padding picks: nowhere)
    ref_chosen: np.ndarray  # [N] float32: the reference's summed log-probs (DPO), zeros without one
    ref_rejected: np.ndarray

    @property
    def pairs(self) -> int:
        return len(self.ref_chosen)

    @property
    def tokens(self) -> int:
        return int(self.lengths[:, 1].sum())

    def arrays(self) -> tuple:
        return self.ids, self.lengths, self.picks, self.segments, self.ref_chosen, self.ref_rejected


def pair_batch(pairs, group: list[int], ref=None) -> PairBatch:
    """The batch of pairs[i] for i in group. ref: (chosen, rejected) arrays over all pairs (reference_logps), or None."""
    sides = [pairs[i][0] for i in group] + [pairs[i][1] for i in group]
    ids = np.zeros((len(sides), padded(max(len(t) for t, _ in sides))), dtype=np.int32)
    for j, (toks, _) in enumerate(sides):
        ids[j, : len(toks)] = toks
    lengths = np.array([[offset, len(toks)] for toks, offset in sides], dtype=np.int32).reshape(-1, 2)
    counts = lengths[:, 1] - np.maximum(lengths[:, 0], 1)  # position 0 is never a label: nothing predicts it
    if (counts < 1).any():
        j = int(np.flatnonzero(counts < 1)[0])
        side = "chosen" if j < len(group) else "rejected"
        raise ValueError(f"pair {group[j % len(group)]}: the {side} side has no completion tokens")
    picks, weights = losses.label_picks(lengths, ids.shape[1])
    n = int(weights.sum())
    segments = np.zeros((len(sides), len(picks)), dtype=np.float32)
    segments[picks[:n] // (ids.shape[1] - 1), np.arange(n)] = 1.0
    if ref is None:
        rc = rr = np.zeros(len(group), dtype=np.float32)
    else:
        rc, rr = (np.asarray(r, dtype=np.float32)[group] for r in ref)
    return PairBatch(ids, lengths, picks, segments, rc, rr)


def _by_length(pairs, batch_size: int) -> list[list[int]]:
    """Groups of pair indices, longest side sorted (less padding); results are put back in pair order."""
    order = sorted(range(len(pairs)), key=lambda i: max(len(pairs[i][0][0]), len(pairs[i][1][0])))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# ---- MLX --------------------------------------------------------------------------------------------
def _mx():
    from medtune.core import runtime

    return runtime.mx()


def mlx_dpo_loss(pol_chosen, pol_rejected, ref_chosen, ref_rejected, beta: float):
    """dpo_loss on MLX arrays (differentiable); the metrics are MLX scalars."""
    mx = _mx()
    chosen, rejected = beta * (pol_chosen - ref_chosen), beta * (pol_rejected - ref_rejected)
    z = chosen - rejected
    return mx.logaddexp(0.0, -z).mean(), {
        "rewards_chosen": chosen.mean(),
        "rewards_rejected": rejected.mean(),
        "margin": z.mean(),
        "accuracy": (z > 0).astype(mx.float32).mean(),
    }


def mlx_log1mexp(x):
    mx = _mx()
    x = mx.minimum(x, MAX_MEAN_LOGP)
    return mx.where(x < -LN2, mx.log1p(-mx.exp(mx.minimum(x, -LN2))), mx.log(-mx.expm1(mx.maximum(x, -LN2))))


def mlx_orpo_loss(nll_chosen, mean_logp_chosen, mean_logp_rejected, lam: float):
    """orpo_loss on MLX arrays (differentiable); the metrics are MLX scalars."""
    mx = _mx()
    nll = (nll_chosen if isinstance(nll_chosen, mx.array) else mx.array(nll_chosen)).mean()
    mc, mr = mx.minimum(mean_logp_chosen, MAX_MEAN_LOGP), mx.minimum(mean_logp_rejected, MAX_MEAN_LOGP)
    ratio = (mc - mlx_log1mexp(mc)) - (mr - mlx_log1mexp(mr))
    odds = mx.logaddexp(0.0, -ratio).mean()
    return nll + lam * odds, {
        "nll": nll,
        "or_loss": odds,
        "log_odds_ratio": ratio.mean(),
        "accuracy": (mc > mr).astype(mx.float32).mean(),
        "margin": (mc - mr).mean(),
    }


def mlx_batch(batch: PairBatch) -> tuple:
    """(ids, lengths, picks, segments, ref_chosen, ref_rejected) as MLX arrays: mlx_preference_loss's arguments."""
    mx = _mx()
    return tuple(mx.array(a) for a in batch.arrays())


def mlx_chunked_logps(head, h, targets, rows: int, grad: bool = True):
    """log softmax(head(h))[targets], row by row, computed a chunk of rows at a time.

    grad: each row's gradient with respect to its hidden state (one-hot minus softmax, back through the head)
    is made while the chunk's logits exist and kept as a second output of a custom function, whose vjp scales
    it row by row by the cotangent; the logits are never kept nor recomputed. mx.depends orders the chunks one
    after another, as medtune.train.loss.mlx_chunked_ce does. The head must have nothing to train."""
    mx = _mx()
    parts = losses.spans(h.shape[0], rows)

    def chunk(x, t):
        logits = head(x).astype(mx.float32)
        lse = mx.logsumexp(logits, axis=-1, keepdims=True)
        lp = (mx.take_along_axis(logits, t[:, None], axis=-1) - lse)[:, 0]
        if not grad:
            return lp, None
        d = -mx.exp(logits - lse)
        d = mx.put_along_axis(d, t[:, None], mx.take_along_axis(d, t[:, None], axis=-1) + 1, axis=-1)
        _, (g,) = mx.vjp(head, [x], [d.astype(x.dtype)])
        return lp, g

    def chunks(h, targets):
        out, grads = [], []
        for i, j in parts:
            x = h[i:j] if not out else mx.depends([h[i:j]], out[-1:] + grads[-1:])[0]
            lp, g = chunk(x, targets[i:j])
            out.append(lp)
            grads += [g] if grad else []
        return mx.concatenate(out), grads

    if not grad:
        return chunks(h, targets)[0]

    @mx.custom_function
    def logps(h, targets):  # arrays a compiled step traces must be arguments, not closures
        lp, grads = chunks(h, targets)
        return lp, mx.concatenate(grads, axis=0)

    @logps.vjp
    def logps_vjp(primals, cotangents, outputs):
        _, targets = primals
        g = outputs[1]
        return g * cotangents[0][:, None].astype(g.dtype), mx.zeros_like(targets)

    return logps(h, targets)[0]


def mlx_sequence_logps(split: losses.MLXSplit | None, grad: bool = True):
    """logps(model, ids, picks, segments) -> (summed, mean) completion log-probs per row, [2N] each.
    split: medtune.train.loss.mlx_split(model) (None: the whole model's logits, the reference computation)."""

    def logps(model, ids, picks, segments):
        mx = _mx()
        x, targets = ids[:, :-1], ids[:, 1:].reshape(-1)[picks]
        if split is None:
            logits = model(x).astype(mx.float32)
            lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            tok = mx.take_along_axis(lp, ids[:, 1:, None], axis=-1).reshape(-1)[picks]
        else:
            h = split.body(x)
            tok = mlx_chunked_logps(split.head, h.reshape(-1, h.shape[-1])[picks], targets, split.rows, grad)
        summed = segments @ tok
        return summed, summed / segments.sum(axis=1)

    return logps


def mlx_preference_loss(split: losses.MLXSplit | None, method: str, beta: float, grad: bool = True):
    """loss(model, ids, lengths, picks, segments, ref_chosen, ref_rejected) -> (loss, metrics), for
    nn.value_and_grad (grad=False: evaluation only). method: dpo (beta) or orpo (beta is ORPO's lambda; the
    chosen side's NLL is the mean over its completion tokens, as the SFT loss)."""
    if method not in METHODS:
        raise ValueError(f"unknown preference method {method!r} (one of {', '.join(METHODS)})")
    logps = mlx_sequence_logps(split, grad)

    def loss(model, ids, lengths, picks, segments, ref_chosen, ref_rejected):
        summed, mean = logps(model, ids, picks, segments)
        n = ref_chosen.shape[0]
        if method == "dpo":
            value, metrics = mlx_dpo_loss(summed[:n], summed[n:], ref_chosen, ref_rejected, beta)
        else:
            nll = -summed[:n].sum() / segments[:n].sum()
            value, metrics = mlx_orpo_loss(nll, mean[:n], mean[n:], beta)
        metrics.update(logps_chosen=summed[:n].mean(), logps_rejected=summed[n:].mean())
        return value, metrics

    return loss


@contextlib.contextmanager
def mlx_adapter_off(model):
    """mlx_lm's LoRA layers switched off (scale 0: the base model's output, exactly) inside the block. DoRA's
    trained magnitudes cannot be switched off: compute the reference before training (B = 0 is the base)."""
    mods = [m for _, m in model.named_modules() if hasattr(m, "lora_a") and hasattr(m, "scale")]
    if any(type(m).__name__.startswith("DoRA") for m in mods):
        raise ValueError("DoRA layers cannot be switched off: compute the reference before training")
    scales = [m.scale for m in mods]
    try:
        for m in mods:
            m.scale = 0.0
        yield model
    finally:
        for m, s in zip(mods, scales):
            m.scale = s


def mlx_reference_logps(model, pairs, batch_size: int = 4, split=False, adapter_off: bool = True):
    """(chosen, rejected): per-pair summed completion log-probs under `model` (float32 numpy, pair order), without
    gradients; adapter_off: with its LoRA layers switched off (mlx_adapter_off). split: losses.mlx_split(model)
    (found here when not given; None: the plain computation)."""
    mx = _mx()
    off = mlx_adapter_off(model) if adapter_off else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    out = np.zeros((2, len(pairs)), dtype=np.float32)
    try:
        with off:
            logps = mlx_sequence_logps(losses.mlx_split(model) if split is False else split, grad=False)
            for group in _by_length(pairs, batch_size):
                ids, _, picks, segments, _, _ = mlx_batch(pair_batch(pairs, group))
                summed, _ = logps(model, ids, picks, segments)
                mx.eval(summed)
                out[:, group] = np.array(summed).reshape(2, len(group))
    finally:
        model.train(was_training)
    return out[0], out[1]


# ---- PyTorch ----------------------------------------------------------------------------------------
def torch_dpo_loss(pol_chosen, pol_rejected, ref_chosen, ref_rejected, beta: float):
    """dpo_loss on torch tensors (differentiable); the metrics are detached scalars."""
    import torch.nn.functional as F

    chosen, rejected = beta * (pol_chosen - ref_chosen), beta * (pol_rejected - ref_rejected)
    z = chosen - rejected
    return F.softplus(-z).mean(), {
        "rewards_chosen": chosen.detach().mean(),
        "rewards_rejected": rejected.detach().mean(),
        "margin": z.detach().mean(),
        "accuracy": (z.detach() > 0).float().mean(),
    }


def torch_log1mexp(x):
    import torch

    x = x.clamp(max=MAX_MEAN_LOGP)
    return torch.where(x < -LN2, torch.log1p(-torch.exp(x.clamp(max=-LN2))), torch.log(-torch.expm1(x.clamp(min=-LN2))))


def torch_orpo_loss(nll_chosen, mean_logp_chosen, mean_logp_rejected, lam: float):
    """orpo_loss on torch tensors (differentiable); the metrics are detached scalars."""
    import torch
    import torch.nn.functional as F

    nll = torch.as_tensor(nll_chosen).mean()
    mc, mr = mean_logp_chosen.clamp(max=MAX_MEAN_LOGP), mean_logp_rejected.clamp(max=MAX_MEAN_LOGP)
    ratio = (mc - torch_log1mexp(mc)) - (mr - torch_log1mexp(mr))
    odds = F.softplus(-ratio).mean()
    return nll + lam * odds, {
        "nll": nll.detach(),
        "or_loss": odds.detach(),
        "log_odds_ratio": ratio.detach().mean(),
        "accuracy": (mc.detach() > mr.detach()).float().mean(),
        "margin": (mc - mr).detach().mean(),
    }


def torch_batch(batch: PairBatch, device="cpu") -> tuple:
    """(ids, lengths, picks, segments, ref_chosen, ref_rejected) as torch tensors on `device` (ids, picks: long)."""
    import torch

    ids, lengths, picks, segments, rc, rr = batch.arrays()
    long = [torch.as_tensor(a, dtype=torch.long, device=device) for a in (ids, lengths, picks)]
    return (*long, *(torch.as_tensor(a, dtype=torch.float32, device=device) for a in (segments, rc, rr)))


def torch_chunked_logps(head, h, targets, rows: int):
    """log softmax(head(h))[targets] per row, a chunk of rows at a time. When it will be differentiated, each
    row's gradient with respect to its hidden state is made while the chunk's logits exist and kept for
    backward (which scales it row by row by the incoming gradient); otherwise just the chunked values."""
    import torch

    if not (torch.is_grad_enabled() and h.requires_grad):
        return torch.cat([_chunk_logps(head, h[i:j], targets[i:j]) for i, j in losses.spans(h.shape[0], rows)])
    return _torch_chunked_logps_class().apply(h, targets, head, rows)


def _chunk_logps(head, x, t):
    import torch

    return torch.log_softmax(head(x).float(), dim=-1).gather(-1, t[:, None])[:, 0]


@functools.cache
def _torch_chunked_logps_class():
    """The autograd Function, defined on first use (torch is imported only by the torch backend)."""
    import torch

    class ChunkedLogps(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h, targets, head, rows):
            out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
            dh = torch.empty_like(h)
            for i, j in losses.spans(h.shape[0], rows):
                x = h[i:j].detach().requires_grad_(True)
                with torch.enable_grad():  # autocast, if on, is the caller's and still applies here
                    lp = _chunk_logps(head, x, targets[i:j])
                    total = lp.sum()
                # row r's log-prob depends on row r only: the gradient of the sum is each row's own gradient
                (dh[i:j],) = torch.autograd.grad(total, x)
                out[i:j] = lp.detach()
            ctx.save_for_backward(dh)
            return out

        @staticmethod
        def backward(ctx, grad):
            (dh,) = ctx.saved_tensors
            return dh * grad[:, None].to(dh.dtype), None, None, None

    return ChunkedLogps


def torch_sequence_logps(model, batch: tuple, split: losses.TorchSplit | None = None):
    """(summed, mean) completion log-probs per row ([2N] float32 each) of a torch_batch. split:
    medtune.train.loss.torch_split(model) (None: the whole model's logits). Autocast, if any, is the caller's."""
    import torch

    ids, _, picks, segments = batch[:4]
    x, targets = ids[:, :-1], ids[:, 1:].reshape(-1)[picks]
    if split is None:
        logits = model(input_ids=x, use_cache=False).logits.float()
        tok = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).reshape(-1)[picks]
    else:
        h = split.body(input_ids=x, use_cache=False).last_hidden_state
        tok = torch_chunked_logps(split.head, h.reshape(-1, h.shape[-1])[picks], targets, split.rows)
    with torch.autocast(tok.device.type, enabled=False):  # a float32 sum: autocast would make this matmul 16-bit
        summed = segments @ tok
    return summed, summed / segments.sum(dim=1)


def torch_preference_loss(model, batch: tuple, method: str, beta: float, split: losses.TorchSplit | None = None):
    """(loss, metrics) of a torch_batch: mlx_preference_loss on a transformers / PEFT model."""
    if method not in METHODS:
        raise ValueError(f"unknown preference method {method!r} (one of {', '.join(METHODS)})")
    summed, mean = torch_sequence_logps(model, batch, split)
    segments, rc, rr = batch[3:]
    n = rc.shape[0]
    if method == "dpo":
        value, metrics = torch_dpo_loss(summed[:n], summed[n:], rc, rr, beta)
    else:
        nll = -summed[:n].sum() / segments[:n].sum()
        value, metrics = torch_orpo_loss(nll, mean[:n], mean[n:], beta)
    metrics.update(logps_chosen=summed[:n].detach().mean(), logps_rejected=summed[n:].detach().mean())
    return value, metrics


def torch_reference_logps(model, pairs, batch_size: int = 4, split=False, adapter_off: bool = True, device=None):
    """(chosen, rejected): per-pair summed completion log-probs under `model` (float32 numpy, pair order), without
    gradients; adapter_off: a PEFT model's adapters disabled (the base model). split: losses.torch_split(model)
    (found here when not given; None: the plain computation)."""
    import torch

    device = device or next(model.parameters()).device
    off = model.disable_adapter() if adapter_off and hasattr(model, "disable_adapter") else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    out = np.zeros((2, len(pairs)), dtype=np.float32)
    try:
        with off, torch.no_grad():
            split = losses.torch_split(model) if split is False else split
            for group in _by_length(pairs, batch_size):
                summed, _ = torch_sequence_logps(model, torch_batch(pair_batch(pairs, group), device), split)
                out[:, group] = summed.float().cpu().numpy().reshape(2, len(group))
    finally:
        model.train(was_training)
    return out[0], out[1]


def reference_logps(model, pairs, batch_size: int = 4, adapter_off: bool = True):
    """DPO's reference log-probs (chosen, rejected) with an MLX or a PyTorch model: mlx_reference_logps or
    torch_reference_logps, by the model's kind."""
    kind = "torch" if any(c.__module__.startswith("torch.") for c in type(model).__mro__) else "mlx"
    fn = {"torch": torch_reference_logps, "mlx": mlx_reference_logps}[kind]
    return fn(model, pairs, batch_size, adapter_off=adapter_off)
