"""Preflights for fuse and export: refuse up front, with the numbers, when memory or disk cannot hold the job.

Training has its own, finer estimate (medtune.train.preflight). MEDTUNE_MEMORY_LIMIT_GB caps the
memory these checks believe is available (as it does for training).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from medtune.core.errors import ResourceError

DISK_MARGIN = 64 << 20


def available_memory() -> tuple[int, str]:
    override = os.environ.get("MEDTUNE_MEMORY_LIMIT_GB")
    if override:
        return int(float(override) * 1e9), "MEDTUNE_MEMORY_LIMIT_GB"
    if "mlx.core" in sys.modules:  # on Apple Silicon the GPU's working set is the limit
        from medtune.core import runtime

        if not runtime.on_cpu():
            mx = runtime.mx()
            try:
                info = mx.metal.device_info() if hasattr(mx, "metal") else mx.device_info()
                return int(info["max_recommended_working_set_size"]), "Metal recommended working set"
            except Exception:  # noqa: BLE001 - fall back to system memory
                pass
    from medtune.core.doctor import _memory

    avail = _memory().get("available_gb")
    if avail:
        return int(avail * 1e9), "available system memory"
    return 1 << 62, "unknown"


def check_memory(need: int, what: str, hint: str) -> None:
    have, source = available_memory()
    if need > have:
        raise ResourceError(
            f"{what} needs ~{need / 1e9:.2f} GB of memory, {have / 1e9:.2f} GB is available ({source})", hint=hint
        )


def free_disk(path: str | os.PathLike) -> tuple[int, Path]:
    """Free bytes on the filesystem that will hold `path` (its nearest existing folder)."""
    folder = Path(path).absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free, folder


def check_disk(out_path: str | os.PathLike, need: int, what: str | None = None) -> None:
    """ResourceError unless the filesystem of `out_path` has `need` bytes free (plus a margin)."""
    out_path = Path(out_path)
    free, folder = free_disk(out_path)
    if free < need + DISK_MARGIN:
        raise ResourceError(
            f"not enough disk for {what or out_path.name}: needs ~{need / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB free on {folder}",
            where=str(out_path.parent),
            hint="free some space or choose another output folder on a bigger disk",
        )
