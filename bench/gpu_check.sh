#!/usr/bin/env bash
# The one script a session with a lent GPU runs (see DEVELOPERS.md): about 6 minutes, installs nothing.
#   1. kernel correctness on CUDA (torch and Triton paths, fp32 and bf16, against float64)
#   2. the kernel benchmark at H=1536, V=151936, N = 1K..16K, bf16 (vs naive, vs the matmul floor)
#   3. GRPO steps of a randomly initialised 1.5B-shaped model in bf16 with the native engine
# Full logs and JSON under $OUT (default bench/results/gpu); a short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" \
  2>&1 | tee "$OUT/device.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_kernels.py 2>&1 | tee "$OUT/correctness.log"
timeout 200 python3 bench/bench_kernels.py 2>&1 | tee "$OUT/bench_kernels.log"
cp bench/results/kernels-gpu.json "$OUT/" 2>/dev/null
timeout 150 python3 bench/bench_train.py --shape 1.5b --dtype bf16 --steps 2 --prompts 8 --n 4 --prompt-len 256 \
  --max-tokens 512 2>&1 | tee "$OUT/train.log"
cp bench/results/train-gpu.json "$OUT/" 2>/dev/null
echo "==== summary ===="
cat "$OUT/device.txt"
tail -1 "$OUT/correctness.log"
sed -n '/^impl/,$p' "$OUT/bench_kernels.log"
tail -2 "$OUT/train.log"
