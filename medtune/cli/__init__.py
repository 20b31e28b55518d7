"""The `medtune` command line: one module per command area over the library functions of the same names.

`app` builds the Typer application and registers the areas; `options` holds the option aliases the areas share.
Every module here stays light at import (heavy libraries are imported inside the commands): `medtune --help`
must stay fast.
"""


def main() -> None:
    """The `medtune` console script."""
    from medtune.cli.app import main as run

    run()
