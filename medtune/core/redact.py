"""Hub tokens never reach medtune's files: logs, manifests, stage records and reports are redacted.

medtune itself never reads a token to use it: huggingface_hub finds HF_TOKEN / HUGGING_FACE_HUB_TOKEN or the
token `huggingface-cli login` saved (HF_HOME/token, HF_TOKEN_PATH, HF_HOME/stored_tokens), ModelScope its
MODELSCOPE_API_TOKEN. This module reads the same places only to know which strings to blank out, and also
blanks anything shaped like a Hugging Face access token (hf_ followed by 30+ letters and digits).

    redact.write_json(out / "manifest.json", manifest)   # fsutil.write_json, redacted
    redact.append_line(root / "run.log", line)           # appends, redacted, never through a symlink
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PLACEHOLDER = "<redacted>"
HF_TOKEN_SHAPE = re.compile(r"hf_[A-Za-z0-9]{30,}")
TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_TOKEN", "MODELSCOPE_API_TOKEN")
MIN_LEN = 8  # shorter "secrets" (a typo'd variable) would blank ordinary words

_cache: dict = {}


def hf_home() -> Path:
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface"


def token_files() -> list[Path]:
    """Where huggingface_hub keeps login tokens."""
    files = [Path(os.environ["HF_TOKEN_PATH"]).expanduser()] if os.environ.get("HF_TOKEN_PATH") else []
    return files + [hf_home() / "token", hf_home() / "stored_tokens"]


def _read_tokens(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    found = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("[", "#", ";")):
            continue
        value = line.split("=", 1)[1].strip() if "=" in line and path.name == "stored_tokens" else line
        found.append(value)
    return found


def secrets() -> list[str]:
    """Token values from the environment and the login files, longest first (cached until they change)."""
    files = token_files()
    stamp = [tuple(os.environ.get(k, "") for k in TOKEN_ENV)]
    for f in files:
        try:
            st = f.stat()
            stamp.append((str(f), st.st_size, st.st_mtime_ns))
        except OSError:
            stamp.append((str(f), None))
    key = repr(stamp)
    if _cache.get("key") != key:
        values = [os.environ.get(k, "").strip() for k in TOKEN_ENV]
        for f in files:
            values += _read_tokens(f)
        _cache.update(key=key, values=sorted({v for v in values if len(v) >= MIN_LEN}, key=len, reverse=True))
    return list(_cache["values"])


def redact_text(text: str, values: list[str] | None = None) -> str:
    for value in secrets() if values is None else values:
        if value in text:
            text = text.replace(value, PLACEHOLDER)
    return HF_TOKEN_SHAPE.sub(PLACEHOLDER, text)


def redact(obj, values: list[str] | None = None):
    """`obj` with every token blanked: strings, dict keys and values, lists and tuples (as lists), paths."""
    values = secrets() if values is None else values
    if isinstance(obj, str):
        return redact_text(obj, values)
    if isinstance(obj, dict):
        return {redact(k, values) if isinstance(k, str) else k: redact(v, values) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v, values) for v in obj]
    if isinstance(obj, os.PathLike):
        text = os.fspath(obj)
        clean = redact_text(text, values) if isinstance(text, str) else text
        return obj if clean == text else clean
    return obj


def write_json(path, obj, indent: int = 2) -> Path:
    from medtune.core import fsutil

    return fsutil.write_json(path, redact(obj), indent=indent)


def write_text(path, text: str) -> Path:
    from medtune.core import fsutil

    return fsutil.write_text(path, redact_text(text))


def append_line(path, line: str) -> None:
    from medtune.core.safety import append_text

    append_text(path, redact_text(line.rstrip("\n")) + "\n")


def scrubbed_env(env: dict | None = None) -> dict:
    """A copy of the environment for a subprocess that has no business with Hub tokens (it works offline)."""
    env = dict(os.environ if env is None else env)
    for key in TOKEN_ENV:
        env.pop(key, None)
    return env
