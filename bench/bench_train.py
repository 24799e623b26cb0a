"""GRPO steps on a randomly initialised model: whole steps (native-engine rollouts, then the trainer step),
or the trainer step alone on synthetic completions of fixed response lengths (--responses).

    python bench/bench_train.py --shape toy                                   # whole steps, anywhere
    python bench/bench_train.py --shape 1.5b --dtype bf16 --responses 4096x16,8192x8,16384x4,24576x2
Reports tokens/s, step time, peak memory and, for the trainer alone, model FLOPs utilisation: the model's
FLOPs (the old-log-prob forward plus forward and backward: 8 x matmul parameters x tokens, plus causal
attention 8 x layers x hidden x sum of squared sequence lengths; activation checkpointing's recompute not
counted) over the time, as a fraction of the card's measured bf16 GEMM rate. Writes
bench/results/train-<cpu|gpu>.json.
"""
import argparse
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import save_result  # noqa: E402
import fsdp  # noqa: E402
from settings import Stage  # noqa: E402
from model import Config, Transformer, init_weights  # noqa: E402
from rollout import Completion, TorchEngine  # noqa: E402
from trainer import Trainer, TrainConfig, group_advantages  # noqa: E402

SHAPES = {
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                 rope_theta=10000.0),
    "toy": dict(vocab_size=32, hidden_size=256, intermediate_size=640, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                tie_word_embeddings=True),
}


def gemm_rate(dev: torch.device) -> float:
    """Measured bf16 matmul FLOP/s of this GPU (8192^3)."""
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        a @ a
    torch.cuda.synchronize()
    return 10 * 2 * 8192 ** 3 / (time.perf_counter() - t)


def model_flops(cfg: Config, seq_lens: list[int]) -> float:
    """Old-log-prob forward + forward + backward = 4 forwards: 8 P T + causal attention 8 L d sum(S^2)."""
    h, L = cfg.hidden_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * cfg.head_dim
    per_layer = h * cfg.num_attention_heads * cfg.head_dim * 2 + h * kv * 2 + 3 * h * cfg.intermediate_size
    params = L * per_layer + cfg.vocab_size * h  # matmul weights, the head included, the embedding not
    return 8 * params * sum(seq_lens) + 8 * L * cfg.num_attention_heads * cfg.head_dim * sum(
        s * s for s in seq_lens) / 2


def trainer_only(cfg, dt, dev, responses: str, prompt_len: int, token_budget: int,
                 reps: int) -> list[dict]:
    """The trainer step alone on completions of fixed lengths (no EOS, every token trained)."""
    with torch.device(dev):
        policy = init_weights(Transformer(cfg), std=0.02)
    fsdp.shard(policy, param_dtype=dt if dt != torch.float32 else None)
    trainer = Trainer(policy, TrainConfig(token_budget=token_budget, grad_checkpointing=True))
    rate = gemm_rate(dev) if dev.type == "cuda" else None
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for spec in responses.split(","):
        length, count = (int(x) for x in spec.split("x"))
        st = Stage("L2", length, batch=count, n=count, steps=1, temperature=0.6, kl_coef=0.0)

        def comp():
            ids = torch.randint(0, cfg.vocab_size, (prompt_len + length,), generator=g, device="cpu").tolist()
            return Completion(ids[:prompt_len], ids[prompt_len:], [], "length")

        times = []
        for rep in range(reps + 1):  # the first warms up
            comps = [comp() for _ in range(count)]
            adv = group_advantages(torch.randn(count, generator=g, device="cpu"), count)
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            trainer.step(comps, adv, st)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        dt_s = sorted(times[1:])[0]
        tokens = count * (prompt_len + length)
        row = {"response_tokens": length, "sequences": count, "prompt_tokens": prompt_len, "step_s": dt_s,
               "tokens_per_s": tokens / dt_s,
               "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if dev.type == "cuda" else None}
        if rate:
            row["mfu"] = model_flops(cfg, [prompt_len + length] * count) / dt_s / rate
            row["gemm_tflops"] = rate / 1e12
        rows.append(row)
        print(row, flush=True)
    return rows


def whole_steps(cfg, dt, dev, a) -> list[dict]:
    """Native-engine rollouts of random prompts, then the trainer step, then the weight push."""
    with torch.device(dev):
        policy = init_weights(Transformer(cfg), std=0.02)
        gen = Transformer(cfg).to(dtype=dt).eval()
    gen.load_state_dict(policy.state_dict())
    fsdp.shard(policy, param_dtype=dt if dt != torch.float32 else None)
    trainer = Trainer(policy, TrainConfig(token_budget=16384, grad_checkpointing=True))
    engine = TorchEngine(gen, [], pad_id=0)
    st = Stage("L2", a.max_tokens, batch=a.prompts, n=a.n, steps=a.steps, temperature=0.6, kl_coef=0.0)
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for step in range(a.steps + 1):  # step 0 warms up
        prompts = [torch.randint(0, cfg.vocab_size, (a.prompt_len,), generator=g, device="cpu").tolist()
                   for _ in range(a.prompts)]
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        comps = engine.generate(prompts, n=a.n, max_tokens=a.max_tokens, temperature=0.6, seed=step)
        t1 = time.perf_counter()
        adv = group_advantages(torch.rand(len(comps), generator=g, device="cpu").round(), a.n)
        stats = trainer.step(comps, adv, st)
        engine.update_weights(trainer.full_state_dict())
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        gen_tok = sum(len(c.response_ids) for c in comps)
        all_tok = gen_tok + sum(len(c.prompt_ids) for c in comps)
        if step:
            rows.append({"rollout_s": t1 - t0, "train_s": t2 - t1, "generated_tokens_per_s": gen_tok / (t1 - t0),
                         "trained_tokens_per_s": all_tok / (t2 - t1), "step_s": t2 - t0,
                         "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if dev.type == "cuda" else None,
                         "logprob_absdiff": stats["rollout/logprob_absdiff"]})
            print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="toy", choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--responses", default=None,
                    help="trainer alone: comma-separated LENGTHxCOUNT, e.g. 4096x16,24576x2")
    ap.add_argument("--token-budget", type=int, default=32768, help="trainer alone: tokens per micro-batch")
    ap.add_argument("--reps", type=int, default=2, help="trainer alone: timed steps per shape (the best)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=256)
    a = ap.parse_args()
    dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    cfg = Config(**SHAPES[a.shape], eos_token_id=-1)  # no EOS: every sample runs to the budget
    if a.responses:
        rows = trainer_only(cfg, dt, dev, a.responses, a.prompt_len, a.token_budget, a.reps)
    else:
        rows = whole_steps(cfg, dt, dev, a)
    with torch.device("meta"):
        params = Transformer(cfg).num_params()
    res = {"shape": a.shape, "params": params,
           "dtype": a.dtype, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "mode": "trainer alone" if a.responses else "whole steps", "settings": vars(a), "rows": rows,
           "date": time.strftime("%Y-%m-%d")}
    save_result(f"train-{'gpu' if dev.type == 'cuda' else 'cpu'}.json", res)


if __name__ == "__main__":
    main()
