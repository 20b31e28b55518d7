#!/usr/bin/env python
"""Benchmark `medtune prepare` against what a user would otherwise run, in one process.

Makes a synthetic medical-o1 JSON file (25,000 records by default, CoT ~1,000 Chinese characters,
built from the sentences of our sample set), then times:
  plain      json.load + build {prompt, completion} + write JSONL (no checks at all)
  bare_tok   one batch tokenization of the same texts with the same fast tokenizer
  prepare    medtune prepare without token statistics (a sample of records checked)
  prepare+   medtune prepare with token statistics (every record rendered, tokenized and checked)
and prints the ratios prepare/plain (target <= 1.5) and prepare+/bare_tok (target <= 1.3).
The tokenizer is loaded once, before the timings, and shared by bare_tok and prepare. Timings on these
VMs swing by 30-60 % from run to run (page faults on fresh memory), so each figure is the best of
several interleaved runs (--repeat for the fast pair, --repeat-slow for the tokenizing pair).
Usage: python scripts/bench_prepare.py [--records N] [--model SPEC] [--repeat K] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sentences() -> tuple[list[str], list[str]]:
    zh, en = [], []
    for line in (ROOT / "data/sample/medical_o1_sample.jsonl").read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        text = rec["Complex_CoT"] + rec["Response"]
        if re.search(r"[\u4e00-\u9fff]", text):
            zh += [s + "。" for s in text.split("。") if s.strip()]
        else:
            en += [s.strip() + "." for s in text.split(". ") if s.strip()]
    return zh, en


def synthesize(n: int, path: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    zh, en = sentences()
    records = []
    for i in range(n):
        pool = zh if i % 5 else en  # 80 % Chinese, like the zh half of medical-o1 plus some English
        target = 1000 if pool is zh else 2200  # ~1,000 Chinese characters; similar token count in English
        cot, resp = [], []
        while sum(map(len, cot)) < target:
            cot.append(rng.choice(pool))
        while sum(map(len, resp)) < target // 4:
            resp.append(rng.choice(pool))
        q = (
            f"病例{i}：" + rng.choice(zh) + "最可能的诊断是什么？"
            if pool is zh
            else f"Case {i}: " + rng.choice(en) + " What is the most likely diagnosis?"
        )
        sep = "" if pool is zh else " "
        records.append({"Question": q, "Complex_CoT": sep.join(cot), "Response": sep.join(resp)})
    path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")


def plain_baseline(src: Path, out: Path) -> None:
    records = json.loads(src.read_text(encoding="utf-8"))
    rows = [
        {"prompt": r["Question"], "completion": f"<think>\n{r['Complex_CoT']}\n</think>\n\n{r['Response']}"}
        for r in records
    ]
    with open(out, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def timed(fn, *args, **kw):
    t = time.perf_counter()
    result = fn(*args, **kw)
    return time.perf_counter() - t, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=25_000)
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--repeat", type=int, default=5, help="runs of plain / prepare --no-token-stats (best kept)")
    ap.add_argument("--repeat-slow", type=int, default=2, help="runs of bare tokenization / prepare (best kept)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    from medtune.core import runtime

    runtime.setup()
    from medtune.data.options import PrepareOptions
    from medtune.data.prepare import prepare
    from medtune.data.render import load_tokenizer
    from medtune.models import pull

    model = pull(args.model).path
    tok = load_tokenizer(model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "medical_o1_synthetic.json"
        synthesize(args.records, src)
        size_mb = src.stat().st_size / 1e6
        records = json.loads(src.read_text(encoding="utf-8"))
        texts = [f"{r['Question']}\n{r['Complex_CoT']}\n{r['Response']}" for r in records]
        del records

        opts = PrepareOptions(max_seq_length=8192, valid_ratio=0.05)
        t_plain = t_fast = t_tok = t_full = float("inf")
        for i in range(args.repeat):  # interleaved, so both sides see the same machine state
            t_plain = min(t_plain, timed(plain_baseline, src, tmp / "plain.jsonl")[0])
            dt, r_fast = timed(prepare, src, str(model), tmp / f"fast{i}", opts, token_stats=False, tokenizer=tok)
            t_fast = min(t_fast, dt)
        for i in range(args.repeat_slow):
            dt, enc = timed(lambda: tok(texts)["input_ids"])
            t_tok = min(t_tok, dt)
            n_tokens = sum(map(len, enc))
            del enc
            dt, r_full = timed(prepare, src, str(model), tmp / f"full{i}", opts, token_stats=True, tokenizer=tok)
            t_full = min(t_full, dt)

    figures = {
        "records": args.records,
        "file_mb": round(size_mb, 1),
        "tokens": n_tokens,
        "plain_s": round(t_plain, 2),
        "bare_tokenize_s": round(t_tok, 2),
        "prepare_no_stats_s": round(t_fast, 2),
        "prepare_stats_s": round(t_full, 2),
        "ratio_no_stats_vs_plain": round(t_fast / t_plain, 2),
        "target_no_stats": 1.5,
        "ratio_stats_vs_bare_tokenize": round(t_full / t_tok, 2),
        "target_stats": 1.3,
        "repeat": args.repeat,
        "repeat_slow": args.repeat_slow,
        "kept": r_full.counts["kept"],
        "checked_with_stats": r_full.counts["kept"],
        "tokens_median": r_full.tokens.get("median"),
        "tokens_max": r_full.tokens.get("max"),
    }
    print(
        f"synthetic medical-o1: {args.records} records, {size_mb:.1f} MB, {n_tokens:,} tokens ({args.model}); "
        f"best of {args.repeat} / {args.repeat_slow} runs"
    )
    print("| what | seconds | ratio | target |\n|---|---|---|---|")
    print(f"| plain json.load + build + write | {t_plain:.2f} | 1.00 | |")
    print(f"| medtune prepare --no-token-stats | {t_fast:.2f} | {t_fast / t_plain:.2f} × plain | ≤ 1.5 |")
    print(f"| bare batch tokenization | {t_tok:.2f} | 1.00 | |")
    print(
        f"| medtune prepare (token stats, every record checked) | {t_full:.2f} | {t_full / t_tok:.2f} × bare | ≤ 1.3 |"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
