#!/usr/bin/env bash
# The README's toy figures: all four toy stages under torchrun (2 ranks), then the plot.
#   bash bench/toy_curriculum.sh [OUT]      (about 10 minutes on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/toy}
for s in 1 2 3 4; do
  torchrun --nproc_per_node 2 grpo.py --stage "$s" --out "$out" --eval-k 4 --rollout torch
done
python curriculum.py plot "$out"
python - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
card = json.load(open("assets/toy/model/toy_card.json"))
print(f"shipped toy checkpoint: held-out pass@1 {card['pass@1']:.3f}, mean length {card['mean_len']:.1f}")
for s in range(1, 5):
    rows = [json.loads(l) for l in open(f"{out}/stage{s}/metrics.jsonl")]
    q = max(1, len(rows) // 4)
    first = sum(r["reward/mean"] for r in rows[:q]) / q
    last = sum(r["reward/mean"] for r in rows[-q:]) / q
    secs = sum(r["time/rollout_s"] + r["time/train_s"] for r in rows)
    ev = json.load(open(f"{out}/stage{s}/eval.json"))
    print(f"stage {s}: {len(rows)} steps {secs:.0f}s, reward first quarter {first:.3f} -> last quarter {last:.3f}, "
          f"held-out pass@1 {ev['pass@1']:.3f}, mean length {ev['response_len/mean']:.1f}")
PY
