"""`medtune gguf ...`: look inside GGUF files.

Registered in medtune.cli.app with `app.add_typer(gguf_app, name="gguf")`. Nothing heavy is imported here at
module level: `medtune --help` must stay fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medtune.cli.options import JsonOpt, emit_json

app = typer.Typer(help="Look inside GGUF files.", no_args_is_help=True)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


@app.command("inspect")
def inspect(
    file: Annotated[Path, typer.Argument(metavar="FILE", help="A .gguf file.")],
    as_json: JsonOpt = False,
    tensors: Annotated[bool, typer.Option("--tensors", help="List every tensor (default: the first few).")] = False,
    head: Annotated[int, typer.Option("--head", help="Tensors listed without --tensors.")] = 8,
):
    """Metadata (architecture, context, tokenizer, chat template, file type) and a tensor summary."""
    from medtune.export import inspect_gguf

    info = inspect_gguf(file)
    if not tensors:
        info["tensors"] = info["tensors"][:head]
    if as_json:
        emit_json(info)
        return
    from rich.markup import escape

    from medtune.core.console import out

    def tok(t):
        if not t:
            return "—"
        return f"{t['id']} {t['text']!r}" if t.get("text") is not None else str(t["id"])

    ft = info["file_type"]
    first = info["chat_template_first_line"]
    rows = [
        ("architecture", info["architecture"]),
        ("name", info["name"]),
        ("file type", f"{info['file_type_name']} ({ft})" if ft is not None else "—"),
        ("size", f"{_size(info['bytes'])}, {info['n_params']:,} parameters, GGUF v{info['version']}"),
        ("context length", info["context_length"]),
        ("layers / width", f"{info['block_count']} / {info['embedding_length']}"),
        ("vocab size", info["vocab_size"]),
        ("tokenizer", f"{info['tokenizer_model']}, pre-tokenizer {info['pre_tokenizer']}"),
        ("bos / eos / eot", f"{tok(info['bos'])} / {tok(info['eos'])} / {tok(info['eot'])}; add_bos {info['add_bos']}"),
        (
            "end ids",
            ", ".join(map(str, ids))
            if isinstance(ids := info["metadata"].get("tokenizer.ggml.eos_token_ids"), list)
            else "—",
        ),
        ("chat template", f"yes: {first[:100]}{'…' if len(first) > 100 else ''}" if first else "none"),
        (
            "tensors",
            f"{info['n_tensors']}: "
            + ", ".join(
                f"{t} × {n} ({_size(info['tensor_bytes'][t])})" for t, n in sorted(info["tensor_types"].items())
            ),
        ),
    ]
    out.print(f"[bold]{escape(str(file))}[/]")
    for key, value in rows:
        out.print(f"  {key:<15} {escape(str(value))}")
    listed = info["tensors"]
    out.print(
        "[bold]tensors[/]" + ("" if tensors else f" (first {len(listed)} of {info['n_tensors']}; --tensors for all)")
    )
    width = max((len(t["name"]) for t in listed), default=4)
    for t in listed:
        shape = "×".join(map(str, t["shape"]))
        out.print(f"  {escape(t['name']):<{width}}  {shape:<14} {t['type']:<6} {_size(t['bytes']):>11}")
