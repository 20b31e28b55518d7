"""report.md and a self-contained report.html (inline CSS and SVG, no script, no server) for `medtune eval`."""

from __future__ import annotations

from html import escape

COLUMNS = [  # (key, heading, format)
    ("val_loss", "val loss", "{:.3f}"),
    ("val_ppl", "val ppl", "{:.2f}"),
    ("mc_accuracy", "MC accuracy", "{:.0%}"),
    ("pref_accuracy", "preference accuracy", "{:.0%}"),
    ("pref_margin", "preference margin (nats)", "{:.3f}"),
    ("pref_margin_vs_base", "margin vs base", "{:+.3f}"),
    ("stop_rate", "stop rate", "{:.0%}"),
    ("mean_tokens", "mean tokens", "{:.1f}"),
    ("think_present", "think present", "{:.0%}"),
    ("think_ok", "think well-formed", "{:.0%}"),
    ("repetition_rate", "repeated 4-grams", "{:.1%}"),
    ("leak_rate", "leaked special tokens", "{:.0%}"),
    ("empty_after_think", "empty after think", "{:.0%}"),
]
BAR_COLOURS = ("#7f7f7f", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2")


def _fmt(value, fmt: str) -> str:
    return "—" if value is None else fmt.format(value)


def _fid(entry: dict) -> str:
    f = entry.get("fidelity")
    if not f:
        return "—"
    if "skipped" in f:
        return "skipped"
    s = f["summary"]
    verdict = "pass" if f["passed"] else "FAIL"
    where = f" ({f['runtime']})" if f.get("runtime") else ""
    templates = f", template {s['templates_equal']}/{s['templates']}" if s.get("templates") else ""
    greedy = f"greedy {s['continuations_equal']}/{s['prompts']}" + ("" if f["judged"] else " not judged")
    return f"{f['file_type']} {verdict}{where}: tokens {s['tokens_equal']}/{s['prompts']}, {greedy}{templates}"


QUANT_HEADINGS = ["file", "type", "size", "mean KLD", "p99 KLD", "same top", "ΔPPL", "verdict"]


def quant_rows(report: dict) -> list[list[str]]:
    q = report.get("quants") or {}
    return [
        [
            r.get("name") or r["file"].rsplit("/", 1)[-1],
            r["file_type"],
            f"{r['bytes'] / 1e6:.0f} MB",
            f"{r['mean_kld']:.4f}",
            f"{r['p99_kld']:.3f}",
            f"{100 * r['same_top']:.1f}%",
            f"{r['delta_ppl']:+.3f}",
            r["verdict"] + (f" ({r['why']})" if r.get("why") else ""),
        ]
        for r in q.get("rows", [])
    ]


def quant_summary(report: dict) -> str:
    q = report.get("quants")
    if not q:
        return ""
    best = q.get("recommended")
    t = q["thresholds"]
    return (
        f"Quantized files against {q['reference'].rsplit('/', 1)[-1]} ({q['reference_type']}, PPL "
        f"{q['reference_ppl']:.3f}), teacher-forced on {q['positions']} held-out answer tokens (KL divergence in nats, "
        f"as llama-perplexity --kl-divergence). good: mean KLD ≤ {t['good']['mean_kld']}, p99 ≤ {t['good']['p99_kld']}, "
        f"same top ≥ {t['good']['same_top']:.0%}; usable: ≤ {t['usable']['mean_kld']}, ≤ {t['usable']['p99_kld']}, "
        f"≥ {t['usable']['same_top']:.0%}. Recommended: "
        + (
            (q.get("recommended_name") or best.rsplit("/", 1)[-1])
            if best
            else "none of them (keep the unquantized file)"
        )
        + "."
    )


def metric_rows(report: dict) -> list[list[str]]:
    rows = []
    for e in report["models"]:
        m = e["metrics"]
        rows.append([e["label"], e["kind"]] + [_fmt(m.get(k), f) for k, _, f in COLUMNS] + [_fid(e)])
    return rows


def bench_table(report: dict, name: str) -> tuple[list[str], list[list[str]]]:
    """(headings, rows) of one benchmark: a row per subject, then overall (micro) and the mean over subjects."""
    cols = report["benchmarks"][name]
    labels = list(cols)
    subjects = sorted({s for r in cols.values() for s in r["subjects"]})

    def cell(r: dict | None) -> str:
        return "—" if r is None else f"{r['accuracy']:.1%} ({r['correct']}/{r['questions']})"

    rows = [[s] + [cell(cols[k]["subjects"].get(s)) for k in labels] for s in subjects]
    rows.append(["overall"] + [cell(cols[k]["overall"]) for k in labels])
    rows.append(["mean of subjects"] + [f"{cols[k]['macro']:.1%}" for k in labels])
    return ["subject"] + labels, rows


def bench_caption(report: dict, name: str) -> str:
    i = report.get("benchmark_info", {}).get(name, {})
    shots = f"{i.get('shots', 0)}-shot" if i.get("shots") else "zero-shot"
    return (
        f"{i.get('title', name)}: {i.get('questions', '?')} questions, {shots}, scored by {i.get('scoring', '?')}"
        + (f"; source {i['source']}" if i.get("source") else "")
    )


def svg_bench_bars(report: dict, name: str, width: int = 720, height: int = 240) -> str:
    """Accuracy per subject and overall, one bar per model (base, tuned, each GGUF), as an inline SVG."""
    cols = report["benchmarks"][name]
    labels = list(cols)
    groups = sorted({s for r in cols.values() for s in r["subjects"]}) + ["overall"]
    pad_l, pad_b, pad_t = 40, 60, 25
    gw = (width - pad_l - 10) / max(len(groups), 1)
    bw = gw * 0.8 / max(len(labels), 1)
    ph = height - pad_b - pad_t
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="{escape(name)} accuracy"><rect width="100%" height="100%" fill="#fff"/>'
    ]
    for frac in (0, 0.5, 1):
        y = pad_t + ph * (1 - frac)
        parts.append(f'<line x1="{pad_l}" y1="{y:.1f}" x2="{width - 10}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{pad_l - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{frac:.0%}</text>')
    for gi, g in enumerate(groups):
        x0 = pad_l + gi * gw + gw * 0.1
        for li, label in enumerate(labels):
            r = cols[label]["overall"] if g == "overall" else cols[label]["subjects"].get(g)
            if r is None:
                continue
            bh = ph * r["accuracy"]
            parts.append(
                f'<rect x="{x0 + li * bw:.1f}" y="{pad_t + ph - bh:.1f}" width="{bw * 0.9:.1f}" height="{bh:.1f}" '
                f'fill="{BAR_COLOURS[li % len(BAR_COLOURS)]}"><title>{escape(label)} {escape(g)}: '
                f"{r['accuracy']:.1%}</title></rect>"
            )
        parts.append(
            f'<text x="{x0 + gw * 0.4:.1f}" y="{height - pad_b + 14}" font-size="10" text-anchor="middle">'
            f"{escape(g[:18])}</text>"
        )
    for li, label in enumerate(labels):
        parts.append(
            f'<text x="{pad_l + 120 * li}" y="14" font-size="11" fill="{BAR_COLOURS[li % len(BAR_COLOURS)]}">'
            f"■ {escape(label)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def headings() -> list[str]:
    return ["model", "runtime"] + [h for _, h, _ in COLUMNS] + ["fidelity"]


def render_markdown(report: dict) -> str:
    out = [
        f"# medtune eval: {report['model']}",
        "",
        f"Held-out: `{report['held_out']}`; "
        + (f"pairs: `{report['pairs']}`; " if report.get("pairs") else "")
        + f"probes: `{report['probes']}`; greedy, at most {report['max_tokens']} tokens.",
        "",
    ]
    out.append("| " + " | ".join(headings()) + " |")
    out.append("|" + "---|" * len(headings()))
    for r in metric_rows(report):
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    out.append("")
    out += [f"> {n}" for n in report.get("notes") or []] + ([""] if report.get("notes") else [])
    if report.get("quants"):
        out += [
            "## Quantized files",
            "",
            quant_summary(report),
            "",
            "| " + " | ".join(QUANT_HEADINGS) + " |",
            "|" + "---|" * len(QUANT_HEADINGS),
        ]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in quant_rows(report)] + [""]
    for name in report.get("benchmarks") or {}:
        heads, rows = bench_table(report, name)
        out += [f"## Benchmark: {name}", "", bench_caption(report, name), "", "| " + " | ".join(heads) + " |"]
        out += ["|" + "---|" * len(heads)] + ["| " + " | ".join(r) + " |" for r in rows] + [""]
    for q in report["questions"]:
        prompt = q["messages"][-1]["content"]
        out += [f"## {q['id']} ({q['source']})", "", "> " + prompt.replace("\n", "\n> "), ""]
        if q.get("reference"):
            out += ["**reference** (the dataset's answer)", "", q["reference"], ""]
        for label, a in q["answers"].items():
            flag = "stopped" if a["finish_reason"] == "stop" else "cut at max tokens"
            out += [
                f"**{label}** ({a['tokens']} tokens, {flag}, think: {a['think']}, repeated 4-grams {a['repetition']:.0%}"
                + (f", leaked {' '.join(a['leaked'])}" if a.get("leaked") else "")
                + ")",
                "",
            ]
            if a["reasoning"]:
                out += ["<details><summary>reasoning</summary>", "", a["reasoning"], "", "</details>", ""]
            out += [a["answer"] or "*(no answer)*", ""]
    return "\n".join(out) + "\n"


