"""`medtune fuse`: LoRA adapter + base model -> one HF safetensors folder the export stage takes."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from medtune import fsutil, runtime
from medtune.errors import BadInput

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


def read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise BadInput(f"no adapter_config.json in {adapter_dir}", hint="pass the --out folder of `medtune train`")
    if not (adapter_dir / "adapters.safetensors").is_file():
        raise BadInput(f"no adapters.safetensors in {adapter_dir}", hint="training did not finish; resume or re-run it")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BadInput(f"adapter_config.json is not valid JSON ({exc.msg})", where=f"{path}:{exc.lineno}",
                       hint="re-run training or restore the file") from exc


DTYPES = ("auto", "float32", "float16", "bfloat16")


def fuse(model: str, adapter, out, progress=None, *, dtype: str = "auto", dequantize: bool = False,
         force: bool = False) -> FuseResult:
    """Merge `adapter` into `model` and write an HF safetensors folder at `out`.

    dtype: auto = float32 on CPU, float16 on a GPU (Apple Silicon); dequantize: turn a quantized (QLoRA)
    base into plain weights; force: replace an existing `out`.
    """
    from medtune.models import pull
    from medtune.models.config import read_config, write_config

    mx = runtime.mx()
    from mlx.utils import tree_unflatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import save_model

    adapter, out = Path(adapter), Path(out)
    if dtype not in DTYPES:
        raise BadInput(f"--dtype must be one of {', '.join(DTYPES)}", hint="auto picks float32 on CPU, float16 on a GPU")
    acfg = read_adapter_config(adapter)
    if out.exists() and any(out.iterdir()) and not force:
        raise BadInput(f"output folder exists and is not empty: {out}", hint="pass --force to replace it, or choose another --out")
    base = pull(model)
    cfg = read_config(base.path)
    quantized = bool(cfg.get("quantization") or cfg.get("quantization_config"))
    if quantized and not dequantize:
        raise BadInput("the base model is quantized: GGUF export and other tools need plain weights",
                       where=str(base.path), hint="pass --dequantize")
    model_obj, _ = load(str(base.path))
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
        fsutil.write_json(tmp / "medtune_manifest.json", {
            "stage": "fuse",
            "inputs": {"base": base.to_dict(), "adapter": str(adapter),
                       "adapter_sha256": fsutil.sha256_file(adapter / "adapters.safetensors"),
                       "adapter_config": json.loads((adapter / "adapter_config.json").read_text())},
            "fused_layers": len(fused), "dtype": cfg["torch_dtype"], "dequantized": dequantize,
        })
    files = sorted(p.name for p in out.iterdir())
    return FuseResult(out=out, base=base.spec, adapter=str(adapter), fused_layers=len(fused), files=files)
