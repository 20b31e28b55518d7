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
    base: Annotated[
        Optional[str],
        typer.Option(
            "--base",
            metavar="MODEL",
            help="MODEL_DIR is a LoRA adapter: write it as a llama.cpp LoRA GGUF (Ollama's ADAPTER) for this base "
            "(builtin:NAME, a folder, ORG/NAME, or a .gguf used as is), beside one base GGUF shared by its adapters. Default: the base the adapter records, when that folder is here.",
        ),
    ] = None,
    base_out: Annotated[
        Optional[Path],
        typer.Option(help="With --base: folder of the shared base GGUF (default: models/base-<base name>)."),
    ] = None,
    as_json: JsonOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_pickle: AllowPickleOpt = False,
):
    """Write GGUF file(s) and an Ollama Modelfile that renders prompts exactly like training did."""
    from medtune.core.console import progress
    from medtune.export import export as run
    from medtune.export.quantize import parse_quants

    if ollama:
        from medtune.ollama import check_name

        check_name(ollama)  # refuse a bad name before an export that may take minutes
    if base is not None or (model_dir / "adapter_config.json").is_file():
        with untrusted(trust_remote_code, allow_pickle):
            return _export_adapter(opts, model_dir, base, out, name, modelfile, base_out, ollama, host, as_json)
    out = out or model_dir
    modelfile = modelfile or Path("Modelfiles") / f"{name}.Modelfile"
    quants = parse_quants(opts.quant)
    if opts.family is not None:
        from medtune.export.modelfile import get_family

        get_family(opts.family)  # refuse an unknown name before an export that may take minutes
    step(f"exporting {model_dir} → {out} ({', '.join(quants)})")
    with progress(transient=True) as p, untrusted(trust_remote_code, allow_pickle):
        res = run(model_dir, out, name, opts, modelfile_path=modelfile, progress=p)
    written = [f"GGUF ({q}): {g}" for q, g in res.gguf_paths.items()]
    if res.converter != "medtune":
        written.insert(0, "converted with llama.cpp's convert_hf_to_gguf.py")
    _finish(res, written, ollama, host, as_json)


def _export_adapter(opts: ExportOptions, adapter, base, out, name, modelfile, base_out, ollama, host, as_json):
    """`medtune export ADAPTER --base MODEL`: the shared base GGUF, the adapter GGUF and their Modelfile."""
    from medtune.core.console import progress
    from medtune.export.adapter import check_base_spec, export_adapter
    from medtune.export.quantize import WRITER_TYPES, parse_quants

    quants = parse_quants(opts.quant)
    if len(quants) != 1 or quants[0] not in WRITER_TYPES:
        raise typer.BadParameter(f"with --base, one base type: {', '.join(WRITER_TYPES)}", param_hint="--quant")
    base = check_base_spec(base, adapter)
    step(f"exporting adapter {adapter} on {base} ({quants[0]} base)")
    with progress(transient=True) as p:
        res = export_adapter(
            adapter, base, out or adapter, name, quant=quants[0], base_out=base_out,
            modelfile_path=modelfile, system=opts.system, family=opts.family, progress=p,
        )  # fmt: skip
    written = [
        f"base GGUF ({'written' if res.base_written else 'reused'}): {res.base_gguf}",
        f"adapter GGUF: {res.adapter_gguf} ({res.lora['tensors']} tensors, rank {res.lora['ranks']})",
    ]
    _finish(res, written, ollama, host, as_json)


def _finish(res, written: list[str], ollama, host, as_json: bool):
    """After either export: its warnings, --ollama's create, then --json, or what was written and how to run it."""
    if not as_json:
        for w in res.warnings:  # e.g. a forced --family, or training's wording that the GGUF does not serve
            warn(w)
    created = _create(ollama, res.modelfile_path, host, as_json) if ollama else None
    if as_json:
        return emit_json({**res.to_dict(), "ollama": created})
    if created:
        for w in created["warnings"]:
            warn(w)
        done(f"created {ollama} in Ollama ({created['method']}); try: ollama run {ollama}")
        return
    for line in written:
        done(line)
    done(f"Modelfile: {res.modelfile_path}")
    info("[bold]To run it in Ollama:[/]")
    for line in res.ollama_commands:
        print(f"  {line}")


def _create(ollama: str, modelfile: Path, host, as_json: bool) -> dict:
    """--ollama NAME: create it from the Modelfile just written (as `medtune ollama create`)."""
    from medtune.core.console import progress
    from medtune.ollama import create_from_modelfile

    if not as_json:
        done(f"Modelfile: {modelfile}")
        step(f"creating {ollama} in Ollama")
    with progress(transient=True) as p:
        return create_from_modelfile(ollama, modelfile, host=host, progress=p)
