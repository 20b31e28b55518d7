"""`medtune export`: GGUF file(s) and an Ollama Modelfile (medtune.export), optionally created in Ollama."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from medtune.cli.options import AllowPickleOpt, JsonOpt, TrustRemoteCodeOpt, emit_json, untrusted
from medtune.core.console import done, info, step, warn


def _family_names() -> str:
    from medtune.export.modelfile import FAMILIES  # plain Python, no heavy library: the registry's names for --help

    return ", ".join(FAMILIES)


def export(
    model_dir: Annotated[Path, typer.Argument(help="Fused model folder (from `medtune fuse`).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for the GGUF files (default: MODEL_DIR).")] = None,
    name: Annotated[str, typer.Option("--name", "-n", help="Model name for files and Ollama.")] = "medtune",
    quant: Annotated[List[str], typer.Option("--quant", "-q", help="f16, f32, bf16, q8_0, q4_0 (medtune's writer); q4_k_m, "
                                                   "q4_k_s, q5_k_m, q5_k_s, q6_k, q3_k_m, q2_k (llama.cpp's quantizer). "
                                                   "Repeatable or comma-separated: -q f16,q4_k_m.")] = ["f16"],  # noqa: B006
    system: Annotated[Optional[str], typer.Option(help="SYSTEM prompt for the Modelfile (default: the one training saw).")] = None,
    modelfile: Annotated[Optional[Path], typer.Option(help="Modelfile path (default: Modelfiles/NAME.Modelfile).")] = None,
    family: Annotated[Optional[str], typer.Option("--family", metavar="NAME", help="Chat-template family of the Modelfile's "
                                                  f"TEMPLATE and stops: {_family_names()} (default: the one the "
                                                  "tokenizer's chat template renders like).")] = None,
    converter: Annotated[str, typer.Option(help="auto | medtune | llama.cpp: auto uses medtune's writer for the architectures "
                                                "it knows, llama.cpp's convert_hf_to_gguf.py for the others.")] = "auto",
    llama_cpp: Annotated[Optional[Path], typer.Option("--llama-cpp", metavar="DIR", help="A llama.cpp checkout, for its converter "
                                                      "and llama-quantize (default: $LLAMA_CPP_DIR).")] = None,
    ollama: Annotated[Optional[str], typer.Option("--ollama", metavar="NAME", help="Then create NAME in Ollama from the "
                                                  "Modelfile (as `medtune ollama create`).")] = None,
    host: Annotated[Optional[str], typer.Option("--host", metavar="URL", help="Ollama server for --ollama "
                                                "(default: $OLLAMA_HOST or http://127.0.0.1:11434).")] = None,
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
    quants = parse_quants(quant)
    if family is not None:
        from medtune.export.modelfile import get_family

        get_family(family)  # refuse an unknown name before an export that may take minutes
    if ollama:
        from medtune.ollama import check_name

        check_name(ollama)  # refuse a bad name before an export that may take minutes
    step(f"exporting {model_dir} → {out} ({', '.join(quants)})")
    with progress(transient=True) as p, untrusted(trust_remote_code, allow_pickle):
        res = run(model_dir, out, name, quants=quants, system=system, modelfile_path=modelfile, progress=p,
                  family=family, converter=converter, llama_cpp_dir=llama_cpp)
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
