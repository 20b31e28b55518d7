"""`medtune fuse`: adapter + base model -> one HF safetensors folder the export stage takes.

What is the same for every adapter lives here: reading and checking the adapter folder, telling its
kind from adapter_config.json, and writing the fused folder (config without quantization, the base's
tokenizer files, medtune_manifest.json; atomically). The merge itself is dispatched on the adapter kind
(FUSERS): mlx_lm adapters in medtune.fuse.mlx, PEFT adapters and torch full fine-tunes in medtune.fuse.peft.
A training backend declares the kind it writes (medtune.train.backends: Backend.adapter_kind).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from medtune.core import fsutil, redact, safety
from medtune.core.errors import BadInput
from medtune.core.lock import holds as _holds_lock
from medtune.core.options import from_kwargs
from medtune.fuse.options import DTYPES, FuseOptions

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
)
# The base's licence files travel with the fused model (a derivative): LICENSE, LICENSE.txt, NOTICE, USE_POLICY.md...
LICENCE_PREFIXES = ("LICENSE", "LICENCE", "NOTICE", "USE_POLICY")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


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
FUSERS = {  # adapter kind -> "module:function" that merges it: (model, adapter, out, acfg, dtype=, dequantize=)
    "mlx": "medtune.fuse.mlx:fuse_mlx",
    "peft": "medtune.fuse.peft:fuse_peft",
    "torch-full": "medtune.fuse.peft:fuse_peft",
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
                    raise BadInput(
                        f"not a readable safetensors file: {problem}",
                        where=str(path),
                        hint="the adapter is damaged or was cut short; train it again",
                    )
            return path
    raise BadInput(f"no {names[0]} in {adapter_dir}", hint="training did not finish; resume or re-run it")


def read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / "adapter_config.json"
    if not path.is_file():
        raise BadInput(f"no adapter_config.json in {adapter_dir}", hint="pass the --out folder of `medtune train`")
    try:
        acfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BadInput(
            f"adapter_config.json is not valid JSON ({exc.msg})",
            where=f"{path}:{exc.lineno}",
            hint="re-run training or restore the file",
        ) from exc
    adapter_weights(adapter_dir, acfg)
    return acfg


@_holds_lock("out")  # one writer per output folder (medtune.core.lock)
def fuse(model: str, adapter, out, progress=None, opts: FuseOptions | None = None, **fields) -> FuseResult:
    """Merge `adapter` into `model` and write an HF safetensors folder at `out`.

    The adapter may be mlx_lm's (from the mlx backend) or a PEFT adapter (torch/unsloth backends), told
    apart by its adapter_config.json.
    dtype: auto = float32 on CPU, float16 on a GPU (Apple Silicon) for MLX adapters, the base's 16-bit dtype
    (float16 for a float32 base) for PEFT adapters; dequantize: turn a quantized (QLoRA) base into plain
    weights; force: replace an existing `out`. The options are FuseOptions: `opts`, or keywords (dtype=...).
    """
    o = from_kwargs(FuseOptions, opts, **fields)
    dtype, dequantize, force = o.dtype, o.dequantize, o.force
    adapter, out = Path(adapter), Path(out)
    if dtype not in DTYPES:
        raise BadInput(
            f"--dtype must be one of {', '.join(DTYPES)}", hint="auto picks float32 on CPU, float16 on a GPU"
        )
    adapter = safety.adapter_dir_for_loading(adapter)  # symlinks, remote code, pickle-only weights
    acfg = read_adapter_config(adapter)
    if out.exists() and any(out.iterdir()) and not force:
        raise BadInput(
            f"output folder exists and is not empty: {out}", hint="pass --force to replace it, or choose another --out"
        )
    kind = adapter_kind(acfg)
    if kind == "peft" and importlib.util.find_spec("torch") is None and not acfg.get("use_dora"):
        from medtune.adapters import as_mlx  # a Mac without torch: the PEFT LoRA in mlx_lm's layout, exactly
        from medtune.models import resolve

        adapter = as_mlx(adapter, resolve(str(model)))
        acfg, kind = read_adapter_config(adapter), "mlx"
    module, func = FUSERS[kind].split(":")
    return getattr(importlib.import_module(module), func)(model, adapter, out, acfg, dtype=dtype, dequantize=dequantize)


def is_quantized(cfg: dict) -> bool:
    return bool(cfg.get("quantization") or cfg.get("quantization_config"))


def write_fused(out: Path, save, cfg: dict, base_dir: Path, manifest: dict) -> list[str]:
    """The fused folder, renamed into place whole: save(folder) writes the weights, then the config (without
    quantization), the base's tokenizer files, its licence files (licence_files) and medtune_manifest.json.
    Returns its file names."""
    from medtune.models.config import write_config

    with fsutil.atomic_dir(out) as tmp:
        save(tmp)
        write_config(tmp, cfg, drop_quantization=True)
        for name in TOKENIZER_FILES:
            if (base_dir / name).is_file():
                shutil.copy2(base_dir / name, tmp / name)
        for path in licence_files(base_dir):
            shutil.copy2(path, tmp / path.name)
        from medtune.data.wording import set_default_system, training_wording

        words = training_wording((manifest.get("inputs") or {}).get("adapter"))
        if words.get("system"):  # the chat template's default system prompt becomes training's, where it has one
            why = set_default_system(tmp, words["system"])
            words = {**words, "template_default": why or "set"}
        redact.write_json(tmp / "medtune_manifest.json", {"stage": "fuse", **manifest, "wording": words})
        from medtune.models.card import write_card

        write_card(
            tmp, as_folder=out
        )  # README.md, the model card: base, licence, data, training (medtune eval adds the metrics)
    return sorted(p.name for p in out.iterdir())


def licence_files(model_dir: Path) -> list[Path]:
    """The model folder's licence files: LICENSE*, LICENCE*, NOTICE*, USE_POLICY* (a Hub snapshot's links to its
    blobs too: the base folder's links were checked when it was pulled, medtune.core.safety.check_links)."""
    if not model_dir.is_dir():
        return []
    return sorted(p for p in model_dir.iterdir() if p.name.upper().startswith(LICENCE_PREFIXES) and p.is_file())
