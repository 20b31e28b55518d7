"""`medtune adapter convert`: an adapter in the other layout (mlx_lm ↔ PEFT), exactly (medtune.adapters)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medtune.cli.options import JsonOpt, emit_json

app = typer.Typer(help="LoRA adapters: move them between the Mac (mlx_lm) and CUDA (PEFT).", no_args_is_help=True)


@app.command("convert")
def convert(
    adapter: Annotated[Path, typer.Argument(metavar="ADAPTER_DIR", help="An mlx_lm or PEFT LoRA adapter folder.")],
    to: Annotated[str, typer.Option("--to", metavar="mlx|peft", help="The layout to write.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The folder for the converted adapter.")],
    base: Annotated[
        Optional[str],
        typer.Option("--base", metavar="MODEL", help="The model it was trained on (default: the one it records)."),
    ] = None,
    as_json: JsonOpt = False,
):
    """Write ADAPTER_DIR in the other layout: mlx_lm's (MLX on a Mac) or PEFT's (torch, Unsloth, TRL). The same
    weights: the converted adapter gives the same logits."""
    from medtune.adapters import convert as run
    from medtune.core.console import done

    res = run(adapter, to, out, base)
    if as_json:
        return emit_json(res)
    done(
        f"{res['from']} → {res['kind']}: {res['out']} ({res['modules']} modules in layers "
        f"{res['layers'][0]}–{res['layers'][-1]}, rank {res['rank']}, scale {res['scale']:g})"
    )
