"""`medtune eval`: measure base, tuned and exported models side by side, and write one report.

    report = evaluate("models/sample", data="data/processed/sample", base="builtin:smollm2-135m",
                      ggufs=["models/sample/sample-f16.gguf"], out="runs/eval/sample")
    print(report["models"][1]["metrics"])

For every model (base and tuned on MLX, each GGUF on llama.cpp), greedy decoding on the held-out split's
questions and on a small fixed probe set (data/probes.jsonl, English and Chinese):

- validation loss / perplexity on the held-out split, answer tokens only (MLX models);
- stop rate: answers that ended on an end token before --max-tokens;
- mean answer length (tokens);
- think-block well-formedness: <think>…</think> opened and closed once, with a non-empty answer after it;
- repetition rate: the fraction of the answer's word 4-grams (CJK: character 4-grams) that repeat an
  earlier one; a looping answer scores high;
- multiple-choice accuracy when the data has `options` + `answer` (MedQA/CMB style), each option scored by
  its mean token log-likelihood after the question (MLX models);
- for each GGUF: medtune.eval.fidelity against the tuned model's folder.

The metric functions at the top are pure (text in, number out) and tested on constructed cases.
Heavy imports (mlx, llama_cpp) happen inside the functions that run models.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from medtune.core.errors import BadInput
from medtune.core.options import from_kwargs
from medtune.eval.options import EvalOptions

PROBES = Path(__file__).resolve().parents[2] / "data" / "probes.jsonl"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
NGRAM = 4

# ---- pure metrics ---------------------------------------------------------------------------------
_CJK = r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"
_WORDS = re.compile(rf"{_CJK}|(?:(?!{_CJK})\w)+")


def words(text: str) -> list[str]:
    """Lower-cased words; each CJK character is a word of its own. Punctuation is ignored."""
    return _WORDS.findall(text.lower())


def repetition_rate(text: str, n: int = NGRAM) -> float:
    """Fraction of the n-grams of `text` that repeat an earlier n-gram (0: none; → 1: a loop)."""
    w = words(text)
    grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


THINK_STATES = ("absent", "ok", "unclosed", "unopened", "repeated", "empty_answer")


def think_state(text: str, open_: str = THINK_OPEN, close: str = THINK_CLOSE, in_think: bool = False) -> str:
    """How the answer's think block is formed. `in_think`: the prompt already opened it (DeepSeek-R1 templates).

    absent: no marker at all; ok: opened once, closed once after it, non-empty answer after the close;
    unclosed: opened, never closed; unopened: closed without (or before) an open; repeated: more than one
    open or close; empty_answer: a well-formed block and nothing after it."""
    opens, closes = text.count(open_) + (1 if in_think else 0), text.count(close)
    if opens == 0 and closes == 0:
        return "absent"
    if opens > 1 or closes > 1:
        return "repeated"
    if closes == 0:
        return "unclosed"
    if opens == 0 or (not in_think and text.find(open_) > text.find(close)):
        return "unopened"
    if not text[text.find(close) + len(close) :].strip():
        return "empty_answer"
    return "ok"


# Control/special tokens that must never appear in an answer's text (a model that learnt them as words leaks
# them: Ollama shows them to the user). Chat-format markers of the common families, by pattern.
_LEAKS = re.compile(
    r"<\|[A-Za-z0-9_\-]{1,40}\|>"  # <|im_start|> <|eot_id|> <|end|> <|endoftext|> …
    r"|<｜[^｜<>]{1,40}｜>"  # DeepSeek's full-width <｜end▁of▁sentence｜>, <｜Assistant｜>
    r"|</?(?:start_of_turn|end_of_turn|bos|eos)>|</s>|\[/?INST\]|\[/?SYSTEM_PROMPT\]"
)


def leaked_tokens(text: str) -> list[str]:
    """The control/special tokens written out in `text`, in order (e.g. ["<|im_start|>"])."""
    return _LEAKS.findall(text)


def stop_rate(finish_reasons: list[str]) -> Optional[float]:
    """Fraction of answers that ended on an end token ("stop") rather than at max tokens ("length")."""
    return sum(r == "stop" for r in finish_reasons) / len(finish_reasons) if finish_reasons else None


def perplexity(loss: Optional[float]) -> Optional[float]:
    return None if loss is None else math.exp(min(loss, 50.0))


def summarise(answers: list[dict]) -> dict:
    """Generation metrics over answer dicts (tokens, finish_reason, think, repetition)."""
    if not answers:
        return {"answers": 0}
    present = [a for a in answers if a["think"] != "absent"]
    return {
        "answers": len(answers),
        "stop_rate": stop_rate([a["finish_reason"] for a in answers]),
        "mean_tokens": sum(a["tokens"] for a in answers) / len(answers),
        "think_present": len(present) / len(answers),
        "think_ok": (sum(a["think"] == "ok" for a in present) / len(present)) if present else None,
        "repetition_rate": sum(a["repetition"] for a in answers) / len(answers),
        "leak_rate": sum(bool(a.get("leaked")) for a in answers) / len(answers),
        "empty_after_think": sum(a["think"] == "empty_answer" for a in answers) / len(answers),
    }


def score_answer(
    text: str,
    tokens: int,
    finish_reason: str,
    open_: str = THINK_OPEN,
    close: str = THINK_CLOSE,
    in_think: bool = False,
) -> dict:
    """One answer with its per-answer metrics, reasoning split off."""
    from medtune.runtimes.mlx import split_reasoning

    reasoning, answer = split_reasoning(text, open_, close, in_think=in_think)
    return {
        "text": text,
        "reasoning": reasoning,
        "answer": answer,
        "tokens": tokens,
        "finish_reason": finish_reason,
        "think": think_state(text, open_, close, in_think),
        "repetition": repetition_rate(text),
        "leaked": leaked_tokens(text),
    }


# ---- multiple choice ------------------------------------------------------------------------------
LETTERS = "ABCDEFGHIJ"


@dataclass
class Choice:
    question: str
    options: list[tuple[str, str]]  # (letter, text)
    answer: int  # index into options


def parse_choice(row: dict, where: str = "") -> Optional[Choice]:
    """A MedQA/CMB-style record (question, options as a dict or list, answer as letter, index or text), or None."""
    opts, ans = row.get("options"), row.get("answer")
    q = next((row[k] for k in ("question", "Question", "prompt") if isinstance(row.get(k), str)), None)
    if opts is None or ans is None or q is None:
        return None
    if isinstance(opts, dict):
        options = [(str(k).strip(), str(v).strip()) for k, v in opts.items()]
    elif isinstance(opts, list):
        options = [(LETTERS[i], str(v).strip()) for i, v in enumerate(opts)]
    else:
        raise BadInput("`options` must be a mapping or a list", where=where, hint='"options": {"A": "…", "B": "…"}')
    keys = [k for k, _ in options]
    if isinstance(ans, int) and not isinstance(ans, bool) and 0 <= ans < len(options):
        idx = ans
    elif isinstance(ans, str) and ans.strip() in keys:
        idx = keys.index(ans.strip())
    elif isinstance(ans, str) and ans.strip() in [t for _, t in options]:
        idx = [t for _, t in options].index(ans.strip())
    else:
        raise BadInput(
            f"`answer` {ans!r} is none of the options {keys}", where=where, hint="a letter, index or option text"
        )
    return Choice(question=q.strip(), options=options, answer=idx)


def choice_prompt(c: Choice) -> str:
    lines = "\n".join(f"{k}. {t}" for k, t in c.options)
    return f"{c.question}\n\n{lines}\n\nAnswer with the letter and the text of the correct option."


def pick(scores: list[float]) -> int:
    """Index of the best-scoring option (the first on a tie)."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def accuracy(choices: list[Choice], picks: list[int]) -> Optional[float]:
    return sum(c.answer == p for c, p in zip(choices, picks)) / len(choices) if choices else None


