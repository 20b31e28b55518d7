"""Llama (and Mistral, which llama.cpp runs as llama): the base layout plus the Q/K row permutation.

llama.cpp's llama graph applies the rotary embedding to adjacent pairs of each head's rows; transformers to
its two halves. Export regroups Q/K rows per head (`permute_rows`), import puts them back (`unpermute_rows`).
Llama 3.1-style rope scaling becomes a `rope_freqs` tensor that only this graph reads.
"""

from __future__ import annotations

import math

import numpy as np

from medtune.archs.base import Arch, register


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF order -> llama.cpp order: per head, rows [first half, second half] -> interleaved pairs."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp order -> HF order (the inverse of `permute_rows`)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@register
class Llama(Arch):
    hf_names = ("LlamaForCausalLM",)
    model_types = ("llama",)
    model_arch = "LLAMA"
    rope_kinds = ("linear", "yarn", "llama3")
    hf_extra = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}

    def _heads(self, gguf_name: str) -> int | None:
        """The head count Q/K rows are grouped by (None: not a Q/K tensor)."""
        if gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
            return self.n_head
        if gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
            return self.n_head_kv
        return None

    def to_gguf(self, gguf_name, data):
        heads = self._heads(gguf_name)
        return data if heads is None else permute_rows(data, heads)

    def from_gguf(self, gguf_name, data):
        heads = self._heads(gguf_name)
        return data if heads is None else unpermute_rows(data, heads)

    def extra_tensors(self):
        kind, s = self.rope_scaling()
        if kind != "llama3":
            return []
        return [("rope_freqs.weight", llama3_rope_factors(self.head_dim, self.rope_theta, s, self.original_context(s)))]


@register
class Mistral(Llama):
    """Mistral's checkpoints are llama's; a llama GGUF imports as Llama."""

    hf_names = ("MistralForCausalLM",)
    model_types = ("mistral",)
    importable = False


def llama3_rope_factors(head_dim: int, theta: float, s: dict, original_context: int) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1-style rope scaling (llama.cpp reads them as rope_freqs)."""
    factor = float(s.get("factor", 8.0))
    low = float(s.get("low_freq_factor", 1.0))
    high = float(s.get("high_freq_factor", 4.0))
    old_ctx = float(original_context)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)
