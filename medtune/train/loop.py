"""The one training loop, for every backend (medtune.train.backends): prepared records in, an adapter out.

It owns what is the same on MLX and PyTorch: the inputs are checked before anything heavy is loaded; the
records are tokenised and refused when a step would truncate them; the preflight gives one verdict, for a
dry run as for the run; batches come in a seeded order and the framework's generator is reseeded from the
run's position before every micro-batch, so a resumed run is the run that never stopped; validation every
--eval-every steps, a checkpoint every --save-every, Ctrl-C finishes the step, saves and exits 130;
metrics.jsonl, loss.png and the manifest. Only the first process of a distributed run writes or shows
progress. The backend does the framework's part (medtune.train.backends.base.Backend).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from medtune.core.errors import BadInput, MedtuneError, ResourceError
from medtune.train import checkpoints, preflight
from medtune.train.data import batch_order, build_dataset, build_pairs, check_rows, is_preference, load_jsonl
from medtune.train.options import TrainOptions, TrainResult
from medtune.train.report import MetricsLog, StopOnSignal, log_validation, plot_losses

KINDS = {"lora": "LoRA", "dora": "DoRA", "full": "Full fine-tune"}


class Interrupted(MedtuneError):
    """Ctrl-C (or SIGTERM) stopped the run at a step boundary, after saving a checkpoint."""

    exit_code = 130


def run(
    backend,
    model_spec: str,
    data,
    out,
    opts: TrainOptions,
    progress=None,
    *,
    resume: bool = False,
    dry_run: bool = False,
    on_step=None,
) -> TrainResult:
    """Train with `backend` (a Backend instance for `opts`). resume: continue from the last checkpoint in
    `out`; dry_run: stop after the preflight; on_step(step, metrics): called after every optimizer step."""
    from medtune.models import pull
    from medtune.models.config import read_config

    opts.check()
    data, out = Path(data), Path(out)
    ckpts = _check_inputs(data, out, opts, resume)
    backend.check_available()
    # The data and the model folder are checked before the framework loads a model: a bad file fails at once.
    rows = {name: load_jsonl(data / name) for name in ("train.jsonl", "valid.jsonl")}
    for name, found in rows.items():
        check_rows(found, data / name)
    _check_method(opts, rows, data)
    model_ref = pull(model_spec)
    cfg = read_config(model_ref.path)
    if opts.adapter is not None:
        check_init_adapter(opts, Path(opts.adapter), int(cfg.get("num_hidden_layers") or 0), backend)
    tokenizer = backend.open(model_ref, cfg)
    try:
        items = {name: _items(found, tokenizer, opts, data / name) for name, found in rows.items()}
        steps = _steps(backend, opts, items["train.jsonl"], data)
        lead = backend.rank == 0  # only the first process writes files and shows progress
        pf, done = _preflight(backend, opts, items["train.jsonl"], steps, dry_run, progress if lead else None)
        if done:
            return _dry_result(backend, out, steps, pf)
        if opts.method == "dpo":
            _references(backend, items, out, lead, progress if lead else None)
        fit = Fit(
            backend, opts, items["train.jsonl"], items["valid.jsonl"], out, steps, progress if lead else None, lead
        )
        fit.run(ckpts, on_step)
        return fit.finish(data, model_ref, tokenizer, pf)
    finally:
        backend.close()


def _check_method(opts: TrainOptions, rows: dict, data: Path) -> None:
    """--method and the prepared data agree: sft on completions, dpo/orpo on preference pairs."""
    pairs = is_preference(rows["train.jsonl"])
    if pairs and opts.method == "sft":
        raise BadInput(
            "train.jsonl holds preference pairs (prompt, chosen, rejected)",
            where=str(data / "train.jsonl"),
            hint="train them with --method dpo or --method orpo",
        )
    if not pairs and opts.method != "sft":
        raise BadInput(
            f"--method {opts.method} trains on preference pairs; train.jsonl holds prompt/completion records",
            where=str(data / "train.jsonl"),
            hint="prepare a dataset with chosen and rejected answers (medtune prepare reads them), or --method sft",
        )


def _items(rows: list[dict], tokenizer, opts: TrainOptions, where: Path):
    if opts.method == "sft":
        return build_dataset(rows, tokenizer, opts.mask_prompt, opts.max_seq_length, where)
    return build_pairs(rows, tokenizer, opts.max_seq_length, where)


def check_init_adapter(opts: TrainOptions, folder: Path, n_model: int, backend) -> None:
    """--init-adapter: the adapter decides rank, scale, layers and kind (medtune.adapters.init_shape); an option set
    to something else is refused by name. Unsloth builds its own adapter layers: refused."""
    from medtune.adapters import init_shape

    if backend.name == "unsloth":
        raise BadInput("--init-adapter is not available on the unsloth backend", hint="--backend torch or mlx")
    theirs = init_shape(folder, n_model)
    default = TrainOptions()
    mine = {
        "rank": opts.rank,
        "scale": opts.lora_scale,
        "num_layers": n_model if opts.num_layers < 0 else opts.num_layers,  # -1: all of them
        "fine_tune_type": opts.fine_tune_type,
    }
    shown = {k: f"{v:g}" if isinstance(v, float) else str(v) for k, v in theirs.items()}
    bad = [
        f"--{k.replace('_', '-')} {getattr(opts, k, mine[k])} (the adapter's: {shown[k]})"
        for k in theirs
        if theirs[k] is not None and mine[k] != theirs[k] and mine[k] != getattr(default, k, None)
    ]
    if opts.alpha is not None and theirs["scale"] is not None and abs(opts.lora_scale - theirs["scale"]) > 1e-9:
        bad.append(f"--alpha {opts.alpha} (scale {opts.lora_scale:g}; the adapter's: {theirs['scale']:g})")
    if opts.target_modules:
        bad.append(f"--target-modules {','.join(opts.target_modules)} (the adapter's modules are kept)")
    if bad:
        raise BadInput(
            f"--init-adapter {folder} fixes the adapter's shape; these options disagree: {'; '.join(bad)}",
            where=str(folder / "adapter_config.json"),
            hint="drop them: rank, scale, layers and modules are taken from the adapter",
        )


REFERENCE_FILE = "reference_logps.npz"  # DPO's reference log-probs, computed once per run and kept with it


def _references(backend, items: dict, out: Path, lead: bool, progress) -> None:
    """DPO's reference: each pair's summed completion log-probs under the model before training (its adapter
    is fresh: the base), computed once and kept in out/reference_logps.npz, so that no second copy of the
    model is held and a resumed run reads the very numbers it started with."""
    import numpy as np

    path = out / REFERENCE_FILE
    names = [n.split(".")[0] for n in items]
    if path.is_file():
        with np.load(path) as saved:
            if all(f"{n}_chosen" in saved and len(saved[f"{n}_chosen"]) == len(items[f"{n}.jsonl"]) for n in names):
                for n in names:
                    items[f"{n}.jsonl"].ref = (saved[f"{n}_chosen"], saved[f"{n}_rejected"])
                return
    task = progress.add_task("reference log-probs", total=None) if progress else None
    arrays = {}
    for n in names:
        items[f"{n}.jsonl"].ref = backend.reference_logps(items[f"{n}.jsonl"])
        arrays[f"{n}_chosen"], arrays[f"{n}_rejected"] = items[f"{n}.jsonl"].ref
    if task is not None:
        progress.remove_task(task)
    if lead:
        from medtune.core import fsutil

        out.mkdir(parents=True, exist_ok=True)
        with fsutil.atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)


def _check_inputs(data: Path, out: Path, opts: TrainOptions, resume: bool) -> list[Path]:
    """The checkpoints to resume from ([] for a fresh run), after the prepared folder is checked."""
    for name in ("train.jsonl", "valid.jsonl"):
        if not (data / name).is_file():
            raise BadInput(
                f"no {name} in {data}", hint="run `medtune prepare DATASET --out DIR` first and pass that DIR"
            )
    if opts.test and not (data / "test.jsonl").is_file():
        raise BadInput(f"--test: no test.jsonl in {data}", hint="re-run prepare with --test-ratio 0.1")
    ckpts = checkpoints.checkpoint_dirs(out) if resume else []
    if resume and not ckpts:
        raise BadInput(f"--resume: no checkpoint in {out / 'checkpoints'}", hint="start without --resume")
    return ckpts


def _steps(backend, opts: TrainOptions, train_items, data: Path) -> int:
    if len(train_items) < opts.batch_size:
        raise BadInput(
            f"{len(train_items)} training records, fewer than --batch-size {opts.batch_size}",
            where=str(data / "train.jsonl"),
            hint="lower --batch-size or add data",
        )
    if opts.batch_size % backend.size:
        raise BadInput(
            f"--batch-size {opts.batch_size} is not a multiple of the {backend.size} processes",
            hint=f"--batch-size is the global batch: use a multiple of {backend.size}",
        )
    return opts.steps_for(len(train_items))


def _preflight(backend, opts: TrainOptions, train_items, steps: int, dry_run: bool, progress) -> tuple[dict, bool]:
    """(the preflight, whether the run stops here: a dry run). A backend that can size the run before
    loading the weights is judged then (a model that cannot fit is refused in seconds, and dry runs are
    free); the model is built after, and its own figures complete the preflight."""
    pf = backend.preflight(train_items, steps, loaded=False)
    if pf is not None:
        _verdict(backend, pf, opts)
        if dry_run:
            return pf, True
    backend.build(progress)
    loaded = backend.preflight(train_items, steps, loaded=True)
    if pf is None:
        pf = loaded
        _verdict(backend, pf, opts)  # a dry run gives the same verdict as the run itself
        if dry_run:
            return pf, True
    pf.update({k: loaded[k] for k in ("parameters", "trainable_parameters", "notes") if k in loaded})
    return pf, False


def _verdict(backend, pf: dict, opts: TrainOptions) -> None:
    """Every process refuses together (their devices may differ), or none does: no process is left waiting."""
    err = preflight.refusal(pf, opts, backend.memory_tips(), backend.detailed_refusal)
    if backend.any(err is not None):
        raise err or ResourceError(
            "another process of this run cannot fit the training in its memory", hint="see the first process's message"
        )


def _dry_result(backend, out: Path, steps: int, pf: dict) -> TrainResult:
    return TrainResult(
        out=out,
        adapter_file=out / backend.adapter_file,
        steps=steps,
        final_train_loss=None,
        final_val_loss=None,
        first_val_loss=None,
        tokens_per_second=0.0,
        seconds=0.0,
        trainable_parameters=pf["trainable_parameters"],
        total_parameters=pf["parameters"],
        preflight=pf,
        backend=backend.name,
    )


class Fit:
    """One training run under way: where it stands (`state`, exactly what a checkpoint holds besides the
    backend's files), the metrics log and the progress bar."""

    def __init__(
        self, backend, opts: TrainOptions, train_items, val_items, out: Path, steps: int, progress, lead: bool
    ):
        self.backend, self.opts, self.out, self.steps = backend, opts, out, steps
        self.train_items, self.val_items = train_items, val_items
        self.progress, self.lead = progress, lead
        self.state = {
            "epoch": 0,
            "pos": 0,
            "micro": 0,
            "tokens_seen": 0,
            "t_train": 0.0,
            "first_val": None,
            "val_loss": None,
            "train_loss": None,
        }
        self.resumed_from: int | None = None
        self.metrics: MetricsLog | None = None
        self.order: list[list[int]] = []
        self.task = None
        self.t0 = 0.0

    # ---- the run -------------------------------------------------------------------------------------
    def run(self, ckpts: list[Path], on_step=None) -> None:
        """Steps from the last checkpoint in `ckpts` (or from 0) to the end; Interrupted on Ctrl-C."""
        start = self._begin(ckpts)
        stop = StopOnSignal(self.progress).install()
        if start == 0:
            self.validate(0)
        try:
            for it in range(start + 1, self.steps + 1):
                row = self.step(it)
                if it % self.opts.eval_every == 0 or it == self.steps:
                    self.validate(it)
                if it % self.opts.save_every == 0 and it != self.steps:
                    self.checkpoint(it)
                if on_step:
                    on_step(it, row)
                if self.backend.any(stop.asked) and it != self.steps:
                    path = self.checkpoint(it)
                    raise Interrupted(
                        f"stopped at step {it}/{self.steps}; checkpoint {path}",
                        hint=f"run the same command again to continue from this checkpoint (output folder {self.out})",
                    )
        finally:
            stop.restore()

    def _begin(self, ckpts: list[Path]) -> int:
        """The optimizer, the state of a resumed run, the metrics log and the bar; the first step's number - 1."""
        backend, opts = self.backend, self.opts
        if self.lead:
            self.out.mkdir(parents=True, exist_ok=True)
        backend.make_optimizer(self.steps)
        start = 0
        if ckpts:
            backend.load_checkpoint(ckpts[-1])
            saved = checkpoints.read_state(ckpts[-1])
            start = self.resumed_from = int(saved.pop("step"))
            saved.pop("backend", None)
            self.state.update(saved)
        backend.start()
        self.metrics = MetricsLog(self.out / "metrics.jsonl", truncate=not ckpts, enabled=self.lead)
        if ckpts:
            self.metrics.keep_until(start)
        self.order = batch_order(self.train_items, opts.batch_size, opts.seed, self.state["epoch"])
        self.t0 = time.perf_counter()
        if self.progress:
            self.task = self.progress.add_task(
                "training", total=self.steps, completed=start, loss="-", val="-", tps="-", mem="-"
            )
        return start

    def draw(self) -> list[int]:
        """This process's share of the next micro-batch. The generator (dropout) is reseeded from the run's
        position first: its state is a function of where the run stands, so a resumed run draws the same."""
        run, opts, backend = self.state, self.opts, self.backend
        backend.reseed((opts.seed * 1_000_003 + run["micro"]) * backend.size + backend.rank)
        run["micro"] += 1
        if run["pos"] >= len(self.order):
            run["epoch"], run["pos"] = run["epoch"] + 1, 0
            self.order = batch_order(self.train_items, opts.batch_size, opts.seed, run["epoch"])
        group = self.order[run["pos"]][backend.rank :: backend.size]
        run["pos"] += 1
        return group

    def step(self, it: int) -> dict:
        """Optimizer step `it`: the backend's update, then the metrics row (written and returned)."""
        run = self.state
        tic = time.perf_counter()
        done = self.backend.step(self.train_items, self.draw)
        dt = time.perf_counter() - tic
        run["t_train"] += dt
        run["tokens_seen"] += done.tokens
        run["train_loss"] = done.loss
        peak = self.backend.peak_memory_gb()
        row = {
            "step": it,
            "epoch": run["epoch"],
            "train_loss": done.loss,
            "label_tokens": done.label_tokens,
            "tokens_per_second": run["tokens_seen"] / run["t_train"],
            "step_seconds": dt,
            "learning_rate": done.learning_rate,
            "peak_memory_gb": peak,
        }
        if done.overflow:
            row["skipped_overflow"] = True
        row.update(done.extra)  # preference methods: reward margin, accuracy, …
        self.metrics.write(row)
        if self.progress:
            self.progress.update(
                self.task, advance=1, loss=f"{done.loss:.3f}", tps=f"{row['tokens_per_second']:.0f}", mem=f"{peak:.2f}"
            )
        return row

    def validate(self, it: int) -> None:
        run = self.state
        loss = self.backend.eval_loss(self.val_items, self.opts.val_batches)
        run["val_loss"] = loss
        run["first_val"] = loss if run["first_val"] is None else run["first_val"]
        extra = {f"val_{k}": v for k, v in getattr(self.backend, "eval_metrics", {}).items()}
        self.metrics.write({"step": it, "val_loss": loss, "val_ppl": math.exp(min(loss, 50)), **extra})
        if self.progress:
            self.progress.update(self.task, val=f"{loss:.3f}")
            log_validation(self.progress, it, self.steps, run, loss)

    def checkpoint(self, it: int) -> Path:
        if self.lead:
            checkpoints.write_checkpoint(
                self.out,
                it,
                {**self.state, **self.backend.checkpoint_state()},
                self.backend.save_checkpoint,
                self.opts.keep_checkpoints,
            )
        return checkpoints.checkpoint_dir(self.out, it)

    # ---- the outputs ---------------------------------------------------------------------------------
    def finish(self, data: Path, model_ref, tokenizer, pf: dict) -> TrainResult:
        """The adapter, the test loss (--test), loss.png, the result and (first process) the manifest."""
        backend, opts, out, run = self.backend, self.opts, self.out, self.state
        adapter_file = out / backend.adapter_file
        if self.lead:
            backend.save_adapter(out)
        test_loss = self._test_loss(data, tokenizer) if opts.test else None
        peak = backend.final_peak_memory_gb()
        title = f"{KINDS[opts.fine_tune_type]} on {model_ref.spec}{backend.title_suffix()}"
        plot = plot_losses(self.metrics.rows, out / "loss.png", title=title) if self.lead else None
        result = TrainResult(
            out=out,
            adapter_file=adapter_file,
            steps=self.steps,
            final_train_loss=run["train_loss"],
            final_val_loss=run["val_loss"],
            first_val_loss=run["first_val"],
            tokens_per_second=run["tokens_seen"] / max(run["t_train"], 1e-9),
            seconds=time.perf_counter() - self.t0,
            trainable_parameters=pf["trainable_parameters"],
            total_parameters=pf["parameters"],
            resumed_from=self.resumed_from,
            test_loss=test_loss,
            preflight=pf,
            backend=backend.name,
            peak_memory_gb=peak,
            files={
                "adapters": str(adapter_file),
                "adapter_config": str(out / "adapter_config.json"),
                "metrics": str(self.metrics.path),
                "loss_plot": str(plot) if plot else None,
            },
        )
        if self.lead:
            write_manifest(backend, out, data, model_ref, opts, result)
        return result

    def _test_loss(self, data: Path, tokenizer) -> float:
        opts = self.opts
        items = build_dataset(
            load_jsonl(data / "test.jsonl"), tokenizer, opts.mask_prompt, opts.max_seq_length, data / "test.jsonl"
        )
        loss = self.backend.eval_loss(items)
        self.metrics.write({"step": self.steps, "test_loss": loss, "test_ppl": math.exp(min(loss, 50))})
        return loss


def write_manifest(backend, out: Path, data: Path, model_ref, opts: TrainOptions, result: TrainResult) -> None:
    from medtune.core import fsutil, redact

    data_manifest = data / "manifest.json"
    redact.write_json(
        out / "manifest.json",
        {
            "stage": "train",
            "backend": backend.name,
            "processes": backend.size,
            **backend.manifest_fields(result),
            "inputs": {
                "model": model_ref.to_dict(),
                "data": str(data),
                "data_manifest_sha256": fsutil.sha256_file(data_manifest) if data_manifest.exists() else None,
                "train_sha256": fsutil.sha256_file(data / "train.jsonl"),
                "valid_sha256": fsutil.sha256_file(data / "valid.jsonl"),
            },
            "options": opts.to_dict(),
            "lineage": lineage(opts.adapter, data),
            "wording": _wording(data, opts.adapter),
            "result": result.to_dict(),
            "versions": versions(backend),
            "outputs": {backend.adapter_file: fsutil.sha256_file(result.adapter_file)},
        },
    )


def _wording(data: Path, adapter) -> dict:
    """The system prompt and prompt wording training saw (the data's; else the adapter it started from)."""
    from medtune.data.wording import training_wording

    return training_wording(data) or training_wording(adapter)


def lineage(adapter: Path | None, data: Path) -> list[dict]:
    """Where the adapter's weights come from, newest first: this run's data, then (--init-adapter) the adapter it
    started from (its weights' sha256, its data) and that adapter's own lineage, as its manifest gives it."""
    import json

    from medtune.core import fsutil

    here = {"data": str(data)}
    if adapter is None:
        return [here]
    from medtune.fuse import adapter_weights, read_adapter_config

    adapter = Path(adapter)
    weights = adapter_weights(adapter, read_adapter_config(adapter))
    try:
        before = json.loads((adapter / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        before = {}
    earlier = before.get("lineage") or [{"data": (before.get("inputs") or {}).get("data")}]
    return [{**here, "init_adapter": str(adapter), "init_adapter_sha256": fsutil.sha256_file(weights)}, *earlier]


def versions(backend) -> dict:
    """What the manifest records: prepare's packages (tokenizing, rendering) and the backend's."""
    from medtune.core.versions import versions as installed
    from medtune.data.prepare import PACKAGES

    return installed((*PACKAGES, *backend.packages))
