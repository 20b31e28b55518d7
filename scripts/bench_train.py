#!/usr/bin/env python
"""Benchmark medtune's LoRA trainer against `mlx_lm.lora` run by hand, on the same model, data and settings.

Three runs, each in its own fresh Python process so that which BLAS MLX binds is decided cleanly:
  (a) mlx_lm     mlx_lm.lora as a user runs it by hand: MLX's bundled reference BLAS (no OpenBLAS).
                 Not scraped from stdout: a small driver does what `mlx_lm.lora.run()` does (seed numpy,
                 load, load_dataset, train_model) but passes a training_callback, so this is the very
                 code path of the CLI (model loading, datasets, LoRA layers, optimizer, trainer.train).
                 The same settings a user would type:
                   mlx_lm lora --model DIR --train --data DIR --iters N --batch-size 2 --num-layers 8
                     --max-seq-length 512 --learning-rate 1e-4 --mask-prompt --seed 0 --adapter-path OUT
                     --steps-per-report 1 --val-batches 1 --steps-per-eval 100000 -c lora.yaml
                 (lora.yaml: lora_parameters {rank: 8, scale: 20, dropout: 0}, which are also mlx_lm's
                 defaults). --cli-check also runs that real command and parses its report lines, as a
                 cross-check of mlx_lm's own figure only.
  (b) medtune    medtune.train.train with MEDTUNE_NO_OPENBLAS=1: the same BLAS as (a), so (b)/(a)
                 compares the trainers themselves.
  (c) medtune+   medtune.train.train as it runs by default on Linux (OpenBLAS bound before mlx).
  (d) mlx_lm+    optional (--runs a,b,c,d): mlx_lm's driver with OpenBLAS loaded the way medtune does it,
                 to compare the trainers at the fast BLAS too.
Every child reports which BLAS libraries are really mapped into it (/proc/self/maps): (a) and (b)
must show none, (c) and (d) libopenblas; the table says so and a mismatch is flagged.

How tokens are counted (the same for every run):
  tokens of a step = sum over the batch's sequences of their full token length (chat-template
  prompt + completion, unpadded; nothing here is truncated: prepare drops records over
  --max-seq-length). That is what medtune's metrics count (tokens_per_second in metrics.jsonl is
  cumulative: tokens so far / step time so far, with tokens = sum of the sequence lengths).
  mlx_lm's own tokens_per_second counts something else: the loss-mask tokens, i.e. with
  --mask-prompt only the completion tokens plus one padding slot per sequence (its mask takes the
  position after the last token). So for (a)/(d) the driver records the lengths of every batch its
  iterator hands to trainer.train (a pass-through wrapper around mlx_lm's own iterate_batches) and
  converts; mlx_lm's native figure is kept as `native_tokens_per_second` for reference.
  step time = each trainer's own step timer: from just before the compiled step to after mx.eval of
  its results (mlx_lm: train_time with --steps-per-report 1, i.e. 1/iterations_per_second; it
  excludes validation. medtune: step_seconds, recovered from metrics.jsonl's per-step rows).
  tokens/s = sum(tokens of steps W+1..N) / sum(step times of steps W+1..N), with W = --warmup (2)
  steps skipped: the first steps trace and compile the step function for new shapes and warm the
  allocator.
  wall tokens/s (cross-check, not the headline) = tokens of steps W+1..N-1 / wall time between the
  reports of steps W and N-1 (includes batch building, logging and UI; step N is left out because
  mlx_lm validates just before its last step).
Peak memory: MLX's peak allocation (mx.get_peak_memory, what both trainers report per step:
  mlx_lm's peak_memory, medtune's peak_memory_gb) and the child process's peak RSS (ru_maxrss).

Caveats kept in view (also printed): the two trainers do not see the same batches. Both draw
batch_size-record groups and shuffle them with the seed, but medtune groups records of similar
length (sorted) while mlx_lm 0.32's CacheDataset.itemlen returns the size of the raw record dict,
so its "sort by length" keeps file order and pairs unrelated records (more padding per real token).
Batch widths: mlx_lm pads to 1 + a multiple of 32, medtune to a multiple of 32. mlx_lm also clears
the MLX allocator cache after every step (its default --clear-cache-threshold 0).

Memory (issue 16): the table also gives each medtune run's peak against mlx_lm's on the same BLAS
((b) vs (a), (c) vs (d)) and the preflight's estimate against the measured peak. Two shapes:
  --model builtin:smollm2-135m (default) on the sample records, as before;
  --model qwen-shape[:LAYERS] a random model shaped like Qwen2.5-0.5B (hidden 896, 14 heads, 2 KV heads,
                 intermediate 4864, vocabulary 151,936, tied embeddings; LAYERS of its 24, default 4),
                 float32, saved once under ~/.cache/medtune/bench/, with SmolLM2's tokenizer (its ids are all
                 below 49,152; the logits still span 151,936);
  --long-records N makes records of about N tokens from the sample (one question, the reasoning and
                 answers of several records as its completion), prepared by medtune prepare.

Usage: python scripts/bench_train.py [--iters 12] [--warmup 2] [--runs a,b,c] [--json OUT] [--cli-check]
       python scripts/bench_train.py --model qwen-shape:4 --long-records 1536 --batch-size 4 --runs d,c
Run it alone on the machine: timings of a shared 2-core box swing with other load.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

COUNTING = (
    "tokens/s = sum of full sequence lengths (prompt+completion, unpadded) of steps warmup+1..iters / "
    "sum of the trainer's own step times of those steps; mlx_lm's native figure counts loss-mask tokens"
)

RUNS = {
    "a": {"name": "mlx_lm.lora by hand", "kind": "mlx_lm", "openblas": False},
    "b": {"name": "medtune, no OpenBLAS", "kind": "medtune", "openblas": False},
    "c": {"name": "medtune (default: OpenBLAS)", "kind": "medtune", "openblas": True},
    "d": {"name": "mlx_lm.lora + OpenBLAS", "kind": "mlx_lm", "openblas": True},
}


# --------------------------------------------------------------------------- children (one process each)


def blas_libraries() -> list[str]:
    """Shared libraries with 'blas' in their name mapped into this process."""
    libs = set()
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                if "blas" in os.path.basename(path).lower():
                    libs.add(path)
    except OSError:
        pass
    return sorted(libs)


def system_openblas(libs: list[str]) -> list[str]:
    """The OpenBLAS that can serve MLX's cblas_sgemm. numpy's own libscipy_openblas64_ is always mapped
    but exports only suffixed symbols (cblas_sgemm64_), so it does not count; MLX's bundled reference
    BLAS is mlx_cpu.libs/libblas-*.so."""
    return [p for p in libs if os.path.basename(p).lower().startswith("libopenblas")]


def peak_rss_gb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kb * 1024 / 1e9 if sys.platform.startswith("linux") else kb / 1e9


def child_mlx_lm(cfg: dict) -> dict:
    """(a)/(d): mlx_lm.lora's own path (run() minus the callback it would substitute), observed."""
    if cfg["openblas"]:
        import ctypes

        sys.path.insert(0, str(ROOT))
        from medtune.core.runtime import OPENBLAS_CANDIDATES  # the same library medtune binds

        path = os.environ.get("MEDTUNE_OPENBLAS") or next((p for p in OPENBLAS_CANDIDATES if os.path.exists(p)), None)
        if path is None:
            raise SystemExit("no OpenBLAS found for run d")
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)  # before mlx is imported, as medtune.core.runtime does

    import copy
    import types
    from functools import partial

    import mlx.core as mx
    import mlx_lm.lora as lora
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.tuner import trainer
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.datasets import load_dataset
    from mlx_lm.utils import load

    # What `mlx_lm lora --model ... --mask-prompt -c lora.yaml ...` builds in lora.main().
    args = copy.deepcopy(lora.CONFIG_DEFAULTS)
    args.update(
        model=cfg["model_path"],
        train=True,
        data=cfg["data"],
        fine_tune_type="lora",
        optimizer="adam",
        seed=cfg["seed"],
        num_layers=cfg["num_layers"],
        batch_size=cfg["batch_size"],
        iters=cfg["iters"],
        val_batches=1,
        learning_rate=cfg["lr"],
        steps_per_report=1,
        steps_per_eval=100000,
        adapter_path=cfg["out"],
        save_every=100000,
        max_seq_length=cfg["max_seq_length"],
        mask_prompt=True,
        lora_parameters={"rank": cfg["rank"], "scale": cfg["scale"], "dropout": 0.0},
    )
    args = types.SimpleNamespace(**args)

    batch_lengths: list[list[int]] = []  # full sequence lengths of each training batch, in order

    def observed_batches(*a, **kw):
        for batch, lengths in trainer.iterate_batches(*a, **kw):
            if kw.get("loop"):  # the training iterator (validation iterates without loop)
                batch_lengths.append([int(x) for x in np.array(lengths)[:, 1]])
            yield batch, lengths

    steps: list[dict] = []

    class Collect(TrainingCallback):
        def on_train_loss_report(self, info: dict):
            it = info["iteration"]
            dt = 1.0 / info["iterations_per_second"]  # steps_per_report=1: train_time of this step
            steps.append(
                {
                    "step": it,
                    "seconds": dt,
                    "tokens": sum(batch_lengths[it - 1]),
                    "native_tokens": info["tokens_per_second"] * dt,
                    "train_loss": info["train_loss"],
                    "peak_memory_gb": info["peak_memory"],
                    "wall": time.perf_counter(),
                }
            )

    lora.train = partial(trainer.train, iterate_batches=observed_batches)  # pass-through observer only
    np.random.seed(args.seed)  # lora.run() does this first
    model, tokenizer = load(args.model)
    train_set, valid_set, _ = load_dataset(args, tokenizer)
    lora.train_model(args, model, train_set, valid_set, training_callback=Collect())
    dtypes = sorted({str(v.dtype) for _, v in tree_flatten(model.parameters())})
    return {"steps": steps, "param_dtypes": dtypes, "mlx_peak_memory_gb": mx.get_peak_memory() / 1e9}


