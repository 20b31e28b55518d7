"""--target-modules, for every backend: short names (q_proj) or paths inside a layer (self_attn.q_proj) →
the linear modules of a decoder layer they name; a name that matches none is refused with what there is."""

from __future__ import annotations

from medtune.core.errors import BadInput


def match_targets(linear_paths: list[str], names: list[str]) -> list[str]:
    """The paths in `linear_paths` (a layer's linear modules) that `names` select, sorted, each once."""
    found = set()
    for name in names:
        hits = [p for p in linear_paths if p == name or p.endswith("." + name)]
        if not hits:
            raise BadInput(
                f"--target-modules: no linear layer named {name!r} in this model",
                hint=f"available: {', '.join(sorted({p.rsplit('.', 1)[-1] for p in linear_paths}))}",
            )
        found.update(hits)
    return sorted(found)
