"""Training backends. One registry entry per backend; `train()` picks one and runs it.

  mlx      mlx_lm's layers on Apple Silicon (Metal) or a Linux CPU (mlx[cpu])
  torch    transformers + PEFT on CUDA or CPU (QLoRA through bitsandbytes on CUDA; torchrun for several GPUs)
  unsloth  Unsloth's FastLanguageModel on CUDA (the same loop and outputs as torch)
  auto     mlx on Apple Silicon; on CUDA unsloth when installed, else torch; mlx where it is installed; else torch
"""

from __future__ import annotations

import os

from medtune.errors import BadInput, MissingDependency
from medtune.train.options import TrainOptions, TrainResult

BACKENDS = {
    "mlx": "medtune.train.mlx_backend",
    "torch": "medtune.train.torch_backend",
    "unsloth": "medtune.train.unsloth_backend",
}
CHOICES = ("auto", *BACKENDS)


def unsupported(backend: str, opts: TrainOptions) -> list[tuple[str, str]]:
    """(message, hint) for every option `backend` cannot honour: refused, never silently ignored.
    What depends on the machine (QLoRA without CUDA, bf16 on a T4) is checked by the backend itself."""
    found = []
    if backend == "mlx":
        if opts.load_in_4bit:
            found.append(("--load-in-4bit is a bitsandbytes (CUDA) option; the mlx backend trains QLoRA on a base "
                          "quantized by MLX", "mlx_lm.convert --hf-path MODEL --mlx-path q4 -q, then --model q4; "
                          "or --backend torch on a CUDA GPU"))
        if opts.precision != "auto":
            found.append((f"--precision {opts.precision} is not an mlx backend option (float32 on CPU, the model's "
                          "own dtype on Apple GPUs)", "drop --precision, or use --backend torch"))
    if backend == "unsloth":
        if opts.fine_tune_type == "full":
            found.append(("--fine-tune-type full is not supported with --backend unsloth (LoRA/DoRA only here)",
                          "use --backend torch for a full fine-tune"))
        if opts.precision == "fp32":
            found.append(("--precision fp32 is not supported with --backend unsloth (16-bit kernels)",
                          "use --precision auto, or --backend torch"))
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            found.append(("--backend unsloth runs on one GPU; this process was launched as one of several",
                          "use --backend torch under torchrun / accelerate launch"))
    return found


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
    raise MissingDependency("no training backend is installed (neither mlx nor torch)",
                            hint='pip install "medtune[cuda]" for PyTorch, or mlx[cpu] on Linux')


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


def train(model: str, data, out, options: TrainOptions | None = None, backend: str = "mlx", progress=None,
          *, resume: bool = False, dry_run: bool = False, on_step=None) -> TrainResult:
    """Train `model` on the prepared folder `data` into `out`.

    backend: mlx | torch | unsloth | auto (see the module docstring);
    resume: continue from the last checkpoint in `out`; dry_run: stop after the preflight;
    on_step(step, metrics): called after every optimizer step (notebooks, tests).
    """
    import importlib

    opts = (options or TrainOptions()).check()
    backend = resolve_backend(backend, opts)
    refused = unsupported(backend, opts)
    if refused:
        msg, hint = refused[0]
        raise BadInput(msg, hint=hint)
    module = importlib.import_module(BACKENDS[backend])
    return module.train(model, data, out, opts, progress=progress, resume=resume, dry_run=dry_run, on_step=on_step)


def __getattr__(name):
    if name == "Interrupted":  # the same exception (exit 130) for every backend
        from medtune.train.mlx_backend import Interrupted

        return Interrupted
    raise AttributeError(name)


__all__ = ["train", "TrainOptions", "TrainResult", "BACKENDS", "CHOICES", "resolve_backend", "unsupported"]
