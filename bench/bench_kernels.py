"""Fused log-prob + entropy against the naive version (materialised logits, log_softmax, entropy, backward).

    python bench/bench_kernels.py                    # CPU: torch path, fp32, N = 1024, 2048
    python bench/bench_kernels.py --n 4096,16384,32768 --dtype bf16   # on a GPU: all paths
    python bench/bench_kernels.py --n 32768 --dtype bf16 --impls naive-bf16,triton,verl,liger

At DeepSeek-R1-Distill-Qwen-1.5B's head (H=1536, V=151936), temperature 0.6; impls: naive (fp32 matmul and
softmax), naive-bf16 (the head matmul in bf16, softmax in fp32: the fair bar), torch (the tiled twin),
triton, and where they are installed (never a dependency; shared/gpu/prepare-anchors.sh lays them out) verl's
linear_cross_entropy (log-prob and entropy, as ours) and Liger's fused linear cross entropy (log-prob only,
its gradient made in the forward: a 6NHV design; temperature applied as h / T). An impl that does not
import is reported as an error row. Each (impl, N) runs in a fresh process so the
peak is its own. Extra memory = peak beyond the inputs and their gradients (CPU: max resident set; GPU: max
allocated). On a GPU also the matmul floor: 8 N H V FLOPs (forward, recompute, dh, dW) at the card's
measured bf16 GEMM rate. Writes bench/results/kernels-<device>.json.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import save_result  # noqa: E402
H, V, T = 1536, 151936, 0.6  # DeepSeek-R1-Distill-Qwen-1.5B's head at FastCuRL's temperature


def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def one(impl: str, n: int, dtype: str, reps: int) -> dict:
    import torch

    from kernels import fused_logprob_entropy, reference_logprob_entropy

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    g = torch.Generator(device=dev).manual_seed(0)
    h = (torch.randn(n, H, device=dev, generator=g) * 0.5).to(dt).requires_grad_()
    w = (torch.randn(V, H, device=dev, generator=g) * 0.02).to(dt).requires_grad_()
    y = torch.randint(0, V, (n,), device=dev, generator=g)
    grads = (n * H + V * H) * h.element_size()
    if impl == "verl":
        from verl.utils.kernel.linear_cross_entropy import linear_cross_entropy as verl_lce
    if impl == "liger":
        from liger_kernel.ops.fused_linear_cross_entropy import \
            LigerFusedLinearCrossEntropyFunction as LigerFLCE

    def run():
        if impl == "naive":  # fp32 matmul and softmax
            lp, ent = reference_logprob_entropy(h, w, y, T)
        elif impl == "naive-bf16":  # the head matmul in the input dtype, the softmax in fp32: what trainers write
            logp = torch.log_softmax((h @ w.T).float() / T, -1)
            lp, ent = logp.gather(-1, y[:, None])[:, 0], -(logp.exp() * logp).sum(-1)
        elif impl == "verl":
            lp, ent = verl_lce(h, w, y, T, "none")
        elif impl == "liger":  # -sum logprob with its gradient computed in the forward; no entropy
            (LigerFLCE.apply(h / T, w, y, None, None, -100, 0.0, 0.0, "sum")[0]).backward()
            h.grad = w.grad = None
            return
        else:
            lp, ent = fused_logprob_entropy(h, w, y, T, impl=impl)
        (lp.sum() + 0.01 * ent.sum()).backward()
        h.grad = w.grad = None

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    if dev == "cuda":
        run()  # compile / warm up, then measure the peak of one clean call
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        sync()
        extra = torch.cuda.max_memory_allocated() - base - grads
    else:
        base = rss_bytes()
        run()
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base - grads
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t)
    out = {"impl": impl, "n": n, "dtype": dtype, "time_s": sorted(times)[len(times) // 2],
           "extra_gb": max(extra, 0) / 1e9}
    if impl == "triton":
        out["autotune"] = autotune_picks()
    if dev == "cuda":
        a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
        for _ in range(3):
            a @ a
        sync()
        t = time.perf_counter()
        for _ in range(10):
            a @ a
        sync()
        rate = 10 * 2 * 8192 ** 3 / (time.perf_counter() - t)
        out["floor_s"] = 8 * n * H * V / rate
        out["gemm_tflops"] = rate / 1e12
    return out


def autotune_picks() -> dict:
    """The tile autotune chose for each kernel and tuning key in this process: {kernel: {key: tile}}."""
    import kernels

    picks = {}
    for name, tuner in zip(("fwd", "dz", "mm_acc"), kernels._kernels()):
        for key, config in tuner.cache.items():
            tile = "x".join(str(v) for v in config.kwargs.values())
            keys = ",".join(f"{k}={v}" for k, v in zip(tuner.keys, key))
            picks.setdefault(name, {})[keys] = f"{tile} w{config.num_warps} s{config.num_stages}"
    return picks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default=None, help="comma-separated token counts")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--impls", default=None)
    ap.add_argument("--out", default=None, help="result file name (default kernels-<gpu|cpu>.json)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        impl, n = a.one.split(":")
        print(json.dumps(one(impl, int(n), a.dtype, a.reps)))
        return
    import torch
    gpu = torch.cuda.is_available()
    ns = [int(x) for x in (a.n or ("4096,16384,32768" if gpu else "1024,2048")).split(",")]
    dtype = a.dtype or ("bf16" if gpu else "fp32")
    impls = (a.impls or ("naive,naive-bf16,torch,triton,verl,liger" if gpu else "naive,torch")).split(",")
    reps = a.reps or (5 if gpu else 1)
    rows = []
    for n in ns:
        for impl in impls:
            r = subprocess.run([sys.executable, __file__, "--one", f"{impl}:{n}", "--dtype", dtype, "--reps",
                                str(reps)], capture_output=True, text=True)
            if r.returncode != 0:
                rows.append({"impl": impl, "n": n, "dtype": dtype, "error": r.stderr.strip().splitlines()[-1]})
            else:
                rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    by = {(r["impl"], r["n"]): r for r in rows if "error" not in r}
    for r in rows:
        nv = by.get(("naive", r["n"]))
        if nv and r["impl"] != "naive" and "error" not in r:
            r["speedup_vs_naive"] = nv["time_s"] / r["time_s"]
            r["memory_fraction_of_naive"] = r["extra_gb"] / max(nv["extra_gb"], 1e-9)
        nb = by.get(("naive-bf16", r["n"]))
        if nb and "error" not in r:
            r["speedup_vs_naive_bf16"] = nb["time_s"] / r["time_s"]
        if "floor_s" in r:
            r["time_over_floor"] = r["time_s"] / r["floor_s"]
    dev = torch.cuda.get_device_name() if gpu else f"CPU {platform.machine()} {os.cpu_count()} cores"
    res = {"device": dev, "torch": torch.__version__, "H": H, "V": V, "date": time.strftime("%Y-%m-%d"),
           "rows": rows}
    save_result(a.out or f"kernels-{'gpu' if gpu else 'cpu'}.json", res)
    print(f"{'impl':10s} {'N':>6s} {'time s':>8s} {'extra GB':>9s} {'x naive':>8s} {'x bf16':>7s} "
          f"{'mem/naive':>9s} {'/floor':>7s}")
    nan = float("nan")
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:10s} {r['n']:6d} error: {r['error'][:80]}")
            continue
        print(f"{r['impl']:10s} {r['n']:6d} {r['time_s']:8.4f} {r['extra_gb']:9.3f} "
              f"{r.get('speedup_vs_naive', nan):8.2f} {r.get('speedup_vs_naive_bf16', nan):7.2f} "
              f"{r.get('memory_fraction_of_naive', nan):9.3f} {r.get('time_over_floor', nan):7.2f}")
    for r in rows:
        for kernel, picks in r.get("autotune", {}).items():
            for key, tile in picks.items():
                print(f"autotune N={r['n']} {kernel} ({key}): {tile}")


if __name__ == "__main__":
    main()
