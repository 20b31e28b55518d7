"""LoRA adapters on disk, one form for both layouts, and conversion between them.

    lora = read_lora("adapters/cardio")                       # mlx_lm's or PEFT's, as LoraPair(module, A, B, scale)
    convert("adapters/cardio", "peft", "adapters/cardio-peft")  # or "mlx"

- mlx_lm keeps `<module>.lora_a` [in x rank] and `<module>.lora_b` [rank x out] and adds scale * (x a) b, one scale
  (adapter_config.json: lora_parameters.scale), on the last `num_layers` layers, the modules `keys` names.
- PEFT keeps `base_model.model.<module>.lora_A.weight` [rank x in] and `lora_B.weight` [out x rank] with scale
  lora_alpha / r (rsLoRA: / sqrt(r); rank_pattern and alpha_pattern per module).
- The one form: for each module, A [rank x in], B [out x rank] and its scale: the layer adds scale * B A x.

Writing either layout is exact: one rank for all modules (a smaller one padded with zero rows of A and columns of
B) and one scale (a module's own scale folded into its B); an mlx adapter whose layers are not the last ones gets
num_layers up to the first adapted layer (the layers between load no weights: their B stays zero).
DoRA, full fine-tunes, PEFT's modules_to_save and LoRA on the embeddings or the output layer are refused.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medtune.core.errors import BadInput

FUSE_HINT = "fuse it instead (medtune fuse), which merges every kind of adapter"


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
    """The adapter's low-rank pairs, in PEFT's orientation; what has no low-rank pairs is refused."""
    from medtune.fuse import adapter_kind, adapter_weights, read_adapter_config

    adapter_dir = Path(adapter_dir)
    acfg = read_adapter_config(adapter_dir)
    kind = adapter_kind(acfg)
    where = str(adapter_dir / "adapter_config.json")
    if kind == "torch-full" or acfg.get("fine_tune_type") == "full":
        raise BadInput("a full fine-tune is not a LoRA adapter: it has no low-rank pairs", where=where, hint=FUSE_HINT)
    if acfg.get("fine_tune_type") == "dora" or acfg.get("use_dora"):
        raise BadInput("a DoRA adapter has magnitudes besides its low-rank pairs", where=where, hint=FUSE_HINT)
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


# ---- writing either layout ---------------------------------------------------------------------------
LAYER = re.compile(r"(?P<head>.*\.layers)\.(?P<n>\d+)\.(?P<key>.+)")
MLX_FILES = ("adapters.safetensors", "adapter_config.json")
PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")
CONVERTED = "medtune_converted.json"  # where a converted adapter came from


def uniform(lora: Lora) -> tuple[int, float, list[tuple[str, np.ndarray, np.ndarray]]]:
    """(rank, scale, [(module, A, B)]) with one rank (zero-padded) and one scale (the first pair's; another
    pair's own scale folded into its B): scale * B A is each pair's product, exactly."""
    rank, scale = max(p.rank for p in lora.pairs), lora.pairs[0].scale
    out = []
    for p in lora.pairs:
        a = np.zeros((rank, p.a.shape[1]), np.float32)
        b = np.zeros((p.b.shape[0], rank), np.float32)
        a[: p.rank] = p.a
        b[:, : p.rank] = p.b if math.isclose(p.scale, scale) else p.b * np.float32(p.scale / scale)
        out.append((p.module, a, b))
    return rank, scale, out


def _layers(lora: Lora) -> tuple[list[int], list[str]]:
    """(the adapted layer indices, the module names within a layer: self_attn.q_proj, …)."""
    found = [LAYER.fullmatch(p.module) for p in lora.pairs]
    bad = next((p.module for p, m in zip(lora.pairs, found) if m is None), None)
    if bad:
        raise BadInput(f"{bad}: not inside a decoder layer", where=str(lora.source), hint=FUSE_HINT)
    return sorted({int(m["n"]) for m in found}), sorted({m["key"] for m in found})


def write_mlx(lora: Lora, out: Path, n_layers: int, base_model: str) -> Path:
    """mlx_lm's layout in `out`: adapters.safetensors and adapter_config.json (num_layers counted from the first
    adapted layer to the last of the model's `n_layers`)."""
    from safetensors.numpy import save_file

    from medtune.core import fsutil

    rank, scale, pairs = uniform(lora)
    layers, keys = _layers(lora)
    tensors = {}
    for module, a, b in pairs:
        tensors[f"{module}.lora_a"], tensors[f"{module}.lora_b"] = a.T.copy(), b.T.copy()
    config = {
        "fine_tune_type": "lora",
        "num_layers": n_layers - layers[0],
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": keys},
        "base_model": base_model,
    }
    return _write(out, "adapters.safetensors", tensors, config, save_file, fsutil)


def write_peft(lora: Lora, out: Path, n_layers: int, base_model: str) -> Path:
    """PEFT's layout in `out`: adapter_model.safetensors and adapter_config.json (r, lora_alpha = scale * r, the
    module names as target_modules, the adapted layers as layers_to_transform when not all)."""
    from safetensors.numpy import save_file

    from medtune.core import fsutil

    rank, scale, pairs = uniform(lora)
    layers, keys = _layers(lora)
    tensors = {}
    for module, a, b in pairs:
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    every = layers == list(range(n_layers))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": scale * rank,
        "lora_dropout": 0.0,
        "target_modules": sorted({k.rsplit(".", 1)[-1] for k in keys}),
        "layers_to_transform": None if every else layers,
        "layers_pattern": None if every else "layers",
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
        "base_model_name_or_path": base_model,
    }
    return _write(out, "adapter_model.safetensors", tensors, config, save_file, fsutil)


