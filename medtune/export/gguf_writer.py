"""Hugging Face safetensors folder -> one GGUF file, streamed one tensor at a time.

Everything that can be refused is checked first (architecture, tensor names, tokenizer, disk space);
then the header, metadata and tensor table are written, and each tensor is read from its safetensors
file, converted and appended, so peak memory stays near the largest single tensor. The file is
written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medtune import archs
from medtune.core import fsutil
from medtune.core.errors import BadInput
from medtune.export.gguf_reader import file_type
from medtune.export.quantize import WRITER_TYPES as OUTTYPES
from medtune.export.tokenizer import Vocab, read_vocab

# In a Q4_0 file the tensor that produces the logits (output.weight, or token_embd.weight when the embeddings
# are tied) is kept at 8 bits: it is the one most sensitive to quantization (llama.cpp's quantizer keeps it at
# Q6_K, which gguf-py cannot write).
LOGITS_TYPE = {"q4_0": "q8_0"}


# ---- the checkpoint, read lazily -------------------------------------------------------------------
class Checkpoint:
    """The tensors of a (possibly sharded) safetensors checkpoint; nothing is loaded until asked."""

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
                raise BadInput(
                    f"model.safetensors.index.json has no valid weight_map ({exc})",
                    where=str(index),
                    hint="re-download the model",
                ) from exc
            self.files = sorted({model_dir / f for f in weight_map.values()})
            missing = [f.name for f in self.files if not f.is_file()]
            if missing:
                raise BadInput(
                    f"shard {missing[0]} named in the index is missing",
                    where=str(index),
                    hint="the download is incomplete",
                )
        else:
            self.files = sorted(model_dir.glob("*.safetensors"))
        if not self.files:
            raise BadInput(
                f"no *.safetensors weights in {model_dir}",
                where=str(model_dir),
                hint="export reads safetensors (fuse or save_pretrained write them); .bin checkpoints are not read",
            )
        self.where: dict[str, Path] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, str] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}
        for f in self.files:
            n, header = self._header(f)
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                self.where[name] = f
                self.shape[name] = tuple(int(d) for d in meta["shape"])
                self.dtype[name] = meta["dtype"]

    def _header(self, path: Path) -> tuple[int, dict]:
        if path not in self._headers:
            from medtune.models.modelcheck import read_header, safetensors_problem

            n, header = read_header(path, hint="the file is damaged or a git-lfs pointer; re-download it")

            problem = safetensors_problem(path)  # e.g. tensor data cut short: refused now, before any writing
            if problem:
                raise BadInput(
                    f"not a readable safetensors file: {problem}",
                    where=str(path),
                    hint="the file is damaged or incomplete; re-download it (or fuse again)",
                )
            self._headers[path] = (n, header)
        return self._headers[path]

    def names(self) -> list[str]:
        return list(self.where)

    def read(self, name: str) -> np.ndarray:
        """One tensor as a float32 numpy array, read straight from its byte range (a single copy).

        The header gives each tensor's byte range; np.fromfile reads exactly that, which also covers
        bfloat16 (numpy has none: the raw 16-bit words are widened to float32).
        """
        path, dtype = self.where[name], self.dtype[name]
        if dtype not in _ST_DTYPES:
            raise BadInput(
                f"tensor {name} has dtype {dtype}; only float checkpoints can be exported",
                where=str(path),
                hint="fuse with de-quantization (mlx_lm fuse --dequantize) first",
            )
        n, header = self._header(path)
        start, end = header[name]["data_offsets"]
        np_dtype = _ST_DTYPES[dtype]
        count = (end - start) // np.dtype(np_dtype).itemsize
        raw = np.fromfile(path, dtype=np_dtype, count=count, offset=8 + n + start)
        if raw.size != int(np.prod(self.shape[name])):
            raise BadInput(f"tensor {name} is truncated", where=str(path), hint="re-download the model")
        if dtype == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32, copy=False).reshape(self.shape[name])


_ST_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}


# ---- the plan: everything decided before a byte is written -----------------------------------------
@dataclass
class TensorPlan:
    gguf_name: str
    hf_name: str | None  # None for tensors computed from the config (rope_freqs)
    shape: tuple[int, ...]  # numpy (row-major) shape
    qtype: object  # gguf.GGMLQuantizationType
    nbytes: int


@dataclass
class Plan:
    model_dir: Path
    cfg: dict
    arch: archs.Arch
    vocab: Vocab
    ckpt: Checkpoint
    tensors: list[TensorPlan]
    outtype: str
    file_type: int

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def tensor_qtype(gguf_name: str, shape: tuple[int, ...], outtype: str, *, logits: bool = False):
    """1-D tensors and norms stay F32; matrices take the out type (F16 where a row does not fit blocks).

    logits: this tensor produces the logits (output.weight, or the tied token_embd.weight): see LOGITS_TYPE.
    """
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as T

    if len(shape) == 1 or gguf_name.endswith("_norm.weight"):
        return T.F32
    if logits:
        outtype = LOGITS_TYPE.get(outtype, outtype)
    qtype = T[outtype.upper()]  # f16 -> F16, q8_0 -> Q8_0
    block, _ = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block:
        return T.F16
    return qtype


def _nbytes(shape, qtype) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(shape))
    return n // block * size


def _order(name: str) -> tuple:
    """llama.cpp's usual order: token_embd, blocks by index, output_norm, output, then the rest."""
    if name.startswith("token_embd."):
        return (0, 0, name)
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    if name.startswith("output_norm."):
        return (2, 0, name)
    if name.startswith("output."):
        return (3, 0, name)
    return (4, 0, name)


