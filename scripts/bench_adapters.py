#!/usr/bin/env python
"""One base, three specialists: disk use and fidelity of LoRA GGUF adapters on a shared base GGUF, against
three fused GGUFs (what a user would otherwise ship).

On the embedded model (builtin:smollm2-135m), three LoRA adapters are trained on three disjoint thirds of the
sample set (named cardio, peds, pharm for the example; --iters steps each). Then, as a user would:

  adapters   `medtune export ADAPTER --base MODEL -q T` for each: one base GGUF of type T (F16, Q8_0),
             written once and reused, plus a small adapter GGUF each;
  fused      `medtune fuse` + `medtune export FUSED -q T` for each: three whole GGUFs of type T.

Printed: bytes on disk for each way and their ratio; for each adapter, `eval fidelity` of the F16 base + the
adapter GGUF in llama-server (--lora) against MLX with the adapter (greedy continuations, the near-tie rule), and
the KL divergence (teacher-forced on the held-out answers) against the fused model's F16 GGUF of: the F16 base +
adapter, the Q8_0 base + adapter, and the fused Q8_0 GGUF (what quantizing the fused model costs, for scale).

    .venv/bin/python scripts/bench_adapters.py [--iters 12] [--prompts 4] [--out bench/adapters] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NAMES = ("cardio", "peds", "pharm")
MODEL = "builtin:smollm2-135m"


def _train(work: Path, iters: int) -> dict[str, Path]:
    """Three adapters, each on its own third of the sample set."""
    from medtune.data.prepare import prepare
    from medtune.train import TrainOptions, train

    rows = (ROOT / "data/sample/medical_o1_sample.jsonl").read_text(encoding="utf-8").splitlines()
    out = {}
    for i, name in enumerate(NAMES):
        src = work / f"{name}.jsonl"
        src.write_text("\n".join(rows[i::3]) + "\n", encoding="utf-8")
        prepare(src, MODEL, work / f"data-{name}", max_seq_length=1024, valid_ratio=0.2, token_stats=False)
        out[name] = work / "adapters" / name
        if not (out[name] / "adapters.safetensors").is_file():
            opts = TrainOptions(iters=iters, batch_size=2, num_layers=8, rank=8, lr=2e-4, max_seq_length=1024)
            train(MODEL, work / f"data-{name}", out[name], opts)
    return out


def _exports(work: Path, adapters: dict[str, Path]) -> dict:
    from medtune.export import export
    from medtune.export.adapter import export_adapter
    from medtune.fuse import fuse

    res = {"adapter": {}, "fused": {}}
    for q in ("f16", "q8_0"):
        for name, ad in adapters.items():
            r = export_adapter(ad, MODEL, work / "lora" / q, name, quant=q, base_out=work / "base" / q,
                               modelfile_path=work / "Modelfiles" / f"{name}-{q}.Modelfile")  # fmt: skip
            res["adapter"].setdefault(q, {})[name] = {"base": r.base_gguf, "lora": r.adapter_gguf}
    for name, ad in adapters.items():
        fused = work / "fused" / name
        if not (fused / "config.json").is_file():
            fuse(MODEL, ad, fused)
        e = export(fused, fused, name, quant=["f16", "q8_0"], modelfile_path=work / "Modelfiles" / f"{name}.Modelfile")
        res["fused"][name] = {"dir": fused, **e.gguf_paths}
    return res


def _disk(ex: dict) -> dict:
    out = {}
    for q in ("f16", "q8_0"):
        runs = ex["adapter"][q]
        base = next(iter(runs.values()))["base"].stat().st_size
        loras = sum(r["lora"].stat().st_size for r in runs.values())
        fused = sum(f[q].stat().st_size for f in ex["fused"].values())
        out[q] = {"base": base, "adapters": loras, "shared": base + loras, "fused": fused,
                  "ratio": (base + loras) / fused}  # fmt: skip
    return out


def _fidelity(adapters: dict, ex: dict, prompts: int) -> dict:
    from medtune.eval.fidelity import fidelity, read_prompts
    from medtune.models import resolve

    base_dir, todo, out = resolve(MODEL), read_prompts(limit=prompts), {}
    for name, ad in adapters.items():
        run = ex["adapter"]["f16"][name]
        rep = fidelity(base_dir, run["base"], todo, 32, runtime="llama-server", lora=run["lora"], adapter=ad)
        s = rep.summary
        out[name] = {"passed": rep.passed, "continuations_equal": s["continuations_equal"], "prompts": s["prompts"],
                     "near_ties": s["near_ties"], "max_logit_diff": s["max_logit_diff"]}  # fmt: skip
    return out


def _kl(work: Path, ex: dict) -> dict:
    from medtune.eval.quants import heldout_sequences, judge_quants

    out = {}
    for name, fused in ex["fused"].items():
        seqs = heldout_sequences(fused["dir"], work / f"data-{name}")
        stacks = [(ex["adapter"][q][name]["base"], ex["adapter"][q][name]["lora"]) for q in ("f16", "q8_0")]
        table = judge_quants(fused["f16"], [*stacks, fused["q8_0"]], seqs, n_threads=2)
        labels = {str(stacks[0][0]): "F16 base + adapter", str(stacks[1][0]): "Q8_0 base + adapter",
                  str(fused["q8_0"]): "fused Q8_0"}  # fmt: skip
        out[name] = {
            labels[r.file]: {
                "mean_kld": r.mean_kld,
                "p99_kld": r.p99_kld,
                "same_top": r.same_top,
                "delta_ppl": r.delta_ppl,
                "verdict": r.verdict,
            }  # fmt: skip
            for r in table.rows
        }
        out[name]["positions"] = table.positions
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=12)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "adapters")
    ap.add_argument("--fresh", action="store_true", help="train the adapters again")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    from medtune.core import runtime

    runtime.mx()  # OpenBLAS bound before MLX loads (Linux)
    if a.fresh:
        shutil.rmtree(a.out, ignore_errors=True)
    a.out.mkdir(parents=True, exist_ok=True)
    adapters = _train(a.out, a.iters)
    ex = _exports(a.out, adapters)
    result = {"disk": _disk(ex), "fidelity": _fidelity(adapters, ex, a.prompts), "kl": _kl(a.out, ex)}
    if a.json:
        print(json.dumps(result, indent=2, default=str))
        return 0
    for q, d in result["disk"].items():
        print(f"{q}: base {d['base'] / 1e6:.1f} MB + 3 adapters {d['adapters'] / 1e6:.2f} MB = {d['shared'] / 1e6:.1f} MB"
              f" vs 3 fused {d['fused'] / 1e6:.1f} MB: {d['ratio']:.2f}x")  # fmt: skip
    for name, f in result["fidelity"].items():
        print(f"{name}: F16 base + adapter in llama-server vs MLX + adapter: {f['continuations_equal']}/{f['prompts']}"
              f" continuations equal, near-ties {f['near_ties']}, max |dlogit| {f['max_logit_diff']:.2e},"
              f" {'passed' if f['passed'] else 'FAILED'}")  # fmt: skip
    for name, rows in result["kl"].items():
        for label, r in rows.items():
            if label != "positions":
                print(f"{name}: {label} vs fused F16 ({rows['positions']} positions): mean KLD {r['mean_kld']:.2e},"
                      f" p99 {r['p99_kld']:.4f}, same top {r['same_top']:.1%}, dPPL {r['delta_ppl']:+.3f} ({r['verdict']})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
