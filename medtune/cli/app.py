"""The `medtune` command line. Thin: parse options, call one library function, render the result."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from medtune import __version__
from medtune.cli.options import AllowPickleOpt, TrustRemoteCodeOpt, untrusted
from medtune.core.console import console, done, info, step, warn
from medtune.core.errors import MedtuneError, ResourceError

app = typer.Typer(
    name="medtune",
    help="Make a local medical specialist out of an open model: prepare → train → fuse → export → Ollama.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=False,
)
models_app = typer.Typer(help="Fetch and inspect models.", no_args_is_help=True)
app.add_typer(models_app, name="models")

DEFAULT_MODEL = "builtin:smollm2-135m"

# Shared option aliases.
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Folder, .gguf file, builtin:NAME, ORG/NAME (Hub) or modelscope:ORG/NAME.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


def _emit_json(obj) -> None:
    from medtune.core.redact import redact

    sys.stdout.write(json.dumps(redact(obj), indent=2, ensure_ascii=False, default=str) + "\n")


def _version(value: bool):
    if value:
        print(f"medtune {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
):
    if debug:
        os.environ["MEDTUNE_DEBUG"] = "1"


@app.command()
def doctor(as_json: JsonOpt = False):
    """Check this machine: OS, CPU/GPU, MLX device and BLAS, package versions, llama.cpp's tools, Ollama, memory, disk."""
    from medtune.core.doctor import doctor as run

    report = run()
    if as_json:
        return _emit_json(report)
    from rich.table import Table

    t = Table(show_header=False, box=None)
    t.add_row("OS", f"{report['os']}  (Python {report['python']})")
    t.add_row("CPU", f"{report['cpu']['name']}, {report['cpu']['cores']} cores")
    t.add_row("GPU", ", ".join(report["gpu"]["devices"]) or "none")
    m = report["mlx"]
    blas = m.get("blas", {})
    blas_line = "n/a" if not blas.get("wanted") else (f"OpenBLAS bound ({blas['path']})" if blas.get("active") else f"NOT bound: {blas.get('reason')}")
    t.add_row("MLX", f"{m.get('device', m.get('error'))}, float32 matmul {m.get('matmul_gflops', '?')} GFLOP/s")
    t.add_row("BLAS", blas_line)
    t.add_row("Versions", ", ".join(f"{k} {v or '—'}" for k, v in report["versions"].items()))
    for tool in report["llama_cpp"]["tools"]:
        t.add_row(tool["name"], f"{tool['path']} (llama.cpp {tool['version'] or '?'})" if tool["path"] else "not found")
    o = report["ollama"]
    t.add_row("Ollama", f"{o['host']}: " + (f"reachable, {o.get('version')}" if o["reachable"] else "not reachable"))
    mem = report["memory"]
    t.add_row("Memory", f"{mem.get('available_gb')} GB available of {mem.get('total_gb')} GB")
    for path, d in report["disk"].items():
        t.add_row("Disk", f"{d['free_gb']} GB free at {path}")
    console.print(t)
    for tip in report["advice"]:
        console.print(f"[yellow]•[/] {tip}")


@models_app.command("pull")
def models_pull(spec: Annotated[str, typer.Argument(help="Model spec.")] = DEFAULT_MODEL, as_json: JsonOpt = False,
                trust_remote_code: TrustRemoteCodeOpt = False, allow_pickle: AllowPickleOpt = False):
    """Make a model available locally and print its Hugging Face folder."""
    from medtune.core.console import progress
    from medtune.models import pull

    with progress(transient=True) as p, untrusted(trust_remote_code, allow_pickle):
        ref = pull(spec, progress=p)
    if as_json:
        return _emit_json(ref.to_dict())
    print(ref.path)


