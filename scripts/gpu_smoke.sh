#!/usr/bin/env bash
# GPU smoke test of the PyTorch backends, in one command on a CUDA machine (Colab/Kaggle T4 and up):
#
#   bash scripts/gpu_smoke.sh
#
# It installs medtune with the `unsloth` extra (which includes `cuda`) into a virtualenv, prepares the bundled
# sample set, then for each backend (Unsloth, then plain PyTorch + PEFT) trains the embedded SmolLM2-135M for
# 50 steps, fuses the adapter and exports a GGUF + Modelfile, and ends with a table of tokens/s and peak GPU
# memory read from the run manifests. A backend that fails is reported and the others still run; the exit
# status is 1 if any failed.
#
# Settings (environment): STEPS=50  BATCH=4  MAXLEN=1024  BACKENDS="unsloth torch"  WORK=runs/gpu-smoke
#   VENV=.venv-gpu (VENV=system installs into the current Python, e.g. a Colab kernel; VENV=none installs nothing
#   and runs this checkout with the current Python, for an offline machine that already has torch, peft, transformers
#   and gguf)  PYTHON=python3
set -euo pipefail
trap 'echo "gpu_smoke: failed at line $LINENO: $BASH_COMMAND" >&2' ERR

cd "$(dirname "$0")/.."
STEPS=${STEPS:-50}
WARMUP=${WARMUP:-$(( STEPS > 10 ? 5 : 0 ))}
BATCH=${BATCH:-4}
MAXLEN=${MAXLEN:-1024}
BACKENDS=${BACKENDS:-"unsloth torch"}
WORK=${WORK:-runs/gpu-smoke}
VENV=${VENV:-.venv-gpu}
PYTHON=${PYTHON:-python3}
MODEL=builtin:smollm2-135m
DATA=data/sample/medical_o1_sample.jsonl

say() { printf '\n\033[1;36m== %s\033[0m\n' "$*" >&2; }
die() { printf 'gpu_smoke: %s\n' "$*" >&2; exit 1; }

# ---- a CUDA GPU, before installing anything ------------------------------------------------------
if ! command -v nvidia-smi >/dev/null 2>&1; then
  die "no CUDA GPU here (nvidia-smi not found). Run this on a CUDA machine: on Colab, Runtime > Change runtime type > T4 GPU; on Kaggle, Settings > Accelerator > GPU T4."
fi
if ! nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; then
  die "nvidia-smi found no usable GPU (driver not loaded?)"
fi
[ -f "$DATA" ] || die "sample data not found: $DATA (run from a medtune checkout)"

