"""`medtune prepare`: dataset -> train.jsonl / valid.jsonl / manifest.json, checked through the template."""

from __future__ import annotations

import hashlib
import re
import statistics
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from medtune import fsutil
from medtune.data import formats, render
from medtune.data.sources import read_records
from medtune.errors import BadInput

REASONING_MODES = ("think", "drop", "inline")
OVERLONG_MODES = ("drop", "keep", "error")
OUTPUT_FILES = {"train.jsonl", "valid.jsonl", "test.jsonl", "manifest.json"}
CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclass
class PrepareResult:
    out: Path | None
    counts: dict
    format: str
    template: dict
    tokens: dict
    example: dict
    files: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"out": str(self.out) if self.out else None, "counts": self.counts, "format": self.format,
                "template": self.template, "tokens": self.tokens, "example": self.example, "files": self.files}


def clean(text: str) -> str:
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    return CONTROL.sub("", text).strip()


def completion_text(ex: formats.Example, reasoning: str, info: render.TemplateInfo) -> str:
    if not ex.reasoning or reasoning == "drop":
        return ex.response
    if reasoning == "inline":
        return f"{ex.reasoning}\n\n{ex.response}"
    return f"{info.think_open}\n{ex.reasoning}\n{info.think_close}\n\n{ex.response}"


def _side(key: str, seed: int, valid_ratio: float, test_ratio: float) -> str:
    h = int.from_bytes(hashlib.sha256(f"{seed}\x00{key}".encode()).digest()[:8], "big") / 2**64
    if h < test_ratio:
        return "test"
    if h < test_ratio + valid_ratio:
        return "valid"
    return "train"


def _stats(lengths: list[int]) -> dict:
    if not lengths:
        return {}
    s = sorted(lengths)
    return {"min": s[0], "median": int(statistics.median(s)), "p95": s[min(len(s) - 1, int(0.95 * len(s)))],
            "max": s[-1], "total": sum(s)}


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out exists and is not a folder: {out}", hint="choose a new folder for the prepared data")
    if out.is_dir():
        foreign = [p.name for p in out.iterdir() if p.name not in OUTPUT_FILES]
        if foreign:
            raise BadInput(f"--out folder holds files prepare did not write: {', '.join(sorted(foreign)[:3])}",
                           where=str(out), hint="use an empty or new folder; prepare replaces the whole folder")


