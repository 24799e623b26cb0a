"""The sampler against the head matmul it samples from, at the real vocabulary (151,936 rows).

    python bench/bench_sampler.py [--hidden 128,1536] [--rows 8,32,64]   # writes bench/results/sampler-<device>.json

Per shape: the head matmul [B, H] x [H, V] (what a decode step pays for its logits), rollout.sample at
temperature 1 and 0.6 (top_p 1: the recipes'), and the whole-row sampler it replaced (rollout._sample_full:
nan_to_num, log_softmax, exp, a float64 cumsum of [B, V]), each the median of --repeat calls, run in
alternation so that a change in the machine's load reaches all of them alike. Hidden 128 is the issue's
stress shape (a tiny model whose head costs least); 1536 is R1-Distill-Qwen-1.5B's.
"""
import argparse
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import save_result  # noqa: E402
from rollout import _sample_full, sample  # noqa: E402

VOCAB = 151936


def median_ms(calls: dict, repeat: int) -> dict:
    """Each callable run `repeat` times in turn (a round calls every one once) -> median ms."""
    times = {name: [] for name in calls}
    for f in calls.values():  # warm-up
        f()
    for _ in range(repeat):
        for name, f in calls.items():
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * sorted(t)[len(t) // 2] for name, t in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", default="128,1536")
    ap.add_argument("--rows", default="8,32,64")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    results = []
    for hidden in map(int, a.hidden.split(",")):
        head = torch.randn(VOCAB, hidden, device=dev) / hidden ** 0.5
        for rows in map(int, a.rows.split(",")):
            h = torch.randn(rows, hidden, device=dev) * 3
            logits = h @ head.T
            g = torch.Generator(device=dev).manual_seed(0)

            def timed(f):
                return lambda: (f(), sync())
            ms = median_ms({"head_matmul": timed(lambda: h @ head.T),
                            "sample_t1": timed(lambda: sample(logits, 1.0, 1.0, g)),
                            "sample_t0.6": timed(lambda: sample(logits, 0.6, 1.0, g)),
                            "whole_row_t1": timed(lambda: _sample_full(logits, 1.0, 1.0, g))}, a.repeat)
            row = {"hidden": hidden, "rows": rows, **{k: round(v, 3) for k, v in ms.items()},
                   "sample_over_head": round(max(ms["sample_t1"], ms["sample_t0.6"]) / ms["head_matmul"], 3),
                   "whole_row_over_head": round(ms["whole_row_t1"] / ms["head_matmul"], 3)}
            results.append(row)
            print(row, flush=True)
    res = {"device": a.device, "threads": torch.get_num_threads(), "machine": platform.processor() or
           platform.machine(), "torch": torch.__version__, "vocab": VOCAB, "repeat": a.repeat,
           "results": results}
    print(save_result(f"sampler-{dev.type}.json", res))


if __name__ == "__main__":
    main()
