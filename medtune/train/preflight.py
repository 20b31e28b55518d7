"""The memory preflight: the peak a run will need, against what the machine has, before the first step.

Every backend reports the same figures (parameters, tokens, steps, the estimate by part, what is
available and where that number comes from) and the loop gives one verdict from them: a ResourceError
(exit 4) carrying the figures as `.preflight`, the same for a dry run as for the run itself.
"""

from __future__ import annotations

from medtune.core.errors import ResourceError
from medtune.train.data import item_length, padded
from medtune.train.options import TrainOptions


def estimate_memory(
    cfg: dict,
    weight_bytes: int,
    trainable: int,
    batch: int,
    seq: int,
    n_train_layers: int,
    grad_checkpoint: bool,
    *,
    act_bytes: int = 4,
    attention_matrices: float = 1,
    loss: str = "chunked",
    optimizer_bytes: int = 16,
) -> dict:
    """Peak training memory, from the model config and the longest batch (bytes).

    weights as loaded + optimizer_bytes per trainable parameter (float32 weights, grads and two Adam
    moments: 16; 12 where the weights are counted in weight_bytes already) + activations + the loss.
    Activations: what a layer keeps for its backward pass (per token 10 x hidden + 5 x intermediate values,
    and attention_matrices [heads x seq x seq] copies where attention materialises them: 0 for fused
    kernels), for the layers back-propagated through and half a layer more (the one whose backward is
    running); with gradient checkpointing, each layer's input and two layers' worth. The loss: "chunked"
    (medtune.train.loss) a chunk of rows' float32 logits a few times over and the gathered hidden states;
    "plain" every position's logits (value and three float32 copies: softmax, its gradient, the cast);
    "fused" (Unsloth's kernel) the value only. Checked against MLX's peak counter on CPU (scripts/bench_train.py:
    Qwen2.5-0.5B-shaped layers at 1,024-2,048 tokens, batch 1 and 4, and SmolLM2): within 7 %."""
    hidden = int(cfg.get("hidden_size", 0))
    inter = int(cfg.get("intermediate_size", 4 * hidden))
    heads = int(cfg.get("num_attention_heads", 1))
    vocab = int(cfg.get("vocab_size", 0))
    tokens = batch * seq
    per_layer = tokens * (10 * hidden + 5 * inter) * act_bytes
    per_layer += int(attention_matrices * batch * heads * seq * seq * act_bytes)
    if grad_checkpoint:
        acts = 2 * per_layer + tokens * hidden * act_bytes * n_train_layers
    else:
        acts = int(per_layer * (n_train_layers + 0.5))
    logits = loss_bytes(loss, tokens, hidden, vocab, act_bytes)
    optimizer = trainable * optimizer_bytes
    return {
        "weights": weight_bytes,
        "optimizer": optimizer,
        "activations": acts,
        "logits": logits,
        "total": weight_bytes + optimizer + acts + logits,
    }


def loss_bytes(loss: str, tokens: int, hidden: int, vocab: int, act_bytes: int) -> int:
    """What the loss holds at its peak (see estimate_memory)."""
    from medtune.train.loss import CHUNK_COPIES, chunk_rows

    if loss == "chunked":
        return chunk_rows(vocab) * vocab * 4 * CHUNK_COPIES + 2 * tokens * hidden * act_bytes
    return tokens * vocab * (act_bytes if loss == "fused" else act_bytes + 12)


def longest_batch(train_items) -> tuple[int, int]:
    """(longest record in tokens, the padded width of a batch holding it; a pair's longer side)."""
    longest = max(item_length(item) for item in train_items)
    return longest, padded(longest)


def _tokens(item) -> int:
    """An SFT item's tokens, or both sides' of a pair."""
    return len(item[0][0]) + len(item[1][0]) if isinstance(item[0], tuple) else len(item[0])


def figures(
    total: int, trainable: int, opts: TrainOptions, train_items, steps: int, est: dict, available: tuple[int, str]
) -> dict:
    """The preflight every backend reports (a backend may add its own keys after these)."""
    longest, _ = longest_batch(train_items)
    avail, source = available
    return {
        "parameters": int(total),
        "trainable_parameters": int(trainable),
        "records": len(train_items),
        "tokens_per_epoch": int(sum(_tokens(item) for item in train_items)),
        "longest_record": int(longest),
        "steps": steps,
        "micro_batches": steps * opts.grad_accum,
        "epochs": round(steps * opts.grad_accum * opts.batch_size / max(len(train_items), 1), 2),
        "estimated_peak_bytes": int(est["total"]),
        "estimate": {k: int(v) for k, v in est.items()},
        "available_bytes": int(avail),
        "available_source": source,
    }


def refusal(pf: dict, opts: TrainOptions, extra_tips=(), detailed: bool = False) -> ResourceError | None:
    """The ResourceError for a run that does not fit (None when it does), its figures as `.preflight`.
    extra_tips: the backend's own ways to need less; detailed: the estimate by part in the message."""
    need, have = pf["estimated_peak_bytes"], pf["available_bytes"]
    if need <= 0.9 * have:
        return None
    tips = []
    if opts.batch_size > 1:
        tips.append(f"--batch-size 1 --grad-accum {opts.batch_size * opts.grad_accum}")
    if not opts.grad_checkpoint:
        tips.append("--grad-checkpoint")
    tips += list(extra_tips)
    if opts.num_layers < 0 or opts.num_layers > 4:
        tips.append("--num-layers 4")
    tips.append(f"--max-seq-length {max(256, pf['longest_record'] // 2)} (re-run prepare with it)")
    detail = ""
    if detailed:
        e = pf["estimate"]
        parts = ", ".join(f"{k} {e[k] / 1e9:.1f}" for k in ("weights", "optimizer", "activations", "logits"))
        detail = f" ({parts} GB; batch {opts.batch_size}, longest record {pf['longest_record']} tokens)"
    err = ResourceError(
        f"training needs ~{need / 1e9:.1f} GB at its peak{detail}, {have / 1e9:.1f} GB is available "
        f"({pf['available_source']})",
        hint="try " + ", ".join(tips),
    )
    err.preflight = pf  # the figures, for a dry run to show before the refusal
    return err
