"""The `medtune` application: the root options (--debug, --version), the command areas registered, and `main`, which
turns a MedtuneError into its one line, hint and exit code."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from medtune import __version__
from medtune.core.console import console
from medtune.core.errors import MedtuneError

app = typer.Typer(
    name="medtune",
    help="Make a local medical specialist out of an open model: prepare → train → fuse → export → Ollama.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
)


def _version(value: bool):
    if value:
        print(f"medtune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
):
    if debug:
        os.environ["MEDTUNE_DEBUG"] = "1"


from medtune.cli import adapter, chat, data, doctor, eval, export, fuse, gguf, models, ollama, run, train  # noqa: E402 - light modules

for _command in (doctor.doctor, data.prepare, train.train, fuse.fuse, export.export, chat.chat, chat.generate):
    app.command()(_command)
app.command("run")(run.run)
for _name, _area in (("models", models), ("adapter", adapter), ("gguf", gguf), ("ollama", ollama), ("eval", eval)):
    app.add_typer(_area.app, name=_name)


def main() -> None:
    debug = "--debug" in sys.argv or os.environ.get("MEDTUNE_DEBUG") == "1"
    # transformers announces at import that PyTorch is absent (we only need its tokenizers): keep stderr for us.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        app()
    except MedtuneError as exc:
        if debug:
            raise
        from medtune.core.console import error

        error(exc)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if debug:
            raise
        from medtune.core.fsutil import disk_full

        full = disk_full(exc, getattr(exc, "filename", None) or ".")
        if full is not None:  # a write outside medtune's atomic writers (a library's own file)
            from medtune.core.console import error

            error(full)
            sys.exit(full.exit_code)
        from rich.markup import escape

        console.print(
            f"[bold red]error:[/] unexpected {type(exc).__name__}: {escape(str(exc).splitlines()[0] if str(exc) else '')}",
            soft_wrap=True,
        )
        console.print(
            "[dim]hint:[/] re-run with --debug for the traceback, and report it if it is a bug", soft_wrap=True
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
