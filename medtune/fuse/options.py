"""The options of `medtune fuse` (medtune.fuse.fuse): its flags, the library's keywords and the `fuse:` section of
`medtune run`'s config come from FuseOptions."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from medtune.core.options import option

DTYPES = ("auto", "float32", "float16", "bfloat16")


@dataclass
class FuseOptions:
    dtype: str = option(
        "auto",
        "auto | float32 | float16 | bfloat16. auto: MLX adapters float32 on CPU, float16 on a "
        "GPU; PEFT adapters (torch/unsloth) the base's 16-bit dtype, float16 for a float32 base.",
    )
    dequantize: bool = option(
        False,
        "Plain weights from a quantized base (an MLX-quantized QLoRA base; PEFT adapters "
        "trained with --load-in-4bit merge into the unquantized base without it).",
        flags=("--dequantize",),
    )
    force: bool = option(False, "Replace an existing output folder.", flags=("--force",), config=False)

    def to_dict(self) -> dict:
        return asdict(self)
