"""`medtune prepare`: dataset -> train/valid/test JSONL + manifest.json, checked through the template.

Every record is rendered through the model's own chat template and tokenized with its tokenizer
(batched, both cores). Checked on every record (or on a sample with token_stats=False): the prompt's
tokens are a true prefix of the full sequence, the end-of-turn token appears exactly once in the
answer, at its end, and the reasoning survived rendering. Nothing is written unless all of it holds.

prepare() runs the steps in order, each a function below: read_examples (read, convert, clean, dedupe),
to_records (the records in the chosen style), tokenize_and_check, within_length (--overlong), split,
then the result, the manifest and write_outputs. The options and their checks are PrepareOptions's
(medtune.data.options).

Preference data (a format of kind "preference": each record a chosen/rejected pair) takes the same steps with its
own entry in KINDS: a pair is dropped, and counted, when a side is empty, when both sides are the same, or when its
two sides' prompts differ; each record is {"prompt", "chosen", "rejected"}: the prompt rendered through the chat
template up to its generation prompt, each completion what the template renders after it, ending in the end-of-turn
token (style "preference"; "preference-text" where SFT would use --style text: the answer and the end token, as
written). Both sides are checked as SFT records are; --max-seq-length applies to the prompt with the longer side.
The manifest says "kind": "preference" (SFT data: "sft").
"""

from __future__ import annotations

import hashlib
import random
import statistics
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from medtune.core import fsutil, jsonl
from medtune.core.errors import BadInput
from medtune.core.lock import holds as _holds_lock
from medtune.core.options import from_kwargs
from medtune.data import encode, formats, mixture, render, sources, wording
from medtune.data.options import PrepareOptions
from medtune.export.chat_templates import TEMPLATE_VARS

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
    kind: str = "sft"  # the data's kind: "sft" (examples) or "preference" (chosen/rejected pairs)
    sources: list = field(default_factory=list)  # several sources: each one's format, weight, counts, share

    def to_dict(self) -> dict:
        return {
            "out": str(self.out) if self.out else None,
            "kind": self.kind,
            "counts": self.counts,
            "format": self.format,
            "style": self.style,
            "template": self.template,
            "tokens": self.tokens,
            "example": self.example,
            "notes": self.notes,
            "files": self.files,
            **({"sources": self.sources} if self.sources else {}),
        }


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
    return {
        "min": s[0],
        "median": int(statistics.median(s)),
        "p95": s[min(len(s) - 1, int(0.95 * len(s)))],
        "max": s[-1],
        "mean": round(sum(s) / len(s), 1),
        "total": sum(s),
    }


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out exists and is not a folder: {out}", hint="choose a new folder for the prepared data")
    if out.is_dir():
        foreign = [p.name for p in out.iterdir() if p.name not in OUTPUT_FILES]
        if foreign:
            raise BadInput(
                f"--out folder holds files prepare did not write: {', '.join(sorted(foreign)[:3])}",
                where=str(out),
                hint="use an empty or new folder; prepare replaces the whole folder",
            )


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
            raise BadInput(
                f"this model's chat template deletes <think> blocks from assistant turns: --style {style} "
                "would train without the reasoning",
                hint="use --style text (the default here), or --reasoning inline/drop",
            )
        notes.append(
            "the chat template deletes <think> blocks from assistant turns, so records are written "
            "pre-rendered (--style text) with the reasoning kept and the prompt masked"
        )
        return "text"
    if not info.prompt_is_prefix:
        if style in ("completions", "chat"):
            raise BadInput(
                f"this model's chat template ends its generation prompt with text its assistant turns "
                f"do not start with: --style {style} would train on another prompt than the one the "
                "model gets",
                hint="use --style text (the default here)",
            )
        notes.append(
            "the chat template's generation prompt is not where its assistant turns start, so records "
            "are written pre-rendered (--style text) from the generation prompt, prompt masked"
        )
        return "text"
    if style != "auto":
        if style == "completions" and any(len(ex.messages) != 2 for ex in examples):
            raise BadInput(
                "some records have a system prompt or several turns, which --style completions cannot hold",
                hint="use --style chat (the default for such data)",
            )
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
        raise err(
            "the prompt's tokens are not a prefix of the rendered record",
            where=where,
            hint="the chat template renders the prompt differently on its own; prompt masking would be wrong",
        )
    answer_ids = full_ids[len(head_ids) :]
    hits = [i for i, t in enumerate(answer_ids) if t == info.end_token_id]
    if len(hits) != 1:
        raise err(
            f"end-of-turn token {info.end_token!r} appears {len(hits)} times in the answer, expected once",
            where=where,
            hint="remove end tokens from the record's text; the chat template adds it",
        )
    tail = full_text[len(prompt_text) :]
    after = tail[tail.rfind(info.end_token) + len(info.end_token) :]
    if after.strip():
        raise err(
            f"text after the end-of-turn token: {after[:40]!r}",
            where=where,
            hint="the chat template renders something after the answer's end token",
        )
    if reasoning_text and reasoning_text[:48] not in tail:
        raise err(
            "the reasoning is missing from the rendered record",
            where=where,
            hint="the chat template strips it; use --reasoning inline or --style text",
        )