@app.command()
def prepare(
    dataset: Annotated[str, typer.Argument(help="A .json/.jsonl/.csv/.parquet file or folder, a cMedQA2 folder "
                                                "(question.csv + answer.csv), hf:ORG/NAME[:config][@split] or modelscope:ORG/NAME.")],
    model: ModelOpt = DEFAULT_MODEL,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: data/processed/<name>).")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="medical-o1, alpaca, sharegpt, chat, completions, text, "
                                                                 "cmedqa2; detected from the fields if omitted.")] = None,
    field_map: Annotated[Optional[str], typer.Option("--map", help="Rename fields: question=Q,response=A.")] = None,
    style: Annotated[str, typer.Option(help="auto | completions | chat | text: the records' shape.")] = "auto",
    reasoning: Annotated[str, typer.Option(help="think | drop | inline: where the chain of thought goes.")] = "think",
    valid_ratio: Annotated[float, typer.Option(help="Fraction for valid.jsonl.")] = 0.1,
    test_ratio: Annotated[float, typer.Option(help="Fraction for test.jsonl.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed for the split and --sample.")] = 42,
    max_seq_length: Annotated[int, typer.Option(help="Longest record in tokens, as rendered; see --overlong.")] = 2048,
    overlong: Annotated[str, typer.Option(help="drop | keep | error: records over --max-seq-length.")] = "drop",
    limit: Annotated[Optional[int], typer.Option(help="Use the first N examples.")] = None,
    sample: Annotated[Optional[int], typer.Option(help="Use N examples drawn at random (seeded).")] = None,
    answers: Annotated[str, typer.Option(help="cMedQA2: all (one example per answer) | first.")] = "all",
    skip_invalid: Annotated[bool, typer.Option("--skip-invalid", help="Count and drop bad records instead of stopping.")] = False,
    token_stats: Annotated[bool, typer.Option("--token-stats/--no-token-stats",
                                              help="Tokenize and check every record (default), or only a sample.")] = True,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check and summarise without writing.")] = False,
    as_json: JsonOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_pickle: AllowPickleOpt = False,
):
    """Convert a dataset to JSONL rendered through the model's chat template, and check every record."""
    from medtune.core.console import progress
    from medtune.data.prepare import prepare as run

    if out is None and not dry_run:
        from medtune.core.safety import safe_component

        stem = dataset.split(":", 1)[-1].rstrip("/").replace("/", "_").split("@")[0] if ":" in dataset else Path(dataset).stem
        out = Path("data/processed") / safe_component(stem, "dataset")  # never '..' or a path from the spec
    with progress(transient=True) as p, untrusted(trust_remote_code, allow_pickle):
        res = run(dataset, model, out, fmt=fmt, mapping=field_map, style=style, reasoning=reasoning,
                  valid_ratio=valid_ratio, test_ratio=test_ratio, seed=seed, max_seq_length=max_seq_length,
                  overlong=overlong, limit=limit, sample=sample, answers=answers, skip_invalid=skip_invalid,
                  token_stats=token_stats, dry_run=dry_run, progress=p)
    if as_json:
        return _emit_json(res.to_dict())
    from rich.table import Table

    c, t = res.counts, res.tokens
    table = Table(title=f"prepare: {dataset}", show_header=False, title_justify="left")
    table.add_row("format / style", f"{res.format} → {res.style}")
    table.add_row("end-of-turn token", f"{res.template['end_token']} (eos {res.template['eos_token']})")
    table.add_row("records", f"read {c['read']}, examples {c['examples']}, kept {c['kept']}")
    table.add_row("split", f"train {c['train']}, valid {c['valid']}, test {c['test']}")
    table.add_row("dropped", ", ".join(f"{k}: {v}" for k, v in c["dropped"].items()) or "none")
    if t:
        table.add_row("tokens / record", f"min {t['min']}, median {t['median']}, p95 {t['p95']}, max {t['max']}")
    console.print(table)
    for note in res.notes:
        console.print(f"[yellow]note:[/] {note}")
    if dry_run:
        from rich.panel import Panel
        from rich.text import Text

        console.print(Panel(Text(res.example.get("rendered", "")), title="first training example, as the model sees it",
                            expand=False))
    else:
        done(f"prepared data in {res.out}")
        print(res.out)


def load_config(path: Path | None, known: set[str]) -> dict:
    """A YAML file whose keys are the command's options (snake_case or dashed); unknown keys are refused."""
    if path is None:
        return {}
    from medtune.core.errors import BadInput

    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError as exc:
        raise BadInput(f"config file not found: {path}", hint="check the path") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise BadInput(f"invalid YAML: {getattr(exc, 'problem', exc)}", where=where, hint="fix the YAML syntax") from exc
    if not isinstance(data, dict):
        raise BadInput("the config must be a mapping of option: value", where=str(path), hint="e.g. iters: 200")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            import difflib

            close = difflib.get_close_matches(name, sorted(known), n=1)
            raise BadInput(f"unknown option {key!r} in the config", where=str(path),
                           hint=f"did you mean {close[0]!r}?" if close else f"known: {', '.join(sorted(known))}")
        out[name] = value
    return out


