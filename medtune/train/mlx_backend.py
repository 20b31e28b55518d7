"""LoRA training on MLX (Apple Silicon, or CPU on Linux) through mlx_lm's Python API.

We use mlx_lm's model loading and LoRA layers, medtune.data.encode for the records (the rendering
prepare checked), and run our own short loop around them:
mlx_lm's `train()` draws its own UI, and cannot save the optimizer or data position. Our loss also
counts exactly the completion tokens as labels (mlx_lm's default mask also takes the padding slot
after the last token as a label).
"""

from __future__ import annotations

import json
import math
import time
from functools import partial
from pathlib import Path

import numpy as np

from medtune.core import fsutil, redact, runtime
from medtune.core.errors import BadInput, MedtuneError, ResourceError
from medtune.train.options import TrainOptions, TrainResult
from medtune.train.report import MetricsLog, StopOnSignal, log_validation, plot_losses

PAD_MULTIPLE = 32


def load_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise BadInput(f"not valid UTF-8 (byte {exc.start} of the line)", where=f"{path}:{n}",
                               hint="re-run `medtune prepare`, which writes UTF-8 JSON Lines") from exc
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise BadInput(f"invalid JSON: {exc.msg}", where=f"{path}:{n}",
                                   hint="re-run `medtune prepare`; training data must be JSON Lines") from exc
                if not isinstance(row, dict):
                    raise BadInput(f"line holds a JSON {type(row).__name__}, not an object", where=f"{path}:{n}",
                                   hint="re-run `medtune prepare`; each line must be one record object")
                rows.append(row)
    return rows


def check_rows(rows: list[dict], where: Path) -> None:
    """Records of a prepared file: there are some, and each has a style (no tokenizer needed)."""
    from medtune.data import encode

    if not rows:
        raise BadInput("no records", where=str(where), hint="re-run `medtune prepare`")
    for i, row in enumerate(rows):
        try:
            encode.style_of(row)
        except ValueError as exc:
            raise BadInput("record has none of prompt/completion, messages, text", where=f"{where}:{i + 1}",
                           hint="re-run `medtune prepare`") from exc


def build_dataset(rows: list[dict], tokenizer, mask_prompt: bool, max_seq_length: int, where: Path):
    """Tokenise every record now (medtune.data.encode: the same rendering prepare checked), so that a
    bad record fails before the first step, not at 3 a.m."""
    from medtune.data import encode

    check_rows(rows, where)
    try:
        items = encode.encode_all(tokenizer, rows, mask_prompt)
    except ValueError as exc:
        raise BadInput(str(exc), where=str(where), hint="re-run `medtune prepare`, which checks every record") from exc
    for i, (tokens, offset) in enumerate(items):
        if len(tokens) > max_seq_length:
            raise BadInput(f"record is {len(tokens)} tokens, over --max-seq-length {max_seq_length}: "
                           "truncating it would cut off its end token", where=f"{where}:{i + 1}",
                           hint="raise --max-seq-length, or re-run prepare with the same --max-seq-length")
        if offset >= len(tokens) - 1 and mask_prompt:
            raise BadInput("record has no completion tokens to learn from (every label is masked)",
                           where=f"{where}:{i + 1}", hint="check the record's completion")
    return items


