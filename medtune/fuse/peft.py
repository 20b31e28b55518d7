"""Fuse a PEFT adapter (the torch and unsloth backends', TRL's, ...) or a torch full fine-tune into its base,
with transformers on CPU, into a 16-bit HF folder.

The base is loaded unquantized, also for an adapter trained on a 4-bit (QLoRA) base: the merge goes into
the 16-bit weights. Merged in float32 where memory allows, in the output dtype otherwise; refused (exit 4)
when neither the merge nor the output fits in memory and on disk.
"""

from __future__ import annotations

from pathlib import Path

from medtune.core import fsutil, safety
from medtune.core.errors import BadInput, ResourceError, require
from medtune.fuse import (
    DTYPE_BYTES,
    FuseResult,
    adapter_kind,
    adapter_weights,
    is_quantized,
    write_fused,
)

MISFIT_HINT = "fuse with the same --model the adapter was trained on"


def fuse_peft(
    model: str, adapter: Path, out: Path, acfg: dict, *, dtype: str = "auto", dequantize: bool = False
) -> FuseResult:
    from medtune.models import pull
    from medtune.models.config import read_config
    from medtune.train.hf import count_params

    torch = require("torch", "cuda", "merging a PyTorch (PEFT) adapter")
    kind = adapter_kind(acfg)
    if kind == "peft":
        _check_peft(adapter, acfg)
    base = pull(model)
    cfg = read_config(base.path)
    quantized = is_quantized(cfg)
    if quantized and not dequantize:
        raise BadInput(
            "the base model is quantized: pass the unquantized base the adapter was trained from, or --dequantize",
            where=str(base.path),
            hint="a QLoRA adapter trained with --load-in-4bit merges into the original 16-bit base",
        )
    src = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    target = dtype if dtype != "auto" else (src if src in ("float16", "bfloat16") else "float16")
    work = _merge_dtype(count_params(base.path, cfg), target, out)
    model_obj = _load_base(base.path, getattr(torch, work), quantized)
    weights = adapter_weights(adapter, acfg)
    if kind == "peft":
        model_obj, merged = _merge_peft(model_obj, adapter, weights)
    else:
        merged = _load_full(model_obj, adapter, weights)
    model_obj = model_obj.to(getattr(torch, target))
    cfg["torch_dtype"] = target
    if "dtype" in cfg:
        cfg["dtype"] = target
    manifest = {
        "backend": "peft" if kind == "peft" else "torch",
        "inputs": {
            "base": base.to_dict(),
            "adapter": str(adapter),
            "adapter_sha256": fsutil.sha256_file(weights),
            "adapter_config": acfg,
        },
        "fused_layers": merged,
        "dtype": target,
        "merged_in": work,
        "dequantized": quantized,
    }
    files = write_fused(out, lambda tmp: model_obj.save_pretrained(str(tmp)), cfg, base.path, manifest)
    return FuseResult(out=out, base=base.spec, adapter=str(adapter), fused_layers=merged, files=files)


def _check_peft(adapter: Path, acfg: dict) -> None:
    require("peft", "cuda", "merging a PEFT adapter")
    if acfg.get("peft_type") != "LORA":
        raise BadInput(
            f"a {acfg.get('peft_type')} adapter cannot be merged; medtune merges LoRA/DoRA adapters",
            where=str(adapter / "adapter_config.json"),
            hint="train with medtune's torch or unsloth backend",
        )


def _merge_dtype(n_params: int, target: str, out: Path) -> str:
    """float32 when the merge fits in memory that way, else the output dtype; refused when neither fits, or
    when the output does not fit on disk."""
    from medtune.core.resources import available_memory, check_disk

    avail = available_memory()[0]
    work = "float32" if n_params * 4 * 1.2 <= 0.9 * avail else target
    if n_params * DTYPE_BYTES[work] * 1.2 > 0.9 * avail:
        raise ResourceError(
            f"merging needs ~{n_params * DTYPE_BYTES[work] * 1.2 / 1e9:.1f} GB of memory, "
            f"{avail / 1e9:.1f} GB is available",
            hint="close other programs, or merge on a bigger machine",
        )
    check_disk(out / "model.safetensors", int(n_params * DTYPE_BYTES[target] * 1.02), f"the merged model ({out})")
    return work


def _load_base(base_dir: Path, dtype, quantized: bool):
    from transformers import AutoModelForCausalLM

    from medtune.train.hf import dtype_kwargs

    try:
        model_obj = AutoModelForCausalLM.from_pretrained(
            str(base_dir), **dtype_kwargs(dtype), **safety.hf_load_kwargs(base_dir)
        )
    except (ValueError, OSError, KeyError) as exc:
        raise BadInput(
            f"transformers cannot load the base model: {str(exc).splitlines()[0]}",
            where=str(base_dir),
            hint="check the model folder",
        ) from exc
    if quantized:
        try:
            model_obj = model_obj.dequantize()
        except Exception as exc:  # noqa: BLE001 - what the quantizer raises varies
            raise BadInput(
                f"cannot dequantize this base on this machine ({exc})",
                where=str(base_dir),
                hint="pass the original unquantized base model instead",
            ) from exc
    return model_obj


def _merge_peft(model_obj, adapter: Path, weights: Path):
    """(the base with the LoRA/DoRA layers merged into its weights, how many layers were merged)."""
    from peft import PeftModel, get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    try:
        peft_model = PeftModel.from_pretrained(model_obj, str(adapter))
    except (ValueError, RuntimeError, KeyError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # torch's load_state_dict says "Error(s) in loading state_dict ...:" first, the mismatch after it
        detail = [x for x in lines if "size mismatch" in x or "shape" in x][:1] or lines[:1]
        raise BadInput(
            f"adapter does not fit this base model ({detail[0] if detail else type(exc).__name__})",
            where=str(adapter),
            hint=MISFIT_HINT,
        ) from exc
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(weights), "pt") as fh:
            found = set(fh.keys())
        expected = set(get_peft_model_state_dict(peft_model))
        if found != expected:
            raise BadInput(
                f"adapter does not fit this base model ({sorted(found ^ expected)[0]})",
                where=str(adapter),
                hint=MISFIT_HINT,
            )
    merged = sum(isinstance(m, LoraLayer) for m in peft_model.modules())
    if not merged:
        raise BadInput(
            "the adapter added no LoRA layers to the model", where=str(adapter), hint="check adapter_config.json"
        )
    return peft_model.merge_and_unload(), merged


def _load_full(model_obj, adapter: Path, weights: Path) -> int:
    """A torch full fine-tune: its tensors, under the base's own names, replace the base's (0 layers merged)."""
    from safetensors.torch import load_file

    saved = load_file(str(weights))
    own = model_obj.state_dict()
    odd = [k for k, v in saved.items() if k not in own or tuple(own[k].shape) != tuple(v.shape)]
    if odd:
        raise BadInput(f"adapter does not fit this base model ({odd[0]})", where=str(adapter), hint=MISFIT_HINT)
    model_obj.load_state_dict(saved, strict=False)
    return 0
