"""`medtune fuse`: LoRA adapter + base model -> one HF safetensors folder the export stage takes."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from medtune.core import fsutil, redact, runtime, safety
from medtune.core.errors import BadInput
from medtune.core.lock import holds as _holds_lock

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt")


@dataclass
class FuseResult:
    out: Path
    base: str
    adapter: str
    fused_layers: int
    files: list

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out)
        return d


ADAPTER_WEIGHTS = {  # adapter kind -> weight files it may have (the first one found is used)
    "mlx": ("adapters.safetensors",),
    "peft": ("adapter_model.safetensors", "adapter_model.bin"),
    "torch-full": ("adapter_model.safetensors",),
}


def adapter_kind(acfg: dict) -> str:
    """mlx (mlx_lm's adapter_config), peft (a PEFT adapter: medtune's torch/unsloth backends, TRL, ...)
    or torch-full (medtune's torch backend, full fine-tune: trained tensors under the base's names)."""
    if "peft_type" in acfg:
        return "peft"
    if acfg.get("medtune_format") == "torch-full":
        return "torch-full"
    return "mlx"


def adapter_weights(adapter_dir: Path, acfg: dict) -> Path:
    names = ADAPTER_WEIGHTS[adapter_kind(acfg)]
    for name in names:
        path = adapter_dir / name
        if path.is_file():
            if path.suffix == ".safetensors":
                from medtune.models.modelcheck import safetensors_problem

                problem = safetensors_problem(path)
                if problem:
                    raise BadInput(f"not a readable safetensors file: {problem}", where=str(path),
                                   hint="the adapter is damaged or was cut short; train it again")
            return path
    raise BadInput(f"no {names[0]} in {adapter_dir}", hint="training did not finish; resume or re-run it")


def read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise BadInput(f"no adapter_config.json in {adapter_dir}", hint="pass the --out folder of `medtune train`")
    try:
        acfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BadInput(f"adapter_config.json is not valid JSON ({exc.msg})", where=f"{path}:{exc.lineno}",
                       hint="re-run training or restore the file") from exc
    adapter_weights(adapter_dir, acfg)
    return acfg


DTYPES = ("auto", "float32", "float16", "bfloat16")


@_holds_lock("out")  # one writer per output folder (medtune.core.lock)
def fuse(model: str, adapter, out, progress=None, *, dtype: str = "auto", dequantize: bool = False,
         force: bool = False) -> FuseResult:
    """Merge `adapter` into `model` and write an HF safetensors folder at `out`.

    The adapter may be mlx_lm's (from the mlx backend) or a PEFT adapter (torch/unsloth backends), told
    apart by its adapter_config.json; see fuse_torch for the second.
    dtype: auto = float32 on CPU, float16 on a GPU (Apple Silicon) for MLX adapters, the base's 16-bit dtype
    (float16 for a float32 base) for PEFT adapters; dequantize: turn a quantized (QLoRA) base into plain
    weights; force: replace an existing `out`.
    """
    from medtune.models import pull
    from medtune.models.config import read_config, write_config

    adapter, out = Path(adapter), Path(out)
    if dtype not in DTYPES:
        raise BadInput(f"--dtype must be one of {', '.join(DTYPES)}", hint="auto picks float32 on CPU, float16 on a GPU")
    adapter = safety.adapter_dir_for_loading(adapter)  # symlinks, remote code, pickle-only weights
    acfg = read_adapter_config(adapter)
    if out.exists() and any(out.iterdir()) and not force:
        raise BadInput(f"output folder exists and is not empty: {out}", hint="pass --force to replace it, or choose another --out")
    if adapter_kind(acfg) != "mlx":
        return fuse_torch(model, adapter, out, acfg, dtype=dtype, dequantize=dequantize)
    mx = runtime.mx()
    from mlx.utils import tree_unflatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import save_model

    base = pull(model)
    cfg = read_config(base.path)
    quantized = bool(cfg.get("quantization") or cfg.get("quantization_config"))
    if quantized and not dequantize:
        raise BadInput("the base model is quantized: GGUF export and other tools need plain weights",
                       where=str(base.path), hint="pass --dequantize")
    target_name = dtype if dtype != "auto" else ("float32" if runtime.on_cpu() else "float16")
    from medtune.train.hf import count_params  # safetensors headers; torch is not imported

    n_params = count_params(base.path, cfg)
    src_bytes = 4 if quantized else TORCH_DTYPES.get(str(cfg.get("torch_dtype") or "float32"), 4)
    from medtune.core.resources import check_disk, check_memory

    # the base in its own dtype, then cast: both copies can be alive at the peak
    check_memory(int(n_params * (src_bytes + TORCH_DTYPES[target_name]) * 1.1), "merging the adapter",
                 hint="close other programs, fuse with --dtype float16, or merge on a bigger machine")
    check_disk(out / "model.safetensors", int(n_params * TORCH_DTYPES[target_name] * 1.02), f"the fused model ({out})")
    try:
        model_obj, _ = load(str(base.path), **safety.mlx_load_kwargs())
    except (ValueError, FileNotFoundError, KeyError, RuntimeError, OSError) as exc:  # RuntimeError: a bad safetensors
        from medtune.models.modelcheck import load_failure

        raise load_failure(base.path, exc, "mlx_lm") from exc
    try:
        load_adapters(model_obj, str(adapter))
    except ValueError as exc:
        first = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = first[1] if len(first) > 1 else first[0]
        raise BadInput(f"adapter does not fit this base model ({detail})", where=str(adapter),
                       hint="fuse with the same --model the adapter was trained on") from exc
    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in model_obj.named_modules() if hasattr(m, "fuse")]
    if not fused and acfg.get("fine_tune_type", "lora") != "full":
        raise BadInput("the adapter added no LoRA layers to the model", where=str(adapter), hint="check adapter_config.json")
    if fused:
        model_obj.update_modules(tree_unflatten(fused))
    if dequantize:
        from mlx_lm.utils import dequantize_model

        model_obj = dequantize_model(model_obj)
    target = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}.get(dtype)
    if target is None:  # auto
        target = mx.float32 if runtime.on_cpu() else mx.float16
    model_obj.set_dtype(target)
    mx.eval(model_obj.parameters())
    cfg["torch_dtype"] = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}[target]

    with fsutil.atomic_dir(out) as tmp:
        save_model(tmp, model_obj)
        write_config(tmp, cfg, drop_quantization=True)
        for name in TOKENIZER_FILES:
            if (base.path / name).is_file():
                shutil.copy2(base.path / name, tmp / name)
        redact.write_json(tmp / "medtune_manifest.json", {
            "stage": "fuse",
            "inputs": {"base": base.to_dict(), "adapter": str(adapter),
                       "adapter_sha256": fsutil.sha256_file(adapter / "adapters.safetensors"),
                       "adapter_config": json.loads((adapter / "adapter_config.json").read_text())},
            "fused_layers": len(fused), "dtype": cfg["torch_dtype"], "dequantized": dequantize,
        })
    files = sorted(p.name for p in out.iterdir())
    return FuseResult(out=out, base=base.spec, adapter=str(adapter), fused_layers=len(fused), files=files)


# ---- PEFT adapters (torch and unsloth backends) ---------------------------------------------------
TORCH_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2}


def fuse_torch(model: str, adapter: Path, out: Path, acfg: dict, *, dtype: str = "auto",
               dequantize: bool = False) -> FuseResult:
    """PEFT adapter (or a torch full fine-tune) + base -> 16-bit HF folder, with transformers on CPU.

    The base is loaded unquantized, also for an adapter trained on a 4-bit (QLoRA) base: the merge goes
    into the 16-bit weights. Merged in float32 where memory allows, in the output dtype otherwise; refused
    (exit 4) when neither the merge nor the output fits in memory and on disk."""
    from medtune.core.errors import ResourceError, require
    from medtune.models import pull
    from medtune.models.config import read_config, write_config
    from medtune.train.hf import count_params, dtype_kwargs

    torch = require("torch", "cuda", "merging a PyTorch (PEFT) adapter")
    kind = adapter_kind(acfg)
    if kind == "peft":
        require("peft", "cuda", "merging a PEFT adapter")
        if acfg.get("peft_type") != "LORA":
            raise BadInput(f"a {acfg.get('peft_type')} adapter cannot be merged; medtune merges LoRA/DoRA adapters",
                           where=str(adapter / "adapter_config.json"), hint="train with medtune's torch or unsloth backend")
    from transformers import AutoModelForCausalLM

    base = pull(model)
    cfg = read_config(base.path)
    quantized = bool(cfg.get("quantization") or cfg.get("quantization_config"))
    if quantized and not dequantize:
        raise BadInput("the base model is quantized: pass the unquantized base the adapter was trained from, or "
                       "--dequantize", where=str(base.path),
                       hint="a QLoRA adapter trained with --load-in-4bit merges into the original 16-bit base")
    src = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    target = dtype if dtype != "auto" else (src if src in ("float16", "bfloat16") else "float16")

    n_params = count_params(base.path, cfg)
    from medtune.core.resources import available_memory

    avail = available_memory()[0]
    work = "float32" if n_params * 4 * 1.2 <= 0.9 * avail else target
    if n_params * TORCH_DTYPES[work] * 1.2 > 0.9 * avail:
        raise ResourceError(f"merging needs ~{n_params * TORCH_DTYPES[work] * 1.2 / 1e9:.1f} GB of memory, "
                            f"{avail / 1e9:.1f} GB is available", hint="close other programs, or merge on a bigger machine")
    from medtune.core.resources import check_disk

    check_disk(out / "model.safetensors", int(n_params * TORCH_DTYPES[target] * 1.02), f"the merged model ({out})")

    try:
        model_obj = AutoModelForCausalLM.from_pretrained(str(base.path), **dtype_kwargs(getattr(torch, work)),
                                                         **safety.hf_load_kwargs(base.path))
    except (ValueError, OSError, KeyError) as exc:
        raise BadInput(f"transformers cannot load the base model: {str(exc).splitlines()[0]}", where=str(base.path),
                       hint="check the model folder") from exc
    if quantized:
        try:
            model_obj = model_obj.dequantize()
        except Exception as exc:  # noqa: BLE001 - what the quantizer raises varies
            raise BadInput(f"cannot dequantize this base on this machine ({exc})", where=str(base.path),
                           hint="pass the original unquantized base model instead") from exc
    weights = adapter_weights(adapter, acfg)
    merged = 0
    if kind == "peft":
        from peft import PeftModel, get_peft_model_state_dict

        try:
            peft_model = PeftModel.from_pretrained(model_obj, str(adapter))
        except (ValueError, RuntimeError, KeyError) as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            # torch's load_state_dict says "Error(s) in loading state_dict ...:" first, the mismatch after it
            detail = [x for x in lines if "size mismatch" in x or "shape" in x][:1] or lines[:1]
            raise BadInput(f"adapter does not fit this base model ({detail[0] if detail else type(exc).__name__})",
                           where=str(adapter), hint="fuse with the same --model the adapter was trained on") from exc
        expected = set(get_peft_model_state_dict(peft_model))
        if weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights), "pt") as fh:
                found = set(fh.keys())
            if found != expected:
                odd = sorted(found ^ expected)[0]
                raise BadInput(f"adapter does not fit this base model ({odd})", where=str(adapter),
                               hint="fuse with the same --model the adapter was trained on")
        from peft.tuners.lora import LoraLayer

        merged = sum(isinstance(m, LoraLayer) for m in peft_model.modules())
        if not merged:
            raise BadInput("the adapter added no LoRA layers to the model", where=str(adapter), hint="check adapter_config.json")
        model_obj = peft_model.merge_and_unload()
    else:
        from safetensors.torch import load_file

        saved = load_file(str(weights))
        own = model_obj.state_dict()
        odd = [k for k, v in saved.items() if k not in own or tuple(own[k].shape) != tuple(v.shape)]
        if odd:
            raise BadInput(f"adapter does not fit this base model ({odd[0]})", where=str(adapter),
                           hint="fuse with the same --model the adapter was trained on")
        model_obj.load_state_dict(saved, strict=False)
    model_obj = model_obj.to(getattr(torch, target))
    cfg["torch_dtype"] = target
    if "dtype" in cfg:
        cfg["dtype"] = target

    with fsutil.atomic_dir(out) as tmp:
        model_obj.save_pretrained(str(tmp))
        write_config(tmp, cfg, drop_quantization=True)
        for name in TOKENIZER_FILES:
            if (base.path / name).is_file():
                shutil.copy2(base.path / name, tmp / name)
        redact.write_json(tmp / "medtune_manifest.json", {
            "stage": "fuse", "backend": "peft" if kind == "peft" else "torch",
            "inputs": {"base": base.to_dict(), "adapter": str(adapter), "adapter_sha256": fsutil.sha256_file(weights),
                       "adapter_config": acfg},
            "fused_layers": merged, "dtype": target, "merged_in": work, "dequantized": quantized,
        })
    files = sorted(p.name for p in out.iterdir())
    return FuseResult(out=out, base=base.spec, adapter=str(adapter), fused_layers=merged, files=files)
