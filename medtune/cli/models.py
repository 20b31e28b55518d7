"""`medtune models pull`: make a model local (medtune.models.pull) and print its Hugging Face folder."""

from __future__ import annotations

from typing import Annotated

import typer

from medtune.cli.options import DEFAULT_MODEL, AllowPickleOpt, JsonOpt, TrustRemoteCodeOpt, emit_json, untrusted

app = typer.Typer(help="Fetch and inspect models.", no_args_is_help=True)


@app.command("pull")
def models_pull(
    spec: Annotated[str, typer.Argument(help="Model spec.")] = DEFAULT_MODEL,
    as_json: JsonOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_pickle: AllowPickleOpt = False,
):
    """Make a model available locally and print its Hugging Face folder."""
    from medtune.core.console import progress
    from medtune.models import pull

    with progress(transient=True) as p, untrusted(trust_remote_code, allow_pickle):
        ref = pull(spec, progress=p)
    if as_json:
        return emit_json(ref.to_dict())
    print(ref.path)
