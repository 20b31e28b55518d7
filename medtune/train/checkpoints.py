"""Checkpoints of a training run: out/checkpoints/step-NNNNNNN/, each written whole (atomic folder).

A checkpoint holds what the backend saves (adapter, optimizer, RNG states) and state.json: the step and
where the run stands (epoch, data position, micro-batches drawn, running totals). Only the newest
--keep-checkpoints are kept. The folder layout is the same for every backend.
"""

from __future__ import annotations

import json
from pathlib import Path

STATE = "state.json"


def checkpoint_dirs(out: Path) -> list[Path]:
    """The finished checkpoints in `out`, oldest first."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / STATE).is_file())


def checkpoint_dir(out: Path, step: int) -> Path:
    return Path(out) / "checkpoints" / f"step-{step:07d}"


def write_checkpoint(out: Path, step: int, state: dict, save, keep: int) -> Path:
    """checkpoints/step-N: save(folder) writes the backend's files, then state.json; older ones beyond `keep`
    are removed."""
    import shutil

    from medtune.core import fsutil

    target = checkpoint_dir(out, step)
    with fsutil.atomic_dir(target) as tmp:
        save(tmp)
        fsutil.write_json(tmp / STATE, {**state, "step": step})
    for old in checkpoint_dirs(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def read_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / STATE).read_text())