# ---- inputs ---------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict]:
    from medtune.core.jsonl import read_jsonl

    return read_jsonl(path, hint="one JSON object per line")


def heldout_file(data: Path) -> Path:
    for name in ("test.jsonl", "valid.jsonl"):
        if (data / name).is_file():
            return data / name
    raise BadInput(f"no test.jsonl or valid.jsonl in {data}", hint="pass the folder `medtune prepare` wrote")


def question_of(row: dict) -> Optional[list[dict]]:
    """The conversation to answer for a held-out record (prompt/completion or messages), or None (text)."""
    if isinstance(row.get("prompt"), str):
        return [{"role": "user", "content": row["prompt"]}]
    msgs = row.get("messages")
    if isinstance(msgs, list) and msgs and msgs[-1].get("role") == "assistant":
        return [{"role": m["role"], "content": m["content"]} for m in msgs[:-1]]
    return None


def reference_of(row: dict) -> Optional[str]:
    """The dataset's own answer to a held-out record (its completion, or the last assistant turn), if any."""
    if isinstance(row.get("completion"), str):
        return row["completion"]
    msgs = row.get("messages")
    if isinstance(msgs, list) and msgs and msgs[-1].get("role") == "assistant":
        return msgs[-1].get("content")
    return None


def read_probes(path: Path | None = None) -> list[dict]:
    path = Path(path or PROBES)
    if not path.is_file():
        raise BadInput(f"probe file not found: {path}", hint="a .jsonl with a prompt field per line")
    out = []
    for i, row in enumerate(_read_jsonl(path)):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise BadInput("probe has no prompt", where=f"{path}:{i + 1}", hint='{"prompt": "…"}')
        out.append({"id": row.get("id", f"probe-{i + 1}"), "lang": row.get("lang", ""), "prompt": row["prompt"]})
    return out


