"""GGUF fidelity: does the exported GGUF, run by llama.cpp, answer like the MLX model it came from?

    report = fidelity("models/sample", "models/sample/sample-f16.gguf", tokens=32)
    print(report.summary, report.passed)

For each prompt, rendered through the model's own chat template:

- tokens: the MLX (HF) tokenizer's ids against llama.cpp's tokenization of the same text, with special
  tokens parsed and BOS added only where the GGUF says the model adds one (what Ollama's runner does);
- continuation: greedy decoding for N tokens on both runtimes from the same prompt ids (the MLX ones),
  each stopping on its own end tokens (MLX: eos and the template's end-of-turn token; llama.cpp: the
  GGUF's end-of-generation tokens);
- at the first step, the largest |logit difference| between the two runtimes;
- at the first divergence, how far apart the two candidate tokens are in each runtime's logits (the
  top-2 margin), so that a near-tie (rounding in F16 can flip it) can be told from a real bug.

Two runtimes (`runtime=`): "llama-server" (the default when llama.cpp's tools are found), the engine inside
Ollama >= 0.30, started with --jinja: the prompt is what *it* renders from the GGUF's own chat template
(/apply-template), which must equal the HF rendering (a system prompt, several turns and a reasoning turn are
checked besides the prompts), its /tokenize ids must equal the HF ids, and its greedy /completion runs with no
client stop strings, so it ends only on the GGUF's end-of-generation tokens; the near-tie margins come from its
top log-probs. "llama-cpp-python": llama.cpp in process, fed the HF rendering's text, full logits.

Verdict: the run fails (`passed` False, `medtune eval fidelity` exits 1) when a rendering or a tokenization differs, or,
for an F32/F16/BF16 GGUF, when a continuation differs at a point that is not a near-tie (margin above
the tolerance for that type) or when one runtime stops where the other does not. Quantized GGUFs
(Q8_0, Q4_…) are expected to drift: their continuations are reported, not judged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from medtune.core.errors import BadInput
from medtune.export.chat_templates import TEMPLATE_VARS  # Llama 3.x's date, fixed as training rendered it

SAMPLE_PROMPTS = Path(__file__).resolve().parents[2] / "data" / "sample" / "medical_o1_sample.jsonl"
DEFAULT_TOKENS = 32

# GGUF general.file_type → name (llama.cpp's LLAMA_FTYPE_*; the ones medtune writes or users bring).
# Largest top-2 margin (in logits) at a divergence that still counts as a near-tie, per unquantized type.
# F32: both runtimes compute in float32, differences are ~1e-4. F16: rounding the weights moves logits by
# ~0.015 on SmolLM2 (measured against HF). BF16 keeps 8 bits of mantissa, 8x coarser than F16.
TIE_TOLERANCE = {"F32": 0.01, "F16": 0.05, "BF16": 0.25}
TEXT_FIELDS = ("prompt", "Question", "question", "instruction", "input")


@dataclass
class PromptReport:
    prompt: str
    prompt_tokens: int
    tokens_equal: bool
    first_token_mismatch: Optional[int]  # index of the first differing token id (None: equal)
    continuation_equal: bool
    divergence: Optional[int]  # first differing generated token (None: equal)
    mlx_tokens: list[int]
    gguf_tokens: list[int]
    mlx_text: str
    gguf_text: str
    max_logit_diff: float  # max |MLX - llama.cpp| over the vocabulary at the first generated position
    top2_margin: Optional[float]  # at the divergence: max over runtimes of |logit(a) - logit(b)|
    near_tie: Optional[bool]
    mlx_stopped: bool  # ended on an end token (not cut at N)
    gguf_stopped: bool
    ok: bool
    reason: str  # "" when ok, else why not
    rendered_equal: Optional[bool] = None  # llama-server only: its chat-template rendering = the HF one
    render_diff: Optional[str] = None  # where they part: "@index: hf …|server …"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class FidelityReport:
    model_dir: str
    gguf: str
    file_type: str
    judged: bool  # continuations are judged (unquantized GGUF)
    tie_tolerance: Optional[float]
    tokens: int
    gguf_adds_bos: bool
    prompts: list[PromptReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    runtime: str = "llama-cpp-python"
    templates: list["TemplateCheck"] = field(default_factory=list)  # llama-server: conversations rendered
    lora: Optional[str] = None  # a LoRA GGUF applied on top of the GGUF (Ollama's ADAPTER, llama.cpp's --lora)
    adapter: Optional[str] = None  # the adapter folder applied to the MLX model (when it is not fused)

    @property
    def summary(self) -> dict:
        p = self.prompts
        return {
            "prompts": len(p),
            "tokens_equal": sum(r.tokens_equal for r in p),
            "continuations_equal": sum(r.continuation_equal for r in p),
            "near_ties": sum(bool(r.near_tie) for r in p),
            "mlx_stopped": sum(r.mlx_stopped for r in p),
            "gguf_stopped": sum(r.gguf_stopped for r in p),
            "failed": sum(not r.ok for r in p),
            "max_logit_diff": max((r.max_logit_diff for r in p), default=0.0),
            "templates": len(self.templates),
            "templates_equal": sum(t.ok for t in self.templates),
        }

    @property
    def passed(self) -> bool:
        return all(r.ok for r in self.prompts) and all(t.ok for t in self.templates)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["summary"], d["passed"] = self.summary, self.passed
        return d


# ---- prompts ----------------------------------------------------------------------------------------
def read_prompts(path: str | Path | None = None, limit: int | None = None) -> list[str]:
    """Prompts from a file: JSON Lines with a prompt/Question/question/instruction field, a JSON array of
    strings or such objects, or plain text with one prompt per line. Default: the sample set's questions."""
    if path is None:
        if not SAMPLE_PROMPTS.is_file():
            raise BadInput(f"the sample set is not here ({SAMPLE_PROMPTS})", hint="pass --prompts FILE")
        path = SAMPLE_PROMPTS
    path = Path(path)
    if not path.is_file():
        raise BadInput(
            f"prompts file not found: {path}", hint='one prompt per line, or .jsonl with a "prompt" or "Question" field'
        )
    text = path.read_text(encoding="utf-8-sig")
    prompts: list[str] = []

    def pick(row, where: str) -> str:
        if isinstance(row, str):
            value = row
        elif isinstance(row, dict):
            value = next((row[k] for k in TEXT_FIELDS if isinstance(row.get(k), str) and row[k].strip()), None)
        else:
            value = None
        if not isinstance(value, str) or not value.strip():
            raise BadInput(
                f"no prompt text (fields {', '.join(TEXT_FIELDS)})",
                where=where,
                hint="each record needs one of these fields, with text",
            )
        return value.strip()

    suffix = path.suffix.lower()
    if suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadInput(f"invalid JSON: {exc.msg}", where=f"{path}:{exc.lineno}", hint="fix the JSON") from exc
        if not isinstance(rows, list):
            raise BadInput("expected a JSON array of prompts", where=str(path), hint='["What lowers fever?", …]')
        prompts = [pick(r, f"{path}[{i}]") for i, r in enumerate(rows)]
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            if suffix == ".jsonl":
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise BadInput(
                        f"invalid JSON: {exc.msg}", where=f"{path}:{n}", hint="each line must be a JSON object"
                    ) from exc
                prompts.append(pick(row, f"{path}:{n}"))
            else:
                prompts.append(line.strip())
    if not prompts:
        raise BadInput("no prompts in the file", where=str(path), hint="one prompt per line")
    return prompts[:limit] if limit else prompts


