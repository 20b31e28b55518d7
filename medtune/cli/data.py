"""`medtune prepare`: a dataset → checked prompt/completion JSONL (medtune.data.prepare)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

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
from medtune.core.console import console, done
from medtune.data.options import PrepareOptions


@stage_options(PrepareOptions)
def prepare(
    datasets: Annotated[
        list[str],
        typer.Argument(
            metavar="DATASET...",
            help="A .json/.jsonl/.csv/.parquet file or folder, a cMedQA2 folder "
            "(question.csv + answer.csv), hf:ORG/NAME[:config][@split] or modelscope:ORG/NAME. Several: mixed "
            "(--weights), each read with its own detected format.",
        ),
    ],
    opts: PrepareOptions,
    model: ModelOpt = DEFAULT_MODEL,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Output folder (default: data/processed/<name>).")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check and summarise without writing.")] = False,
    as_json: JsonOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_pickle: AllowPickleOpt = False,
):
    """Convert a dataset to JSONL rendered through the model's chat template, and check every record."""
    from medtune.core.console import progress
    from medtune.data.prepare import prepare as run

    dataset = datasets[0] if len(datasets) == 1 else datasets
    if out is None and not dry_run:
        from medtune.core.safety import safe_component

        stem = "+".join(_stem(d) for d in datasets)[:100]
        out = Path("data/processed") / safe_component(stem, "dataset")  # never '..' or a path from the spec
    with progress(transient=True) as p, untrusted(trust_remote_code, allow_pickle):
        res = run(dataset, model, out, opts, dry_run=dry_run, progress=p)
    if as_json:
        return emit_json(res.to_dict())
    from rich.table import Table

    c, t = res.counts, res.tokens
    table = Table(title=f"prepare: {' + '.join(datasets)}", show_header=False, title_justify="left")
    table.add_row("format / style", f"{res.format} → {res.style}")
    for s in res.sources:  # a mix: what each source gave
        weight = f"weight {s['weight']:g}, " if s["weight"] is not None else ""
        table.add_row(
            f"  {s['dataset']}",
            f"{s['format']}: {weight}{s['used']} of {s['available']} examples ({100 * s['share']:.1f}%)",
        )
    table.add_row("end-of-turn token", f"{res.template['end_token']} (eos {res.template['eos_token']})")
    table.add_row(
        "records", f"read {c['read']}, examples {c['examples']}, kept {c['kept']}" + (" pairs" if "pairs" in c else "")
    )
    table.add_row("split", f"train {c['train']}, valid {c['valid']}, test {c['test']}")
    table.add_row("dropped", ", ".join(f"{k}: {v}" for k, v in c["dropped"].items()) or "none")
    if t:
        table.add_row("tokens / record", f"min {t['min']}, median {t['median']}, p95 {t['p95']}, max {t['max']}")
    for side, st in t.get("sides", {}).items():  # preference pairs: prompt, prompt + chosen, prompt + rejected
        label = side if side == "prompt" else f"prompt + {side}"
        table.add_row(f"tokens / {label}", f"min {st['min']}, median {st['median']}, p95 {st['p95']}, max {st['max']}")
    console.print(table)
    for note in res.notes:
        console.print(f"[yellow]note:[/] {note}")
    if dry_run:
        from rich.panel import Panel
        from rich.text import Text

        console.print(
            Panel(
                Text(res.example.get("rendered", "")),
                title="first training example, as the model sees it"
                + (" (chosen)" if "rendered_rejected" in res.example else ""),
                expand=False,
            )
        )
        if "rendered_rejected" in res.example:  # preference pairs
            console.print(Panel(Text(res.example["rendered_rejected"]), title="… and its rejected side", expand=False))
    else:
        done(f"prepared data in {res.out}")
        print(res.out)


def _stem(dataset: str) -> str:
    if ":" in dataset:
        return dataset.split(":", 1)[-1].rstrip("/").replace("/", "_").split("@")[0]
    return Path(dataset).stem
