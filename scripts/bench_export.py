#!/usr/bin/env python
"""Benchmark medtune's GGUF export against llama.cpp's own converter (convert_hf_to_gguf.py).

The model is the embedded one (builtin:smollm2-135m, a float32 HF folder imported from its PyPI wheel).
Each run is a fresh child process, measured by a small wrapper process for wall time and peak RSS (the
wrapper's RUSAGE_CHILDREN covers exactly its one child):

  medtune export   `python -m medtune export MODEL --quant T`, the whole stage as a user runs it: checks,
                   GGUF, Modelfile (chat-template family detection) and the manifest with its sha256 hashes;
  medtune writer   medtune.export.gguf_writer.write_gguf alone: the GGUF file only, like for like with
  llama.cpp        `python convert_hf_to_gguf.py MODEL --outfile F --outtype T` (its own gguf-py first on
                   PYTHONPATH, as llama.cpp runs it).

The safetensors file is read once before timing, so every run finds it in the page cache. Each run is
repeated (--repeat) and the fastest time and the largest peak RSS are reported. Then the tensor data of
medtune's and llama.cpp's files are compared tensor by tensor (gguf.GGUFReader): names, types, shapes and
bytes; where they differ, by how much after de-quantization.

Targets (from the export issue): time <= 0.5x llama.cpp's converter; peak RSS <= largest tensor + 300 MB.

The llama.cpp source tree: --llama-cpp DIR, or LLAMA_CPP_DIR, or else extracted (once, into the medtune
cache) from the sdist of the installed llama-cpp-python (`pip download --no-deps --no-binary llama-cpp-python
llama-cpp-python==VERSION`), whose vendor/llama.cpp has convert_hf_to_gguf.py and gguf-py. The tests use
`llama_cpp_source()` from here too.

    .venv/bin/python scripts/bench_export.py [--types f16,q8_0] [--repeat 3] [--llama-cpp DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 1e6

# The wrapper: runs its arguments as one child and reports that child's wall time and peak RSS.
_WRAPPER = r"""
import json, resource, subprocess, sys, time
t0 = time.perf_counter()
rc = subprocess.call(sys.argv[2:])
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
with open(sys.argv[1], "w") as fh:
    json.dump({"rc": rc, "wall": wall, "maxrss": ru.ru_maxrss * scale, "cpu": ru.ru_utime + ru.ru_stime}, fh)
