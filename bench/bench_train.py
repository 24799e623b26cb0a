"""Whole GRPO steps on a randomly initialised model: native-engine rollouts, then the trainer step.

    python bench/bench_train.py --shape 1.5b --dtype bf16     # on a GPU (bench/gpu_check.sh)
    python bench/bench_train.py --shape toy                   # anywhere
Reports generated tokens/s, trained tokens/s, step time and peak memory; writes bench/results/train-<dev>.json.
"""
import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import save_result  # noqa: E402
import fsdp  # noqa: E402
from curriculum import Stage  # noqa: E402
from trainer import Trainer, TrainConfig, group_advantages  # noqa: E402
from model import Config, Transformer, init_weights  # noqa: E402
from rollout import TorchEngine  # noqa: E402

SHAPES = {
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=10000.0),
    "toy": dict(vocab_size=32, hidden_size=256, intermediate_size=640, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=64, max_position_embeddings=512, tie_word_embeddings=True),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="toy", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256)
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    cfg = Config(**SHAPES[a.shape], eos_token_id=-1)  # no EOS: every sample runs to the budget
    with torch.device(dev):
        policy = init_weights(Transformer(cfg), std=0.02).to(dev)
    gen = Transformer(cfg).to(dev, dt).eval()
    gen.load_state_dict(policy.state_dict())
    fsdp.shard(policy, param_dtype=dt if dt != torch.float32 else None)
    trainer = Trainer(policy, TrainConfig(token_budget=16384, grad_checkpointing=True))
    engine = TorchEngine(gen, [], pad_id=0)
    st = Stage("L2", a.max_tokens, batch=a.prompts, n=a.n, steps=a.steps, temperature=0.6, kl_coef=0.0)
    g = torch.Generator().manual_seed(0)
    rows = []
    for step in range(a.steps + 1):  # step 0 warms up
        prompts = [torch.randint(0, cfg.vocab_size, (a.prompt_len,), generator=g).tolist() for _ in range(a.prompts)]
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        comps = engine.generate(prompts, n=a.n, max_tokens=a.max_tokens, temperature=0.6, seed=step)
        t1 = time.perf_counter()
        adv = group_advantages(torch.rand(len(comps)).round(), a.n)
        stats = trainer.step(comps, adv, st)
        engine.update_weights(trainer.full_state_dict())
        if dev == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        gen_tok = sum(len(c.response_ids) for c in comps)
        all_tok = gen_tok + sum(len(c.prompt_ids) for c in comps)
        if step:
            rows.append({"rollout_s": t1 - t0, "train_s": t2 - t1, "generated_tokens_per_s": gen_tok / (t1 - t0),
                         "trained_tokens_per_s": all_tok / (t2 - t1), "step_s": t2 - t0,
                         "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if dev == "cuda" else None,
                         "logprob_absdiff": stats["rollout/logprob_absdiff"]})
            print(json.dumps(rows[-1]), flush=True)
    res = {"shape": a.shape, "params": sum(p.numel() for p in gen.parameters()), "dtype": a.dtype,
           "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "prompts": a.prompts, "n": a.n,
           "prompt_len": a.prompt_len, "max_tokens": a.max_tokens, "steps": rows, "date": time.strftime("%Y-%m-%d")}
    save_result(f"train-{'gpu' if dev == 'cuda' else 'cpu'}.json", res)


if __name__ == "__main__":
    main()
