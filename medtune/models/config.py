"""Model config inspection and normalisation.

transformers 5.x writes `rope_parameters: {rope_theta, rope_type}` instead of a top-level
`rope_theta`; mlx_lm's llama model then silently falls back to theta 10000 and disagrees with HF
and llama.cpp. Every config we write or load goes through `normalise_config`. A config without `architectures`
gets the one its `model_type` names in the architecture registry (medtune.archs).
"""

from __future__ import annotations

import json
from pathlib import Path

from medtune import archs
from medtune.core.errors import BadInput

QUANT_KEYS = ("quantization", "quantization_config")


def normalise_config(cfg: dict, *, drop_quantization: bool = False) -> dict:
    cfg = dict(cfg)
    rope = cfg.get("rope_parameters")
    if isinstance(rope, dict):
        if "rope_theta" not in cfg and "rope_theta" in rope:
            cfg["rope_theta"] = rope["rope_theta"]
        rtype = rope.get("rope_type")
        if rtype and rtype != "default" and not cfg.get("rope_scaling"):
            cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if not cfg.get("architectures") and archs.hf_arch_for_model_type(cfg.get("model_type")):
        cfg["architectures"] = [archs.hf_arch_for_model_type(cfg["model_type"])]
    cls = archs.REGISTRY.get((cfg.get("architectures") or [None])[0])
    if cls is not None:
        cfg = cls.normalise_config(cfg)
    if drop_quantization:
        for key in QUANT_KEYS:
            cfg.pop(key, None)
    return cfg


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise BadInput(
            f"no config.json in model folder {model_dir}",
            hint="give a Hugging Face model folder (config.json, *.safetensors, tokenizer files), or a spec "
            "such as builtin:smollm2-135m",
        )
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadInput(
            f"config.json is not valid JSON ({exc})", where=str(path), hint="re-download the model or fix the file"
        ) from exc
    if not isinstance(cfg, dict):
        raise BadInput("config.json is not a JSON object", where=str(path), hint="re-download the model")
    return normalise_config(cfg)


def write_config(model_dir: str | Path, cfg: dict, *, drop_quantization: bool = False) -> Path:
    from medtune.core import fsutil

    cfg = normalise_config(cfg, drop_quantization=drop_quantization)
    return fsutil.write_json(Path(model_dir) / "config.json", cfg)
