"""`medtune run [CONFIG.yaml]`: the whole chain from one config (medtune.pipeline). Light at import."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from medtune.cli.options import JsonOpt, emit_json


def run(
    config: Annotated[
        Optional[Path],
        typer.Argument(
            metavar="[CONFIG.yaml]",
            help="Run config (default: the built-in one: embedded SmolLM2, the sample set, small settings).",
        ),
    ] = None,
    print_config: Annotated[
        bool, typer.Option("--print-config", help="Print a commented default config and exit.")
    ] = False,
    from_stage: Annotated[
        Optional[str],
        typer.Option(
            "--from",
            metavar="STAGE",
            help="Redo STAGE and the ones after it (prepare, train, fuse, export, ollama, eval; with train.steps "
            "also prepare.STEP and train.STEP; train is the first train step).",
        ),
    ] = None,
    only: Annotated[
        Optional[str], typer.Option("--only", metavar="STAGE", help="Redo just STAGE (train: every train step).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo every stage, even those that are up to date.")] = False,
    as_json: JsonOpt = False,
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            "--trust-remote-code",
            help="Let the model run the Python code it ships (as trust_remote_code: true in the config).",
        ),
    ] = False,
    allow_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-pickle",
            help="Accept pickle weights when there are no safetensors (as allow_pickle: true in the config).",
        ),
    ] = False,
):
    """prepare → train → fuse → export → ollama → eval from one YAML; stages already done are skipped, and an
    interrupted training resumes from its checkpoint. Everything lands in runs/<name>/."""
    if print_config:
        from medtune.pipeline import DEFAULT_CONFIG_TEXT

        sys.stdout.write(DEFAULT_CONFIG_TEXT)
        return
    from medtune.cli.options import untrusted
    from medtune.core.console import done, info, progress
    from medtune.pipeline import run_pipeline

    with progress() as p, untrusted(trust_remote_code, allow_pickle):
        res = run_pipeline(
            config,
            from_stage=from_stage,
            only=only,
            force=force,
            progress=p,
            log=lambda line: p.console.print(line, markup=False, highlight=False),
        )
    if as_json:
        emit_json(res)
        return
    done(f"run {res['name']}: " + ", ".join(f"{k} {v}" for k, v in res["stages"].items()))
    if res["modelfile"]:
        info(f"Modelfile: {res['modelfile']}  (ollama create {res['name']} -f {res['modelfile']})")
    if res["report"]:
        from medtune.cli.eval import show_report

        try:
            show_report(json.loads((Path(res["report"]).parent / "report.json").read_text(encoding="utf-8")))
        except (OSError, ValueError):
            pass
        info(f"report: {res['report']}")
        print(res["report"])
    else:
        print(res["root"])
