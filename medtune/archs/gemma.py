"""Gemma 3 (text) and Gemma 3 / MedGemma multimodal checkpoints, as llama.cpp's `gemma3` graph runs them.

What differs from the dense base, and how each side computes it:

- Norms: transformers' Gemma3RMSNorm scales by (1 + w); llama.cpp's graph by the GGUF weight itself. Export
  writes w + 1 (`to_gguf`), import subtracts it (`from_gguf`). Four norms per layer (input, post-attention,
  pre- and post-feed-forward) plus per-head q/k norms.
- Embeddings: both sides multiply by sqrt(hidden_size) themselves (nothing to write). Rotary: NEOX halves on both
  sides (no Q/K permutation).
- Sliding-window attention: llama.cpp reads `attention.sliding_window` and a layer pattern "every P-th layer is
  global" (`attention.sliding_window_pattern`, default 6), which is also the only pattern mlx_lm can run; HF
  `layer_types` must have that shape. Sliding layers use the local rotary base (`rope.freq_base_swa`) and no
  rope scaling; global layers `rope.freq_base` and the linear scaling (Gemma 3 4B and larger). The pattern key
  is written only when P is not 6 (Ollama's own gemma3 engine assumes 6); both bases are also written under the
  names Ollama's engine reads.
- Attention scale: llama.cpp uses 1/sqrt(head_dim) (62-layer models: 1/sqrt(hidden/heads)) and reads no key for
  it, so `query_pre_attn_scalar` must equal that. Final-logit softcapping is written; attention-logit softcapping
  (which the graph ignores) is refused.

Multimodal checkpoints (`Gemma3ForConditionalGeneration`: MedGemma 4B, Gemma 3 4B+ -it) export their language
model only: the text_config becomes the config, the language-model tensors lose their prefix, and the vision
tower and projector are left out (`notice` says so). The GGUF then answers text only.
"""

from __future__ import annotations

import functools

import numpy as np

from medtune.archs.base import Arch, register
from medtune.core.errors import BadInput

# transformers' Gemma3TextConfig defaults, for configs (a multimodal text_config) that leave keys out
TEXT_DEFAULTS = {
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 256,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 131072,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10_000.0,
    "hidden_activation": "gelu_pytorch_tanh",
}
LOCAL_THETA = 10_000.0  # llama.cpp's rotary base of sliding layers when the GGUF names none
DEFAULT_PATTERN = 6  # llama.cpp's (and mlx_lm's) pattern when none is written: 5 sliding layers, then 1 global
LARGE_LAYERS = 62  # Gemma 3 27B: llama.cpp scales attention by 1/sqrt(hidden/heads) at this layer count


def pattern_of(layer_types: list[str]) -> int | None:
    """P when `layer_types` is "every P-th layer global" (layer i global iff (i + 1) % P == 0; P = len + 1 would
    mean no global layer at all, which mlx_lm cannot run: None), else None."""
    if "full_attention" not in layer_types:
        return None
    p = layer_types.index("full_attention") + 1
    want = ["full_attention" if (i + 1) % p == 0 else "sliding_attention" for i in range(len(layer_types))]
    return p if list(layer_types) == want else None


def layer_types_of(n_layers: int, pattern: int) -> list[str]:
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)]


def normalise_text_config(cfg: dict) -> dict:
    """transformers 5 writes rope_parameters per layer type and a `layer_types` list; mlx_lm (and our export)
    read rope_theta, rope_local_base_freq, rope_scaling and sliding_window_pattern. Adds those (never overwrites)."""
    cfg = dict(cfg)
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict) and isinstance(rope.get("full_attention"), dict):
        full, local = rope["full_attention"], rope.get("sliding_attention") or {}
        if full.get("rope_theta") is not None:
            cfg.setdefault("rope_theta", full["rope_theta"])
        if local.get("rope_theta") is not None:
            cfg.setdefault("rope_local_base_freq", local["rope_theta"])
        if full.get("rope_type") not in (None, "default") and not cfg.get("rope_scaling"):
            cfg["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"}
    types = cfg.get("layer_types")
    if isinstance(types, list) and "sliding_window_pattern" not in cfg and pattern_of(types):
        cfg["sliding_window_pattern"] = pattern_of(types)
    return cfg


def _refuse(what: str, hint: str) -> BadInput:
    return BadInput(f"{what} cannot be exported for llama.cpp's gemma3", where="config.json", hint=hint)


