"""FastCuRL's curriculum: the stages in order, and the steps of each until a rule ends it.

Each stage trains on its own slice of the problems (L1 = prompts no longer than the mean, L3 =
longer, L2 = all) with its own response budget: short problems with a short budget first, then the
budget grows (context scaling). `run` is the whole algorithm: each stage's reference policy is the
previous stage's final, its optimizer and sampler are fresh, and `train_stage` runs its steps

    prompts -> engine.generate(n each, budget) -> rewards -> group advantages -> GRPO update
            -> push weights into the engine -> one metrics line -> (every K steps) a checkpoint

until a rule (`end_reason`) ends the stage; then its final checkpoint and its held-out score. The
stage's settings are a settings.Stage, the run's a grpo.Plan (built and checked before any compute).

    python curriculum.py plot runs/toy     # reward, length, entropy, truncation per step, by stage
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import sys
import time

import torch
import torch.distributed as dist

import checkpoint
import data
import fsdp
from eval import evaluate_file
from model import Transformer
from reward import reward_errors, score_completions
from settings import fit_seed
from trainer import Trainer, group_advantages


def run(plan, policy, engine, stop) -> str | None:
    """Every stage of the plan in order -> None, or the message to exit with. stop(): whether a
    signal asked the run to stop (checkpoint.StopFlag)."""
    logger = StageLogger()
    try:
        return run_stages(plan, policy, engine, stop, logger)
    finally:  # however the run ends (a signal, NaN, an error), what was logged is kept
        logger.close()


def run_stages(plan, policy, engine, stop, logger) -> str | None:
    """run's stages, each stage's metrics rows also to its logger run (--logger)."""
    for index, stage_plan in enumerate(plan.stages):
        if stop():  # a signal during start-up, or during the previous stage's eval
            say(plan, f"stopped by a signal before stage {stage_plan.number} trained: rerun the "
                      f"same command" + (" with --resume" if index else "") + " to continue")
            return None
        # 1. a fresh start for the stage's random numbers, then its reference policy: its
        # starting weights (the previous stage's final), frozen
        torch.manual_seed(fit_seed(plan.options.seed * 1009 + plan.rank))
        reference = load_model(stage_plan.src, plan.options, plan.device, frozen=True) \
            if stage_plan.settings.kl_coef else None
        # 2. a fresh optimizer and sampler; a resume restores them and where the stage was
        trainer = Trainer(policy, plan.train, reference, plan.tok.pad_id)
        sampler_seed = fit_seed(plan.options.seed * 1000 + stage_plan.number, SAMPLER_SEED_BITS)
        sampler = data.Sampler(len(stage_plan.prompts), stage_plan.settings.batch, plan.rank,
                               plan.world, seed=sampler_seed)
        state = StageState()
        if stage_plan.resume_from:
            state = StageState(**checkpoint.restore(stage_plan.resume_from, trainer, sampler,
                                                    plan.rank))
            say(plan, f"resumed from {stage_plan.resume_from} at step {state.step}")
        problem = begin_stage_files(plan, stage_plan, state)
        if problem:
            return problem
        if problem := logger.open(plan, stage_plan, state.step):
            return problem
        # 3. steps until a rule ends the stage (or a signal, or updates that keep failing); a
        # checkpoint whose state has an end was saved by a signal in the stage's last step, or is
        # a final whose cap --resume raised (then the stage goes on)
        if state.end.startswith("steps") and state.step < stage_plan.settings.steps:
            state.end = ""
        status = "done" if state.end else train_stage(plan, stage_plan, trainer, sampler, engine,
                                                      state, stop, logger)
        saved = checkpoint.latest_marker(stage_plan.dir)
        if status == "stopped":
            say(plan, f"stopped by a signal; checkpoint in {saved}: rerun the same command with "
                      f"--resume to continue")
            return None
        if status == "nan":
            return (f"[fastcurl] {plan.options.max_skips} updates in a row had a NaN/inf loss or "
                    f"gradient norm; saved {saved}. Look at the learning rate, the data of the "
                    f"last steps (metrics.jsonl) and --dtype; rerun with --resume after a change.")
        if status != "done":  # a write that found the disk full
            return status
        # 4. the held-out score (eval.json and the log), 5. the final checkpoint, last: a stage
        # with its final is complete
        if plan.eval_file:
            result, problem = score_held_out(plan, stage_plan.settings, engine), None
            if plan.rank == 0:
                result.update(stage=stage_plan.number, end_step=state.step, end_reason=state.end)
                problem = checkpoint.write_atomic(os.path.join(stage_plan.dir, "eval.json"),
                                                  json.dumps(result, indent=2))
                say(plan, f"stage {stage_plan.number} held-out {os.path.basename(plan.eval_file)}: "
                          f"pass@1 {result['pass@1']:.3f} (k={plan.options.eval_k}), mean length "
                          f"{result['response_len/mean']:.1f}" + (f", {result['dropped']} prompts "
                          "over the engine's max_model_len dropped" if result["dropped"] else ""))
            if problem := checkpoint.on_every_rank(problem):
                return problem
        if problem := save(plan, stage_plan, trainer, sampler, state, "final"):
            return problem
        logger.close()
    return None


def train_stage(plan, stage_plan, trainer, sampler, engine, state, stop, logger) -> str:
    """Steps from state.step until a rule ends the stage (state.end says why) -> "done", "stopped"
    (a signal: checkpointed), "nan" (--max-skips bad updates in a row: checkpointed), or the
    message of a write that found the disk full (the checkpoint before is the last)."""
    stage, options = stage_plan.settings, plan.options
    first_step, t_start = state.step, time.time()
    while True:
        # 1-2. a batch of prompts (this rank's share), n samples each from the engine, rewards
        t0 = time.time()
        batch = sample_batch(plan, stage_plan, state.step, engine, sampler)
        # 3. group-normalised advantages (each prompt's n samples live on one rank)
        advantages = group_advantages(batch.rewards, stage.n)
        keep = [c.finish_reason != "length" for c in batch.completions] \
            if stage.overlong == "mask" else None
        t1 = time.time()
        # 4. the GRPO update, then 5. the new weights into the engine
        engine.sleep()  # vLLM on a GPU hands its memory to the trainer meanwhile
        stats = trainer.step(batch.completions, advantages, stage, keep=keep)
        t2 = time.time()
        engine.update_weights(trainer.full_state_dict(compute=True))
        t3 = time.time()
        # 6. one metrics line over all ranks (and the held-out score every --eval-every steps)
        rollout = rollout_metrics(*batch.sampled, stage.n, plan.world)
        state.count(rollout, stats.pop("skipped_updates"), batch.rounds * stage.batch)
        record = {"step": state.step, "stage": stage_plan.number,
                  **{k: v for k, v in rollout.items() if k not in ("tokens", "errors")}, **stats,
                  "skipped_steps": state.skipped_steps, "reward/errors": state.reward_errors,
                  "time/rollout_s": t1 - t0, "time/train_s": t2 - t1, "time/sync_s": t3 - t2,
                  "throughput/tokens_per_s": rollout["tokens"] / (t3 - t0)}
        if stage.dynamic_sampling:
            record["dynamic/rounds"], record["dynamic/groups"] = batch.rounds, batch.groups
        if options.eval_every and state.step % options.eval_every == 0:
            pass_at_1 = score_held_out(plan, stage, engine, options.eval_limit or None)["pass@1"]
            record.update({"eval/pass@1": pass_at_1, "time/eval_s": time.time() - t3})
            state.evals.append([state.step, pass_at_1])
        # 7. the stage's rules, on metrics of all ranks: every rank ends at the same step
        state.end = end_reason(stage, state, len(stage_plan.prompts)) or ""
        if state.end:
            record["stage_end"] = state.end
        if problem := checkpoint.on_every_rank(log_step(plan, stage_plan, record, state,
                                                        first_step, t_start, logger)):
            return problem
        # 8. a checkpoint every --save-every steps, and on the way out
        status = ("nan" if state.skips_in_row >= options.max_skips
                  else "stopped" if stop() else "done")  # stop(): a collective, every rank asks it
        periodic = options.save_every and state.step % options.save_every == 0
        if status != "done" or (periodic and not state.end):
            status = save(plan, stage_plan, trainer, sampler, state, f"step{state.step}") or status
        if status != "done" or state.end:
            return status


# ---- the stage's state and its rules ------------------------------------------------------------

@dataclasses.dataclass
class StageState:
    """Where a stage is, saved in every checkpoint so that a resume goes on exactly."""
    step: int = 0
    drawn: int = 0           # prompts drawn (dynamic sampling's extra rounds included)
    skipped_steps: int = 0   # steps whose update was skipped (a NaN/inf loss or gradient norm)
    skips_in_row: int = 0
    reward_errors: int = 0   # verifier errors and time-outs so far (each scored 0)
    rewards: list = dataclasses.field(default_factory=list)    # each step's mean reward
    truncated: list = dataclasses.field(default_factory=list)  # each step's truncated fraction
    evals: list = dataclasses.field(default_factory=list)      # [step, held-out pass@1]
    warned: list = dataclasses.field(default_factory=list)     # warnings given once
    end: str = ""            # why the stage ended ("" while it runs)

    def count(self, rollout: dict, skipped: int, drawn: int):
        """One more step: its rollout metrics (all ranks), its skipped updates, prompts drawn."""
        self.step += 1
        self.drawn += drawn
        self.skipped_steps += bool(skipped)
        self.skips_in_row = self.skips_in_row + 1 if skipped else 0
        self.reward_errors += rollout["errors"]
        self.rewards.append(rollout["reward/mean"])
        self.truncated.append(rollout["truncated_frac"])


def end_reason(stage, state: StageState, n_prompts: int) -> str | None:
    """Why the stage ends after state.step steps, or None to go on; rules in order:

      truncation  mean of the truncated fraction over the last W = end_window steps <= end_trunc
      plateau     the W-step mean reward has not exceeded its best for end_plateau steps
      eval        the latest held-out pass@1 >= end_eval (scored at this step)
      epochs      one more batch would pass end_epochs x the stage's prompts (state.drawn counts
                  the prompts drawn, dynamic sampling's extra rounds included)
      steps       the stage's cap

    A moving average exists only once W steps have run, so no rule fires on a partial window.
    Thresholds compare with a slack of 1e-9: a truncated fraction or a pass@1 is a multiple of
    1/(samples), far coarser, while the rounding of a W-term mean is ~W x 1e-16."""
    W, slack, step = stage.end_window, 1e-9, state.step
    if stage.end_trunc is not None and len(state.truncated) >= W:
        mean = sum(state.truncated[-W:]) / W
        if mean <= stage.end_trunc + slack:
            return f"truncation: {mean:.3f} (mean of {W} steps) <= {stage.end_trunc}"
    if stage.end_plateau and len(state.rewards) >= W:
        means = [sum(state.rewards[i - W:i]) / W for i in range(W, len(state.rewards) + 1)]
        best = max(range(len(means)), key=means.__getitem__)  # the first step reaching the best
        if len(means) - 1 - best >= stage.end_plateau:
            return (f"plateau: the {W}-step mean reward's best, {means[best]:.3f} at step "
                    f"{best + W}, not exceeded for {stage.end_plateau} steps")
    if stage.end_eval is not None and state.evals and state.evals[-1][0] == step:
        if state.evals[-1][1] >= stage.end_eval - slack:
            return f"eval: held-out pass@1 {state.evals[-1][1]:.3f} >= {stage.end_eval}"
    if stage.end_epochs and state.drawn + stage.batch > stage.end_epochs * n_prompts:
        return f"epochs: {state.drawn} prompts drawn of {n_prompts}, {stage.end_epochs} epoch(s)"
    if step >= stage.steps:
        return f"steps: the stage's cap, {stage.steps}"
    return None


SAMPLER_SEED_BITS = 42  # data.Sampler seeds each epoch with seed * 1_000_003 (< 2**20) + epoch


# ---- steps 1-2: samples and rewards --------------------------------------------------------------

def rollout_seed(seed: int, stage: int, step: int, rank: int, rnd: int = 0) -> int:
    """The engine's seed for one rank's samples of a step (rnd: dynamic sampling's extra round)."""
    base = fit_seed(((seed * 1_000_003 + stage) * 1_000_003 + step) * 1009 + rank)
    return base if not rnd else (base * 1_000_003 + rnd) % (1 << 62)


@dataclasses.dataclass
class Batch:
    """A step's samples: the groups to train on, and every round sampled (for the metrics)."""
    completions: list        # rollout.Completion, n per prompt, prompt-major
    rewards: torch.Tensor    # [len(completions)]
    sampled: tuple           # (completions, rewards) of every round
    rounds: int              # sampling rounds (1 without dynamic sampling)
    groups: int              # groups trained on over all ranks


def shape_rewards(stage, completions, rewards: torch.Tensor) -> torch.Tensor:
    """Overlong responses (DAPO), stage.overlong: "zero", a cut response keeps its 0; "mask", the
    same, and the loop leaves cut responses out of the loss (their 0 still counts in their group's
    mean and std: DAPO filters after the advantages); "penalty", the soft overlong punishment added
    to every reward, with budget B and window L:

        r += 0 if len <= B - L,  (B - L - len) / L if B - L < len <= B   (-1 for a cut response)"""
    if stage.overlong != "penalty":
        return rewards
    B = stage.max_tokens
    L = stage.overlong_window or max(1, B // 4)
    return rewards + rewards.new_tensor([min(0.0, (B - L - len(c.response_ids)) / L)
                                         for c in completions])


def sample_batch(plan, stage_plan, step: int, engine, sampler) -> Batch:
    """This rank's share of a batch of prompts, n samples each, and their rewards (a right boxed
    answer scores 1; a response cut at the budget scores 0; then shape_rewards).

    With dynamic sampling (DAPO) a group whose n rewards are all equal has no gradient: such groups
    are dropped and more prompts sampled, up to stage.dynamic_sampling extra rounds, until all ranks
    together hold stage.batch groups whose rewards differ; the first stage.batch (in rank order) are
    trained on. Fewer after the last round: what there is (none at all: the first round's, whose
    advantages are 0). The sampler moves past every prompt drawn: a resume draws the same rounds."""
    stage, n, prompts = stage_plan.settings, stage_plan.settings.n, stage_plan.prompts
    sampled, per_round = [], []
    for rnd in range(stage.dynamic_sampling + 1):
        batch = [prompts[i] for i in sampler.next()]
        seed = rollout_seed(plan.options.seed, stage_plan.number, step, plan.rank, rnd)
        completions = engine.generate([ids for ids, _ in batch], n=n, max_tokens=stage.max_tokens,
                                      temperature=stage.temperature, top_p=stage.top_p, seed=seed)
        answers = [batch[i // n][1] for i in range(len(completions))]
        scores = torch.tensor(score_completions(completions, answers, plan.tok.decode),
                              device=fsdp.comm_device())
        sampled += completions
        per_round.append(shape_rewards(stage, completions, scores))
        if not stage.dynamic_sampling:
            return Batch(completions, per_round[0], (completions, per_round[0]), 1, stage.batch)
        rewards = torch.cat(per_round)  # every round's, as `sampled`
        informative = (rewards.view(-1, n).std(-1) > 0).nonzero().view(-1).tolist() if n > 1 else []
        counts = _all_ranks(rewards.new_tensor([float(len(informative))]), plan.world).view(-1)
        if counts.sum() >= stage.batch:
            break
    before = int(counts[:plan.rank].sum().item())
    mine = informative[:max(0, stage.batch - before)]
    groups = int(min(counts.sum().item(), stage.batch))
    if groups == 0:
        mine = list(range(stage.batch // plan.world))
    pick = [g * n + j for g in mine for j in range(n)]
    return Batch([sampled[i] for i in pick], rewards[pick], (sampled, rewards), rnd + 1, groups)


# ---- step 6: metrics, held-out scores, files -----------------------------------------------------

def rollout_metrics(completions, rewards: torch.Tensor, n: int, world: int) -> dict:
    """Reward, length, truncation, zero-advantage share, tokens and verifier errors over all ranks:
    every rank's values in one all-gather (on the collectives' device), one copy to the host."""
    N = len(completions)
    zero = (rewards.view(-1, n).std(-1) == 0).float() if n > 1 else rewards.new_ones(N // n)
    lengths = [len(c.response_ids) for c in completions]
    cut = [c.finish_reason == "length" for c in completions]
    n_tokens = sum(len(c.prompt_ids) for c in completions) + sum(lengths)
    mine = torch.cat([rewards, rewards.new_tensor(lengths + cut), zero,
                      rewards.new_tensor([n_tokens, reward_errors()])])
    every = _all_ranks(mine, world)  # [world, 3N + N/n + 2]
    R, L, T = (every[:, k * N:(k + 1) * N].reshape(-1) for k in range(3))
    Z, tokens, errors = every[:, 3 * N:-2].reshape(-1), every[:, -2].sum(), every[:, -1].sum()
    host = torch.stack([R.mean(), R.std(), L.mean(), L.max(), T.mean(), Z.mean(), tokens,
                        errors]).tolist()
    return dict(zip(["reward/mean", "reward/std", "response_len/mean", "response_len/max",
                     "truncated_frac", "zero_adv_frac", "tokens"], host), errors=int(host[7]))


def log_step(plan, stage_plan, record: dict, state: StageState, first_step: int, t_start: float,
             logger):
    """Rank 0: the step's metrics.jsonl line (and the logger's row), the progress line (time per
    step since first_step), the stage's end, and the warnings given once (every response cut; too
    few groups differ) -> None, or the message of a full disk."""
    if plan.rank != 0:
        return None
    stage, number, step = stage_plan.settings, stage_plan.number, record["step"]
    if record["truncated_frac"] == 1.0 and "all_cut" not in state.warned:
        state.warned.append("all_cut")
        say(plan, f"warning: every response of step {step} was cut at the budget "
                  f"({stage.max_tokens} tokens): cut responses score 0, nothing is learned")
    metrics = os.path.join(stage_plan.dir, "metrics.jsonl")
    size = os.path.getsize(metrics) if os.path.exists(metrics) else 0

    def append():
        with open(metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
    if problem := checkpoint.full_disk(stage_plan.dir, append):  # without the part written
        os.truncate(metrics, size)
        return problem
    logger.log(record)
    per_step = (time.time() - t_start) / (step - first_step)
    held_out = (f" eval {record['eval/pass@1']:.3f} ({record['time/eval_s']:.1f}s)"
                if "eval/pass@1" in record else "")
    print(f"stage {number} step {step}/{stage.steps} reward {record['reward/mean']:.3f} "
          f"len {record['response_len/mean']:.1f} trunc {record['truncated_frac']:.2f} "
          f"entropy {record['entropy/mean']:.3f} kl {record['kl/mean']:.4f}{held_out} "
          f"step {per_step:.1f}s eta <= {per_step * (stage.steps - step):.0f}s", flush=True)
    if record.get("dynamic/groups", stage.batch) < stage.batch and "few_groups" not in state.warned:
        state.warned.append("few_groups")
        say(plan, f"step {step}: {record['dynamic/groups']} of {stage.batch} groups had rewards "
                  f"that differ after {record['dynamic/rounds']} rounds (--dynamic-sampling "
                  f"{stage.dynamic_sampling}): training on them (dynamic/groups in metrics.jsonl)")
    if state.end:
        say(plan, f"stage {number} ends after step {step}: {state.end}")


WANDB_FLUSH = "x_transaction_log_flush_interval"  # seconds between writes of wandb's run file


class StageLogger:
    """--logger tensorboard|wandb, rank 0: every metrics.jsonl row of a stage also goes to the
    stage's logger run, at global step = its "step", numbers as scalars and texts (stage_end) as
    text. One run per stage, kept in the stage's folder; a resume continues it from the checkpoint's
    step."""
    kind, writer = "none", None  # the writer: a SummaryWriter or a wandb run while a stage runs

    def open(self, plan, stage_plan, step: int) -> str | None:
        """The stage's run, continued after `step` -> None, or on every rank the message of one
        that cannot start."""
        kind, problem = plan.options.logger if plan.rank == 0 else "none", None
        try:
            if kind != "none":
                start = tensorboard_writer if kind == "tensorboard" else wandb_run
                self.writer = start(stage_plan, step)
            self.kind = kind
        except Exception as e:  # wandb.init's errors (no API key, no network) are of many kinds
            problem = (f"[fastcurl] --logger {kind} cannot start: {e} (rerun with --resume once "
                       f"fixed)")
        return checkpoint.on_every_rank(problem)

    def log(self, record: dict):
        if self.kind == "wandb":  # commit: sent now, not when the next step comes
            self.writer.log(record, step=record["step"], commit=True)
        elif self.kind == "tensorboard":
            for key, value in record.items():
                if isinstance(value, str):
                    self.writer.add_text(key, value, record["step"])
                else:
                    self.writer.add_scalar(key, value, record["step"])
            self.writer.flush()  # a kill loses no row that metrics.jsonl has

    def close(self):
        if self.kind == "wandb":
            self.writer.finish()
        elif self.kind == "tensorboard":
            self.writer.close()
        self.kind, self.writer = "none", None


def tensorboard_writer(stage_plan, step: int):
    """The stage's TensorBoard writer, continued after `step`."""
    from torch.utils.tensorboard import SummaryWriter
    # the events of steps after the checkpoint, logged by a process that died before its next
    # one, are hidden as metrics.jsonl drops their lines
    writer = SummaryWriter(os.path.join(stage_plan.dir, "tensorboard"), purge_step=step + 1)
    writer.add_text("run.json", json.dumps(stage_plan.identity, indent=1), step)
    return writer


def wandb_run(stage_plan, step: int):
    """The stage's wandb run (its steps are the rows' own: `step` is not needed)."""
    import wandb
    id_file, run_id = os.path.join(stage_plan.dir, "wandb_id"), secrets.token_hex(4)
    if os.path.exists(id_file):  # the same run on every resume
        with open(id_file) as f:
            run_id = f.read().strip()
    checkpoint.write_atomic(id_file, run_id)  # a full disk: the step's next write says so
    # wandb writes its run file every 15 s (older versions: every 32 KiB): a kill would lose the
    # rows of those seconds, so a shorter interval where wandb has the setting
    known = getattr(wandb.Settings, "model_fields", {})
    flush = {WANDB_FLUSH: 0.25} if WANDB_FLUSH in known else {}
    out = os.path.basename(os.path.dirname(os.path.abspath(stage_plan.dir)))
    return wandb.init(project=os.environ.get("WANDB_PROJECT") or "fastcurl", id=run_id,
                      name=f"{out}-stage{stage_plan.number}", resume="allow", dir=stage_plan.dir,
                      config=stage_plan.identity, settings=wandb.Settings(**flush))


def score_held_out(plan, stage, engine, limit: int | None = None) -> dict:
    """pass@1 on the held-out file (its first `limit` problems) at the run's eval budget, the same
    for every stage so that their scores compare like for like; every rank takes part."""
    return evaluate_file(engine, plan.tok, plan.template, plan.eval_file, k=plan.options.eval_k,
                         temperature=stage.temperature, max_tokens=plan.eval_tokens,
                         max_prompt=stage.max_prompt, seed=fit_seed(plan.options.seed),
                         rank=plan.rank, world=plan.world, problems=plan.eval_problems, limit=limit)


def begin_stage_files(plan, stage_plan, state: StageState) -> str | None:
    """Rank 0: the run's identity (run.json), and metrics.jsonl without the lines logged after the
    checkpoint (by a run that died before its next one) -> None, or on every rank the message to
    exit with (a damaged line)."""
    problem = None
    if plan.rank == 0:
        os.makedirs(stage_plan.dir, exist_ok=True)
        problem = checkpoint.write_atomic(os.path.join(stage_plan.dir, "run.json"),
                                          json.dumps(stage_plan.identity, indent=1))
        metrics = os.path.join(stage_plan.dir, "metrics.jsonl")
        if os.path.exists(metrics) and not problem:
            keep, problem = metrics_until(plan, metrics, state.step)
            problem = problem or checkpoint.write_atomic(metrics, "".join(keep))
    return checkpoint.on_every_rank(problem)


def metrics_until(plan, path: str, step: int) -> tuple[list | None, str | None]:
    """metrics.jsonl's lines of the steps up to `step` -> (lines, None), or (None, what is wrong).
    A last line cut short (a kill while it was written) is dropped with a note."""
    with open(path, errors="replace") as f:
        lines = f.readlines()
    keep = []
    for number, line in enumerate(lines, 1):
        row = metrics_row(line)
        if row is None and line.strip():
            if number == len(lines) and not line.endswith("\n"):
                say(plan, f"{path}: its last line was cut short (a kill while it was written): "
                          f"dropped")
                continue
            return None, (f"[fastcurl] {path} line {number} is not a metrics row (a JSON object "
                          f"with an integer step): repair or delete it, then rerun with --resume")
        if row and row["step"] <= step:
            keep.append(line.rstrip("\n") + "\n")
    return keep, None


def metrics_row(line: str) -> dict | None:
    """One metrics.jsonl line -> its row (a JSON object with an integer step), or None."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


def save(plan, stage_plan, trainer, sampler, state: StageState, name: str):
    """A checkpoint of the stage (every rank takes part): the weights, each rank's optimizer and
    random states, the sampler and the stage's state -> None, or the message of a full disk."""
    extra = {"step": state.step, "stage": stage_plan.number, "sampler": sampler.state(),
             "recipe": plan.options.recipe, "seed": plan.options.seed,
             "state": dataclasses.asdict(state)}
    return checkpoint.save_checkpoint(os.path.join(stage_plan.dir, name), trainer, extra,
                                      stage_plan.src, plan.rank, keep=plan.options.keep,
                                      dtype=plan.save_dtype)


def load_model(path: str, options, device, frozen: bool = False) -> Transformer:
    """Any model the run needs (the policy, the reference) from a checkpoint folder (its fp32
    master/ if any), computing in --dtype, sharded as --fsdp says: none, whole on every rank in
    --dtype; hand (fsdp.shard) or torch (FSDP2), fp32 master shards gathered in --dtype per unit."""
    dtype = getattr(torch, options.dtype)
    model = Transformer.from_pretrained(checkpoint.weights_folder(path), device=device,
                                        dtype=dtype if options.fsdp == "none" else torch.float32)
    if options.fsdp == "hand":
        fsdp.shard(model, param_dtype=dtype if dtype != torch.float32 else None)
    elif options.fsdp == "torch":
        fsdp.torch_fully_shard(model, param_dtype=dtype)
    if frozen:
        model.eval().requires_grad_(False)
    return model


def say(plan, message: str):
    if plan.rank == 0:
        print(f"[fastcurl] {message}", flush=True)


def _all_ranks(x: torch.Tensor, world: int) -> torch.Tensor:
    """Every rank's x stacked: [world, *x.shape] (x on fsdp.comm_device())."""
    if world == 1:
        return x[None]
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x)
    return torch.stack(out)


def plot(run_dir: str, out: str | None = None) -> str:
    """Reward, response length, entropy and truncated fraction against global steps, stage
    boundaries marked with the rule that ended each stage."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install matplotlib (or pip install -e "
                         ".[plot])")
    if not os.path.isdir(run_dir):
        raise SystemExit(f"{run_dir}: no such folder (a run's --out)")
    rows = []
    stages = [int(name[5:]) for name in os.listdir(run_dir) if re.fullmatch(r"stage\d+", name)]
    for number in sorted(stages):
        path = os.path.join(run_dir, f"stage{number}", "metrics.jsonl")
        lines = open(path, errors="replace").readlines() if os.path.isfile(path) else []
        read = [row for row in map(metrics_row, lines) if row is not None]
        if len(read) < len(lines):
            print(f"[fastcurl] {path}: skipped {len(lines) - len(read)} line(s) that are not "
                  f"metrics rows", file=sys.stderr)
        rows += read
    if not rows:
        raise SystemExit(f"{run_dir}: no stage<N>/metrics.jsonl rows to plot")
    keys = [("reward/mean", "reward"), ("response_len/mean", "response length (tokens)"),
            ("entropy/mean", "entropy"), ("truncated_frac", "truncated fraction")]
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 9), sharex=True)
    stage_of = [row.get("stage") for row in rows]
    bounds = [i + 1 for i in range(1, len(rows)) if stage_of[i] != stage_of[i - 1]]
    for ax, (k, label) in zip(axes, keys):
        ax.plot(range(1, len(rows) + 1), [r.get(k, float("nan")) for r in rows], lw=1)
        for b in bounds:
            ax.axvline(b - 0.5, color="gray", ls="--", lw=0.8)
        ax.set_ylabel(label)
    for s in [1] + bounds:
        axes[0].text(s, axes[0].get_ylim()[1], f" stage {stage_of[s - 1]}", va="top",
                     fontsize=8)
    for i, r in enumerate(rows):  # why each stage ended, at its last step
        if r.get("stage_end"):
            axes[-1].text(i + 1.5, axes[-1].get_ylim()[1], r["stage_end"].split(":")[0] + " ",
                          rotation=90, va="top", ha="right", fontsize=7, color="gray")
    axes[-1].set_xlabel("step (all stages)")
    axes[-1].xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curriculum.png")
    try:
        fig.savefig(out, dpi=100)
    except OSError as e:
        raise SystemExit(f"{out}: cannot write the plot ({e.strerror or e})")
    return out


if __name__ == "__main__":
    usage = "usage: python curriculum.py plot RUN_DIR [OUT.png]"
    if len(sys.argv) >= 3 and sys.argv[1] == "plot":
        print(plot(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))
    elif sys.argv[1:2] in (["-h"], ["--help"]):
        print(f"{usage}\n\n{__doc__}")
    else:
        sys.exit(usage)
