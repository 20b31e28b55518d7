"""Medical benchmarks (medtune.eval.bench's registry) run on one model column of `medtune eval`.

    sets = read_sets(["medqa"], files={"medqa": "data/sample/bench/medqa.jsonl"}, shots=0)
    result = run_set(runner, sets[0], "loglik", max_tokens=256)   # {"overall", "macro", "subjects", "picks", ...}

Each question is asked as the model is served: a chat conversation (an instruction, the k few-shot questions as
earlier turns answered by their letter, then the question) rendered by the model's own chat template. Two scorings:
- loglik: one forward pass over the rendered prompt; the option whose letter is the likeliest first token of the
  answer wins. A prompt that opens a think block gets it closed empty first, so the letter is the answer's token.
  Fast, and the same on MLX and on llama.cpp (the GGUF column reads the same prompt tokens).
- generate: greedy answer (max_tokens), the letter parsed after `</think>`; unparseable answers count as wrong
  and are listed. For reasoning models, whose first token is never the letter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from medtune.core.errors import BadInput

SCORINGS = ("loglik", "generate")


@dataclass
class BenchSet:
    """One benchmark as every column is examined on it."""

    name: str
    bench: object  # medtune.eval.bench.Benchmark
    items: list  # medtune.eval.bench.Item, selected
    shots: dict[str, list] = field(default_factory=dict)  # item id -> its few-shot items
    info: dict = field(default_factory=dict)  # source, skipped, split sizes

    def messages(self, item) -> list[dict]:
        from medtune.eval.bench import mc_messages

        return mc_messages(item, self.shots.get(item.id, []), self.bench)

    def describe(self) -> dict:
        return {
            **self.info,  # what was read: source, files, records, skipped, notes
            "read": self.info.get("questions"),
            "title": self.bench.title,
            "lang": self.bench.lang,
            "questions": len(self.items),  # asked: at most --bench-limit per subject
            "subjects": sorted({i.subject for i in self.items}),
            "shots": max((len(s) for s in self.shots.values()), default=0),
        }


def parse_files(spec: Optional[str], names: list[str]) -> dict[str, Path]:
    """--bench-file: "PATH" (one benchmark) or "NAME=PATH,NAME=PATH" (a config may give a mapping)."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        spec = ",".join(f"{k}={v}" for k, v in spec.items())
    parts = [p.strip() for p in str(spec).split(",") if p.strip()]
    if len(parts) == 1 and "=" not in parts[0]:
        if len(names) != 1:
            raise BadInput(
                f"--bench-file {spec} names no benchmark, and --bench has {len(names)}",
                hint="--bench-file medqa=PATH,cmexam=PATH",
            )
        return {names[0]: Path(parts[0])}
    files = {}
    for p in parts:
        name, sep, path = p.partition("=")
        if not sep or name.strip() not in names:
            raise BadInput(
                f"--bench-file entry {p!r} is not NAME=PATH for a benchmark in --bench ({', '.join(names)})",
                hint="--bench-file medqa=PATH,cmexam=PATH",
            )
        files[name.strip()] = Path(path.strip())
    return files


def bench_names(spec) -> list[str]:
    """--bench "medqa,cmexam" (or a list) -> registry names, checked."""
    from medtune.eval.bench import BENCHMARKS

    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec or []) if n and n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise BadInput(f"unknown benchmark {unknown[0]!r}", hint=f"one of {', '.join(BENCHMARKS)}")
    return list(dict.fromkeys(names))