"""

# What a converter needs from the llama.cpp tree (the rest of the sdist is the C++ library).
_NEEDED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE", "requirements/", "requirements.txt")


def llama_cpp_source(cache: Path | None = None, *, timeout: int = 900) -> Path:
    """A llama.cpp source tree with convert_hf_to_gguf.py: LLAMA_CPP_DIR if set, else the tree medtune's llama.cpp
    build was made from (scripts/build_llama_cpp.sh), else the vendor/llama.cpp of the installed llama-cpp-python's
    sdist, downloaded with pip and extracted once into the cache. Raises RuntimeError saying why when it cannot."""
    from importlib import metadata

    from medtune.runtimes import tools

    env_dir = os.environ.get("LLAMA_CPP_DIR")
    if env_dir:
        if not (Path(env_dir) / "convert_hf_to_gguf.py").is_file():
            raise RuntimeError(f"LLAMA_CPP_DIR={env_dir} has no convert_hf_to_gguf.py")
        return Path(env_dir)
    if tools.source_tree():
        return tools.source_tree()
    try:
        version = metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError as exc:
        raise RuntimeError("llama-cpp-python is not installed: no sdist version to take llama.cpp from") from exc
    if cache is None:
        from medtune.core.paths import cache_dir

        cache = cache_dir() / "llama.cpp-src"
    dest = cache / f"llama-cpp-python-{version}"
    if (dest / "convert_hf_to_gguf.py").is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache))  # the sdist (74 MB) and the tree, until renamed
    try:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            "llama-cpp-python",
            "-d",
            str(tmp / "sdist"),
            f"llama-cpp-python=={version}",
        ]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"pip download of the llama-cpp-python {version} sdist failed: {exc}") from exc
        found = sorted((tmp / "sdist").glob("llama*cpp*python-*.tar.gz"))
        if res.returncode != 0 or not found:
            tail = (res.stderr or res.stdout).strip().splitlines()[-1:] or ["?"]
            raise RuntimeError(f"pip download of the llama-cpp-python {version} sdist failed: {tail[0]}")
        tree = tmp / "tree"
        with tarfile.open(found[0]) as tar:
            members = []
            for m in tar.getmembers():
                parts = m.name.split("/vendor/llama.cpp/", 1)
                if (
                    len(parts) == 2
                    and (m.isfile() or m.isdir())
                    and any(parts[1] == n or parts[1].startswith(n) for n in _NEEDED)
                ):
                    m.name = parts[1]
                    members.append(m)
            if not any(m.name == "convert_hf_to_gguf.py" for m in members):
                raise RuntimeError(f"{found[0].name} has no vendor/llama.cpp/convert_hf_to_gguf.py")
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tree, members=members, **kwargs)
        try:
            os.replace(tree, dest)
        except OSError:  # another process extracted it meanwhile
            if not (dest / "convert_hf_to_gguf.py").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def measure(cmd: list[str], log: Path, env: dict | None = None) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as fh:
        report = Path(fh.name)
    try:
        with open(log, "w") as out:
            subprocess.run(
                [sys.executable, "-c", _WRAPPER, str(report), *cmd],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
                check=False,
            )
        result = json.loads(report.read_text())
    finally:
        report.unlink(missing_ok=True)
    if result["rc"] != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise SystemExit(f"{' '.join(cmd[:3])} … failed (exit {result['rc']}); last lines of {log}:\n{tail}")
    return result


def compare(ours: Path, theirs: Path) -> dict:
    """Tensor-by-tensor comparison of two GGUF files' tensor data."""
    import gguf
    import numpy as np

    a, b = gguf.GGUFReader(str(ours)), gguf.GGUFReader(str(theirs))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    out = {
        "n_tensors": (len(ta), len(tb)),
        "only_ours": sorted(set(ta) - set(tb)),
        "only_theirs": sorted(set(tb) - set(ta)),
        "differ": [],
    }
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        same_type = x.tensor_type == y.tensor_type and list(x.shape) == list(y.shape)
        if same_type and np.array_equal(np.asarray(x.data).view(np.uint8), np.asarray(y.data).view(np.uint8)):
            continue
        row = {
            "name": name,
            "types": (x.tensor_type.name, y.tensor_type.name),
            "shapes": ([int(d) for d in x.shape], [int(d) for d in y.shape]),
        }
        try:
            fx = gguf.quants.dequantize(np.asarray(x.data), x.tensor_type).astype(np.float32).ravel()
            fy = gguf.quants.dequantize(np.asarray(y.data), y.tensor_type).astype(np.float32).ravel()
            if fx.size == fy.size:
                diff = np.abs(fx - fy)
                row.update(max_abs_diff=float(diff.max()), n_diff=int((diff > 0).sum()), n=int(fx.size))
        except Exception as exc:  # noqa: BLE001 - a type gguf-py cannot de-quantize: report the types only
            row["note"] = f"not compared numerically ({exc})"
        out["differ"].append(row)
    fa = {k for k in a.fields if not k.startswith("GGUF.")}
    fb = {k for k in b.fields if not k.startswith("GGUF.")}
    out["keys_only_ours"], out["keys_only_theirs"] = sorted(fa - fb), sorted(fb - fa)
    out["identical"] = not (out["only_ours"] or out["only_theirs"] or out["differ"])
    return out


