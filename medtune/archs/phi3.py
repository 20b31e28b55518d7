"""Phi-3 / Phi-3.5-mini / Phi-4-mini (`Phi3ForCausalLM`): fused Q/K/V and gate/up projections, NEOX rotary.

What llama.cpp's phi3 graph expects, and why no tensor changes layout:
- `qkv_proj` is written as `attn_qkv`: rows Q, then K, then V, which is the order the graph splits it in;
- `gate_up_proj` is written as `ffn_up` ({n_embd, 2 n_ff}): the graph's SwiGLU activates the first half and
  multiplies by the second, as transformers' `gate, up = chunk(2)` does;
- the rotary embedding rotates halves (NEOX), as transformers does: no Q/K row permutation.

RoPE: a partial rotary factor (Phi-4-mini: 0.75) becomes `rope.dimension_count`. LongRoPE ("longrope", the
older name "su") becomes `rope_factors_long` / `rope_factors_short` tensors, the original context and an
attention factor (transformers' default, sqrt(1 + ln(factor) / ln(original context)), when the config sets
none). llama.cpp takes the long factors when the context it is run with exceeds the original context;
transformers when the sequence does: the two agree on a run whose context and prompt are on the same side.

Sliding window: llama.cpp's phi3 graph disables it and attends to the whole context. Phi-3-mini-4k's window
(2047 of 4096 positions) is accepted with a notice: up to the window the two compute the same thing.
"""

from __future__ import annotations

import math

import numpy as np

from medtune.archs.base import Arch, register
from medtune.core.errors import BadInput

_FACTOR_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight")


