"""`medtune doctor`: what this machine is and what medtune can do on it."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

PACKAGES = (
    "mlx",
    "mlx-lm",
    "transformers",
    "gguf",
    "llama-cpp-python",
    "torch",
    "peft",
    "unsloth",
    "bitsandbytes",
    "ollama",
    "huggingface-hub",
    "typer",
    "rich",
)


def _versions() -> dict:
    from medtune.core.versions import versions

    return versions(PACKAGES, missing=True, own=False)


def _cpu() -> dict:
    name = platform.processor() or platform.machine()
    if sys.platform.startswith("linux"):
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    elif sys.platform == "darwin":
        try:
            name = (
                subprocess.run(
                    ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
                ).stdout.strip()
                or name
            )
        except (OSError, subprocess.SubprocessError):
            pass
    return {"name": name, "cores": os.cpu_count(), "machine": platform.machine()}


def _gpu() -> dict:
    if shutil.which("nvidia-smi"):
        try:
            res = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            )
            gpus = [line.strip() for line in res.stdout.splitlines() if line.strip()]
            return {"cuda": bool(gpus), "devices": gpus}
        except (OSError, subprocess.SubprocessError):
            pass
    if sys.platform == "darwin" and platform.machine() == "arm64":
        return {"cuda": False, "devices": ["Apple Silicon GPU (Metal)"]}
    return {"cuda": False, "devices": []}


def _memory() -> dict:
    try:
        if sys.platform.startswith("linux"):
            info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
            kb = lambda k: int(info[k].strip().split()[0]) * 1024  # noqa: E731
            return {"total_gb": round(kb("MemTotal") / 1e9, 1), "available_gb": round(kb("MemAvailable") / 1e9, 1)}
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return {"total_gb": round(total / 1e9, 1), "available_gb": None}
    except (OSError, ValueError, KeyError):
        return {"total_gb": None, "available_gb": None}


def _disk(paths) -> dict:
    out = {}
    for p in paths:
        p = Path(p)
        while not p.exists():
            p = p.parent
        usage = shutil.disk_usage(p)
        out[str(p)] = {"free_gb": round(usage.free / 1e9, 1), "total_gb": round(usage.total / 1e9, 1)}
    return out


def ollama_host() -> str:
    """$OLLAMA_HOST read the way Ollama's clients read it (default port 11434); a bad value is reported as is."""
    from medtune.core.errors import BadInput
    from medtune.ollama import resolve_host

    try:
        return resolve_host()
    except BadInput:
        return os.environ.get("OLLAMA_HOST", "")


def _ollama() -> dict:
    host = ollama_host()
    try:
        with urllib.request.urlopen(f"{host}/api/version", timeout=1.5) as resp:
            return {
                "host": host,
                "reachable": True,
                "version": json.loads(resp.read()).get("version"),
                "cli": shutil.which("ollama"),
            }
    except (OSError, ValueError) as exc:
        return {
            "host": host,
            "reachable": False,
            "error": str(getattr(exc, "reason", exc)),
            "cli": shutil.which("ollama"),
        }


def _mlx() -> dict:
    from medtune.core import runtime

    blas = runtime.setup()
    info = {"blas": {"wanted": blas.wanted, "active": blas.active, "path": blas.path, "reason": blas.reason}}
    try:
        mx = runtime.mx()
    except Exception as exc:  # noqa: BLE001 - report, never crash the doctor
        info["error"] = str(exc).splitlines()[0]
        return info
    info["device"] = str(mx.default_device())
    a = mx.random.normal((512, 512))
    mx.eval(a @ a)
    tic = time.perf_counter()
    for _ in range(8):
        mx.eval(a @ a)
    info["matmul_gflops"] = round(8 * 2 * 512**3 / (time.perf_counter() - tic) / 1e9, 1)
    return info


def _llama_cpp() -> dict:
    from medtune.runtimes import tools

    return tools.describe()


def doctor() -> dict:
    from medtune.core.paths import cache_dir

    report = {
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "cpu": _cpu(),
        "gpu": _gpu(),
        "memory": _memory(),
        "disk": _disk([Path.cwd(), cache_dir()]),
        "cache": str(cache_dir()),
        "versions": _versions(),
        "mlx": _mlx(),
        "llama_cpp": _llama_cpp(),
        "ollama": _ollama(),
    }
    report["advice"] = advice(report)
    return report


def advice(r: dict) -> list[str]:
    tips = []
    blas = r["mlx"].get("blas", {})
    if blas.get("wanted") and not blas.get("active"):
        tips.append(
            "MLX on Linux runs ~20x faster with OpenBLAS: sudo apt-get install libopenblas0-pthread "
            "(or set MEDTUNE_OPENBLAS=/path/to/libopenblas.so.0)"
        )
    if r["versions"].get("llama-cpp-python") is None:
        tips.append(
            'llama-cpp-python (the GGUF runtime used to verify exports) is missing: pip install "medtune[test]"'
        )
    missing = [t["name"] for t in r["llama_cpp"]["tools"] if not t["path"]]
    if missing:
        from medtune.runtimes.tools import INSTALL_HINT

        tips.append(
            f"llama.cpp's {', '.join(missing)} not found (fidelity in llama-server, KL divergence of quants, "
            f"K-quants): {INSTALL_HINT}"
        )
    if not r["ollama"]["reachable"]:
        tips.append(
            f"Ollama is not reachable at {r['ollama']['host']}: install it from ollama.com and run `ollama serve` "
            "to use `ollama create`; the GGUF and Modelfile are written either way"
        )
    avail = r["memory"].get("available_gb")
    if avail is not None and avail < 4:
        tips.append(f"only {avail} GB of memory available: train with --batch-size 1 and fewer --num-layers")
    return tips
