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
    pairs: Path | None = option(
        None,
        "A prepared preference folder (or its .jsonl): its held-out pairs are scored too (preference accuracy, "
        "margin).",
        cli_type=Optional[Path],
    )
    fidelity_tokens: int = option(32, "Greedy tokens compared per prompt in each GGUF's fidelity check.")
    gguf_loss: bool = option(
        False,
        "Also the GGUFs' validation loss and multiple-choice accuracy (memory: context x vocabulary floats).",
        flags=("--gguf-loss",),
    )
    threads: int | None = option(None, "llama.cpp threads (default: half the cores).", aliases=("n_threads",))
    bench: str | None = option(
        None,
        "Medical benchmarks, comma-separated: medqa, medmcqa, pubmedqa, mmlu-medical, cmexam, ceval-medical, "
        "cmmlu-medical (read from the Hub or ModelScope, cached).",
        cli_type=Optional[str],
        metavar="NAME[,NAME]",
    )
    bench_file: str | None = option(
        None,
        "Local copies of the benchmarks: PATH (one benchmark) or NAME=PATH,NAME=PATH; a file or a folder.",
        cli_type=Optional[str],
        metavar="[NAME=]PATH",
    )
    shots: int = option(0, "Few-shot examples per benchmark question, from its dev split (C-Eval uses 5).")
    bench_limit: int | None = option(None, "At most N questions per benchmark subject (drawn with --seed).")
    seed: int = option(0, "Seed of the per-subject draw.")
    scoring: str = option(
        "loglik",
        "Benchmark scoring: loglik (the likeliest option letter; fast) or generate (answer, then parse the letter "
        "after </think>; for reasoning models).",
    )

    def to_dict(self) -> dict:
        return asdict(self)
