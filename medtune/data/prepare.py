"""`medtune prepare`: dataset -> train/valid/test JSONL + manifest.json, checked through the template.

Every record is rendered through the model's own chat template and tokenized with its tokenizer
(batched, both cores). Checked on every record (or on a sample with token_stats=False): the prompt's
tokens are a true prefix of the full sequence, the end-of-turn token appears exactly once in the
answer, at its end, and the reasoning survived rendering. Nothing is written unless all of it holds.
"""

from __future__ import annotations

import hashlib
import random
import statistics
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from medtune.core import fsutil, jsonl
from medtune.data import encode, formats, render, sources
from medtune.core.errors import BadInput
from medtune.core.lock import holds as _holds_lock

REASONING_MODES = ("think", "drop", "inline")
OVERLONG_MODES = ("drop", "keep", "error")
STYLES = ("auto", *encode.STYLES)
OUTPUT_FILES = {"train.jsonl", "valid.jsonl", "test.jsonl", "manifest.json"}
CHECK_SAMPLE = 64  # records fully checked when token statistics are off
CHUNK = 2048  # records per tokenization batch (progress granularity)


@dataclass
class PrepareResult:
    out: Path | None
    counts: dict
    format: str
    style: str
    template: dict
    tokens: dict
    example: dict
    notes: list = field(default_factory=list)
    files: dict = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"out": str(self.out) if self.out else None, "counts": self.counts, "format": self.format,
                "style": self.style, "template": self.template, "tokens": self.tokens, "example": self.example,
                "notes": self.notes, "files": self.files}


