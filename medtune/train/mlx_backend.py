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
import types
from functools import partial
from pathlib import Path

import numpy as np

from medtune import fsutil, runtime
from medtune.errors import BadInput
from medtune.train.options import TrainOptions, TrainResult
from medtune.train.report import MetricsLog, plot_losses

PAD_MULTIPLE = 32


def load_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise BadInput(f"invalid JSON: {exc.msg}", where=f"{path}:{n}",
                                   hint="re-run `medtune prepare`; training data must be JSON Lines") from exc
    return rows


def build_dataset(rows: list[dict], tokenizer, mask_prompt: bool, max_seq_length: int, where: Path):
    """Tokenise every record now (medtune.data.encode: the same rendering prepare checked), so that a
    bad record fails before the first step, not at 3 a.m."""
    from medtune.data import encode

    if not rows:
        raise BadInput("no records", where=str(where), hint="re-run `medtune prepare`")
    for i, row in enumerate(rows):
        try:
            encode.style_of(row)
        except ValueError as exc:
            raise BadInput(f"record has none of prompt/completion, messages, text", where=f"{where}:{i + 1}",
                           hint="re-run `medtune prepare`") from exc
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
    ntoks = mask.sum()
    return ce.sum() / ntoks, ntoks


def evaluate(model, items, batch_size: int, max_batches: int = -1) -> float:
    mx = runtime.mx()
    groups = [list(range(i, min(i + batch_size, len(items)))) for i in range(0, len(items), batch_size)]
    if max_batches > 0:
        groups = groups[:max_batches]
    total, count = 0.0, 0
    for g in groups:
        batch, lengths = make_batch(items, g)
        loss, ntoks = masked_loss(model, batch, lengths)
        mx.eval(loss, ntoks)
        total += loss.item() * ntoks.item()
        count += ntoks.item()
    return total / max(count, 1)


def load_model(model_dir: Path):
    mx = runtime.mx()
    from mlx_lm import load

    try:
        model, tokenizer = load(str(model_dir))
    except (ValueError, FileNotFoundError, KeyError) as exc:
        raise BadInput(f"mlx_lm cannot load the model: {str(exc).splitlines()[0]}", where=str(model_dir),
                       hint="check the model folder (config.json, safetensors, tokenizer)") from exc
    if runtime.on_cpu():
        model.set_dtype(mx.float32)  # bf16/fp16 matmuls are slow on MLX's CPU backend
    return model, tokenizer


def adapter_config(opts: TrainOptions, model_dir: Path, n_layers: int) -> dict:
    return {
        "fine_tune_type": "lora",
        "num_layers": n_layers,
        "lora_parameters": {"rank": opts.rank, "scale": opts.scale, "dropout": opts.dropout},
        "base_model": str(model_dir),
        "medtune": opts.to_dict(),
    }