@register
class Gemma3(Arch):
    hf_names = ("Gemma3ForCausalLM",)
    model_types = ("gemma3_text",)
    model_arch = "GEMMA3"
    tensors = {k: v for k, v in Arch.tensors.items() if k != "FFN_NORM"} | {  # four norms per block, q/k norms
        "ATTN_Q_NORM": "model.layers.{bid}.self_attn.q_norm",
        "ATTN_K_NORM": "model.layers.{bid}.self_attn.k_norm",
        "ATTN_POST_NORM": "model.layers.{bid}.post_attention_layernorm",
        "FFN_PRE_NORM": "model.layers.{bid}.pre_feedforward_layernorm",
        "FFN_POST_NORM": "model.layers.{bid}.post_feedforward_layernorm",
    }
    bias_kinds = ()  # the graph adds no bias: attention_bias=True checkpoints are refused
    rope_kinds = ("linear",)  # yarn would reach the sliding layers too in llama.cpp, not in transformers
    hf_extra = {"hidden_activation": "gelu_pytorch_tanh", "attention_bias": False}

    def __init__(self, cfg: dict):
        super().__init__({**TEXT_DEFAULTS, **normalise_text_config(cfg)})

    @classmethod
    def normalise_config(cls, cfg: dict) -> dict:
        return normalise_text_config(cfg)

    # ---- tensors: the (1 + w) norms -----------------------------------------------------------
    @staticmethod
    def _shifted(gguf_name: str) -> bool:
        return gguf_name.endswith("norm.weight")

    def to_gguf(self, gguf_name, data):
        return data + np.float32(1.0) if self._shifted(gguf_name) else data

    def from_gguf(self, gguf_name, data):
        return data - np.float32(1.0) if self._shifted(gguf_name) else data

    # ---- layers and attention -------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return int(self.get("num_hidden_layers"))

    @property
    def layer_types(self) -> list[str]:
        types = self.cfg.get("layer_types")
        if isinstance(types, list) and types:
            return list(types)
        return layer_types_of(self.n_layers, int(self.cfg.get("sliding_window_pattern") or DEFAULT_PATTERN))

    @property
    def sliding(self) -> bool:
        return "sliding_attention" in self.layer_types and bool(self.cfg.get("sliding_window"))

    def attention_scalar(self) -> float:
        """What llama.cpp divides queries by the square root of."""
        if self.n_layers == LARGE_LAYERS:
            return int(self.get("hidden_size")) / self.n_head
        return float(self.head_dim)

    def check(self) -> None:
        super().check()
        cfg = self.cfg
        act = cfg.get("hidden_activation") or cfg.get("hidden_act")
        if act not in (None, "gelu_pytorch_tanh"):
            raise _refuse(f"hidden_activation {act!r}", "llama.cpp's gemma3 graph uses tanh-approximated GELU only")
        if cfg.get("attn_logit_softcapping"):
            raise _refuse(
                "attn_logit_softcapping", "llama.cpp's gemma3 graph does not cap attention logits (Gemma 2 did)"
            )
        if cfg.get("use_bidirectional_attention"):
            raise _refuse("use_bidirectional_attention", "llama.cpp's gemma3 graph attends causally only")
        scalar = float(cfg["query_pre_attn_scalar"])
        if scalar != self.attention_scalar():
            raise _refuse(
                f"query_pre_attn_scalar {cfg['query_pre_attn_scalar']}",
                f"llama.cpp scales attention by 1/sqrt({self.attention_scalar():g}) for this shape and reads no key "
                "for it",
            )
        types = self.layer_types
        if len(types) != self.n_layers or set(types) - {"sliding_attention", "full_attention"}:
            raise _refuse("layer_types", f"give one of sliding_attention/full_attention per layer ({self.n_layers})")
        if "sliding_attention" in types and pattern_of(types) is None:
            raise _refuse(
                f"layer_types {types}",
                "llama.cpp and mlx_lm run one pattern: every P-th layer global, the others sliding",
            )
        local = (cfg.get("rope_parameters") or {}).get("sliding_attention") or {}
        if local.get("rope_type") not in (None, "default"):
            raise _refuse(
                f"rope scaling {local['rope_type']!r} on the sliding layers",
                "llama.cpp scales the rotary frequencies of the global layers only",
            )

    # ---- hyper-parameters -----------------------------------------------------------------------
    def hparams(self, vocab_size: int) -> list[tuple[str, str, object]]:
        from gguf import Keys

        h = [kv for kv in super().hparams(vocab_size) if not kv[0].endswith((".key_length", ".value_length"))]
        # always written: other runtimes (Ollama's gemma3) assume 256 when they are absent
        extra = [
            (Keys.Attention.KEY_LENGTH, "u32", self.head_dim),
            (Keys.Attention.VALUE_LENGTH, "u32", self.head_dim),
        ]
        if self.sliding:
            extra.append((Keys.Attention.SLIDING_WINDOW, "u32", int(self.cfg["sliding_window"])))
            pattern = pattern_of(self.layer_types)
            if pattern != DEFAULT_PATTERN:
                extra.append((Keys.Attention.SLIDING_WINDOW_PATTERN, "u32", pattern))
            extra.append((Keys.Rope.FREQ_BASE_SWA, "f32", float(self.cfg["rope_local_base_freq"])))
        # Ollama's own gemma3 engine reads its converter's names for the two bases (defaults 1e6 and 1e4);
        # llama.cpp ignores them
        extra += [
            ("{arch}.rope.global.freq_base", "f32", self.rope_theta),
            ("{arch}.rope.local.freq_base", "f32", float(self.cfg["rope_local_base_freq"])),
        ]
        if self.cfg.get("final_logit_softcapping"):
            extra.append((Keys.LLM.FINAL_LOGIT_SOFTCAPPING, "f32", float(self.cfg["final_logit_softcapping"])))
        arch = self.gguf_arch()
        return h + [(key.format(arch=arch), vtype, value) for key, vtype, value in extra]

    @classmethod
    def config_from_gguf(cls, meta: dict, tensor_names: set[str], n_vocab: int) -> dict:
        from gguf import Keys

        key = functools.partial(cls.gguf_value, meta)
        cfg = super().config_from_gguf(meta, tensor_names, n_vocab)
        n_layers = cfg["num_hidden_layers"]
        window = int(key(Keys.Attention.SLIDING_WINDOW, 0))
        pattern = key(Keys.Attention.SLIDING_WINDOW_PATTERN, DEFAULT_PATTERN)
        if isinstance(pattern, list):  # per-layer flags (true: sliding)
            types = ["sliding_attention" if s else "full_attention" for s in pattern][:n_layers]
        else:
            types = layer_types_of(n_layers, int(pattern))
        if not window:
            types = ["full_attention"] * n_layers
        cfg.update(
            sliding_window=window or None,
            layer_types=types,
            rope_local_base_freq=float(key(Keys.Rope.FREQ_BASE_SWA, LOCAL_THETA)),
            query_pre_attn_scalar=(
                cfg["hidden_size"] // cfg["num_attention_heads"] if n_layers == LARGE_LAYERS else cfg["head_dim"]
            ),
            final_logit_softcapping=key(Keys.LLM.FINAL_LOGIT_SOFTCAPPING),
            attn_logit_softcapping=None,
        )
        if pattern_of(types):
            cfg["sliding_window_pattern"] = pattern_of(types)
        if key(Keys.Rope.SCALING_TYPE) == "linear":
            cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(key(Keys.Rope.SCALING_FACTOR))}
        return cfg