# ---- judging a continuation --------------------------------------------------------------------------
@dataclass
class GGUFRun:
    """One runtime's greedy answer, seen the way _compare needs it."""

    tokens: list[int]
    stopped: bool  # ended on an end-of-generation token
    first_diff: float  # max |Δ| against MLX at the first generated position
    margin: Callable[[int, int, int], float]  # (position, token a, token b) -> |score(a) - score(b)| there


def _rows_run(theirs: list[int], rows, mlx_first_row, is_eog) -> GGUFRun:
    """A run with the full logits of every step (llama-cpp-python)."""
    import numpy as np

    width = min(len(mlx_first_row), len(rows[0]))

    def margin(d, a, b):
        g = rows[d]
        return abs(g[a] - g[b]) if max(a, b) < len(g) else float("inf")

    return GGUFRun(
        theirs,
        bool(theirs) and bool(is_eog(theirs[-1])),
        float(np.abs(mlx_first_row[:width] - rows[0][:width]).max()),
        margin,
    )


def _compare(
    prompt: str,
    ids: list[int],
    gguf_ids: list[int],
    mlx_run,
    gguf: GGUFRun,
    stops: set[int],
    decode,
    tolerance: Optional[float],
) -> PromptReport:
    ours, our_rows = mlx_run
    theirs = gguf.tokens
    tokens_equal = ids == gguf_ids
    mismatch = (
        None
        if tokens_equal
        else next((i for i, (a, b) in enumerate(zip(ids, gguf_ids)) if a != b), min(len(ids), len(gguf_ids)))
    )
    mlx_stopped = bool(ours) and ours[-1] in stops
    equal = ours == theirs
    divergence = margin = near_tie = None
    reason = ""
    if not equal:
        divergence = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        if divergence < len(ours) and divergence < len(theirs):
            a, b = ours[divergence], theirs[divergence]
            m = our_rows[divergence]
            margin = float(max(abs(m[a] - m[b]), gguf.margin(divergence, a, b)))
            near_tie = tolerance is not None and margin <= tolerance
            reason = f"continuations part at token {divergence}: top-2 margin {margin:.4g}" + (
                " (a near-tie)" if near_tie else ""
            )
        else:  # one runtime stopped, the other went on past the same token
            near_tie = False
            last = (ours if len(ours) < len(theirs) else theirs)[-1]
            who = "llama.cpp (GGUF) stops" if len(theirs) < len(ours) else "MLX stops"
            reason = f"{who} on token {last} ({decode([last])!r}) and the other runtime does not: the end tokens differ"
    if not tokens_equal:
        reason = f"token ids differ from index {mismatch}" + (f"; {reason}" if reason else "")
    ok = tokens_equal and (equal or tolerance is None or bool(near_tie))
    return PromptReport(
        prompt=prompt,
        prompt_tokens=len(ids),
        tokens_equal=tokens_equal,
        first_token_mismatch=mismatch,
        continuation_equal=equal,
        divergence=divergence,
        mlx_tokens=ours,
        gguf_tokens=theirs,
        mlx_text=decode(ours),
        gguf_text=decode(theirs),
        max_logit_diff=gguf.first_diff,
        top2_margin=margin,
        near_tie=near_tie,
        mlx_stopped=mlx_stopped,
        gguf_stopped=gguf.stopped,
        ok=ok,
        reason="" if ok and equal else reason,
    )


