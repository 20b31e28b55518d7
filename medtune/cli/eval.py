"""`medtune eval …`: measure a model.

    medtune eval MODEL --data DIR [--base SPEC] [--gguf FILE …]   (the same as `medtune eval run MODEL …`)
    medtune eval fidelity MODEL_DIR GGUF

`run` (medtune.eval.evaluate) measures base, tuned and GGUF models side by side and writes report.json/.md/.html;
`fidelity` compares an exported GGUF with the MLX model it came from. A first argument that is not a
sub-command name is taken as MODEL for `run`, so `medtune eval MODEL` works as the short form.

Registered in medtune.cli.app with `app.add_typer(eval_app, name="eval")`. Light at import: mlx, mlx_lm and
llama_cpp are imported inside medtune.eval.fidelity's functions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from medtune.cli.options import (
    AllowPickleOpt,
    JsonOpt,
    ModelFlag,
    TrustRemoteCodeOpt,
    emit_json,
    pick_model,
    stage_options,
    untrusted,
)
from medtune.eval.options import EvalOptions


class _DefaultRun(TyperGroup):
    """`medtune eval MODEL …` (or `medtune eval --model MODEL …`) means `medtune eval run …`."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_DefaultRun,
    no_args_is_help=True,
    help="Evaluate models: `medtune eval MODEL --data DIR` (base vs tuned vs GGUF, report.html), "
    "`medtune eval fidelity MODEL_DIR GGUF`.",
)


@app.command("run")
@stage_options(EvalOptions)
def run_eval(
    opts: EvalOptions,
    model: Annotated[
        Optional[str],
        typer.Argument(metavar="MODEL", help="The tuned model: a fused folder, or a base spec with --adapter."),
    ] = None,
    model_flag: ModelFlag = None,
    data: Annotated[
        Optional[Path],
        typer.Option("--data", "-d", help="Folder from `medtune prepare` (test.jsonl, else valid.jsonl)."),
    ] = None,
    adapter: Annotated[Optional[Path], typer.Option("--adapter", "-a", help="Adapter folder applied to MODEL.")] = None,
    base: Annotated[Optional[str], typer.Option("--base", "-b", help="The base model, for comparison.")] = None,
    gguf: Annotated[
        Optional[list[Path]],
        typer.Option(
            "--gguf",
            "-g",
            help="GGUF file(s) to evaluate (repeatable); BASE.gguf+LORA.gguf: a base GGUF with a LoRA GGUF on top.",
        ),
    ] = None,
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out", "-o", help="Folder for report.json, report.md, report.html (default: runs/eval/<model name>)."
        ),
    ] = None,
    metrics: Annotated[
        Optional[Path], typer.Option("--metrics", help="metrics.jsonl for the loss curves (default: the adapter's).")
    ] = None,
    as_json: JsonOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_pickle: AllowPickleOpt = False,
):
    """Base vs tuned vs GGUF: loss, stop rate, length, think blocks, repetition, MC accuracy, fidelity, answers."""
    model = pick_model(model, model_flag)
    from medtune.core.console import done, progress, step
    from medtune.eval.evaluate import evaluate

    step(
        f"evaluating {model}"
        + (f" + {adapter}" if adapter else "")
        + (f" against {base}" if base else "")
        + (f" and {len(gguf)} GGUF(s)" if gguf else "")
    )
    if out is None:
        import re

        out = (
            Path("runs")
            / "eval"
            / (re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model.rstrip("/")).name).strip("._") or "model")
        )
    with progress(transient=True) as p, untrusted(trust_remote_code, allow_pickle):
        report = evaluate(
            model, data, opts, adapter=adapter, base=base, ggufs=gguf or [], out=out, metrics=metrics, progress=p
        )
    if as_json:
        emit_json(report)
        return
    show_report(report)
    for card in report.get("cards") or []:
        done(f"model card updated with these numbers: {card}")
    done(f"report: {report['files']['html']}")
    print(report["files"]["html"])