def read_curves(metrics: Path | None) -> dict:
    """(step, loss) pairs from a metrics.jsonl (train and validation)."""
    if metrics is None or not Path(metrics).is_file():
        return {}
    from medtune.core.jsonl import read_jsonl

    train, val = [], []
    for r in read_jsonl(Path(metrics), skip_bad=True):
        if "train_loss" in r:
            train.append([r["step"], r["train_loss"]])
        if "val_loss" in r:
            val.append([r["step"], r["val_loss"]])
    return {"train": train, "val": val, "source": str(metrics)}


def metrics_for(model: str, adapter: Path | None) -> Path | None:
    """metrics.jsonl of the adapter, given or named in a fused folder's medtune_manifest.json."""
    if adapter is not None:
        return Path(adapter) / "metrics.jsonl"
    man = Path(model) / "medtune_manifest.json"
    if man.is_file():
        try:
            src = json.loads(man.read_text(encoding="utf-8"))["inputs"]["adapter"]
        except (KeyError, TypeError, json.JSONDecodeError):
            return None
        return Path(src) / "metrics.jsonl"
    return None


# ---- runners --------------------------------------------------------------------------------------
def option_tokens(tokenizer, c: Choice) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, option ids) per option: the question rendered through the chat template, then "B. text"."""
    from medtune.runtimes.mlx import messages_for, render_prompt

    prompt = render_prompt(tokenizer, messages_for(choice_prompt(c)))
    head = tokenizer.encode(prompt, add_special_tokens=False)
    return [(head, tokenizer.encode(prompt + f"{k}. {t}", add_special_tokens=False)[len(head) :]) for k, t in c.options]


class MLXRunner:
    kind = "mlx"

    def __init__(self, spec: str, adapter: Path | None = None):
        from medtune.data.render import think_markers
        from medtune.runtimes.mlx import load

        self.spec, self.adapter = spec, adapter
        self.model, self.tokenizer = load(spec, adapter)
        self.markers = think_markers(self.tokenizer)

    def answer(self, messages: list[dict], max_tokens: int) -> dict:
        from medtune.runtimes.mlx import generate, render_prompt

        res = generate(self.model, self.tokenizer, messages, max_tokens=max_tokens, temp=0.0)
        in_think = render_prompt(self.tokenizer, messages).rstrip().endswith(self.markers[0])
        return score_answer(res.text, res.tokens, res.finish_reason, *self.markers, in_think=in_think)

    def loss(self, rows: list[dict], where: Path) -> tuple[float, int]:
        from medtune.train.backends.mlx import evaluate
        from medtune.train.data import build_dataset

        items = build_dataset(rows, self.tokenizer, True, 1 << 30, where)
        self.model.eval()
        return evaluate(self.model, items, batch_size=1), sum(len(t) - o for t, o in items)

    def next_logprobs(self, ids: list[int]):
        from medtune.runtimes.mlx import next_logprobs

        return next_logprobs(self.model, ids)

    def completion_logprob(self, ids: list[int], offset: int) -> float:
        """Summed log-probability of ids[offset:] given what precedes them."""
        from medtune.runtimes.mlx import token_logprobs

        return float(token_logprobs(self.model, ids, offset - 1).astype("float64").sum())

    def option_scores(self, c: Choice) -> list[float]:
        """Mean log-probability of each option's tokens ("B. text") after the rendered question."""
        from medtune.runtimes.mlx import token_logprobs

        return [
            float(token_logprobs(self.model, head + tail, len(head) - 1).mean()) if tail else float("-inf")
            for head, tail in option_tokens(self.tokenizer, c)
        ]


