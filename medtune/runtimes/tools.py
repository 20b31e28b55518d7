"""Where llama.cpp's own tools are: llama-server, llama-perplexity, llama-quantize.

One lookup for every command that needs them, in this order:
1. `--llama-cpp DIR` (a llama.cpp checkout, build or release folder),
2. $LLAMA_CPP_DIR,
3. PATH (`brew install llama.cpp` on a Mac puts them there),
4. medtune's own build, made by `scripts/build_llama_cpp.sh` (run by `make test`) under
   $MEDTUNE_CACHE/llama.cpp/current: the llama.cpp tree of the llama-cpp-python release we pin, built
   once with portable flags, whose libllama is also the one llama-cpp-python loads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from medtune.core.errors import MissingDependency

ENV = "LLAMA_CPP_DIR"
TOOLS = ("llama-server", "llama-perplexity", "llama-quantize")
SUBDIRS = ("build/bin", "build/bin/Release", "bin", ".")
INSTALL_HINT = (
    "make test builds them once (bash scripts/build_llama_cpp.sh, cached under ~/.cache/medtune/llama.cpp); "
    "on a Mac: brew install llama.cpp; or pass --llama-cpp DIR (or set LLAMA_CPP_DIR) to a llama.cpp build"
)


def own_build() -> Path:
    """The folder scripts/build_llama_cpp.sh links to its current build."""
    from medtune.core.paths import cache_dir

    return cache_dir() / "llama.cpp" / "current"


def source_tree() -> Path | None:
    """The llama.cpp source tree of medtune's own build (it has convert_hf_to_gguf.py), if there is one."""
    src = own_build() / "src"
    return src if (src / "convert_hf_to_gguf.py").is_file() else None


def in_folder(folder: Path, name: str) -> Path | None:
    for sub in SUBDIRS:
        for suffix in ("", ".exe"):
            p = folder / sub / f"{name}{suffix}"
            if p.is_file() and os.access(p, os.X_OK):
                return p
    return None


def find(name: str, llama_cpp_dir: str | Path | None = None) -> Path | None:
    """The executable `name` (one of TOOLS), or None."""
    for folder in (llama_cpp_dir, os.environ.get(ENV) or None):
        if folder:
            found = in_folder(Path(folder).expanduser(), name)
            if found:
                return found
    on_path = shutil.which(name)
    if on_path:
        return Path(on_path)
    return in_folder(own_build(), name)


def require(name: str, llama_cpp_dir: str | Path | None = None, purpose: str = "") -> Path:
    found = find(name, llama_cpp_dir)
    if found is None:
        what = f" ({purpose})" if purpose else ""
        raise MissingDependency(f"llama.cpp's {name} was not found{what}", hint=INSTALL_HINT)
    return found


def version(path: Path) -> str | None:
    """The build line `NAME --version` prints ("version: 1 (0c1e57098)"), or None if it does not run."""
    try:
        res = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (res.stdout + res.stderr).splitlines():
        if line.startswith("version:"):
            return line.split(":", 1)[1].strip()
    return None


@dataclass
class ToolInfo:
    name: str
    path: str | None
    version: str | None


def describe(llama_cpp_dir: str | Path | None = None) -> dict:
    """What `medtune doctor` shows: each tool's path and llama.cpp build, and our own build's record."""
    tools, by_folder = [], {}
    for name in TOOLS:
        path = find(name, llama_cpp_dir)
        ver = version(path) if path else None
        if path and ver:
            by_folder[path.parent] = ver
        tools.append(ToolInfo(name, str(path) if path else None, ver))
    for t in tools:  # llama-quantize prints no version: it shares its folder's build
        if t.path and not t.version:
            t.version = by_folder.get(Path(t.path).parent)
    tools = [t.__dict__ for t in tools]
    record = own_build() / "build-info.json"
    try:
        build = json.loads(record.read_text()) if record.is_file() else None
    except (OSError, ValueError):
        build = None
    return {"tools": tools, "own_build": str(own_build()) if build else None, "own_build_info": build}


def build_lock() -> Path:
    return own_build().parent / ".build.lock"


def building() -> bool:
    """Is scripts/build_llama_cpp.sh building right now (it holds its lock)?"""
    import fcntl

    path = build_lock()
    if not path.exists():
        return False
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
    return False


def wait_for_build(note=None, poll: float = 5.0, timeout: float = 3600.0) -> bool:
    """If a build is running (`make all` starts one in the background on a fresh machine), wait for it to end.
    `note(text)` is told once when waiting starts. Returns whether there was a build to wait for."""
    import time

    if not building():
        return False
    if note:
        note(f"waiting for the llama.cpp build to finish (log: {own_build().parent / 'build.log'})")
    deadline = time.monotonic() + timeout
    while building() and time.monotonic() < deadline:
        time.sleep(poll)
    import importlib

    importlib.invalidate_caches()  # llama-cpp-python may have just been installed
    return True