def show_report(report: dict) -> None:
    """The metrics table (base, tuned, each GGUF with its fidelity verdict), the quant table with its
    recommendation, and the report's notes (e.g. why a GGUF column is missing)."""
    from rich.table import Table

    from medtune.core.console import console, warn
    from medtune.eval.report_html import headings, metric_rows

    t = Table(title="medtune eval", title_justify="left")
    for h in headings():
        t.add_column(h)
    for r in metric_rows(report):
        t.add_row(*r)
    console.print(t)
    if report.get("quants"):
        _show_quants(report)
    for name in report.get("benchmarks") or {}:
        _show_bench(report, name)
    for note in report.get("notes") or []:
        warn(note)


def _show_bench(report: dict, name: str) -> None:
    """One benchmark's accuracy per subject and overall, a column per model."""
    from rich.table import Table

    from medtune.core.console import console
    from medtune.eval.report_html import bench_caption, bench_table

    heads, rows = bench_table(report, name)
    t = Table(title=bench_caption(report, name), title_justify="left")
    for h in heads:
        t.add_column(h)
    for r in rows:
        t.add_row(*r)
    console.print(t)


def _show_quants(report: dict) -> None:
    """The quant table (a report's "quants" section) and its recommendation."""
    from rich.table import Table

    from medtune.core.console import console
    from medtune.eval.report_html import QUANT_HEADINGS, quant_rows, quant_summary

    q = Table(title="quantized files (KL divergence against the unquantized file)", title_justify="left")
    for h in QUANT_HEADINGS:
        q.add_column(h)
    for r in quant_rows(report):
        q.add_row(*r)
    console.print(q)
    console.print(quant_summary(report))


@app.command("fidelity")
def fidelity(
    model_dir: Annotated[
        Path,
        typer.Argument(
            metavar="MODEL_DIR",
            help="The HF folder the GGUF was exported from (from `medtune fuse`); with --adapter, the base model.",
        ),
    ],
    gguf: Annotated[Path, typer.Argument(metavar="GGUF", help="The exported .gguf file.")],
    prompts: Annotated[
        Optional[Path],
        typer.Option(
            "--prompts",
            metavar="FILE",
            help="One prompt per line, .jsonl with "
            "a prompt/Question field, or a JSON array (default: the sample "
            "set's questions).",
        ),
    ] = None,
    tokens: Annotated[int, typer.Option("--tokens", "-n", help="Greedy tokens compared per prompt.")] = 32,
    limit: Annotated[Optional[int], typer.Option("--limit", help="Use the first N prompts.")] = None,
    tie_tolerance: Annotated[
        Optional[float],
        typer.Option(
            "--tie-tolerance",
            help="Largest top-2 logit margin "
            "excused as a near-tie (default by type: F32 0.01, F16 "
            "0.05, BF16 0.25; quantized: not judged).",
        ),
    ] = None,
    runtime: Annotated[
        str,
        typer.Option(
            "--runtime",
            help="auto (llama-server when llama.cpp's tools are found), "
            "llama-server (the engine inside Ollama ≥ 0.30: the GGUF's own chat template, "
            "no client stop strings) or llama-cpp-python (llama.cpp in process).",
        ),
    ] = "auto",
    llama_cpp: Annotated[
        Optional[Path],
        typer.Option(
            "--llama-cpp",
            metavar="DIR",
            help="A llama.cpp build with llama-server (default: $LLAMA_CPP_DIR, PATH, medtune's build).",
        ),
    ] = None,
    lora: Annotated[
        Optional[Path],
        typer.Option(
            "--lora",
            metavar="LORA_GGUF",
            help="A LoRA GGUF (medtune export ADAPTER --base …) applied on top of GGUF, the base, as Ollama's ADAPTER.",
        ),
    ] = None,
    adapter: Annotated[
        Optional[Path],
        typer.Option("--adapter", metavar="DIR", help="The adapter folder MLX applies to MODEL_DIR (not fused)."),
    ] = None,
    as_json: JsonOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_pickle: AllowPickleOpt = False,
):
    """Does the GGUF tokenize and greedily continue like the MLX model? Exit 1 if not (near-ties excused)."""
    from medtune.core.console import console, done, progress, step
    from medtune.eval.fidelity import choose_runtime, read_prompts
    from medtune.eval.fidelity import fidelity as run

    todo = read_prompts(prompts, limit=limit)
    engine = choose_runtime(runtime, llama_cpp)
    on_top = f" + {lora.name}" if lora else ""
    ref = f"{model_dir} + {adapter}" if adapter else str(model_dir)
    step(f"comparing {gguf}{on_top} in {engine} with {ref} on {len(todo)} prompt(s), {tokens} tokens each")
    with progress(transient=True) as p, untrusted(trust_remote_code, allow_pickle):
        report = run(
            model_dir,
            gguf,
            todo,
            tokens,
            tie_tolerance=tie_tolerance,
            progress=p,
            runtime=engine,
            llama_cpp_dir=llama_cpp,
            lora=lora,
            adapter=adapter,
        )
    if as_json:
        emit_json(report.to_dict())
    else:
        _show_fidelity(report, gguf)
    if not report.passed:
        bad_templates = [t for t in report.templates if not t.ok]
        what = f"{report.summary['failed']} of {len(report.prompts)} prompt(s) do not match"
        if bad_templates:
            what += f", {len(bad_templates)} conversation(s) render differently"
        console.print(
            f"[bold red]✗[/] {what}: a chat-template, tokenizer or weight mismatch in the export "
            "(see the table, or --json)"
        )
        raise typer.Exit(1)
    done(f"the GGUF matches the MLX model on {len(report.prompts)} prompt(s)")


