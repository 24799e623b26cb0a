"""The RL menu's cases (policy loss x aggregation, rollout corrections, left-out completions) as one
update step each on a fixed global batch; under torchrun each rank takes its share of the prompts.

    python tests/scripts/rl_equiv.py OUT                          # one process, the whole batch
    torchrun --nproc_per_node 2 tests/scripts/rl_equiv.py OUT     # writes OUT/rank<r>.pt

Each case: a tiny policy, 8 prompts x 4 samples with engine log-probs near the policy's own, two
mini-batches (so the second one trains at ratios away from 1 and the clips bind), KL and entropy
terms on, plain SGD in place of AdamW (the update is then linear in the gradient: a wrong
denominator shows in the weights, where Adam's first step would only keep the gradient's sign).
Writes, per case and per mode (dp: plain data parallel; hand: fsdp.shard), the full weights' move
and the step's metrics. tests/test_losses.py imports `run_case` for the one-process side.
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
import fsdp  # noqa: E402
from settings import Stage  # noqa: E402
from model import Config, Transformer, init_weights  # noqa: E402
from rollout import Completion  # noqa: E402
from trainer import Trainer, TrainConfig, group_advantages, micro_batches, token_logprobs  # noqa: E402

CFG = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, eos_token_id=1,
           tie_word_embeddings=True)
P, N = 8, 4
# the clip ranges bind on the second mini-batch at this lr; GSPO's sequence ratios sit nearer 1
CLIP = {"grpo": (0.02, 0.03), "gspo": (0.004, 0.006), "cispo": (0.02, 0.03)}
# (loss, aggregation, correction, keep): keep "all" = no keep list, "some" = every 5th completion
# left out, "odd" = every sample of the odd prompts left out (under 2 ranks: all of rank 1's),
# "dyn" = prompts 5 and 7 not there at all, as dynamic sampling leaves the ranks with unequal
# numbers of groups (rank 0 four, rank 1 two; the mini-batches still hold the same prompts)
CASES = ([(loss, agg, "none", "all") for loss in ("grpo", "gspo", "cispo")
          for agg in ("token-mean", "seq-mean", "drgrpo")]
         + [("grpo", "token-mean", c, "all") for c in ("tis-token", "tis-seq", "mask-token")]
         + [("gspo", "seq-mean", "mask-seq", "all"), ("grpo", "token-mean", "none", "some"),
            ("gspo", "drgrpo", "tis-seq", "some"), ("cispo", "seq-mean", "mask-token", "some"),
            ("grpo", "seq-mean", "tis-token", "odd"), ("grpo", "token-mean", "none", "dyn"),
            ("gspo", "seq-mean", "tis-seq", "dyn"), ("cispo", "drgrpo", "none", "dyn")])


def batch(model, temperature, keep_kind="some"):
    """The global batch: completions with engine log-probs (the policy's own plus noise of 0.1 per
    token, some tokens much further), advantages and a keep list (CASES: "some" or "odd")."""
    g = torch.Generator().manual_seed(0)
    comps = []
    for _ in range(P * N):
        p = torch.randint(2, 40, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g)
        r = torch.randint(2, 40, (int(torch.randint(1, 15, (1,), generator=g)),), generator=g)
        comps.append(Completion(p.tolist(), r.tolist(), [], "stop"))
    with torch.no_grad():
        for mb in micro_batches(comps, 10_000, 0, "cpu"):
            lp, _ = token_logprobs(model, mb, temperature)
            for b, i in enumerate(mb.index):
                n = len(comps[i].response_ids)
                noise = 0.1 * torch.randn(n, generator=g)
                noise[torch.rand(n, generator=g) < 0.2] *= 8  # some tokens far off: masks bind
                comps[i].logprobs = (lp[b, :n] - noise).tolist()
    adv = group_advantages((torch.rand(P * N, generator=g) > 0.5).float(), N)
    keep = [(i // N) % 2 == 0 if keep_kind == "odd" else i % 5 != 3 for i in range(P * N)]
    return comps, adv, keep


def run_case(case, mode="dp", token_budget=40, rank=0, world=1):
    """One step of a case on this rank's share -> (the full weights' move, the step's metrics)."""
    loss, agg, correction, keep_kind = case
    model = init_weights(Transformer(Config(**CFG)), std=0.1, seed=0)
    ref = init_weights(Transformer(Config(**CFG)), std=0.1, seed=1).requires_grad_(False)
    st = Stage("L2", max_tokens=16, batch=P, n=N, steps=1, lr=2.0, kl_coef=0.1, entropy_coef=0.01,
               clip_low=CLIP[loss][0], clip_high=CLIP[loss][1], temperature=0.8, agg=agg,
               mini_batches=2, loss=loss, correction=correction, correction_cap=1.2)
    comps, adv, keep = batch(model, st.temperature, keep_kind)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if mode == "hand":
        fsdp.shard(model)
        fsdp.shard(ref)
    tr = Trainer(model, TrainConfig(grad_clip=1e9, token_budget=token_budget), ref)
    tr.opt = torch.optim.SGD(model.parameters(), lr=0.0)
    prompts = [p for p in range(rank, P, world) if keep_kind != "dyn" or p not in (5, 7)]
    mine = [i for p in prompts for i in range(p * N, (p + 1) * N)]
    stats = tr.step([comps[i] for i in mine], adv[mine], st,
                    keep=[keep[i] for i in mine] if keep_kind in ("some", "odd") else None)
    after = {k: v.detach().clone() for k, v in tr.full_state_dict()}
    return {k: after[k] - before[k] for k in before}, stats


def main(out):
    torch.set_num_threads(1)
    rank, world, _ = fsdp.setup_dist("cpu")
    res = {(case, mode): run_case(case, mode, 40 + 20 * rank, rank, world)
           for case in CASES for mode in ("dp", "hand")}
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    fsdp.finish()
