"""Export stage: HF safetensors folder -> GGUF file(s) + Ollama Modelfile + manifest.

    result = export("models/run1", "models/run1", "medtune-run1", quants=("f16",))
    print(result.ollama_commands)

Everything that can be refused (architecture, tensors, tokenizer, chat template, Modelfile values,
disk space) is checked before the first file is written. Each file is written under a temporary
name and renamed into place.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from medtune.errors import BadInput

__all__ = ["ExportResult", "export", "inspect_gguf", "ollama_commands"]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(?::[A-Za-z0-9._-]+)?")


@dataclass
class ExportResult:
    name: str
    gguf_paths: dict[str, Path]  # quant -> file
    modelfile_path: Path
    modelfile_text: str
    family: str
    stops: list[str]
    system: str | None
    manifest_path: Path
    ollama_commands: list[str]
    summaries: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def ollama_commands(name: str, modelfile_path: str | Path) -> list[str]:
    import shlex

    return [f"ollama create {shlex.quote(name)} -f {shlex.quote(str(modelfile_path))}", f"ollama run {shlex.quote(name)}"]


def export(model_dir: str | Path, out_dir: str | Path, name: str, quants=("f16",), system: str | None = None,
           progress=None, *, modelfile_path: str | Path | None = None, params: dict | None = None,
           family: str | None = None) -> ExportResult:
    """Write `<out_dir>/<name>-<quant>.gguf` for each quant, a Modelfile (FROM the first quant, by absolute
    path) and `<out_dir>/export_manifest.json`.

    system: None keeps the chat template's default system prompt (if any); a string replaces it.
    """
    from medtune import __version__, fsutil
    from medtune.export.gguf_writer import OUTTYPES, check_disk, estimate_bytes, plan_gguf, write_gguf
    from medtune.export.modelfile import render_modelfile

    model_dir = Path(model_dir)
    out_dir = Path(out_dir).absolute()
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise BadInput(f"model name {name!r} is not a valid Ollama name",
                       hint="letters, digits, '.', '_', '-' and an optional ':tag', e.g. medtune-smol:v1")
    quants = [quants] if isinstance(quants, str) else list(dict.fromkeys(q.lower() for q in quants))
    if not quants:
        raise BadInput("no GGUF type asked for", hint=f"choose from: {', '.join(OUTTYPES)}")
    for q in quants:
        if q not in OUTTYPES:
            raise BadInput(f"unknown GGUF type {q!r}", hint=f"choose from: {', '.join(OUTTYPES)}")
    if not model_dir.is_dir():
        raise BadInput(f"model folder {model_dir} does not exist", hint="run `medtune fuse` first")

    # Everything is decided before anything is written.
    plans = {q: plan_gguf(model_dir, q) for q in quants}
    stem = name.replace(":", "-")
    ggufs = {q: out_dir / f"{stem}-{q}.gguf" for q in quants}
    mf_path = Path(modelfile_path).absolute() if modelfile_path else out_dir / "Modelfile"
    text, info = render_modelfile(ggufs[quants[0]], model_dir, system=system, params=params, family=family,
                                  vocab=plans[quants[0]].vocab)

    check_disk(ggufs[quants[0]], sum(estimate_bytes(p) for p in plans.values()))

    summaries = []
    for q in quants:
        summaries.append(write_gguf(model_dir, ggufs[q], q, progress, name=name, plan=plans[q]))
    fsutil.write_text(mf_path, text)

    inputs = {"model_dir": str(model_dir.absolute()), "files": {}}
    for fname in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
                  "chat_template.jinja", "model.safetensors.index.json"):
        if (model_dir / fname).is_file():
            inputs["files"][fname] = fsutil.sha256_file(model_dir / fname)
    for f in plans[quants[0]].ckpt.files:
        inputs["files"][f.name] = fsutil.sha256_file(f)
    outputs = {str(p): {"sha256": fsutil.sha256_file(p), "bytes": p.stat().st_size}
               for p in [*ggufs.values(), mf_path]}
    manifest = {
        "stage": "export",
        "inputs": inputs,
        "options": {"name": name, "quants": quants, "system": system, "params": params, "family": family,
                    "modelfile_path": str(mf_path)},
        "result": {"family": info["family"], "stops": info["stops"], "system": info["system"],
                   "default_system": info["default_system"], "parameters": info["params"],
                   "warnings": info["warnings"], "gguf": summaries},
        "outputs": outputs,
        "versions": _versions(__version__),
    }
    manifest_path = fsutil.write_json(out_dir / "export_manifest.json", manifest)
    return ExportResult(
        name=name, gguf_paths=ggufs, modelfile_path=mf_path, modelfile_text=text, family=info["family"],
        stops=info["stops"], system=info["system"], manifest_path=manifest_path,
        ollama_commands=ollama_commands(name, mf_path), summaries=summaries, warnings=info["warnings"],
    )


def _versions(medtune_version: str) -> dict:
    from importlib import metadata

    out = {"medtune": medtune_version, "python": sys.version.split()[0]}
    for pkg in ("gguf", "transformers", "safetensors", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def inspect_gguf(path: str | Path, *, head: int = 5) -> dict:
    """Metadata (long arrays summarised) and a tensor table of a GGUF file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise BadInput(f"no such GGUF file: {path}", hint="check the path")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/struct errors for bad files
        raise BadInput(f"not a readable GGUF file ({exc})", where=str(path),
                       hint="a GGUF starts with the magic bytes 'GGUF'; check the download") from exc
    metadata = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        value = f.contents()
        if isinstance(value, list) and len(value) > head:
            value = {"len": len(value), "head": value[:head]}
        metadata[key] = value
    tensors = [{"name": t.name, "shape": [int(d) for d in t.shape], "type": t.tensor_type.name,
                "bytes": int(t.n_bytes)} for t in reader.tensors]
    types: dict[str, int] = {}
    for t in tensors:
        types[t["type"]] = types.get(t["type"], 0) + 1
    return {
        "path": str(path),
        "bytes": path.stat().st_size,
        "architecture": metadata.get("general.architecture"),
        "name": metadata.get("general.name"),
        "file_type": metadata.get("general.file_type"),
        "metadata": metadata,
        "n_tensors": len(tensors),
        "n_params": sum(math.prod(t["shape"]) for t in tensors),
        "tensor_types": types,
        "tensors": tensors,
    }