class _Progress:
    """Duck-typed stand-in for the rich Progress medtune's trainer accepts: notes when each step ends."""

    def __init__(self):
        self.walls: list[float] = []
        self.console = self

    def add_task(self, *a, **kw):
        return 0

    def update(self, task=None, advance=None, **kw):
        if advance:
            self.walls.append(time.perf_counter())

    def print(self, *a, **kw):
        pass

    def __getattr__(self, name):
        return lambda *a, **kw: None


def child_medtune(cfg: dict) -> dict:
    """(b)/(c): medtune.train.train; the environment decides OpenBLAS (MEDTUNE_NO_OPENBLAS=1 for b)."""
    sys.path.insert(0, str(ROOT))
    from medtune.core import runtime
    from medtune.train import TrainOptions, train

    wanted = dict(
        iters=cfg["iters"],
        batch_size=cfg["batch_size"],
        num_layers=cfg["num_layers"],
        rank=cfg["rank"],
        scale=cfg["scale"],
        lr=cfg["lr"],
        max_seq_length=cfg["max_seq_length"],
        eval_every=100000,
        save_every=100000,
        seed=cfg["seed"],
    )
    optional = dict(dropout=0.0, mask_prompt=True, val_batches=1)  # set when the options have them
    names = {f.name for f in dataclasses.fields(TrainOptions)}
    opts = TrainOptions(**wanted, **{k: v for k, v in optional.items() if k in names})
    progress = _Progress()
    kw = {"progress": progress} if "progress" in inspect.signature(train).parameters else {}
    result = train(cfg["model_spec"], cfg["data"], cfg["out"], opts, **kw)

    rows = [json.loads(line) for line in open(Path(cfg["out"]) / "metrics.jsonl", encoding="utf-8") if line.strip()]
    rows = [r for r in rows if "tokens_per_second" in r]
    if any("step_seconds" not in r for r in rows):
        raise SystemExit("metrics.jsonl rows have no step_seconds: cannot skip warm-up steps")
    steps, t_cum, tok_prev = [], 0.0, 0.0
    for i, r in enumerate(rows):
        t_cum += r["step_seconds"]
        tok_cum = r["tokens_per_second"] * t_cum  # tokens_per_second = tokens so far / step time so far
        steps.append(
            {
                "step": r["step"],
                "seconds": r["step_seconds"],
                "tokens": round(tok_cum - tok_prev),
                "label_tokens": r.get("label_tokens"),
                "train_loss": r.get("train_loss"),
                "peak_memory_gb": r["peak_memory_gb"],
                "wall": progress.walls[i] if len(progress.walls) == len(rows) else None,
            }
        )
        tok_prev = tok_cum
    mx = runtime.mx()
    blas = runtime.blas_state()
    return {
        "steps": steps,
        "result_tokens_per_second": result.tokens_per_second,
        "preflight_estimate_gb": (result.preflight or {}).get("estimated_peak_bytes", 0) / 1e9,
        "preflight_parts_gb": {k: v / 1e9 for k, v in ((result.preflight or {}).get("estimate") or {}).items()},
        "medtune_blas": {"active": blas.active, "path": blas.path, "reason": blas.reason},
        "mlx_peak_memory_gb": mx.get_peak_memory() / 1e9,
    }


