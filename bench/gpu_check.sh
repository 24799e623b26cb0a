#!/usr/bin/env bash
# The one script that proves the GPU path, on one H100/H200 in about 8 minutes, installing nothing from a
# network (torch, triton, transformers and pytest assumed; no vLLM). verl's and Liger's kernels join the kernel
# benchmark where .gpu-anchors/ was carried along (shared/gpu/prepare-anchors.sh lays it out; installed into
# a temporary folder, never a dependency). Each part runs behind its own timeout, so one failure does not
# hide the rest:
#   1. device and versions
#   2. the main command on the toy, on the GPU in bf16: stage 1 (40 steps) then stage 2 (8 steps)
#   3. the whole test suite on this machine (multi-rank tests ask for --device cpu)
#   4. the fused kernel benchmark at H=1536, V=151936, bf16, fwd+bwd: N=32K (naive bf16 matmul + fp32
#      softmax, Triton, verl, Liger), then N=4K and 16K (also naive fp32 and the torch twin), against the
#      8NHV matmul floor; and the tile autotune picked for each Triton kernel and tuning key at each N
#   5. the trainer alone on the 1.5B shape at 4K, 8K, 16K and 24K response tokens: tokens/s, peak, MFU
#   6. the native engine (CUDA graphs, and the eager path before them) against transformers' generate on
#      the 1.5B shape, bf16, 16 prompts x 4 samples x 256 tokens
# Writes 8 files into $OUT (default bench/results/gpu): summary.txt (the short table, also printed last),
# toy.log, tests.log, bench.log, kernels-gpu-32k.json, kernels-gpu.json, train-gpu.json, rollout-gpu.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false FASTCURL_RESULTS="$OUT"
RUN=$(mktemp -d)
if ls .gpu-anchors/whl/*.whl >/dev/null 2>&1; then  # verl and Liger for the kernel benchmark only
  python3 -m pip install -q --no-index --no-deps --target "$RUN/site" .gpu-anchors/whl/*.whl &&
    ANCHORS="$RUN/site:$PWD/.gpu-anchors/vk"
fi
S="$OUT/summary.txt"
T0=$(date +%s)
part() { echo "==== $1 ($(( $(date +%s) - T0 )) s)" | tee -a "$OUT/bench.log"; }

# 1. device and versions
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, '|',
torch.cuda.get_device_name(), '| GPUs', torch.cuda.device_count())" 2>&1 | tee "$S"
date -u +"date %Y-%m-%d %H:%M UTC" >> "$S"

# 2. the toy main command on the GPU, bf16, stage 1 then 2 (the native engine: no vLLM here)
part "toy" >> "$OUT/toy.log"
timeout 100 bash -c "python3 grpo.py --stage 1 --dtype bfloat16 --out $RUN/toy --eval-k 2 &&
  python3 grpo.py --stage 2 --dtype bfloat16 --out $RUN/toy --steps 8 --eval-k 0" >> "$OUT/toy.log" 2>&1
echo "toy exit $?" >> "$OUT/toy.log"
python3 - "$RUN/toy" >> "$S" 2>&1 <<'EOF'
import json, sys
for stage in (1, 2):
    try:
        rows = [json.loads(l) for l in open(f"{sys.argv[1]}/stage{stage}/metrics.jsonl")]
    except OSError:
        print(f"toy stage {stage}: no metrics (see toy.log)"); continue
    q = max(1, len(rows) // 4)
    first, last = (sum(r["reward/mean"] for r in part) / len(part) for part in (rows[:q], rows[-q:]))
    sec = sum(r["time/rollout_s"] + r["time/train_s"] for r in rows)
    print(f"toy stage {stage}: {len(rows)} steps in {sec:.0f} s, sampled reward {first:.3f} -> {last:.3f}"
          f" (first -> last quarter){'  RISING' if last > first else ''}")
try:
    e = json.load(open(f"{sys.argv[1]}/stage1/eval.json"))
    print(f"toy stage 1 held-out pass@1 {e['pass@1']:.3f} (k={e['k']})")
except OSError:
    pass
EOF

# 3. the whole test suite (xdist where it is installed)
part "tests" >> "$OUT/tests.log"
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
timeout 110 python3 -m pytest -q -p no:cacheprovider $XDIST tests >> "$OUT/tests.log" 2>&1
echo "tests exit $?" >> "$OUT/tests.log"
echo "tests: $(grep -E '(passed|failed)' "$OUT/tests.log" | tail -1)" >> "$S"

# 4. the fused kernel, bf16, against the naive versions, verl, Liger and the floor (32K first: the target);
#    the table's "autotune N=... kernel (key): tile" lines reach the summary with it
part "kernels"
PYTHONPATH=${ANCHORS:-} timeout 60 python3 bench/bench_kernels.py --n 32768 --dtype bf16 --reps 3 \
  --impls naive-bf16,triton,verl,liger --out kernels-gpu-32k.json > "$RUN/k32.log" 2>&1
PYTHONPATH=${ANCHORS:-} timeout 90 python3 bench/bench_kernels.py --n 4096,16384 --dtype bf16 --reps 3 \
  --impls naive,naive-bf16,torch,triton,verl,liger > "$RUN/k16.log" 2>&1
for f in "$RUN/k32.log" "$RUN/k16.log"; do cat "$f" >> "$OUT/bench.log"; sed -n '/^impl/,$p' "$f" >> "$S"; done

# 5. the trainer alone on the 1.5B shape
part "train"
timeout 60 python3 bench/bench_train.py --shape 1.5b --dtype bf16 --prompt-len 512 \
  --responses 4096x16,8192x8,16384x4,24576x2 --reps 1 >> "$OUT/bench.log" 2>&1
python3 -c "
import json; r = json.load(open('$OUT/train-gpu.json'))
for x in r['rows']:
    print(f\"train 1.5B {x['response_tokens']:>5} x {x['sequences']:>2}: {x['tokens_per_s']:8.0f} tokens/s, \"
          f\"peak {x['peak_gb']:.1f} GB, MFU {x.get('mfu', 0):.2f}\")" >> "$S" 2>&1

# 6. the native engine against transformers' generate, 1.5B shape, bf16
part "rollout"
timeout 90 python3 bench/bench_rollout.py --shapes 1.5b --engines torch,torch-dynamic,transformers \
  --dtype bfloat16 --max-tokens 256 >> "$OUT/bench.log" 2>&1
python3 -c "
import json; r = json.load(open('$OUT/rollout-gpu.json'))['shapes']['1.5b']
for k, v in r['engines'].items():
    print(f\"rollout 1.5B {k} ({v.get('decode', '-')}): {v.get('tokens_per_s', 0):.0f} tokens/s, \"
          f\"native over this {v.get('native_over_this', 0):.2f} {v.get('error', '')}\")" >> "$S" 2>&1

part "done"
echo "total $(( $(date +%s) - T0 )) s" >> "$S"
rm -rf "$RUN"
echo "==== summary ===="
cat "$S"
