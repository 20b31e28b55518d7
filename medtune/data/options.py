"""The options of `medtune prepare` (medtune.data.prepare.prepare): the flags, the library's keywords and the
`prepare:` section of `medtune run`'s config all come from PrepareOptions, and PrepareOptions.check() is where their
values are judged. The modes each choice allows live here, beside the fields that take them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from medtune.core.options import option
from medtune.data import encode

STYLES = ("auto", *encode.STYLES)  # auto: picked from the records and the chat template
REASONING_MODES = ("think", "drop", "inline")
OVERLONG_MODES = ("drop", "keep", "error")
ANSWERS = ("all", "first")


@dataclass
class PrepareOptions:
    fmt: str | None = option(
        None,
        "medical-o1, alpaca, sharegpt, chat, completions, text, cmedqa2; preference pairs: preference, "
        "alpaca-preference, sharegpt-preference, preference-chat; detected from the fields if omitted.",
        flags=("--format",),
        aliases=("format",),
    )
    # a NAME=FIELD,... string, or (from the library) a dict {name: field}
    mapping: str | dict | None = option(
        None, "Rename fields: question=Q,response=A.", flags=("--map",), aliases=("map",), cli_type=Optional[str]
    )
    system: str | None = option(
        None,
        "The system prompt of every record (TEXT, or @FILE); replaces a record's own. Export, chat and eval use it "
        "by default.",
        cli_type=Optional[str],
    )
    prompt_template: str | None = option(
        None,
        'Wording of every user turn: fields by name after --map, {prompt} the turn itself, e.g. "问题：{question}'
        '\\n回答："; {{ and }} are literal braces.',
        cli_type=Optional[str],
    )
    style: str = option("auto", f"{' | '.join(STYLES)}: the records' shape.")
    reasoning: str = option("think", f"{' | '.join(REASONING_MODES)}: where the chain of thought goes.")
    valid_ratio: float = option(0.1, "Fraction for valid.jsonl.")
    test_ratio: float = option(0.0, "Fraction for test.jsonl.")
    seed: int = option(42, "Seed for the split and --sample.")
    max_seq_length: int = option(2048, "Longest record in tokens, as rendered; see --overlong.")
    overlong: str = option("drop", f"{' | '.join(OVERLONG_MODES)}: records over --max-seq-length.")
    weights: str | None = option(
        None,
        "Several DATASETs: each one's share of the mix, comma-separated (0.6,0.3,0.1); drawn without replacement, "
        "--sample examples in all (default: as many as the weights allow). Default: every example of each.",
        cli_type=Optional[str],
    )
    limit: int | None = option(None, "Use the first N examples (of each source).")
    sample: int | None = option(None, "Use N examples drawn at random (seeded).")
    answers: str = option("all", "cMedQA2: all (one example per answer) | first.")
    skip_invalid: bool = option(False, "Count and drop bad records instead of stopping.", flags=("--skip-invalid",))
    token_stats: bool = option(
        True, "Tokenize and check every record (default), or only a sample.", flags=("--token-stats/--no-token-stats",)
    )

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        """Raise BadInput, naming the flag, for a choice outside its modes, ratios outside [0, 1) or summing to 1 or
        more, or a count below 1."""
        from medtune.core.errors import BadInput

        for name, value, allowed in (
            ("--reasoning", self.reasoning, REASONING_MODES),
            ("--overlong", self.overlong, OVERLONG_MODES),
            ("--style", self.style, STYLES),
            ("--answers", self.answers, ANSWERS),
        ):
            if value not in allowed:
                raise BadInput(
                    f"{name} must be one of {', '.join(allowed)}, not {value!r}", hint=f"e.g. {name} {allowed[0]}"
                )
        v, t = self.valid_ratio, self.test_ratio
        if not (0 <= v < 1 and 0 <= t < 1 and v + t < 1):
            raise BadInput(
                "--valid-ratio and --test-ratio must be in [0, 1) and sum below 1", hint="e.g. --valid-ratio 0.1"
            )
        counts = (("--limit", self.limit), ("--sample", self.sample), ("--max-seq-length", self.max_seq_length))
        for name, value in counts:
            if value is not None and value < 1:
                raise BadInput(f"{name} must be at least 1", hint=f"e.g. {name} 1000")
