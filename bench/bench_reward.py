"""The verifier's worst case and throughput.

    python bench/bench_reward.py      # writes bench/results/reward.json
Worst-case wall time of one is_equiv call over hostile inputs, and completions scored per second by
score_batch on 10,000 realistic completions (boxed integers, fractions, expressions, some wrong).
"""
import json
import os
import platform
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.common import save_result  # noqa: E402
import reward  # noqa: E402

HOSTILE = ["9^{9^{9^{9^{9}}}}", "10^{10^{10^{10}}}", "{" * 5000 + "1" + "}" * 5000, "x" * 1_000_000,
           "\\sqrt{" * 2000 + "2" + "}" * 2000, "(" * 3000 + ")" * 3000, "2^" * 5000 + "2", "1," * 20000,
           "((((((((x+1)**99)**99)**99)**99)", "\\frac{" * 300 + "1" + "}{2}" * 300,
           ", ".join(str(i) for i in range(3000)), "x^{99999}-(x+1)^{99999}"]


def main():
    reward.start_workers(4)
    worst, worst_case = 0.0, None
    for h in HOSTILE:
        for a, b in ((h, "1"), ("1", h), (h, h + "1")):
            t = time.monotonic()
            reward.is_equiv(a, b)
            dt = time.monotonic() - t
            if dt > worst:
                worst, worst_case = dt, a[:40]
    rng = random.Random(0)
    texts, gts = [], []
    for i in range(10_000):
        kind = i % 4
        if kind == 0:
            v = rng.randint(0, 999); texts.append(f"... so \\boxed{{{v if rng.random() < .6 else v + 1}}}"); gts.append(str(v))
        elif kind == 1:
            a, b = rng.randint(1, 9), rng.randint(2, 9); texts.append(f"\\boxed{{\\dfrac{{{a}}}{{{b}}}}}"); gts.append(f"\\frac{{{a}}}{{{b}}}")
        elif kind == 2:
            texts.append(f"\\boxed{{{rng.randint(1, 5)}\\sqrt{{2}}}}"); gts.append(f"{rng.randint(1, 5)}\\sqrt{{2}}")
        else:
            texts.append("<think>long reasoning" + " step" * 200 + "</think> \\boxed{(1, 2)}"); gts.append("(1,2)")
    t = time.monotonic()
    scores = reward.score_batch(texts, gts, threads=4)
    dt = time.monotonic() - t
    res = {"worst_is_equiv_s": round(worst, 3), "worst_case": worst_case, "hostile_cases": len(HOSTILE) * 3,
           "batch": len(texts), "batch_s": round(dt, 2), "completions_per_s": round(len(texts) / dt),
           "mean_reward": sum(scores) / len(scores), "machine": f"{platform.machine()} {os.cpu_count()} cores",
           "python": platform.python_version()}
    save_result("reward.json", res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
