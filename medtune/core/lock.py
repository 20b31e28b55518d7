"""One writer per output: a lock file next to the output folder or file, held for the whole stage.

`.<name>.medtune.lock` sits beside the output (not inside it: fuse and export swap whole folders in). It is
locked with flock, which the kernel drops when its process dies, so a lock left by a killed run is stale by
construction and the next run takes it over; the file's JSON (pid, host, command, start time) is only there to
tell the user who holds a live one. A second process asking for a held lock gets ResourceError (exit 4).
Locks are re-entrant within a process: `medtune run` holds its run folder and each stage its own output.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
from pathlib import Path

from medtune.core.errors import ResourceError

_HELD: dict[str, list] = {}  # lock path -> [fd, depth, folders made for it]


def lock_path(target: str | os.PathLike) -> Path:
    target = Path(target).absolute()
    return target.parent / f".{target.name}.medtune.lock"


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


def _flock(fd: int) -> bool:
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            return False
        raise


def acquire(target: str | os.PathLike, command: str | None = None) -> Path:
    """Take the lock for `target`, or raise ResourceError naming the process that holds it."""
    path = lock_path(target)
    key = str(path)
    if key in _HELD:
        _HELD[key][1] += 1
        return path
    made = []  # folders created for the lock file, removed again (when still empty) on release
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        made.append(folder)
        folder = folder.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    from medtune.core.redact import redact_text

    command = redact_text(command or " ".join(["medtune", *sys.argv[1:]]))[:300]  # no token from the command line
    for _ in range(20):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _flock(fd):
            os.close(fd)
            owner = _read(path)
            pid = owner.get("pid", "?")
            since = owner.get("started", "?")
            raise ResourceError(
                f"{Path(target)} is in use by another medtune process (pid {pid} on {owner.get('host', '?')}, "
                f"`{owner.get('command', '?')}`, since {since})",
                hint="wait for it to finish, or write to another output folder; two runs writing one folder "
                "would corrupt it",
            )
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder released (and removed) it between our open and flock: try the new file
            os.close(fd)
            continue
        stale = _read(path)
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
        _HELD[key] = [fd, 1, made]
        if stale.get("pid") and stale.get("pid") != os.getpid():
            from medtune.core.console import console

            console.print(
                f"[dim]note: took over a stale lock on {Path(target)} from pid {stale['pid']} "
                f"(`{stale.get('command', '?')}`, no longer running)[/]"
            )
        return path
    raise ResourceError(f"could not lock {Path(target)}: it keeps changing hands", hint="try again")


def release(target: str | os.PathLike) -> None:
    path = lock_path(target)
    key = str(path)
    held = _HELD.get(key)
    if held is None:
        return
    held[1] -= 1
    if held[1] > 0:
        return
    del _HELD[key]
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # before closing: a waiter that opened this file re-checks the inode and retries
    os.close(held[0])
    for folder in held[2]:  # deepest first; a folder the command wrote into is not empty and stays
        try:
            folder.rmdir()
        except OSError:
            break


@contextlib.contextmanager
def locked(*targets: str | os.PathLike, command: str | None = None):
    """Hold the locks of every target (in order) for the block."""
    taken: list = []
    try:
        for t in targets:
            acquire(t, command)
            taken.append(t)
        yield
    finally:
        for t in reversed(taken):
            release(t)


def holds(param: str):
    """Decorator: the function holds the lock of its argument `param` (an output path) while it runs."""
    import functools
    import inspect

    def wrap(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            target = sig.bind(*args, **kwargs).arguments.get(param)
            if target is None:
                return fn(*args, **kwargs)
            with locked(target):
                return fn(*args, **kwargs)

        return inner

    return wrap
