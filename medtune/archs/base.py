"""The base architecture: a dense decoder with llama-style tensors, and the registry of architectures.

An architecture class says everything medtune needs about one model family, in both directions:

- its Hugging Face names (`config.json` `architectures[0]`, `model_type`) and gguf-py's `MODEL_ARCH`;
- its tensors: gguf-py's tensor kinds (`MODEL_TENSOR`) with the transformers module that holds each. The GGUF
  names come from gguf-py (`TENSOR_NAMES`), and gguf-py's own `TensorNameMap` must map our transformers name to
  the same kind (checked the first time an architecture's names are built);
- the tensor transforms as a pair: `to_gguf` on export and `from_gguf` on import (llama's Q/K permutation);
- its hyper-parameters as GGUF keys (gguf-py's `Keys`), and back from them into a `config.json`;
- what it refuses (rope scalings it cannot express, ...), before anything is written.

A new architecture is a subclass that overrides only what differs, decorated with `@register`.
gguf is imported inside the functions that need it: this module is light to import.
"""

from __future__ import annotations

import functools
import math
import re

import numpy as np

from medtune.core.errors import BadInput

REGISTRY: dict[str, type["Arch"]] = {}  # HF architecture name -> class
MODEL_TYPES: dict[str, str] = {}  # HF model_type -> HF architecture name

_SUFFIX = re.compile(r"(.+)\.(weight|bias)")
_HF_BLOCK = re.compile(r"(.+\.layers)\.(\d+)\.(.+)")
_GGUF_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)")


def register(cls: type["Arch"]) -> type["Arch"]:
    """Class decorator: the class answers for its `hf_names` and `model_types`."""
    for name in cls.hf_names:
        REGISTRY[name] = cls
    for model_type in cls.model_types:
        MODEL_TYPES.setdefault(model_type, cls.hf_names[0])
    return cls


def supported() -> list[str]:
    return sorted(REGISTRY)


def _template(name: str, block: re.Pattern) -> tuple[str, str | None]:
    """("model.layers.{bid}.mlp.up_proj", "3") for a block tensor's base name, (name, None) for a global one."""
    m = block.fullmatch(name)
    if not m:
        return name, None
    if block is _HF_BLOCK:
        return f"{m.group(1)}.{{bid}}.{m.group(3)}", m.group(2)
    return f"blk.{{bid}}.{m.group(2)}", m.group(1)


def _translate(name: str, block: re.Pattern, table: dict[str, str]) -> tuple[str, str | None, str, str] | None:
    """(template, block index, weight/bias, the other side's template) of a tensor name through one of
    `Arch.name_maps`' tables; None when the table has no such tensor."""
    m = _SUFFIX.fullmatch(name)
    if not m:
        return None
    base, suffix = m.groups()
    template, bid = _template(base, block)
    target = table.get(template)
    return None if target is None else (template, bid, suffix, target)