def file_type_name(raw) -> str:
    """general.file_type as a name (F16, Q8_0, …) from the one table (gguf-py's LlamaFileType, through
    medtune.export.gguf_reader); "unknown" when it is missing, "type N" for a number that table lacks."""
    from medtune.export.gguf_reader import file_type_name as name

    try:
        return name(raw)
    except (TypeError, ValueError):
        return "unknown" if raw is None else f"type {raw}"


def gguf_file_type(path: str | Path) -> str:
    """A GGUF's file type, read from its header alone."""
    from medtune.export.gguf_reader import read_gguf_header

    return file_type_name(read_gguf_header(path)["metadata"].get("general.file_type"))


def _file_type(llm) -> str:
    return file_type_name(llm.metadata.get("general.file_type"))


def fidelity(
    model_dir: str | Path,
    gguf: str | Path,
    prompts: list[str] | None = None,
    tokens: int = DEFAULT_TOKENS,
    *,
    tie_tolerance: float | None = None,
    progress=None,
    n_threads: int | None = None,
    runtime: str = "auto",
    llama_cpp_dir: str | Path | None = None,
    lora: str | Path | None = None,
    adapter: str | Path | None = None,
) -> FidelityReport:
    """Compare the GGUF (llama.cpp) with the MLX model in `model_dir` on `prompts` (default: the sample
    set's questions). See the module docstring for what is compared and when it fails.

    lora: a LoRA GGUF (`medtune export ADAPTER --base …`) that llama.cpp applies on top of the GGUF (the base);
    adapter: the adapter folder MLX applies to `model_dir` (a base spec then), when the reference is not fused.

    runtime: "llama-server" (the engine inside Ollama ≥ 0.30, rendering the GGUF's own chat template),
    "llama-cpp-python" (llama.cpp in process, fed the HF rendering's text), or "auto" (the server when
    llama.cpp's tools are found)."""
    if adapter is not None and not Path(model_dir).is_dir():
        from medtune.models import resolve

        model_dir = resolve(str(model_dir))
    model_dir, gguf = Path(model_dir), Path(gguf)
    header, prompts = _check_inputs(model_dir, gguf, prompts, tokens)
    from medtune.data.wording import served
    from medtune.export.chat_templates import words_user_turns

    words = served(model_dir, adapter)
    stack = Stack(
        Path(lora) if lora else None,
        Path(adapter) if adapter else None,
        words.get("system"),
        words.get("prompt_template"),
        words_user_turns(header["metadata"].get("tokenizer.chat_template")),
    )
    stack.check(header)
    if choose_runtime(runtime, llama_cpp_dir) == "llama-server":
        return _server_fidelity(
            model_dir, gguf, prompts, tokens, tie_tolerance, progress, n_threads, llama_cpp_dir, header, stack
        )
    return _inprocess_fidelity(model_dir, gguf, prompts, tokens, tie_tolerance, progress, n_threads, stack)


