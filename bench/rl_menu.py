"""The RL menu on the toy: each option of #17 runs toy stage 1 end to end (its recipe: 40-token budget, ended
by its truncation rule or at 40 steps), 3 seeds, native engine, 2 ranks; held-out pass@1 after the stage and
response tokens generated.

    python bench/rl_menu.py                   # 9 options x 3 seeds: about 20 minutes on 2 cores
    python bench/rl_menu.py --seeds 1 --options grpo-2mb,gspo-2mb

With one optimizer update per step (the toy's default) the sampling policy is the trained one, every ratio is
1 and GRPO, GSPO and CISPO give the same update; the three loss rows therefore take 2 mini-batches per step,
so that the second update trains off-policy and the losses differ. The rollout corrections act on the gap
between engine and trainer log-probs, which the native engine in fp32 keeps at float noise: their row shows
they run and cost nothing here, not what they do against vLLM in bf16.
Writes bench/results/rl_menu.json.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import save_result  # noqa: E402

OPTIONS = {  # name: extra flags on top of `grpo.py --stage 1` (the toy recipe)
    "grpo": [],
    "overlong-mask": ["--overlong", "mask"],
    "overlong-penalty": ["--overlong", "penalty"],
    "dynamic-sampling": ["--dynamic-sampling", "3"],
    "entropy-control": ["--target-entropy", "0.1", "--entropy-lr", "0.002"],
    "mask-token": ["--correction", "mask-token", "--correction-cap", "1.5"],
    "grpo-2mb": ["--mini-batches", "2"],
    "gspo-2mb": ["--mini-batches", "2", "--loss", "gspo", "--clip-low", "3e-4", "--clip-high", "4e-4"],
    "cispo-2mb": ["--mini-batches", "2", "--loss", "cispo"],
}


def run(name: str, seed: int, out: str, eval_k: int, nproc: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(ROOT, "grpo.py"), "--stage", "1", "--out", out, "--seed", str(seed), "--rollout", "torch",
           "--save-every", "0", "--eval-k", str(eval_k)] + OPTIONS[name]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if r.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed:\n{r.stderr[-2000:]}")
    rows = [json.loads(line) for line in open(os.path.join(out, "stage1", "metrics.jsonl"))]
    ev = json.load(open(os.path.join(out, "stage1", "eval.json")))
    q = max(1, len(rows) // 4)
    st_batch, st_n = 16, 8  # the toy recipe's stage 1
    rounds = [x.get("dynamic/rounds", 1) for x in rows]
    return {"seed": seed, "steps": len(rows), "ended": ev["end_reason"], "acc": ev["pass@1"],
            "tokens": sum(x["response_len/mean"] * st_batch * st_n * k for x, k in zip(rows, rounds)),
            "reward_first": sum(x["reward/mean"] for x in rows[:q]) / q,
            "reward_last": sum(x["reward/mean"] for x in rows[-q:]) / q,
            "mean_len": ev["response_len/mean"], "wall_s": time.time() - t0,
            "extra": {k: sum(x[k] for x in rows) / len(rows) for k in ("rollout/masked_frac", "entropy/coef",
                                                                       "zero_adv_frac", "pg_clipfrac")
                      if k in rows[0]}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--options", default=",".join(OPTIONS))
    ap.add_argument("--eval-k", type=int, default=2)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--work", default=os.path.join(ROOT, "runs", "rl_menu"))
    a = ap.parse_args()
    import torch
    res = {"options": {}, "eval_k": a.eval_k, "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {a.nproc} ranks"}
    names = a.options.split(",")
    for seed in range(a.seeds):  # seed by seed, every option each time: stopped early, still balanced
        for name in names:
            d = res["options"].setdefault(name, {"flags": OPTIONS[name], "seeds": []})
            d["seeds"].append(run(name, seed, os.path.join(a.work, f"{name}-s{seed}"), a.eval_k, a.nproc))
            s = d["seeds"]
            for k in ("acc", "tokens", "steps", "reward_first", "reward_last"):
                d[k + "_mean"] = sum(x[k] for x in s) / len(s)
            print(f"{name:17s} seed {seed}: {s[-1]['steps']} steps ({s[-1]['ended'].split(':')[0]}), reward "
                  f"{s[-1]['reward_first']:.3f} -> {s[-1]['reward_last']:.3f}, held-out {s[-1]['acc']:.3f}, "
                  f"tokens {s[-1]['tokens']:.0f}", flush=True)
            save_result("rl_menu.json", res, indent=1)


if __name__ == "__main__":
    main()
