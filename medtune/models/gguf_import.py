"""Import a GGUF file as a Hugging Face safetensors folder (float32 weights).

Quantized tensors are dequantised with gguf-py's numpy kernels; llama-architecture Q/K rows, which
llama.cpp regroups per head for its rotary layout, are put back in HF order; the tokenizer is
rebuilt as a `tokenizer.json` that tokenizes exactly as llama.cpp does; a GGUF without a chat template
gets its architecture's default one (medtune.export.chat_templates), if there is one.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from medtune import archs
from medtune.core import fsutil
from medtune.core.errors import BadInput
from medtune.export.chat_templates import default_template
from medtune.export.gguf_reader import read_gguf_header
from medtune.export.tokenizer import CONTROL, end_of_turn, kind_for_gguf

# Metadata arrays the import reads whole (the others are summarised by the header reader).
_FULL_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores")


def _arch(meta: dict, path: Path) -> type[archs.Arch]:
    return archs.for_gguf(meta.get("general.architecture"), str(path))


def _check_tokenizer(meta: dict, path: Path) -> None:
    """Refuse a tokenizer kind or pre-tokenizer the import cannot rebuild."""
    kind = kind_for_gguf(meta.get("tokenizer.ggml.model"), str(path))
    kind.pretokenizer(meta.get("tokenizer.ggml.pre", "default"), str(path))
    kind.check_gguf(meta, str(path))


def _check_tensor_name(arch: type[archs.Arch], name: str, path: Path) -> None:
    if arch.hf_name(name) is None and name not in arch.computed:
        raise BadInput(
            f"GGUF tensor {name!r} has no Hugging Face counterpart",
            where=str(path),
            hint="this GGUF layout is not supported for import",
        )


def check_importable(path: str | Path) -> dict:
    """Refuse at once what cannot be imported, from the header alone (no tensor data is read, the file is not
    hashed): the architecture, the tokenizer, a tensor without a Hugging Face name. Returns the header."""
    path = Path(path)
    header = read_gguf_header(path, full_arrays=_FULL_ARRAYS)
    meta = header["metadata"]
    arch = _arch(meta, path)
    _check_tokenizer(meta, path)
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
    tok_files = _tokenizer_files(meta, path, cfg["max_position_embeddings"])
    cfg.update({k: v for k, v in tok_files["ids"].items() if v is not None})
    weights = _dequantise(path, header, cls(cfg), progress)

    from safetensors.numpy import save_file

    with fsutil.atomic_dir(out_dir) as tmp:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        fsutil.write_json(tmp / "config.json", cfg)
        _write_tokenizer_files(tmp, tok_files)
        fsutil.write_json(
            tmp / "medtune_import.json",
            {
                "source": str(path),
                "sha256": fsutil.sha256_file(path),
                "gguf_architecture": meta.get("general.architecture"),
                "general.name": meta.get("general.name"),
                "general.license": meta.get("general.license"),
                "file_type": meta.get("general.file_type"),
            },
        )
    return out_dir


def import_tokenizer(path: str | Path, out_dir: str | Path) -> Path:
    """Only the tokenizer files of a GGUF (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
    generation_config.json), from its header alone: seconds, for a tool or test that needs a GGUF's vocabulary
    as an HF tokenizer folder. Written atomically; returns out_dir."""
    path, out_dir = Path(path), Path(out_dir)
    meta = read_gguf_header(path, full_arrays=_FULL_ARRAYS)["metadata"]
    _check_tokenizer(meta, path)
    context = meta.get(f"{meta.get('general.architecture')}.context_length")
    tok_files = _tokenizer_files(meta, path, int(context) if context else None)
    with fsutil.atomic_dir(out_dir) as tmp:
        _write_tokenizer_files(tmp, tok_files)
    return out_dir


def _write_tokenizer_files(folder: Path, tok_files: dict) -> None:
    fsutil.write_json(folder / "tokenizer.json", tok_files["tokenizer.json"], indent=None)
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        fsutil.write_json(folder / name, tok_files[name])


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
            raise BadInput(
                f"GGUF tensor {t['name']!r} has type {t['type']}, which gguf-py cannot read",
                where=str(path),
                hint="upgrade gguf (pip install -U gguf)",
            ) from None
        dims = [int(d) for d in t["shape"]]
        start = header["data_offset"] + t["offset"]
        raw = data[start : start + t["bytes"]].reshape(math.prod(dims[1:]), -1)  # rows of bytes, as gguf-py reads
        w = gguf.quants.dequantize(raw, qtype).astype(np.float32, copy=False).reshape(list(reversed(dims)))
        weights[hf] = np.ascontiguousarray(arch.from_gguf(t["name"], w))
        if progress:
            progress.advance(task)
    return weights


def _tokenizer_files(meta: dict, path: Path, context: int | None) -> dict:
    """tokenizer.json (written by the GGUF's tokenizer kind), tokenizer_config.json, special_tokens_map.json,
    generation_config.json, and the special ids config.json carries."""
    kind = kind_for_gguf(meta.get("tokenizer.ggml.model"), str(path))
    tokens = meta["tokenizer.ggml.tokens"]

    def tok(key):
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        return (int(idx), tokens[int(idx)]) if idx is not None and int(idx) < len(tokens) else (None, None)

    bos, eos, unk, pad = tok("bos"), tok("eos"), tok("unknown"), tok("padding")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    tokenizer_json = kind.tokenizer_json(
        meta, str(path), {"bos": bos, "eos": eos, "add_bos": add_bos, "add_eos": add_eos}
    )
    special_map = {
        k: v[1] for k, v in (("bos_token", bos), ("eos_token", eos), ("unk_token", unk), ("pad_token", pad)) if v[1]
    }
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        **({"model_max_length": context} if context else {}),
        **special_map,
    }
    template = meta.get("tokenizer.chat_template") or default_template(meta.get("general.architecture") or "")
    if template:
        tok_cfg["chat_template"] = template
    ends = [i for i in dict.fromkeys([eos[0], _turn_end(meta, template)]) if i is not None]
    gen = {"bos_token_id": bos[0], "eos_token_id": ends if len(ends) > 1 else eos[0], "pad_token_id": pad[0]}
    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": tok_cfg,
        "special_tokens_map.json": special_map,
        "generation_config.json": {k: v for k, v in gen.items() if v is not None},
        "ids": {"bos_token_id": bos[0], "eos_token_id": eos[0], "pad_token_id": pad[0]},
    }


def _turn_end(meta: dict, template: str | None) -> int | None:
    """The end-of-turn token: the GGUF's eot id, else the control token the chat template closes an assistant
    turn with (Gemma's <end_of_turn>), so that generation stops there as it does in llama.cpp."""
    if meta.get("tokenizer.ggml.eot_token_id") is not None:
        return int(meta["tokenizer.ggml.eot_token_id"])
    if not template:
        return None
    tokens, types = meta["tokenizer.ggml.tokens"], meta.get("tokenizer.ggml.token_type") or []
    named = [t for t, k in zip(tokens, types) if k == CONTROL and t in template]
    text = end_of_turn(template, named)
    return tokens.index(text) if text is not None else None
