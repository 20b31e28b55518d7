"""Read raw records from where datasets live, keeping each record's place (file:line) for errors.

Local: .json (an array, or an object holding one list), .jsonl, .csv/.tsv, .parquet, a folder of them,
and a cMedQA2 pair (question.csv + answer.csv, joined on question_id). Remote: `hf:ORG/NAME[:config][@split]`
(Hugging Face Hub, through huggingface_hub: HF_HOME, HF_ENDPOINT and HF_TOKEN are honoured) and
`modelscope:ORG/NAME`, both downloaded to their usual caches and then read as local files.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from medtune.core.errors import BadInput

SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet")


CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass
class Record:
    data: dict
    where: str  # "file:line" (JSONL/CSV), "file[index]" (JSON array, parquet)
    controls: bool = True  # False when the source proves no field holds a control character


CONTROL_BYTES = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def json_may_hold_controls(raw: bytes) -> bool:
    """JSON strings cannot hold raw control characters, only escapes (\\u0000-\\u001f, \\b, \\f) or a raw
    DEL; one scan of the file's bytes for those tells whether any value can contain one (false alarms
    are fine). Bytes, not str: substring search on a wide str is an order of magnitude slower."""
    return b"\\u00" in raw or b"\\b" in raw or b"\\f" in raw or b"\x7f" in raw


class RecordError(BadInput):
    """A problem with one record (not the whole file). Readers *yield* it in place of the record, so that
    reading can go on: the consumer raises it, or counts it under `--skip-invalid`."""


# ---- text decoding --------------------------------------------------------------------------------
def decode(raw: bytes, path: Path) -> str:
    if b"\x00" in raw[:8192]:
        raise BadInput(
            "file looks binary (NUL bytes), not text",
            where=str(path),
            hint="pass a UTF-8 .json, .jsonl or .csv file (or .parquet)",
        )
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise BadInput(
            f"not valid UTF-8 (byte {exc.start})",
            where=f"{path}:{line}",
            hint="re-save the file as UTF-8 (e.g. iconv -f GBK -t UTF-8 in > out)",
        ) from exc
    if b"\r" in raw:  # searched in the bytes: on a wide str the same search is ~10x slower
        text = text.replace("\r\n", "\n")
    return text


def _read_text(path: Path) -> tuple[str, bytes]:
    raw = path.read_bytes()
    text = decode(raw, path)
    if not text or text.isspace():  # no copy of a file that may be gigabytes
        raise BadInput("dataset file is empty", where=str(path), hint="check the download")
    return text, raw


# ---- one file -------------------------------------------------------------------------------------
def read_file(path: Path) -> Iterator[Record | RecordError]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet(path)
        return
    text, raw = _read_text(path)
    if suffix in (".csv", ".tsv"):
        yield from csv_records(text, path, "\t" if suffix == ".tsv" else ",", CONTROL_BYTES.search(raw) is not None)
    elif suffix == ".jsonl" or (suffix != ".json" and _first_char(text) not in ("[", "{")):
        yield from _jsonl(text, path, json_may_hold_controls(raw))
    else:
        yield from _json(text, path, json_may_hold_controls(raw))


def _first_char(text: str) -> str:
    m = _LEADING_SPACE.match(text)
    return text[m.end() : m.end() + 1]


_LEADING_SPACE = re.compile(r"\s*")


def _json(text: str, path: Path, controls: bool = True) -> Iterator[Record]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        if path.suffix.lower() != ".json":  # an unsuffixed file that is really JSON Lines
            yield from _jsonl(text, path, controls)
            return
        raise BadInput(
            f"invalid JSON: {exc.msg}",
            where=f"{path}:{exc.lineno}:{exc.colno}",
            hint="fix the file, or save it as JSON Lines (.jsonl), one object per line",
        ) from exc
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise BadInput(
                "a JSON object must hold exactly one list of records",
                where=str(path),
                hint="use a JSON array of objects, or JSON Lines",
            )
        obj = lists[0]
    if not isinstance(obj, list):
        raise BadInput("JSON top level is not a list of records", where=str(path), hint="use a JSON array of objects")
    hint = "every record must be a JSON object with the dataset's fields"
    for i, item in enumerate(obj):
        yield _object(item, f"{path}[{i}]", controls, "record is a", hint)


def _object(item, where: str, controls: bool, what: str, hint: str) -> Record | RecordError:
    """A JSON value as a record: a RecordError in its place when it is not an object."""
    if isinstance(item, dict):
        return Record(item, where, controls)
    return RecordError(f"{what} {type(item).__name__}, not an object", where=where, hint=hint)


def _jsonl(text: str, path: Path, controls: bool = True) -> Iterator[Record]:
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            yield RecordError(
                f"invalid JSON on this line: {exc.msg} (column {exc.colno})",
                where=f"{path}:{n}",
                hint="fix or delete that line (or --skip-invalid); each line must be one JSON object",
            )
            continue
        yield _object(item, f"{path}:{n}", controls, "line holds a", "each line must be one JSON object")


def csv_records(
    text: str, path: Path, delimiter: str = ",", controls: bool = True, unnamed: bool = False
) -> Iterator[Record]:
    """The rows of a CSV text as records with the line each starts on; a row of the wrong width is yielded as a
    RecordError. unnamed: an empty header cell names its column columnN (an index column pandas wrote, as
    CMMLU's files have) instead of being refused."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except csv.Error as exc:
        raise BadInput(f"bad CSV header: {exc}", where=f"{path}:1", hint="check the quoting of the first line") from exc
    header = [h.strip() or (f"column{i + 1}" if unnamed else "") for i, h in enumerate(header)]
    if len(set(header)) != len(header) or not all(header):
        raise BadInput(
            f"CSV header has empty or repeated column names: {header}",
            where=f"{path}:1",
            hint="every column needs a unique name",
        )
    start = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise BadInput(
                f"malformed CSV: {exc}",
                where=f"{path}:{start}",
                hint='look for an unbalanced double quote on or after this line; quotes inside a field are doubled ("")',
            ) from exc
        where, start = f"{path}:{start}", reader.line_num + 1
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            yield RecordError(
                f"row has {len(row)} columns, the header has {len(header)}",
                where=where,
                hint="quote fields that contain the delimiter",
            )
            continue
        yield Record(dict(zip(header, row)), where, controls)


def _parquet(path: Path) -> Iterator[Record]:
    from medtune.core.errors import require

    pq = require("pyarrow.parquet", purpose="reading .parquet datasets")
    try:
        pf = pq.ParquetFile(str(path))
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends
        raise BadInput(
            f"not a readable parquet file ({str(exc).splitlines()[0]})", where=str(path), hint="check the download"
        ) from exc
    i = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            yield Record(row, f"{path}[{i}]")
            i += 1


# ---- cMedQA2: two CSVs joined on question_id -------------------------------------------------------
def cmedqa2_pair(path: Path) -> tuple[Path, Path] | None:
    """(question.csv, answer.csv) if `path` is such a folder or one of the two files."""
    folder = path if path.is_dir() else path.parent
    qs = sorted(folder.glob("question*.csv"))
    ans = sorted(folder.glob("answer*.csv"))
    if len(qs) == 1 and len(ans) == 1 and (path.is_dir() or path in (qs[0], ans[0])):
        return qs[0], ans[0]
    return None


def read_cmedqa2(questions: Path, answers: Path) -> Iterator[Record]:
    def rows(path, need):
        for rec in csv_records(_read_text(path)[0], path, ","):
            if isinstance(rec, RecordError):
                raise rec
            lower = {k.lower(): v for k, v in rec.data.items()}
            missing = [c for c in need if c not in lower]
            if missing:
                raise BadInput(
                    f"column {missing[0]!r} missing",
                    where=f"{path}:1",
                    hint=f"cMedQA2 {path.name} has columns: {', '.join(need)}",
                )
            yield rec.where, lower

    by_q: dict[str, list[str]] = {}
    for _where, row in rows(answers, ("ans_id", "question_id", "content")):
        by_q.setdefault(row["question_id"].strip(), []).append(row["content"])
    for where, row in rows(questions, ("question_id", "content")):
        qid = row["question_id"].strip()
        yield Record({"question_id": qid, "question": row["content"], "answers": by_q.get(qid, [])}, where)


# ---- everything local ------------------------------------------------------------------------------
def data_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise BadInput(
                f"no dataset files ({', '.join(SUFFIXES)}) in folder {path}", hint="pass a file or a folder of them"
            )
        return files
    return [path]


def read_local(path: Path) -> Iterator[Record]:
    if not path.exists():
        raise BadInput(f"dataset not found: {path}", hint="check the path (or use hf:ORG/NAME, modelscope:ORG/NAME)")
    pair = cmedqa2_pair(path)
    if pair:
        yield from read_cmedqa2(*pair)
        return
    for f in data_files(path):
        if f.suffix.lower() not in SUFFIXES:
            raise BadInput(
                f"unsupported file type {f.suffix or '(none)'}", where=str(f), hint=f"use one of {', '.join(SUFFIXES)}"
            )
        yield from read_file(f)


# ---- remote ----------------------------------------------------------------------------------------
HF_SPEC = re.compile(r"^hf:(?P<repo>[\w.-]+/[\w.-]+)(?::(?P<config>[\w.-]+))?(?:@(?P<split>[\w.-]+))?$")


@dataclass
class Resolved:
    spec: str
    kind: str  # local | hf | modelscope
    files: list[Path]
    root: Path


def _card_configs(readme: Path) -> list[dict]:
    """The `configs:` list of a dataset card's YAML front matter (data_files per config and split)."""
    if not readme.is_file():
        return []
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return []
    end = text.find("\n---", 3)
    if end < 0:
        return []
    import yaml

    try:
        meta = yaml.safe_load(text[3:end]) or {}
    except yaml.YAMLError:
        return []
    configs = meta.get("configs") if isinstance(meta, dict) else None
    return configs if isinstance(configs, list) else []


def select_hf_files(root: Path, config: str | None, split: str | None, spec: str) -> list[Path]:
    """Data files of a downloaded dataset repo for a config and split, following its card's `configs`."""
    configs = _card_configs(root / "README.md")
    patterns: list[str] = []
    if configs:
        names = [c.get("config_name", "default") for c in configs]
        if config is None:
            chosen = next((c for c in configs if c.get("default")), None) or (configs[0] if len(configs) == 1 else None)
            if chosen is None:
                raise BadInput(
                    f"dataset has several configs: {', '.join(names)}",
                    where=spec,
                    hint=f"choose one: hf:ORG/NAME:{names[0]}",
                )
        else:
            chosen = next((c for c in configs if c.get("config_name", "default") == config), None)
            if chosen is None:
                raise BadInput(f"no config {config!r} in this dataset", where=spec, hint=f"configs: {', '.join(names)}")
        files = chosen.get("data_files", [])
        if isinstance(files, str):
            files = [{"split": "train", "path": files}]
        splits = {}
        for entry in files:
            if isinstance(entry, dict):
                p = entry.get("path")
                splits.setdefault(entry.get("split", "train"), []).extend([p] if isinstance(p, str) else p or [])
            elif isinstance(entry, str):
                splits.setdefault("train", []).append(entry)
        if split is None:
            split = "train" if "train" in splits else next(iter(splits), None)
        if split not in splits:
            raise BadInput(
                f"no split {split!r} in config {chosen.get('config_name', 'default')!r}",
                where=spec,
                hint=f"splits: {', '.join(splits)}",
            )
        patterns = splits[split]
    candidates = [p for p in data_files(root)]
    rel = {p: p.relative_to(root).as_posix() for p in candidates}
    if patterns:
        found = [p for p in candidates if any(fnmatch.fnmatch(rel[p], pat) for pat in patterns)]
    else:
        found = candidates
        if config:
            found = [p for p in found if config in rel[p].split("/")[0] or config in p.stem] or found
        if split:
            found = [p for p in found if split in p.stem or f"/{split}" in rel[p]] or []
    if not found:
        raise BadInput(
            "no data files match this dataset config/split",
            where=spec,
            hint="list the repo's files, then pass hf:ORG/NAME[:config][@split]",
        )
    return found


def _hf_download(repo: str) -> Path:
    from medtune.models.hub import hf_snapshot

    return hf_snapshot(repo, ["README.md", *(f"*{s}" for s in SUFFIXES), *(f"**/*{s}" for s in SUFFIXES)], "dataset")


def _modelscope_download(repo: str) -> Path:
    from medtune.models.hub import modelscope_snapshot

    return modelscope_snapshot(repo, repo_type="dataset")


def resolve(spec: str | Path) -> Resolved:
    s = str(spec)
    if s.startswith("hf:"):
        m = HF_SPEC.match(s)
        if not m:
            raise BadInput(
                f"bad Hub dataset spec {s!r}", hint="hf:ORG/NAME, hf:ORG/NAME:config, hf:ORG/NAME:config@split"
            )
        from medtune.core.safety import check_hub_id

        root = _hf_download(check_hub_id(m["repo"], "dataset"))
        return Resolved(s, "hf", select_hf_files(root, m["config"], m["split"], s), root)
    if s.startswith("modelscope:"):
        from medtune.core.safety import check_hub_id

        root = _modelscope_download(check_hub_id(s.split(":", 1)[1], "dataset"))
        return Resolved(s, "modelscope", data_files(root), root)
    path = Path(s).expanduser()
    if not path.exists():
        raise BadInput(f"dataset not found: {path}", hint="check the path (or use hf:ORG/NAME, modelscope:ORG/NAME)")
    pair = cmedqa2_pair(path)
    return Resolved(s, "local", list(pair) if pair else data_files(path), path)


def read(resolved: Resolved) -> Iterator[Record | RecordError]:
    if resolved.kind == "local":
        yield from read_local(resolved.root)
        return
    pair = cmedqa2_pair(resolved.root) if len(resolved.files) == 2 else None
    if pair and set(pair) == set(resolved.files):
        yield from read_cmedqa2(*pair)
        return
    for f in resolved.files:
        yield from read_file(f)
