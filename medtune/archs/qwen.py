"""Qwen2/2.5 and Qwen3: llama's layout with NEOX rotary (halves, as transformers), so no Q/K permutation."""

from __future__ import annotations

from medtune.archs.base import Arch, register
from medtune.core.errors import BadInput


@register
class Qwen2(Arch):
    """Qwen2/2.5: llama's layout plus q/k/v biases."""

    hf_names = ("Qwen2ForCausalLM",)
    model_types = ("qwen2",)
    model_arch = "QWEN2"
    bias_kinds = ("ATTN_Q", "ATTN_K", "ATTN_V")

    def check(self):
        super().check()
        if self.cfg.get("use_sliding_window"):
            raise BadInput(
                f"{self.hf_arch} with use_sliding_window cannot be exported",
                where="config.json",
                hint="llama.cpp's qwen2/qwen3 graphs attend to the whole context; "
                "set use_sliding_window to false if the model was trained that way",
            )


@register
class Qwen3(Qwen2):
    """Qwen3: Qwen2's layout (biases off unless attention_bias) plus per-head q/k RMSNorms; head_dim is explicit
    and may differ from hidden_size / heads (written as key_length/value_length)."""

    hf_names = ("Qwen3ForCausalLM",)
    model_types = ("qwen3",)
    model_arch = "QWEN3"
    tensors = {
        **Qwen2.tensors,
        "ATTN_Q_NORM": "model.layers.{bid}.self_attn.q_norm",
        "ATTN_K_NORM": "model.layers.{bid}.self_attn.k_norm",
    }
    hf_extra = {"hidden_act": "silu", "attention_bias": False}
