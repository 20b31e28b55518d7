"""Collect bench/*.json (from bench_prepare.py, bench_train.py, bench_export.py) into bench/results.json and a
markdown table bench/results.md: each medtune figure next to its peer's and the ratio.

Usage: python scripts/bench_report.py [--dir bench]
A missing or unreadable input file is listed as missing; the others are still reported.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

MB = 1024 * 1024


def row(bench, what, ours, peer_name, peer, unit, better="lower", target=None):
    ratio = ours / peer if ours is not None and peer else None
    return {
        "bench": bench,
        "what": what,
        "medtune": ours,
        "peer": peer_name,
        "peer_value": peer,
        "unit": unit,
        "ratio": round(ratio, 3) if ratio is not None else None,
        "better": better,
        "target": target,
    }


def from_prepare(d: dict) -> list[dict]:
    return [
        row(
            "prepare",
            f"prepare --no-token-stats, {d.get('records')} records",
            d.get("prepare_no_stats_s"),
            "plain json.load + build + write",
            d.get("plain_s"),
            "s",
            target=f"≤ {d.get('target_no_stats', 1.5)}",
        ),
        row(
            "prepare",
            "prepare with token stats (every record checked)",
            d.get("prepare_stats_s"),
            "bare batch tokenization",
            d.get("bare_tokenize_s"),
            "s",
            target=f"≤ {d.get('target_stats', 1.3)}",
        ),
    ]


def from_train(d: dict) -> list[dict]:
    """tokens/s of each medtune run against its mlx_lm peer, and peak MLX memory against the peer on the same
    BLAS (bench_train.py keeps a run's figures under "summary")."""
    runs = d.get("runs", {})
    out = []
    pairs = (("b", "a"), ("c", "a"), ("c", "d"))  # medtune run, its mlx_lm peer
    for ours, peer in pairs:
        if ours in runs and peer in runs:
            o, p = runs[ours], runs[peer]
            so, sp = o.get("summary", o), p.get("summary", p)
            out.append(
                row(
                    "train",
                    f"{o.get('label', ours)}: tokens/s",
                    so.get("tokens_per_second"),
                    p.get("label", peer),
                    sp.get("tokens_per_second"),
                    "tok/s",
                    better="higher",
                )
            )
            if (ours, peer) != ("c", "a"):  # memory against the same BLAS only
                out.append(
                    row(
                        "train",
                        f"{o.get('label', ours)}: peak memory",
                        so.get("peak_memory_gb"),
                        p.get("label", peer),
                        sp.get("peak_memory_gb"),
                        "GB",
                        target="≤ 0.6" if "qwen-shape" in str(d.get("settings", {}).get("model_spec")) else None,
                    )
                )
    return out


def from_export(d: dict) -> list[dict]:
    out = []
    for t, r in d.get("types", {}).items():
        ref = r.get("llama.cpp", {})
        for label in ("medtune export", "medtune writer"):
            if label in r:
                m = r[label]
                out.append(
                    row(
                        "export",
                        f"{label} {t}: time",
                        m.get("seconds"),
                        "llama.cpp convert_hf_to_gguf.py",
                        ref.get("seconds"),
                        "s",
                        target="≤ 0.5",
                    )
                )
                out.append(
                    row(
                        "export",
                        f"{label} {t}: peak RSS",
                        round(m["peak_rss"] / MB, 1) if m.get("peak_rss") else None,
                        "llama.cpp convert_hf_to_gguf.py",
                        round(ref["peak_rss"] / MB, 1) if ref.get("peak_rss") else None,
                        "MB",
                    )
                )
    return out


SOURCES = {"prepare.json": from_prepare, "train.json": from_train, "export.json": from_export}


def fmt(v) -> str:
    if v is None:
        return "—"
    return f"{v:,.2f}" if isinstance(v, float) else str(v)


def markdown(rows: list[dict], missing: list[str]) -> str:
    lines = [
        "# medtune benchmarks",
        "",
        "| benchmark | figure | medtune | peer | peer's figure | ratio | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = f"{r['ratio']:.2f}× ({r['better']} is better)" if r["ratio"] is not None else "—"
        lines.append(
            f"| {r['bench']} | {r['what']} | {fmt(r['medtune'])} {r['unit']} | {r['peer']} | "
            f"{fmt(r['peer_value'])} {r['unit']} | {ratio} | {r['target'] or ''} |"
        )
    if missing:
        lines += ["", "Missing: " + ", ".join(missing) + " (run `make bench`)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("bench"))
    a = ap.parse_args(argv)
    rows, missing, sources = [], [], {}
    for name, extract in SOURCES.items():
        path = a.dir / name
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            missing.append(f"{name} ({type(exc).__name__})")
            continue
        sources[name] = str(path)
        rows += extract(data)
    a.dir.mkdir(parents=True, exist_ok=True)
    (a.dir / "results.json").write_text(
        json.dumps({"figures": rows, "sources": sources, "missing": missing}, indent=2, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    md = markdown(rows, missing)
    (a.dir / "results.md").write_text(md, encoding="utf-8")
    sys.stdout.write(md)
    print(f"wrote {a.dir / 'results.json'} and {a.dir / 'results.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