def _write(out: Path, weights: str, tensors: dict, config: dict, save_file, fsutil) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    with fsutil.atomic_path(out / weights) as tmp:
        save_file(tensors, str(tmp))
    fsutil.write_text(out / "adapter_config.json", json.dumps(config, indent=2) + "\n")
    return out


def recorded_base(adapter_dir: Path) -> str | None:
    """The base model an adapter records (mlx_lm's base_model, PEFT's base_model_name_or_path)."""
    try:
        acfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    found = acfg.get("base_model") or acfg.get("base_model_name_or_path")
    return found if isinstance(found, str) and found else None


def convert(adapter_dir: str | Path, to: str, out: str | Path, base: str | None = None) -> dict:
    """The adapter in the other layout (to: mlx | peft) in `out`, exactly; base: the model it was trained on (default:
    the one it records), for its number of layers. Returns {out, kind, from, rank, scale, modules, layers}."""
    from medtune.models import resolve
    from medtune.models.config import read_config

    if to not in ("mlx", "peft"):
        raise BadInput(f"--to {to!r}: an adapter is converted to mlx or peft", hint="--to mlx or --to peft")
    adapter_dir, out = Path(adapter_dir), Path(out)
    lora = read_lora(adapter_dir)
    base = base or recorded_base(adapter_dir)
    if not base:
        raise BadInput(
            "the adapter does not say which base model it was trained on",
            where=str(adapter_dir / "adapter_config.json"),
            hint="--base MODEL",
        )
    if out.resolve() == adapter_dir.resolve():
        raise BadInput("--out is the adapter's own folder", hint="write the converted adapter to another folder")
    n_layers = int(read_config(resolve(base)).get("num_hidden_layers") or 0)
    layers, _ = _layers(lora)
    if layers[-1] >= n_layers:
        raise BadInput(
            f"the adapter has layer {layers[-1]}, the base {base} has {n_layers}",
            where=str(adapter_dir),
            hint="--base: the model the adapter was trained on",
        )
    write = write_mlx if to == "mlx" else write_peft
    write(lora, out, n_layers, str(base))
    from medtune.core import fsutil
    from medtune.fuse import adapter_weights, read_adapter_config

    source = adapter_weights(adapter_dir, read_adapter_config(adapter_dir))
    lineage = {"converted_from": str(adapter_dir.absolute()), "kind": lora.kind, "sha256": fsutil.sha256_file(source)}
    fsutil.write_text(out / CONVERTED, json.dumps(lineage, indent=2) + "\n")  # PEFT warns of unknown config keys
    rank, scale = max(p.rank for p in lora.pairs), lora.pairs[0].scale  # as uniform() wrote them
    return {"out": str(out), "kind": to, "from": lora.kind, "rank": rank, "scale": scale,
            "modules": len(lora.pairs), "layers": layers}  # fmt: skip


