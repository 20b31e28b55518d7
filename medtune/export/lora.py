"""A LoRA adapter (mlx_lm's or PEFT's) as llama.cpp's LoRA GGUF: the file Ollama's `ADAPTER` line and llama.cpp's
`--lora` load on top of the base model's GGUF.

    summary = write_lora_gguf("adapters/cardio", base_dir, "models/cardio/cardio-lora-f16.gguf")

What llama.cpp expects (src/llama-adapter.cpp, llama-graph.cpp's build_lora_mm): `general.type` "adapter",
`general.architecture` the base's, `adapter.type` "lora", `adapter.lora.alpha`; for each adapted weight `W` of the
base GGUF (e.g. `blk.0.attn_q.weight`) a pair `W.lora_a` [rank x in] and `W.lora_b` [out x rank] (row-major, as
numpy holds them), so that W x + (alpha / rank) * B (A x) is what the layer computes.

- mlx_lm keeps lora_a [in x rank] and lora_b [rank x out] and adds scale * (x a) b: A = a^T, B = b^T, alpha =
  scale * rank.
- PEFT keeps lora_A [rank x in] and lora_B [out x rank] with scale lora_alpha / r (rsLoRA: / sqrt(r); rank_pattern
  and alpha_pattern per module).
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
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medtune.core.errors import BadInput

OUTTYPES = ("f16", "f32")  # the adapter's tensors: small, so never quantized (a rank-8 row is too short for Q8_0)
NOT_ADAPTED = ("token_embd.weight", "output.weight")
FUSE_HINT = "fuse it instead (medtune fuse, then medtune export the fused folder)"


@dataclass
class LoraPair:
    """One adapted linear layer: module (HF name, e.g. model.layers.0.self_attn.q_proj), A [r x in], B [out x r]
    and its scale (the layer adds scale * B A x)."""

    module: str
    a: np.ndarray
    b: np.ndarray
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class Lora:
    kind: str  # mlx | peft
    source: Path
    pairs: list[LoraPair]


# ---- reading an adapter ------------------------------------------------------------------------------
def read_lora(adapter_dir: str | Path) -> Lora:
    """The adapter's low-rank pairs, in PEFT's orientation; what cannot become a LoRA GGUF is refused."""
    from medtune.fuse import adapter_kind, adapter_weights, read_adapter_config

    adapter_dir = Path(adapter_dir)
    acfg = read_adapter_config(adapter_dir)
    kind = adapter_kind(acfg)
    where = str(adapter_dir / "adapter_config.json")
    if kind == "torch-full" or acfg.get("fine_tune_type") == "full":
        raise BadInput("a full fine-tune is not a LoRA adapter: it has no low-rank pairs", where=where, hint=FUSE_HINT)
    if acfg.get("fine_tune_type") == "dora" or acfg.get("use_dora"):
        raise BadInput("a DoRA adapter cannot be a llama.cpp LoRA (llama.cpp has no DoRA)", where=where, hint=FUSE_HINT)
    from safetensors.numpy import load_file

    path = adapter_weights(adapter_dir, acfg)
    tensors = {k: v.astype(np.float32) for k, v in load_file(str(path)).items()}
    pairs = _mlx_pairs(tensors, acfg, path) if kind == "mlx" else _peft_pairs(tensors, acfg, path)
    if not pairs:
        raise BadInput("the adapter has no LoRA weights", where=str(path), hint="train it again")
    return Lora(kind, adapter_dir, pairs)


def _mlx_pairs(tensors: dict, acfg: dict, path: Path) -> list[LoraPair]:
    """mlx_lm: <module>.lora_a [in x r], <module>.lora_b [r x out]; one scale (lora_parameters.scale)."""
    scale = float((acfg.get("lora_parameters") or {}).get("scale", 20.0))
    other = [k for k in tensors if not k.endswith((".lora_a", ".lora_b"))]
    if other:
        raise BadInput(f"not a LoRA tensor: {other[0]}", where=str(path), hint=FUSE_HINT)
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors})
    return [
        LoraPair(m, _need(tensors, f"{m}.lora_a", path).T.copy(), _need(tensors, f"{m}.lora_b", path).T.copy(), scale)
        for m in modules
    ]


PEFT_KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight")


def _peft_pairs(tensors: dict, acfg: dict, path: Path) -> list[LoraPair]:
    """PEFT: base_model.model.<module>.lora_A.weight [r x in] and lora_B.weight [out x r]; scale lora_alpha / r
    (or / sqrt(r) with use_rslora), per module through rank_pattern / alpha_pattern."""
    if acfg.get("peft_type", "LORA") != "LORA":
        raise BadInput(f"a {acfg['peft_type']} adapter is not LoRA", where=str(path), hint=FUSE_HINT)
    if acfg.get("fan_in_fan_out"):
        raise BadInput("fan_in_fan_out adapters (GPT-2's Conv1D) are not supported", where=str(path), hint=FUSE_HINT)
    sides: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        m = PEFT_KEY.fullmatch(key)
        if m is None or m["module"].endswith(("lm_head", "embed_tokens")):
            raise BadInput(f"{key}: {_peft_problem(key)}", where=str(path), hint=FUSE_HINT)
        sides.setdefault(m["module"], {})[m["side"]] = value
    pairs = []
    for module in sorted(sides):
        a, b = _need(sides[module], "A", path, module), _need(sides[module], "B", path, module)
        r = a.shape[0]
        alpha = float(_pattern(acfg.get("alpha_pattern"), module, acfg.get("lora_alpha", 8)))
        r_cfg = int(_pattern(acfg.get("rank_pattern"), module, acfg.get("r", r)))
        scale = alpha / (math.sqrt(r_cfg) if acfg.get("use_rslora") else r_cfg)
        pairs.append(LoraPair(module, a, b, scale))
    return pairs


def _peft_problem(key: str) -> str:
    if "lm_head" in key:
        return (
            "LoRA on the output layer, which this GGUF adapter does not carry (tied embeddings have no output weight)"
        )
    if "embed" in key:
        return "LoRA on the embeddings, which this GGUF adapter does not carry"
    return "a whole tensor (modules_to_save), which a llama.cpp LoRA cannot hold"


def _pattern(patterns: dict | None, module: str, default):
    """PEFT's per-module override: the pattern that is the module's name or the end of it (a regex)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def _need(tensors: dict, key: str, path: Path, module: str | None = None) -> np.ndarray:
    if key not in tensors:
        raise BadInput(
            f"{module + ': ' if module else ''}the LoRA pair has no {key}", where=str(path), hint="train it again"
        )
    return tensors[key]


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