def child_main(kind: str, cfg_path: str, out_path: str) -> None:
    cfg = json.loads(Path(cfg_path).read_text())
    t0 = time.perf_counter()
    data = child_mlx_lm(cfg) if kind == "mlx_lm" else child_medtune(cfg)
    data.update(blas_libraries=blas_libraries(), peak_rss_gb=peak_rss_gb(), process_seconds=time.perf_counter() - t0)
    import mlx.core as mx

    data.update(mlx_version=mx.__version__, device=str(mx.default_device()))
    Path(out_path).write_text(json.dumps(data, indent=1))


# --------------------------------------------------------------------------- parent


def summarize(steps: list[dict], warmup: int) -> dict:
    measured = [s for s in steps if s["step"] > warmup]
    if not measured:
        raise SystemExit(f"--iters must exceed --warmup ({warmup}) to measure anything")
    tokens, seconds = sum(s["tokens"] for s in measured), sum(s["seconds"] for s in measured)
    out = {
        "measured_steps": [s["step"] for s in measured],
        "tokens": tokens,
        "step_seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "peak_memory_gb": max(s["peak_memory_gb"] for s in steps),
    }
    if all("native_tokens" in s for s in measured):
        out["native_tokens_per_second"] = sum(s["native_tokens"] for s in measured) / seconds
    last = max(s["step"] for s in steps)
    walls = {s["step"]: s.get("wall") for s in steps}
    if last - 1 > warmup and walls.get(warmup) and walls.get(last - 1):
        toks = sum(s["tokens"] for s in steps if warmup < s["step"] < last)
        out["wall_tokens_per_second"] = toks / (walls[last - 1] - walls[warmup])
    return out