@dataclass(frozen=True)
class Stack:
    """What sits on top of each side's weights: a LoRA GGUF in llama.cpp, an adapter folder in MLX."""

    lora: Optional[Path] = None
    adapter: Optional[Path] = None
    system: Optional[str] = None  # the system prompt training saw: every prompt is rendered with it
    template: Optional[str] = None  # and the prompt wording
    gguf_words: bool = False  # the GGUF's chat template words each question itself (medtune export)

    def conversation(self, prompt: str) -> list[dict]:
        """The conversation training would have seen: the question in its wording, under its system prompt."""
        from medtune.data.wording import word_prompt
        from medtune.runtimes.mlx import messages_for

        return messages_for(word_prompt(prompt, self.template), self.system)

    def served(self, prompt: str) -> list[dict]:
        """What a client sends llama-server for `prompt`: the plain question when the GGUF's template words it
        itself, else the conversation training would have seen."""
        from medtune.runtimes.mlx import messages_for

        return messages_for(prompt, self.system) if self.gguf_words else self.conversation(prompt)

    def reference(self, conv: list[dict]) -> list[dict]:
        """A probe conversation as the HF rendering is to see it: its user turns worded when the GGUF words them."""
        from medtune.data.wording import word_turns

        return word_turns(conv, self.template) if self.gguf_words else conv

    def check(self, base_header: dict) -> None:
        """The LoRA GGUF is a LoRA adapter for the base GGUF's architecture, or a BadInput before anything loads."""
        if self.lora is None:
            return
        from medtune.export import read_gguf_header

        if not self.lora.is_file():
            raise BadInput(f"LoRA GGUF not found: {self.lora}", hint="`medtune export ADAPTER --base MODEL` writes one")
        meta = read_gguf_header(self.lora)["metadata"]
        arch = base_header["metadata"].get("general.architecture")
        if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
            raise BadInput("not a LoRA adapter GGUF", where=str(self.lora), hint="pass the file written for --lora")
        if meta.get("general.architecture") != arch:
            raise BadInput(
                f"the LoRA is for {meta.get('general.architecture')}, the GGUF is {arch}",
                where=str(self.lora),
                hint="pass the base GGUF the adapter was exported for",
            )

    def server_args(self) -> list[str]:
        return ["--lora", str(self.lora)] if self.lora else []

    def mark(self, report: FidelityReport) -> None:
        report.lora = str(self.lora) if self.lora else None
        report.adapter = str(self.adapter) if self.adapter else None
        if self.system or self.template:
            report.notes.append(
                "rendered with the system prompt and wording training saw"
                + (f": system {self.system[:40]!r}" if self.system else "")
                + (f", template {self.template!r}" if self.template else "")
                + (
                    "; the GGUF's template words each question itself: llama-server is sent it plain"
                    if self.gguf_words
                    else ""
                )
            )