def clean(text: str, controls: bool = True) -> str:
    """CRLF -> LF, Unicode NFC, control characters removed (when the source may hold any), stripped."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    if controls:
        text = sources.CONTROL.sub("", text)
    return text.strip()


def split_key(ex: formats.Example) -> str:
    """What must never land on two sides of the split: the opening question, normalised."""
    users = [m["content"] for m in ex.messages if m["role"] == "user"]
    return " ".join((users[0] if users else ex.text or "").casefold().split())


def _side(key: str, seed: int, valid_ratio: float, test_ratio: float) -> str:
    h = int.from_bytes(hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest(), "big") / 2**64
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
            "max": s[-1], "mean": round(sum(s) / len(s), 1), "total": sum(s)}


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out exists and is not a folder: {out}", hint="choose a new folder for the prepared data")
    if out.is_dir():
        foreign = [p.name for p in out.iterdir() if p.name not in OUTPUT_FILES]
        if foreign:
            raise BadInput(f"--out folder holds files prepare did not write: {', '.join(sorted(foreign)[:3])}",
                           where=str(out), hint="use an empty or new folder; prepare replaces the whole folder")


def _clean_example(ex: formats.Example, controls: bool = True) -> str | None:
    """Clean in place; return the reason to drop it, if any."""
    if ex.text is not None:
        ex.text = clean(ex.text, controls)
        return None if ex.text else "empty text"
    for m in ex.messages:
        m["content"] = clean(m["content"], controls)
    ex.reasoning = clean(ex.reasoning, controls)
    if not ex.messages or not ex.messages[-1]["content"]:
        return "empty response"
    if not ex.prompt:
        return "empty prompt"
    if any(not m["content"] for m in ex.messages if m["role"] != "system"):
        return "empty turn"
    ex.messages = [m for m in ex.messages if m["content"]]  # an empty system prompt is no system prompt
    return None


def _answer(ex: formats.Example, reasoning: str, info: render.TemplateInfo, opened: bool = False) -> str:
    """The last assistant message as the model should learn it (reasoning placed per --reasoning).

    opened: the prompt already ends with the think block's opening (a generation prompt such as DeepSeek-R1's
    `<｜Assistant｜><think>\n`): the answer continues inside that block, and closes it at once when there is
    no reasoning to put there."""
    if ex.reasoning and reasoning == "think":
        head = "" if opened else f"{info.think_open}\n"
        return f"{head}{ex.reasoning}\n{info.think_close}\n\n{ex.response}"
    answer = f"{ex.reasoning}\n\n{ex.response}" if ex.reasoning and reasoning == "inline" else ex.response
    return f"{info.think_close}\n\n{answer}" if opened else answer


def _choose_style(style: str, examples, info: render.TemplateInfo, reasoning: str, notes: list) -> str:
    has_reasoning = reasoning == "think" and any(ex.reasoning for ex in examples)
    if examples[0].text is not None:
        if style not in ("auto", "text"):
            raise BadInput(f"plain-text records cannot be written as --style {style}", hint="use --style text")
        return "text"
    if info.strips_think and has_reasoning:
        if style in ("completions", "chat"):
            raise BadInput(f"this model's chat template deletes <think> blocks from assistant turns: --style {style} "
                           "would train without the reasoning", hint="use --style text (the default here), or --reasoning inline/drop")
        notes.append("the chat template deletes <think> blocks from assistant turns, so records are written "
                     "pre-rendered (--style text) with the reasoning kept and the prompt masked")
        return "text"
    if not info.prompt_is_prefix:
        if style in ("completions", "chat"):
            raise BadInput(f"this model's chat template ends its generation prompt with text its assistant turns "
                           f"do not start with: --style {style} would train on another prompt than the one the "
                           "model gets", hint="use --style text (the default here)")
        notes.append("the chat template's generation prompt is not where its assistant turns start, so records "
                     "are written pre-rendered (--style text) from the generation prompt, prompt masked")
        return "text"
    if style != "auto":
        if style == "completions" and any(len(ex.messages) != 2 for ex in examples):
            raise BadInput("some records have a system prompt or several turns, which --style completions cannot hold",
                           hint="use --style chat (the default for such data)")
        return style
    return "completions" if all(len(ex.messages) == 2 for ex in examples) else "chat"


def _to_record(ex: formats.Example, style: str, reasoning: str, info, renderer) -> dict:
    if ex.text is not None:
        return {"text": ex.text}
    if style == "text":
        prompt = renderer(ex.messages[:-1], add_generation_prompt=True)
        opened = prompt.rstrip().endswith(info.think_open)
        answer = _answer(ex, reasoning, info, opened=opened)
        return {"text": prompt + answer + info.end_token, "prompt_chars": len(prompt)}
    answer = _answer(ex, reasoning, info)
    if style == "completions":
        return {"prompt": ex.messages[0]["content"], "completion": answer}
    return {"messages": ex.messages[:-1] + [{"role": "assistant", "content": answer}]}


def _check(info, full_text, prompt_text, full_ids, head_ids, reasoning_text, where):
    """Every promise about one rendered record; raises RecordError naming the record."""
    err = sources.RecordError
    if not full_text.startswith(prompt_text) or full_ids[: len(head_ids)] != head_ids:
        raise err("the prompt's tokens are not a prefix of the rendered record", where=where,
                  hint="the chat template renders the prompt differently on its own; prompt masking would be wrong")
    answer_ids = full_ids[len(head_ids):]
    hits = [i for i, t in enumerate(answer_ids) if t == info.end_token_id]
    if len(hits) != 1:
        raise err(f"end-of-turn token {info.end_token!r} appears {len(hits)} times in the answer, expected once",
                  where=where, hint="remove end tokens from the record's text; the chat template adds it")
    tail = full_text[len(prompt_text):]
    after = tail[tail.rfind(info.end_token) + len(info.end_token):]
    if after.strip():
        raise err(f"text after the end-of-turn token: {after[:40]!r}", where=where,
                  hint="the chat template renders something after the answer's end token")
    if reasoning_text and reasoning_text[:48] not in tail:
        raise err("the reasoning is missing from the rendered record", where=where,
                  hint="the chat template strips it; use --reasoning inline or --style text")


@_holds_lock("out")  # one writer per output folder (medtune.core.lock)
def prepare(dataset, model, out=None, *, fmt: str | None = None, mapping: dict | str | None = None,
            style: str = "auto", reasoning: str = "think", valid_ratio: float = 0.1, test_ratio: float = 0.0,
            seed: int = 42, max_seq_length: int = 2048, overlong: str = "drop", limit: int | None = None,
            sample: int | None = None, answers: str = "all", skip_invalid: bool = False, token_stats: bool = True,
            dry_run: bool = False, tokenizer=None, progress=None) -> PrepareResult:
    """Convert `dataset` for `model` (a spec or folder) and write it to `out` (unless dry_run).

    tokenizer: an already loaded tokenizer for `model` (notebooks, benchmarks); loaded if None.
    """
    from medtune.models import pull

    for name, value, allowed in (("--reasoning", reasoning, REASONING_MODES), ("--overlong", overlong, OVERLONG_MODES),
                                 ("--style", style, STYLES), ("--answers", answers, ("all", "first"))):
        if value not in allowed:
            raise BadInput(f"{name} must be one of {', '.join(allowed)}, not {value!r}", hint=f"e.g. {name} {allowed[0]}")
    if not (0 <= valid_ratio < 1 and 0 <= test_ratio < 1 and valid_ratio + test_ratio < 1):
        raise BadInput("--valid-ratio and --test-ratio must be in [0, 1) and sum below 1", hint="e.g. --valid-ratio 0.1")
    for name, value in (("--limit", limit), ("--sample", sample), ("--max-seq-length", max_seq_length)):
        if value is not None and value < 1:
            raise BadInput(f"{name} must be at least 1", hint=f"e.g. {name} 1000")
    mapping = formats.parse_map(mapping) if isinstance(mapping, str) or mapping is None else \
        {k.lower(): v for k, v in mapping.items()}
    out = Path(out) if out else None
    if out and not dry_run:
        _check_out(out)

    # The model (its tokenizer is loaded once the records are read: a bad dataset fails in a second).
    model_ref = pull(str(model)) if tokenizer is None or not Path(str(model)).is_dir() else None
    model_path = model_ref.path if model_ref else Path(str(model))
    notes: list[str] = []

    # Read, convert, clean, dedupe; the sources' sha256 is computed on the other core meanwhile.
    resolved = sources.resolve(dataset)
    from concurrent.futures import ThreadPoolExecutor

    hasher = ThreadPoolExecutor(max_workers=1)
    digests = hasher.submit(lambda: {str(f): fsutil.sha256_file(f) for f in resolved.files}) if out and not dry_run else None
    hasher.shutdown(wait=False)
    dropped: Counter = Counter()
    fmt_obj = formats.get(fmt) if fmt else None
    seen: set[int] = set()
    examples: list[formats.Example] = []
    n_read = 0
    options = {"answers": answers}
    task = progress.add_task("reading", total=None) if progress else None
    for rec in sources.read(resolved):
        n_read += 1
        if isinstance(rec, sources.RecordError):
            if not skip_invalid:
                raise rec
            dropped["invalid: " + rec.message.split(":")[0][:60]] += 1
            continue
        if progress and n_read % 1000 == 0:
            progress.update(task, completed=n_read)
        try:
            fmt_obj = fmt_obj or formats.detect(rec.data, rec.where, mapping)
            converted = fmt_obj.convert(formats.Fields(rec.data, rec.where, mapping, options))
        except BadInput as exc:
            if not skip_invalid:
                raise
            dropped["invalid: " + exc.message.split(":")[0][:60]] += 1
            continue
        if not converted:
            dropped["no answer"] += 1
        for ex in converted:
            reason = _clean_example(ex, rec.controls)
            if reason:
                dropped[reason] += 1
                continue
            key = hash((ex.text, ex.reasoning, tuple((m["role"], m["content"]) for m in ex.messages)))
            if key in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(key)
            examples.append(ex)
        if limit and len(examples) >= limit:
            examples = examples[:limit]
            break
    if progress:
        progress.update(task, completed=n_read, total=n_read)
    if not examples:
        raise BadInput(f"no usable records in {dataset} (read {n_read}, dropped {dict(dropped) or 'none'})",
                       hint="check the fields (--format, --map) and that they are not empty")
    # The model's tokenizer and what its chat template does.
    tok = tokenizer or render.load_tokenizer(model_path)
    info = render.inspect_template(tok, model_path)
    if sample and sample < len(examples):
        picked = sorted(random.Random(seed).sample(range(len(examples)), sample))
        dropped["not sampled"] += len(examples) - sample
        examples = [examples[i] for i in picked]

    # Records in the chosen style; no record may carry the end-of-turn token as text.
    style = _choose_style(style, examples, info, reasoning, notes)
    renderer = encode.Renderer(tok)
    rows, kept = [], []
    for ex in examples:
        texts = [m["content"] for m in ex.messages] + [ex.reasoning, ex.text or ""]
        if any(info.end_token in t for t in texts):
            exc = sources.RecordError(f"the record's text contains the end-of-turn token {info.end_token!r}",
                                      where=ex.where, hint="remove it: the chat template adds it where it belongs")
            if not skip_invalid:
                raise exc
            dropped["invalid: contains the end-of-turn token"] += 1
            continue
        rows.append(_to_record(ex, style, reasoning, info, renderer))
        kept.append(ex)
    examples = kept
    if not rows:
        raise BadInput("no records left after the checks", hint=f"dropped: {dict(dropped)}")

    # Render and tokenize: every record with token statistics, else a sample; check each one.
    n = len(rows)
    if token_stats:
        check_idx = list(range(n))
    else:
        rest = list(range(min(CHECK_SAMPLE // 2, n), n))
        check_idx = sorted(set(range(min(CHECK_SAMPLE // 2, n))) |
                           set(random.Random(seed).sample(rest, min(CHECK_SAMPLE // 2, len(rest)))))
    lengths: dict[int, int] = {}
    task = progress.add_task("tokenizing", total=len(check_idx)) if progress else None
    for start in range(0, len(check_idx), CHUNK):
        chunk = check_idx[start:start + CHUNK]
        pairs = [encode.texts(rows[i], renderer) for i in chunk]
        full_ids = encode.encode_texts(tok, [p[0] for p in pairs])
        head_ids = encode.encode_texts(tok, [p[1] for p in pairs])
        for i, (full_text, prompt_text), ids, head in zip(chunk, pairs, full_ids, head_ids):
            if examples[i].text is not None:  # plain text: no template to check; training appends eos
                lengths[i] = len(encode.with_eos(tok, rows[i], ids))
                continue
            kept_reasoning = examples[i].reasoning if reasoning != "drop" else ""
            try:
                _check(info, full_text, prompt_text, ids, head, kept_reasoning, examples[i].where)
            except sources.RecordError:
                if not skip_invalid:
                    raise
                dropped["invalid: failed the rendering checks"] += 1
                lengths[i] = -1
                continue
            lengths[i] = len(ids)
        if progress:
            progress.advance(task, len(chunk))

    # Overlong records: never one whose end token training would cut off.
    keep = []
    longest = None  # (tokens, where) of the longest record dropped for its length
    for i in range(n):
        length = lengths.get(i)
        if length == -1:
            continue
        if length is not None and length > max_seq_length:
            if longest is None or length > longest[0]:
                longest = (length, examples[i].where)
            if overlong == "error":
                raise BadInput(f"record is {length} tokens, over --max-seq-length {max_seq_length}",
                               where=examples[i].where, hint="raise --max-seq-length, or --overlong drop")
            if overlong == "drop":
                dropped["over max_seq_length"] += 1
                continue
            notes.append("--overlong keep: some records exceed --max-seq-length; training refuses them unless its "
                         "--max-seq-length is raised")
        keep.append(i)
    if not keep:
        if longest is not None:
            raise BadInput(f"no records left: {dropped['over max_seq_length']} dropped for being over --max-seq-length "
                           f"{max_seq_length}; this one is {longest[0]} tokens", where=longest[1],
                           hint=f"raise --max-seq-length, or split such records (dropped: {dict(dropped)})")
        raise BadInput(f"no records left in {dataset} after the length and rendering checks",
                       hint=f"dropped: {dict(dropped)}; raise --max-seq-length?")

    # Split on the opening question, so a question never lands on two sides.
    splits: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    for i in keep:
        splits[_side(split_key(examples[i]), seed, valid_ratio, test_ratio)].append(rows[i])
    if valid_ratio > 0 and not splits["valid"] and len(splits["train"]) > 1:
        splits["valid"].append(splits["train"].pop())  # tiny sets: keep at least one validation record
    if not splits["train"]:
        raise BadInput("no training records left after the split", hint="lower --valid-ratio/--test-ratio or add data")

    first = keep[0]
    full_text, prompt_text = encode.texts(rows[first], renderer)
    example = {"where": examples[first].where, "record": rows[first], "rendered": full_text,
               "prompt_chars": len(prompt_text), "tokens": lengths.get(first)}
    counts = {"read": n_read, "examples": len(examples), "kept": len(keep), "dropped": dict(dropped),
              **{k: len(v) for k, v in splits.items()}}
    tokens = _stats([lengths[i] for i in keep if i in lengths]) if token_stats else {}
    result = PrepareResult(out=None if dry_run else out, counts=counts, format=fmt_obj.name, style=style,
                           template=info.to_dict(), tokens=tokens, example=example, notes=list(dict.fromkeys(notes)))
    if dry_run or out is None:
        return result

    manifest = {
        "stage": "prepare",
        "inputs": {"dataset": str(dataset), "kind": resolved.kind,
                   "sha256": digests.result(),
                   "model": model_ref.to_dict() if model_ref else {"path": str(model_path)}},
        "options": {"format": fmt_obj.name, "map": mapping, "style": style, "reasoning": reasoning,
                    "valid_ratio": valid_ratio, "test_ratio": test_ratio, "seed": seed,
                    "max_seq_length": max_seq_length, "overlong": overlong, "limit": limit, "sample": sample,
                    "answers": answers, "skip_invalid": skip_invalid, "token_stats": token_stats},
        "template": info.to_dict(),
        "end_token_added_by": "record (style text)" if style == "text" and examples[0].text is None else "chat_template",
        "checked": {"records": len(check_idx), "all": token_stats},
        "counts": counts,
        "tokens": tokens,
        "first_example": example,
        "notes": result.notes,
        "versions": versions(),
    }
    with fsutil.atomic_dir(out) as tmp:
        for side, data in splits.items():
            if data or side != "test":
                jsonl.write_jsonl(tmp / f"{side}.jsonl", data)
        from medtune.core import redact
        redact.write_json(tmp / "manifest.json", manifest)
    result.files = {side: str(out / f"{side}.jsonl") for side in splits if (out / f"{side}.jsonl").exists()}
    result.manifest = manifest
    return result


PACKAGES = ("transformers", "tokenizers", "mlx", "mlx-lm", "gguf")  # what prepare's manifest records


def versions() -> dict:
    from medtune.core.versions import versions as installed

    return installed(PACKAGES)