def svg_curves(curves: dict, width: int = 640, height: int = 260) -> str:
    """Train and validation loss as an inline SVG line chart."""
    series = [(name, colour, curves.get(name) or []) for name, colour in (("train", "#1f77b4"), ("val", "#d62728"))]
    points = [p for _, _, s in series for p in s]
    if not points:
        return ""
    pad_l, pad_r, pad_t, pad_b = 50, 15, 15, 35
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def sx(x):
        return pad_l + (x - x0) / (x1 - x0) * (width - pad_l - pad_r)

    def sy(y):
        return height - pad_b - (y - y0) / (y1 - y0) * (height - pad_t - pad_b)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="loss curves"><rect width="100%" height="100%" fill="#fff"/>',
        f'<line x1="{pad_l}" y1="{height - pad_b}" x2="{width - pad_r}" y2="{height - pad_b}" stroke="#999"/>',
        f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{height - pad_b}" stroke="#999"/>',
    ]
    for frac in (0, 0.5, 1):
        y = y0 + frac * (y1 - y0)
        parts.append(f'<text x="{pad_l - 5}" y="{sy(y) + 4:.1f}" font-size="11" text-anchor="end">{y:.3g}</text>')
    for x in sorted({x0, x1}):
        parts.append(
            f'<text x="{sx(x):.1f}" y="{height - pad_b + 15}" font-size="11" text-anchor="middle">{x:g}</text>'
        )
    parts.append(
        f'<text x="{(width + pad_l) / 2:.0f}" y="{height - 5}" font-size="11" text-anchor="middle">step</text>'
    )
    for i, (name, colour, s) in enumerate(series):
        if not s:
            continue
        pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{pts}"/>')
        for x, y in s if name == "val" else []:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>')
        parts.append(
            f'<text x="{width - pad_r - 5}" y="{pad_t + 12 + 14 * i}" font-size="12" text-anchor="end" '
            f'fill="{colour}">{name} loss</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em;color:#222;max-width:1400px}
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f3f3f3}.answers td{white-space:pre-wrap;font-size:13px;min-width:220px}
.meta{color:#666;font-size:12px}.note{color:#b00;font-weight:bold}.cut{color:#b00}.ok{color:#070}details{color:#555;margin-bottom:.5em}
"""


def render_html(report: dict) -> str:
    h = escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>medtune eval: {h(report['model'])}</title><style>{CSS}</style></head><body>",
        f"<h1>medtune eval: {h(report['model'])}</h1>",
        f'<p class="meta">held-out: {h(str(report["held_out"]))}; '
        + (f"pairs: {h(str(report['pairs']))}; " if report.get("pairs") else "")
        + f"probes: {h(report['probes'])}; greedy decoding, "
        f"repeat penalty {report.get('repeat_penalty')} over {report.get('repeat_last_n')} tokens, "
        f"at most {report['max_tokens']} tokens; created {h(report['created'])}</p>",
    ]
    svg = svg_curves(report.get("curves") or {})
    if svg:
        out += ["<h2>Training loss</h2>", svg, f'<p class="meta">from {h(report["curves"].get("source", ""))}</p>']
    out += ["<h2>Metrics</h2>", '<table id="metrics"><thead><tr>']
    out += [f"<th>{h(c)}</th>" for c in headings()]
    out.append("</tr></thead><tbody>")
    for r in metric_rows(report):
        out.append("<tr>" + "".join(f"<td>{h(c)}</td>" for c in r) + "</tr>")
    out.append("</tbody></table>")
    out += [f'<p class="note">{h(n)}</p>' for n in report.get("notes") or []]
    if report.get("quants"):
        out += [
            "<h2>Quantized files</h2>",
            f'<p class="meta">{h(quant_summary(report))}</p>',
            '<table id="quants"><tr>',
        ]
        out += [f"<th>{h(c)}</th>" for c in QUANT_HEADINGS] + ["</tr>"]
        out += ["<tr>" + "".join(f"<td>{h(c)}</td>" for c in r) + "</tr>" for r in quant_rows(report)]
        out.append("</table>")
    for name in report.get("benchmarks") or {}:
        heads, rows = bench_table(report, name)
        out += [f"<h2>Benchmark: {h(name)}</h2>", f'<p class="meta">{h(bench_caption(report, name))}</p>']
        out += [svg_bench_bars(report, name), f'<table class="bench" id="bench-{h(name)}"><tr>']
        out += [f"<th>{h(c)}</th>" for c in heads] + ["</tr>"]
        out += ["<tr>" + "".join(f"<td>{h(c)}</td>" for c in r) + "</tr>" for r in rows] + ["</table>"]
    labels = [e["label"] for e in report["models"]]
    out += ["<h2>Answers</h2>", '<table class="answers" id="answers"><thead><tr><th>question</th>']
    out += ["<th>reference</th>"] + [f"<th>{h(label)}</th>" for label in labels]
    out.append("</tr></thead><tbody>")
    for q in report["questions"]:
        prompt = q["messages"][-1]["content"]
        out.append(f'<tr><td><b>{h(q["id"])}</b> <span class="meta">({h(q["source"])})</span>\n{h(prompt)}</td>')
        out.append(f"<td>{h(q['reference']) if q.get('reference') else '—'}</td>")
        for label in labels:
            a = q["answers"][label]
            stopped = a["finish_reason"] == "stop"
            meta = (
                f'<div class="meta"><span class="{"ok" if stopped else "cut"}">'
                f"{'stopped' if stopped else 'cut at max tokens'}</span>, {a['tokens']} tokens, think: {h(a['think'])}, "
                f"repeated 4-grams {a['repetition']:.0%}"
                + (f', <span class="cut">leaked {h(" ".join(a["leaked"]))}</span>' if a.get("leaked") else "")
                + "</div>"
            )
            think = f"<details><summary>reasoning</summary>{h(a['reasoning'])}</details>" if a["reasoning"] else ""
            out.append(f"<td>{meta}{think}{h(a['answer']) or '<i>(no answer)</i>'}</td>")
        out.append("</tr>")
    out.append("</tbody></table>")
    if report.get("multiple_choice"):
        out.append(
            f"<p>{len(report['multiple_choice'])} multiple-choice question(s), each option scored by its mean "
            "token log-likelihood.</p>"
        )
    out.append("</body></html>")
    return "\n".join(out) + "\n"