def batch_order(items, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Length-sorted batches, shuffled per epoch with a seeded generator (reproducible, resumable)."""
    idx = sorted(range(len(items)), key=lambda i: len(items[i][0]))
    groups = [idx[i:i + batch_size] for i in range(0, len(idx) - batch_size + 1, batch_size)]
    perm = np.random.RandomState(seed + epoch).permutation(len(groups))
    return [groups[p] for p in perm]


def make_batch(items, group: list[int]):
    mx = runtime.mx()
    seqs = [items[i][0] for i in group]
    longest = max(len(s) for s in seqs)
    width = PAD_MULTIPLE * math.ceil(longest / PAD_MULTIPLE)
    arr = np.zeros((len(seqs), width), dtype=np.int32)
    for j, s in enumerate(seqs):
        arr[j, : len(s)] = s
    lengths = np.array([[items[i][1], len(items[i][0])] for i in group], dtype=np.int32)
    return mx.array(arr), mx.array(lengths)


def masked_loss(model, batch, lengths):
    """Mean cross-entropy over completion tokens only: targets at positions offset .. length-1."""
    mx = runtime.mx()
    import mlx.nn as nn

    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = model(inputs)
    pos = mx.arange(1, targets.shape[1] + 1)[None, :]  # index of each target token in the sequence
    mask = (pos >= lengths[:, 0:1]) & (pos < lengths[:, 1:2])
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), targets) * mask
    ntoks = mask.sum().astype(mx.float32)
    return ce.sum() / ntoks, ntoks


def evaluate(model, items, batch_size: int, max_batches: int = -1, world=None) -> float:
    """Mean loss over the label tokens of `items`; with several processes each takes its share of every
    batch and the sums are combined, so the result is the same as one process's."""
    mx = runtime.mx()
    rank, size = (world.rank(), world.size()) if world is not None else (0, 1)
    groups = [list(range(i, min(i + batch_size, len(items)))) for i in range(0, len(items), batch_size)]
    if max_batches > 0:
        groups = groups[:max_batches]
    total, count = mx.array(0.0), mx.array(0.0)
    for g in groups:
        mine = g[rank::size]
        if not mine:
            continue
        batch, lengths = make_batch(items, mine)
        loss, ntoks = masked_loss(model, batch, lengths)
        total = total + loss * ntoks
        count = count + ntoks
        mx.eval(total, count)
    if size > 1:
        total, count = mx.distributed.all_sum(total, stream=mx.cpu), mx.distributed.all_sum(count, stream=mx.cpu)
        mx.eval(total, count)
    return total.item() / max(count.item(), 1)


def load_model(model_dir: Path):
    mx = runtime.mx()
    from mlx_lm import load

    from medtune.core import safety
    try:
        model, tokenizer = load(str(model_dir), **safety.mlx_load_kwargs())
    except (ValueError, FileNotFoundError, KeyError, RuntimeError, OSError) as exc:  # RuntimeError: a bad safetensors
        from medtune.models.modelcheck import load_failure

        raise load_failure(model_dir, exc, "mlx_lm") from exc
    if runtime.on_cpu():
        model.set_dtype(mx.float32)  # bf16/fp16 matmuls are slow on MLX's CPU backend
    return model, tokenizer


def adapter_config(opts: TrainOptions, model_dir: Path, n_layers: int, keys: list[str] | None) -> dict:
    params = {"rank": opts.rank, "scale": opts.lora_scale, "dropout": opts.dropout}
    if keys:
        params["keys"] = keys
    return {
        "fine_tune_type": opts.fine_tune_type,
        "num_layers": n_layers,
        "lora_parameters": params,
        "base_model": str(model_dir),
        "medtune": opts.to_dict(),
    }


def resolve_target_modules(model, names: list[str] | None) -> list[str] | None:
    """Short names (q_proj) -> the module paths inside a layer (self_attn.q_proj) that mlx_lm expects."""
    if not names:
        return None
    import mlx.nn as nn

    linear = [n for n, m in model.layers[0].named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))]
    keys = []
    for name in names:
        hits = [n for n in linear if n == name or n.endswith("." + name)]
        if not hits:
            raise BadInput(f"--target-modules: no linear layer named {name!r} in this model",
                           hint=f"available: {', '.join(sorted({n.rsplit('.', 1)[-1] for n in linear}))}")
        keys += hits
    return sorted(set(keys))


def make_schedule(opts: TrainOptions, steps: int):
    import mlx.optimizers as optim

    if opts.lr_schedule == "constant" and not opts.warmup:
        return opts.lr
    decay_steps = max(1, steps - opts.warmup)
    if opts.lr_schedule == "cosine":
        main = optim.cosine_decay(opts.lr, decay_steps, 0.0)
    elif opts.lr_schedule == "linear":
        main = optim.linear_schedule(opts.lr, 0.0, decay_steps)
    else:
        main = lambda step: opts.lr  # noqa: E731
    if not opts.warmup:
        return main
    warm = optim.linear_schedule(opts.lr / (opts.warmup + 1), opts.lr, opts.warmup)  # never a zero-lr step
    return optim.join_schedules([warm, main], [opts.warmup])


# ---- memory preflight ---------------------------------------------------------------------------
def available_memory_bytes() -> tuple[int, str]:
    from medtune.core.resources import available_memory

    return available_memory()  # mlx is imported here, so on Apple Silicon this is Metal's working set


