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
    # rules that end the stage before `steps` (its cap), each off by default, checked after every
    # step on the metrics of all ranks (see end_reason)
    end_trunc: float | None = None  # the truncated fraction (end_window-step mean) <= this
    end_plateau: int = 0            # steps without a new best end_window-step mean reward
    end_epochs: float = 0.0         # passes over the stage's prompts (0: no limit)
    end_eval: float | None = None   # held-out pass@1 (scored every --eval-every steps) >= this
    end_window: int = 5             # steps in the moving averages
    # the RL menu (trainer.py: policy_loss, rollout_correction, Trainer._entropy_coef)
    loss: str = "grpo"     # policy term: grpo | gspo | cispo
    correction: str = "none"  # vs the engine: none | tis-token | tis-seq | mask-token | mask-seq
    correction_cap: float = 2.0  # C: the IS weight cap, or the kept ratio band [1/C, C]
    target_entropy: float = 0.0  # > 0: adaptive entropy coefficient (Skywork-OR1); 0: fixed
    entropy_lr: float = 0.005    # the coefficient's step per training step toward the target
    entropy_coef_max: float = 0.1  # the adaptive coefficient's upper bound
    # the loop's part of it (shape_rewards, sample_step)
    overlong: str = "zero"  # a cut response: zero (scores 0) | mask (out of the loss) | penalty
    overlong_window: int = 0  # penalty over the last L tokens of the budget (0: a quarter of it)
    dynamic_sampling: int = 0  # DAPO: up to this many extra rounds to fill the batch with groups
                               # whose rewards differ (0: off)


# FastCuRL-1.5B-Preview (stages 1-4) and the V2/V3 fifth stage: lr 1e-6, KL (k3) 0.001, entropy
# 0.001, clip 0.2, temperature 0.6, prompt budget 1024, mini-batch 64 prompts, one PPO epoch. Its
# stages were switched by hand: stage 1 when about 10% of the responses were cut (step ~160 in
# batch-128 units), each stage at most one epoch; those are the rules here, and `steps` is each
# stage's cap (how stages 2-4 split their 1,400 batch-64 steps is our estimate).
RECIPES = {
    "fastcurl-1.5b": [
        Stage("L1", 8192, batch=128, n=8, steps=160, mini_batches=2, end_trunc=0.1,
              end_epochs=1, end_window=10),
        Stage("L2", 16384, batch=64, n=8, steps=400, end_epochs=1),
        Stage("L3", 24576, batch=64, n=8, steps=400, end_epochs=1),
        Stage("L2", 16384, batch=64, n=16, steps=600, end_epochs=1),
        Stage("L2", 16384, batch=64, n=16, steps=200, kl_coef=0.0, entropy_coef=1e-6,
              end_epochs=1),
    ],
    # the same shape on the embedded toy: budgets 40/80/120/80 tokens = 1:2:3:2 like 8K/16K/24K/16K;
    # stage 1 ends once fewer than 5% of its responses are cut over 5 steps (the toy's 10%: it
    # starts at 20%), the others once the 5-step mean sampled reward stops rising for 8 steps
    "toy": [
        Stage("L1", 40, batch=16, n=8, steps=40, lr=1e-4, temperature=1.0, max_prompt=64,
              end_trunc=0.05),
        Stage("L2", 80, batch=16, n=8, steps=40, lr=1e-4, temperature=1.0, max_prompt=64,
              end_plateau=8),
        Stage("L3", 120, batch=16, n=8, steps=30, lr=1e-4, temperature=1.0, max_prompt=64,
              end_plateau=8),
        Stage("L2", 80, batch=16, n=8, steps=40, lr=1e-4, temperature=1.0, max_prompt=64,
              end_plateau=8),
    ],
}


def eval_budget(stages: list[Stage]) -> int:
    """The held-out eval's response budget: the largest of the recipe's stages, so that the scores
    of the stages compare like for like."""
    return max(s.max_tokens for s in stages)