def run_child(key: str, cfg: dict, work: Path) -> dict:
    spec = RUNS[key]
    env = dict(os.environ)
    env.pop("MEDTUNE_NO_OPENBLAS", None)
    if spec["kind"] == "medtune" and not spec["openblas"]:
        env["MEDTUNE_NO_OPENBLAS"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_cfg = dict(cfg, out=str(work / f"out_{key}"), openblas=spec["openblas"])
    cfg_path, out_path, log_path = work / f"cfg_{key}.json", work / f"result_{key}.json", work / f"log_{key}.txt"
    cfg_path.write_text(json.dumps(run_cfg))
    print(f"[{key}] {spec['name']}: running ({cfg['iters']} steps; log {log_path})", flush=True)
    t, load_before = time.perf_counter(), os.getloadavg()[0]
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", spec["kind"], str(cfg_path), str(out_path)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=str(work),
        )
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-25:])
        raise SystemExit(f"[{key}] failed (exit {proc.returncode}); last lines of {log_path}:\n{tail}")
    data = json.loads(out_path.read_text())
    data["summary"] = summarize(data["steps"], cfg["warmup"])
    has_openblas = bool(system_openblas(data["blas_libraries"]))
    data["openblas_mapped"] = has_openblas
    data["load_average"] = {"before": load_before, "after": os.getloadavg()[0]}
    data["blas_as_intended"] = has_openblas == spec["openblas"]
    print(
        f"[{key}] done in {time.perf_counter() - t:.0f} s: {data['summary']['tokens_per_second']:.1f} tokens/s",
        flush=True,
    )
    return data