def plan_gguf(model_dir: str | Path, outtype: str = "f16") -> Plan:
    """Check the model folder and decide every tensor's name, shape and type. Writes nothing."""
    from medtune.models.config import read_config

    model_dir = Path(model_dir)
    if outtype not in OUTTYPES:
        raise BadInput(
            f"unknown GGUF type {outtype!r}",
            hint=f"choose one of: {', '.join(OUTTYPES)} "
            "(K-quants such as q4_k_m come from llama.cpp's quantizer or `ollama create --quantize`)",
        )
    cfg = read_config(model_dir)
    arch = archs.for_config(cfg, where=str(model_dir / "config.json"))
    ckpt = Checkpoint(model_dir)

    tensors, unknown, seen = [], [], set()
    for hf in ckpt.names():
        name = arch.gguf_name(hf)
        if name is None:
            unknown.append(hf)
            continue
        if not name:
            continue
        if ckpt.dtype[hf] not in _ST_DTYPES:
            raise BadInput(
                f"tensor {hf} has dtype {ckpt.dtype[hf]}; only float checkpoints can be exported",
                where=str(ckpt.where[hf]),
                hint="fuse with de-quantization (mlx_lm fuse --dequantize) first",
            )
        shape = ckpt.shape[hf]
        logits = name == "output.weight" or (name == "token_embd.weight" and arch.tied)
        qtype = tensor_qtype(name, shape, outtype, logits=logits)
        tensors.append(TensorPlan(name, hf, shape, qtype, _nbytes(shape, qtype)))
        seen.add(name)
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise BadInput(
            f"tensors with no GGUF counterpart for {arch.hf_arch}: {', '.join(unknown[:3])}{more}",
            where=str(model_dir),
            hint="fuse adapter weights and de-quantize quantized ones first (medtune fuse --dequantize); "
            "if the folder holds neither, export with --converter llama.cpp --llama-cpp DIR",
        )
    if "token_embd.weight" not in seen:
        raise BadInput(
            "the checkpoint has no token embedding (model.embed_tokens.weight)",
            where=str(model_dir),
            hint="the safetensors files are incomplete",
        )
    for name, data in arch.extra_tensors():
        qtype = tensor_qtype(name, data.shape, outtype)
        tensors.append(TensorPlan(name, None, tuple(data.shape), qtype, _nbytes(data.shape, qtype)))
    tensors.sort(key=lambda t: _order(t.gguf_name))

    n_vocab = next(t.shape[0] for t in tensors if t.gguf_name == "token_embd.weight")  # any prefix (multimodal)
    vocab = read_vocab(model_dir, n_vocab=n_vocab)
    return Plan(model_dir, cfg, arch, vocab, ckpt, tensors, outtype, file_type(outtype))


# llama.cpp gives special tokens Phi-3's whitespace rule (each one swallows the whitespace after it, as Phi-3.5's
# tokenizer.json marks with rstrip) when, and only when, general.name contains one of these (llama-vocab.cpp).
_RSTRIP_NAMES = ("phi-3", "phi3")