def rollout_seed(seed: int, stage: int, step: int, rank: int, rnd: int = 0) -> int:
    """The engine's seed for one rank's samples of a step (rnd: dynamic sampling's extra round)."""
    base = ((seed * 1_000_003 + stage) * 1_000_003 + step) * 1009 + rank
    return base if not rnd else (base * 1_000_003 + rnd) % (1 << 62)


def shape_rewards(st: Stage, comps, rewards: torch.Tensor) -> torch.Tensor:
    """Overlong responses (DAPO), st.overlong: "zero", a cut response keeps its 0; "mask", the
    same, and the loop leaves cut responses out of the loss (their 0 still counts in their group's
    mean and std: DAPO filters after the advantages); "penalty", the soft overlong punishment added
    to every reward, with budget B and window L:

        r += 0 if len <= B - L,  (B - L - len) / L if B - L < len <= B   (-1 for a cut response)"""
    if st.overlong != "penalty":
        return rewards
    B = st.max_tokens
    L = st.overlong_window or max(1, B // 4)
    return rewards + rewards.new_tensor([min(0.0, (B - L - len(c.response_ids)) / L)
                                         for c in comps])


def sample_step(st: Stage, stage: int, step: int, prompts, loop) -> dict:
    """Steps 1-2 of the loop: this rank's share of a batch of prompts, n samples each, rewards.

    With dynamic sampling (DAPO) a group whose n rewards are all equal has no gradient: such groups
    are dropped and another batch of prompts is sampled, up to st.dynamic_sampling extra rounds,
    until all ranks together hold st.batch groups whose rewards differ; the first st.batch of them
    (in rank order) are trained on. Fewer after the last round: what there is (none at all: the
    first round's groups, whose advantages are 0). The sampler moves past every prompt drawn, so a
    resume draws the same rounds.

    -> {"sampled": (comps, rewards) of every round, for the metrics; "comps", "rewards": the
    groups to train on; "rounds"; "groups": groups trained on over all ranks}"""
    n, sampled, rewards = st.n, [], []
    for rnd in range(st.dynamic_sampling + 1):
        batch = [prompts[i] for i in loop.sampler.next()]
        comps = loop.engine.generate([ids for ids, _ in batch], n=n, max_tokens=st.max_tokens,
                                     temperature=st.temperature, top_p=st.top_p,
                                     seed=rollout_seed(loop.seed, stage, step, loop.rank, rnd))
        # a right boxed answer scores 1; a response cut at the budget scores 0
        answers = [batch[i // n][1] for i in range(len(comps))]
        scores = torch.tensor(score_completions(comps, answers, loop.tok.decode),
                              device=comm_device())
        sampled += comps
        rewards.append(shape_rewards(st, comps, scores))
        if not st.dynamic_sampling:
            return {"sampled": (comps, rewards[0]), "comps": comps, "rewards": rewards[0],
                    "rounds": 1, "groups": st.batch}
        r = torch.cat(rewards)  # every round's so far, group by group
        informative = (r.view(-1, n).std(-1) > 0).nonzero().view(-1).tolist() if n > 1 else []
        counts = _all_ranks(r.new_tensor([float(len(informative))]), loop.world).view(-1)
        if counts.sum() >= st.batch:
            break
    before = int(counts[:loop.rank].sum().item())
    mine = informative[:max(0, st.batch - before)]
    groups = int(min(counts.sum().item(), st.batch))
    if groups == 0:
        mine = list(range(st.batch // loop.world))
    pick = [g * n + j for g in mine for j in range(n)]
    return {"sampled": (sampled, r), "comps": [sampled[i] for i in pick], "rewards": r[pick],
            "rounds": rnd + 1, "groups": groups}


def end_reason(st: Stage, step: int, hist: dict, n_prompts: int) -> str | None:
    """Why the stage ends after `step` steps, or None to go on. hist holds every step's global
    "reward" and "trunc" so far and the held-out "eval" scores as [step, pass@1]; rules in order:

      truncation  mean of the truncated fraction over the last W = end_window steps <= end_trunc
      plateau     the W-step mean reward has not exceeded its best for end_plateau steps
      eval        the latest held-out pass@1 >= end_eval (scored at this step)
      epochs      one more batch would pass end_epochs x the stage's prompts (hist["drawn"]
                  counts the prompts drawn, dynamic sampling's extra rounds included)
      steps       the stage's cap

    A moving average exists only once W steps have run, so no rule fires on a partial window.
    Thresholds compare with a slack of 1e-9: a truncated fraction or a pass@1 is a multiple of
    1/(samples), far coarser, while the rounding of a W-term mean is ~W x 1e-16."""
    W, slack = st.end_window, 1e-9
    trunc, reward = hist["trunc"], hist["reward"]
    if st.end_trunc is not None and len(trunc) >= W:
        avg = sum(trunc[-W:]) / W
        if avg <= st.end_trunc + slack:
            return f"truncation: {avg:.3f} (mean of {W} steps) <= {st.end_trunc}"
    if st.end_plateau and len(reward) >= W:
        means = [sum(reward[i - W:i]) / W for i in range(W, len(reward) + 1)]
        best = max(range(len(means)), key=means.__getitem__)  # the first step reaching the best
        if len(means) - 1 - best >= st.end_plateau:
            return (f"plateau: the {W}-step mean reward's best, {means[best]:.3f} at step "
                    f"{best + W}, not exceeded for {st.end_plateau} steps")
    if st.end_eval is not None and hist["eval"] and hist["eval"][-1][0] == step:
        if hist["eval"][-1][1] >= st.end_eval - slack:
            return f"eval: held-out pass@1 {hist['eval'][-1][1]:.3f} >= {st.end_eval}"
    drawn = hist.get("drawn", step * st.batch)  # more than step x batch with dynamic sampling
    if st.end_epochs and drawn + st.batch > st.end_epochs * n_prompts:
        return f"epochs: {drawn} prompts drawn of {n_prompts}, {st.end_epochs} epoch(s)"
    if step >= st.steps:
        return f"steps: the stage's cap, {st.steps}"
    return None


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
    eval_every: int = 0    # score the held-out set every K steps (0: never), with:
    evaluate: Callable | None = None  # evaluate() -> {"pass@1": ...}; every rank calls it


def run_stage(st: Stage, stage: int, prompts, loop: Loop, start: int = 0,
              counters: dict | None = None) -> tuple[str, int, str]:
    """Train one stage from step `start` until a rule ends it (end_reason; at the latest st.steps);
    prompts are (ids, answer) pairs.

    Returns (status, last step, why): status "done" (a rule ended the stage), "stopped" (a signal:
    checkpoint written) or "nan" (max_skips bad updates in a row: saved)."""
    c = counters if counters is not None else {}
    for k in ("skipped_steps", "skips_in_row", "reward_errors"):
        c.setdefault(k, 0)
    hist = c.setdefault("history", {"reward": [], "trunc": [], "eval": []})
    metrics_f = open(os.path.join(loop.out_dir, "metrics.jsonl"), "a") if loop.rank == 0 else None
    t_start = time.time()
    status, step, why = "done", start, ""
    while not why and status == "done":
        # 1-2. a batch of prompts (this rank's share), n samples each from the engine, rewards
        t0 = time.time()
        got = sample_step(st, stage, step, prompts, loop)
        comps = got["comps"]
        # 3. group-normalised advantages (each prompt's n samples live on one rank)
        adv = group_advantages(got["rewards"], st.n)
        keep = [x.finish_reason != "length" for x in comps] if st.overlong == "mask" else None
        t1 = time.time()
        # 4. the GRPO update, then 5. the new weights into the engine
        loop.engine.sleep()  # vLLM on a GPU hands its memory to the trainer meanwhile
        stats = loop.trainer.step(comps, adv, st, keep=keep)
        loop.engine.update_weights(loop.trainer.full_state_dict())
        t2 = time.time()
        step += 1
        # 6. one metrics line over all ranks (and the held-out score every eval_every steps)
        bad = stats.pop("skipped_updates")
        c["skipped_steps"] += bool(bad)
        c["skips_in_row"] = c["skips_in_row"] + 1 if bad else 0
        rec = {"step": step, "stage": stage,
               **_rollout_metrics(*got["sampled"], st.n, loop.world, c), **stats,
               "skipped_steps": c["skipped_steps"], "reward/errors": c["reward_errors"],
               "time/rollout_s": t1 - t0, "time/train_s": t2 - t1}
        rec["throughput/tokens_per_s"] = rec.pop("tokens") / (t2 - t0)
        hist["drawn"] = hist.get("drawn", start * st.batch) + got["rounds"] * st.batch
        if st.dynamic_sampling:
            rec["dynamic/rounds"], rec["dynamic/groups"] = got["rounds"], got["groups"]
        if loop.eval_every and step % loop.eval_every == 0:
            res = loop.evaluate()
            rec["eval/pass@1"], rec["time/eval_s"] = res["pass@1"], time.time() - t2
            hist["eval"].append([step, res["pass@1"]])
        hist["reward"].append(rec["reward/mean"])
        hist["trunc"].append(rec["truncated_frac"])
        # 7. the stage's rules: the same global metrics on every rank, so all ranks agree
        why = end_reason(st, step, hist, len(prompts)) or ""
        if why:
            rec["stage_end"] = why
        if loop.rank == 0:
            _log(rec, st, stage, c, metrics_f, (time.time() - t_start) / (step - start))
        # 8. a checkpoint every save_every steps, and on the way out
        if c["skips_in_row"] >= loop.max_skips:
            status = "nan"
        elif loop.should_stop():
            status = "stopped"
        periodic = loop.save_every and step % loop.save_every == 0 and not why
        if status != "done" or periodic:
            loop.save(os.path.join(loop.out_dir, f"step{step}"), step, dict(c))
    if metrics_f:
        metrics_f.close()
    return status, step, why


def _log(rec: dict, st: Stage, stage: int, c: dict, metrics_f, per_step: float):
    """Rank 0: the metrics line, the progress line, the end of the stage (and a warning when every
    response was cut)."""
    step = rec["step"]
    if rec["truncated_frac"] == 1.0 and not c.get("warned_all_cut"):
        c["warned_all_cut"] = 1
        print(f"[fastcurl] warning: every response of step {step} was cut at the budget "
              f"({st.max_tokens} tokens): cut responses score 0, nothing is learned", flush=True)
    metrics_f.write(json.dumps(rec) + "\n")
    metrics_f.flush()
    ev = (f" eval {rec['eval/pass@1']:.3f} ({rec['time/eval_s']:.1f}s)"
          if "eval/pass@1" in rec else "")
    print(f"stage {stage} step {step}/{st.steps} reward {rec['reward/mean']:.3f} "
          f"len {rec['response_len/mean']:.1f} trunc {rec['truncated_frac']:.2f} "
          f"entropy {rec['entropy/mean']:.3f} kl {rec['kl/mean']:.4f}{ev} "
          f"step {per_step:.1f}s eta <= {per_step * (st.steps - step):.0f}s", flush=True)
    if rec.get("dynamic/groups", st.batch) < st.batch and not c.get("warned_few_groups"):
        c["warned_few_groups"] = 1
        print(f"[fastcurl] step {step}: {rec['dynamic/groups']} of {st.batch} groups had rewards "
              f"that differ after {rec['dynamic/rounds']} rounds (--dynamic-sampling "
              f"{st.dynamic_sampling}): training on them (dynamic/groups in metrics.jsonl)",
              flush=True)
    if "stage_end" in rec:
        print(f"[fastcurl] stage {stage} ends after step {step}: {rec['stage_end']}", flush=True)


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
    boundaries marked with the rule that ended each stage."""
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
    for i, r in enumerate(rows):  # why each stage ended, at its last step
        if r.get("stage_end"):
            axes[-1].text(i + 1.5, axes[-1].get_ylim()[1], r["stage_end"].split(":")[0] + " ",
                          rotation=90, va="top", ha="right", fontsize=7, color="gray")
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
