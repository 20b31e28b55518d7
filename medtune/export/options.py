"""The options of `medtune export` (medtune.export.export): its flags, the library's keywords and the `export:`
section of `medtune run`'s config come from ExportOptions."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

from medtune.core.options import option

QUANT_HELP = (
    "f16, f32, bf16, q8_0, q4_0 (medtune's writer); q4_k_m, q4_k_s, q5_k_m, q5_k_s, q6_k, q3_k_m, q2_k "
    "(llama.cpp's quantizer). Repeatable or comma-separated: -q f16,q4_k_m."
)


def _family_names() -> str:
    from medtune.export.modelfile import FAMILIES  # plain Python, no heavy library: the registry's names for --help

    return ", ".join(FAMILIES)


@dataclass
class ExportOptions:
    quant: list[str] = option(
        help=QUANT_HELP, flags=("--quant", "-q"), aliases=("quants",), cli_type=List[str], factory=lambda: ["f16"]
    )
    system: str | None = option(None, "SYSTEM prompt for the Modelfile (default: the one training saw).")
    family: str | None = option(
        None,
        f"Chat-template family of the Modelfile's TEMPLATE and stops: {_family_names()} "
        "(default: the one the tokenizer's chat template renders like).",
        flags=("--family",),
        metavar="NAME",
    )
    converter: str = option(
        "auto",
        "auto | medtune | llama.cpp: auto uses medtune's writer for the architectures it "
        "knows, llama.cpp's convert_hf_to_gguf.py for the others.",
    )
    llama_cpp: Path | None = option(
        None,
        "A llama.cpp checkout, for its converter and llama-quantize (default: $LLAMA_CPP_DIR).",
        flags=("--llama-cpp",),
        metavar="DIR",
        aliases=("llama_cpp_dir",),
        cli_type=Optional[Path],
    )

    def __post_init__(self):
        if isinstance(self.quant, str):  # a YAML file's `quant: q8_0`
            self.quant = [self.quant]

    def to_dict(self) -> dict:
        return asdict(self)
