"""A LoRA adapter (mlx_lm's or PEFT's) as llama.cpp's LoRA GGUF: the file Ollama's `ADAPTER` line and llama.cpp's
`--lora` load on top of the base model's GGUF.

    summary = write_lora_gguf("adapters/cardio", base_dir, "models/cardio/cardio-lora-f16.gguf")

What llama.cpp expects (src/llama-adapter.cpp, llama-graph.cpp's build_lora_mm): `general.type` "adapter",
`general.architecture` the base's, `adapter.type` "lora", `adapter.lora.alpha`; for each adapted weight `W` of the
base GGUF (e.g. `blk.0.attn_q.weight`) a pair `W.lora_a` [rank x in] and `W.lora_b` [out x rank] (row-major, as
numpy holds them), so that W x + (alpha / rank) * B (A x) is what the layer computes.

- The adapter is read by medtune.adapters.read_lora (mlx_lm's or PEFT's layout): A [rank x in], B [out x rank] and
  each module's scale.
- One alpha serves the whole file: a tensor whose own scale differs from alpha / its rank gets the ratio folded into
  its B, so every tensor's product is exact.
- The base's layout changes reach the adapter: llama's Q/K rows are regrouped per head in the GGUF (medtune.archs),
  and so are the rows of their B.

Refused with the reason: DoRA (llama.cpp has no magnitude vector), full fine-tunes and PEFT's modules_to_save
(whole tensors, not low-rank: fuse instead), LoRA on the embeddings or the output layer (Ollama's engines do not
apply them everywhere: fuse instead), and any module the base GGUF has no weight for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medtune.adapters import FUSE_HINT, Lora, read_lora
from medtune.core.errors import BadInput

OUTTYPES = ("f16", "f32")  # the adapter's tensors: small, so never quantized (a rank-8 row is too short for Q8_0)
NOT_ADAPTED = ("token_embd.weight", "output.weight")


# ---- onto the base's GGUF names ------------------------------------------------------------------------
@dataclass
class LoraPlan:
    arch: object  # medtune.archs.Arch of the base
    alpha: float
    tensors: list[tuple[str, np.ndarray, np.ndarray]]  # (base GGUF weight name, A, B) in llama.cpp's layout
    base_shapes: dict[str, tuple]


def plan_lora(lora: Lora, base_dir: str | Path) -> LoraPlan:
    """Each pair under its base GGUF weight's name, checked against the base's shape, B's rows laid out as the base
    GGUF lays out the weight's (llama's Q/K), the scales expressed by one alpha."""
    from medtune import archs
    from medtune.export.gguf_writer import Checkpoint
    from medtune.models.config import read_config

    base_dir = Path(base_dir)
    arch = archs.for_config(read_config(base_dir), where=str(base_dir / "config.json"))
    ckpt = Checkpoint(base_dir)
    first = lora.pairs[0]
    alpha = first.scale * first.rank
    tensors, shapes = [], {}
    for p in lora.pairs:
        name, hf = _gguf_weight(arch, ckpt, p.module, lora.source)
        out_in = tuple(ckpt.shape[hf])
        if p.b.shape[0] != out_in[0] or p.a.shape[1] != out_in[1] or p.b.shape[1] != p.rank:
            raise BadInput(
                f"{p.module}: the LoRA pair is {p.b.shape[0]}x{p.rank} by {p.rank}x{p.a.shape[1]}, the base weight "
                f"is {out_in[0]}x{out_in[1]}",
                where=str(lora.source),
                hint="export with the base model the adapter was trained on (--base)",
            )
        b = p.b * np.float32(p.scale * p.rank / alpha) if not math.isclose(p.scale * p.rank, alpha) else p.b
        tensors.append((name, p.a, arch.to_gguf(name, b)))
        shapes[name] = out_in
    return LoraPlan(arch, alpha, tensors, shapes)


def _gguf_weight(arch, ckpt, module: str, source: Path) -> tuple[str, str]:
    """(the base GGUF's weight name, the checkpoint's tensor name) for an adapted module."""
    hf = next((n for n in (f"{module}.weight", f"model.{module}.weight") if n in ckpt.shape), None)
    name = arch.gguf_name(hf) if hf else None
    if name in NOT_ADAPTED or module.endswith(("lm_head", "embed_tokens")):
        raise BadInput(
            f"{module}: LoRA on the {'output layer' if 'lm_head' in module else 'embeddings'} is not written as a "
            "GGUF adapter (llama.cpp applies it to some architectures only; tied embeddings have no output weight)",
            where=str(source),
            hint=FUSE_HINT,
        )
    if not name:
        raise BadInput(
            f"{module}: the base model has no weight the GGUF keeps for it",
            where=str(source),
            hint="export with the base model the adapter was trained on (--base)",
        )
    return name, hf


# ---- writing -----------------------------------------------------------------------------------------
def write_lora_gguf(
    adapter_dir: str | Path,
    base_dir: str | Path,
    out_path: str | Path,
    outtype: str = "f16",
    *,
    name: str | None = None,
    progress=None,
) -> dict:
    """Write the adapter as a llama.cpp LoRA GGUF for the base model in `base_dir` (its HF folder). Returns a
    summary: path, arch, alpha, tensors, rank(s), bytes, outtype."""
    import gguf

    from medtune.core import fsutil

    if outtype not in OUTTYPES:
        raise BadInput(f"a LoRA GGUF is written as {' or '.join(OUTTYPES)}, not {outtype}", hint="--lora-type f16")
    lora = read_lora(adapter_dir)
    plan = plan_lora(lora, base_dir)
    dtype = np.float16 if outtype == "f16" else np.float32
    out_path = Path(out_path)
    task = progress.add_task(f"writing {out_path.name}", total=len(plan.tensors)) if progress else None
    with fsutil.atomic_path(out_path) as tmp:
        w = gguf.GGUFWriter(str(tmp), plan.arch.gguf_arch())
        try:
            w.add_type(gguf.GGUFType.ADAPTER)
            w.add_string(gguf.Keys.Adapter.TYPE, "lora")
            w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(plan.alpha))
            w.add_name(name or Path(adapter_dir).name)
            w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32)
            for weight, a, b in plan.tensors:
                w.add_tensor(f"{weight}.lora_a", np.ascontiguousarray(a.astype(dtype)))
                w.add_tensor(f"{weight}.lora_b", np.ascontiguousarray(b.astype(dtype)))
                if progress:
                    progress.advance(task)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    return {
        "path": str(out_path),
        "arch": plan.arch.gguf_arch(),
        "adapter": str(adapter_dir),
        "adapter_kind": lora.kind,
        "alpha": plan.alpha,
        "ranks": sorted({a.shape[0] for _, a, _ in plan.tensors}),
        "tensors": len(plan.tensors),
        "outtype": outtype,
        "bytes": out_path.stat().st_size,
    }
