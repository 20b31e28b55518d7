"""`medtune train`: pick a backend (medtune.train.backends.REGISTRY), decide between resuming and starting
over, and run the one training loop (medtune.train.loop) with it.

  mlx      mlx_lm's layers on Apple Silicon (Metal) or a Linux CPU (mlx[cpu])
  torch    transformers + PEFT on CUDA or CPU (QLoRA through bitsandbytes on CUDA; torchrun for several GPUs)
  unsloth  Unsloth's FastLanguageModel on CUDA (the same loop and outputs as torch)
  auto     mlx on Apple Silicon; on CUDA unsloth when installed, else torch; mlx where it is installed; else torch
"""

from __future__ import annotations

import os

from medtune.core.errors import BadInput, MedtuneError, MissingDependency
from medtune.train.backends import REGISTRY as BACKENDS
from medtune.train.backends import backend_class
from medtune.train.options import TrainOptions, TrainResult

CHOICES = ("auto", *BACKENDS)


def unsupported(backend: str, opts: TrainOptions) -> list[tuple[str, str]]:
    """(message, hint) for every option `backend` cannot honour: refused, never silently ignored.
    What depends on the machine (QLoRA without CUDA, bf16 on a T4) is checked by the backend itself."""
    return backend_class(backend).refuses(opts)


def resolve_backend(name: str = "auto", opts: TrainOptions | None = None) -> str:
    """The backend `name` stands for on this machine ('auto' decides; the others are checked and returned)."""
    import importlib.util
    import platform
    import sys

    if name not in CHOICES:
        raise BadInput(f"unknown backend {name!r}", hint=f"backends: {', '.join(CHOICES)}")
    if name != "auto":
        return name
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return "mlx"
    if _cuda_available():
        if importlib.util.find_spec("unsloth") is not None and not (opts and unsupported("unsloth", opts)):
            return "unsloth"
        return "torch"
    if importlib.util.find_spec("mlx") is not None:
        return "mlx"
    if importlib.util.find_spec("torch") is not None:
        return "torch"
    raise MissingDependency(
        "no training backend is installed (neither mlx nor torch)",
        hint='pip install "medtune[cuda]" for PyTorch, or mlx[cpu] on Linux',
    )


