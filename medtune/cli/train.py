"""`medtune train`: options from flags and a YAML file (flags win), the preflight shown, the run (medtune.train)."""

from __future__ import annotations

import os
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
from medtune.core.console import done, info, step
from medtune.core.errors import ResourceError
from medtune.core.options import config_keys, from_kwargs
from medtune.train.options import TrainOptions


def load_config(path: Path | None, known: set[str]) -> dict:
    """A YAML file whose keys are the command's options (snake_case or dashed, old spellings too); unknown keys are
    refused."""
    if path is None:
        return {}
    from medtune.core.config import check_keys, normalise_keys, read_yaml_mapping
    from medtune.core.options import aliases

    data = normalise_keys(
        read_yaml_mapping(path, missing_hint="check the path", mapping_hint="e.g. iters: 200"), aliases(TrainOptions)
    )
    check_keys(data, known, str(path))
    return data


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
        raise BadInput(
            f"option {name!r} in the config must be a single value, not a {type(value).__name__}",
            where=where,
            hint=f"write it as {name}: VALUE, as {flag} VALUE would be",
        )
    if value is None:
        if param.default is None:
            return None
        raise BadInput(
            f"option {name!r} in the config has no value",
            where=where,
            hint=f"give it one ({name}: {param.default}) or delete the line",
        )
    try:
        return param.process_value(ctx, value)
    except Exception as exc:  # noqa: BLE001 - click's BadParameter (typer vendors its own click)
        detail = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        raise BadInput(
            f"option {name!r} in the config: {detail}",
            where=where,
            hint=f"the value must be what {flag} takes on the command line",
        ) from exc


@stage_options(TrainOptions, build=False)
def train(
    ctx: typer.Context,
    model: ModelOpt = DEFAULT_MODEL,
    data: Annotated[Path, typer.Option("--data", "-d", help="Folder from `medtune prepare`.")] = Path(
        "data/processed/medical_o1_sample"
    ),
    out: Annotated[Path, typer.Option("--out", "-o", help="Adapter output folder.")] = Path("adapters/medtune"),
    config: Annotated[
        Optional[Path], typer.Option("--config", "-c", help="YAML file of these options; flags win.")
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            help="auto | mlx | torch | unsloth. auto: MLX on Apple Silicon (and on a CPU with mlx "
            "installed), Unsloth on CUDA when installed, else PyTorch + PEFT."
        ),
    ] = "auto",
    resume: Annotated[
        Optional[bool],
        typer.Option(
            "--resume/--fresh",
            help="--resume: continue from the last checkpoint "
            "in --out; --fresh: discard it and start over. Default: an "
            "unfinished run of the same settings in --out resumes.",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Stop after the preflight (sizes, steps, memory).")
    ] = False,
    as_json: JsonOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    allow_pickle: AllowPickleOpt = False,
    **fields,
):
    """Fine-tune a model on prepared data (LoRA/DoRA/full; MLX on Apple Silicon or a Linux CPU, PyTorch/Unsloth on CUDA)."""
    from rich.progress import TextColumn

    from medtune.core.console import progress
    from medtune.train import resolve_backend
    from medtune.train import train as run

    own = {p.name for p in ctx.command.params} - {"config", "as_json"}
    known = own | config_keys(TrainOptions)
    opts_in = _merge(
        ctx,
        load_config(config, known),
        {k: v for k, v in ctx.params.items() if k in own},
        where=str(config) if config else None,
    )
    safe_flags = {k: bool(opts_in.pop(k)) for k in ("trust_remote_code", "allow_pickle")}
    model, data, out = str(opts_in.pop("model")), Path(opts_in.pop("data")), Path(opts_in.pop("out"))
    resume, dry_run = opts_in.pop("resume"), bool(opts_in.pop("dry_run"))
    resume = None if resume is None else bool(resume)
    backend = str(opts_in.pop("backend"))
    opts = from_kwargs(TrainOptions, where=str(config) if config else None, **opts_in).check()
    backend = resolve_backend(backend, opts)
    follower = int(os.environ.get("RANK", "0")) > 0  # torchrun / accelerate launch: rank 0 reports
    kind = {"lora": "LoRA", "dora": "DoRA", "full": "full fine-tuning"}[opts.fine_tune_type]
    if not follower:
        step(f"{'preflight for' if dry_run else 'training'} {kind} on {model} with {data} → {out} ({backend} backend)")
    cols = TextColumn(
        "loss [bold]{task.fields[loss]}[/] val [bold]{task.fields[val]}[/] "
        "{task.fields[tps]} tok/s peak {task.fields[mem]} GB"
    )
    try:
        with progress(cols) as p, untrusted(**safe_flags):
            res = run(model, data, out, opts, backend=backend, progress=p, resume=resume, dry_run=dry_run)
    except ResourceError as exc:
        # a dry run that cannot fit: the figures, then the run's own refusal (exit 4)
        if dry_run and not follower and getattr(exc, "preflight", None):
            if as_json:
                emit_json({"preflight": exc.preflight})
            else:
                _show_preflight(exc.preflight, notes=True)
        raise
    if follower:
        return
    if as_json:
        return emit_json(res.to_dict())
    _show_preflight(res.preflight, notes=dry_run)
    if dry_run:
        return
    extra = f"; test loss {res.test_loss:.3f}" if res.test_loss is not None else ""
    first = f"{res.first_val_loss:.3f} → " if res.first_val_loss is not None else ""
    peak = f", peak {res.peak_memory_gb:.2f} GB" if res.peak_memory_gb is not None else ""
    done(
        f"trained {res.steps} steps in {res.seconds:.0f}s ({res.tokens_per_second:.0f} tok/s{peak}); "
        f"val loss {first}{res.final_val_loss:.3f}{extra}"
    )
    info(f"adapter: {res.adapter_file}\nloss curve: {res.files.get('loss_plot')}")
    print(res.out)


def _show_preflight(pf: dict, notes: bool) -> None:
    where = ""
    if pf.get("device"):
        dev = pf["device"]
        where = (
            f"; {dev['name']}, {pf['precision']}"
            + (", 4-bit base" if pf.get("load_in_4bit") else "")
            + (f", {pf['processes']} processes" if pf.get("processes", 1) > 1 else "")
        )
    info(
        f"parameters {pf['parameters']:,} (trainable {pf['trainable_parameters']:,}); {pf['records']} records, "
        f"{pf['tokens_per_epoch']:,} tokens per epoch; {pf['steps']} steps (~{pf['epochs']} epochs); "
        f"estimated peak {pf['estimated_peak_bytes'] / 1e9:.2f} GB of {pf['available_bytes'] / 1e9:.1f} GB available{where}"
    )
    if notes:
        for note in pf.get("notes", []):
            info(f"note: {note}")