@dataclass
class _Tally:
    """What the steps met on the way: records read, what was dropped and why (in the order met), notes for the user.
    A bad record stops the run, unless skip_invalid: then it is counted."""

    skip_invalid: bool
    read: int = 0
    dropped: Counter = field(default_factory=Counter)
    notes: list = field(default_factory=list)
    replaced_system: int = 0  # examples whose own system prompt --system replaced

    def invalid(self, exc: BadInput, reason: str | None = None) -> None:
        """Raise `exc`; with skip_invalid, count it instead (under `reason`, or its message up to the first colon)."""
        if not self.skip_invalid:
            raise exc
        self.dropped["invalid: " + (reason or exc.message.split(":")[0][:60])] += 1


@dataclass
class _Template:
    """The model's tokenizer, its chat template compiled for rendering, and what that template does."""

    tok: Any
    renderer: encode.Renderer
    info: render.TemplateInfo

    @classmethod
    def load(cls, tokenizer, model_path: Path) -> _Template:
        tok = tokenizer or render.load_tokenizer(model_path)
        return cls(tok, encode.Renderer(tok), render.inspect_template(tok, model_path))


@dataclass
class _Records:
    """The examples still in the running and the records made of them (same order); once tokenized, each checked
    record's length in tokens (-1: it failed the rendering checks and was dropped under skip_invalid)."""

    examples: list
    rows: list
    lengths: dict = field(default_factory=dict)
    sides: dict = field(default_factory=dict)  # preference pairs: index -> (prompt, prompt + chosen, prompt + rejected)