def train(model_spec: str, data, out, opts: TrainOptions, progress=None) -> TrainResult:
    from medtune.models import pull

    mx = runtime.mx()
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers

    data, out = Path(data), Path(out)
    for name in ("train.jsonl", "valid.jsonl"):
        if not (data / name).is_file():
            raise BadInput(f"no {name} in {data}", hint="run `medtune prepare DATASET --out DIR` first and pass that DIR")
    if opts.iters < 1 or opts.batch_size < 1:
        raise BadInput("--iters and --batch-size must be at least 1", hint="e.g. --iters 100 --batch-size 4")

    model_ref = pull(model_spec)
    mx.random.seed(opts.seed)
    model, tokenizer = load_model(model_ref.path)
    train_items = build_dataset(load_jsonl(data / "train.jsonl"), tokenizer, opts.mask_prompt, opts.max_seq_length, data / "train.jsonl")
    val_items = build_dataset(load_jsonl(data / "valid.jsonl"), tokenizer, opts.mask_prompt, opts.max_seq_length, data / "valid.jsonl")
    if len(train_items) < opts.batch_size:
        raise BadInput(f"{len(train_items)} training records, fewer than --batch-size {opts.batch_size}",
                       where=str(data / "train.jsonl"), hint="lower --batch-size or add data")

    n_layers = len(model.layers) if opts.num_layers < 0 else min(opts.num_layers, len(model.layers))
    model.freeze()
    linear_to_lora_layers(model, n_layers, {"rank": opts.rank, "scale": opts.scale, "dropout": opts.dropout})
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))

    out.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out / "metrics.jsonl")
    optimizer = optim.Adam(learning_rate=opts.lr)
    loss_and_grad = nn.value_and_grad(model, masked_loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, lengths):
        (loss, ntoks), grads = loss_and_grad(model, batch, lengths)
        optimizer.update(model, grads)
        return loss, ntoks

    def save_adapter(path: Path) -> None:
        weights = dict(tree_flatten(model.trainable_parameters()))
        with fsutil.atomic_path(path) as tmp:
            mx.save_safetensors(str(tmp.with_suffix(".safetensors")), weights)
            tmp.with_suffix(".safetensors").replace(tmp)

    fsutil.write_json(out / "adapter_config.json", adapter_config(opts, model_ref.path, n_layers))
    epoch, order, pos = 0, batch_order(train_items, opts.batch_size, opts.seed, 0), 0
    first_val = val_loss = train_loss = None
    tokens_seen, t_train, t0 = 0, 0.0, time.perf_counter()
    task = progress.add_task("training", total=opts.iters, loss="-", val="-", tps="-", mem="-") if progress else None

    def run_eval(it: int):
        nonlocal val_loss, first_val
        model.eval()
        val_loss = evaluate(model, val_items, opts.batch_size, opts.val_batches)
        model.train()
        first_val = val_loss if first_val is None else first_val
        metrics.write({"step": it, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))})
        if progress:
            progress.update(task, val=f"{val_loss:.3f}")
            _log(progress, f"step {it}/{opts.iters}: train loss {train_loss if train_loss is not None else float('nan'):.3f}, "
                           f"val loss {val_loss:.3f}" + (f", {tokens_seen / t_train:.0f} tok/s" if t_train else ""))

    run_eval(0)
    model.train()
    for it in range(1, opts.iters + 1):
        if pos >= len(order):
            epoch, pos = epoch + 1, 0
            order = batch_order(train_items, opts.batch_size, opts.seed, epoch)
        batch, lengths = make_batch(train_items, order[pos])
        pos += 1
        tic = time.perf_counter()
        loss, ntoks = step(batch, lengths)
        mx.eval(state, loss, ntoks)
        dt = time.perf_counter() - tic
        t_train += dt
        train_loss, n = loss.item(), int(ntoks.item())
        tokens_seen += int(lengths[:, 1].sum().item())
        peak = mx.get_peak_memory() / 1e9
        metrics.write({"step": it, "epoch": epoch, "train_loss": train_loss, "label_tokens": n,
                       "tokens_per_second": tokens_seen / t_train, "step_seconds": dt,
                       "learning_rate": opts.lr, "peak_memory_gb": peak})
        if progress:
            progress.update(task, advance=1, loss=f"{train_loss:.3f}", tps=f"{tokens_seen / t_train:.0f}", mem=f"{peak:.2f}")
        if it % opts.steps_per_eval == 0 or it == opts.iters:
            run_eval(it)
        if it % opts.save_every == 0 and it != opts.iters:
            save_adapter(out / "checkpoints" / f"{it:07d}_adapters.safetensors")

    adapter_file = out / "adapters.safetensors"
    save_adapter(adapter_file)
    plot = plot_losses(metrics.rows, out / "loss.png", title=f"LoRA on {model_ref.spec}")
    result = TrainResult(out=out, adapter_file=adapter_file, steps=opts.iters, final_train_loss=train_loss,
                         final_val_loss=val_loss, first_val_loss=first_val,
                         tokens_per_second=tokens_seen / max(t_train, 1e-9), seconds=time.perf_counter() - t0,
                         trainable_parameters=int(trainable), total_parameters=int(total),
                         files={"adapters": str(adapter_file), "adapter_config": str(out / "adapter_config.json"),
                                "metrics": str(metrics.path), "loss_plot": str(plot) if plot else None})
    data_manifest = data / "manifest.json"
    fsutil.write_json(out / "manifest.json", {
        "stage": "train", "backend": "mlx",
        "inputs": {"model": model_ref.to_dict(), "data": str(data),
                   "data_manifest_sha256": fsutil.sha256_file(data_manifest) if data_manifest.exists() else None,
                   "train_sha256": fsutil.sha256_file(data / "train.jsonl"),
                   "valid_sha256": fsutil.sha256_file(data / "valid.jsonl")},
        "options": opts.to_dict(), "result": result.to_dict(), "versions": _versions(),
        "outputs": {"adapters.safetensors": fsutil.sha256_file(adapter_file)},
    })
    return result


def _log(progress, line: str) -> None:
    """A plain line above the bar; when stderr is not a terminal (nohup, CI) it is the only record."""
    progress.console.print(line, markup=False, highlight=False)


def _versions() -> dict:
    from medtune.data.prepare import versions

    return versions()