def estimate_memory(cfg: dict, total_params: int, trainable: int, param_bytes: int, batch: int, seq: int,
                    n_train_layers: int, grad_checkpoint: bool) -> dict:
    """Peak training memory, from the model config and the longest batch (bytes).

    weights + (weights, grads, 2 Adam moments) of the trainable parameters + activations of the layers
    that are back-propagated through + logits (value, softmax, gradient). Checked against measured
    peaks on SmolLM2-135M within ~10 %."""
    hidden = int(cfg.get("hidden_size", 0))
    inter = int(cfg.get("intermediate_size", 4 * hidden))
    heads = int(cfg.get("num_attention_heads", 1))
    vocab = int(cfg.get("vocab_size", 0))
    tokens = batch * seq
    per_layer = tokens * (10 * hidden + 4 * inter) * 4 + 2 * batch * heads * seq * seq * 4
    acts = per_layer * (1 if grad_checkpoint else n_train_layers)
    if grad_checkpoint:
        acts += tokens * hidden * 4 * n_train_layers
    logits = 3 * tokens * vocab * 4
    weights = total_params * param_bytes
    optimizer = trainable * 4 * 4
    return {"weights": weights, "optimizer": optimizer, "activations": acts, "logits": logits,
            "total": weights + optimizer + acts + logits}


def preflight(model, cfg: dict, opts: TrainOptions, train_items, steps: int, n_train_layers: int) -> dict:
    from mlx.utils import tree_flatten

    params = tree_flatten(model.parameters())
    total = sum(v.size for _, v in params)
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    param_bytes = max(1, int(sum(v.nbytes for _, v in params) / max(total, 1)))
    longest = max(len(t) for t, _ in train_items)
    seq = PAD_MULTIPLE * math.ceil(longest / PAD_MULTIPLE)
    est = estimate_memory(cfg, total, trainable, param_bytes, opts.batch_size, seq, n_train_layers, opts.grad_checkpoint)
    avail, source = available_memory_bytes()
    tokens_epoch = sum(len(t) for t, _ in train_items)
    return {"parameters": int(total), "trainable_parameters": int(trainable), "records": len(train_items),
            "tokens_per_epoch": int(tokens_epoch), "longest_record": int(longest), "steps": steps,
            "micro_batches": steps * opts.grad_accum,
            "epochs": round(steps * opts.grad_accum * opts.batch_size / max(len(train_items), 1), 2),
            "estimated_peak_bytes": int(est["total"]), "estimate": {k: int(v) for k, v in est.items()},
            "available_bytes": int(avail), "available_source": source}


def refuse_if_too_big(pf: dict, opts: TrainOptions) -> None:
    """Raise ResourceError when the estimate does not fit; the error carries the figures as `.preflight`."""
    need, have = pf["estimated_peak_bytes"], pf["available_bytes"]
    if need <= 0.9 * have:
        return
    tips = []
    if opts.batch_size > 1:
        tips.append(f"--batch-size 1 --grad-accum {opts.batch_size * opts.grad_accum}")
    if not opts.grad_checkpoint:
        tips.append("--grad-checkpoint")
    if opts.num_layers < 0 or opts.num_layers > 4:
        tips.append("--num-layers 4")
    tips.append(f"--max-seq-length {max(256, pf['longest_record'] // 2)} (re-run prepare with it)")
    err = ResourceError(f"training needs ~{need / 1e9:.1f} GB at its peak, {have / 1e9:.1f} GB is available "
                        f"({pf['available_source']})", hint="try " + ", ".join(tips))
    err.preflight = pf
    raise err


# ---- checkpoints --------------------------------------------------------------------------------
def checkpoint_dirs(out: Path) -> list[Path]:
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file())


def save_checkpoint(out: Path, step: int, model, optimizer, state: dict, keep: int,
                    config: dict | None = None) -> Path:
    """checkpoints/step-N: the adapter (with its adapter_config.json: the folder loads as an adapter), the
    optimizer state and where the run stands."""
    mx = runtime.mx()
    from mlx.utils import tree_flatten

    target = out / "checkpoints" / f"step-{step:07d}"
    with fsutil.atomic_dir(target) as tmp:
        mx.save_safetensors(str(tmp / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters())))
        opt = {k: v for k, v in tree_flatten(optimizer.state) if isinstance(v, mx.array)}
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), opt)
        fsutil.write_json(tmp / "state.json", {**state, "step": step})
        if config is not None:
            fsutil.write_json(tmp / "adapter_config.json", config)
    for old in checkpoint_dirs(out)[:-keep]:
        import shutil

        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(ckpt: Path, model, optimizer) -> dict:
    mx = runtime.mx()
    from mlx.utils import tree_flatten, tree_unflatten

    model.load_weights(list(mx.load(str(ckpt / "adapters.safetensors")).items()), strict=False)
    saved = mx.load(str(ckpt / "optimizer.safetensors"))
    current = dict(tree_flatten(optimizer.state))
    current.update(saved)
    optimizer.state = tree_unflatten(list(current.items()))
    return json.loads((ckpt / "state.json").read_text())