@_holds_lock("out")  # one writer per output folder (medtune.core.lock)
def prepare(
    dataset,
    model,
    out=None,
    opts: PrepareOptions | None = None,
    *,
    dry_run: bool = False,
    tokenizer=None,
    progress=None,
    **fields,
) -> PrepareResult:
    """Convert `dataset` for `model` (a spec or folder) and write it to `out` (unless dry_run).

    opts: the PrepareOptions; keywords (fmt=..., max_seq_length=..., or the old names format=, map=) set fields on
    top of them. tokenizer: an already loaded tokenizer for `model` (notebooks, benchmarks); loaded if None.
    progress: a rich Progress, which gets a "reading" and a "tokenizing" task.
    """
    opts = from_kwargs(PrepareOptions, opts, **fields)
    opts.check()
    wording.wording(opts.system, opts.prompt_template)  # a bad --system or --prompt-template fails before any work
    mapping = formats.parse_map(opts.mapping)
    out = Path(out) if out else None
    writing = out is not None and not dry_run
    if writing:
        _check_out(out)
    # The model (its tokenizer is loaded once the records are read: a bad dataset fails in a second).
    model_ref, model_path = _locate_model(model, tokenizer)
    tally = _Tally(opts.skip_invalid)
    if mixture.is_mixture(dataset):  # several sources, mixed by weight (medtune.data.mixture)
        srcs, fmt, examples = _read_mixture(dataset, opts, tally, progress)
        files, source_kind, fmt_name = [f for s in srcs for f in s.files], "mixture", _mixed_name(srcs)
        digests = _hash_meanwhile(files) if writing else None
    else:
        if opts.weights:
            raise BadInput(
                "--weights is for several DATASETs, and one was given", hint="drop --weights, or add sources"
            )
        # The sources' sha256 is computed on the other core while the records are read.
        dataset = dataset[0] if isinstance(dataset, (list, tuple)) else dataset
        resolved, srcs = sources.resolve(dataset), []
        digests = _hash_meanwhile(resolved.files) if writing else None
        fmt, examples = read_examples(dataset, resolved, opts, mapping, tally, progress)
        source_kind, fmt_name = resolved.kind, fmt.name
    kind = KINDS[fmt.kind]
    tpl = _Template.load(tokenizer, model_path)
    if not (srcs and srcs[0].weight is not None):  # a weighted mix is drawn to --sample already
        examples = _draw_sample(examples, opts.sample, opts.seed, tally)
    style = kind.style(opts.style, examples, tpl.info, opts.reasoning, tally.notes)
    recs = to_records(examples, style, opts.reasoning, tpl, tally, kind)
    checked = _indices_to_check(len(recs.rows), opts.token_stats, opts.seed)
    recs.lengths = kind.check(recs, checked, tpl, opts.reasoning, tally, progress)
    keep = within_length(recs, opts, tally, dataset)
    splits = split(recs, keep, opts)
    result = _result(out if writing else None, fmt_name, style, recs, keep, splits, tpl, opts, tally, kind)
    if srcs:
        result.sources = mixture.manifest_sources(srcs, {})
    if not writing:
        return result
    sha = digests.result()
    inputs = {
        "dataset": [s.spec for s in srcs] if srcs else str(dataset),
        "kind": source_kind,
        "sha256": sha,
        **({"sources": mixture.manifest_sources(srcs, sha)} if srcs else {}),
        "model": model_ref.to_dict() if model_ref else {"path": str(model_path)},
    }
    plain_text = recs.examples[0].text is not None
    result.manifest = _manifest(result, opts, mapping, inputs, len(checked), plain_text)
    result.files = write_outputs(out, splits, result.manifest)
    return result


def _locate_model(model, tokenizer) -> tuple[Any, Path]:
    """(the pulled model's reference, its folder); no reference when a tokenizer is given with a local folder."""
    from medtune.models import pull

    model_ref = pull(str(model)) if tokenizer is None or not Path(str(model)).is_dir() else None
    return model_ref, (model_ref.path if model_ref else Path(str(model)))


def _hash_meanwhile(files):
    """A future of {path: sha256} for `files`, computed on another thread."""
    from concurrent.futures import ThreadPoolExecutor

    hasher = ThreadPoolExecutor(max_workers=1)
    digests = hasher.submit(lambda: {str(f): fsutil.sha256_file(f) for f in files})
    hasher.shutdown(wait=False)
    return digests


def read_examples(
    dataset,
    resolved: sources.Resolved,
    opts: PrepareOptions,
    mapping: dict,
    tally: _Tally,
    progress=None,
    seen: set | None = None,
) -> tuple[formats.Format, list[formats.Example]]:
    """Read the records, convert them with the format (opts.fmt, or detected from the first record), clean them and
    drop the empty and repeated ones (`seen`: the examples of earlier sources), up to opts.limit examples: (the
    format, the examples)."""
    fmt = formats.get(opts.fmt) if opts.fmt else None
    seen = set() if seen is None else seen
    words = wording.wording(opts.system, opts.prompt_template)
    examples: list[formats.Example] = []
    options = {"answers": opts.answers}
    task = progress.add_task("reading", total=None) if progress else None
    for rec in sources.read(resolved):
        tally.read += 1
        if isinstance(rec, sources.RecordError):
            tally.invalid(rec)
            continue
        if progress and tally.read % 1000 == 0:
            progress.update(task, completed=tally.read)
        try:
            fmt = fmt or formats.detect(rec.data, rec.where, mapping)
            fields = formats.Fields(rec.data, rec.where, mapping, options)
            converted = fmt.convert(fields)
            if not words.empty:
                _reword(converted, words, fields, tally)
        except BadInput as exc:
            tally.invalid(exc)
            continue
        if not converted:
            tally.dropped["no answer"] += 1
        examples += _clean_and_new(converted, rec.controls, seen, tally, KINDS[fmt.kind])
        if opts.limit and len(examples) >= opts.limit:
            examples = examples[: opts.limit]
            break
    if progress:
        progress.update(task, completed=tally.read, total=tally.read)
    if tally.replaced_system:
        tally.notes.append(f"--system replaced the records' own system prompt in {tally.replaced_system} example(s)")
    if not examples:
        raise BadInput(
            f"no usable records in {dataset} (read {tally.read}, dropped {dict(tally.dropped) or 'none'})",
            hint="check the fields (--format, --map) and that they are not empty",
        )
    return fmt, examples


