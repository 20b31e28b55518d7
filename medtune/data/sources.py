"""Read records from local files, with the file:line of every record kept for error messages."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from medtune.errors import BadInput


@dataclass
class Record:
    data: dict
    where: str  # "file:line" (JSONL) or "file[index]" (JSON array)


def _decode(raw: bytes, path: Path) -> str:
    if b"\x00" in raw[:4096]:
        raise BadInput("file looks binary (NUL bytes), not JSON text", where=str(path),
                       hint="pass a .json or .jsonl file in UTF-8")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise BadInput(f"not valid UTF-8 (byte {exc.start})", where=f"{path}:{line}",
                       hint="re-save the file as UTF-8 (e.g. iconv -f GBK -t UTF-8)") from exc
    return text.replace("\r\n", "\n")


def read_records(path: str | Path) -> Iterator[Record]:
    path = Path(path)
    if not path.exists():
        raise BadInput(f"dataset not found: {path}", hint="check the path")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".json", ".jsonl"))
        if not files:
            raise BadInput(f"no .json or .jsonl files in folder {path}", hint="pass a file or a folder of them")
        for f in files:
            yield from read_records(f)
        return
    text = _decode(path.read_bytes(), path)
    if not text.strip():
        raise BadInput("dataset file is empty", where=str(path), hint="check the download")
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix != ".json" and not text.lstrip().startswith(("[", "{"))):
        yield from _jsonl(text, path)
        return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        if suffix != ".json":
            yield from _jsonl(text, path)
            return
        raise BadInput(f"invalid JSON: {exc.msg}", where=f"{path}:{exc.lineno}:{exc.colno}",
                       hint="fix the file, or save it as JSON Lines (.jsonl), one object per line") from exc
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise BadInput("JSON object must hold exactly one list of records", where=str(path),
                           hint="use a JSON array of objects, or JSON Lines")
        obj = lists[0]
    if not isinstance(obj, list):
        raise BadInput("JSON top level is not a list of records", where=str(path), hint="use a JSON array of objects")
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise BadInput(f"record is a {type(item).__name__}, not an object", where=f"{path}[{i}]",
                           hint="every record must be a JSON object with the dataset's fields")
        yield Record(item, f"{path}[{i}]")


def _jsonl(text: str, path: Path) -> Iterator[Record]:
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadInput(f"invalid JSON on this line: {exc.msg} (column {exc.colno})", where=f"{path}:{n}",
                           hint="fix or delete that line; every line must be one JSON object") from exc
        if not isinstance(item, dict):
            raise BadInput(f"line holds a {type(item).__name__}, not an object", where=f"{path}:{n}",
                           hint="every line must be one JSON object")
        yield Record(item, f"{path}:{n}")