def as_mlx(adapter_dir: str | Path, base_dir: str | Path) -> Path:
    """An adapter folder mlx_lm can load: itself when it is mlx_lm's, else its exact conversion (PEFT → mlx)."""
    return _in_layout(Path(adapter_dir), base_dir, "mlx")


def as_peft(adapter_dir: str | Path, base_dir: str | Path) -> Path:
    """An adapter folder PEFT can load: itself when it is PEFT's, else its exact conversion (mlx → PEFT)."""
    return _in_layout(Path(adapter_dir), base_dir, "peft")


def _in_layout(adapter_dir: Path, base_dir, kind: str) -> Path:
    """The adapter in `kind`'s layout: itself, or its conversion, made once per adapter weights (sha256) and base in
    medtune's cache."""
    from medtune.core import fsutil
    from medtune.core.paths import cache_dir
    from medtune.fuse import adapter_kind, adapter_weights, read_adapter_config

    acfg = read_adapter_config(adapter_dir)
    if adapter_kind(acfg) == kind:
        return adapter_dir
    digest = fsutil.sha256_file(adapter_weights(adapter_dir, acfg))
    out = cache_dir() / "adapters" / f"{kind}-{digest[:24]}-{_base_key(base_dir)}"
    if not all((out / f).is_file() for f in (MLX_FILES if kind == "mlx" else PEFT_FILES)):
        convert(adapter_dir, kind, out, str(base_dir))
    return out


def init_shape(adapter_dir: str | Path, n_model: int) -> dict:
    """What an adapter fixes for a run that starts from it: rank, scale, num_layers (counted from the top of a model
    of `n_model` layers) and fine_tune_type, from its adapter_config.json (mlx_lm's or PEFT's)."""
    from medtune.fuse import adapter_kind, read_adapter_config

    acfg = read_adapter_config(Path(adapter_dir))
    kind = adapter_kind(acfg)
    if kind == "mlx":
        lp = acfg.get("lora_parameters") or {}
        return {"rank": lp.get("rank"), "scale": lp.get("scale"), "num_layers": acfg.get("num_layers"),
                "fine_tune_type": acfg.get("fine_tune_type", "lora")}  # fmt: skip
    if kind != "peft" or acfg.get("peft_type", "LORA") != "LORA":
        raise BadInput(
            f"{adapter_dir} is not a LoRA/DoRA adapter",
            where=str(Path(adapter_dir) / "adapter_config.json"),
            hint="--init-adapter takes the --out folder of a LoRA run (mlx_lm's or PEFT's)",
        )
    r = int(acfg.get("r") or 8)
    layers = acfg.get("layers_to_transform")
    layers = [layers] if isinstance(layers, int) else layers
    return {
        "rank": r,
        "scale": float(acfg.get("lora_alpha", 8)) / (math.sqrt(r) if acfg.get("use_rslora") else r),
        "num_layers": n_model - min(layers) if layers else n_model,
        "fine_tune_type": "dora" if acfg.get("use_dora") else "lora",
    }


def _base_key(base_dir) -> str:
    import hashlib

    return hashlib.sha256(str(Path(base_dir).absolute()).encode()).hexdigest()[:12]