class GGUFRunner:
    kind = "gguf"

    def __init__(
        self,
        path: Path,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        tokenizer=None,
        markers: tuple[str, str] = (THINK_OPEN, THINK_CLOSE),
        logits_all: bool = False,
        lora: Optional[Path] = None,
    ):
        from medtune.runtimes.llamacpp import load_gguf

        self.path, self.tokenizer, self.markers = Path(path), tokenizer, markers
        if not self.path.is_file():
            raise BadInput(
                f"GGUF not found: {self.path}", hint="`medtune export` writes models/<run>/<name>-<quant>.gguf"
            )
        self.llm = load_gguf(
            self.path,
            n_ctx,
            n_threads=n_threads,
            logits_all=logits_all,
            purpose="running GGUF files in `medtune eval`",
            lora=lora,
        )

    def answer(self, messages: list[dict], max_tokens: int) -> dict:
        """Greedy, with the Modelfile's repeat penalty. With `tokenizer` (the tuned model's: the GGUF's source) the
        prompt is rendered exactly as in training, and as the Modelfile's TEMPLATE does for Ollama, and the tokens
        are picked step by step with the very rule the MLX column uses (medtune.runtimes.decoding's penalty over
        prompt + answer), so that the side-by-side answers compare the files, not two samplers. Without it,
        llama-cpp-python renders the chat template stored in the GGUF and samples with its own penalty."""
        from medtune.runtimes.decoding import REPEAT_PENALTY
        from medtune.runtimes.mlx import detokenize, render_prompt

        self.llm.reset()
        if self.tokenizer is None:
            kw = dict(max_tokens=max_tokens, temperature=0.0, top_k=1, repeat_penalty=REPEAT_PENALTY, seed=0)
            out = self.llm.create_chat_completion(messages=messages, **kw)
            choice = out["choices"][0]
            text, markers = choice["message"].get("content") or "", (THINK_OPEN, THINK_CLOSE)
            reason = "stop" if choice.get("finish_reason") == "stop" else "length"
            return score_answer(text, int(out["usage"]["completion_tokens"]), reason, *markers, in_think=False)
        prompt = render_prompt(self.tokenizer, messages)
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        out = self.greedy(ids, max_tokens)
        return score_answer(
            detokenize(self.tokenizer, out.answer_tokens),
            len(out.tokens),
            out.finish,
            *self.markers,
            in_think=prompt.rstrip().endswith(self.markers[0]),
        )

    def greedy(self, ids: list[int], max_tokens: int):
        """Greedy tokens after `ids` with the MLX column's penalty rule, stopping on the tokenizer's end ids and the
        GGUF's end-of-generation tokens (medtune.runtimes.llamacpp.greedy)."""
        from medtune.runtimes import llamacpp
        from medtune.runtimes.decoding import MODELFILE_PENALTY

        return llamacpp.greedy(
            self.llm,
            ids,
            max_tokens,
            penalty=MODELFILE_PENALTY,
            end_ids=getattr(self.tokenizer, "eos_token_ids", None) or (),
        )

    def _nll(self, tokens: list[int], offset: int):
        """Negative log-likelihood of tokens[offset:] given what precedes them (needs logits_all)."""
        from medtune.runtimes.llamacpp import token_logprobs

        return -token_logprobs(self.llm, tokens, offset - 1)

    def loss(self, items: list[tuple[list[int], int]]) -> tuple[float, int]:
        """Mean cross-entropy over the answer tokens of (token ids, prompt offset) items."""
        total, count = 0.0, 0
        for tokens, offset in items:
            nll = self._nll(tokens, offset)
            total += float(nll.sum())
            count += len(nll)
        return total / max(count, 1), count

    def next_logprobs(self, ids: list[int]):
        from medtune.runtimes.llamacpp import next_logprobs

        return next_logprobs(self.llm, ids)

    def completion_logprob(self, ids: list[int], offset: int) -> float:
        """As MLXRunner.completion_logprob, on llama.cpp (needs logits_all)."""
        return float(-self._nll(ids, offset).sum())

    def option_scores(self, c: Choice) -> list[float]:
        """As MLXRunner.option_scores, on llama.cpp (the tuned model's tokenization)."""
        return [
            float(-self._nll(head + tail, len(head)).mean()) if tail else float("-inf")
            for head, tail in option_tokens(self.tokenizer, c)
        ]

    def close(self) -> None:
        self.llm.close()