def prepare(dataset, model, out=None, *, fmt: str | None = None, valid_ratio: float = 0.1,
            test_ratio: float = 0.0, seed: int = 42, reasoning: str = "think", max_seq_length: int = 2048,
            overlong: str = "drop", limit: int | None = None, dry_run: bool = False, progress=None) -> PrepareResult:
    """Convert `dataset` for `model` (a spec or folder) and write it to `out` (unless dry_run)."""
    from medtune.models import pull

    if reasoning not in REASONING_MODES:
        raise BadInput(f"--reasoning must be one of {', '.join(REASONING_MODES)}, not {reasoning!r}", hint="think keeps the CoT in <think> markers")
    if overlong not in OVERLONG_MODES:
        raise BadInput(f"--overlong must be one of {', '.join(OVERLONG_MODES)}, not {overlong!r}", hint="drop is the default")
    if not (0 <= valid_ratio < 1 and 0 <= test_ratio < 1 and valid_ratio + test_ratio < 1):
        raise BadInput("--valid-ratio and --test-ratio must be in [0, 1) and sum below 1", hint="e.g. --valid-ratio 0.1")
    out = Path(out) if out else None
    if out and not dry_run:
        _check_out(out)

    model_ref = pull(str(model))
    tok = render.load_tokenizer(model_ref.path)
    info = render.inspect_template(tok, model_ref.path)
    if info.strips_think and reasoning == "think":
        raise BadInput("this model's chat template deletes <think> blocks from assistant turns",
                       where=str(model_ref.path), hint="use --reasoning inline (keeps the reasoning as plain text) or drop")

    dropped: Counter = Counter()
    fmt_obj = formats.get(fmt) if fmt else None
    seen: set[str] = set()
    examples: list[formats.Example] = []
    n_read = 0
    for rec in read_records(dataset):
        n_read += 1
        fmt_obj = fmt_obj or formats.detect(rec.data, rec.where)
        ex = fmt_obj.convert(rec.data, rec.where)
        ex.prompt, ex.response, ex.reasoning = clean(ex.prompt), clean(ex.response), clean(ex.reasoning)
        if not ex.prompt:
            dropped["empty prompt"] += 1
            continue
        if not ex.response:
            dropped["empty response"] += 1
            continue
        key = "\x00".join((ex.prompt, ex.reasoning, ex.response))
        if key in seen:
            dropped["duplicate"] += 1
            continue
        seen.add(key)
        examples.append(ex)
        if limit and len(examples) >= limit:
            break
    if not examples:
        raise BadInput(f"no usable records in {dataset} (read {n_read}, dropped {dict(dropped)})",
                       hint="check the fields and that they are not empty")

    rows: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    lengths: list[int] = []
    first = None
    task = progress.add_task("rendering", total=len(examples)) if progress else None
    for ex in examples:
        completion = completion_text(ex, reasoning, info)
        full, head = render.render_ids(tok, ex.prompt, completion)
        render.check_rendered(tok, info, full, head, ex.reasoning if reasoning != "drop" else "", ex.where)
        if progress:
            progress.advance(task)
        if len(full) > max_seq_length:
            if overlong == "error":
                raise BadInput(f"record is {len(full)} tokens, over --max-seq-length {max_seq_length}", where=ex.where,
                               hint="raise --max-seq-length, or --overlong drop")
            if overlong == "drop":
                dropped["over max_seq_length"] += 1
                continue
        side = _side(ex.prompt, seed, valid_ratio, test_ratio)
        row = {"prompt": ex.prompt, "completion": completion}
        rows[side].append(row)
        lengths.append(len(full))
        if first is None:
            first = {"where": ex.where, "tokens": len(full), "prompt_tokens": len(head),
                     "rendered": tok.decode(full)}
    if valid_ratio > 0 and not rows["valid"] and len(rows["train"]) > 1:
        rows["valid"].append(rows["train"].pop())  # tiny sets: keep at least one validation record
    if not rows["train"]:
        raise BadInput("no training records left after filtering", hint=f"dropped: {dict(dropped)}")

    counts = {"read": n_read, "kept": sum(len(v) for v in rows.values()),
              "dropped": dict(dropped), **{k: len(v) for k, v in rows.items()}}
    result = PrepareResult(out=None if dry_run else out, counts=counts, format=fmt_obj.name,
                           template=info.to_dict(), tokens=_stats(lengths), example=first or {})
    if dry_run or out is None:
        return result

    src = Path(dataset)
    files = sorted(src.rglob("*.json*")) if src.is_dir() else [src]
    manifest = {
        "stage": "prepare",
        "inputs": {"dataset": str(src), "sha256": {str(f): fsutil.sha256_file(f) for f in files},
                   "model": model_ref.to_dict()},
        "options": {"format": fmt_obj.name, "valid_ratio": valid_ratio, "test_ratio": test_ratio, "seed": seed,
                    "reasoning": reasoning, "max_seq_length": max_seq_length, "overlong": overlong,
                    "limit": limit, "style": "completions"},
        "template": info.to_dict(),
        "end_token_added_by": "chat_template",
        "counts": counts,
        "tokens": result.tokens,
        "first_example": first,
        "versions": versions(),
    }
    with fsutil.atomic_dir(out) as tmp:
        for side, data in rows.items():
            if data or side != "test":
                fsutil.write_jsonl(tmp / f"{side}.jsonl", data)
        fsutil.write_json(tmp / "manifest.json", manifest)
    result.files = {side: str(out / f"{side}.jsonl") for side in rows if (out / f"{side}.jsonl").exists()}
    result.manifest = manifest
    return result


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("medtune", "transformers", "tokenizers", "mlx", "mlx-lm", "gguf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