REPORT = re.compile(r"^\s*(\d+)\s+([\d.]+)\s+[▼▲]\s+([\d,]+)\s+([\d.]+)k\s*$")


def cli_check(cfg: dict, work: Path) -> dict:
    """The real `python -m mlx_lm lora` command; parses its report lines (mlx_lm's native tokens/s)."""
    (work / "lora.yaml").write_text(
        f"lora_parameters:\n  rank: {cfg['rank']}\n  scale: {cfg['scale']}\n  dropout: 0.0\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "mlx_lm",
        "lora",
        "--model",
        cfg["model_path"],
        "--train",
        "--data",
        cfg["data"],
        "--iters",
        str(cfg["iters"]),
        "--batch-size",
        str(cfg["batch_size"]),
        "--num-layers",
        str(cfg["num_layers"]),
        "--max-seq-length",
        str(cfg["max_seq_length"]),
        "--learning-rate",
        str(cfg["lr"]),
        "--mask-prompt",
        "--seed",
        str(cfg["seed"]),
        "--adapter-path",
        str(work / "out_cli"),
        "--steps-per-report",
        "1",
        "--val-batches",
        "1",
        "--steps-per-eval",
        "100000",
        "--save-every",
        "100000",
        "-c",
        str(work / "lora.yaml"),
    ]
    env = {k: v for k, v in os.environ.items() if k != "MEDTUNE_NO_OPENBLAS"}
    print("[cli] " + " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(work))
    (work / "log_cli.txt").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"[cli] failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    text = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)  # rich colours its lines even into a pipe here
    rows = {int(m[1]): float(m[3].replace(",", "")) for m in map(REPORT.match, text.splitlines()) if m}
    measured = [v for k, v in rows.items() if k > cfg["warmup"]]
    return {
        "per_step_native_tokens_per_second": rows,
        "mean_native_tokens_per_second": sum(measured) / len(measured) if measured else None,
    }


QWEN_SHAPE = dict(  # Qwen2.5-0.5B's shape (its config.json), the layer count aside
    hidden_size=896,
    intermediate_size=4864,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)


def qwen_shape_model(layers: int) -> Path:
    """A random float32 model shaped like Qwen2.5-0.5B with `layers` layers and SmolLM2's tokenizer, made once."""
    sys.path.insert(0, str(ROOT))
    from medtune.models import pull

    out = Path.home() / ".cache/medtune/bench" / f"qwen-shape-{layers}"
    if (out / "model.safetensors").is_file():
        return out
    import shutil

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = pull("builtin:smollm2-135m").path
    torch.manual_seed(0)
    cfg = Qwen2Config(num_hidden_layers=layers, **QWEN_SHAPE)
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tok / name).exists():
            shutil.copy(tok / name, tmp / name)
    tmp.rename(out)
    print(f"made {out} ({layers} layers)", flush=True)
    return out


