"""Handwritten FSDP against torch's FSDP2 and plain data parallel: step time and peak memory per rank.

    python bench/bench_fsdp.py [--ranks 2] [--steps 3]     # writes bench/results/fsdp.json

Each mode runs in its own torchrun (gloo on CPU, NCCL on GPU) so the peak memory of one does not hide
another's: a Qwen2-shaped model of about 100M parameters, a GRPO-style step (forward, fused log-probs,
backward, clip, AdamW) on random tokens. CPU peak = the resident set's high-water mark during the steps (reset
after start-up: parameters, gradients, optimizer, activations, the Python runtime); GPU peak = max allocated.
On a CPU the resident set keeps memory the allocator has freed but not returned, so the bytes each rank holds
in parameters, gradients and optimizer state (state_gb) are reported too. Ratios are against FSDP2.
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

CFG = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
           num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True, model_type="qwen2")


def vm_hwm() -> int:
    """Peak resident set since the last reset (Linux: VmHWM in /proc/self/status)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(mode: str, steps: int, tokens: int, out: str):
    import torch
    import torch.distributed as dist

    import fsdp
    from fsdp import setup_dist
    from kernels import fused_logprob_entropy
    from model import Config, Transformer, init_weights

    rank, world, dev = setup_dist()  # GPU LOCAL_RANK under NCCL where there are GPUs, else CPU ranks
    model = init_weights(Transformer(Config(**CFG)), seed=0).to(dev)
    if mode == "hand":
        fsdp.shard(model)
    elif mode == "torch":
        fsdp.torch_fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator(device="cpu").manual_seed(rank)
    ids = torch.randint(0, CFG["vocab_size"], (1, tokens + 1), generator=g, device="cpu").to(dev)
    times = []
    import gc
    gc.collect()
    if dev.type == "cpu":  # measure the training steps' peak, not the start-up's: reset the high-water mark
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    for s in range(steps + 1):  # the first step warms up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        h = model(ids[:, :-1])[0]
        lp, ent = fused_logprob_entropy(h, model.lm_head.weight, ids[0, 1:])
        (-(lp.mean()) - 1e-3 * ent.mean()).backward()
        if mode == "dp" and world > 1:
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        if mode == "hand":
            fsdp.clip_grad_norm_(model, 1.0)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        held = fsdp.local_bytes(model, opt)  # parameters, gradients and optimizer state this rank holds
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if s:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else vm_hwm()
    params = sum(p.numel() for p in Transformer(Config(**CFG)).to("meta").parameters())
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump({"step_s": sorted(times)[len(times) // 2], "peak_bytes": peak, "params": params,
                   "held_bytes": sum(held.values())}, f)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--worker", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.worker:
        from fsdp import finish
        worker(a.worker, a.steps, a.tokens, a.out)
        finish()  # under torchrun: os._exit, past the gloo teardown race
    import tempfile

    import torch
    res = {"model": CFG, "ranks": a.ranks, "tokens_per_rank": a.tokens, "steps": a.steps,
           "machine": f"{platform.machine()}, {os.cpu_count()} cores" + (
               f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", CPU (gloo)"),
           "date": time.strftime("%Y-%m-%d"), "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("dp", "torch", "hand"):
            out = os.path.join(tmp, mode)
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                            str(a.ranks), __file__, "--worker", mode, "--steps", str(a.steps), "--tokens",
                            str(a.tokens), "--out", out], check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            rows = [json.load(open(f"{out}.rank{r}.json")) for r in range(a.ranks)]
            res["params"] = rows[0]["params"]
            res["modes"][mode] = {"step_s": max(r["step_s"] for r in rows),
                                  "peak_gb_per_rank": max(r["peak_bytes"] for r in rows) / 1e9,
                                  "state_gb_per_rank": max(r["held_bytes"] for r in rows) / 1e9}
    m = res["modes"]
    res["ratios_vs_fsdp2"] = {k: {"step_time": m[k]["step_s"] / m["torch"]["step_s"],
                                  "peak_memory": m[k]["peak_gb_per_rank"] / m["torch"]["peak_gb_per_rank"],
                                  "state_memory": m[k]["state_gb_per_rank"] / m["torch"]["state_gb_per_rank"]}
                              for k in m}
    save_result("fsdp.json", res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
