"""The options of `medtune eval` (medtune.eval.evaluate.evaluate): its flags, the library's keywords and the `eval:`
section of `medtune run`'s config come from EvalOptions."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from medtune.core.options import option


@dataclass
class EvalOptions:
    max_tokens: int = option(256, "Most tokens per answer (greedy).", flags=("--max-tokens", "-n"))
    limit: int = option(8, "Held-out questions answered.")
    probes: Path | None = option(None, "Probe questions .jsonl (default: data/probes.jsonl).", cli_type=Optional[Path])
    probe_limit: int | None = option(None, "Use the first N probes.")
    choices: Path | None = option(None, "Multiple-choice .jsonl (question, options, answer).", cli_type=Optional[Path])
    fidelity_tokens: int = option(32, "Greedy tokens compared per prompt in each GGUF's fidelity check.")
    gguf_loss: bool = option(
        False,
        "Also the GGUFs' validation loss and multiple-choice accuracy (memory: context x vocabulary floats).",
        flags=("--gguf-loss",),
    )
    threads: int | None = option(None, "llama.cpp threads (default: half the cores).", aliases=("n_threads",))

    def to_dict(self) -> dict:
        return asdict(self)