def largest_tensor(model_dir: Path) -> tuple[str, int]:
    from medtune.export.gguf_writer import Checkpoint

    ckpt = Checkpoint(model_dir)
    width = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}
    sizes = {n: int(__import__("math").prod(s)) * width.get(ckpt.dtype[n], 4) for n, s in ckpt.shape.items()}
    name = max(sizes, key=sizes.get)
    return name, sizes[name]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--types", default="f16,q8_0", help="comma-separated: f16, f32, bf16, q8_0")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--llama-cpp", type=Path, default=None, help="llama.cpp checkout (default: LLAMA_CPP_DIR or the sdist)"
    )
    ap.add_argument("--work", type=Path, default=None, help="folder for the outputs (default: a temporary one)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()

    from medtune.models import pull

    model = Path(pull(args.model).path)
    lc = args.llama_cpp or llama_cpp_source()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    for f in model.glob("*.safetensors"):  # into the page cache, so that no run pays for the disk
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass
    big_name, big_bytes = largest_tensor(model)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    lc_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(lc / "gguf-py"), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
    }
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }

    results = {
        "model": str(model),
        "llama_cpp": str(lc),
        "largest_tensor": {"name": big_name, "bytes": big_bytes},
        "cpus": os.cpu_count(),
        "load_average": load,
        "types": {},
    }
    for t in [x.strip() for x in args.types.split(",") if x.strip()]:
        runs = {
            "medtune export": (
                [
                    sys.executable,
                    "-m",
                    "medtune",
                    "export",
                    str(model),
                    "--out",
                    str(work / "export"),
                    "--name",
                    "bench",
                    "--quant",
                    t,
                    "--modelfile",
                    str(work / "export" / "Modelfile"),
                ],
                env,
                work / "export" / f"bench-{t}.gguf",
            ),
            "medtune writer": (
                [
                    sys.executable,
                    "-c",
                    "import sys; from medtune.export.gguf_writer import write_gguf; "
                    "write_gguf(sys.argv[1], sys.argv[2], sys.argv[3])",
                    str(model),
                    str(work / f"writer-{t}.gguf"),
                    t,
                ],
                env,
                work / f"writer-{t}.gguf",
            ),
            "llama.cpp": (
                [
                    sys.executable,
                    str(lc / "convert_hf_to_gguf.py"),
                    str(model),
                    "--outfile",
                    str(work / f"llamacpp-{t}.gguf"),
                    "--outtype",
                    t,
                ],
                lc_env,
                work / f"llamacpp-{t}.gguf",
            ),
        }
        row = {}
        for label, (cmd, run_env, _) in runs.items():
            got = [measure(cmd, work / f"{label.replace(' ', '_')}-{t}.log", run_env) for _ in range(args.repeat)]
            row[label] = {
                "seconds": min(g["wall"] for g in got),
                "all_seconds": [round(g["wall"], 2) for g in got],
                "peak_rss": max(g["maxrss"] for g in got),
                "cpu_seconds": min(g["cpu"] for g in got),
            }
            print(
                f"[{t}] {label:15s} {row[label]['seconds']:6.2f} s  (runs: {row[label]['all_seconds']})  "
                f"peak RSS {row[label]['peak_rss'] / MB:7.1f} MB",
                file=sys.stderr,
            )
        ref = row["llama.cpp"]
        for label in ("medtune export", "medtune writer"):
            r = row[label]
            r["time_ratio"] = r["seconds"] / ref["seconds"]
            r["rss_ratio"] = r["peak_rss"] / ref["peak_rss"]
            r["rss_budget"] = big_bytes + 300 * MB
            r["meets_time"] = r["time_ratio"] <= 0.5
            r["meets_rss"] = r["peak_rss"] <= r["rss_budget"]
        row["compare_writer"] = compare(runs["medtune writer"][2], runs["llama.cpp"][2])
        row["compare_export"] = compare(runs["medtune export"][2], runs["llama.cpp"][2])
        results["types"][t] = row

    if args.json:
        print(json.dumps(results, indent=2, default=str))
        return
    print(f"model: {model}")
    print(f"llama.cpp: {lc}")
    print(
        f"largest tensor: {big_name}, {big_bytes / MB:.1f} MB in the checkpoint -> RSS budget "
        f"{(big_bytes + 300 * MB) / MB:.1f} MB; {os.cpu_count()} CPUs (load average before: {load}); "
        f"best of {args.repeat} runs (time = wall clock, CPU = user + system)"
    )
    for t, row in results["types"].items():
        ref = row["llama.cpp"]
        print(f"\n{t.upper()}")
        print(
            f"  {'':16s}{'time':>9s}{'CPU':>9s}{'peak RSS':>12s}{'time/llama.cpp':>16s}{'RSS/llama.cpp':>15s}  targets"
        )
        print(f"  {'llama.cpp':16s}{ref['seconds']:8.2f}s{ref['cpu_seconds']:8.2f}s{ref['peak_rss'] / MB:9.1f} MB")
        for label in ("medtune export", "medtune writer"):
            r = row[label]
            ok = f"time {'OK' if r['meets_time'] else 'MISSED'}, RSS {'OK' if r['meets_rss'] else 'MISSED'}"
            print(
                f"  {label:16s}{r['seconds']:8.2f}s{r['cpu_seconds']:8.2f}s{r['peak_rss'] / MB:9.1f} MB"
                f"{r['time_ratio']:15.2f}x{r['rss_ratio']:14.2f}x  {ok}"
            )
        for what in ("compare_writer", "compare_export"):
            c = row[what]
            line = "tensor data byte-identical" if c["identical"] else f"{len(c['differ'])} tensors differ"
            print(
                f"  {what.replace('compare_', 'medtune ')} vs llama.cpp: {c['n_tensors'][0]} / {c['n_tensors'][1]} "
                f"tensors, {line}"
            )
            for d in c["differ"][:10]:
                print(
                    f"    {d['name']}: types {d['types']}, shapes {d['shapes']}, max |diff| "
                    f"{d.get('max_abs_diff', '?')}, {d.get('n_diff', '?')} of {d.get('n', '?')} values differ"
                )
            for label, names in (("only in medtune's", c["only_ours"]), ("only in llama.cpp's", c["only_theirs"])):
                if names:
                    print(f"    tensors {label}: {', '.join(names)}")
        c = row["compare_writer"]
        if c["keys_only_ours"] or c["keys_only_theirs"]:
            print(
                f"  metadata keys only in medtune's: {c['keys_only_ours'] or '-'}; only in llama.cpp's: "
                f"{c['keys_only_theirs'] or '-'}"
            )
    print(f"\noutputs and logs: {work}")


if __name__ == "__main__":
    main()