# ---- the evaluation -------------------------------------------------------------------------------
def evaluate(
    model: str,
    data: str | Path | None = None,
    opts: EvalOptions | None = None,
    *,
    adapter: str | Path | None = None,
    base: str | None = None,
    ggufs: list | tuple = (),
    out: str | Path = "runs/eval/model",
    metrics: str | Path | None = None,
    notes: list[str] | tuple = (),
    progress=None,
    **fields,
) -> dict:
    """Evaluate `model` (the tuned model: a fused folder, or a base spec with `adapter`), `base` and each GGUF;
    write report.json, report.md and report.html in `out`. Returns the report (a dict).

    data: a `medtune prepare` folder (test.jsonl, else valid.jsonl: loss, and the first `limit` questions are
    answered); probes: the probe set (default data/probes.jsonl; `probe_limit` takes the first N);
    choices: a .jsonl of multiple-choice records (question, options, answer); the held-out split's records
    that have options are used too; metrics: a metrics.jsonl for the loss curves (default: the adapter's);
    gguf_loss: also the GGUFs' validation loss and multiple-choice accuracy (llama.cpp then keeps logits for every
    position: context x vocabulary floats of memory), with the tuned model's tokenization; only when MODEL is a
    fused folder. Quantized GGUFs are also judged against an unquantized one among `ggufs` (F16/F32/BF16) by KL
    divergence on the held-out answers (medtune.eval.quants), with the smallest good quant recommended.
    notes: lines shown at the top of the report (e.g. why a column is missing).
    The options are EvalOptions: `opts`, or keywords (max_tokens=, limit=, probes=, n_threads=, ...)."""
    o = from_kwargs(EvalOptions, opts, **fields)
    max_tokens, limit, probes, probe_limit, choices = o.max_tokens, o.limit, o.probes, o.probe_limit, o.choices
    fidelity_tokens, n_threads, gguf_loss = o.fidelity_tokens, o.threads, o.gguf_loss
    if max_tokens < 1:
        raise BadInput(f"--max-tokens must be at least 1, got {max_tokens}", hint="e.g. --max-tokens 256")
    out = Path(out)
    adapter = Path(adapter) if adapter else None
    t0 = time.time()
    from medtune.data.wording import served

    inputs = _read_inputs(data, probes, probe_limit, choices, limit, o, served(model, adapter))
    specs = _model_specs(model, adapter, base, ggufs)
    per_model = len(inputs.questions) + sum(len(b.items) for b in inputs.sets)
    run = _Run(
        str(model),
        adapter,
        max_tokens,
        fidelity_tokens,
        n_threads,
        gguf_loss,
        progress,
        progress.add_task("evaluating", total=len(specs) * per_model) if progress else None,
        scoring=o.scoring,
    )
    results = [_evaluate_model(label, kind, spec, adp, inputs, run) for label, kind, spec, adp in specs]
    _margins_vs_base(results)
    report = {
        "medtune_eval": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.time() - t0, 2),
        "model": str(model),
        "adapter": str(adapter) if adapter else None,
        "data": str(data) if data else None,
        "held_out": str(inputs.heldout) if inputs.heldout else None,
        "pairs": str(inputs.pairs_file) if inputs.pairs_file else None,
        "probes": str(probes or PROBES),
        "max_tokens": max_tokens,
        "decoding": "greedy",
        "repeat_penalty": _penalty()[0],
        "repeat_last_n": _penalty()[1],
        "repetition_ngram": NGRAM,
        "curves": read_curves(Path(metrics) if metrics else metrics_for(str(model), adapter)),
        "questions": [{k: v for k, v in q.items()} for q in inputs.questions],
        "multiple_choice": [{"question": c.question, "options": c.options, "answer": c.answer} for c in inputs.mc],
        "models": [{k: v for k, v in e.items() if k not in ("answers", "benchmarks", "notes")} for e in results],
        "quants": _quants(model, adapter, data, ggufs, n_threads, out, progress),
        **_bench_report(inputs.sets, results, o.scoring),
        "notes": list(notes) + [n for e in results for n in e.pop("notes", [])],
    }
    for qi, q in enumerate(report["questions"]):
        q["answers"] = {e["label"]: e["answers"][qi] for e in results}
    folders = _card_folders(model, ggufs)
    report["cards"] = [str(f / "README.md") for f in folders]
    report = _write_report(report, out)
    from medtune.models.card import write_card

    for folder in folders:
        write_card(folder, report)
    return report


@dataclass
class _Inputs:
    """What every model is evaluated on."""

    rows: list[dict]  # the held-out records
    heldout: Optional[Path]  # their file
    probes: list[dict]
    mc: list[Choice]  # multiple-choice questions
    questions: list[dict]  # the probes, then the first held-out questions: {source, id, lang, messages, reference}
    sets: list = field(default_factory=list)  # medtune.eval.exam.BenchSet: the benchmarks
    more_pairs: list[dict] = field(default_factory=list)  # held-out pairs of a second folder (--pairs)
    pairs_file: Optional[Path] = None

    @property
    def loss_rows(self) -> list[dict]:
        return [
            r for r in self.rows if not is_pair(r) and (question_of(r) is not None or isinstance(r.get("text"), str))
        ]

    @property
    def pairs(self) -> list[dict]:
        """The held-out preference pairs (prepared prompt, chosen, rejected)."""
        return [r for r in self.rows if is_pair(r)] + self.more_pairs


def is_pair(row: dict) -> bool:
    from medtune.data.encode import is_pair as pair

    return pair(row)


def _read_inputs(
    data, probes, probe_limit: int | None, choices, limit: int, o: EvalOptions, words: dict | None = None
) -> _Inputs:
    """What every column is asked; the probes in the wording training saw (`words`: system prompt, prompt template),
    the held-out records as they were prepared."""
    from medtune.data.wording import word_prompt

    words = words or {}
    system = [{"role": "system", "content": words["system"]}] if words.get("system") else []
    from medtune.eval import exam

    names = exam.bench_names(o.bench)
    exam.check_scoring(o.scoring)
    sets = exam.read_sets(names, exam.parse_files(o.bench_file, names), o.shots, o.bench_limit, o.seed)
    rows, heldout = [], None
    if data is not None:
        heldout = heldout_file(Path(data))
        rows = _read_jsonl(heldout)
    probe_rows = read_probes(probes)[:probe_limit] if probe_limit is not None else read_probes(probes)
    mc = _read_choices(rows, heldout, choices)
    questions = [
        {
            "source": "probe",
            "id": p["id"],
            "lang": p["lang"],
            "messages": system + [{"role": "user", "content": word_prompt(p["prompt"], words.get("prompt_template"))}],
        }
        for p in probe_rows
    ]
    held = [(i, None if is_pair(r) else question_of(r)) for i, r in enumerate(rows)]
    questions += [
        {
            "source": "held-out",
            "id": f"{heldout.name}:{i + 1}",
            "lang": "",
            "messages": m,
            "reference": reference_of(rows[i]),
        }
        for i, m in held
        if m is not None
    ][:limit]
    pairs_file, more_pairs = _read_pairs(o.pairs)
    return _Inputs(rows, heldout, probe_rows, mc, questions, sets, more_pairs, pairs_file)


