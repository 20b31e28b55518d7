"""`medtune fuse`: an adapter merged into its base → a Hugging Face folder (medtune.fuse)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medtune.cli.options import DEFAULT_MODEL, AllowPickleOpt, JsonOpt, ModelOpt, TrustRemoteCodeOpt, emit_json, untrusted
from medtune.core.console import done, step


def fuse(
    model: ModelOpt = DEFAULT_MODEL,
    adapter: Annotated[Path, typer.Option("--adapter", "-a", help="Folder from `medtune train`.")] = Path("adapters/medtune"),
    out: Annotated[Path, typer.Option("--out", "-o", help="Fused model folder.")] = Path("models/medtune"),
    dtype: Annotated[str, typer.Option(help="auto | float32 | float16 | bfloat16. auto: MLX adapters float32 on CPU, float16 "
                                            "on a GPU; PEFT adapters (torch/unsloth) the base's 16-bit dtype, float16 for a "
                                            "float32 base.")] = "auto",
    dequantize: Annotated[bool, typer.Option("--dequantize", help="Plain weights from a quantized base (an MLX-quantized "
                                                                  "QLoRA base; PEFT adapters trained with --load-in-4bit "
                                                                  "merge into the unquantized base without it).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    as_json: JsonOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_pickle: AllowPickleOpt = False,
):
    """Merge an adapter (mlx_lm's, or a PEFT adapter from the torch/unsloth backends) into its base → a Hugging Face folder."""
    from medtune.fuse import fuse as run

    step(f"fusing {adapter} into {model}")
    with untrusted(trust_remote_code, allow_pickle):
        res = run(model, adapter, out, dtype=dtype, dequantize=dequantize, force=force)
    if as_json:
        return emit_json(res.to_dict())
    done(f"fused {res.fused_layers} layers → {res.out}")
    print(res.out)