def _show_fidelity(report, gguf: Path) -> None:
    """The template table, one row per prompt, the summary line and the notes."""
    from rich.table import Table

    from medtune.core.console import console, warn

    _template_table(report)
    t = Table(title=f"fidelity: {gguf.name} ({report.file_type}) in {report.runtime} vs MLX", title_justify="left")
    server = report.runtime == "llama-server"
    for col in ("#", *(("prompt text",) if server else ()), "tokens", "continuation", "Δlogit@1", "stops", "ok"):
        t.add_column(col, no_wrap=True)
    t.add_column("prompt", no_wrap=True, overflow="ellipsis", max_width=max(12, console.width - 66))
    for i, r in enumerate(report.prompts, start=1):
        if r.continuation_equal:
            cont = "equal"
        else:
            margin = "" if r.top2_margin is None else f" (Δ {r.top2_margin:.2g})"
            cont = f"{'[yellow]near-tie' if r.near_tie else '[red]differs'} @{r.divergence}{margin}[/]"
        rendered = (("equal" if r.rendered_equal else "[red]differs[/]"),) if server else ()
        t.add_row(
            str(i),
            *rendered,
            "equal" if r.tokens_equal else f"[red]differ @{r.first_token_mismatch}[/]",
            cont,
            f"{r.max_logit_diff:.2g}",
            f"{'y' if r.mlx_stopped else 'n'}/{'y' if r.gguf_stopped else 'n'}",
            "[green]✓[/]" if r.ok else "[red]✗[/]",
            r.prompt,
        )
    console.print(t)
    s = report.summary
    console.print(
        f"tokens equal {s['tokens_equal']}/{s['prompts']}, continuations equal "
        f"{s['continuations_equal']}/{s['prompts']} (near-ties {s['near_ties']}), stopped MLX "
        f"{s['mlx_stopped']} / GGUF {s['gguf_stopped']}, max |Δlogit| at step 1 {s['max_logit_diff']:.3g}"
        + (f", tie tolerance {report.tie_tolerance}" if report.judged else "")
    )
    for note in report.notes:
        warn(note)
    for i, r in enumerate(report.prompts, start=1):
        if r.reason:
            (warn if not r.ok else console.print)(f"prompt {i}: {r.reason}")


def _template_table(report) -> None:
    """llama-server's rendering of the structure conversations (system prompt, turns, reasoning)."""
    from medtune.core.console import console, warn

    if not report.templates:
        return
    from rich.table import Table

    t = Table(title="chat template: llama-server (the GGUF's own) vs HF apply_chat_template", title_justify="left")
    for col in ("conversation", "prompt text", "token ids", "ok"):
        t.add_column(col, no_wrap=True)
    for c in report.templates:
        t.add_row(
            c.name,
            "equal" if c.rendered_equal else "[red]differs[/]",
            "equal" if c.tokens_equal else f"[red]differ @{c.first_token_mismatch}[/]",
            "[green]✓[/]" if c.ok else "[red]✗[/]",
        )
    console.print(t)
    for c in report.templates:
        if c.render_diff:
            warn(f"{c.name}: {c.render_diff}")


