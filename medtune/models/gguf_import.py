"""Import a GGUF file as a Hugging Face safetensors folder (float32 weights).

Quantized tensors are dequantised with gguf-py's numpy kernels; llama-architecture Q/K rows, which
llama.cpp regroups per head for its rotary layout, are put back in HF order; the tokenizer is
rebuilt as a `tokenizer.json` whose pre-tokenizer splits text exactly as llama.cpp does.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from medtune import archs
from medtune.core import fsutil
from medtune.core.errors import BadInput
from medtune.export import pretok
from medtune.export.gguf_reader import read_gguf_header

# Metadata arrays the import reads whole (the others are summarised by the header reader).
_FULL_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")

def _arch(meta: dict, path: Path) -> type[archs.Arch]:
    return archs.for_gguf(meta.get("general.architecture"), str(path))


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


def _check_tensor_name(arch: type[archs.Arch], name: str, path: Path) -> None:
    if arch.hf_name(name) is None and name not in arch.computed:
        raise BadInput(f"GGUF tensor {name!r} has no Hugging Face counterpart", where=str(path),
                       hint="this GGUF layout is not supported for import")


def check_importable(path: str | Path) -> dict:
    """Refuse at once what cannot be imported, from the header alone (no tensor data is read, the file is not
    hashed): the architecture, the tokenizer, a tensor without a Hugging Face name. Returns the header."""
    path = Path(path)
    header = read_gguf_header(path, full_arrays=_FULL_ARRAYS)
    meta = header["metadata"]
    arch = _arch(meta, path)
    _pretokenizer(meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default"), path)
    for t in header["tensors"]:
        _check_tensor_name(arch, t["name"], path)
    return header


def import_gguf(path: str | Path, out_dir: str | Path, progress=None) -> Path:
    """Dequantise `path` into an HF folder at `out_dir` (written atomically). Returns out_dir."""
    path, out_dir = Path(path), Path(out_dir)
    header = check_importable(path)  # seconds, before the dequantising
    meta = header["metadata"]
    cls = _arch(meta, path)
    names = {t["name"] for t in header["tensors"]}
    cfg = cls.config_from_gguf(meta, names, len(meta["tokenizer.ggml.tokens"]))
    tok_files = _tokenizer_files(meta, path, cfg)
    cfg.update({k: v for k, v in tok_files["ids"].items() if v is not None})
    weights = _dequantise(path, header, cls(cfg), progress)

    from safetensors.numpy import save_file

    with fsutil.atomic_dir(out_dir) as tmp:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        fsutil.write_json(tmp / "config.json", cfg)
        fsutil.write_json(tmp / "tokenizer.json", tok_files["tokenizer.json"], indent=None)
        fsutil.write_json(tmp / "tokenizer_config.json", tok_files["tokenizer_config.json"])
        fsutil.write_json(tmp / "special_tokens_map.json", tok_files["special_tokens_map.json"])
        fsutil.write_json(tmp / "generation_config.json", tok_files["generation_config.json"])
        fsutil.write_json(tmp / "medtune_import.json", {
            "source": str(path), "sha256": fsutil.sha256_file(path),
            "gguf_architecture": meta.get("general.architecture"), "general.name": meta.get("general.name"),
            "general.license": meta.get("general.license"),
            "file_type": meta.get("general.file_type"),
        })
    return out_dir


def _dequantise(path: Path, header: dict, arch: archs.Arch, progress=None) -> dict[str, np.ndarray]:
    """Every tensor with an HF name, as float32 in the HF layout (gguf-py's numpy dequantisers)."""
    import gguf

    data = np.memmap(path, dtype=np.uint8, mode="r")
    weights: dict[str, np.ndarray] = {}
    task = progress.add_task("dequantising", total=len(header["tensors"])) if progress else None
    for t in header["tensors"]:
        hf = arch.hf_name(t["name"])
        if hf is None:  # a computed tensor (rope_freqs): HF recomputes it
            continue
        try:
            qtype = gguf.GGMLQuantizationType[t["type"]]
        except KeyError:
            raise BadInput(f"GGUF tensor {t['name']!r} has type {t['type']}, which gguf-py cannot read",
                           where=str(path), hint="upgrade gguf (pip install -U gguf)") from None
        dims = [int(d) for d in t["shape"]]
        start = header["data_offset"] + t["offset"]
        raw = data[start:start + t["bytes"]].reshape(math.prod(dims[1:]), -1)  # rows of bytes, as gguf-py reads
        w = gguf.quants.dequantize(raw, qtype).astype(np.float32, copy=False).reshape(list(reversed(dims)))
        weights[hf] = np.ascontiguousarray(arch.from_gguf(t["name"], w))
        if progress:
            progress.advance(task)
    return weights


def _tokenizer_files(meta: dict, path: Path, cfg: dict) -> dict:
    pre = _pretokenizer(meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default"), path)
    tokens = list(meta.get("tokenizer.ggml.tokens"))
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [m.split(" ", 1) for m in meta.get("tokenizer.ggml.merges", [])]

    def tok(key):
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        return (int(idx), tokens[int(idx)]) if idx is not None and int(idx) < len(tokens) else (None, None)

    bos, eos, unk, pad = tok("bos"), tok("eos"), tok("unknown"), tok("padding")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
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
    template = meta.get("tokenizer.chat_template")
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