def _reword(converted: list, words, fields, tally: _Tally) -> None:
    """--system and --prompt-template on each example (each side of a pair), in place."""
    for ex in converted:
        sides = getattr(ex, "sides", (ex,))
        for side in sides:
            if side.text is not None:
                raise BadInput(
                    "plain-text records have no turns for --system or --prompt-template",
                    where=side.where,
                    hint="drop them, or prepare chat-shaped data",
                )
            side.messages, replaced = words.apply(side.messages, fields)
            tally.replaced_system += replaced and side is sides[0]


def _read_mixture(dataset, opts: PrepareOptions, tally: _Tally, progress) -> tuple[list, formats.Format, list]:
    """(the sources, the first one's format, the mixed examples): each source read with its own format and map, an
    example of an earlier source dropped as a duplicate; all sources SFT data, or all preference pairs."""
    import dataclasses

    srcs = mixture.parse_sources(dataset, opts.weights, opts.fmt, opts.mapping)
    seen: set[int] = set()
    pools, first = [], None
    for s in srcs:
        resolved = sources.resolve(s.spec)
        s.files, before = resolved.files, tally.read
        o = dataclasses.replace(opts, fmt=s.fmt)
        fmt, found = read_examples(s.spec, resolved, o, formats.parse_map(s.mapping), tally, progress, seen)
        s.read, s.format = tally.read - before, fmt.name
        if first is not None and fmt.kind != first.kind:
            raise BadInput(
                f"{s.spec} holds {fmt.kind} data ({fmt.name}), {srcs[0].spec} {first.kind} data ({first.name})",
                hint="mix SFT sources with SFT sources, preference pairs with preference pairs",
            )
        first = first or fmt
        pools.append(found)
    return srcs, first, mixture.mix(pools, srcs, opts.sample, opts.seed)


def _mixed_name(srcs: list) -> str:
    return "+".join(dict.fromkeys(s.format for s in srcs))


def _example_key(ex: formats.Example) -> int:
    return hash((ex.text, ex.reasoning, tuple((m["role"], m["content"]) for m in ex.messages)))


def _clean_and_new(converted: list, controls: bool, seen: set, tally: _Tally, kind: Kind | None = None) -> list:
    """The examples (or pairs: kind), cleaned, that are not empty and not the same as one already in `seen` (which
    they join)."""
    kind = kind or KINDS["sft"]
    new = []
    for ex in converted:
        reason = kind.clean(ex, controls)
        if reason:
            tally.dropped[reason] += 1
            continue
        key = kind.key(ex)
        if key in seen:
            tally.dropped["duplicate"] += 1
            continue
        seen.add(key)
        new.append(ex)
    return new


def _draw_sample(examples: list, sample: int | None, seed: int, tally: _Tally) -> list:
    """`sample` of the examples drawn at random (seeded), in their order; all of them when there are no more."""
    if not sample or sample >= len(examples):
        return examples
    picked = sorted(random.Random(seed).sample(range(len(examples)), sample))
    tally.dropped["not sampled"] += len(examples) - sample
    return [examples[i] for i in picked]


def _example_texts(ex: formats.Example) -> list[str]:
    return [m["content"] for m in ex.messages] + [ex.reasoning, ex.text or ""]


