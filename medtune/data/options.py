"""The options of `medtune prepare` (medtune.data.prepare.prepare): the flags, the library's keywords and the
`prepare:` section of `medtune run`'s config all come from PrepareOptions."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from medtune.core.options import option


@dataclass
class PrepareOptions:
    fmt: str | None = option(None, "medical-o1, alpaca, sharegpt, chat, completions, text, cmedqa2; detected from the "
                                   "fields if omitted.", flags=("--format",), aliases=("format",))
    mapping: str | None = option(None, "Rename fields: question=Q,response=A.", flags=("--map",), aliases=("map",))
    style: str = option("auto", "auto | completions | chat | text: the records' shape.")
    reasoning: str = option("think", "think | drop | inline: where the chain of thought goes.")
    valid_ratio: float = option(0.1, "Fraction for valid.jsonl.")
    test_ratio: float = option(0.0, "Fraction for test.jsonl.")
    seed: int = option(42, "Seed for the split and --sample.")
    max_seq_length: int = option(2048, "Longest record in tokens, as rendered; see --overlong.")
    overlong: str = option("drop", "drop | keep | error: records over --max-seq-length.")
    limit: int | None = option(None, "Use the first N examples.")
    sample: int | None = option(None, "Use N examples drawn at random (seeded).")
    answers: str = option("all", "cMedQA2: all (one example per answer) | first.")
    skip_invalid: bool = option(False, "Count and drop bad records instead of stopping.", flags=("--skip-invalid",))
    token_stats: bool = option(True, "Tokenize and check every record (default), or only a sample.",
                               flags=("--token-stats/--no-token-stats",))

    def to_dict(self) -> dict:
        return asdict(self)