def _check_inputs(model_dir: Path, gguf: Path, prompts: list[str] | None, tokens: int) -> tuple[dict, list[str]]:
    """(the GGUF's header, the prompts), or a BadInput before anything loads."""
    if tokens < 1:
        raise BadInput(f"--tokens must be at least 1, got {tokens}", hint="e.g. --tokens 32")
    if not gguf.is_file():
        raise BadInput(f"GGUF not found: {gguf}", hint="`medtune export` writes models/<run>/<name>-<quant>.gguf")
    if not model_dir.is_dir():
        raise BadInput(f"model folder not found: {model_dir}", hint="pass the fused folder the GGUF was exported from")
    from medtune.export import read_gguf_header

    header = read_gguf_header(gguf)  # magic, header and tensor extents: a damaged file is refused before anything loads
    prompts = read_prompts() if prompts is None else [p for p in prompts if p and p.strip()]
    if not prompts:
        raise BadInput("no prompts to compare", hint="pass --prompts FILE")
    return header, prompts


def _new_report(
    model_dir: Path, gguf: Path, ftype: str, tokens: int, tie_tolerance, adds_bos: bool, runtime: str
) -> FidelityReport:
    tolerance = tie_tolerance if tie_tolerance is not None else TIE_TOLERANCE.get(ftype)
    return FidelityReport(
        model_dir=str(model_dir),
        gguf=str(gguf),
        file_type=ftype,
        judged=tolerance is not None,
        tie_tolerance=tolerance,
        tokens=tokens,
        gguf_adds_bos=adds_bos,
        runtime=runtime,
    )


def _quantized_note(report: FidelityReport) -> None:
    if report.tie_tolerance is None:
        report.notes.append(f"{report.file_type} is a quantized type: continuations are reported, not judged")


