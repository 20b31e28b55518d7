"""The training backends, one registry line each: name → "module:class" (a medtune.train.backends.base.Backend).

  mlx      mlx_lm's layers on Apple Silicon (Metal) or a Linux CPU (mlx[cpu])
  torch    transformers + PEFT on CUDA or CPU (QLoRA through bitsandbytes on CUDA; torchrun for several GPUs)
  unsloth  Unsloth's FastLanguageModel on CUDA (the torch backend's loop and outputs)

Adding a backend is one module here and one line in REGISTRY. A class is imported only when asked for;
its module imports no framework at the top.
"""

from __future__ import annotations

import importlib

REGISTRY = {
    "mlx": "medtune.train.backends.mlx:MLXBackend",
    "torch": "medtune.train.backends.torch:TorchBackend",
    "unsloth": "medtune.train.backends.unsloth:UnslothBackend",
}


def backend_class(name: str):
    """The Backend class registered as `name` (KeyError for an unknown name: check against REGISTRY first)."""
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def adapter_kind(name: str) -> str:
    """The adapter kind (medtune.fuse) that backend `name` writes."""
    return backend_class(name).adapter_kind
