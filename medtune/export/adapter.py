"""`medtune export ADAPTER --base MODEL`: one base GGUF, shared by every adapter trained on it, and the adapter as a
llama.cpp LoRA GGUF (medtune.export.lora), with a Modelfile `FROM <base>.gguf` + `ADAPTER <adapter>.gguf`.

    res = export_adapter("adapters/cardio", "builtin:smollm2-135m", "adapters/cardio", "cardio")

The base is written once per base model and type into `base_out` (default: models/base-<base name>/, under the
working folder, beside the other exports) with its own Modelfile and export_manifest.json; a later adapter on the same base (same weight
files, by sha256) reuses it. A base given as a .gguf file is used as it is. The adapter's file is F32 beside an
F32 base, else F16.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from medtune.core.errors import BadInput


@dataclass
class AdapterExport:
    name: str
    base_gguf: Path
    base_written: bool  # False: an earlier export's base file was reused
    adapter_gguf: Path
    modelfile_path: Path
    modelfile_text: str
    lora: dict  # medtune.export.lora.write_lora_gguf's summary
    ollama_commands: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("base_gguf", "adapter_gguf", "modelfile_path"):
            d[k] = str(d[k])
        return d


def lora_type(base_type: str) -> str:
    """The adapter GGUF's type beside a base of `base_type`: F32 beside F32, else F16 (never quantized)."""
    return "f32" if base_type == "f32" else "f16"


def base_stem(base: str) -> str:
    """A file-name stem for a base spec: builtin:smollm2-135m → smollm2-135m, ORG/NAME → NAME, a folder → its name."""
    import re

    tail = re.split(r"[:/\\]", base.rstrip("/\\"))[-1] or "base"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", tail).strip("-.") or "base"


def export_adapter(
    adapter_dir: str | Path,
    base: str,
    out_dir: str | Path,
    name: str,
    *,
    quant: str = "f16",
    base_out: str | Path | None = None,
    modelfile_path: str | Path | None = None,
    system: str | None = None,
    family: str | None = None,
    progress=None,
) -> AdapterExport:
    """Write (or reuse) the base GGUF, write the adapter GGUF and the Modelfile that stacks them."""
    from medtune.core import fsutil
    from medtune.export import ollama_commands
    from medtune.export.lora import plan_lora, read_lora, write_lora_gguf
    from medtune.models import resolve
    from medtune.ollama import check_name

    check_name(name, file_stem=True)
    base_dir = resolve(base, progress=progress)
    plan_lora(read_lora(adapter_dir), base_dir)  # refuse a bad adapter, or the wrong base, before writing anything
    out_dir = Path(out_dir)
    modelfile_path = Path(modelfile_path or Path("Modelfiles") / f"{name}.Modelfile")
    if str(base).endswith(".gguf"):
        base_gguf, written, quant = Path(base), False, _gguf_type(Path(base))
    else:
        stem = base_stem(base)
        folder = Path(base_out or Path("models") / f"base-{stem}").absolute()
        base_gguf, written = _shared_base(base_dir, folder, stem, quant, progress)
    adapter_gguf = out_dir / f"{name}-lora-{lora_type(quant)}.gguf"
    summary = write_lora_gguf(adapter_dir, base_dir, adapter_gguf, lora_type(quant), name=name, progress=progress)
    system, notes = _adapter_wording(Path(adapter_dir), system)
    text, info = _modelfile(base_gguf, adapter_gguf, modelfile_path, base_dir, system, family)
    fsutil.write_text(modelfile_path, text)
    return AdapterExport(
        name, base_gguf, written, adapter_gguf, modelfile_path, text, summary,
        ollama_commands(name, modelfile_path), [*info["warnings"], *notes],
    )  # fmt: skip


def _adapter_wording(adapter_dir: Path, system: str | None) -> tuple[str | None, list[str]]:
    """(the Modelfile's SYSTEM: training's unless --system, warnings): the prompt wording stays with the client,
    since the shared base GGUF's template serves every adapter."""
    from medtune.data.wording import training_wording
    from medtune.export import training_system

    system, notes = training_system(adapter_dir, system)
    template = training_wording(adapter_dir).get("prompt_template")
    if template:
        notes.append(
            f"training's prompt wording {template!r} is not served (the shared base GGUF's template serves every "
            "adapter): send each question in it"
        )
    return system, notes


def _gguf_type(path: Path) -> str:
    from medtune.eval.fidelity import gguf_file_type

    return gguf_file_type(path).lower()


def _modelfile(base_gguf: Path, adapter_gguf: Path, modelfile_path: Path, base_dir: Path, system, family):
    """The base's Modelfile (template, stops, parameters from the base's tokenizer), with the ADAPTER line after
    FROM; both paths relative to the Modelfile's folder, as Ollama resolves them."""
    from medtune.export import modelfile_from
    from medtune.export.modelfile import render_modelfile

    text, info = render_modelfile(modelfile_from(base_gguf, modelfile_path), base_dir, system=system, family=family)
    lines = text.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.startswith("FROM ")) + 1
    lines.insert(at, f"ADAPTER {modelfile_from(adapter_gguf, modelfile_path)}\n")
    return "".join(lines), info


def _shared_base(base_dir: Path, folder: Path, stem: str, quant: str, progress) -> tuple[Path, bool]:
    """(the base GGUF, whether it was written now): reused when `folder`'s export manifest lists the same weight
    files (sha256) and the file is still there."""
    from medtune.export import export

    gguf = folder / f"{stem}-{quant}.gguf"
    if gguf.is_file() and _same_base(folder / "export_manifest.json", base_dir, gguf):
        return gguf, False
    res = export(base_dir, folder, stem, quant=[quant], modelfile_path=folder / f"{stem}.Modelfile", progress=progress)
    return res.gguf_paths[quant], True


def _same_base(manifest: Path, base_dir: Path, gguf: Path) -> bool:
    from medtune.core import fsutil

    try:
        m = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    files = m.get("inputs", {}).get("files", {})
    out = m.get("outputs", {}).get(str(gguf), {})
    if not files or out.get("bytes") != gguf.stat().st_size:
        return False
    for fname, digest in files.items():
        path = base_dir / fname
        if not path.is_file() or fsutil.sha256_file(path) != digest:
            return False
    return True


def check_base_spec(base: str | None, adapter_dir: str | Path) -> str:
    """--base, or else the base the adapter records (mlx_lm's base_model, PEFT's base_model_name_or_path) when that
    folder is here; refused with a hint otherwise, and for a folder that is not an adapter."""
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise BadInput(
            f"{adapter_dir} is not an adapter folder (no adapter_config.json)",
            hint="--base exports an adapter (the --out of `medtune train`); export a fused model without --base",
        )
    if base:
        return base
    from medtune.adapters import recorded_base

    recorded = recorded_base(adapter_dir)
    if recorded and Path(recorded).is_dir():
        return recorded
    raise BadInput(
        "exporting an adapter needs its base model",
        where=str(adapter_dir / "adapter_config.json"),
        hint="--base MODEL: the model it was trained on (builtin:NAME, a folder, ORG/NAME, or a .gguf)",
    )
