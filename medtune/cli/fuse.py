"""`medtune fuse`: an adapter merged into its base → a Hugging Face folder (medtune.fuse)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medtune.cli.options import (
    DEFAULT_MODEL,
    AllowPickleOpt,
    JsonOpt,
    ModelOpt,
    TrustRemoteCodeOpt,
    emit_json,
    stage_options,
    untrusted,
)
from medtune.core.console import done, step
from medtune.fuse.options import FuseOptions


@stage_options(FuseOptions)
def fuse(
    opts: FuseOptions,
    model: ModelOpt = DEFAULT_MODEL,
    adapter: Annotated[Path, typer.Option("--adapter", "-a", help="Folder from `medtune train`.")] = Path(
        "adapters/medtune"
    ),
    out: Annotated[Path, typer.Option("--out", "-o", help="Fused model folder.")] = Path("models/medtune"),
    as_json: JsonOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_pickle: AllowPickleOpt = False,
):
    """Merge an adapter (mlx_lm's, or a PEFT adapter from the torch/unsloth backends) into its base → a Hugging Face folder."""
    from medtune.fuse import fuse as run

    step(f"fusing {adapter} into {model}")
    with untrusted(trust_remote_code, allow_pickle):
        res = run(model, adapter, out, opts=opts)
    if as_json:
        return emit_json(res.to_dict())
    done(f"fused {res.fused_layers} layers → {res.out}")
    print(res.out)
