"""FastCuRL's curriculum: stage tables and the loop that drives one stage.

Each stage trains on its own slice of the problems (L1 = prompts no longer than the mean, L3 =
longer, L2 = all) with its own response budget: short problems with a short budget first, then the
budget grows (context scaling). One step of a stage:

    prompts -> engine.generate(n each, budget) -> rewards -> group advantages -> GRPO update
            -> push weights into the engine -> one metrics line -> (every K steps) a checkpoint

    python curriculum.py plot runs/toy     # reward, length, entropy, truncation per step, by stage
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import sys
import time
from typing import Any, Callable

import torch
import torch.distributed as dist

from fsdp import comm_device
from reward import reward_errors, score_completions
from trainer import group_advantages


@dataclasses.dataclass
class Stage:
    data: str              # "L1" (short prompts), "L2" (all), "L3" (long prompts)
    max_tokens: int        # response budget
    batch: int             # prompts per step, across all ranks
    n: int                 # samples per prompt
    steps: int
    lr: float = 1e-6
    warmup_steps: int = 0
    kl_coef: float = 0.001
    entropy_coef: float = 0.001
    clip_low: float = 0.2
    clip_high: float = 0.2
    temperature: float = 0.6
    top_p: float = 1.0
    agg: str = "token-mean"
    max_prompt: int = 1024
    mini_batches: int = 1  # optimizer updates per step (batch / mini-batch size)
    # the RL menu (trainer.py: policy_loss, rollout_correction, Trainer._entropy_coef)
    loss: str = "grpo"     # policy term: grpo | gspo | cispo
    correction: str = "none"  # vs the engine: none | tis-token | tis-seq | mask-token | mask-seq
    correction_cap: float = 2.0  # C: the IS weight cap, or the kept ratio band [1/C, C]
    target_entropy: float = 0.0  # > 0: adaptive entropy coefficient (Skywork-OR1); 0: fixed
    entropy_lr: float = 0.005    # the coefficient's step per training step toward the target
    entropy_coef_max: float = 0.1  # the adaptive coefficient's upper bound


# FastCuRL-1.5B-Preview (stages 1-4) and the V2/V3 fifth stage: lr 1e-6, KL (k3) 0.001, entropy
# 0.001, clip 0.2, temperature 0.6, prompt budget 1024, mini-batch 64 prompts, one PPO epoch. Stage
# 1 is about 160 steps and all four about 860 in batch-128 units; how stages 2-4 split their 1,400
# batch-64 steps is our estimate (the paper moves on when a stage stops improving): set --steps per
# stage as you see fit.
RECIPES = {
    "fastcurl-1.5b": [
        Stage("L1", 8192, batch=128, n=8, steps=160, mini_batches=2),
        Stage("L2", 16384, batch=64, n=8, steps=400),
        Stage("L3", 24576, batch=64, n=8, steps=400),
        Stage("L2", 16384, batch=64, n=16, steps=600),
        Stage("L2", 16384, batch=64, n=16, steps=200, kl_coef=0.0, entropy_coef=1e-6),
    ],
    # the same shape on the embedded toy: budgets 40/80/120/80 tokens = 1:2:3:2 like 8K/16K/24K/16K
    "toy": [
        Stage("L1", 40, batch=16, n=8, steps=40, lr=1e-4, temperature=1.0, max_prompt=64),
        Stage("L2", 80, batch=16, n=8, steps=40, lr=1e-4, temperature=1.0, max_prompt=64),
        Stage("L3", 120, batch=16, n=8, steps=30, lr=1e-4, temperature=1.0, max_prompt=64),
        Stage("L2", 80, batch=16, n=8, steps=40, lr=1e-4, temperature=1.0, max_prompt=64),
    ],
}


def eval_budget(stages: list[Stage]) -> int:
    """The held-out eval's response budget: the largest of the recipe's stages, so that the scores
    of the stages compare like for like."""
    return max(s.max_tokens for s in stages)


def rollout_seed(seed: int, stage: int, step: int, rank: int) -> int:
    return ((seed * 1_000_003 + stage) * 1_000_003 + step) * 1009 + rank


@dataclasses.dataclass
class Loop:
    """What a stage's loop works with besides the stage itself: the pieces, where to write, when to
    stop."""
    engine: Any            # rollout engine: generate(...), sleep(), update_weights(named tensors)
    trainer: Any           # trainer.Trainer: step(comps, adv, stage) -> stats, full_state_dict()
    tok: Any               # data.Tokenizer: decode(ids)
    sampler: Any           # data.Sampler: next() -> this rank's prompt indices
    out_dir: str           # the stage's folder: metrics.jsonl and checkpoints
    save: Callable         # save(path, step, counters): a checkpoint; every rank calls it
    seed: int = 0
    rank: int = 0
    world: int = 1
    save_every: int = 0    # a checkpoint every K steps (0: only when the loop ends early)
    max_skips: int = 3     # this many non-finite updates in a row end the stage
    should_stop: Callable = lambda: False  # a signal came: checkpoint and leave


def run_stage(st: Stage, stage: int, prompts, loop: Loop, start: int = 0,
              counters: dict | None = None) -> str:
    """Train one stage from step `start` to st.steps; prompts are (ids, answer) pairs.

    Returns "done", "stopped" (a signal: checkpoint written) or "nan" (max_skips bad updates in a
    row: saved)."""
    c = counters if counters is not None else {}
    for k in ("skipped_steps", "skips_in_row", "reward_errors"):
        c.setdefault(k, 0)
    metrics_f = open(os.path.join(loop.out_dir, "metrics.jsonl"), "a") if loop.rank == 0 else None
    t_start = time.time()
    status = "done"
    for step in range(start, st.steps):
        # 1. a batch of prompts (this rank's share) and n samples each from the engine
        t0 = time.time()
        batch = [prompts[i] for i in loop.sampler.next()]
        comps = loop.engine.generate([ids for ids, _ in batch], n=st.n, max_tokens=st.max_tokens,
                                     temperature=st.temperature, top_p=st.top_p,
                                     seed=rollout_seed(loop.seed, stage, step, loop.rank))
        # 2. rewards: 1 for a right boxed answer; a response cut at the budget scores 0
        answers = [batch[i // st.n][1] for i in range(len(comps))]
        rewards = torch.tensor(score_completions(comps, answers, loop.tok.decode),
                               device=comm_device())
        # 3. group-normalised advantages (each prompt's n samples live on one rank)
        adv = group_advantages(rewards, st.n)
        t1 = time.time()
        # 4. the GRPO update, then 5. the new weights into the engine
        loop.engine.sleep()  # vLLM on a GPU hands its memory to the trainer meanwhile
        stats = loop.trainer.step(comps, adv, st)
        loop.engine.update_weights(loop.trainer.full_state_dict())
        t2 = time.time()
        # 6. one metrics line over all ranks
        bad = stats.pop("skipped_updates")
        c["skipped_steps"] += bool(bad)
        c["skips_in_row"] = c["skips_in_row"] + 1 if bad else 0
        rec = {"step": step + 1, "stage": stage,
               **_rollout_metrics(comps, rewards, st.n, loop.world, c), **stats,
               "skipped_steps": c["skipped_steps"], "reward/errors": c["reward_errors"],
               "time/rollout_s": t1 - t0, "time/train_s": t2 - t1}
        rec["throughput/tokens_per_s"] = rec.pop("tokens") / (t2 - t0)
        if loop.rank == 0:
            if rec["truncated_frac"] == 1.0 and not c.get("warned_all_cut"):
                c["warned_all_cut"] = 1
                print(f"[fastcurl] warning: every response of step {step + 1} was cut at the "
                      f"budget ({st.max_tokens} tokens): cut responses score 0, nothing is learned",
                      flush=True)
            metrics_f.write(json.dumps(rec) + "\n")
            metrics_f.flush()
            el = time.time() - t_start
            eta = el / (step + 1 - start) * (st.steps - step - 1)
            print(f"stage {stage} step {step + 1}/{st.steps} reward {rec['reward/mean']:.3f} "
                  f"len {rec['response_len/mean']:.1f} trunc {rec['truncated_frac']:.2f} "
                  f"entropy {rec['entropy/mean']:.3f} kl {rec['kl/mean']:.4f} "
                  f"elapsed {el:.0f}s eta {eta:.0f}s", flush=True)
        # 7. a checkpoint every save_every steps, and on the way out
        if c["skips_in_row"] >= loop.max_skips:
            status = "nan"
        elif loop.should_stop():
            status = "stopped"
        periodic = loop.save_every and (step + 1) % loop.save_every == 0 and step + 1 < st.steps
        if status != "done" or periodic:
            loop.save(os.path.join(loop.out_dir, f"step{step + 1}"), step + 1, dict(c))
        if status != "done":
            break
    if metrics_f:
        metrics_f.close()
    return status


def _rollout_metrics(comps, r: torch.Tensor, n: int, world: int, counters: dict) -> dict:
    """Reward, length, truncation and zero-advantage share over all ranks: every rank's values in
    one all-gather (on the collectives' device), then one copy to the host."""
    N = len(comps)
    zero = (r.view(-1, n).std(-1) == 0).float() if n > 1 else r.new_ones(N // n)
    n_tokens = sum(len(x.prompt_ids) + len(x.response_ids) for x in comps)
    mine = torch.cat([r, r.new_tensor([float(len(x.response_ids)) for x in comps]),
                      r.new_tensor([float(x.finish_reason == "length") for x in comps]), zero,
                      r.new_tensor([float(n_tokens), float(reward_errors())])])
    g = _all_ranks(mine, world)  # [world, 3N + N/n + 2]
    R, L, T = (g[:, k * N:(k + 1) * N].reshape(-1) for k in range(3))
    Z, tokens, errors = g[:, 3 * N:-2].reshape(-1), g[:, -2].sum(), g[:, -1].sum()
    host = torch.stack([R.mean(), R.std(), L.mean(), L.max(), T.mean(), Z.mean(), tokens,
                        errors]).tolist()
    counters["reward_errors"] += int(host[7])
    return dict(zip(["reward/mean", "reward/std", "response_len/mean", "response_len/max",
                     "truncated_frac", "zero_adv_frac", "tokens"], host))


def _all_ranks(x: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's x stacked: [world, *x.shape] (x on comm_device())."""
    if world == 1:
        return x[None]
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x)
    return torch.stack(out)


def truncate_metrics(path: str, last_step: int):
    """Drop lines logged after `last_step` (by a run that died before its next checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def read_metrics(run_dir: str) -> list[dict]:
    rows = []
    for f in sorted(glob.glob(os.path.join(run_dir, "stage*", "metrics.jsonl")),
                    key=lambda p: int(os.path.basename(os.path.dirname(p))[5:])):
        with open(f) as fh:
            rows += [json.loads(line) for line in fh if line.strip()]
    return rows


def plot(run_dir: str, out: str | None = None) -> str:
    """Reward, response length, entropy and truncated fraction against global steps, stage
    boundaries marked."""
    try:
        import matplotlib
        import matplotlib.ticker
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install matplotlib (or pip install -e "
                         ".[plot])")
    rows = read_metrics(run_dir)
    if not rows:
        raise SystemExit(f"{run_dir}: no stage*/metrics.jsonl to plot")
    x = list(range(1, len(rows) + 1))
    keys = [("reward/mean", "reward"), ("response_len/mean", "response length (tokens)"),
            ("entropy/mean", "entropy"), ("truncated_frac", "truncated fraction")]
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 9), sharex=True)
    bounds = [i + 1 for i in range(1, len(rows)) if rows[i]["stage"] != rows[i - 1]["stage"]]
    for ax, (k, label) in zip(axes, keys):
        ax.plot(x, [r.get(k, float("nan")) for r in rows], lw=1)
        for b in bounds:
            ax.axvline(b - 0.5, color="gray", ls="--", lw=0.8)
        ax.set_ylabel(label)
    starts = [1] + bounds
    for s in starts:
        axes[0].text(s, axes[0].get_ylim()[1], f" stage {rows[s - 1]['stage']}", va="top",
                     fontsize=8)
    axes[-1].set_xlabel("step (all stages)")
    axes[-1].xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curriculum.png")
    fig.savefig(out, dpi=100)
    return out


if __name__ == "__main__":
    usage = "usage: python curriculum.py plot RUN_DIR [OUT.png]"
    if len(sys.argv) >= 3 and sys.argv[1] == "plot":
        print(plot(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))
    elif sys.argv[1:2] in (["-h"], ["--help"]):
        print(f"{usage}\n\n{__doc__}")
    else:
        sys.exit(usage)
