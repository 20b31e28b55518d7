"""Atomic writes: every file goes to a temporary name in the same folder, then is renamed.

A stage that fails leaves the previous good output untouched. A process killed mid-write leaves only hidden
temporaries named after its pid (`.NAME.tmp-PID…`); the next write of the same output removes those of dead
processes, and a folder swap killed half-way (the old folder moved aside, the new one not yet in place) is
undone by putting the old folder back. A full disk (ENOSPC, EDQUOT, EFBIG) becomes ResourceError (exit 4).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from medtune.core.errors import ResourceError

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _tmp_name(path: Path) -> Path:
    """Hidden, per-process, and with the real suffix (writers such as mx.save_safetensors append one)."""
    return path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")


def pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep(path: str | os.PathLike) -> list[Path]:
    """Remove what killed writers of `path` left beside it; put back a folder a killed swap had moved aside.
    Returns what was removed or restored."""
    path = Path(path)
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    pat = re.compile(rf"^\.+({re.escape(path.stem)}|{re.escape(path.name)})\.(tmp|old|intermediate)-(\d+)")
    done = []
    for name in names:
        m = pat.match(name)
        if not m or pid_alive(int(m.group(3))):
            continue
        leftover = path.parent / name
        if (
            m.group(2) == "old"
            and not path.exists()
            and m.group(1) == path.name
            and leftover.is_dir()
            and not leftover.is_symlink()
        ):
            os.replace(leftover, path)  # killed between the two renames of a swap: the old folder is the good one
        elif leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        done.append(leftover)
    return done


def disk_full(exc: BaseException, path) -> ResourceError | None:
    """The ResourceError for an exception caused by a full disk (or a file-size limit), else None."""
    err = exc if isinstance(exc, OSError) else exc.__cause__ if isinstance(exc.__cause__, OSError) else None
    text = str(exc)
    # MLX's writer reports a short write without an errno ("[write] Unable to write N bytes to file")
    if (err is not None and err.errno in DISK_FULL) or any(
        m in text for m in ("No space left", "File too large", "Unable to write")
    ):
        where = Path(path)
        try:
            free = shutil.disk_usage(where.parent if where.parent.exists() else ".").free
            have = f"{free / 1e9:.2f} GB free now"
        except OSError:
            have = "free space unknown"
        reason = os.strerror(err.errno) if err is not None and err.errno else text.splitlines()[0][:120]
        return ResourceError(
            f"the disk filled up while writing {where} ({reason}); nothing was written under "
            f"its final name and the previous version, if any, is intact",
            hint=f"free some space on that disk ({have}) or write to another folder, then run the same command again",
        )
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; rename it into place if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path)
    tmp = _tmp_name(path)
    if tmp.is_symlink() or tmp.exists():  # never write through something planted at our temporary name
        tmp.unlink()
    try:
        try:
            yield tmp
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except Exception as exc:
            full = disk_full(exc, path)
            if full is not None:
                raise full from exc
            raise
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path, obj, indent: int = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Build a directory under a temporary name, then swap it in for `path`.

    The old directory (if any) is kept until the new one is complete, then removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        try:
            yield tmp
        except Exception as exc:
            full = disk_full(exc, path)
            if full is not None:
                raise full from exc
            raise
        _apply_umask(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _apply_umask(root: Path) -> None:
    """mkdtemp makes 0700 folders and some writers 0600 files: give them the usual permissions."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def sha256_file(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
