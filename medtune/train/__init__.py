"""Training backends. One registry entry per backend; `train()` picks one and runs it."""

from __future__ import annotations

from medtune.errors import BadInput
from medtune.train.options import TrainOptions, TrainResult

BACKENDS = {
    "mlx": "medtune.train.mlx_backend",
}


def train(model: str, data, out, options: TrainOptions | None = None, backend: str = "mlx", progress=None,
          *, resume: bool = False, dry_run: bool = False, on_step=None) -> TrainResult:
    """Train `model` on the prepared folder `data` into `out`.

    resume: continue from the last checkpoint in `out`; dry_run: stop after the preflight;
    on_step(step, metrics): called after every optimizer step (notebooks, tests).
    """
    import importlib

    if backend not in BACKENDS:
        raise BadInput(f"unknown backend {backend!r}", hint=f"backends: {', '.join(BACKENDS)}")
    module = importlib.import_module(BACKENDS[backend])
    return module.train(model, data, out, options or TrainOptions(), progress=progress, resume=resume,
                        dry_run=dry_run, on_step=on_step)


__all__ = ["train", "TrainOptions", "TrainResult", "BACKENDS"]
