"""report.md and a self-contained report.html (inline CSS and SVG, no script, no server) for `medtune eval`."""

from __future__ import annotations

from html import escape

COLUMNS = [  # (key, heading, format)
    ("val_loss", "val loss", "{:.3f}"),
    ("val_ppl", "val ppl", "{:.2f}"),
    ("mc_accuracy", "MC accuracy", "{:.0%}"),
    ("stop_rate", "stop rate", "{:.0%}"),
    ("mean_tokens", "mean tokens", "{:.1f}"),
    ("think_present", "think present", "{:.0%}"),
    ("think_ok", "think well-formed", "{:.0%}"),
    ("repetition_rate", "repeated 4-grams", "{:.1%}"),
]


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
            r["file"].rsplit("/", 1)[-1],
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
        + (best.rsplit("/", 1)[-1] if best else "none of them (keep the unquantized file)")
        + "."
    )


def metric_rows(report: dict) -> list[list[str]]:
    rows = []
    for e in report["models"]:
        m = e["metrics"]
        rows.append([e["label"], e["kind"]] + [_fmt(m.get(k), f) for k, _, f in COLUMNS] + [_fid(e)])
    return rows


def headings() -> list[str]:
    return ["model", "runtime"] + [h for _, h, _ in COLUMNS] + ["fidelity"]


def render_markdown(report: dict) -> str:
    out = [
        f"# medtune eval: {report['model']}",
        "",
        f"Held-out: `{report['held_out']}`; probes: `{report['probes']}`; greedy, at most {report['max_tokens']} tokens.",
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
    for q in report["questions"]:
        prompt = q["messages"][-1]["content"]
        out += [f"## {q['id']} ({q['source']})", "", "> " + prompt.replace("\n", "\n> "), ""]
        for label, a in q["answers"].items():
            flag = "stopped" if a["finish_reason"] == "stop" else "cut at max tokens"
            out += [
                f"**{label}** ({a['tokens']} tokens, {flag}, think: {a['think']}, repeated 4-grams {a['repetition']:.0%})",
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
        f'<p class="meta">held-out: {h(str(report["held_out"]))}; probes: {h(report["probes"])}; greedy decoding, '
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
    labels = [e["label"] for e in report["models"]]
    out += ["<h2>Answers</h2>", '<table class="answers" id="answers"><thead><tr><th>question</th>']
    out += [f"<th>{h(label)}</th>" for label in labels]
    out.append("</tr></thead><tbody>")
    for q in report["questions"]:
        prompt = q["messages"][-1]["content"]
        out.append(f'<tr><td><b>{h(q["id"])}</b> <span class="meta">({h(q["source"])})</span>\n{h(prompt)}</td>')
        for label in labels:
            a = q["answers"][label]
            stopped = a["finish_reason"] == "stop"
            meta = (
                f'<div class="meta"><span class="{"ok" if stopped else "cut"}">'
                f"{'stopped' if stopped else 'cut at max tokens'}</span>, {a['tokens']} tokens, think: {h(a['think'])}, "
                f"repeated 4-grams {a['repetition']:.0%}</div>"
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