def read_sets(
    names: list[str], files: dict[str, Path], shots: int = 0, limit: Optional[int] = None, seed: int = 0
) -> list[BenchSet]:
    """Each benchmark's test items (at most `limit` per subject, drawn with `seed`) and their `shots` dev items."""
    from medtune.eval import bench

    if shots < 0:
        raise BadInput(f"--shots must be 0 or more, got {shots}", hint="0 (zero-shot) or e.g. 5 (C-Eval's)")
    out = []
    for name in names:
        spec = bench.BENCHMARKS[name]
        items, info = bench.load(name, file=files.get(name), split=spec.test_split)
        items = bench.select(items, limit, seed)
        if not items:
            raise BadInput(f"benchmark {name} has no questions", where=str(files.get(name) or name))
        per_item = {}
        if shots:
            dev, dev_info = bench.load(name, file=files.get(name), split="dev")
            info["notes"] = info.get("notes", []) + dev_info.get("notes", [])  # e.g. no dev split: zero-shot
            per_item = {i.id: bench.shots(dev, i.subject, shots, exclude_id=i.id) for i in items}
        out.append(BenchSet(name, spec, items, per_item, info))
    return out


# ---- on a runner ----------------------------------------------------------------------------------
def answer_prompt(tokenizer, messages: list[dict], markers: tuple[str, str]) -> str:
    """The rendered conversation up to the answer's first token: a think block the template opens is closed empty."""
    from medtune.runtimes.mlx import render_prompt

    text = render_prompt(tokenizer, messages)
    if text.rstrip().endswith(markers[0]):
        text = text.rstrip() + f"\n{markers[1]}\n\n"
    return text


def letter_ids(tokenizer, prompt: str, letters: list[str]) -> list[int]:
    """Each letter's token as the answer's first token after `prompt` (how the tokenizer splits prompt + letter)."""
    head = tokenizer.encode(prompt, add_special_tokens=False)
    ids = []
    for letter in letters:
        full = tokenizer.encode(prompt + letter, add_special_tokens=False)
        tail = full[len(head) :] if full[: len(head)] == head else tokenizer.encode(letter, add_special_tokens=False)
        ids.append(tail[0] if tail else -1)
    return ids


def loglik_pick(runner, item, messages: list[dict]) -> Optional[int]:
    """The option whose letter the model most likely answers with (one forward pass)."""
    from medtune.eval.evaluate import pick

    letters = [k for k, _ in item.options]
    prompt = answer_prompt(runner.tokenizer, messages, runner.markers)
    ids = runner.tokenizer.encode(prompt, add_special_tokens=False)
    row = runner.next_logprobs(ids)
    cand = letter_ids(runner.tokenizer, prompt, letters)
    scores = [float(row[t]) if t >= 0 else float("-inf") for t in cand]
    return pick(scores)


def generate_pick(runner, item, messages: list[dict], max_tokens: int) -> tuple[Optional[int], str]:
    """(the option named by the generated answer, or None; the answer after the think block)."""
    from medtune.eval.bench import choose

    ans = runner.answer(messages, max_tokens)
    return choose(item, ans["answer"], close=runner.markers[1]), ans["answer"]


def longest_prompt(tokenizer, markers: tuple[str, str], sets: list[BenchSet]) -> int:
    """Tokens of the longest rendered benchmark prompt (a GGUF's context must hold it)."""
    return max(
        (
            len(tokenizer.encode(answer_prompt(tokenizer, s.messages(i), markers), add_special_tokens=False))
            for s in sets
            for i in s.items
        ),
        default=0,
    )


def run_set(runner, s: BenchSet, scoring: str, max_tokens: int, progress=None, task=None) -> dict:
    """Accuracy per subject and overall (medtune.eval.bench.aggregate) with each item's pick (letter or None)."""
    from medtune.eval.bench import aggregate

    picks, texts = [], {}
    for item in s.items:
        msgs = s.messages(item)
        if scoring == "generate":
            p, texts[item.id] = generate_pick(runner, item, msgs, max_tokens)
        else:
            p = loglik_pick(runner, item, msgs)
        picks.append(p)
        if progress is not None and task is not None:
            progress.advance(task)
    res = aggregate(s.items, picks)
    res["picks"] = {i.id: (i.options[p][0] if p is not None else None) for i, p in zip(s.items, picks)}
    if texts:
        res["answers"] = texts  # generate: what each pick was read from
    return res


def check_scoring(scoring: str) -> str:
    if scoring not in SCORINGS:
        raise BadInput(f"--scoring must be one of {', '.join(SCORINGS)}, got {scoring!r}", hint="--scoring loglik")
    return scoring
