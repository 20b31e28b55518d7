"""`medtune ollama create` and `medtune ollama run`: put an exported model into Ollama and ask it.

Registered in medtune.cli.app with `app.add_typer(ollama_app, name="ollama")`. Light at import: the
`ollama` client and httpx are imported inside medtune.ollama's functions.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from medtune.cli.options import JsonOpt, emit_json

app = typer.Typer(help="Create a model in Ollama from medtune's Modelfile, and ask it questions.", no_args_is_help=True)

NameArg = Annotated[
    str, typer.Argument(metavar="NAME", help="Ollama model name, e.g. medtune-smol or medtune-smol:v1.")
]
HostOpt = Annotated[
    Optional[str],
    typer.Option("--host", metavar="URL", help="Ollama server (default: $OLLAMA_HOST, else http://127.0.0.1:11434)."),
]


@app.command("create")
def create(
    name: NameArg,
    modelfile: Annotated[
        Path, typer.Option("--modelfile", "-f", metavar="FILE", help="Modelfile from `medtune export`.")
    ],
    host: HostOpt = None,
    use_cli: Annotated[
        bool,
        typer.Option(
            "--use-cli",
            help="Run `ollama create NAME -f FILE` instead of using the "
            "HTTP API (also the fallback when no server answers).",
        ),
    ] = False,
    as_json: JsonOpt = False,
):
    """Upload the GGUF named by FROM (skipped when the server has it) and create the model."""
    from medtune.core.console import done, progress, step, warn
    from medtune.ollama import check_name, create_from_modelfile, resolve_host

    check_name(name)
    step(f"creating {name} in Ollama ({'ollama CLI' if use_cli else resolve_host(host)}) from {modelfile}")
    with progress(transient=True) as p:
        res = create_from_modelfile(name, modelfile, host=host, use_cli=use_cli, progress=p)
    for w in res["warnings"]:
        warn(w)
    if as_json:
        return emit_json(res)
    if res["method"] == "api":
        what = "uploaded" if res["uploaded"] else "already on the server"
        if res["digest"]:
            done(f"GGUF {Path(res['gguf']).name} ({res['digest'][:19]}…, {res['bytes'] / 1e6:.1f} MB): {what}")
        for a in res.get("adapters") or []:
            what = "uploaded" if a["uploaded"] else "already on the server"
            done(f"ADAPTER {Path(a['path']).name} ({a['digest'][:19]}…, {a['bytes'] / 1e6:.2f} MB): {what}")
    done(f"created {name} ({res['method']})")
    for line in res["commands"]:
        print(f"  {line}")


@app.command("run")
def run(
    name: NameArg,
    prompt: Annotated[str, typer.Option("--prompt", "-p", metavar="TEXT", help="The question.")],
    host: HostOpt = None,
    system: Annotated[
        Optional[str],
        typer.Option("--system", "-s", metavar="TEXT", help="System prompt (default: the Modelfile's SYSTEM)."),
    ] = None,
    max_tokens: Annotated[
        Optional[int], typer.Option("--max-tokens", help="Most tokens (num_predict; default: the model's).")
    ] = None,
    temp: Annotated[Optional[float], typer.Option("--temp", help="Temperature (default: the Modelfile's).")] = None,
    api: Annotated[str, typer.Option("--api", help="chat (as `ollama run`) | generate.")] = "chat",
    as_json: JsonOpt = False,
):
    """Ask the Ollama model one question; the answer goes to stdout as it streams (or --json at the end)."""
    from medtune.core.console import console, warn
    from medtune.ollama import run as ask

    streamed = []

    def show(piece: str) -> None:
        streamed.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()

    res = ask(
        name,
        prompt,
        host=host,
        system=system,
        api=api,
        options={"num_predict": max_tokens, "temperature": temp},
        on_text=None if as_json else show,
    )
    if as_json:
        return emit_json(res.to_dict())
    if streamed and not streamed[-1].endswith("\n"):
        sys.stdout.write("\n")
    console.print(f"[dim]{res.eval_count} tokens, finish {res.done_reason}[/]")
    if res.done_reason == "length":
        warn("the answer was cut off at the token limit (--max-tokens, or the Modelfile's num_predict)")
