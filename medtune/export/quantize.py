"""GGUF types, and the quantization that our streaming writer cannot do itself.

Two kinds of output type:

- written directly by medtune's writer (gguf_writer.py, gguf-py's numpy quantizers): f32, f16, bf16,
  q8_0, q4_0;
- K-quants (q4_k_m, q4_k_s, q5_k_m, q5_k_s, q6_k, q3_k_m, q2_k): llama.cpp's own quantizer turns an F16
  GGUF into them, with its per-tensor choices (Q6_K for the output/embedding and some ffn_down/attn_v,
  fallbacks for rows that do not fill 256-wide super-blocks).

llama.cpp's quantizer is, in order of preference: a `llama-quantize` binary in the llama.cpp folder the
user configured (`--llama-cpp DIR` / LLAMA_CPP_DIR), llama-cpp-python's `llama_model_quantize`, a
`llama-quantize` on PATH. The API runs in a child process too: a failing GGML assertion aborts the
process that hosts it, and llama.cpp prints its progress on the C-level stderr, which we want to read.
MEDTUNE_QUANTIZE_API=0 makes medtune ignore llama-cpp-python (to test the message a user without any
quantizer gets, or to force the binary).
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from medtune.core.errors import BadInput, MedtuneError, MissingDependency
from medtune.export.gguf_reader import file_type, file_type_name

WRITER_TYPES = ("f16", "f32", "bf16", "q8_0", "q4_0")
# Made by llama.cpp's quantizer; llama.cpp's name for each (LLAMA_FTYPE_MOSTLY_<name>, and llama-quantize's type
# argument) is gguf_reader.file_type_name(file_type(q)).
KQUANTS = ("q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "q3_k_m", "q2_k")
ALIASES = {
    "q4_k": "q4_k_m",
    "q5_k": "q5_k_m",
    "q3_k": "q3_k_m",
    "fp16": "f16",
    "fp32": "f32",
    "float16": "f16",
    "float32": "f32",
    "bfloat16": "bf16",
}
ALL_TYPES = WRITER_TYPES + KQUANTS
# Approximate bits per weight of the whole file, for the disk check.
BITS = {
    "f32": 32,
    "f16": 16,
    "bf16": 16,
    "q8_0": 8.5,
    "q4_0": 4.6,
    "q4_k_m": 5.0,
    "q4_k_s": 4.7,
    "q5_k_m": 5.8,
    "q5_k_s": 5.6,
    "q6_k": 6.6,
    "q3_k_m": 4.0,
    "q2_k": 3.5,
}
# The intermediate every K-quant is made from: always F16, so that `--quant q4_k_m` and
# `--quant f16,q4_k_m` give the same Q4_K_M file.
SOURCE_TYPE = "f16"

API_ENV = "MEDTUNE_QUANTIZE_API"
_PROGRESS_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")


def parse_quants(values) -> list[str]:
    """ "f16,q4_k_m" / ["f16", "Q8_0,q4_k_m"] -> ["f16", "q8_0", "q4_k_m"] (lower-case, deduplicated, checked)."""
    if values is None:
        values = []
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        for part in re.split(r"[,\s]+", str(value)):
            q = part.strip().lower()
            if not q:
                continue
            q = ALIASES.get(q, q)
            if q not in ALL_TYPES:
                raise BadInput(
                    f"unknown GGUF type {part!r}",
                    hint=f"choose from: {', '.join(ALL_TYPES)} (several at once: --quant f16,q4_k_m)",
                )
            if q not in out:
                out.append(q)
    if not out:
        raise BadInput("no GGUF type asked for", hint=f"choose from: {', '.join(ALL_TYPES)}")
    return out


# ---- finding llama.cpp's quantizer ----------------------------------------------------------------
@dataclass
class Quantizer:
    kind: str  # "api" (llama-cpp-python's llama_model_quantize) or "binary" (llama-quantize)
    path: Path | None = None

    def describe(self) -> str:
        if self.kind == "api":
            return f"llama-cpp-python {_version('llama_cpp_python') or ''}".strip() + " (llama_model_quantize)"
        return str(self.path)


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def binary_in(folder: Path) -> Path | None:
    """A llama-quantize executable (or its old name, quantize) in a llama.cpp checkout/build/release folder."""
    from medtune.runtimes import tools

    return tools.in_folder(folder, "llama-quantize") or tools.in_folder(folder, "quantize")


def api_available() -> bool:
    """llama-cpp-python is importable (not imported here: loading its native library takes a while)."""
    import importlib.util

    if _api_disabled():
        return False
    return importlib.util.find_spec("llama_cpp") is not None


def _api_disabled() -> bool:
    return os.environ.get(API_ENV, "1").strip().lower() in ("0", "false", "no", "off")


def find_quantizer(llama_cpp_dir: str | Path | None = None) -> Quantizer | None:
    folder = llama_cpp_dir or os.environ.get("LLAMA_CPP_DIR")
    if folder:
        found = binary_in(Path(folder).expanduser())
        if found:
            return Quantizer("binary", found)
    if api_available():
        return Quantizer("api")
    from medtune.runtimes import tools

    found = tools.find("llama-quantize")  # PATH, then medtune's own llama.cpp build
    return Quantizer("binary", found) if found else None


def missing_quantizer(wanted: list[str], llama_cpp_dir=None) -> MissingDependency:
    folder = llama_cpp_dir or os.environ.get("LLAMA_CPP_DIR")
    looked = [f"no llama-quantize in {folder}"] if folder else []
    looked.append(
        f"llama-cpp-python disabled by {API_ENV}=0" if _api_disabled() else "llama-cpp-python is not installed"
    )
    looked.append("no llama-quantize on PATH")
    return MissingDependency(
        f"{', '.join(wanted)} needs llama.cpp's quantizer and none was found ({', '.join(looked)})",
        hint="pip install llama-cpp-python (its llama_model_quantize is used), or build llama.cpp "
        "(cmake -B build && cmake --build build --target llama-quantize) and pass --llama-cpp DIR or set "
        "LLAMA_CPP_DIR; or export f16 and let Ollama quantize: ollama create NAME --quantize q4_K_M -f Modelfile",
    )


# ---- running it --------------------------------------------------------------------------------------
# Run in a child Python: only llama_cpp is needed there, not medtune.
_API_SCRIPT = """
import ctypes, sys
import llama_cpp
src, dst, ftype = sys.argv[1], sys.argv[2], sys.argv[3]
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + ftype)
params.nthread = int(sys.argv[4])
sys.exit(1 if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) else 0)
"""


def quantize_gguf(
    src: str | Path,
    dst: str | Path,
    qtype: str,
    quantizer: Quantizer,
    progress=None,
    *,
    label: str | None = None,
    threads: int = 0,
) -> dict:
    """Quantize the F16/F32 GGUF `src` to `dst` (written under a temporary name, renamed when complete)."""
    from medtune.core import fsutil

    if qtype not in KQUANTS and qtype not in ("q4_0", "q8_0"):
        raise BadInput(f"{qtype} is not made by llama.cpp's quantizer here", hint=f"K-quants: {', '.join(KQUANTS)}")
    src, dst = Path(src), Path(dst)
    kind = file_type_name(file_type(qtype))  # llama.cpp's name: Q4_K_M
    with fsutil.atomic_path(dst) as tmp:
        if quantizer.kind == "api":
            cmd = [sys.executable, "-c", _API_SCRIPT, str(src), str(tmp), kind, str(threads)]
        else:
            cmd = [str(quantizer.path), str(src), str(tmp), kind] + ([str(threads)] if threads else [])
        run_tool(
            cmd,
            f"llama.cpp's quantizer ({quantizer.describe()})",
            progress=progress,
            label=label or f"quantizing {dst.name}",
            counter=_PROGRESS_LINE,
            hint="no GGUF was written; re-run with --debug for the quantizer's full output, or export f16 and "
            "quantize in Ollama: ollama create NAME --quantize q4_K_M -f Modelfile",
        )
        if not tmp.is_file() or tmp.stat().st_size == 0:
            raise MedtuneError(
                f"llama.cpp's quantizer reported success but wrote no {dst.name}",
                hint="re-run with --debug to see its output",
            )
    return {
        "path": str(dst),
        "outtype": qtype,
        "file_type": file_type(qtype),
        "bytes": dst.stat().st_size,
        "quantized_from": str(src),
        "quantizer": quantizer.describe(),
    }


def run_tool(
    cmd: list[str],
    what: str,
    *,
    progress=None,
    label: str = "",
    counter: re.Pattern | None = None,
    hint: str = "",
    env: dict | None = None,
    error=MedtuneError,
    tail_lines: int = 12,
) -> list[str]:
    """Run an external tool, its stdout and stderr merged and read line by line.

    Lines matching `counter` (`[  3/ 20]`) advance a progress task. Under --debug (MEDTUNE_DEBUG=1) every
    line is echoed to stderr as it comes. A non-zero exit raises `error` with the last meaningful line as the
    message and the tail of the output in the hint. Returns the tail.
    """
    debug = os.environ.get("MEDTUNE_DEBUG") == "1"
    if progress is not None and not all(hasattr(progress, a) for a in ("add_task", "update", "remove_task")):
        progress = None  # a minimal progress object (a notebook's): no live counter
    task = progress.add_task(label, total=None) if progress else None
    tail: collections.deque[str] = collections.deque(maxlen=200)
    try:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
        )
    except OSError as exc:
        raise error(f"cannot start {what}: {exc}", hint=hint) from exc
    with contextlib.ExitStack() as stack:
        stack.callback(_reap, proc)
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            if debug:
                sys.stderr.write(line + "\n")
            if progress and counter:
                m = counter.match(line)
                if m:
                    progress.update(task, completed=int(m.group(1)), total=int(m.group(2)))
        rc = proc.wait()
    if progress:
        progress.remove_task(task)
    if rc != 0:
        lines = [ln for ln in tail if ln.strip()]
        reason = _reason(rc, lines)
        shown = "\n  ".join(lines[-tail_lines:]) or "(no output)"
        more = "" if debug else " (--debug shows all of it)"
        raise error(
            f"{what} failed: {reason}",
            hint=f"{hint}\nlast lines of its output{more}:\n  {shown}"
            if hint
            else f"last lines of its output{more}:\n  {shown}",
        )
    return list(tail)


def _reap(proc: subprocess.Popen) -> None:
    """On an exception (Ctrl-C) while reading, do not leave the child running."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _reason(rc: int, lines: list[str]) -> str:
    import signal

    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = f"signal {-rc}"
        extra = (
            " (an instruction this CPU lacks: the native library was built for another CPU)" if name == "SIGILL" else ""
        )
        return f"killed by {name}{extra}"
    for ln in reversed(lines):  # a Python traceback ends with "SomeError: message"; C tools print "error: ..."
        s = ln.strip()
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b", s) or re.search(r"\berror\b|\bfailed\b", s, re.I):
            return s[:300]
    return lines[-1].strip()[:300] if lines else f"exit status {rc}"