class _Dropped(Exception):
    """A record that is not made, for `reason` (counted in the manifest's drops, never an error)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def to_records(
    examples: list, style: str, reasoning: str, tpl: _Template, tally: _Tally, kind: Kind | None = None
) -> _Records:
    """The records in `style`, one per example (or pair: kind); no record may carry the end-of-turn token as text."""
    kind = kind or KINDS["sft"]
    rows, kept = [], []
    end = tpl.info.end_token
    for ex in examples:
        if any(end in t for t in kind.texts(ex)):
            tally.invalid(
                sources.RecordError(
                    f"the record's text contains the end-of-turn token {end!r}",
                    where=ex.where,
                    hint="remove it: the chat template adds it where it belongs",
                ),
                "contains the end-of-turn token",
            )
            continue
        try:
            row = kind.record(ex, style, reasoning, tpl.info, tpl.renderer)
        except _Dropped as drop:
            tally.dropped[drop.reason] += 1
            continue
        except sources.RecordError as exc:
            tally.invalid(exc, "failed the rendering checks")
            continue
        rows.append(row)
        kept.append(ex)
    if not rows:
        raise BadInput("no records left after the checks", hint=f"dropped: {dict(tally.dropped)}")
    return _Records(kept, rows)


def _indices_to_check(n: int, token_stats: bool, seed: int) -> list[int]:
    """Every record with token statistics; else the first CHECK_SAMPLE/2 and as many others drawn at random."""
    if token_stats:
        return list(range(n))
    first = min(CHECK_SAMPLE // 2, n)
    rest = list(range(first, n))
    return sorted(set(range(first)) | set(random.Random(seed).sample(rest, min(CHECK_SAMPLE // 2, len(rest)))))


def tokenize_and_check(
    recs: _Records, indices: list[int], tpl: _Template, reasoning: str, tally: _Tally, progress=None
) -> dict[int, int]:
    """Render and tokenize the records at `indices` in batches, check each one (_check), and return their lengths
    in tokens (-1 for one that failed the checks under skip_invalid)."""
    lengths: dict[int, int] = {}
    task = progress.add_task("tokenizing", total=len(indices)) if progress else None
    for start in range(0, len(indices), CHUNK):
        chunk = indices[start : start + CHUNK]
        pairs, full_ids, head_ids = encode.render_and_encode(tpl.tok, tpl.renderer, [recs.rows[i] for i in chunk])
        for i, (full_text, prompt_text), ids, head in zip(chunk, pairs, full_ids, head_ids):
            ex = recs.examples[i]
            if ex.text is not None:  # plain text: no template to check; training appends eos
                lengths[i] = len(encode.with_eos(tpl.tok, recs.rows[i], ids))
                continue
            kept_reasoning = ex.reasoning if reasoning != "drop" else ""
            try:
                _check(tpl.info, full_text, prompt_text, ids, head, kept_reasoning, ex.where)
            except sources.RecordError as exc:
                tally.invalid(exc, "failed the rendering checks")
                lengths[i] = -1
                continue
            lengths[i] = len(ids)
        if progress:
            progress.advance(task, len(chunk))
    return lengths


def within_length(recs: _Records, opts: PrepareOptions, tally: _Tally, dataset) -> list[int]:
    """The indices of the records to keep: those that passed the checks, and those over opts.max_seq_length as
    opts.overlong says; never one whose end token training would cut off."""
    keep = []
    longest = None  # (tokens, where) of the longest record dropped for its length
    for i in range(len(recs.rows)):
        length = recs.lengths.get(i)
        if length == -1:
            continue
        if length is not None and length > opts.max_seq_length:
            if longest is None or length > longest[0]:
                longest = (length, recs.examples[i].where)
            if opts.overlong == "error":
                raise BadInput(
                    f"record is {length} tokens, over --max-seq-length {opts.max_seq_length}",
                    where=recs.examples[i].where,
                    hint="raise --max-seq-length, or --overlong drop",
                )
            if opts.overlong == "drop":
                tally.dropped["over max_seq_length"] += 1
                continue
            tally.notes.append(
                "--overlong keep: some records exceed --max-seq-length; training refuses them unless "
                "its --max-seq-length is raised"
            )
        keep.append(i)
    if keep:
        return keep
    dropped = tally.dropped
    if longest is not None:
        raise BadInput(
            f"no records left: {dropped['over max_seq_length']} dropped for being over --max-seq-length "
            f"{opts.max_seq_length}; this one is {longest[0]} tokens",
            where=longest[1],
            hint=f"raise --max-seq-length, or split such records (dropped: {dict(dropped)})",
        )
    raise BadInput(
        f"no records left in {dataset} after the length and rendering checks",
        hint=f"dropped: {dict(dropped)}; raise --max-seq-length?",
    )


def split(recs: _Records, keep: list[int], opts: PrepareOptions) -> dict[str, list[dict]]:
    """train/valid/test by a seeded hash of the opening question, so a question never lands on two sides."""
    splits: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    for i in keep:
        splits[_side(split_key(recs.examples[i]), opts.seed, opts.valid_ratio, opts.test_ratio)].append(recs.rows[i])
    if opts.valid_ratio > 0 and not splits["valid"] and len(splits["train"]) > 1:
        splits["valid"].append(splits["train"].pop())  # tiny sets: keep at least one validation record
    if not splits["train"]:
        raise BadInput("no training records left after the split", hint="lower --valid-ratio/--test-ratio or add data")
    return splits


def _result(
    out: Path | None,
    fmt: str,
    style: str,
    recs: _Records,
    keep: list[int],
    splits: dict,
    tpl: _Template,
    opts: PrepareOptions,
    tally: _Tally,
    kind: Kind | None = None,
) -> PrepareResult:
    """The counts, the token statistics and the first kept record as the model sees it."""
    kind = kind or KINDS["sft"]
    first = keep[0]
    example = {
        "where": recs.examples[first].where,
        "record": recs.rows[first],
        **kind.rendered(recs.rows[first], tpl.renderer),
        "tokens": recs.lengths.get(first),
    }
    counts = {
        "read": tally.read,
        "examples": len(recs.examples),
        "kept": len(keep),
        **({kind.unit: len(keep)} if kind.unit else {}),
        "dropped": dict(tally.dropped),
        **{k: len(v) for k, v in splits.items()},
    }
    tokens = kind.tokens(recs, keep) if opts.token_stats else {}
    return PrepareResult(
        out=out,
        counts=counts,
        format=fmt,
        style=style,
        template=tpl.info.to_dict(),
        tokens=tokens,
        example=example,
        notes=list(dict.fromkeys(tally.notes)),
        kind=kind.name,
    )


def _manifest(
    result: PrepareResult, opts: PrepareOptions, mapping: dict, inputs: dict, n_checked: int, plain_text: bool
) -> dict:
    """What was read (with content hashes), with which options and package versions, and what came of it. The
    options under their manifest names: format (the one used), map (parsed), style (the one chosen)."""
    rest = {k: v for k, v in opts.to_dict().items() if k not in ("fmt", "mapping", "style")}
    added_by = "record (style text)" if result.style == "text" and not plain_text else "chat_template"
    if result.kind == "preference":
        added_by = "record (preference pairs: each completion ends with it)"
    return {
        "stage": "prepare",
        "kind": result.kind,  # "sft": completions/chat/text records; "preference": {prompt, chosen, rejected} pairs
        "inputs": inputs,
        "options": {"format": result.format, "map": mapping, "style": result.style, **rest},
        "template": dict(result.template),
        "template_vars": dict(TEMPLATE_VARS),  # what every rendering was given (Llama 3.x's fixed "Today Date")
        "end_token_added_by": added_by,
        "checked": {"records": n_checked, "all": opts.token_stats},
        "wording": {
            "system": wording.read_system(opts.system),
            "prompt_template": wording.unescape(opts.prompt_template),
        },
        "counts": result.counts,
        "tokens": result.tokens,
        "first_example": result.example,
        "notes": result.notes,
        "versions": versions(),
    }


def write_outputs(out: Path, splits: dict[str, list[dict]], manifest: dict) -> dict[str, str]:
    """train.jsonl, valid.jsonl, test.jsonl (when it has records) and manifest.json, written in a temporary folder
    that replaces `out` whole; returns the JSONL files by side."""
    from medtune.core import redact

    with fsutil.atomic_dir(out) as tmp:
        for side, data in splits.items():
            if data or side != "test":
                jsonl.write_jsonl(tmp / f"{side}.jsonl", data)
        redact.write_json(tmp / "manifest.json", manifest)
    return {side: str(out / f"{side}.jsonl") for side in splits if (out / f"{side}.jsonl").exists()}


# ---- preference pairs (formats of kind "preference") -----------------------------------------------------
PAIR = "preference"  # completions rendered by the chat template after the prompt
PAIR_TEXT = "preference-text"  # completions written as answer + end token (where SFT would use --style text)


def _clean_pair(pair: formats.Pair, controls: bool = True) -> str | None:
    """Clean both sides in place; return the reason to drop the pair, if any: an empty side, its two sides'
    prompts differ (chat-style sources give each side its own), or the two sides are the same."""
    for name, side in zip(formats.PAIR_FIELDS, pair.sides):
        reason = _clean_example(side, controls)
        if reason == "empty response":
            return f"empty {name}"
        if reason:
            return reason
    if [(m["role"], m["content"]) for m in pair.chosen.messages[:-1]] != [
        (m["role"], m["content"]) for m in pair.rejected.messages[:-1]
    ]:
        return "prompts differ"
    if (pair.chosen.response, pair.chosen.reasoning) == (pair.rejected.response, pair.rejected.reasoning):
        return "identical sides"
    return None


def _pair_style(style: str, pairs: list, info: render.TemplateInfo, reasoning: str, notes: list) -> str:
    """PAIR, or PAIR_TEXT where the template cannot render the answers as trained (SFT's reasons for --style text)."""
    if style != "auto":
        raise BadInput(
            f"--style {style} does not apply to preference data",
            hint="leave --style auto: pairs are written as {prompt, chosen, rejected}, rendered through the template",
        )
    if info.strips_think and reasoning == "think" and any(side.reasoning for p in pairs for side in p.sides):
        notes.append(
            "the chat template deletes <think> blocks from assistant turns, so each completion is written as the "
            "answer with its reasoning and the end-of-turn token after the rendered prompt"
        )
        return PAIR_TEXT
    if not info.prompt_is_prefix:
        notes.append(
            "the chat template's generation prompt is not where its assistant turns start, so each completion is "
            "written as the answer and the end-of-turn token after the generation prompt"
        )
        return PAIR_TEXT
    return PAIR


def _completion(full: str, prompt: str, info: render.TemplateInfo, name: str, where: str) -> str:
    """What the template renders after the prompt in one side's whole conversation, up to its end-of-turn token."""
    err = sources.RecordError
    if not full.startswith(prompt):
        raise err(
            f"{name}: the rendered prompt is not a prefix of the rendered conversation",
            where=where,
            hint="the chat template renders the prompt differently on its own",
        )
    tail = full[len(prompt) :]
    end = tail.rfind(info.end_token)
    if end < 0:
        raise err(
            f"{name}: the chat template does not close the answer with {info.end_token!r}",
            where=where,
            hint="the tuned model would not learn to stop",
        )
    after = tail[end + len(info.end_token) :]
    if after.strip():
        raise err(
            f"{name}: text after the end-of-turn token: {after[:40]!r}",
            where=where,
            hint="the chat template renders something after the answer's end token",
        )
    return tail[: end + len(info.end_token)]


def _pair_record(pair: formats.Pair, style: str, reasoning: str, info, renderer) -> dict:
    """{"prompt", "chosen", "rejected"}: the prompt through the template with its generation prompt, and after it
    each side's answer (reasoning placed per --reasoning) as the template renders it (PAIR_TEXT: as written), ending
    in the end-of-turn token."""
    prompt = renderer(pair.chosen.messages[:-1], add_generation_prompt=True)
    opened = style == PAIR_TEXT and prompt.rstrip().endswith(info.think_open)
    row = {"prompt": prompt}
    for name, side in zip(formats.PAIR_FIELDS, pair.sides):
        answer = _answer(side, reasoning, info, opened=opened)
        if style == PAIR_TEXT:
            row[name] = answer + info.end_token
        else:
            full = renderer(side.messages[:-1] + [{"role": "assistant", "content": answer}])
            row[name] = _completion(full, prompt, info, name, side.where)
    if row["chosen"] == row["rejected"]:
        raise _Dropped("identical sides")
    return row


def check_pairs(
    recs: _Records, indices: list[int], tpl: _Template, reasoning: str, tally: _Tally, progress=None
) -> dict[int, int]:
    """tokenize_and_check for preference records: each side (prompt + completion) is tokenized whole and checked as
    an SFT record is (_check: the prompt's tokens a prefix, the end-of-turn token once, at its end, the reasoning
    kept). The length of a pair is its longer side's; recs.sides gets every side's."""
    lengths: dict[int, int] = {}
    end_id = tpl.info.end_token_id
    task = progress.add_task("tokenizing", total=len(indices)) if progress else None
    for start in range(0, len(indices), CHUNK):
        chunk = indices[start : start + CHUNK]
        rows = [recs.rows[i] for i in chunk]
        for i, row, head, *sides in zip(chunk, rows, *encode.pair_ids(tpl.tok, rows)):
            pair = recs.examples[i]
            try:
                for name, side, ids in zip(formats.PAIR_FIELDS, pair.sides, sides):
                    kept_reasoning = side.reasoning if reasoning != "drop" else ""
                    try:
                        _check(
                            tpl.info, row["prompt"] + row[name], row["prompt"], ids, head, kept_reasoning, pair.where
                        )
                    except sources.RecordError as exc:
                        raise sources.RecordError(f"{name}: {exc.message}", where=exc.where, hint=exc.hint) from exc
                    if ids[-1] != end_id:
                        raise sources.RecordError(
                            f"{name}: does not end with the end-of-turn token {tpl.info.end_token!r}",
                            where=pair.where,
                            hint="the chat template renders something after the answer's end token",
                        )
            except sources.RecordError as exc:
                tally.invalid(exc, "failed the rendering checks")
                lengths[i] = -1
                continue
            lengths[i] = max(len(ids) for ids in sides)
            recs.sides[i] = (len(head), *(len(ids) for ids in sides))
        if progress:
            progress.advance(task, len(chunk))
    return lengths


def _pair_tokens(recs: _Records, keep: list[int]) -> dict:
    """Statistics of the pairs' lengths (the longer side's), and of each part: prompt, prompt + chosen, prompt +
    rejected."""
    measured = [recs.sides[i] for i in keep if i in recs.sides]
    stats = _stats([recs.lengths[i] for i in keep if i in recs.lengths])
    parts = ("prompt", *formats.PAIR_FIELDS)
    return {**stats, "sides": {name: _stats([m[j] for m in measured]) for j, name in enumerate(parts)}} if stats else {}


# ---- what prepare does per kind of data ------------------------------------------------------------------
@dataclass(frozen=True)
class Kind:
    """The steps that differ between SFT examples and preference pairs (a Format's `kind` picks the entry)."""

    name: str
    clean: Callable  # (item, controls) -> the reason to drop it, or None; cleans it in place
    key: Callable  # item -> what two exact duplicates share
    texts: Callable  # item -> every text it holds (none may hold the end-of-turn token)
    style: Callable  # (--style, items, template info, --reasoning, notes) -> the records' style
    record: Callable  # (item, style, --reasoning, template info, renderer) -> the record written
    check: Callable  # (records, indices, template, --reasoning, tally, progress) -> {index: tokens}
    rendered: Callable  # (record, renderer) -> the example's rendered texts, for the manifest and --dry-run
    tokens: Callable  # (records, kept indices) -> token statistics
    unit: str | None = None  # what the counts also count the kept records as


def _sft_rendered(row: dict, renderer) -> dict:
    full_text, prompt_text = encode.texts(row, renderer)
    return {"rendered": full_text, "prompt_chars": len(prompt_text)}


def _pair_rendered(row: dict, renderer) -> dict:
    prompt = row["prompt"]
    return {
        "rendered": prompt + row["chosen"],
        "rendered_rejected": prompt + row["rejected"],
        "prompt_chars": len(prompt),
    }


KINDS: dict[str, Kind] = {
    "sft": Kind(
        "sft",
        clean=_clean_example,
        key=_example_key,
        texts=_example_texts,
        style=_choose_style,
        record=_to_record,
        check=tokenize_and_check,
        rendered=_sft_rendered,
        tokens=lambda recs, keep: _stats([recs.lengths[i] for i in keep if i in recs.lengths]),
    ),
    "preference": Kind(
        "preference",
        clean=_clean_pair,
        key=lambda pair: hash(tuple(_example_key(side) for side in pair.sides)),
        texts=lambda pair: [t for side in pair.sides for t in _example_texts(side)],
        style=_pair_style,
        record=_pair_record,
        check=check_pairs,
        rendered=_pair_rendered,
        tokens=_pair_tokens,
        unit="pairs",
    ),
}


PACKAGES = ("transformers", "tokenizers", "mlx", "mlx-lm", "gguf")  # what prepare's manifest records


def versions() -> dict:
    from medtune.core.versions import versions as installed

    return installed(PACKAGES)
