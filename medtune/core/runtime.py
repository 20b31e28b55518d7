"""Platform set-up done once, before mlx is imported.

On Linux the `mlx[cpu]` wheel links a reference BLAS that multiplies float32 matrices at a few
GFLOP/s. Loading the system OpenBLAS into the global symbol namespace first makes MLX resolve
`cblas_sgemm` to it, 20-25x faster. On macOS MLX uses Accelerate/Metal and nothing is needed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from dataclasses import dataclass, field

OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
)


@dataclass
class BlasState:
    wanted: bool = False
    path: str | None = None
    active: bool = False
    reason: str = ""
    tried: list[str] = field(default_factory=list)


_blas = BlasState()
_done = False


def _find_openblas() -> list[str]:
    env = os.environ.get("MEDTUNE_OPENBLAS")
    found = [env] if env else []
    found += [p for p in OPENBLAS_CANDIDATES if os.path.exists(p)]
    lib = ctypes.util.find_library("openblas")
    if lib:
        found.append(lib)
    return found


def setup() -> BlasState:
    """Bind OpenBLAS (Linux) before mlx is imported. Safe to call many times."""
    global _done
    if _done:
        return _blas
    _done = True
    if not sys.platform.startswith("linux") or os.environ.get("MEDTUNE_NO_OPENBLAS") == "1":
        _blas.reason = (
            "not needed on this platform"
            if not sys.platform.startswith("linux")
            else "disabled by MEDTUNE_NO_OPENBLAS=1"
        )
        return _blas
    _blas.wanted = True
    if "mlx.core" in sys.modules:
        _blas.reason = "mlx was imported before medtune could bind OpenBLAS"
        return _blas
    for path in _find_openblas():
        _blas.tried.append(path)
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            _blas.reason = f"could not load {path}: {exc}"
            continue
        _blas.path, _blas.active, _blas.reason = path, True, "bound before mlx import"
        return _blas
    if not _blas.tried:
        _blas.reason = "OpenBLAS not found (apt-get install libopenblas0-pthread)"
    return _blas


def blas_state() -> BlasState:
    return _blas


def mx():
    """Import mlx.core after the platform set-up."""
    setup()
    from medtune.core.errors import require

    return require("mlx.core", purpose="training and generation on Apple Silicon or CPU")


def on_cpu() -> bool:
    core = mx()
    return core.default_device() == core.cpu


def compute_dtype() -> str:
    """float32 on CPU (bf16/fp16 matmuls are slow there), the model's own dtype on a GPU."""
    return "float32" if on_cpu() else "auto"
