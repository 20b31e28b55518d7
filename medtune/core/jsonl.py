"""JSON Lines, read and written in one place.

`read_jsonl` is the one strict reader: UTF-8 (a BOM on line 1 is allowed), one JSON object per line, blank
lines skipped; anything else is a BadInput that names the file and line. `write_jsonl` writes atomically
(a temporary name in the same folder, renamed into place: medtune.core.fsutil).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from medtune.core.errors import BadInput

HINTS = {  # what to do about each kind of bad line, for the prepared files most of our readers take
    "utf8": "re-run `medtune prepare`, which writes UTF-8 JSON Lines",
    "json": "re-run `medtune prepare`; training data must be JSON Lines",
    "object": "re-run `medtune prepare`; each line must be one record object",
}


def read_jsonl(path, hint: str | None = None, *, skip_bad: bool = False) -> list[dict]:
    """Every record of a JSON Lines file, in order. hint: one hint for every kind of bad line (default: the
    prepared-data hints in HINTS); skip_bad: leave bad lines out instead (a log whose last line a crash
    cut short)."""
    return [row for _, row in iter_jsonl(path, hint, skip_bad=skip_bad)]


def iter_jsonl(path, hint: str | None = None, *, skip_bad: bool = False) -> Iterator[tuple[int, dict]]:
    """(line number, record) for every record of a JSON Lines file: read_jsonl's rules, for a caller that
    checks each record's fields and names the line."""
    path = Path(path)
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                row = _parse(raw, n, path, hint)
            except BadInput:
                if not skip_bad:
                    raise
                continue
            if row is not None:
                yield n, row


def _parse(raw: bytes, n: int, path: Path, hint: str | None) -> dict | None:
    where = f"{path}:{n}"
    try:
        line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
    except UnicodeDecodeError as exc:
        raise BadInput(
            f"not valid UTF-8 (byte {exc.start} of the line)", where=where, hint=hint or HINTS["utf8"]
        ) from exc
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadInput(f"invalid JSON: {exc.msg}", where=where, hint=hint or HINTS["json"]) from exc
    if not isinstance(row, dict):
        raise BadInput(
            f"line holds a JSON {type(row).__name__}, not an object", where=where, hint=hint or HINTS["object"]
        )
    return row


_ENCODER = json.JSONEncoder(ensure_ascii=False)


def write_jsonl(path, rows, chunk: int = 512) -> Path:
    """One JSON object per line (UTF-8, non-ASCII kept), written to a temporary name and renamed into place."""
    from medtune.core.fsutil import atomic_path

    rows = list(rows)
    encode = _ENCODER.encode
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            for i in range(0, len(rows), chunk):
                fh.write("".join(encode(row) + "\n" for row in rows[i : i + chunk]))
    return Path(path)