# ---- multimodal checkpoints: the language model only ---------------------------------------------------
# (prefix in the checkpoint, the text model's name for it): transformers 5 and 4.5x layouts, mlx_lm's fuse
_LM_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
_VISION_PREFIXES = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector.")


@register
class Gemma3Multimodal(Gemma3):
    """Gemma3ForConditionalGeneration (MedGemma 4B, Gemma 3 4B+ -it): its language model, as Gemma3.
    A gemma3 GGUF imports as Gemma3ForCausalLM."""

    hf_names = ("Gemma3ForConditionalGeneration",)
    model_types = ("gemma3",)
    importable = False

    def __init__(self, cfg: dict):
        text = cfg.get("text_config")
        if not isinstance(text, dict):
            raise BadInput(
                "a Gemma3ForConditionalGeneration config.json without text_config",
                where="config.json",
                hint="re-save the model with transformers",
            )
        text = {"tie_word_embeddings": cfg.get("tie_word_embeddings", True), **text}
        super().__init__(text)
        self.hf_arch = self.hf_names[0]

    @classmethod
    def normalise_config(cls, cfg: dict) -> dict:
        if isinstance(cfg.get("text_config"), dict):
            cfg = {**cfg, "text_config": normalise_text_config(cfg["text_config"])}
        return cfg

    def notice(self) -> str:
        return (
            f"{self.hf_arch}: exporting the language model only; the vision tower and projector are left out, "
            "so the GGUF (and the Ollama model) answers text prompts only"
        )

    def gguf_name(self, hf_name: str) -> str | None:
        if hf_name.startswith(_VISION_PREFIXES):
            return ""
        for prefix, text in _LM_PREFIXES:
            if hf_name.startswith(prefix):
                return super().gguf_name(text + hf_name[len(prefix) :])
        return super().gguf_name(hf_name)
