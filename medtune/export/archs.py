"""Architecture registry for the GGUF writer: one small class per Hugging Face architecture.

An entry says which llama.cpp architecture a model becomes, how its tensors are named there, which
tensors are transformed on the way (llama's Q/K row permutation), and which hyper-parameters go
into the GGUF metadata. A new architecture is one subclass that overrides only what differs,
registered under its `config.json` `architectures[0]` name.

RoPE scaling: `linear` and `yarn` are read by llama.cpp's common loader for every architecture
(`rope.scaling.*` keys); `llama3` is a per-frequency divisor tensor (`rope_freqs`) that only the
llama graph applies. An entry lists the kinds it can express; anything else is refused up front.
"""

from __future__ import annotations

import math
import re

import numpy as np

from medtune.core.errors import BadInput

# HF per-layer module -> GGUF per-block name (the dense decoder layout shared by llama-like models).
LLAMA_BLOCK = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
# Qwen3 normalises each head's queries and keys (RMSNorm over head_dim) before the rotary embedding.
QWEN3_BLOCK = {**LLAMA_BLOCK, "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
LLAMA_GLOBAL = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_GLOBAL = re.compile(r"(.+)\.(weight|bias)")

REGISTRY: dict[str, type["Arch"]] = {}


def register(*hf_names: str):
    def deco(cls):
        for name in hf_names:
            REGISTRY[name] = cls
        return cls

    return deco


def supported() -> list[str]:
    return sorted(REGISTRY)


class Arch:
    """Base: a dense decoder with llama-style tensor names. Subclasses override what differs."""

    gguf_arch: str = ""
    block_map: dict[str, str] = LLAMA_BLOCK
    global_map: dict[str, str] = LLAMA_GLOBAL
    # Per-block GGUF parts whose bias llama.cpp's graph adds (None: any). A bias elsewhere is refused as
    # a tensor with no GGUF counterpart, since llama.cpp would not load a file carrying it.
    bias_parts: tuple[str, ...] | None = None
    rope_kinds: tuple[str, ...] = ("linear", "yarn")  # rope scaling kinds the entry can write
    # HF tensors that carry nothing llama.cpp needs (recomputed buffers).
    ignore = re.compile(r".*rotary_emb\.inv_freq|.*\.masked_bias|.*\.attn\.bias")

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.hf_arch = (cfg.get("architectures") or ["?"])[0]

    # ---- config helpers -------------------------------------------------------------------------
    def get(self, *keys, default=None):
        for key in keys:
            if self.cfg.get(key) is not None:
                return self.cfg[key]
        if default is not None:
            return default
        raise BadInput(f"config.json has no {' / '.join(keys)}", where="config.json",
                       hint=f"a {self.hf_arch} config needs it; re-save the model with transformers")

    @property
    def n_head(self) -> int:
        return int(self.get("num_attention_heads"))

    @property
    def n_head_kv(self) -> int:
        return int(self.get("num_key_value_heads", default=self.n_head))

    @property
    def head_dim(self) -> int:
        hd = self.cfg.get("head_dim")
        return int(hd) if hd else int(self.get("hidden_size")) // self.n_head

    @property
    def tied(self) -> bool:
        return bool(self.cfg.get("tie_word_embeddings", False))

    @property
    def context_length(self) -> int:
        return int(self.get("max_position_embeddings"))

    # ---- tensors --------------------------------------------------------------------------------
    def gguf_name(self, hf_name: str) -> str | None:
        """GGUF name for an HF tensor; "" means: skip it on purpose; None means: unknown."""
        if self.ignore.fullmatch(hf_name):
            return ""
        m = _LAYER.fullmatch(hf_name)
        if m:
            part = self.block_map.get(m.group(2))
            if m.group(3) == "bias" and self.bias_parts is not None and part not in self.bias_parts:
                return None
            return f"blk.{m.group(1)}.{part}.{m.group(3)}" if part else None
        m = _GLOBAL.fullmatch(hf_name)
        if m and m.group(1) in self.global_map:
            name = self.global_map[m.group(1)]
            if name == "output" and self.tied:
                return ""  # llama.cpp reuses token_embd when output.weight is absent
            return f"{name}.{m.group(2)}"
        return None

    def transform(self, gguf_name: str, data: np.ndarray) -> np.ndarray:
        """Change a tensor's layout on its way into the GGUF (default: none)."""
        return data

    def extra_tensors(self) -> list[tuple[str, np.ndarray]]:
        """Tensors computed from the config rather than read from the checkpoint."""
        return []

    # ---- metadata -------------------------------------------------------------------------------
    def hparams(self, vocab_size: int) -> list[tuple[str, str, object]]:
        """(key without the arch prefix, gguf value type, value) triples: the dense decoder's set."""
        h = [
            ("vocab_size", "u32", vocab_size),
            ("context_length", "u32", self.context_length),
            ("embedding_length", "u32", int(self.get("hidden_size"))),
            ("block_count", "u32", int(self.get("num_hidden_layers"))),
            ("feed_forward_length", "u32", int(self.get("intermediate_size"))),
            ("attention.head_count", "u32", self.n_head),
            ("attention.head_count_kv", "u32", self.n_head_kv),
            ("attention.layer_norm_rms_epsilon", "f32", float(self.get("rms_norm_eps"))),
            ("rope.freq_base", "f32", self.rope_theta),
            ("rope.dimension_count", "u32", self.head_dim),
        ]
        if self.head_dim * self.n_head != int(self.get("hidden_size")):
            # llama.cpp assumes hidden_size / heads otherwise (Qwen3-0.6B: 1024 / 16 = 64, head_dim 128).
            h += [("attention.key_length", "u32", self.head_dim), ("attention.value_length", "u32", self.head_dim)]
        return h + self.rope_scaling_hparams()

    def check(self) -> None:
        """Refuse configurations this entry cannot express (before anything is written)."""
        kind, s = self.rope_scaling()
        if kind is None:
            return
        if kind not in self.rope_kinds:
            raise BadInput(f"rope scaling {kind!r} is not supported for {self.hf_arch} export", where="config.json",
                           hint=f"supported: none, {', '.join(self.rope_kinds)}")
        if kind in ("linear", "yarn") and not s.get("factor"):
            raise BadInput(f"{kind} rope scaling without a factor", where="config.json",
                           hint="set rope_scaling.factor (the context extension ratio)")
        if kind == "yarn":
            # llama.cpp's loader reads the factor, the original context and an attention factor; it uses
            # beta_fast 32 / beta_slow 1 and a truncated correction range, as transformers does by default.
            odd = [k for k in ("mscale", "mscale_all_dim") if s.get(k)]
            odd += [k for k, default in (("beta_fast", 32), ("beta_slow", 1)) if s.get(k) not in (None, default)]
            if s.get("truncate") is False:
                odd.append("truncate")
            if odd:
                raise BadInput(f"yarn rope scaling with {', '.join(odd)} cannot be written for llama.cpp",
                               where="config.json",
                               hint="llama.cpp would compute different rotary frequencies; export with "
                                    "llama.cpp's convert_hf_to_gguf.py and check the result")

    # ---- rope -----------------------------------------------------------------------------------
    @property
    def rope_theta(self) -> float:
        return float(self.get("rope_theta", default=10000.0))

    def rope_scaling(self) -> tuple[str | None, dict]:
        """(kind, parameters) of the config's rope scaling; kind None when there is none."""
        s = self.cfg.get("rope_scaling")
        if not isinstance(s, dict):
            return None, {}
        kind = s.get("rope_type") or s.get("type")
        return (None if kind in (None, "default") else kind), s

    def original_context(self, s: dict) -> int:
        """The pre-training context of a scaled rope (transformers' fallback: max_position_embeddings)."""
        return int(s.get("original_max_position_embeddings") or self.cfg.get("original_max_position_embeddings")
                   or self.context_length)

    def rope_scaling_hparams(self) -> list[tuple[str, str, object]]:
        kind, s = self.rope_scaling()
        if kind == "linear":
            return [("rope.scaling.type", "str", "linear"), ("rope.scaling.factor", "f32", float(s["factor"]))]
        if kind != "yarn":
            return []
        factor = float(s["factor"])
        h = [("rope.scaling.type", "str", "yarn"), ("rope.scaling.factor", "f32", factor),
             ("rope.scaling.original_context_length", "u32", self.original_context(s))]
        if s.get("attention_factor") is not None:
            # transformers scales cos/sin by attention_factor (default 0.1 ln(factor) + 1); llama.cpp by
            # that default times rope.scaling.attn_factor.
            default = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
            h.append(("rope.scaling.attn_factor", "f32", float(s["attention_factor"]) / default))
        return h


def _permute_qk(arch: "Arch", gguf_name: str, data: np.ndarray) -> np.ndarray:
    from medtune.models.gguf_import import permute_rows

    if gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
        return permute_rows(data, arch.n_head)
    if gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
        return permute_rows(data, arch.n_head_kv)
    return data


@register("LlamaForCausalLM", "MistralForCausalLM")
class Llama(Arch):
    gguf_arch = "llama"
    rope_kinds = ("linear", "yarn", "llama3")

    def transform(self, gguf_name, data):
        # llama.cpp's llama graph applies rotary embedding to adjacent pairs: regroup Q/K rows per head.
        return _permute_qk(self, gguf_name, data)

    def extra_tensors(self):
        kind, s = self.rope_scaling()
        if kind != "llama3":
            return []
        return [("rope_freqs.weight", llama3_rope_factors(self.head_dim, self.rope_theta, s,
                                                          self.original_context(s)))]


@register("Qwen2ForCausalLM")
class Qwen2(Arch):
    """Qwen2/2.5: llama's layout plus q/k/v biases; NEOX rotary (halves), so no Q/K permutation."""

    gguf_arch = "qwen2"
    bias_parts = ("attn_q", "attn_k", "attn_v")

    def check(self):
        super().check()
        if self.cfg.get("use_sliding_window"):
            raise BadInput(f"{self.hf_arch} with use_sliding_window cannot be exported", where="config.json",
                           hint="llama.cpp's qwen2/qwen3 graphs attend to the whole context; "
                                "set use_sliding_window to false if the model was trained that way")


@register("Qwen3ForCausalLM")
class Qwen3(Qwen2):
    """Qwen3: Qwen2's layout (biases off unless attention_bias) plus per-head q/k RMSNorms; head_dim is
    explicit and may differ from hidden_size / heads."""

    gguf_arch = "qwen3"
    block_map = QWEN3_BLOCK


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


def for_config(cfg: dict, where: str = "config.json") -> Arch:
    """The registry entry for this config, or BadInput naming the supported architectures."""
    names = cfg.get("architectures") or []
    name = names[0] if names else None
    cls = REGISTRY.get(name)
    if cls is None:
        raise BadInput(
            f"architecture {name!r} cannot be exported to GGUF yet (supported: {', '.join(supported())})",
            where=where,
            hint="export with llama.cpp's converter: --converter llama.cpp --llama-cpp DIR (a llama.cpp checkout)",
        )
    arch = cls(cfg)
    arch.check()
    return arch
