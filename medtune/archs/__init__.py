"""One class per model architecture, registered by Hugging Face name and model_type (medtune.archs.base).

    arch = for_config(cfg)            # export: the class for config.json, checked
    cls = for_gguf("llama", where)    # import: the class for a GGUF's general.architecture
    hf_arch_for_model_type("qwen3")   # config normalisation: "Qwen3ForCausalLM"

Adding an architecture: a module here with one `@register` subclass of `Arch` (every module of this package is
imported, in name order), and one entry in the tests' architecture table (tests/families.py ARCHS).
"""

from __future__ import annotations

import importlib
import pkgutil

from medtune.archs.base import MODEL_TYPES, REGISTRY, Arch, register, supported
from medtune.core.errors import BadInput

for _module in pkgutil.iter_modules(__path__):  # every module here registers its classes (llama, qwen, ...)
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "Arch",
    "REGISTRY",
    "MODEL_TYPES",
    "register",
    "supported",
    "for_config",
    "for_gguf",
    "hf_arch_for_model_type",
    "importable",
]


def for_config(cfg: dict, where: str = "config.json") -> Arch:
    """The class for this config, instantiated and checked; BadInput naming the supported architectures."""
    names = cfg.get("architectures") or []
    name = names[0] if names else None
    cls = REGISTRY.get(name)
    if cls is None:
        raise BadInput(
            f"architecture {name!r} cannot be exported to GGUF yet (supported: {', '.join(supported())})",
            where=where,
            hint="export with llama.cpp's converter: --converter llama.cpp --llama-cpp DIR (a llama.cpp checkout)",
        )
    arch = cls(cfg)
    arch.check()
    return arch


def hf_arch_for_model_type(model_type: str | None) -> str | None:
    """config.json's architectures[0] for a model_type (a config written without `architectures`)."""
    return MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None


def importable() -> dict[str, type[Arch]]:
    """GGUF general.architecture -> the class a GGUF of it imports as."""
    return {cls.gguf_arch(): cls for cls in dict.fromkeys(REGISTRY.values()) if cls.importable}


def for_gguf(gguf_arch: str | None, where: str) -> type[Arch]:
    """The class a GGUF of this general.architecture imports as; BadInput naming the importable ones."""
    known = importable()
    cls = known.get(gguf_arch)
    if cls is None:
        raise BadInput(
            f"GGUF architecture {gguf_arch!r} cannot be imported",
            where=where,
            hint=f"medtune imports {', '.join(sorted(known))} GGUFs: pass this model's Hugging "
            "Face folder (or ORG/NAME) instead of the .gguf, or pick a model of those architectures",
        )
    return cls