def _read_pairs(pairs) -> tuple[Optional[Path], list[dict]]:
    """--pairs: the held-out split of a folder `medtune prepare` wrote from preference data (its manifest says so:
    raw pairs are not rendered through the chat template), every row a pair."""
    if not pairs:
        return None, []
    folder, hint = Path(pairs), "--pairs takes the folder `medtune prepare PAIRS.jsonl --out DIR` wrote"
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise BadInput(f"--pairs {folder}: not a prepared folder (no manifest.json)", hint=hint)
    try:
        kind = json.loads(manifest.read_text(encoding="utf-8")).get("kind")
    except (ValueError, AttributeError) as exc:
        raise BadInput(f"--pairs {manifest}: not a manifest ({exc})", hint=hint) from None
    if kind != "preference":
        raise BadInput(f"--pairs {folder}: prepared from {kind or 'SFT'} data, not preference pairs", hint=hint)
    path = heldout_file(folder)
    rows = _read_jsonl(path)
    for i, r in enumerate(rows):
        if not is_pair(r):
            raise BadInput("not a preference pair (prompt, chosen, rejected)", where=f"{path}:{i + 1}", hint=hint)
    return path, rows


def _read_choices(rows: list[dict], heldout: Optional[Path], choices) -> list[Choice]:
    """The held-out records that have options, then every record of the `choices` file (which must have them)."""
    mc: list[Choice] = []
    for i, r in enumerate(rows):
        c = parse_choice(r, f"{heldout}:{i + 1}")
        if c:
            mc.append(c)
    if choices:
        for i, r in enumerate(_read_jsonl(Path(choices))):
            c = parse_choice(r, f"{choices}:{i + 1}")
            if c is None:
                raise BadInput(
                    "record has no question/options/answer",
                    where=f"{choices}:{i + 1}",
                    hint='{"question": "…", "options": {"A": "…"}, "answer": "A"}',
                )
            mc.append(c)
    return mc


def _model_specs(model: str, adapter: Path | None, base: str | None, ggufs) -> list[tuple]:
    """(label, kind, spec, adapter) per column: base, tuned, then each GGUF (labelled by file name, made unique)."""
    specs = []
    if base:
        specs.append(("base", "mlx", base, None))
    specs.append(("tuned", "mlx", str(model), adapter))
    labels_seen = set()
    for g in ggufs:
        path, lora = gguf_stack(g)
        label = path.name + (f" + {lora.name}" if lora else "")
        while label in labels_seen:
            label += "'"
        labels_seen.add(label)
        specs.append((label, "gguf", str(path), lora))
    return specs


def gguf_stack(g) -> tuple[Path, Optional[Path]]:
    """A GGUF column: a file, or a base GGUF with a LoRA GGUF on top (Ollama's FROM + ADAPTER), given as a pair or as
    "BASE.gguf+LORA.gguf"."""
    if isinstance(g, (tuple, list)):
        return Path(g[0]), Path(g[1]) if g[1] else None
    base, plus, lora = str(g).partition(".gguf+")
    if plus and lora.endswith(".gguf"):
        return Path(base + ".gguf"), Path(lora)
    return Path(g), None


@dataclass
class _Run:
    """The settings every column is evaluated with, and what the tuned column hands on to the GGUF columns."""

    model: str
    adapter: Optional[Path]
    max_tokens: int
    fidelity_tokens: int
    n_threads: Optional[int]
    gguf_loss: bool
    progress: object
    task: object
    tuned_tok: Optional[tuple] = None  # (tokenizer, think markers) of a fused tuned model: the GGUFs' source
    scoring: str = "loglik"  # how the benchmarks are scored (medtune.eval.exam)


def _evaluate_model(label: str, kind: str, spec: str, adp, inputs: _Inputs, run: _Run) -> dict:
    """One column: loss and multiple choice (where the runtime can score), then every question answered."""
    entry = {"label": label, "kind": kind, "spec": spec, "adapter": str(adp) if adp else None, "metrics": {}}
    runner = _mlx_runner(spec, adp, inputs, entry) if kind == "mlx" else _gguf_runner(spec, adp, inputs, run, entry)
    answers = []
    try:
        _bench_metrics(runner, inputs.sets, run, entry)
        for q in inputs.questions:
            answers.append(runner.answer(q["messages"], run.max_tokens))
            if run.progress:
                run.progress.advance(run.task)
    finally:
        if kind == "gguf":
            runner.close()
        elif (
            label == "tuned" and adp is None
        ):  # a fused folder: the GGUFs' source, whose tokenizer renders their prompts
            run.tuned_tok = (runner.tokenizer, runner.markers)
    del runner
    n_probes = len(inputs.probes)
    entry["metrics"].update(summarise(answers))
    entry["metrics"]["probe"] = summarise(answers[:n_probes])
    entry["metrics"]["held_out"] = summarise(answers[n_probes:])
    if kind == "gguf":
        entry["fidelity"] = _fidelity(
            run.model,
            run.adapter,
            spec,
            [p["prompt"] for p in inputs.probes],
            min(run.fidelity_tokens, run.max_tokens),
            run.n_threads,
            lora=adp,
        )
    entry["answers"] = answers
    return entry