class Arch:
    """Base: a dense decoder with llama-style tensors. Subclasses override what differs."""

    hf_names: tuple[str, ...] = ()  # config.json architectures[0]; the first is the one import writes
    model_types: tuple[str, ...] = ()  # config.json model_type; the first is the one import writes
    model_arch: str = ""  # gguf.MODEL_ARCH member name
    importable: bool = True  # a GGUF of this MODEL_ARCH imports as this class (False: a sibling answers)
    # gguf.MODEL_TENSOR member name -> the transformers module holding it ({bid}: the layer index)
    tensors: dict[str, str] = {
        "TOKEN_EMBD": "model.embed_tokens",
        "OUTPUT_NORM": "model.norm",
        "OUTPUT": "lm_head",
        "ATTN_NORM": "model.layers.{bid}.input_layernorm",
        "ATTN_Q": "model.layers.{bid}.self_attn.q_proj",
        "ATTN_K": "model.layers.{bid}.self_attn.k_proj",
        "ATTN_V": "model.layers.{bid}.self_attn.v_proj",
        "ATTN_OUT": "model.layers.{bid}.self_attn.o_proj",
        "FFN_NORM": "model.layers.{bid}.post_attention_layernorm",
        "FFN_GATE": "model.layers.{bid}.mlp.gate_proj",
        "FFN_UP": "model.layers.{bid}.mlp.up_proj",
        "FFN_DOWN": "model.layers.{bid}.mlp.down_proj",
    }
    # Block tensor kinds whose bias llama.cpp's graph adds (None: any). A bias elsewhere is refused as a tensor
    # with no GGUF counterpart, since llama.cpp would not load a file carrying it.
    bias_kinds: tuple[str, ...] | None = None
    rope_kinds: tuple[str, ...] = ("linear", "yarn")  # rope scaling kinds the class can write
    # HF tensors that carry nothing llama.cpp needs (recomputed buffers).
    ignore = re.compile(r".*rotary_emb\.inv_freq|.*\.masked_bias|.*\.attn\.bias")
    # GGUF tensors computed from the hyper-parameters (llama.cpp's rope factors): import skips them, HF recomputes.
    computed = ("rope_freqs.weight",)
    hf_extra: dict = {"hidden_act": "silu"}  # config.json keys an imported model gets that no GGUF key carries

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.hf_arch = (cfg.get("architectures") or ["?"])[0]

    # ---- names ----------------------------------------------------------------------------------
    @classmethod
    def gguf_arch(cls) -> str:
        """The GGUF's general.architecture (gguf-py's MODEL_ARCH_NAMES)."""
        import gguf

        return gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[cls.model_arch]]

    @classmethod
    @functools.cache
    def name_maps(cls) -> tuple[dict[str, str], dict[str, str]]:
        """(HF base-name template -> GGUF one, GGUF -> HF), from gguf-py's tensor names, checked against its
        TensorNameMap for this architecture."""
        import gguf

        arch = gguf.MODEL_ARCH[cls.model_arch]
        tmap = gguf.get_tensor_name_map(arch, 1)
        to_gguf = {}
        for kind_name, hf in cls.tensors.items():
            kind = gguf.MODEL_TENSOR[kind_name]
            assert kind in gguf.MODEL_TENSORS[arch], f"{cls.__name__}: {kind_name} is not a {cls.model_arch} tensor"
            gguf_name = gguf.TENSOR_NAMES[kind]
            found = tmap.get_type_and_name(hf.format(bid=0))
            assert found and found[0] == kind, f"{cls.__name__}: gguf-py maps {hf} to {found}, not {kind_name}"
            to_gguf[hf] = gguf_name
        return to_gguf, {g: h for h, g in to_gguf.items()}

    @classmethod
    def _kind_of(cls, hf_template: str) -> str:
        return next(k for k, v in cls.tensors.items() if v == hf_template)

    def gguf_name(self, hf_name: str) -> str | None:
        """GGUF name for an HF tensor; "" means: skip it on purpose; None means: unknown."""
        if self.ignore.fullmatch(hf_name):
            return ""
        found = _translate(hf_name, _HF_BLOCK, self.name_maps()[0])
        if found is None:
            return None
        template, bid, suffix, gguf_template = found
        if (
            bid is not None
            and suffix == "bias"
            and self.bias_kinds is not None
            and self._kind_of(template) not in self.bias_kinds
        ):
            return None
        if template == self.tensors["OUTPUT"] and self.tied:
            return ""  # llama.cpp reuses token_embd when output.weight is absent
        return f"{gguf_template.format(bid=bid)}.{suffix}"

    @classmethod
    def hf_name(cls, gguf_name: str) -> str | None:
        """HF name for a GGUF tensor; None when this architecture has no such tensor."""
        found = _translate(gguf_name, _GGUF_BLOCK, cls.name_maps()[1])
        if found is None:
            return None
        _, bid, suffix, hf_template = found
        return f"{hf_template.format(bid=bid)}.{suffix}"

    # ---- tensors --------------------------------------------------------------------------------
    def to_gguf(self, gguf_name: str, data: np.ndarray) -> np.ndarray:
        """Change a tensor's layout on its way into the GGUF (default: none). `from_gguf` undoes it."""
        return data

    def from_gguf(self, gguf_name: str, data: np.ndarray) -> np.ndarray:
        """A GGUF tensor back in the HF layout: the inverse of `to_gguf`."""
        return data

    def extra_tensors(self) -> list[tuple[str, np.ndarray]]:
        """Tensors computed from the config rather than read from the checkpoint."""
        return []

    # ---- config helpers -------------------------------------------------------------------------
    def get(self, *keys, default=None):
        for key in keys:
            if self.cfg.get(key) is not None:
                return self.cfg[key]
        if default is not None:
            return default
        raise BadInput(
            f"config.json has no {' / '.join(keys)}",
            where="config.json",
            hint=f"a {self.hf_arch} config needs it; re-save the model with transformers",
        )

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

    @property
    def rope_theta(self) -> float:
        return float(self.get("rope_theta", default=10000.0))

    # ---- hyper-parameters: to GGUF --------------------------------------------------------------
    def hparams(self, vocab_size: int) -> list[tuple[str, str, object]]:
        """(GGUF key, value type, value) triples, in the order they are written: the dense decoder's set."""
        from gguf import Keys

        hidden = int(self.get("hidden_size"))
        h = [
            (Keys.LLM.VOCAB_SIZE, "u32", vocab_size),
            (Keys.LLM.CONTEXT_LENGTH, "u32", self.context_length),
            (Keys.LLM.EMBEDDING_LENGTH, "u32", hidden),
            (Keys.LLM.BLOCK_COUNT, "u32", int(self.get("num_hidden_layers"))),
            (Keys.LLM.FEED_FORWARD_LENGTH, "u32", int(self.get("intermediate_size"))),
            (Keys.Attention.HEAD_COUNT, "u32", self.n_head),
            (Keys.Attention.HEAD_COUNT_KV, "u32", self.n_head_kv),
            (Keys.Attention.LAYERNORM_RMS_EPS, "f32", float(self.get("rms_norm_eps"))),
            (Keys.Rope.FREQ_BASE, "f32", self.rope_theta),
            (Keys.Rope.DIMENSION_COUNT, "u32", self.head_dim),
        ]
        if self.head_dim * self.n_head != hidden:
            # llama.cpp assumes hidden_size / heads otherwise (Qwen3-0.6B: 1024 / 16 = 64, head_dim 128).
            h += [
                (Keys.Attention.KEY_LENGTH, "u32", self.head_dim),
                (Keys.Attention.VALUE_LENGTH, "u32", self.head_dim),
            ]
        arch = self.gguf_arch()
        return [(key.format(arch=arch), vtype, value) for key, vtype, value in h + self.rope_scaling_hparams()]

    # ---- hyper-parameters: from GGUF ------------------------------------------------------------
    @classmethod
    def gguf_value(cls, meta: dict, key: str, default=None):
        """A GGUF header value by gguf-py's key template ("{arch}.context_length"), or `default` when absent."""
        value = meta.get(key.format(arch=cls.gguf_arch()))
        return default if value is None else value

    @classmethod
    def config_from_gguf(cls, meta: dict, tensor_names: set[str], n_vocab: int) -> dict:
        """The HF config.json of a GGUF of this architecture (float32 weights)."""
        from gguf import Keys

        key = functools.partial(cls.gguf_value, meta)
        n_head = int(key(Keys.Attention.HEAD_COUNT))
        hidden = int(key(Keys.LLM.EMBEDDING_LENGTH))
        eps = float(key(Keys.Attention.LAYERNORM_RMS_EPS))
        return {
            "architectures": [cls.hf_names[0]],
            "model_type": cls.model_types[0],
            "hidden_size": hidden,
            "intermediate_size": int(key(Keys.LLM.FEED_FORWARD_LENGTH)),
            "num_hidden_layers": int(key(Keys.LLM.BLOCK_COUNT)),
            "num_attention_heads": n_head,
            "num_key_value_heads": int(key(Keys.Attention.HEAD_COUNT_KV, n_head)),
            "head_dim": int(key(Keys.Attention.KEY_LENGTH, hidden // n_head)),
            "max_position_embeddings": int(key(Keys.LLM.CONTEXT_LENGTH)),
            "rms_norm_eps": float(f"{eps:.7g}"),
            "rope_theta": float(key(Keys.Rope.FREQ_BASE, 10000.0)),
            "vocab_size": n_vocab,
            "tie_word_embeddings": "output.weight" not in tensor_names,
            "torch_dtype": "float32",
            **cls.hf_extra,
        }

    # ---- config.json normalisation and notices -----------------------------------------------------
    @classmethod
    def normalise_config(cls, cfg: dict) -> dict:
        """This architecture's own additions to a config.json (after medtune.models.config's generic ones)."""
        return cfg

    def notice(self) -> str | None:
        """A line export should show the user about what it leaves out (None: nothing)."""
        return None

    # ---- refusals -------------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse configurations this class cannot express (before anything is written)."""
        kind, s = self.rope_scaling()
        if kind is None:
            return
        if kind not in self.rope_kinds:
            raise BadInput(
                f"rope scaling {kind!r} is not supported for {self.hf_arch} export",
                where="config.json",
                hint=f"supported: none, {', '.join(self.rope_kinds)}",
            )
        if kind in ("linear", "yarn") and not s.get("factor"):
            raise BadInput(
                f"{kind} rope scaling without a factor",
                where="config.json",
                hint="set rope_scaling.factor (the context extension ratio)",
            )
        if kind == "yarn":
            self._check_yarn(s)

    @staticmethod
    def _check_yarn(s: dict) -> None:
        # llama.cpp's loader reads the factor, the original context and an attention factor; it uses
        # beta_fast 32 / beta_slow 1 and a truncated correction range, as transformers does by default.
        odd = [k for k in ("mscale", "mscale_all_dim") if s.get(k)]
        odd += [k for k, default in (("beta_fast", 32), ("beta_slow", 1)) if s.get(k) not in (None, default)]
        if s.get("truncate") is False:
            odd.append("truncate")
        if odd:
            raise BadInput(
                f"yarn rope scaling with {', '.join(odd)} cannot be written for llama.cpp",
                where="config.json",
                hint="llama.cpp would compute different rotary frequencies; export with "
                "llama.cpp's convert_hf_to_gguf.py and check the result",
            )

    # ---- rope scaling ---------------------------------------------------------------------------
    # `linear` and `yarn` are read by llama.cpp's common loader for every architecture (`rope.scaling.*` keys);
    # `llama3` is a per-frequency divisor tensor (`rope_freqs`) that only the llama graph applies.
    def rope_scaling(self) -> tuple[str | None, dict]:
        """(kind, parameters) of the config's rope scaling; kind None when there is none."""
        s = self.cfg.get("rope_scaling")
        if not isinstance(s, dict):
            return None, {}
        kind = s.get("rope_type") or s.get("type")
        return (None if kind in (None, "default") else kind), s

    def original_context(self, s: dict) -> int:
        """The pre-training context of a scaled rope (transformers' fallback: max_position_embeddings)."""
        return int(
            s.get("original_max_position_embeddings")
            or self.cfg.get("original_max_position_embeddings")
            or self.context_length
        )

    def rope_scaling_hparams(self) -> list[tuple[str, str, object]]:
        from gguf import Keys

        kind, s = self.rope_scaling()
        if kind == "linear":
            return [(Keys.Rope.SCALING_TYPE, "str", "linear"), (Keys.Rope.SCALING_FACTOR, "f32", float(s["factor"]))]
        if kind != "yarn":
            return []
        factor = float(s["factor"])
        h = [
            (Keys.Rope.SCALING_TYPE, "str", "yarn"),
            (Keys.Rope.SCALING_FACTOR, "f32", factor),
            (Keys.Rope.SCALING_ORIG_CTX_LEN, "u32", self.original_context(s)),
        ]
        if s.get("attention_factor") is not None:
            # transformers scales cos/sin by attention_factor (default 0.1 ln(factor) + 1); llama.cpp by
            # that default times rope.scaling.attn_factor.
            default = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
            h.append((Keys.Rope.SCALING_ATTN_FACTOR, "f32", float(s["attention_factor"]) / default))
        return h
