#!/usr/bin/env python
"""Which models and sequence lengths the MLX preflight accepts on a Mac's memory budget, before and after
the chunked label-only loss (issue 16).

For each model (the shapes of their public config.json files, written out below: nothing is downloaded) it
sizes a LoRA run as the MLX backend does on Apple Silicon: bf16 weights and activations, LoRA rank 8 on
every linear layer of the top --num-layers layers, batch 1, a record of the given length. The estimate is
medtune.train.preflight.estimate_memory and the verdict its refusal rule (refused over 90 % of the budget),
the code `medtune train` runs. "before" is the estimate as it was before issue 16 (commit 289bef5; its formula
is reproduced in old_estimate: float32 activations whatever the model's dtype, 10 x hidden + 4 x intermediate
per token and two attention copies per layer, every position's logits three times), "plain" is today's
estimate for a run whose loss makes every position's logits (as mlx_lm.lora does), "after" is what the MLX
backend estimates now (the chunked label-only loss).

Usage: python scripts/preflight_table.py [--budgets 16,24] [--num-layers 8] [--grad-checkpoint]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medtune.train import preflight  # noqa: E402
from medtune.train.options import TrainOptions  # noqa: E402

# hidden, intermediate, layers, heads, kv heads, head dim (None: hidden / heads), vocabulary, tied embeddings
MODELS = {
    "Qwen2.5-0.5B": (896, 4864, 24, 14, 2, None, 151936, True),
    "DeepSeek-R1-Distill-Qwen-1.5B": (1536, 8960, 28, 12, 2, None, 151936, False),
    "Gemma-3-1B": (1152, 6912, 26, 4, 1, 256, 262144, True),
    "Llama-3.2-1B": (2048, 8192, 16, 32, 8, None, 128256, True),
    "Qwen2.5-3B": (2048, 11008, 36, 16, 2, None, 151936, True),
    "Llama-3.2-3B": (3072, 8192, 28, 24, 8, None, 128256, True),
    "Phi-3.5-mini (3.8B)": (3072, 8192, 32, 32, 32, None, 32064, False),
    "MedGemma-4B / Gemma-3-4B (text)": (2560, 10240, 34, 8, 4, 256, 262208, True),
    "Qwen2.5-7B": (3584, 18944, 28, 28, 4, None, 152064, False),
    "Llama-3.1-8B": (4096, 14336, 32, 32, 8, None, 128256, False),
}
KINDS = ("before", "plain", "after")
LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)


def shapes(name: str) -> tuple[dict, int, int]:
    """(config, parameters, LoRA parameters per layer at rank 1) of a model in MODELS."""
    hidden, inter, layers, heads, kv, head_dim, vocab, tied = MODELS[name]
    hd = head_dim or hidden // heads
    linears = [(hidden, heads * hd), (hidden, kv * hd), (hidden, kv * hd), (heads * hd, hidden)]
    linears += [(hidden, inter), (hidden, inter), (inter, hidden)]
    per_layer = sum(i * o for i, o in linears) + 2 * hidden
    params = vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden
    cfg = {
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "vocab_size": vocab,
        "num_hidden_layers": layers,
    }
    return cfg, params, sum(i + o for i, o in linears)


def weight_bytes(params: int, bits: int) -> float:
    """Bytes of the base's weights: bf16, or MLX's quantized layout (a bf16 scale and bias per 64 weights)."""
    return params * 2 if bits == 16 else params * (bits / 8 + 4 / 64)


def old_estimate(cfg: dict, weights: int, trainable: int, batch: int, seq: int, n_layers: int, checkpoint: bool) -> int:
    """The MLX preflight's estimate before issue 16 (289bef5), for the comparison."""
    hidden, inter, heads, vocab = (
        cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")
    )
    tokens = batch * seq
    per_layer = tokens * (10 * hidden + 4 * inter) * 4 + 2 * batch * heads * seq * seq * 4
    acts = per_layer * (1 if checkpoint else n_layers) + (tokens * hidden * 4 * n_layers if checkpoint else 0)
    return weights + trainable * 16 + acts + tokens * vocab * 12


def estimate(name: str, seq: int, opts: TrainOptions, kind: str, bits: int = 16) -> int:
    """kind: before | plain | after (see the docstring)."""
    cfg, params, lora_per_rank = shapes(name)
    n_layers = min(opts.num_layers, cfg["num_hidden_layers"]) if opts.num_layers > 0 else cfg["num_hidden_layers"]
    trainable = opts.rank * lora_per_rank * n_layers
    weights = int(weight_bytes(params, bits) + trainable * 2)
    if kind == "before":
        return old_estimate(cfg, weights, trainable, opts.batch_size, seq, n_layers, opts.grad_checkpoint)
    kw = dict(act_bytes=2, loss="chunked" if kind == "after" else "plain")
    est = preflight.estimate_memory(
        cfg,
        weights,
        trainable,
        opts.batch_size,
        seq,
        n_layers,
        opts.grad_checkpoint,
        **kw,
    )
    return est["total"]


def accepted(need: int, budget_gb: float, opts: TrainOptions, seq: int) -> bool:
    pf = {
        "estimated_peak_bytes": need,
        "available_bytes": int(budget_gb * 1e9),
        "available_source": "MEDTUNE_MEMORY_LIMIT_GB",
        "longest_record": seq,
        "estimate": {},
    }
    return preflight.refusal(pf, opts) is None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="16,24", help="memory budgets in GB (MEDTUNE_MEMORY_LIMIT_GB)")
    ap.add_argument("--num-layers", type=int, default=TrainOptions().num_layers)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--grad-checkpoint", action="store_true")
    ap.add_argument(
        "--bits", type=int, default=16, choices=(16, 8, 4), help="16: bf16 base; 8 or 4: QLoRA on an MLX-quantized base"
    )
    a = ap.parse_args()
    opts = TrainOptions(num_layers=a.num_layers, batch_size=a.batch_size, grad_checkpoint=a.grad_checkpoint)
    budgets = [float(b) for b in a.budgets.split(",")]
    print(
        f"LoRA rank {opts.rank}, top {opts.num_layers} layers, batch {opts.batch_size}, "
        f"{'bf16 base' if a.bits == 16 else f'{a.bits}-bit base (QLoRA)'}, bf16 activations, "
        f"grad checkpoint {'on' if opts.grad_checkpoint else 'off'}: the longest record the preflight accepts"
    )
    print()
    head = " | ".join(f"{b:g} GB before | {b:g} GB plain | {b:g} GB after" for b in budgets)
    print(f"| model | params | estimate at 2048 before / plain / after (GB) | {head} |")
    print("|---|---:|---:|" + "---:|" * (3 * len(budgets)))
    for name in MODELS:
        _, params, _ = shapes(name)
        cells = []
        for b in budgets:
            for kind in KINDS:
                ok = [n for n in LENGTHS if accepted(estimate(name, n, opts, kind, a.bits), b, opts, n)]
                cells.append(str(max(ok)) if ok else "none")
        at2k = " / ".join(f"{estimate(name, 2048, opts, kind, a.bits) / 1e9:.1f}" for kind in KINDS)
        print(f"| {name} | {params / 1e9:.2f} B | {at2k} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