def long_records(dataset: str, tokens: int, model: str, work: Path) -> Path:
    """The sample's records as records of about `tokens` tokens each (within a few percent, so that every batch is
    about as long as the longest one, which the preflight sizes): each question's reasoning is followed by the
    reasoning and answers of the next records, cut to length, so the completion is most of the record."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    rows = [json.loads(x) for x in Path(dataset).read_text(encoding="utf-8").splitlines() if x.strip()]
    target = tokens - 48  # the chat template's own tokens

    def size(row, words) -> int:
        return len(tok(row["Question"] + " " + " ".join(words) + " " + row["Response"])["input_ids"])

    out = work / "long.jsonl"
    with out.open("w", encoding="utf-8") as fh:
        for i, row in enumerate(rows):
            words, k = [], i
            while size(row, words) < target:
                other = rows[k % len(rows)]
                words += (other["Complex_CoT"] + " " + other["Response"]).split()
                k += 1
            lo, hi = 0, len(words)  # the most words that keep the record within the target
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if size(row, words[:mid]) <= target else (lo, mid - 1)
            rec = {"Question": row["Question"], "Complex_CoT": " ".join(words[:lo]), "Response": row["Response"]}
            fh.write(json.dumps(rec) + "\n")
    return out


def prepare_data(dataset: str, model: str, max_seq_length: int, work: Path) -> Path:
    src = Path(dataset)
    if src.is_dir() and (src / "train.jsonl").is_file():
        return src
    sys.path.insert(0, str(ROOT))
    from medtune.data.prepare import prepare

    out = work / "data"
    res = prepare(str(src), model, str(out), max_seq_length=max_seq_length, overlong="drop")
    print(f"prepared {src} -> {out}: {res.counts}", flush=True)
    return out


SAME_BLAS = {"b": "a", "c": "d"}  # each medtune run's mlx_lm counterpart on the same BLAS


def table(results: dict, ref: str | None) -> str:
    lines = [
        "| run | BLAS mapped | tokens/s | ratio vs (a) | wall tokens/s | peak MLX memory (GB) | peak RSS (GB) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    base = results[ref]["summary"]["tokens_per_second"] if ref else None
    for key, data in results.items():
        s = data["summary"]
        found = system_openblas(data["blas_libraries"])
        blas = f"OpenBLAS ({os.path.basename(found[0])})" if found else "bundled reference BLAS"
        if not data["blas_as_intended"]:
            blas += " **(not as intended)**"
        ratio = f"{s['tokens_per_second'] / base:.2f}x" if base else "-"
        wall = f"{s['wall_tokens_per_second']:.1f}" if "wall_tokens_per_second" in s else "-"
        lines.append(
            f"| ({key}) {RUNS[key]['name']} | {blas} | {s['tokens_per_second']:.1f} | {ratio} | {wall} | "
            f"{s['peak_memory_gb']:.2f} | {data['peak_rss_gb']:.2f} |"
        )
    return "\n".join(lines)


def ratio_table(results: dict) -> str:
    """medtune against mlx_lm on the same BLAS: peak memory and tokens/s ratios, and the preflight's estimate."""
    lines = [
        "| medtune run | vs | peak GB medtune / mlx_lm | peak ratio | tokens/s ratio | preflight estimate GB | estimate / peak |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for key, ref in SAME_BLAS.items():
        if key not in results or ref not in results:
            continue
        ours, theirs = results[key]["summary"], results[ref]["summary"]
        est = results[key].get("preflight_estimate_gb") or 0
        lines.append(
            f"| ({key}) | ({ref}) | {ours['peak_memory_gb']:.2f} / {theirs['peak_memory_gb']:.2f} | "
            f"{ours['peak_memory_gb'] / theirs['peak_memory_gb']:.2f}x | "
            f"{ours['tokens_per_second'] / theirs['tokens_per_second']:.2f}x | {est:.2f} | "
            f"{est / ours['peak_memory_gb']:.2f} |"
        )
    return "\n".join(lines) if len(lines) > 2 else ""


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        return child_main(*sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m", help="a model spec, or qwen-shape[:LAYERS]")
    ap.add_argument("--long-records", type=int, default=0, help="make records of about this many tokens")
    ap.add_argument(
        "--data",
        default=str(ROOT / "data/sample/medical_o1_sample.jsonl"),
        help="a dataset medtune prepare reads, or an already prepared folder with train/valid.jsonl",
    )
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of tokens/s (compile, allocator warm-up)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--num-layers", type=int, help="layers with LoRA (default 8, or all of a smaller model's)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--scale", type=float, default=20.0)
    ap.add_argument("--max-seq-length", type=int, help="default 512, or a quarter over --long-records")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--runs", default="a,b,c", help="which of a,b,c,d to run, in this order")
    ap.add_argument("--cli-check", action="store_true", help="also run the real `mlx_lm lora` CLI and parse its report")
    ap.add_argument("--workdir", help="keep logs and outputs here (default: a temporary folder)")
    ap.add_argument("--json", help="write all figures to this file")
    a = ap.parse_args()
    if a.max_seq_length is None:
        a.max_seq_length = a.long_records + a.long_records // 4 if a.long_records else 512
    runs = [k.strip() for k in a.runs.split(",") if k.strip()]
    if not runs or any(k not in RUNS for k in runs):
        ap.error(f"--runs takes a comma-separated subset of {','.join(RUNS)}")

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        work = Path(a.workdir or tmp).resolve()
        work.mkdir(parents=True, exist_ok=True)
        sys.path.insert(0, str(ROOT))
        from medtune.models import pull  # resolving the spec imports no mlx

        if a.model.startswith("qwen-shape"):
            layers = a.model.partition(":")[2] or "4"
            if not layers.isdigit() or not 1 <= int(layers) <= 24:
                ap.error(f"--model {a.model}: qwen-shape takes 1 to 24 layers (qwen-shape:4)")
            a.model = str(qwen_shape_model(int(layers)))
        model_path = str(pull(a.model).path)
        layers = json.loads((Path(model_path) / "config.json").read_text())["num_hidden_layers"]
        if a.num_layers is None:
            a.num_layers = min(8, layers)
        if not 1 <= a.num_layers <= layers:
            ap.error(f"--num-layers {a.num_layers}: the model has {layers} layers")
        source = str(long_records(a.data, a.long_records, model_path, work)) if a.long_records else a.data
        data = prepare_data(source, a.model, a.max_seq_length, work)
        cfg = {
            "model_spec": a.model,
            "model_path": model_path,
            "data": str(Path(data).resolve()),
            "iters": a.iters,
            "warmup": a.warmup,
            "batch_size": a.batch_size,
            "num_layers": a.num_layers,
            "rank": a.rank,
            "scale": a.scale,
            "max_seq_length": a.max_seq_length,
            "lr": a.lr,
            "seed": a.seed,
        }
        results = {k: run_child(k, cfg, work) for k in runs}
        cli = cli_check(cfg, work) if a.cli_check else None

    ref = "a" if "a" in results else None
    print()
    print(
        f"LoRA training, {Path(a.model).name} (float32), batch {a.batch_size}, {a.num_layers} layers, rank {a.rank}, "
        f"scale {a.scale:g}, max_seq_length {a.max_seq_length}, lr {a.lr:g}, seed {a.seed}; "
        f"tokens/s over steps {a.warmup + 1}..{a.iters} (full sequence lengths / trainer step time)"
    )
    print()
    print(table(results, ref))
    print()
    ratios = ratio_table(results)
    if ratios:
        print(ratios)
        print()
    for key, d in results.items():
        s = d["summary"]
        extra = (
            f", mlx_lm's own count (loss-mask tokens): {s['native_tokens_per_second']:.1f}/s"
            if "native_tokens_per_second" in s
            else ""
        )
        print(f"({key}) {s['tokens']} tokens in {s['step_seconds']:.1f} s of step time{extra}")
    if cli:
        m = cli["mean_native_tokens_per_second"]
        print(
            f"(cli) real `mlx_lm lora`: mean of its reported Tokens/sec over the same steps "
            f"(its own count, per-step rates averaged): {m:.1f}"
            if m
            else "(cli) no report lines parsed"
        )
    busy = {k: max(d["load_average"].values()) for k, d in results.items()}
    if max(busy.values()) > (os.cpu_count() or 1) + 0.5:  # a run itself loads at most every core
        print(
            "WARNING: the machine was busy (1-minute load average "
            + ", ".join(f"({k}) {v:.1f}" for k, v in busy.items())
            + f" on {os.cpu_count()} cores): timings are noisy"
        )
    bad = [k for k, d in results.items() if not d["blas_as_intended"]]
    if bad:
        print(f"WARNING: BLAS binding not as intended in run(s) {', '.join(bad)}: the comparison is not valid")
    print(
        "Note: the trainers draw different batches (medtune pairs records of similar length, mlx_lm 0.32 keeps "
        "file order); see the docstring."
    )
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {
                    "settings": cfg,
                    "counting": COUNTING,
                    "runs": {k: dict(d, label=RUNS[k]["name"]) for k, d in results.items()},
                    "cli_check": cli,
                    "cpu_count": os.cpu_count(),
                    "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                    "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
                },
                indent=1,
            )
        )
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