def _inprocess_fidelity(
    model_dir: Path, gguf: Path, prompts: list[str], tokens: int, tie_tolerance, progress, n_threads, stack: Stack
) -> FidelityReport:
    """llama.cpp in process, fed the HF rendering's text: full logits on both sides."""
    from medtune.core.errors import require

    require("llama_cpp", extra="test", purpose="the GGUF runtime that fidelity compares against")
    from medtune.runtimes import llamacpp, mlx

    model, tokenizer = mlx.load(str(model_dir), stack.adapter)
    stops = set(tokenizer.eos_token_ids)
    rendered = [mlx.render_prompt(tokenizer, stack.conversation(p)) for p in prompts]
    ids_list = [tokenizer.encode(text, add_special_tokens=False) for text in rendered]
    n_ctx = -(-(max(len(i) for i in ids_list) + tokens + 8) // 256) * 256
    llm = llamacpp.load_gguf(
        gguf,
        n_ctx,
        n_threads=n_threads,
        logits_all=True,
        purpose="the GGUF runtime fidelity compares against",
        lora=stack.lora,
    )
    try:
        report = _new_report(
            model_dir, gguf, _file_type(llm), tokens, tie_tolerance, llamacpp.adds_bos(llm), "llama-cpp-python"
        )
        stack.mark(report)
        _quantized_note(report)
        if llm.n_vocab() != len(tokenizer._tokenizer):
            report.notes.append(f"vocabulary sizes differ: GGUF {llm.n_vocab()}, tokenizer {len(tokenizer._tokenizer)}")
        task = progress.add_task("comparing MLX and llama.cpp", total=len(prompts)) if progress else None
        is_eog = llamacpp.is_eog(llm)
        for prompt, text, ids in zip(prompts, rendered, ids_list):
            gguf_ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
            ours = mlx.greedy(model, ids, tokens, end_ids=stops, rows=True)
            theirs = llamacpp.greedy(llm, ids, tokens, rows=True)
            gguf_run = _rows_run(theirs.tokens, theirs.rows, ours.rows[0], is_eog)
            report.prompts.append(
                _compare(
                    prompt,
                    ids,
                    gguf_ids,
                    (ours.tokens, ours.rows),
                    gguf_run,
                    stops,
                    tokenizer.decode,
                    report.tie_tolerance,
                )
            )
            if progress:
                progress.advance(task)
    finally:
        llm.close()
    return report


# ---- llama-server: the engine inside current Ollama ---------------------------------------------------
RUNTIMES = ("auto", "llama-server", "llama-cpp-python")
# Conversations rendered by both chat-template engines besides each prompt's own: a system prompt, several
# turns, and an assistant turn with reasoning in the history (which think families must strip or keep as HF does).
CONVERSATIONS = {
    "system + user": [
        {"role": "system", "content": "You are a careful clinician. Answer briefly."},
        {"role": "user", "content": "BP 150/95 mmHg on 3 visits, eGFR 58. Next step?"},
    ],
    "several turns": [
        {"role": "system", "content": "You are a careful clinician."},
        {"role": "user", "content": "What lowers fever?"},
        {"role": "assistant", "content": "Paracetamol, fluids and rest."},
        {"role": "user", "content": "发烧39度怎么办？"},
    ],
    "reasoning turn": [
        {"role": "user", "content": "Is 38.5 C a fever?"},
        {"role": "assistant", "content": "<think>\nAdults: fever from 38.0 C.\n</think>\n\nYes, a mild one."},
        {"role": "user", "content": "Treat it?"},
    ],
}


@dataclass
class TemplateCheck:
    """One conversation rendered by the GGUF's chat template in llama-server against the HF rendering."""

    name: str
    rendered_equal: bool
    render_diff: Optional[str]
    tokens_equal: bool
    first_token_mismatch: Optional[int]
    ok: bool


def choose_runtime(runtime: str, llama_cpp_dir=None) -> str:
    """auto: llama-server when llama.cpp's tools are found, else llama-cpp-python in process."""
    from medtune.runtimes import tools

    if runtime not in RUNTIMES:
        raise BadInput(f"unknown runtime {runtime!r}", hint=f"choose from: {', '.join(RUNTIMES)}")
    if runtime == "auto":
        return "llama-server" if tools.find("llama-server", llama_cpp_dir) else "llama-cpp-python"
    return runtime


def engine_view(hf_text: str, bos_text: str | None, adds_bos: bool) -> str:
    """The HF rendering as llama-server shows it: a leading BOS *string* is dropped from its rendering when
    the GGUF adds BOS as a token (it is fed to the model all the same)."""
    if adds_bos and bos_text and hf_text.startswith(bos_text):
        return hf_text[len(bos_text) :]
    return hf_text


def first_difference(a: str, b: str) -> Optional[str]:
    """None when equal, else "@i: HF '…' | llama-server '…'" around the first differing character."""
    if a == b:
        return None
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    lo = max(0, i - 12)
    return f"@{i}: HF {a[lo : i + 24]!r} | llama-server {b[lo : i + 24]!r}"


def _first_mismatch(a: list[int], b: list[int]) -> Optional[int]:
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _server_run(run, mlx_first_row) -> GGUFRun:
    """A llama-server greedy run (medtune.runtimes.llama_server.LlamaServer.greedy): its top-n logprobs per step
    stand in for the full logits."""
    import numpy as np

    top = run.rows or []
    first = np.asarray(mlx_first_row, dtype=np.float64)
    first = first - (np.log(np.exp(first - first.max()).sum()) + first.max())  # MLX log-softmax
    rows = (top[0] if top else None) or []  # a -inf (the server's null: underflowed) has no difference to measure
    diff = max((abs(first[i] - lp) for i, lp in rows if i < len(first) and np.isfinite(lp)), default=0.0)

    def margin(d, a, b):
        if d >= len(top) or top[d] is None:
            return 0.0  # no probabilities for this token from the server: MLX's margin decides alone
        probs = dict(top[d])
        return abs(probs[a] - probs[b]) if a in probs and b in probs else float("inf")

    return GGUFRun(run.tokens, run.stopped, float(diff), margin)


def _server_fidelity(
    model_dir: Path,
    gguf: Path,
    prompts: list[str],
    tokens: int,
    tie_tolerance,
    progress,
    n_threads,
    llama_cpp_dir,
    header: dict,
    stack: Stack = Stack(),
) -> FidelityReport:
    """llama-server renders, tokenizes and continues each prompt; the HF rendering and MLX are the reference."""
    from medtune.runtimes import mlx, tools
    from medtune.runtimes.llama_server import LlamaServer

    binary = tools.require(
        "llama-server", llama_cpp_dir, purpose="fidelity in the engine Ollama runs"
    )  # before loading
    meta = header["metadata"]
    ftype = file_type_name(meta.get("general.file_type"))
    model, tokenizer = mlx.load(str(model_dir), stack.adapter)
    convs = [stack.conversation(p) for p in prompts]
    hf_texts = [mlx.render_prompt(tokenizer, c) for c in convs]
    hf_ids = [tokenizer.encode(t, add_special_tokens=False) for t in hf_texts]
    n_ctx = max(512, -(-(max(len(i) for i in hf_ids) + tokens + 64) // 256) * 256)
    report = _new_report(
        model_dir,
        gguf,
        ftype,
        tokens,
        tie_tolerance,
        bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "llama-server",
    )
    stack.mark(report)
    report.notes.append(
        f"llama-server {tools.version(binary) or '?'} ({binary}), --jinja: the GGUF's own chat template"
        + (f", --lora {stack.lora.name}" if stack.lora else "")
    )
    _quantized_note(report)
    task = (
        progress.add_task("comparing MLX and llama-server", total=len(prompts) + len(CONVERSATIONS))
        if progress
        else None
    )
    kv = "f32" if ftype == "F32" else None  # an F32 file is a reference: keep its KV cache in F32 too
    with LlamaServer(
        gguf, ctx=n_ctx, llama_cpp_dir=llama_cpp_dir, n_threads=n_threads, kv_type=kv, extra=stack.server_args()
    ) as srv:
        for name, conv in CONVERSATIONS.items():
            _check_template(srv, tokenizer, name, conv, report, stack.reference(conv))
            if progress:
                progress.advance(task)
        for prompt, hf, ids in zip(prompts, hf_texts, hf_ids):
            report.prompts.append(_server_prompt(srv, model, tokenizer, prompt, stack.served(prompt), hf, ids, report))
            if progress:
                progress.advance(task)
    return report


def _server_view(srv, tokenizer, conv: list[dict], hf: str, adds_bos: bool) -> tuple[str, Optional[str], list[int]]:
    """(llama-server's rendering of `conv`, where it differs from the HF rendering `hf` or None, its token ids)."""
    server_text = srv.apply_template(conv)
    diff = first_difference(engine_view(hf, tokenizer.bos_token, adds_bos), server_text)
    return server_text, diff, srv.tokenize(server_text)


def _check_template(srv, tokenizer, name: str, conv: list[dict], report: FidelityReport, reference: list[dict]):
    """One of CONVERSATIONS rendered and tokenized by llama-server against HF rendering `reference` (the same
    conversation, its user turns worded when the GGUF words them: Stack.reference) (a TemplateCheck, or a note when
    the HF template refuses the conversation)."""
    try:
        hf = tokenizer.apply_chat_template(reference, tokenize=False, add_generation_prompt=True, **TEMPLATE_VARS)
    except Exception as exc:  # noqa: BLE001 - a template that refuses a shape (e.g. no system role)
        report.notes.append(f"{name}: the HF template refuses this conversation ({exc})")
        return
    _, diff, got = _server_view(srv, tokenizer, conv, hf, report.gguf_adds_bos)
    ids = tokenizer.encode(hf, add_special_tokens=False)
    report.templates.append(
        TemplateCheck(name, diff is None, diff, ids == got, _first_mismatch(ids, got), diff is None and ids == got)
    )


def _server_prompt(
    srv, model, tokenizer, prompt: str, conv: list[dict], hf: str, ids: list[int], report: FidelityReport
) -> PromptReport:
    """One prompt: llama-server's rendering, tokens and greedy continuation against the HF rendering and MLX."""
    from medtune.runtimes import mlx

    server_text, diff, got = _server_view(srv, tokenizer, conv, hf, report.gguf_adds_bos)
    stops = set(tokenizer.eos_token_ids)
    ours = mlx.greedy(model, ids, report.tokens, end_ids=stops, rows=True)
    theirs = srv.greedy(server_text, report.tokens)
    row = _compare(
        prompt,
        ids,
        got,
        (ours.tokens, ours.rows),
        _server_run(theirs, ours.rows[0]),
        stops,
        tokenizer.decode,
        report.tie_tolerance,
    )
    row.rendered_equal, row.render_diff = diff is None, diff
    if diff is not None:
        row.ok = False
        row.reason = f"llama-server renders the prompt differently {diff}" + (f"; {row.reason}" if row.reason else "")
    return row