def _merge(ctx: typer.Context, config: dict, given: dict, where: str | None = None) -> dict:
    """Command-line flags win over the config file, which wins over the defaults. Config values are
    converted (and checked) like the command line's: `iters: many` is refused, naming the file."""
    from medtune.core.errors import BadInput

    params = {p.name: p for p in ctx.command.params}
    merged = dict(given)
    for name, value in config.items():
        param = params.get(name)
        if param is not None:  # checked even where a flag overrides it: the file must be right as a whole
            value = _config_value(ctx, param, name, value, where, BadInput)
        source = ctx.get_parameter_source(name)
        # by name: typer vendors its own click, whose ParameterSource is not click.core's
        if source is None or getattr(source, "name", "") == "DEFAULT":
            merged[name] = value
    return merged


def _config_value(ctx, param, name: str, value, where, BadInput):
    flag = f"--{name.replace('_', '-')}"
    if isinstance(value, list) and name == "target_modules" and all(isinstance(v, str) for v in value):
        return value
    if isinstance(value, (list, dict)):
        raise BadInput(f"option {name!r} in the config must be a single value, not a {type(value).__name__}",
                       where=where, hint=f"write it as {name}: VALUE, as {flag} VALUE would be")
    if value is None:
        if param.default is None:
            return None
        raise BadInput(f"option {name!r} in the config has no value", where=where,
                       hint=f"give it one ({name}: {param.default}) or delete the line")
    try:
        return param.process_value(ctx, value)
    except Exception as exc:  # noqa: BLE001 - click's BadParameter (typer vendors its own click)
        detail = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        raise BadInput(f"option {name!r} in the config: {detail}", where=where,
                       hint=f"the value must be what {flag} takes on the command line") from exc


