"""Import a GGUF file as a Hugging Face safetensors folder (float32 weights).

Quantized tensors are dequantised with gguf-py's numpy kernels; llama-architecture Q/K rows, which
llama.cpp regroups per head for its rotary layout, are put back in HF order; the tokenizer is
rebuilt as a `tokenizer.json` whose pre-tokenizer splits text exactly as llama.cpp does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medtune.core import fsutil

from medtune.export import pretok
from medtune.core.errors import BadInput

# GGUF tensor name -> HF tensor name, for the dense decoder families.
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


@dataclass(frozen=True)
class ImportArch:
    gguf_arch: str
    hf_arch: str
    model_type: str
    permute_qk: bool  # llama.cpp permutes Q/K for the `llama` architecture only
    extra: dict = field(default_factory=dict)


IMPORT_ARCHS = {
    a.gguf_arch: a
    for a in (
        ImportArch("llama", "LlamaForCausalLM", "llama", True,
                   {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}),
        ImportArch("qwen2", "Qwen2ForCausalLM", "qwen2", False, {"hidden_act": "silu"}),
        ImportArch("qwen3", "Qwen3ForCausalLM", "qwen3", False, {"hidden_act": "silu", "attention_bias": False}),
    )
}


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row regrouping: per head, rows [pairs..., halves] -> HF's half-split order."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF order -> llama.cpp order (the inverse of `unpermute_rows`)."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def hf_tensor_name(gguf_name: str) -> str | None:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m:
        part = BLOCK_NAMES.get(m.group(2))
        return f"model.layers.{m.group(1)}.{part}.{m.group(3)}" if part else None
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(1) in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def _open(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/struct errors for bad files
        raise BadInput(f"not a readable GGUF file ({exc})", where=str(path),
                       hint="check the download; a GGUF starts with the magic bytes 'GGUF'") from exc


def _import_arch(arch_name, path: Path) -> ImportArch:
    arch = IMPORT_ARCHS.get(arch_name)
    if arch is None:
        raise BadInput(f"GGUF architecture {arch_name!r} cannot be imported", where=str(path),
                       hint=f"medtune imports {', '.join(sorted(IMPORT_ARCHS))} GGUFs: pass this model's Hugging "
                            "Face folder (or ORG/NAME) instead of the .gguf, or pick a model of those architectures")
    return arch


def _pretokenizer(model, pre_name, path: Path):
    if model != "gpt2":
        raise BadInput(f"GGUF tokenizer model {model!r} cannot be imported yet", where=str(path),
                       hint="byte-level BPE ('gpt2') tokenizers are supported")
    pre = pretok.by_name(pre_name)  # llama.cpp's name, or an alias such as "gpt2" (older medtune GGUFs)
    if pre is None:
        raise BadInput(f"GGUF pre-tokenizer {pre_name!r} is not in our registry", where=str(path),
                       hint=f"known: {', '.join(sorted(pretok.REGISTRY))} (also read: "
                            f"{', '.join(sorted(pretok.ALIASES))})")
    return pre


SKIPPED_TENSORS = ("rope_freqs.weight",)  # llama.cpp's precomputed rope factors: HF recomputes them


def _check_tensor_name(name: str, path: Path) -> None:
    if hf_tensor_name(name) is None and name not in SKIPPED_TENSORS:
        raise BadInput(f"GGUF tensor {name!r} has no Hugging Face counterpart", where=str(path),
                       hint="this GGUF layout is not supported for import")


def check_importable(path: str | Path) -> dict:
    """Refuse at once what cannot be imported, from the header alone (no tensor data is read, the file is not
    hashed): the architecture, the tokenizer, a tensor without a Hugging Face name. Returns the header."""
    from medtune.export import read_gguf_header

    path = Path(path)
    header = read_gguf_header(path)
    meta = header["metadata"]
    _import_arch(meta.get("general.architecture"), path)
    _pretokenizer(meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default"), path)
    for t in header["tensors"]:
        _check_tensor_name(t["name"], path)
    return header


def import_gguf(path: str | Path, out_dir: str | Path, progress=None) -> Path:
    """Dequantise `path` into an HF folder at `out_dir` (written atomically). Returns out_dir."""
    import gguf

    path, out_dir = Path(path), Path(out_dir)
    check_importable(path)  # seconds, before gguf's reader maps every tensor and the dequantising
    reader = _open(path)
    arch_name = _field(reader, "general.architecture")
    arch = _import_arch(arch_name, path)
    a = arch_name
    n_head = int(_field(reader, f"{a}.attention.head_count"))
    n_kv = int(_field(reader, f"{a}.attention.head_count_kv", n_head))
    hidden = int(_field(reader, f"{a}.embedding_length"))
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    names = {t.name for t in reader.tensors}
    tied = "output.weight" not in names
    head_dim = int(_field(reader, f"{a}.attention.key_length", hidden // n_head))

    eps = float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon"))
    cfg = {
        "architectures": [arch.hf_arch],
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{a}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{a}.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": int(_field(reader, f"{a}.context_length")),
        "rms_norm_eps": float(f"{eps:.7g}"),
        "rope_theta": float(_field(reader, f"{a}.rope.freq_base", 10000.0)),
        "vocab_size": len(tokens),
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        **arch.extra,
    }
    tok_files = _tokenizer_files(reader, path, cfg)
    cfg.update({k: tok_files["ids"][k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if tok_files["ids"].get(k) is not None})

    from safetensors.numpy import save_file

    weights: dict[str, np.ndarray] = {}
    task = progress.add_task("dequantising", total=len(reader.tensors)) if progress else None
    for t in reader.tensors:
        hf = hf_tensor_name(t.name)
        if hf is None:
            _check_tensor_name(t.name, path)
            continue
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape([int(d) for d in reversed(t.shape)])
        if arch.permute_qk and t.name.endswith("attn_q.weight"):
            w = unpermute_rows(w, n_head)
        elif arch.permute_qk and t.name.endswith("attn_k.weight"):
            w = unpermute_rows(w, n_kv)
        weights[hf] = np.ascontiguousarray(w)
        if progress:
            progress.advance(task)

    with fsutil.atomic_dir(out_dir) as tmp:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        fsutil.write_json(tmp / "config.json", cfg)
        fsutil.write_json(tmp / "tokenizer.json", tok_files["tokenizer.json"], indent=None)
        fsutil.write_json(tmp / "tokenizer_config.json", tok_files["tokenizer_config.json"])
        fsutil.write_json(tmp / "special_tokens_map.json", tok_files["special_tokens_map.json"])
        fsutil.write_json(tmp / "generation_config.json", tok_files["generation_config.json"])
        fsutil.write_json(tmp / "medtune_import.json", {
            "source": str(path), "sha256": fsutil.sha256_file(path),
            "gguf_architecture": arch_name, "general.name": _field(reader, "general.name"),
            "general.license": _field(reader, "general.license"),
            "file_type": _field(reader, "general.file_type"),
        })
    return out_dir


def _tokenizer_files(reader, path: Path, cfg: dict) -> dict:
    pre = _pretokenizer(_field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre", "default"), path)
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [m.split(" ", 1) for m in _field(reader, "tokenizer.ggml.merges", [])]

    def tok(key):
        idx = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return (int(idx), tokens[int(idx)]) if idx is not None and int(idx) < len(tokens) else (None, None)

    bos, eos, unk, pad = tok("bos"), tok("eos"), tok("unknown"), tok("padding")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False))
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": types[i] == 3}
        for i, t in enumerate(tokens) if types[i] in (3, 4)
    ]
    post: dict = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    if add_bos or add_eos:
        single = ([{"SpecialToken": {"id": bos[1], "type_id": 0}}] if add_bos else []) + \
                 [{"Sequence": {"id": "A", "type_id": 0}}] + \
                 ([{"SpecialToken": {"id": eos[1], "type_id": 0}}] if add_eos else [])
        specials = {t[1]: {"id": t[1], "ids": [t[0]], "tokens": [t[1]]}
                    for t, on in ((bos, add_bos), (eos, add_eos)) if on}
        post = {"type": "Sequence", "processors": [post, {"type": "TemplateProcessing", "single": single,
                                                           "pair": single,
                                                           "special_tokens": specials}]}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre.hf,
        "post_processor": post,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges,
        },
    }
    special_map = {k: v[1] for k, v in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad)) if v[1]}
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg["max_position_embeddings"],
        **special_map,
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tok_cfg["chat_template"] = template
    gen = {"bos_token_id": bos[0], "eos_token_id": eos[0], "pad_token_id": pad[0]}
    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": tok_cfg,
        "special_tokens_map.json": special_map,
        "generation_config.json": {k: v for k, v in gen.items() if v is not None},
        "ids": {"bos_token_id": bos[0], "eos_token_id": eos[0], "pad_token_id": pad[0]},
    }
