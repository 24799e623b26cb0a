"""FastCuRL's claim in miniature: curriculum with growing budgets vs flat training, the same step cap.

    python bench/ablation.py                      # 4 arms x 3 seeds at --scale 0.4: about 35 minutes on 2 cores
    python bench/ablation.py --seeds 1            # about 12 minutes (--seeds 2: about 24)
    python bench/ablation.py --scale 1.0          # the full toy recipe's 150 steps per arm

Arms, all from the shipped toy checkpoint, each one `grpo.py --stage 1-4` run (one process, one engine) of
four stages capped at the toy recipe's 40/40/30/40 steps times --scale, 16 prompts x 8 samples per step:
  curriculum       : L1 at 40 tokens, L2 at 80, L3 at 120, L2 at 80 (the toy recipe), every stage to its cap
  curriculum-rules : the same stages, each ended by the toy recipe's rules (stage 1: truncated fraction
                     <= 5% over 5 steps; stages 2-4: the 5-step mean reward not rising for 8 steps; windows
                     and patience times --scale, like the stages) or its cap
  flat-large       : L2 at 120 tokens throughout
  flat-small       : L2 at 40 tokens throughout
Held-out pass@1 (k samples at T=1, scored at 120 tokens) after each stage, tokens generated, where and why each
stage ended, wall time and entropy are written to bench/results/ablation.json, and accuracy against tokens
generated to ablation.png.
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
from bench.common import RESULTS, save_result  # noqa: E402
from settings import RECIPES  # noqa: E402

TOY = [(s.split, s.max_tokens) for s in RECIPES["toy"].stages]  # (split, response budget) per stage
ARMS = {  # (stages, whether the recipe's stage-end rules apply)
    "curriculum": (TOY, False),
    "curriculum-rules": (TOY, True),
    "flat-large": ([("L2", max(b for _, b in TOY))] * len(TOY), False),
    "flat-small": ([("L2", min(b for _, b in TOY))] * len(TOY), False),
}


def run_arm(arm: str, seed: int, scale: float, out: str, eval_k: int, nproc: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    stages, (plan, rules) = RECIPES["toy"].stages, ARMS[arm]
    caps = [max(1, round(st.steps * scale)) for st in stages]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           os.path.join(ROOT, "grpo.py"), "--stage", f"1-{len(stages)}", "--out", out, "--seed", str(seed),
           "--split", ",".join(s for s, _ in plan), "--max-tokens", ",".join(str(b) for _, b in plan),
           "--steps", ",".join(map(str, caps)), "--eval-k", str(eval_k), "--rollout", "torch",
           "--save-every", "0", "--eval-tokens", str(max(b for _, b in TOY))]  # every arm scored alike
    if rules:  # the recipe's rules, their windows and patience scaled like the stages' lengths
        cmd += ["--end-window", ",".join(str(max(1, round(st.end_window * scale))) for st in stages),
                "--end-plateau", ",".join(str(max(1, round(st.end_plateau * scale)) if st.end_plateau else 0)
                                          for st in stages)]
    else:
        cmd += ["--end-trunc", "off", "--end-plateau", "0"]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if r.returncode != 0:
        raise RuntimeError(f"{arm} seed {seed} failed:\n{r.stderr[-2000:]}")
    points, tokens, entropy = [], 0.0, []
    for i, st in enumerate(stages):
        rows = [json.loads(line) for line in open(os.path.join(out, f"stage{i + 1}", "metrics.jsonl"))]
        tokens += sum(x["response_len/mean"] * st.batch * st.n for x in rows)
        entropy += [x["entropy/mean"] for x in rows]
        ev = json.load(open(os.path.join(out, f"stage{i + 1}", "eval.json")))
        points.append({"stage": i + 1, "steps": len(rows), "cap": caps[i], "ended": ev["end_reason"],
                       "acc": ev["pass@1"], "tokens_generated": tokens, "mean_len": ev["response_len/mean"],
                       "reward_last": rows[-1]["reward/mean"]})
        print(f"  {arm} seed {seed} stage {i + 1}: {len(rows)}/{caps[i]} steps ({ev['end_reason'].split(':')[0]}), "
              f"held-out pass@1 {ev['pass@1']:.3f}, tokens {tokens:.0f}", flush=True)
    return {"seed": seed, "final_acc": points[-1]["acc"], "tokens_generated": tokens, "wall_s": time.time() - t0,
            "final_mean_len": points[-1]["mean_len"], "steps": sum(p["steps"] for p in points), "points": points,
            "entropy": entropy}


def plot(res: dict, path: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: skipping the plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    card = json.load(open(os.path.join(ROOT, "assets", "toy", "model", "toy_card.json")))
    for arm, d in res["arms"].items():
        seeds = d["seeds"]
        if not seeds:
            continue
        xs = [[0] + [p["tokens_generated"] for p in s["points"]] for s in seeds]
        ys = [[card["pass@1"]] + [p["acc"] for p in s["points"]] for s in seeds]
        mx = [sum(c) / len(c) for c in zip(*xs)]
        lo, hi = [min(c) for c in zip(*ys)], [max(c) for c in zip(*ys)]
        line, = ax.plot(mx, [sum(c) / len(c) for c in zip(*ys)], marker="o", label=arm)
        ax.fill_between(mx, lo, hi, alpha=0.2, color=line.get_color())
    ax.set_xlabel("response tokens generated in training")
    ax.set_ylabel("held-out pass@1 (toy, T=1)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--scale", type=float, default=0.4, help="fraction of the toy recipe's steps per stage")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--eval-k", type=int, default=2)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--work", default=os.path.join(ROOT, "runs", "ablation"))
    a = ap.parse_args()
    import torch
    res = {"arms": {}, "scale": a.scale, "eval_k": a.eval_k, "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {a.nproc} ranks"}
    arms = a.arms.split(",")
    for arm in arms:
        res["arms"][arm] = {"stages": ARMS[arm][0], "rules": ARMS[arm][1], "seeds": []}
    for seed in range(a.seeds):  # seed by seed, all arms each time, the file rewritten after every run:
        for arm in arms:         # stopped early, it still holds a balanced comparison
            res["arms"][arm]["seeds"].append(run_arm(arm, seed, a.scale, os.path.join(a.work, f"{arm}-s{seed}"),
                                                     a.eval_k, a.nproc))
            summarize(res)
    plot(res, os.path.join(RESULTS, "ablation.png"))


def summarize(res: dict):
    for arm, d in res["arms"].items():
        if not d["seeds"]:
            continue
        accs = [s["final_acc"] for s in d["seeds"]]
        d["final_acc_mean"] = sum(accs) / len(accs)
        d["tokens_generated_mean"] = sum(s["tokens_generated"] for s in d["seeds"]) / len(accs)
        d["wall_s_mean"] = sum(s["wall_s"] for s in d["seeds"]) / len(accs)
        d["steps_mean"] = sum(s["steps"] for s in d["seeds"]) / len(accs)
        print(f"{arm:16s} steps {d['steps_mean']:.1f}, final pass@1 {d['final_acc_mean']:.3f} ({', '.join(f'{x:.3f}' for x in accs)}), "
              f"tokens {d['tokens_generated_mean']:.0f}, wall {d['wall_s_mean']:.0f}s")
    save_result("ablation.json", res, indent=1)


if __name__ == "__main__":
    main()