def _cuda_available() -> bool:
    """A CUDA device torch can use. torch is only imported where a GPU driver is present: on a CPU machine
    `auto` stays as fast as before."""
    import importlib.util
    import shutil

    if not (os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi")):
        return False
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def train(
    model: str,
    data,
    out,
    options: TrainOptions | None = None,
    backend: str = "mlx",
    progress=None,
    *,
    resume: bool | None = None,
    dry_run: bool = False,
    on_step=None,
    fresh: bool = False,
) -> TrainResult:
    """Train `model` on the prepared folder `data` into `out`.

    backend: mlx | torch | unsloth | auto (see the module docstring);
    resume: True continues from the last checkpoint in `out`; False (or fresh=True) discards checkpoints and
    starts over; None (the default) resumes only when `out` holds an unfinished run of the very same model,
    data, options and backend (a run that was killed: the same command again picks it up, losing at most
    --save-every steps), starts over when there is none, and refuses an unfinished run of other settings;
    dry_run: stop after the preflight, with the run's own verdict: what would not fit raises the same
    ResourceError, its figures as the error's `.preflight`; on_step(step, metrics): called after every optimizer step.
    """
    import shutil
    from pathlib import Path

    from medtune.core import lock, redact

    opts = (options or TrainOptions()).check()
    backend = resolve_backend(backend, opts)
    refused = unsupported(backend, opts)
    if refused:
        msg, hint = refused[0]
        raise BadInput(msg, hint=hint)
    if fresh and resume:
        raise BadInput("--fresh and --resume contradict each other", hint="--resume continues, --fresh starts over")
    from medtune.train import loop

    def go(resume: bool, dry_run: bool = False) -> TrainResult:
        return loop.run(
            backend_class(backend)(opts),
            model,
            data,
            out,
            opts,
            progress=progress,
            resume=resume,
            dry_run=dry_run,
            on_step=on_step,
        )

    if dry_run:
        return go(bool(resume), dry_run=True)
    out = Path(out)
    rank, launched = _launch_rank()
    if launched:  # several processes (mlx.launch, torchrun, MPI): rank 0 alone decides and writes
        if resume is None:
            resume = False  # the ranks cannot agree on resuming before they are connected: say --resume
        if rank != 0:
            return go(bool(resume))
    created = not out.exists()
    with lock.locked(out):
        marker = out / RUN_MARKER
        ident = run_identity(model, data, opts, backend)
        prev = _read_marker(marker)
        resume = _decide_resume(out, prev, ident, resume, fresh, progress)
        # down before any checkpoint: a run killed from here on is known as unfinished, with its settings
        redact.write_json(marker, {"identity": ident, "finished": False})
        try:
            res = go(bool(resume))
        except MedtuneError as exc:
            # refused before training began (preflight, bad data): leave nothing behind, and the marker as it was
            if exc.exit_code != 130 and not (out / "checkpoints").exists():
                if created:
                    shutil.rmtree(out, ignore_errors=True)
                elif prev is None:
                    marker.unlink(missing_ok=True)
                else:
                    redact.write_json(marker, prev)
            raise
        redact.write_json(marker, {"identity": ident, "finished": True})
        return res


def _decide_resume(out, prev: dict | None, ident: dict, resume: bool | None, fresh: bool, progress) -> bool:
    """Resume or start over in `out`: as told, else resume an unfinished run of the very same settings, refuse one
    of other settings (naming what changed), and start over when there is none (its checkpoints removed)."""
    import shutil

    ckpts = (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step-*/state.json"))
    unfinished = prev is not None and not prev.get("finished") and ckpts
    if fresh or resume is False or (resume is None and not unfinished):
        shutil.rmtree(out / "checkpoints", ignore_errors=True)  # never mix another run's checkpoints in
        return False
    if resume is None:
        if prev.get("identity") != ident:
            changed = _changed(prev.get("identity") or {}, ident)
            raise BadInput(
                f"{out} holds an unfinished training run with other settings (changed: {', '.join(changed)})",
                hint="--fresh discards it and starts over; --resume continues it with these "
                "settings; or choose another --out",
            )
        if progress is not None:
            progress.console.print(
                f"[yellow]{out} holds an unfinished run of these settings: resuming from "
                "its last checkpoint[/] (--fresh starts over)"
            )
    return True


def _changed(old: dict, new: dict) -> list[str]:
    """What differs between two run identities, by name: the options and data files one level down."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}" if key == "data" else k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        elif a != b:
            out.append(key)
    return out


def _launch_rank() -> tuple[int, bool]:
    """(this process's rank, whether a launcher started several processes)."""
    for key in ("RANK", "MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key]), True
    return 0, False


RUN_MARKER = ".medtune-train.json"


def _read_marker(path) -> dict | None:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_identity(model: str, data, opts: TrainOptions, backend: str) -> dict:
    """What makes two training runs the same run: resuming one with the other's checkpoint is exact."""
    from pathlib import Path

    from medtune.core import fsutil

    data = Path(data)
    hashes = {n: fsutil.sha256_file(data / n) for n in ("train.jsonl", "valid.jsonl") if (data / n).is_file()}
    options = {k: v for k, v in opts.to_dict().items() if k not in ("keep_checkpoints",)}
    return {"model": str(model), "data": hashes, "options": options, "backend": backend}


def __getattr__(name):
    if name == "Interrupted":  # the same exception (exit 130) for every backend
        from medtune.train.loop import Interrupted

        return Interrupted
    raise AttributeError(name)


__all__ = ["train", "TrainOptions", "TrainResult", "BACKENDS", "CHOICES", "resolve_backend", "unsupported"]