@app.command("quants")
def quants(
    model_dir: Annotated[
        Path,
        typer.Argument(
            metavar="MODEL_DIR",
            help="The fused folder the GGUFs were exported from (its tokenizer tokenizes the held-out records).",
        ),
    ],
    ggufs: Annotated[
        list[Path],
        typer.Argument(
            metavar="GGUF...", help="The unquantized export (F16/F32/BF16: the reference) and the quantized ones."
        ),
    ],
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            "-d",
            help="Folder from `medtune prepare`: its held-out answers (test.jsonl, else valid.jsonl) are scored.",
        ),
    ],
    limit: Annotated[Optional[int], typer.Option("--limit", help="Use the first N held-out records.")] = None,
    max_positions: Annotated[
        int,
        typer.Option(
            "--max-positions",
            help="Most answer tokens scored (the reference's log-probs take positions x vocabulary x 4 bytes of disk).",
        ),
    ] = 4096,
    crosscheck: Annotated[
        Optional[Path],
        typer.Option(
            "--crosscheck",
            metavar="TEXT",
            help="Also run llama.cpp's "
            "llama-perplexity --kl-divergence on this text file and our code "
            "on the same chunks, and print both.",
        ),
    ] = None,
    ctx: Annotated[int, typer.Option("--ctx", help="Chunk length for --crosscheck (llama-perplexity -c).")] = 128,
    threads: Annotated[
        Optional[int], typer.Option("--threads", help="llama.cpp threads (default: half the cores).")
    ] = None,
    as_json: JsonOpt = False,
):
    """KL divergence, same-top rate and ΔPPL of each quantized GGUF against the unquantized one, teacher-forced on the
    held-out answers, with a verdict per file and the smallest good one recommended. Exit 1 if one is poor."""
    from medtune.core.console import console, done, progress, step, warn
    from medtune.core.errors import BadInput
    from medtune.eval.fidelity import gguf_file_type
    from medtune.eval.quants import REFERENCE_TYPES, heldout_sequences, judge_quants
    from medtune.eval.quants import crosscheck as run_crosscheck

    types = {g: gguf_file_type(g) for g in ggufs}
    refs = [g for g in ggufs if types[g] in REFERENCE_TYPES]
    if not refs or len(refs) == len(ggufs):
        raise BadInput(
            "pass one unquantized GGUF (F16, F32 or BF16: the reference) and at least one quantized one",
            hint="medtune export MODEL_DIR -q f16,q8_0,q4_k_m writes them",
        )
    quantized = [g for g in ggufs if g not in refs]
    step(f"judging {len(quantized)} quantized file(s) against {refs[0].name}")
    with progress(transient=True) as p:
        table = judge_quants(
            refs[0],
            quantized,
            heldout_sequences(model_dir, data, limit),
            n_threads=threads,
            max_positions=max_positions,
            progress=p,
        )
        checks = (
            [run_crosscheck(refs[0], q, crosscheck, ctx, n_threads=threads) for q in quantized] if crosscheck else []
        )
    result = {**table.to_dict(), "crosscheck": checks}
    if as_json:
        emit_json(result)
    else:
        _show_quants({"quants": result})
        for c, q in zip(checks, quantized):
            theirs, ours = c["llama_perplexity"], c["medtune"]
            console.print(
                f"cross-check {q.name} on {c['chunks']} chunks of {c['n_ctx']}: "
                + ", ".join(
                    f"{k} llama-perplexity {theirs.get(k, float('nan')):.5g} / medtune {ours[k]:.5g}"
                    for k in ("mean_kld", "p99_kld", "same_top", "ppl", "ref_ppl")
                )
            )
    poor = [r for r in table.rows if r.verdict == "poor"]
    if poor:
        warn(f"{len(poor)} file(s) are poor: " + "; ".join(f"{Path(r.file).name} ({r.why})" for r in poor))
        raise typer.Exit(1)
    done(f"{len(table.rows)} quantized file(s) within the thresholds")
