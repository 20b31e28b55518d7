#!/usr/bin/env bash
# The train stage's acceptance run on the embedded model and the sample set: 200 steps must bring the
# validation loss clearly down, and the fused model, asked the held-out sample questions and a few
# training ones, must stop on its end token in every answer. Prints the figures; writes under runs/quality/.
set -euo pipefail
cd "$(dirname "$0")/.."
MT=${MT:-.venv/bin/medtune}
OUT=${OUT:-runs/quality}
STEPS=${STEPS:-200}
mkdir -p "$OUT"
if [ "${SKIP_TRAIN:-0}" != 1 ]; then
$MT prepare data/sample/medical_o1_sample.jsonl --out "$OUT/data" --max-seq-length 768 --valid-ratio 0.15
$MT train --data "$OUT/data" --out "$OUT/adapter" --iters "$STEPS" --batch-size 1 --lr 2e-4 \
    --lr-schedule cosine --warmup 10 --num-layers 8 --max-seq-length 768 --eval-every 50 --save-every 50 --json \
    > "$OUT/train.json"
$MT fuse --adapter "$OUT/adapter" --out "$OUT/fused" --force
fi
# held-out questions first, then the first training ones
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = [json.loads(l) for l in open(f"{out}/data/valid.jsonl")] + [json.loads(l) for l in open(f"{out}/data/train.jsonl")][:4]
with open(f"{out}/questions.jsonl", "w") as fh:
    for r in rows:
        fh.write(json.dumps({"prompt": r["prompt"]}, ensure_ascii=False) + "\n")
PY
$MT generate "$OUT/fused" --prompts "$OUT/questions.jsonl" --max-tokens 768 \
    --temp "${TEMP:-0.6}" --top-p "${TOP_P:-0.9}" --repeat-penalty "${REPEAT_PENALTY:-1.1}" --repeat-last-n 64 --seed 0 \
    --json > "$OUT/answers.json"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
t = json.load(open(f"{out}/train.json"))
a = json.load(open(f"{out}/answers.json"))
stops = sum(r["finish_reason"] == "stop" for r in a)
print(f"validation loss {t['first_val_loss']:.3f} -> {t['final_val_loss']:.3f} after {t['steps']} steps "
      f"({t['tokens_per_second']:.0f} tok/s, {t['seconds']:.0f} s)")
print(f"answers that stopped on the end token: {stops}/{len(a)}; mean length {sum(r['tokens'] for r in a) / len(a):.0f} tokens")
PY
