"""Run a few GRPO updates on a fixed global batch; under torchrun each rank takes its share of the prompts.

    python tests/scripts/train_equiv.py OUT            # one process, the whole batch
    torchrun --nproc_per_node 2 tests/scripts/train_equiv.py OUT
Writes OUT/rank<r>.pt with the final weights and the step stats.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from curriculum import Stage  # noqa: E402
from grpo import Trainer, TrainConfig, group_advantages, setup_dist  # noqa: E402
from model import Config, Transformer, init_weights  # noqa: E402
from rollout import Completion  # noqa: E402


def main(out, agg="token-mean"):
    torch.set_num_threads(1)
    rank, world = setup_dist()
    cfg = Config(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=64, eos_token_id=1)
    model = init_weights(Transformer(cfg), std=0.1, seed=0)
    ref = init_weights(Transformer(cfg), std=0.1, seed=0).requires_grad_(False)
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
               clip_low=0.1, clip_high=0.15, temperature=0.8, agg=agg)
    tr = Trainer(model, TrainConfig(lr=st.lr, grad_clip=0.05, token_budget=40), ref)
    stats = []
    for _ in range(st.steps):
        stats.append(tr.step([comps[i] for i in mine], adv[mine], st, mini_batches=2))
    torch.save({"weights": model.state_dict(), "stats": stats}, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
