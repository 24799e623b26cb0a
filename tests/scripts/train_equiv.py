"""Run a few GRPO updates on a fixed global batch; under torchrun each rank takes its share of the prompts.

    python tests/scripts/train_equiv.py OUT [AGG] [MODE]           # one process, the whole batch
    torchrun --nproc_per_node 2 tests/scripts/train_equiv.py OUT [AGG] [MODE]
MODE: dp (plain data parallel), hand (fsdp.shard), hand-bf16 (bf16 params, fp32 reduce), torch (FSDP2).
Writes OUT/rank<r>.pt with the final full weights, the step stats and the bytes this rank holds.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import fsdp  # noqa: E402
from settings import Stage  # noqa: E402
from fsdp import finish, setup_dist  # noqa: E402
from trainer import Trainer, TrainConfig, group_advantages  # noqa: E402
from model import Config, Transformer, init_weights  # noqa: E402
from rollout import Completion  # noqa: E402


def main(out, agg="token-mean", mode="dp"):
    torch.set_num_threads(1)
    rank, world, _ = setup_dist("cpu")  # the math on CPU ranks, whatever GPUs the machine has
    cfg = Config(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=64, eos_token_id=1, tie_word_embeddings=True)
    model = init_weights(Transformer(cfg), std=0.1, seed=0)
    ref = init_weights(Transformer(cfg), std=0.1, seed=0).requires_grad_(False)
    if mode.startswith("hand"):
        fsdp.shard(model, param_dtype=torch.bfloat16 if mode == "hand-bf16" else None)
        fsdp.shard(ref)
    elif mode == "torch":
        fsdp.torch_fully_shard(model)
        fsdp.torch_fully_shard(ref)
    g = torch.Generator().manual_seed(0)
    P, n = 8, 4
    comps = []
    for i in range(P * n):
        p = torch.randint(2, 40, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
        r = torch.randint(2, 40, (int(torch.randint(1, 15, (1,), generator=g)),), generator=g).tolist()
        comps.append(Completion(p, r, [], "stop"))
    rewards = (torch.rand(P * n, generator=g) > 0.5).float()
    adv = group_advantages(rewards, n)
    # rank r holds prompts r, r + world, ... with all their samples
    mine = [i for p in range(rank, P, world) for i in range(p * n, (p + 1) * n)]
    st = Stage("L2", max_tokens=16, batch=P, n=n, steps=3, lr=3e-3, kl_coef=0.1, entropy_coef=0.01,
               clip_low=0.1, clip_high=0.15, temperature=0.8, agg=agg, mini_batches=2)
    tr = Trainer(model, TrainConfig(grad_clip=0.05, token_budget=40 + 20 * rank), ref)
    stats = []
    for _ in range(st.steps):
        stats.append(tr.step([comps[i] for i in mine], adv[mine], st))
    held = fsdp.local_bytes(model, tr.opt)
    weights = {k: v.detach().clone() for k, v in tr.full_state_dict()}
    torch.save({"weights": weights, "stats": stats, "bytes": held}, os.path.join(out, f"rank{rank}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
    finish()  # under torchrun: os._exit, past the gloo teardown race (fsdp.finish)
