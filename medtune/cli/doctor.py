"""`medtune doctor`: what this machine is and what medtune found on it (medtune.core.doctor)."""

from __future__ import annotations

from medtune.cli.options import JsonOpt, emit_json
from medtune.core.console import console


def doctor(as_json: JsonOpt = False):
    """Check this machine: OS, CPU/GPU, MLX device and BLAS, package versions, llama.cpp's tools, Ollama, memory, disk."""
    from medtune.core.doctor import doctor as run

    report = run()
    if as_json:
        return emit_json(report)
    from rich.table import Table

    t = Table(show_header=False, box=None)
    t.add_row("OS", f"{report['os']}  (Python {report['python']})")
    t.add_row("CPU", f"{report['cpu']['name']}, {report['cpu']['cores']} cores")
    t.add_row("GPU", ", ".join(report["gpu"]["devices"]) or "none")
    m = report["mlx"]
    blas = m.get("blas", {})
    blas_line = (
        "n/a"
        if not blas.get("wanted")
        else (f"OpenBLAS bound ({blas['path']})" if blas.get("active") else f"NOT bound: {blas.get('reason')}")
    )
    t.add_row("MLX", f"{m.get('device', m.get('error'))}, float32 matmul {m.get('matmul_gflops', '?')} GFLOP/s")
    t.add_row("BLAS", blas_line)
    t.add_row("Versions", ", ".join(f"{k} {v or '—'}" for k, v in report["versions"].items()))
    for tool in report["llama_cpp"]["tools"]:
        t.add_row(tool["name"], f"{tool['path']} (llama.cpp {tool['version'] or '?'})" if tool["path"] else "not found")
    o = report["ollama"]
    t.add_row("Ollama", f"{o['host']}: " + (f"reachable, {o.get('version')}" if o["reachable"] else "not reachable"))
    mem = report["memory"]
    t.add_row("Memory", f"{mem.get('available_gb')} GB available of {mem.get('total_gb')} GB")
    for path, d in report["disk"].items():
        t.add_row("Disk", f"{d['free_gb']} GB free at {path}")
    console.print(t)
    for tip in report["advice"]:
        console.print(f"[yellow]•[/] {tip}")