def _mlx_runner(spec: str, adp, inputs: _Inputs, entry: dict) -> MLXRunner:
    runner = MLXRunner(spec, adp)
    loss_rows = inputs.loss_rows
    if loss_rows:
        loss, n = runner.loss(loss_rows, inputs.heldout)
        entry["metrics"].update(val_loss=loss, val_ppl=perplexity(loss), val_tokens=n)
    if inputs.mc:
        _choice_metrics(runner, inputs.mc, entry)
    if inputs.pairs:
        _pair_metrics(runner, runner.tokenizer, inputs.pairs, entry)
    return runner


def _gguf_runner(spec: str, lora: Optional[Path], inputs: _Inputs, run: _Run, entry: dict) -> GGUFRunner:
    """A GGUF column (with `lora` on top); with gguf_loss and a fused tuned model, scored with the tuned model's
    tokenization."""
    tuned_tok, scored = run.tuned_tok, bool(run.gguf_loss and run.tuned_tok)
    items = None
    loss_rows = inputs.loss_rows
    if scored and loss_rows:
        from medtune.train.data import build_dataset

        items = build_dataset(loss_rows, tuned_tok[0], True, 1 << 30, inputs.heldout)
    longest = max((len(t) for t, _ in items or []), default=0)
    if inputs.sets and tuned_tok:
        from medtune.eval.exam import longest_prompt

        longest = max(longest, longest_prompt(tuned_tok[0], tuned_tok[1], inputs.sets) + run.max_tokens)
    n_ctx = max(2048, -(-(longest + 8) // 256) * 256)
    runner = GGUFRunner(
        Path(spec),
        n_ctx=n_ctx,
        n_threads=run.n_threads,
        tokenizer=tuned_tok[0] if tuned_tok else None,
        markers=tuned_tok[1] if tuned_tok else (THINK_OPEN, THINK_CLOSE),
        logits_all=scored,
        lora=lora,
    )
    if items:
        loss, n = runner.loss(items)
        entry["metrics"].update(val_loss=loss, val_ppl=perplexity(loss), val_tokens=n)
    if inputs.mc and scored:
        _choice_metrics(runner, inputs.mc, entry)
    if inputs.pairs and scored:
        _pair_metrics(runner, tuned_tok[0], inputs.pairs, entry)
    return runner


def _margins_vs_base(results: list[dict]) -> None:
    """Each column's mean preference margin minus the base column's, pair by pair (DPO's reward margin / beta)."""
    base = next((e.get("pair_margins") for e in results if e["label"] == "base"), None)
    for e in results:
        mine = e.pop("pair_margins", None)
        if base and mine and e["label"] != "base":
            e["metrics"]["pref_margin_vs_base"] = sum(a - b for a, b in zip(mine, base)) / len(mine)


def _pair_metrics(runner, tokenizer, pairs: list[dict], entry: dict) -> None:
    """Held-out preference pairs: the share whose chosen answer the model finds likelier than the rejected one
    (summed completion log-probs), and the mean margin in nats; the per-pair margins are kept for the margin
    against the base column (DPO's reward margin over beta, with the base as the reference)."""
    from medtune.data.encode import encode_pair_items

    margins = [
        runner.completion_logprob(*chosen) - runner.completion_logprob(*rejected)
        for chosen, rejected in encode_pair_items(tokenizer, pairs)
    ]
    entry["metrics"].update(
        pref_accuracy=sum(m > 0 for m in margins) / len(margins),
        pref_margin=sum(margins) / len(margins),
        pref_pairs=len(margins),
    )
    entry["pair_margins"] = margins


def _choice_metrics(runner, mc: list[Choice], entry: dict) -> None:
    picks = [pick(runner.option_scores(c)) for c in mc]
    entry["metrics"].update(mc_accuracy=accuracy(mc, picks), mc_questions=len(mc))
    entry["mc_picks"] = picks


def _bench_metrics(runner, sets: list, run: _Run, entry: dict) -> None:
    """Each benchmark on this column (a GGUF needs the tuned model's tokenizer: MODEL a fused folder)."""
    from medtune.eval.exam import run_set

    if not sets:
        return
    if getattr(runner, "tokenizer", None) is None:
        entry["notes"] = [
            f"{entry['label']}: benchmarks skipped (a GGUF is examined with the fused model's tokenizer: "
            "pass the fused folder as MODEL)"
        ]
        return
    entry["benchmarks"] = {
        s.name: run_set(runner, s, run.scoring, run.max_tokens, run.progress, run.task) for s in sets
    }


def _bench_report(sets: list, results: list[dict], scoring: str) -> dict:
    """report["benchmarks"][name][label] = accuracy (overall, macro, per subject); their questions and every
    column's pick under report["benchmark_items"][name]; titles, sources and sizes under "benchmark_info"."""
    if not sets:
        return {}
    benchmarks, items, info = {}, {}, {}
    for s in sets:
        cols = {e["label"]: e["benchmarks"][s.name] for e in results if s.name in e.get("benchmarks", {})}
        benchmarks[s.name] = {k: {f: v for f, v in r.items() if f not in ("picks", "answers")} for k, r in cols.items()}
        info[s.name] = {**s.describe(), "scoring": scoring}
        items[s.name] = [
            {
                "id": i.id,
                "subject": i.subject,
                "question": i.question,
                "answer": i.options[i.answer][0],
                "picks": {k: r["picks"].get(i.id) for k, r in cols.items()},
                **({"answers": {k: r["answers"][i.id] for k, r in cols.items()}} if scoring == "generate" else {}),
            }
            for i in s.items
        ]
    for e in results:
        e.pop("benchmarks", None)
    return {"benchmarks": benchmarks, "benchmark_info": info, "benchmark_items": items}


def _write_report(report: dict, out: Path) -> dict:
    """report.json, report.md and report.html in `out` (redacted: no Hub token, whatever a model or a path holds)."""
    from medtune.core import fsutil, redact
    from medtune.eval.report_html import render_html, render_markdown

    out.mkdir(parents=True, exist_ok=True)
    report["files"] = {"json": str(out / "report.json"), "md": str(out / "report.md"), "html": str(out / "report.html")}
    report = redact.redact(report)
    fsutil.write_json(out / "report.json", report)
    fsutil.write_text(out / "report.md", render_markdown(report))
    fsutil.write_text(out / "report.html", render_html(report))
    return report


def _card_folders(model: str, ggufs) -> list[Path]:
    """The folders whose model card (README.md) gets this report's numbers: the fused folder, each GGUF's export
    folder."""
    from medtune.models.card import EXPORT_MANIFEST, FUSE_MANIFEST

    folders = [Path(model)] if (Path(model) / FUSE_MANIFEST).is_file() else []
    plain = [base for base, lora in map(gguf_stack, ggufs) if lora is None]  # a shared base's card is not this model's
    folders += [p.parent for p in plain if (p.parent / EXPORT_MANIFEST).is_file()]
    return list(dict.fromkeys(folders))


def _penalty() -> tuple[float, int]:
    from medtune.runtimes.decoding import REPEAT_LAST_N, REPEAT_PENALTY

    return REPEAT_PENALTY, REPEAT_LAST_N


def _quants(model: str, adapter: Path | None, data, ggufs, n_threads, out: Path, progress) -> dict | None:
    """The quantized GGUFs against the unquantized one (KL divergence on the held-out answers), when both exist."""
    from medtune.eval.fidelity import gguf_file_type
    from medtune.eval.quants import REFERENCE_TYPES, heldout_sequences, judge_quants

    if data is None or adapter is not None or not Path(model).is_dir() or len(ggufs) < 2:
        return None
    stacks = [gguf_stack(g) for g in ggufs]
    types = {g: gguf_file_type(g[0]) for g in stacks}
    refs = [g for g in stacks if g[1] is None and types[g] in REFERENCE_TYPES]  # a plain unquantized file
    refs.sort(key=lambda g: REFERENCE_TYPES.index(types[g]))
    quants = [g for g in stacks if (g[1] is not None or types[g] not in REFERENCE_TYPES) and g not in refs[:1]]
    if not refs or not quants:
        return None
    out.mkdir(parents=True, exist_ok=True)
    table = judge_quants(
        refs[0][0],
        [(b, lo) if lo else b for b, lo in quants],
        heldout_sequences(model, data),
        n_threads=n_threads,
        progress=progress,
        workdir=out,
    )
    return table.to_dict()


def _fidelity(
    model: str, adapter: Path | None, gguf: str, prompts: list[str], tokens: int, n_threads, lora=None
) -> dict:
    """medtune.eval.fidelity against the tuned model's folder (a fused folder only: an adapter is not the GGUF's
    source); a base GGUF with a LoRA GGUF on top is held to the fused model too."""
    if adapter is not None or not Path(model).is_dir():
        return {"skipped": "fidelity needs the fused folder the GGUF came from (pass it as MODEL)"}
    from medtune.eval.fidelity import fidelity

    rep = fidelity(model, gguf, prompts, tokens, n_threads=n_threads, lora=lora)
    return {
        "file_type": rep.file_type,
        "judged": rep.judged,
        "passed": rep.passed,
        "summary": rep.summary,
        "notes": rep.notes,
        "runtime": rep.runtime,
    }
