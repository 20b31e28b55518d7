"""Fuse an mlx_lm adapter (the mlx backend's) into its base with mlx_lm: LoRA/DoRA layers merged, a full
fine-tune's weights loaded; an MLX-quantized (QLoRA) base dequantized on request."""

from __future__ import annotations

from pathlib import Path

from medtune.core import fsutil, runtime, safety
from medtune.core.errors import BadInput
from medtune.fuse import DTYPE_BYTES, FuseResult, is_quantized, write_fused


def fuse_mlx(
    model: str, adapter: Path, out: Path, acfg: dict, *, dtype: str = "auto", dequantize: bool = False
) -> FuseResult:
    from medtune.models import pull
    from medtune.models.config import read_config

    mx = runtime.mx()
    from mlx_lm.utils import save_model

    base = pull(model)
    cfg = read_config(base.path)
    quantized = is_quantized(cfg)
    if quantized and not dequantize:
        raise BadInput(
            "the base model is quantized: GGUF export and other tools need plain weights",
            where=str(base.path),
            hint="pass --dequantize",
        )
    target_name = dtype if dtype != "auto" else ("float32" if runtime.on_cpu() else "float16")
    _check_resources(base.path, cfg, quantized, target_name, out)
    model_obj = _load_base(base.path)
    fused = _merge(model_obj, adapter, acfg, dequantize)
    if dequantize:
        from mlx_lm.utils import dequantize_model

        model_obj = dequantize_model(model_obj)
    model_obj.set_dtype(getattr(mx, target_name))
    mx.eval(model_obj.parameters())
    cfg["torch_dtype"] = target_name
    manifest = {
        "inputs": {
            "base": base.to_dict(),
            "adapter": str(adapter),
            "adapter_sha256": fsutil.sha256_file(adapter / "adapters.safetensors"),
            "adapter_config": acfg,
        },
        "fused_layers": fused,
        "dtype": cfg["torch_dtype"],
        "dequantized": dequantize,
    }
    files = write_fused(out, lambda tmp: save_model(tmp, model_obj), cfg, base.path, manifest)
    return FuseResult(out=out, base=base.spec, adapter=str(adapter), fused_layers=fused, files=files)


def _check_resources(base_dir: Path, cfg: dict, quantized: bool, target: str, out: Path) -> None:
    """Memory for the base in its own dtype and its cast copy (both can be alive at the peak); disk for the output."""
    from medtune.core.resources import check_disk, check_memory
    from medtune.train.hf import count_params

    n_params = count_params(base_dir, cfg)  # from the safetensors headers: torch is not imported
    src_bytes = 4 if quantized else DTYPE_BYTES.get(str(cfg.get("torch_dtype") or "float32"), 4)
    check_memory(
        int(n_params * (src_bytes + DTYPE_BYTES[target]) * 1.1),
        "merging the adapter",
        hint="close other programs, fuse with --dtype float16, or merge on a bigger machine",
    )
    check_disk(out / "model.safetensors", int(n_params * DTYPE_BYTES[target] * 1.02), f"the fused model ({out})")


def _load_base(base_dir: Path):
    from mlx_lm import load

    try:
        model_obj, _ = load(str(base_dir), **safety.mlx_load_kwargs())
    except (ValueError, FileNotFoundError, KeyError, RuntimeError, OSError) as exc:  # RuntimeError: a bad safetensors
        from medtune.models.modelcheck import load_failure

        raise load_failure(base_dir, exc, "mlx_lm") from exc
    return model_obj


def _merge(model_obj, adapter: Path, acfg: dict, dequantize: bool) -> int:
    """Load the adapter into the model and fold its LoRA/DoRA layers in; the number of layers fused."""
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.utils import load_adapters

    try:
        load_adapters(model_obj, str(adapter))
    except ValueError as exc:
        first = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = first[1] if len(first) > 1 else first[0]
        raise BadInput(
            f"adapter does not fit this base model ({detail})",
            where=str(adapter),
            hint="fuse with the same --model the adapter was trained on",
        ) from exc
    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in model_obj.named_modules() if hasattr(m, "fuse")]
    if not fused and acfg.get("fine_tune_type", "lora") != "full":
        raise BadInput(
            "the adapter added no LoRA layers to the model", where=str(adapter), hint="check adapter_config.json"
        )
    if fused:
        model_obj.update_modules(tree_unflatten(fused))
    return len(fused)