class Interrupted(MedtuneError):
    exit_code = 130


def train(model_spec: str, data, out, opts: TrainOptions, progress=None, *, resume: bool = False,
          dry_run: bool = False, on_step=None) -> TrainResult:
    """LoRA/DoRA/full fine-tuning. `on_step(step, metrics)` is called after every optimizer step."""
    from medtune.models import pull
    from medtune.models.config import read_config

    opts.check()
    data, out = Path(data), Path(out)
    for name in ("train.jsonl", "valid.jsonl"):
        if not (data / name).is_file():
            raise BadInput(f"no {name} in {data}", hint="run `medtune prepare DATASET --out DIR` first and pass that DIR")
    if opts.test and not (data / "test.jsonl").is_file():
        raise BadInput(f"--test: no test.jsonl in {data}", hint="re-run prepare with --test-ratio 0.1")
    ckpts = checkpoint_dirs(out) if resume else []
    if resume and not ckpts:
        raise BadInput(f"--resume: no checkpoint in {out / 'checkpoints'}", hint="start without --resume")

    # The data and the model folder are checked before mlx and mlx_lm are imported (seconds): a bad file fails at once.
    train_rows, val_rows = load_jsonl(data / "train.jsonl"), load_jsonl(data / "valid.jsonl")
    check_rows(train_rows, data / "train.jsonl")
    check_rows(val_rows, data / "valid.jsonl")
    model_ref = pull(model_spec)
    cfg = read_config(model_ref.path)

    mx = runtime.mx()
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.tuner.utils import linear_to_lora_layers

    mx.random.seed(opts.seed)
    model, tokenizer = load_model(model_ref.path)
    train_items = build_dataset(train_rows, tokenizer, opts.mask_prompt, opts.max_seq_length, data / "train.jsonl")
    val_items = build_dataset(val_rows, tokenizer, opts.mask_prompt, opts.max_seq_length, data / "valid.jsonl")
    if len(train_items) < opts.batch_size:
        raise BadInput(f"{len(train_items)} training records, fewer than --batch-size {opts.batch_size}",
                       where=str(data / "train.jsonl"), hint="lower --batch-size or add data")
    steps = opts.steps_for(len(train_items))
    world = mx.distributed.init()
    rank, size = world.rank(), world.size()
    if opts.batch_size % size:
        raise BadInput(f"--batch-size {opts.batch_size} is not a multiple of the {size} processes",
                       hint=f"--batch-size is the global batch: use a multiple of {size}")
    lead = rank == 0  # only the first process writes files and shows progress
    if not lead:
        progress = None

    n_layers = len(model.layers) if opts.num_layers < 0 else min(opts.num_layers, len(model.layers))
    model.freeze()
    keys = None
    if opts.fine_tune_type == "full":
        for layer in model.layers[len(model.layers) - n_layers:]:
            layer.unfreeze()
    else:
        keys = resolve_target_modules(model, opts.target_modules)
        params = {"rank": opts.rank, "scale": opts.lora_scale, "dropout": opts.dropout, **({"keys": keys} if keys else {})}
        linear_to_lora_layers(model, n_layers, params, use_dora=opts.fine_tune_type == "dora")
    if opts.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(model.layers[0])

    pf = preflight(model, cfg, opts, train_items, steps, n_layers)
    refuse_if_too_big(pf, opts)  # a dry run gives the same verdict as the run itself
    if dry_run:
        return TrainResult(out=out, adapter_file=out / "adapters.safetensors", steps=steps, final_train_loss=None,
                           final_val_loss=None, first_val_loss=None, tokens_per_second=0.0, seconds=0.0,
                           trainable_parameters=pf["trainable_parameters"], total_parameters=pf["parameters"],
                           preflight=pf)

    if lead:
        out.mkdir(parents=True, exist_ok=True)
    optimizer = optim.Adam(learning_rate=make_schedule(opts, steps))
    optimizer.init(model.trainable_parameters())
    # Where the run stands; a checkpoint holds exactly this, plus the trained weights and the optimizer.
    run = {"epoch": 0, "pos": 0, "micro": 0, "tokens_seen": 0, "t_train": 0.0, "first_val": None,
           "val_loss": None, "train_loss": None}
    start = 0
    resumed_from = None
    if ckpts:
        saved = load_checkpoint(ckpts[-1], model, optimizer)
        start = resumed_from = int(saved.pop("step"))
        run.update(saved)
        mx.eval(model.parameters(), optimizer.state)
    # Compiled after the checkpoint is loaded: compile captures these very state objects.
    loss_and_grad = nn.value_and_grad(model, masked_loss)
    state = [model.state, optimizer.state, mx.random.state]

    def combined(batch, lengths):
        """Loss and gradients of the whole (global) batch: each process's share weighted by its label
        tokens, so N processes compute exactly what one process would on the full batch."""
        (loss, ntoks), grads = loss_and_grad(model, batch, lengths)
        if size > 1:
            total = mx.distributed.all_sum(ntoks)
            weight = ntoks / total
            grads = tree_map(lambda g: mx.distributed.all_sum(g * weight), grads)
            loss, ntoks = mx.distributed.all_sum(loss * weight), total
        return loss, ntoks, grads

    @partial(mx.compile, inputs=state, outputs=state)
    def step_one(batch, lengths):
        loss, ntoks, grads = combined(batch, lengths)
        optimizer.update(model, grads)
        return loss, ntoks

    @partial(mx.compile, inputs=state, outputs=state)
    def micro(batch, lengths):
        return combined(batch, lengths)

    def save_adapter(path: Path) -> None:
        weights = dict(tree_flatten(model.trainable_parameters()))
        with fsutil.atomic_path(path) as tmp:
            mx.save_safetensors(str(tmp), weights)

    metrics = MetricsLog(out / "metrics.jsonl", truncate=not ckpts, enabled=lead)
    if ckpts:
        metrics.keep_until(start)
    # adapter_config.json is written with the final weights, not now: a killed run must not leave a finished
    # run's adapters.safetensors beside another run's config
    config = adapter_config(opts, model_ref.path, n_layers, keys)
    order = batch_order(train_items, opts.batch_size, opts.seed, run["epoch"])
    t0 = time.perf_counter()
    task = progress.add_task("training", total=steps, completed=start, loss="-", val="-", tps="-", mem="-") \
        if progress else None

    def next_batch():
        nonlocal order
        # Randomness (dropout) is reseeded from the run's position before every micro-batch: the state of the
        # generator is a function of where the run stands, so a resumed run draws exactly the same numbers.
        mx.random.seed((opts.seed * 1_000_003 + run["micro"]) * size + rank)
        mx.eval(mx.random.state)  # the compiled step takes the generator's key as an input: materialise it
        run["micro"] += 1
        if run["pos"] >= len(order):
            run["epoch"], run["pos"] = run["epoch"] + 1, 0
            order = batch_order(train_items, opts.batch_size, opts.seed, run["epoch"])
        group = order[run["pos"]][rank::size]
        run["pos"] += 1
        return make_batch(train_items, group)

    def tokens_in(lengths) -> int:
        n = lengths[:, 1].sum()
        return int((mx.distributed.all_sum(n, stream=mx.cpu) if size > 1 else n).item())

    def run_eval(it: int):
        model.eval()
        loss = evaluate(model, val_items, opts.batch_size, opts.val_batches, world)
        model.train()
        run["val_loss"] = loss
        run["first_val"] = loss if run["first_val"] is None else run["first_val"]
        metrics.write({"step": it, "val_loss": loss, "val_ppl": math.exp(min(loss, 50))})
        if progress:
            progress.update(task, val=f"{loss:.3f}")
            log_validation(progress, it, steps, run, loss)

    def checkpoint(it: int) -> Path:
        target = out / "checkpoints" / f"step-{it:07d}"
        if lead:
            save_checkpoint(out, it, model, optimizer, dict(run), opts.keep_checkpoints, config)
        return target

    stop = StopOnSignal(progress).install()

    if start == 0:
        run_eval(0)
    model.train()
    try:
        for it in range(start + 1, steps + 1):
            tic = time.perf_counter()
            if opts.grad_accum == 1:
                batch, lengths = next_batch()
                loss, ntoks = step_one(batch, lengths)
                mx.eval(state, loss, ntoks)
                n_tok, loss_v, n_lab = tokens_in(lengths), loss.item(), int(ntoks.item())
            else:
                acc, losses, n_tok, n_lab = None, 0.0, 0, 0
                for _ in range(opts.grad_accum):
                    batch, lengths = next_batch()
                    loss, ntoks, grads = micro(batch, lengths)
                    acc = grads if acc is None else tree_map(lambda a, b: a + b, acc, grads)
                    mx.eval(acc, loss, ntoks)
                    losses += loss.item()
                    n_tok += tokens_in(lengths)
                    n_lab += int(ntoks.item())
                optimizer.update(model, tree_map(lambda g: g / opts.grad_accum, acc))
                mx.eval(model.parameters(), optimizer.state)
                loss_v = losses / opts.grad_accum
            dt = time.perf_counter() - tic
            run["t_train"] += dt
            run["tokens_seen"] += n_tok
            run["train_loss"] = loss_v
            peak = mx.get_peak_memory() / 1e9
            lr = optimizer.learning_rate.item() if isinstance(optimizer.learning_rate, mx.array) else float(optimizer.learning_rate)
            row = {"step": it, "epoch": run["epoch"], "train_loss": loss_v, "label_tokens": n_lab,
                   "tokens_per_second": run["tokens_seen"] / run["t_train"], "step_seconds": dt,
                   "learning_rate": lr, "peak_memory_gb": peak}
            metrics.write(row)
            if progress:
                progress.update(task, advance=1, loss=f"{loss_v:.3f}", tps=f"{row['tokens_per_second']:.0f}", mem=f"{peak:.2f}")
            if it % opts.steps_per_eval == 0 or it == steps:
                run_eval(it)
            if it % opts.save_every == 0 and it != steps:
                checkpoint(it)
            if on_step:
                on_step(it, row)
            if stop.asked and it != steps:
                path = checkpoint(it)
                raise Interrupted(f"stopped at step {it}/{steps}; checkpoint {path}",
                                  hint=f"run the same command again to continue from this checkpoint (output folder {out})")
    finally:
        stop.restore()

    adapter_file = out / "adapters.safetensors"
    if lead:
        save_adapter(adapter_file)
        fsutil.write_json(out / "adapter_config.json", config)
    test_loss = None
    if opts.test:
        test_items = build_dataset(load_jsonl(data / "test.jsonl"), tokenizer, opts.mask_prompt, opts.max_seq_length,
                                   data / "test.jsonl")
        model.eval()
        test_loss = evaluate(model, test_items, opts.batch_size, world=world)
        metrics.write({"step": steps, "test_loss": test_loss, "test_ppl": math.exp(min(test_loss, 50))})
    plot = plot_losses(metrics.rows, out / "loss.png", title=f"{ {'lora': 'LoRA', 'dora': 'DoRA', 'full': 'Full fine-tune'}[opts.fine_tune_type]} on {model_ref.spec}") \
        if lead else None
    result = TrainResult(out=out, adapter_file=adapter_file, steps=steps, final_train_loss=run["train_loss"],
                         final_val_loss=run["val_loss"], first_val_loss=run["first_val"],
                         tokens_per_second=run["tokens_seen"] / max(run["t_train"], 1e-9),
                         seconds=time.perf_counter() - t0, trainable_parameters=pf["trainable_parameters"],
                         total_parameters=pf["parameters"], resumed_from=resumed_from, test_loss=test_loss,
                         preflight=pf,
                         files={"adapters": str(adapter_file), "adapter_config": str(out / "adapter_config.json"),
                                "metrics": str(metrics.path), "loss_plot": str(plot) if plot else None})
    if not lead:
        return result
    data_manifest = data / "manifest.json"
    redact.write_json(out / "manifest.json", {
        "stage": "train", "backend": "mlx", "processes": size,
        "inputs": {"model": model_ref.to_dict(), "data": str(data),
                   "data_manifest_sha256": fsutil.sha256_file(data_manifest) if data_manifest.exists() else None,
                   "train_sha256": fsutil.sha256_file(data / "train.jsonl"),
                   "valid_sha256": fsutil.sha256_file(data / "valid.jsonl")},
        "options": opts.to_dict(), "result": result.to_dict(), "versions": _versions(),
        "outputs": {"adapters.safetensors": fsutil.sha256_file(adapter_file)},
    })
    return result


def _versions() -> dict:
    from medtune.data.prepare import versions

    return versions()