@register
class Phi3(Arch):
    hf_names = ("Phi3ForCausalLM",)
    model_types = ("phi3",)
    model_arch = "PHI3"
    tensors = {
        "TOKEN_EMBD": "model.embed_tokens",
        "OUTPUT_NORM": "model.norm",
        "OUTPUT": "lm_head",
        "ATTN_NORM": "model.layers.{bid}.input_layernorm",
        "ATTN_QKV": "model.layers.{bid}.self_attn.qkv_proj",
        "ATTN_OUT": "model.layers.{bid}.self_attn.o_proj",
        "FFN_NORM": "model.layers.{bid}.post_attention_layernorm",
        "FFN_UP": "model.layers.{bid}.mlp.gate_up_proj",
        "FFN_DOWN": "model.layers.{bid}.mlp.down_proj",
    }
    bias_kinds = ()  # Phi-3 has no biases; one in a checkpoint is refused rather than dropped
    rope_kinds = ("longrope", "su")
    computed = _FACTOR_TENSORS
    hf_extra = {"hidden_act": "silu", "pad_token_id": None, "sliding_window": None}

    # ---- config helpers -------------------------------------------------------------------------
    @property
    def partial_rotary_factor(self) -> float:
        """transformers 5 keeps it in rope_parameters, older configs (and mlx_lm) at the top level."""
        rope = self.cfg.get("rope_parameters") or {}
        for source in (rope, self.cfg.get("rope_scaling") or {}, self.cfg):
            if isinstance(source, dict) and source.get("partial_rotary_factor") is not None:
                return float(source["partial_rotary_factor"])
        return 1.0

    @property
    def rope_dims(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def _longrope(self) -> dict | None:
        kind, s = self.rope_scaling()
        return s if kind in self.rope_kinds else None

    def _attention_factor(self, s: dict) -> float:
        """transformers' LongRoPE cos/sin scale."""
        if s.get("attention_factor") is not None:
            return float(s["attention_factor"])
        orig = self.original_context(s)
        factor = float(s.get("factor") or self.context_length / orig)
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))

    # ---- refusals -------------------------------------------------------------------------------
    def check(self) -> None:
        super().check()
        if self.head_dim * self.n_head != int(self.get("hidden_size")):
            raise BadInput(
                f"{self.hf_arch} with head_dim {self.head_dim} != hidden_size / num_attention_heads",
                where="config.json",
                hint="llama.cpp's phi3 graph sizes the attention output projection as hidden_size x hidden_size",
            )
        s = self._longrope()
        if s is None:
            return
        want = self.rope_dims // 2
        for key in ("long_factor", "short_factor"):
            got = s.get(key)
            if not isinstance(got, list) or len(got) != want:
                raise BadInput(
                    f"longrope rope scaling needs {key} with {want} numbers (rope dimensions / 2)",
                    where="config.json",
                    hint="rope_scaling (rope_parameters) of a LongRoPE model lists long_factor and short_factor",
                )

    def notice(self) -> str | None:
        window = self.cfg.get("sliding_window")
        if window and int(window) < self.context_length:
            return (
                f"sliding_window {window} < context {self.context_length}: llama.cpp's phi3 graph attends to the "
                f"whole context, so prompts longer than {window} tokens are computed differently from transformers"
            )
        return None

    # ---- hyper-parameters and tensors -----------------------------------------------------------
    def hparams(self, vocab_size: int) -> list[tuple[str, str, object]]:
        from gguf import Keys

        rope_dim = Keys.Rope.DIMENSION_COUNT.format(arch=self.gguf_arch())
        return [(k, t, self.rope_dims if k == rope_dim else v) for k, t, v in super().hparams(vocab_size)]

    def rope_scaling_hparams(self) -> list[tuple[str, str, object]]:
        from gguf import Keys

        s = self._longrope()
        if s is None:
            return []
        # No scaling type: llama.cpp's default (linear, factor 1) leaves the frequencies to the factor tensors.
        return [
            (Keys.Rope.SCALING_ORIG_CTX_LEN, "u32", self.original_context(s)),
            (Keys.Rope.SCALING_ATTN_FACTOR, "f32", self._attention_factor(s)),
        ]

    def extra_tensors(self) -> list[tuple[str, np.ndarray]]:
        s = self._longrope()
        if s is None:
            return []
        return [
            ("rope_factors_long.weight", np.asarray(s["long_factor"], dtype=np.float32)),
            ("rope_factors_short.weight", np.asarray(s["short_factor"], dtype=np.float32)),
        ]

    # ---- config.json ----------------------------------------------------------------------------
    @classmethod
    def normalise_config(cls, cfg: dict) -> dict:
        """mlx_lm reads partial_rotary_factor at the top level and a LongRoPE rope_scaling by its `type`."""
        rope = cfg.get("rope_parameters")
        if isinstance(rope, dict) and rope.get("partial_rotary_factor") is not None:
            cfg.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
        s = cfg.get("rope_scaling")
        if isinstance(s, dict) and s.get("rope_type") and not s.get("type"):
            cfg["rope_scaling"] = {**s, "type": s["rope_type"]}
        return cfg

    @classmethod
    def config_from_gguf(cls, meta: dict, tensor_names: set[str], n_vocab: int) -> dict:
        if tensor_names & set(_FACTOR_TENSORS):
            raise BadInput(
                "a phi3 GGUF with LongRoPE factors (rope_factors_long/short) cannot be imported",
                where="GGUF",
                hint="the factors live in tensors that config.json must list; pass the model's Hugging Face "
                "folder instead of the .gguf",
            )
        from gguf import Keys

        cfg = super().config_from_gguf(meta, tensor_names, n_vocab)
        rope_dims = meta.get(Keys.Rope.DIMENSION_COUNT.format(arch=cls.gguf_arch()))
        rope = {"rope_type": "default", "rope_theta": cfg["rope_theta"]}
        if rope_dims is not None and int(rope_dims) != cfg["head_dim"]:
            rope["partial_rotary_factor"] = int(rope_dims) / cfg["head_dim"]
            cfg["partial_rotary_factor"] = rope["partial_rotary_factor"]
        cfg["rope_parameters"] = rope
        return cfg