@app.command()
def train(
    ctx: typer.Context,
    model: ModelOpt = DEFAULT_MODEL,
    data: Annotated[Path, typer.Option("--data", "-d", help="Folder from `medtune prepare`.")] = Path("data/processed/medical_o1_sample"),
    out: Annotated[Path, typer.Option("--out", "-o", help="Adapter output folder.")] = Path("adapters/medtune"),
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file of these options; flags win.")] = None,
    backend: Annotated[str, typer.Option(help="auto | mlx | torch | unsloth. auto: MLX on Apple Silicon (and on a CPU with mlx "
                                              "installed), Unsloth on CUDA when installed, else PyTorch + PEFT.")] = "auto",
    fine_tune_type: Annotated[str, typer.Option(help="lora | dora | full.")] = "lora",
    iters: Annotated[int, typer.Option(help="Optimizer steps.")] = 100,
    epochs: Annotated[Optional[float], typer.Option(help="Passes over the data (overrides --iters).")] = None,
    batch_size: Annotated[int, typer.Option(help="Records per micro-batch.")] = 4,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    num_layers: Annotated[int, typer.Option(help="Layers (from the top) that are trained; -1 = all.")] = 8,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha (scale = alpha / rank).")] = None,
    scale: Annotated[float, typer.Option(help="LoRA scale (when --alpha is not given).")] = 20.0,
    dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.0,
    target_modules: Annotated[Optional[str], typer.Option(help="Comma-separated, e.g. q_proj,v_proj (default: all linear).")] = None,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-4,
    lr_schedule: Annotated[str, typer.Option(help="constant | cosine | linear.")] = "constant",
    warmup: Annotated[int, typer.Option(help="Warm-up steps.")] = 0,
    max_seq_length: Annotated[int, typer.Option(help="Longest record allowed (tokens); longer ones are refused, never cut.")] = 2048,
    grad_checkpoint: Annotated[bool, typer.Option("--grad-checkpoint", help="Trade compute for memory.")] = False,
    mask_prompt: Annotated[bool, typer.Option("--mask-prompt/--no-mask-prompt", help="Loss on the answer only.")] = True,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    eval_every: Annotated[int, typer.Option(help="Steps between validation passes.")] = 50,
    val_batches: Annotated[int, typer.Option(help="Validation batches per pass; -1 = all.")] = -1,
    save_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = 100,
    keep_checkpoints: Annotated[int, typer.Option(help="Checkpoints kept (the newest).")] = 2,
    load_in_4bit: Annotated[Optional[bool], typer.Option("--load-in-4bit/--no-load-in-4bit",
                                                         help="torch/unsloth: QLoRA on a 4-bit base (bitsandbytes, CUDA); "
                                                              "default: on for models over 3B parameters on CUDA.")] = None,
    precision: Annotated[str, typer.Option(help="torch/unsloth: auto | fp32 | fp16 | bf16. auto: bf16 on Ampere and newer, "
                                                "fp16 with loss scaling before (T4), fp32 on CPU.")] = "auto",
    test: Annotated[bool, typer.Option("--test", help="Evaluate loss/perplexity on test.jsonl at the end.")] = False,
    resume: Annotated[Optional[bool], typer.Option("--resume/--fresh", help="--resume: continue from the last checkpoint "
                                                   "in --out; --fresh: discard it and start over. Default: an "
                                                   "unfinished run of the same settings in --out resumes.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Stop after the preflight (sizes, steps, memory).")] = False,
    as_json: JsonOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_pickle: AllowPickleOpt = False,
):
    """Fine-tune a model on prepared data (LoRA/DoRA/full; MLX on Apple Silicon or a Linux CPU, PyTorch/Unsloth on CUDA)."""
    from rich.progress import TextColumn

    from medtune.core.console import progress
    from medtune.train import TrainOptions, resolve_backend
    from medtune.train import train as run
    from medtune.train.options import option_names

    given = {k: v for k, v in ctx.params.items() if k not in ("config", "as_json")}
    known = option_names() | {"model", "data", "out", "eval_every", "resume", "dry_run", "backend", "trust_remote_code",
                              "allow_pickle"}
    opts_in = _merge(ctx, load_config(config, known), given, where=str(config) if config else None)
    safe_flags = {k: bool(opts_in.pop(k)) for k in ("trust_remote_code", "allow_pickle")}
    tm = opts_in.pop("target_modules")
    if isinstance(tm, str):
        tm = [x.strip() for x in tm.split(",") if x.strip()]
    model, data, out = str(opts_in.pop("model")), Path(opts_in.pop("data")), Path(opts_in.pop("out"))
    resume, dry_run = opts_in.pop("resume"), bool(opts_in.pop("dry_run"))
    resume = None if resume is None else bool(resume)
    backend = str(opts_in.pop("backend"))
    opts_in["steps_per_eval"] = opts_in.pop("eval_every")
    opts = TrainOptions(**opts_in, target_modules=tm).check()
    backend = resolve_backend(backend, opts)
    follower = int(os.environ.get("RANK", "0")) > 0  # torchrun / accelerate launch: rank 0 reports
    kind = {"lora": "LoRA", "dora": "DoRA", "full": "full fine-tuning"}[opts.fine_tune_type]
    if not follower:
        step(f"{'preflight for' if dry_run else 'training'} {kind} on {model} with {data} → {out} ({backend} backend)")
    cols = TextColumn("loss [bold]{task.fields[loss]}[/] val [bold]{task.fields[val]}[/] "
                      "{task.fields[tps]} tok/s peak {task.fields[mem]} GB")
    try:
        with progress(cols) as p, untrusted(**safe_flags):
            res = run(model, data, out, opts, backend=backend, progress=p, resume=resume, dry_run=dry_run)
    except ResourceError as exc:
        # a dry run that cannot fit: the figures, then the run's own refusal (exit 4)
        if dry_run and not follower and getattr(exc, "preflight", None):
            if as_json:
                _emit_json({"preflight": exc.preflight})
            else:
                _show_preflight(exc.preflight, notes=True)
        raise
    if follower:
        return
    if as_json:
        return _emit_json(res.to_dict())
    _show_preflight(res.preflight, notes=dry_run)
    if dry_run:
        return
    extra = f"; test loss {res.test_loss:.3f}" if res.test_loss is not None else ""
    first = f"{res.first_val_loss:.3f} → " if res.first_val_loss is not None else ""
    peak = f", peak {res.peak_memory_gb:.2f} GB" if res.peak_memory_gb is not None else ""
    done(f"trained {res.steps} steps in {res.seconds:.0f}s ({res.tokens_per_second:.0f} tok/s{peak}); "
         f"val loss {first}{res.final_val_loss:.3f}{extra}")
    info(f"adapter: {res.adapter_file}\nloss curve: {res.files.get('loss_plot')}")
    print(res.out)


