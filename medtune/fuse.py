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


def fuse(model: str, adapter, out, progress=None) -> FuseResult:
    from medtune.models import pull
    from medtune.models.config import read_config, write_config

    mx = runtime.mx()
    from mlx.utils import tree_unflatten
    from mlx_lm import load
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import save_model

    adapter, out = Path(adapter), Path(out)
    read_adapter_config(adapter)
    base = pull(model)
    cfg = read_config(base.path)
    if cfg.get("quantization") or cfg.get("quantization_config"):
        raise BadInput("fusing into a quantized base is not supported yet", where=str(base.path),
                       hint="train and fuse on the 16/32-bit base model")
    model_obj, _ = load(str(base.path))
    try:
        load_adapters(model_obj, str(adapter))
    except ValueError as exc:
        first = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = first[1] if len(first) > 1 else first[0]
        raise BadInput(f"adapter does not fit this base model ({detail})", where=str(adapter),
                       hint="fuse with the same --model the adapter was trained on") from exc
    fused = [(name, m.fuse()) for name, m in model_obj.named_modules() if hasattr(m, "fuse")]
    if not fused:
        raise BadInput("the adapter added no LoRA layers to the model", where=str(adapter), hint="check adapter_config.json")
    model_obj.update_modules(tree_unflatten(fused))
    mx.eval(model_obj.parameters())

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
            "fused_layers": len(fused),
        })
    files = sorted(p.name for p in out.iterdir())
    return FuseResult(out=out, base=base.spec, adapter=str(adapter), fused_layers=len(fused), files=files)
