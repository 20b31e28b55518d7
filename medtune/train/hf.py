"""A Hugging Face model folder as the PyTorch backends and the PEFT merge see it, without loading it.

Tensor shapes from the safetensors headers (the first few kB of each file): the parameter count and the
layer structure of a model before a byte of its weights is read; and the keyword transformers wants for
a dtype. No torch import here.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from medtune.core.errors import BadInput

LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")  # a tensor inside decoder layer N


def weight_shapes(model_dir: Path) -> dict[str, tuple] | None:
    """{tensor name: shape} from the safetensors headers (the first few kB of each file): sizes and
    the layer structure of a model, before loading a byte of its weights. None if it has no safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted({model_dir / f for f in weight_map.values()})
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise BadInput(
                f"model.safetensors.index.json has no valid weight_map ({exc})",
                where=str(index),
                hint="re-download the model",
            ) from exc
    else:
        files = sorted(p for p in model_dir.glob("*.safetensors") if not p.name.startswith("adapter"))
    if not files:
        return None
    shapes = {}
    from medtune.models.modelcheck import read_header

    for path in files:
        _, header = read_header(path)
        shapes.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return shapes


def count_params(model_dir: Path, cfg: dict) -> int:
    shapes = weight_shapes(model_dir)
    if shapes:
        return sum(math.prod(s) for s in shapes.values())
    h, inter = int(cfg.get("hidden_size", 0)), int(cfg.get("intermediate_size", 0))
    layers, vocab = int(cfg.get("num_hidden_layers", 0)), int(cfg.get("vocab_size", 0))
    return vocab * h * (1 if cfg.get("tie_word_embeddings") else 2) + layers * (4 * h * h + 3 * h * inter)


def layer_linears(shapes: dict[str, tuple]) -> dict[int, dict[str, tuple]]:
    """{layer index: {module path inside the layer (self_attn.q_proj): weight shape}} for 2-D weights."""
    out: dict[int, dict[str, tuple]] = {}
    for name, shape in shapes.items():
        m = LAYER_RE.search(name)
        if m and len(shape) == 2 and m.group(2).endswith(".weight"):
            out.setdefault(int(m.group(1)), {})[m.group(2)[: -len(".weight")]] = shape
    return out


def dtype_kwargs(dtype) -> dict:
    """transformers >= 4.56 calls it dtype (torch_dtype is deprecated there)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}