def _special_rstrip(model_dir: Path) -> bool:
    """Does the tokenizer make a special token swallow the whitespace after it (Phi-3.5's added tokens)?"""
    try:
        tok = json.loads((Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    added = tok.get("added_tokens") if isinstance(tok, dict) else None
    return any(t.get("special") and t.get("rstrip") for t in added or [] if isinstance(t, dict))


def gguf_name(name: str, model_dir: Path) -> str:
    """general.name such that llama.cpp applies Phi-3's whitespace rule exactly when the tokenizer has it: a name
    is kept when it already agrees, else "phi3" is added (the rule is needed) or the marker is taken out."""
    has_marker = any(m in name.lower() for m in _RSTRIP_NAMES)
    needed = _special_rstrip(model_dir)
    if needed and not has_marker:
        return f"{name} (phi3 tokens)"
    if has_marker and not needed:
        for marker in _RSTRIP_NAMES:
            name = re.sub(re.escape(marker), lambda m: m.group(0).replace("3", "_3"), name, flags=re.IGNORECASE)
    return name


def check_disk(out_path: Path, need: int) -> None:
    """ResourceError unless the folder of `out_path` has `need` bytes free (plus a margin)."""
    from medtune.core.resources import check_disk as check

    check(out_path, need)


def estimate_bytes(plan: Plan) -> int:
    """Tensor data plus a generous allowance for the metadata (vocabulary, merges, template)."""
    return plan.nbytes + 64 * (len(plan.vocab.tokens) + len(plan.vocab.merges)) + (1 << 20)


def _add_kv(w, key: str, vtype: str, value) -> None:
    {"u32": w.add_uint32, "f32": w.add_float32, "str": w.add_string, "bool": w.add_bool}[vtype](key, value)


def write_gguf(
    model_dir: str | Path,
    out_path: str | Path,
    outtype: str = "f16",
    progress=None,
    *,
    name: str | None = None,
    plan: Plan | None = None,
    label: str | None = None,
) -> dict:
    """Write `model_dir` as a GGUF file at `out_path`. Returns a summary of what was written.

    label: the progress bar's text (default: "writing <file name>").
    """
    import gguf

    out_path = Path(out_path)
    plan = plan or plan_gguf(model_dir, outtype)
    check_disk(out_path, estimate_bytes(plan))
    arch, vocab = plan.arch, plan.vocab
    extra = dict(arch.extra_tensors())

    task = progress.add_task(label or f"writing {out_path.name}", total=len(plan.tensors)) if progress else None
    with fsutil.atomic_path(out_path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch.gguf_arch())
        try:
            w.add_name(gguf_name(name or plan.model_dir.name, plan.model_dir))
            w.add_file_type(plan.file_type)
            if plan.outtype.startswith("q"):
                w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            for key, vtype, value in arch.hparams(len(vocab.tokens)):
                _add_kv(w, key, vtype, value)
            vocab.write(w)
            for t in plan.tensors:
                if t.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                    dtype = np.float32 if t.qtype == gguf.GGMLQuantizationType.F32 else np.float16
                    w.add_tensor_info(t.gguf_name, t.shape, np.dtype(dtype), t.nbytes)
                else:
                    byte_shape = gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
                    w.add_tensor_info(t.gguf_name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for t in plan.tensors:
                data = extra[t.gguf_name] if t.hf_name is None else plan.ckpt.read(t.hf_name)
                data = arch.to_gguf(t.gguf_name, data)
                data = np.ascontiguousarray(gguf.quants.quantize(data, t.qtype))
                w.write_tensor_data(data)
                del data
                if progress:
                    progress.advance(task)
        finally:
            w.close()
    return {
        "path": str(out_path),
        "arch": arch.gguf_arch(),
        "hf_arch": arch.hf_arch,
        "outtype": plan.outtype,
        "file_type": plan.file_type,
        "n_tensors": len(plan.tensors),
        "bytes": out_path.stat().st_size,
        "pre_tokenizer": vocab.pre,
        "vocab_size": len(vocab.tokens),
        "bos": vocab.text(vocab.bos_id),
        "eos": vocab.text(vocab.eos_id),
        "eos_id": vocab.eos_id,
        "eos_ids": list(vocab.eos_ids),
        "eot": vocab.text(vocab.eot_id),
        "add_bos": vocab.add_bos,
        "tied_embeddings": arch.tied,
        "chat_template": vocab.chat_template is not None,
    }