def _show_preflight(pf: dict, notes: bool) -> None:
    where = ""
    if pf.get("device"):
        dev = pf["device"]
        where = (f"; {dev['name']}, {pf['precision']}" + (", 4-bit base" if pf.get("load_in_4bit") else "")
                 + (f", {pf['processes']} processes" if pf.get("processes", 1) > 1 else ""))
    info(f"parameters {pf['parameters']:,} (trainable {pf['trainable_parameters']:,}); {pf['records']} records, "
         f"{pf['tokens_per_epoch']:,} tokens per epoch; {pf['steps']} steps (~{pf['epochs']} epochs); "
         f"estimated peak {pf['estimated_peak_bytes'] / 1e9:.2f} GB of {pf['available_bytes'] / 1e9:.1f} GB available{where}")
    if notes:
        for note in pf.get("notes", []):
            info(f"note: {note}")


@app.command()
def fuse(
    model: ModelOpt = DEFAULT_MODEL,
    adapter: Annotated[Path, typer.Option("--adapter", "-a", help="Folder from `medtune train`.")] = Path("adapters/medtune"),
    out: Annotated[Path, typer.Option("--out", "-o", help="Fused model folder.")] = Path("models/medtune"),
    dtype: Annotated[str, typer.Option(help="auto | float32 | float16 | bfloat16. auto: MLX adapters float32 on CPU, float16 "
                                            "on a GPU; PEFT adapters (torch/unsloth) the base's 16-bit dtype, float16 for a "
                                            "float32 base.")] = "auto",
    dequantize: Annotated[bool, typer.Option("--dequantize", help="Plain weights from a quantized base (an MLX-quantized "
                                                                  "QLoRA base; PEFT adapters trained with --load-in-4bit "
                                                                  "merge into the unquantized base without it).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    as_json: JsonOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_pickle: AllowPickleOpt = False,
):
    """Merge an adapter (mlx_lm's, or a PEFT adapter from the torch/unsloth backends) into its base → a Hugging Face folder."""
    from medtune.fuse import fuse as run

    step(f"fusing {adapter} into {model}")
    with untrusted(trust_remote_code, allow_pickle):
        res = run(model, adapter, out, dtype=dtype, dequantize=dequantize, force=force)
    if as_json:
        return _emit_json(res.to_dict())
    done(f"fused {res.fused_layers} layers → {res.out}")
    print(res.out)


def _family_names() -> str:
    from medtune.export.modelfile import FAMILIES  # plain Python, no heavy library: the registry's names for --help

    return ", ".join(FAMILIES)


@app.command()
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
        return _emit_json({**res.to_dict(), "ollama": created})
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


from medtune.cli.chat import chat, generate  # noqa: E402 - light module: heavy imports happen inside

app.command()(chat)
app.command()(generate)
from medtune.cli.gguf import app as gguf_app  # noqa: E402 - light module, like cli_chat
app.add_typer(gguf_app, name="gguf")
from medtune.cli.ollama import app as ollama_app  # noqa: E402 - light module, like cli_chat
app.add_typer(ollama_app, name="ollama")
from medtune.cli.eval import app as eval_app  # noqa: E402 - light module, like cli_chat
app.add_typer(eval_app, name="eval")
from medtune.cli.run import run as run_command  # noqa: E402 - light module: medtune.pipeline is imported inside
app.command("run")(run_command)


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

        console.print(f"[bold red]error:[/] unexpected {type(exc).__name__}: {escape(str(exc).splitlines()[0] if str(exc) else '')}",
                      soft_wrap=True)
        console.print("[dim]hint:[/] re-run with --debug for the traceback, and report it if it is a bug", soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
