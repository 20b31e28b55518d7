"""The MLX runtime: load a model (and optionally a LoRA adapter) through mlx_lm, generate answers, decode greedily
and score tokens.

`generate` streams an answer to a conversation through mlx_lm (sampling or greedy, with the repeat penalty
medtune's Modelfile gives Ollama): `medtune chat`, `medtune generate` and the MLX columns of `medtune eval`.
`greedy(model, prompt_ids, …)` and `logprobs(model, ids, start)` are the operations the llama.cpp runtime has too
(medtune.runtimes.llamacpp), with the same penalty rule (medtune.runtimes.decoding): fidelity and eval compare the
engines through them.

The prompt is the tokenizer's chat template with the generation prompt added, so the model sees
exactly what it was tuned on. Generation stops on any end token: the tokenizer's eos ids and the
token the chat template closes an assistant turn with (they differ for some models, which is why
a tuned model "never stops"). Reasoning models write `<think>…</think>` before the answer; we
split it off, also while streaming.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

from medtune.core import runtime
from medtune.core.errors import BadInput
from medtune.runtimes.decoding import REPEAT_LAST_N, REPEAT_PENALTY, Greedy, Penalty, pick_greedy

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ADAPTER_FILES = ("adapter_config.json", "adapters.safetensors")

# on_text(kind, text): kind is "reasoning" or "answer".
OnText = Callable[[str, str], None]


@dataclass
class GenerationResult:
    text: str  # everything the model wrote (end token excluded)
    tokens: int  # tokens the model produced, the end token included
    prompt_tokens: int
    finish_reason: str  # "stop": ended on an end token; "length": hit max_tokens
    tokens_per_second: float  # decoding speed, prompt processing excluded
    seconds: float  # wall time, prompt processing included
    reasoning: str  # text inside <think>…</think>, "" if none
    answer: str  # the rest
    prompt: Optional[str] = None  # the user prompt (generate_many)

    def to_dict(self) -> dict:
        return asdict(self)


# --- reasoning markers -------------------------------------------------------------------------


def _held_back(buf: str, marker: str) -> int:
    """Length of the longest end of `buf` that could be the start of `marker` (wait for more text)."""
    for n in range(min(len(marker) - 1, len(buf)), 0, -1):
        if marker.startswith(buf[-n:]):
            return n
    return 0


class ThinkSplitter:
    """Route streamed text into reasoning and answer pieces as the think markers go by.

    Markers may arrive split across segments, so text that could be the start of a marker is held
    back until the next segment decides it.
    """

    def __init__(self, open_: str = THINK_OPEN, close: str = THINK_CLOSE, in_think: bool = False):
        self.open, self.close, self.in_think = open_, close, in_think
        self.buf = ""

    @property
    def kind(self) -> str:
        return "reasoning" if self.in_think else "answer"

    def feed(self, text: str) -> list[tuple[str, str]]:
        self.buf += text
        pieces: list[tuple[str, str]] = []
        while True:
            marker = self.close if self.in_think else self.open
            i = self.buf.find(marker)
            if i < 0:
                break
            if i:
                pieces.append((self.kind, self.buf[:i]))
            self.buf = self.buf[i + len(marker) :]
            self.in_think = not self.in_think
        keep = _held_back(self.buf, self.close if self.in_think else self.open)
        ready, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
        if ready:
            pieces.append((self.kind, ready))
        return pieces

    def flush(self) -> list[tuple[str, str]]:
        rest, self.buf = self.buf, ""
        return [(self.kind, rest)] if rest else []


def split_reasoning(
    text: str, open_: str = THINK_OPEN, close: str = THINK_CLOSE, in_think: bool = False
) -> tuple[str, str]:
    """(reasoning, answer). An unterminated think block is all reasoning with an empty answer;
    `in_think` says the prompt already opened the block (DeepSeek-R1-style templates)."""
    splitter = ThinkSplitter(open_, close, in_think)
    parts = {"reasoning": [], "answer": []}
    for kind, piece in splitter.feed(text) + splitter.flush():
        parts[kind].append(piece)
    return "".join(parts["reasoning"]).strip(), "".join(parts["answer"]).strip()


# --- loading -----------------------------------------------------------------------------------


def _check_adapter(adapter, base: Path | None = None) -> Path:
    """The adapter folder, checked; a PEFT adapter (torch, Unsloth, TRL) is converted for mlx_lm first, exactly
    (medtune.adapters.as_mlx; `base` is the model it applies to)."""
    from medtune.core import safety

    path = Path(adapter).expanduser()
    if not path.is_dir():
        raise BadInput(
            f"adapter folder not found: {path}", hint="pass the folder `medtune train` wrote (adapters/<run>/)"
        )
    if base is not None and _is_peft(path):
        from medtune.adapters import as_mlx

        path = as_mlx(safety.adapter_dir_for_loading(path), base)
    missing = [name for name in ADAPTER_FILES if not (path / name).is_file()]
    if missing:
        raise BadInput(
            f"adapter folder has no {', '.join(missing)}",
            where=str(path),
            hint="pass the folder `medtune train` wrote (adapter_config.json + adapters.safetensors)",
        )
    return safety.adapter_dir_for_loading(path)


def _is_peft(folder: Path) -> bool:
    import json

    from medtune.fuse import adapter_kind

    try:
        return adapter_kind(json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))) == "peft"
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def load(model: str, adapter: str | Path | None = None):
    """(model, tokenizer) for a model spec, with the adapter applied; float32 on CPU.

    Equivalent to mlx_lm's `load(path, adapter_path=adapter)`, with the model's config normalised
    (rope_theta) and errors that say whether the model or the adapter is at fault.
    """
    from medtune.models import pull
    from medtune.models.config import read_config

    path = pull(model).path
    adapter_dir = _check_adapter(adapter, path) if adapter is not None else None
    cfg = read_config(path)
    overrides = {k: cfg[k] for k in ("rope_theta", "rope_scaling") if cfg.get(k) is not None}
    mx = runtime.mx()
    from mlx_lm import load as mlx_load
    from mlx_lm.tuner.utils import load_adapters

    from medtune.core import safety

    try:
        net, tokenizer = mlx_load(str(path), model_config=overrides, **safety.mlx_load_kwargs())
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise BadInput(
            f"mlx_lm cannot load the model: {str(exc).splitlines()[0]}",
            where=str(path),
            hint="check the model folder (config.json, safetensors, tokenizer)",
        ) from exc
    if adapter_dir is not None:
        try:
            net = load_adapters(net, str(adapter_dir))
        except (ValueError, FileNotFoundError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
            detail = lines[0] + (f" ({lines[1]}{', …' if len(lines) > 2 else ''})" if len(lines) > 1 else "")
            raise BadInput(
                f"cannot apply the adapter: {detail}",
                where=str(adapter_dir),
                hint="was it trained on this base model? adapter_config.json says which (base_model)",
            ) from exc
        net.eval()
    if runtime.on_cpu():
        net.set_dtype(mx.float32)  # bf16/fp16 matmuls are slow on MLX's CPU backend
    _add_stop_tokens(tokenizer)
    return net, tokenizer


def _wrap(tokenizer):
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    return tokenizer if isinstance(tokenizer, TokenizerWrapper) else TokenizerWrapper(tokenizer)


def _add_stop_tokens(tokenizer) -> None:
    """Stop on the chat template's end-of-turn token too, not only on the tokenizer's eos."""
    if getattr(tokenizer, "_medtune_stops", False):
        return
    from medtune.data.render import inspect_template

    try:
        info = inspect_template(tokenizer._tokenizer)
    except BadInput:  # no template, or one that does not close the turn with a special token
        info = None
    if info is not None and info.end_token_id is not None:
        tokenizer.add_eos_token(info.end_token_id)
    tokenizer._medtune_stops = True


# --- generation --------------------------------------------------------------------------------


def render_prompt(tokenizer, messages: list[dict]) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise BadInput(
            "the model's tokenizer has no chat template",
            hint="use an instruct/chat model, or add a chat_template to tokenizer_config.json",
        )
    from medtune.export.chat_templates import TEMPLATE_VARS  # Llama 3.x's date, fixed as training rendered it

    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **TEMPLATE_VARS)


def generate(
    model,
    tokenizer,
    messages: list[dict],
    *,
    max_tokens: int = 256,
    temp: float = 0.0,
    top_p: float = 1.0,
    repeat_penalty: float = REPEAT_PENALTY,
    repeat_last_n: int = REPEAT_LAST_N,
    seed: int = 0,
    on_text: Optional[OnText] = None,
) -> GenerationResult:
    """Answer the conversation `messages` ([{role, content}, …]). `on_text(kind, text)` gets the text
    as it is produced, kind "reasoning" or "answer".

    `repeat_penalty` divides (positive) or multiplies (negative) the logits of every token among the
    last `repeat_last_n` of prompt + answer, the way llama.cpp and Ollama do; 1 or n = 0 turns it off."""
    if repeat_penalty <= 0 or repeat_last_n < 0:
        raise BadInput(
            f"bad repetition options repeat_penalty={repeat_penalty}, repeat_last_n={repeat_last_n}",
            hint="--repeat-penalty > 0 (1 = off), --repeat-last-n >= 0 (0 = off)",
        )
    if max_tokens < 1:
        raise BadInput(f"max_tokens must be at least 1, got {max_tokens}", hint="e.g. --max-tokens 256")
    if temp < 0 or not 0 < top_p <= 1:
        raise BadInput(
            f"bad sampling options temp={temp}, top_p={top_p}", hint="temp >= 0 (0 is greedy), 0 < top_p <= 1"
        )
    mx = runtime.mx()
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    from medtune.data.render import think_markers

    tokenizer = _wrap(tokenizer)
    _add_stop_tokens(tokenizer)
    text = render_prompt(tokenizer, messages)
    ids = tokenizer.encode(text, add_special_tokens=False)
    open_, close = think_markers(tokenizer)
    splitter = ThinkSplitter(open_, close, in_think=text.rstrip().endswith(open_))
    in_think_at_start = splitter.in_think

    mx.random.seed(seed)
    sampler = make_sampler(temp, top_p=top_p)
    processors = None
    if repeat_penalty != 1.0 and repeat_last_n > 0:
        processors = make_logits_processors(repetition_penalty=repeat_penalty, repetition_context_size=repeat_last_n)
    chunks: list[str] = []
    last = None
    t0 = time.perf_counter()
    t_first = t_last = t0
    for resp in stream_generate(
        model, tokenizer, ids, max_tokens=max_tokens, sampler=sampler, logits_processors=processors
    ):
        t_last = time.perf_counter()
        if last is None:
            t_first = t_last
        last = resp
        if resp.text:
            chunks.append(resp.text)
            if on_text:
                for kind, piece in splitter.feed(resp.text):
                    on_text(kind, piece)
    if on_text:
        for kind, piece in splitter.flush():
            on_text(kind, piece)

    full = "".join(chunks)
    n = last.generation_tokens if last else 0
    decode_s = t_last - t_first
    tps = (n - 1) / decode_s if n > 1 and decode_s > 0 else (n / (t_last - t0) if t_last > t0 else 0.0)
    reasoning, answer = split_reasoning(full, open_, close, in_think=in_think_at_start)
    return GenerationResult(
        text=full,
        tokens=n,
        prompt_tokens=len(ids),
        finish_reason=(last.finish_reason or "length") if last else "length",
        tokens_per_second=round(tps, 2),
        seconds=round(t_last - t0, 3),
        reasoning=reasoning,
        answer=answer,
    )


def greedy(
    model,
    prompt_ids: list[int],
    max_tokens: int,
    *,
    penalty: Optional[Penalty] = None,
    end_ids: Iterable[int] = (),
    rows: bool = False,
) -> Greedy:
    """Greedy tokens after `prompt_ids`, one forward pass per token on a KV cache: at each step the last position's
    logits (float32), `penalty` (penalty, last_n) applied over prompt + answer so far, the largest picked. Stops on
    one of `end_ids` (kept in the tokens, as mlx_lm counts it) or after `max_tokens`. rows: keep each step's logits
    (before the penalty). The same operation as medtune.runtimes.llamacpp.greedy."""
    import numpy as np
    from mlx_lm.models.cache import make_prompt_cache

    mx = runtime.mx()
    stops = set(end_ids)
    cache = make_prompt_cache(model)
    logits = model(mx.array([prompt_ids]), cache=cache)[0, -1]
    out: list[int] = []
    kept: list = []
    while len(out) < max_tokens:
        row = np.array(logits.astype(mx.float32))
        if rows:
            kept.append(row.copy())
        tok = pick_greedy(row, prompt_ids + out, penalty)
        out.append(tok)
        if tok in stops:
            return Greedy(out, True, kept if rows else None)
        if len(out) < max_tokens:
            logits = model(mx.array([[tok]]), cache=cache)[0, -1]
    return Greedy(out, False, kept if rows else None)


def token_logprobs(model, ids: list[int], start: int):
    """Teacher forced: the log-probability (float32, as numpy) of each token of ids[start + 1:] given the tokens
    before it, from one forward pass over ids[:-1]."""
    import numpy as np

    mx = runtime.mx()
    logits = model(mx.array([ids[:-1]]))[0].astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(logp[start:], mx.array(ids[start + 1 :])[:, None], axis=-1)
    return np.array(picked[:, 0])


def next_logprobs(model, ids: list[int]):
    """The float64 log-probabilities of the token after `ids` (one forward pass; numpy)."""
    import numpy as np

    from medtune.runtimes.decoding import log_softmax

    mx = runtime.mx()
    row = model(mx.array([ids]))[0, -1].astype(mx.float32)
    return log_softmax(np.array(row)[None])[0]


def detokenize(tokenizer, toks: list[int]) -> str:
    """Text of answer tokens as mlx_lm's streaming detokenizer gives it (what `generate` returns), e.g. without
    the leading space a BPE tokenizer's first answer token carries."""
    detok = getattr(tokenizer, "detokenizer", None)
    if detok is None:
        return tokenizer.decode(toks)
    detok.reset()
    for t in toks:
        detok.add_token(t)
    detok.finalize()
    return detok.text


def messages_for(prompt: str, system: Optional[str] = None) -> list[dict]:
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt}]


def generate_many(
    model_spec: str,
    prompts: list[str],
    adapter=None,
    system: Optional[str] = None,
    on_result: Optional[Callable[[int, GenerationResult], None]] = None,
    **kw,
) -> list[GenerationResult]:
    """Load once, answer each prompt on its own (no shared history). `kw` goes to `generate`."""
    if not prompts:
        raise BadInput("no prompts to answer", hint="pass --prompt TEXT or --prompts FILE")
    model, tokenizer = load(model_spec, adapter)
    results = []
    for i, prompt in enumerate(prompts):
        res = generate(model, tokenizer, messages_for(prompt, system), **kw)
        res.prompt = prompt
        results.append(res)
        if on_result:
            on_result(i, res)
    return results
