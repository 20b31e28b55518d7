"""llama.cpp in process, through llama-cpp-python: load a GGUF, decode greedily, score tokens.

    llm = load_gguf("models/run/run-f16.gguf", n_ctx=2048, logits_all=True)
    out = greedy(llm, prompt_ids, 32, penalty=MODELFILE_PENALTY, end_ids={2})   # tokens, stopped (finish)
    rows = logprobs(llm, ids, start)                                             # needs logits_all=True
    lp = token_logprobs(llm, ids, start)                                         # of the tokens that follow

`greedy` picks every token itself, from the raw logits, with the same repeat-penalty rule as the MLX runtime
(medtune.runtimes.decoding), so that an F32 GGUF and the MLX model it came from give the same answer; it stops on
the GGUF's end-of-generation tokens and on `end_ids`. `logprobs` gives float64 log-softmax rows (the loss, the
multiple-choice scores, the KL divergence of quants). llama_cpp is imported inside the functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

from medtune.runtimes.decoding import Greedy, Penalty, log_softmax, pick_greedy, picked


def threads() -> int:
    """Half the logical cores (about the physical ones), at most 8: llama.cpp's threads spin while they wait, so
    one per logical core on a busy machine makes every token far slower (measured: 5-100x)."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def load_gguf(
    path: str | Path,
    n_ctx: int,
    *,
    n_threads: int | None = None,
    logits_all: bool = False,
    n_batch: int | None = None,
    purpose: str = "running GGUF files",
    lora: str | Path | None = None,
    **kwargs,
):
    """A llama_cpp.Llama on `path` (with the LoRA GGUF `lora` on top: Ollama's ADAPTER, llama.cpp's --lora). Prompt processing uses as many threads as generation (llama-cpp-python would
    take every core for it, and spinning threads on a busy machine made a 128-token batch 8x slower). Flash attention
    is on, as llama-server and llama-perplexity run by default (llama-cpp-python turns it off): the same numerics."""
    from medtune.core.errors import BadInput, require

    llama_cpp = require("llama_cpp", extra="test", purpose=purpose)
    n = n_threads or threads()
    try:
        return llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_batch or min(n_ctx, 512),
            n_ubatch=min(n_batch or n_ctx, 512),
            n_threads=n,
            n_threads_batch=n,
            logits_all=logits_all,
            seed=0,
            verbose=False,
            **{"flash_attn": True, **({"lora_path": str(lora)} if lora else {}), **kwargs},
        )
    except (ValueError, RuntimeError) as exc:
        raise BadInput(
            f"llama.cpp cannot load the GGUF: {exc}", where=str(path), hint="re-export it with `medtune export`"
        ) from exc


def greedy(
    llm,
    prompt_ids: list[int],
    max_tokens: int,
    *,
    penalty: Optional[Penalty] = None,
    end_ids: Iterable[int] = (),
    rows: bool = False,
) -> Greedy:
    """Greedy tokens after `prompt_ids`: at each step the last position's logits, `penalty` (penalty, last_n) applied
    over prompt + answer so far, the largest picked. Stops on an end-of-generation token of the GGUF or one of
    `end_ids` (kept in the tokens, as mlx_lm counts it), or after `max_tokens`. rows: keep each step's logits."""
    import llama_cpp
    import numpy as np

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llm.n_vocab()
    stops = set(end_ids)
    llm.reset()
    llm.eval(prompt_ids)
    out: list[int] = []
    kept: list = []
    while len(out) < max_tokens:
        # the last position's logits straight from the context: llm.scores only holds them with logits_all
        ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        row = np.ctypeslib.as_array(ptr, shape=(n_vocab,)).astype(np.float32)  # a copy: the next eval overwrites it
        if rows:
            kept.append(row.copy())
        tok = pick_greedy(row, prompt_ids + out, penalty)
        out.append(tok)
        if tok in stops or llama_cpp.llama_vocab_is_eog(vocab, tok):
            return Greedy(out, True, kept if rows else None)
        if len(out) < max_tokens:
            llm.eval([tok])
    return Greedy(out, False, kept if rows else None)


def logprobs(llm, ids: list[int], start: int):
    """float64 log-softmax rows for positions start..len(ids)-2, each predicting the next token of `ids` (teacher
    forced; the model must be loaded with logits_all=True)."""
    import numpy as np

    llm.reset()
    llm.eval(ids[:-1])
    return log_softmax(np.asarray(llm.scores[start : len(ids) - 1], dtype=np.float64))


def token_logprobs(llm, ids: list[int], start: int):
    """Teacher forced: the float64 log-probability of each token of ids[start + 1:] given the tokens before it
    (logits_all=True). The same operation as medtune.runtimes.mlx.token_logprobs."""
    return picked(logprobs(llm, ids, start), ids, start)


def next_logprobs(llm, ids: list[int]):
    """The float64 log-probabilities of the token after `ids`, from the last position's logits (no logits_all)."""
    import llama_cpp
    import numpy as np

    llm.reset()
    llm.eval(ids)
    row = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
    return log_softmax(np.asarray(row, dtype=np.float64)[None])[0]


def is_eog(llm):
    """A predicate: is this token one of the GGUF's end-of-generation tokens?"""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return lambda tok: bool(llama_cpp.llama_vocab_is_eog(vocab, tok))


def adds_bos(llm) -> bool:
    """Whether the GGUF says its tokenizer adds a BOS token."""
    import llama_cpp

    return bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model)))
