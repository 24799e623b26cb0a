"""What the checkpoint manifest's hashes cost against the save itself, at a 1.5B model's size.

    python bench/bench_checkpoint.py [--params 1.78e9] [--dtype float32] [--rounds 3]

Writes a random state dict of that many parameters as model.safetensors the way a checkpoint does
(safetensors, then fsync), then hashes it whole (hashlib's sha256 over every byte) and as the manifest
does (checkpoint.sha256: sampled above its size limit), and reports both against the save per round. R1-Distill-Qwen-1.5B has 1.78e9 parameters (7.1 GB in fp32, 3.6 GB in bf16).
"""
import argparse
import os
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hashlib  # noqa: E402

from checkpoint import sha256  # noqa: E402
from common import save_result  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=1.78e9)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    per = 64 * 1024 * 1024  # parameters per tensor, as a model's large matrices
    count = int(a.params)
    state = {f"w{i}": torch.empty(min(per, count - i * per), dtype=dtype).normal_()
             for i in range((count + per - 1) // per)}
    rows = []
    with tempfile.TemporaryDirectory(dir=a.dir) as folder:
        path = os.path.join(folder, "model.safetensors")
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            save_file(state, path)
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
            t1 = time.perf_counter()
            whole = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    whole.update(block)
            t2 = time.perf_counter()
            sha256(path)
            t3 = time.perf_counter()
            save, whole_s, manifest_s = t1 - t0, t2 - t1, t3 - t2
            rows.append({"save_s": save, "whole_sha256_s": whole_s, "manifest_hash_s": manifest_s})
            print(f"{os.path.getsize(path) / 1e9:.2f} GB: save {save:.2f} s, whole-file sha256 "
                  f"{whole_s:.2f} s ({100 * whole_s / save:.0f}% of the save), the manifest's "
                  f"{manifest_s:.3f} s ({100 * manifest_s / save:.2f}%)", flush=True)
            os.remove(path)
    save_result("checkpoint_sha256.json", {"params": count, "dtype": a.dtype, "rounds": rows})


if __name__ == "__main__":
    main()