# ---- install ------------------------------------------------------------------------------------
if [ "$VENV" = none ]; then
  PY=$(command -v "$PYTHON")
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  missing=$("$PY" -c 'import importlib.util as u
print(" ".join(m for m in ("torch", "peft", "accelerate", "transformers", "safetensors", "gguf", "typer", "rich", "yaml",
                           "numpy", "matplotlib") if u.find_spec(m) is None))')
  [ -z "$missing" ] || die "VENV=none, but $PY lacks: $missing (install them, or leave VENV unset to make a virtualenv)"
  BACKENDS=$(for b in $BACKENDS; do
    if [ "$b" != unsloth ] || "$PY" -c 'import unsloth' >/dev/null 2>&1; then echo "$b"
    else echo "gpu_smoke: VENV=none and no unsloth here: skipping the unsloth backend" >&2; fi
  done | xargs)
elif [ "$VENV" = system ]; then
  PY=$(command -v "$PYTHON")
else
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    "$PYTHON" -m venv "$VENV" || die "could not create a virtualenv with $PYTHON (apt-get install python3-venv, or VENV=system)"
  fi
  PY="$VENV/bin/python"
fi
if [ "$VENV" != none ]; then
"$PY" -m pip install -q --upgrade pip
EXTRA=cuda
if [[ " $BACKENDS " == *" unsloth "* ]]; then EXTRA=unsloth; fi
say "installing medtune[$EXTRA] into $("$PY" -c 'import sys; print(sys.prefix)')"
if ! "$PY" -m pip install -q -e ".[$EXTRA]"; then
  if [ "$EXTRA" = unsloth ]; then
    echo "gpu_smoke: installing Unsloth failed; going on with the torch backend only" >&2
    BACKENDS=${BACKENDS//unsloth/}
    "$PY" -m pip install -q -e ".[cuda]" || die "pip install -e .[cuda] failed"
  else
    die "pip install -e .[cuda] failed"
  fi
fi
fi
"$PY" - <<'EOF' || die "PyTorch is installed but cannot use the GPU (a CPU-only torch wheel, or a CUDA/driver mismatch)"
import sys
import torch
ok = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      + (f"{torch.cuda.get_device_name(0)} (compute {'.'.join(map(str, torch.cuda.get_device_capability(0)))})" if ok else "no GPU"))
sys.exit(0 if ok else 1)
EOF
MT=("$PY" -m medtune)
[ -n "${BACKENDS// /}" ] || die "no backend left to run (BACKENDS=\"$BACKENDS\")"

# ---- data ---------------------------------------------------------------------------------------
mkdir -p "$WORK"
say "model and data"
"${MT[@]}" models pull "$MODEL"
"${MT[@]}" prepare "$DATA" --model "$MODEL" --out "$WORK/data" --max-seq-length "$MAXLEN"

# ---- one backend: train, fuse, export (set -e does not apply inside `f || ...`: every step checks) -----------
run_backend() {
  local b=$1 dir=$WORK/$1
  rm -rf "$dir"
  say "[$b] train $STEPS steps"
  "${MT[@]}" train --backend "$b" --model "$MODEL" --data "$WORK/data" --out "$dir/adapter" --iters "$STEPS" \
      --batch-size "$BATCH" --num-layers -1 --lr 2e-4 --lr-schedule cosine --warmup "$WARMUP" \
      --eval-every 25 --save-every 25 --max-seq-length "$MAXLEN" || return 1
  say "[$b] fuse"
  "${MT[@]}" fuse --model "$MODEL" --adapter "$dir/adapter" --out "$dir/fused" --force || return 1
  say "[$b] export"
  "${MT[@]}" export "$dir/fused" --name "smoke-$b" --quant f16 --modelfile "$dir/smoke-$b.Modelfile" || return 1
}

failed=()
for b in $BACKENDS; do
  run_backend "$b" || { echo "gpu_smoke: the $b backend failed (see above)" >&2; failed+=("$b"); }
done

# ---- summary from the manifests -------------------------------------------------------------------
say "summary"
"$PY" - "$WORK" $BACKENDS <<'EOF'
import json
import sys
from pathlib import Path

work, backends = Path(sys.argv[1]), sys.argv[2:]
print(f"{'backend':<9} {'device':<22} {'precision':<9} {'tok/s':>8} {'peak GB':>8} {'val loss':>15}  gguf")
for b in backends:
    m = work / b / "adapter" / "manifest.json"
    if not m.is_file():
        print(f"{b:<9} (no manifest: the run failed)")
        continue
    d = json.loads(m.read_text())
    r = d["result"]
    val = f"{r['first_val_loss']:.3f}->{r['final_val_loss']:.3f}" if r.get("first_val_loss") is not None else "-"
    gguf = next((str(p) for p in sorted((work / b / "fused").glob("*.gguf"))), "-")
    print(f"{b:<9} {d['device']['name'][:22]:<22} {d['precision']:<9} {r['tokens_per_second']:>8.0f} "
          f"{d['peak_memory_gb']:>8.2f} {val:>15}  {gguf}")
EOF

if [ ${#failed[@]} -gt 0 ]; then
  die "failed: ${failed[*]}"
fi
echo "gpu_smoke: all backends trained, fused and exported" >&2
