"""`medtune export`: GGUF file(s) and an Ollama Modelfile (medtune.export), optionally created in Ollama."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medtune.cli.options import AllowPickleOpt, JsonOpt, TrustRemoteCodeOpt, emit_json, stage_options, untrusted
from medtune.core.console import done, info, step, warn
from medtune.export.options import ExportOptions


@stage_options(ExportOptions)
def export(
    opts: ExportOptions,
    model_dir: Annotated[Path, typer.Argument(help="Fused model folder (from `medtune fuse`).")],
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Folder for the GGUF files (default: MODEL_DIR).")
    ] = None,
    name: Annotated[str, typer.Option("--name", "-n", help="Model name for files and Ollama.")] = "medtune",
    modelfile: Annotated[
        Optional[Path], typer.Option(help="Modelfile path (default: Modelfiles/NAME.Modelfile).")
    ] = None,
    ollama: Annotated[
        Optional[str],
        typer.Option(
            "--ollama",
            metavar="NAME",
            help="Then create NAME in Ollama from the Modelfile (as `medtune ollama create`).",
        ),
    ] = None,
    host: Annotated[
        Optional[str],
        typer.Option(
            "--host",
            metavar="URL",
            help="Ollama server for --ollama (default: $OLLAMA_HOST or http://127.0.0.1:11434).",
        ),
    ] = None,
    as_json: JsonOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_pickle: AllowPickleOpt = False,
):
    """Write GGUF file(s) and an Ollama Modelfile that renders prompts exactly like training did."""
    from medtune.core.console import progress
    from medtune.export import export as run
    from medtune.export.quantize import parse_quants

    out = out or model_dir
    modelfile = modelfile or Path("Modelfiles") / f"{name}.Modelfile"
    quants = parse_quants(opts.quant)
    if opts.family is not None:
        from medtune.export.modelfile import get_family

        get_family(opts.family)  # refuse an unknown name before an export that may take minutes
    if ollama:
        from medtune.ollama import check_name

        check_name(ollama)  # refuse a bad name before an export that may take minutes
    step(f"exporting {model_dir} → {out} ({', '.join(quants)})")
    with progress(transient=True) as p, untrusted(trust_remote_code, allow_pickle):
        res = run(model_dir, out, name, opts, modelfile_path=modelfile, progress=p)
    if not as_json:
        for w in res.warnings:  # e.g. a forced --family that renders other prompts than training saw
            warn(w)
    created = None
    if ollama:
        from medtune.ollama import create_from_modelfile

        if not as_json:
            done(f"Modelfile: {res.modelfile_path}")
            step(f"creating {ollama} in Ollama")
        with progress(transient=True) as p:
            created = create_from_modelfile(ollama, res.modelfile_path, host=host, progress=p)
    if as_json:
        return emit_json({**res.to_dict(), "ollama": created})
    if created:
        for w in created["warnings"]:
            warn(w)
        done(f"created {ollama} in Ollama ({created['method']}); try: ollama run {ollama}")
        return
    if res.converter != "medtune":
        info("converted with llama.cpp's convert_hf_to_gguf.py")
    for q, g in res.gguf_paths.items():
        done(f"GGUF ({q}): {g}")
    done(f"Modelfile: {res.modelfile_path}")
    info("[bold]To run it in Ollama:[/]")
    for line in res.ollama_commands:
        print(f"  {line}")
