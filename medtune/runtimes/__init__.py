"""GGUF runtimes, all llama.cpp: in process through llama-cpp-python (`load_gguf`), and llama-server, the engine
inside current Ollama (`server`); `tools` finds llama.cpp's executables."""

from __future__ import annotations

import os
from pathlib import Path


def threads() -> int:
    """Half the logical cores (about the physical ones), at most 8: llama.cpp's threads spin while they wait, so
    one per logical core on a busy machine makes every token far slower (measured: 5-100x)."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def load_gguf(path: str | Path, n_ctx: int, *, n_threads: int | None = None, logits_all: bool = False,
              n_batch: int | None = None, purpose: str = "running GGUF files", **kwargs):
    """A llama_cpp.Llama on `path`. Prompt processing uses as many threads as generation (llama-cpp-python would
    take every core for it, and spinning threads on a busy machine made a 128-token batch 8x slower). Flash attention
    is on, as llama-server and llama-perplexity run by default (llama-cpp-python turns it off): the same numerics."""
    from medtune.core.errors import BadInput, require

    llama_cpp = require("llama_cpp", extra="test", purpose=purpose)
    n = n_threads or threads()
    try:
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch or min(n_ctx, 512),
                               n_ubatch=min(n_batch or n_ctx, 512), n_threads=n, n_threads_batch=n,
                               logits_all=logits_all, seed=0, verbose=False, **{"flash_attn": True, **kwargs})
    except (ValueError, RuntimeError) as exc:
        raise BadInput(f"llama.cpp cannot load the GGUF: {exc}", where=str(path),
                       hint="re-export it with `medtune export`") from exc
