#!/usr/bin/env bash
# The README's toy figures: the whole toy curriculum in one command under torchrun (2 ranks), then the plot.
#   bash bench/toy_curriculum.sh [OUT]            (about 4 minutes on 2 CPU cores)
#   bash bench/toy_curriculum.sh OUT separate     (also the four stages as four commands, same numbers: the
#                                                  wall time of both ways)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/toy}
rm -rf "$out"
t0=$(date +%s.%N)
torchrun --nproc_per_node 2 grpo.py --stage 1-4 --out "$out" --eval-k 4 --rollout torch
t1=$(date +%s.%N)
echo "one command, stages 1-4: $(python -c "print(f'{$t1 - $t0:.1f}')") s wall"
if [ "${2:-}" = separate ]; then
  rm -rf "$out-separate"
  for s in 1 2 3 4; do
    torchrun --nproc_per_node 2 grpo.py --stage "$s" --out "$out-separate" --eval-k 4 --rollout torch
  done
  t2=$(date +%s.%N)
  echo "four commands, one per stage: $(python -c "print(f'{$t2 - $t1:.1f}')") s wall"
  cmp "$out/stage4/final/model.safetensors" "$out-separate/stage4/final/model.safetensors" \
    && echo "final weights byte-equal both ways"
fi
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
    print(f"stage {s}: {len(rows)} steps {secs:.0f}s, ended by {ev['end_reason']}; reward first quarter "
          f"{first:.3f} -> last quarter {last:.3f}, held-out pass@1 {ev['pass@1']:.3f}, mean length "
          f"{ev['response_len/mean']:.1f}")
PY
