"""FastCuRL with GRPO: the entry point.

    python grpo.py --stage 1                                  # the embedded toy, one process
    torchrun --nproc_per_node 2 grpo.py --stage 1             # the same, two data-parallel ranks
    torchrun --nproc_per_node 8 grpo.py --recipe fastcurl-1.5b --stage 2 --data deepscaler.json

    torchrun --nproc_per_node 2 grpo.py --stage 1-4           # the whole curriculum, one process

main() is three steps: resolve (the command line -> a checked Plan for every stage of the range,
before any compute), build (the policy and the rollout engine, once), run (per stage: its reference
and trainer, a resume restoring them, the loop from curriculum.py until a rule ends the stage, the
final checkpoint, the held-out eval). The GRPO math and the trainer step live in trainer.py, the
loop and the stage-end rules in curriculum.py, checkpoints in checkpoint.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import torch

import checkpoint
import curriculum
import data
import eval as evaluation
import fsdp
from model import Config, Transformer, check_weights, load_config
from rollout import choose_engine, make_engine
from trainer import AGGS, CORRECTIONS, LOSSES, Trainer, TrainConfig, check_stage
# group_advantages and grpo_loss are also grpo.* names, as DESIGN.md's contracts spell them
from trainer import group_advantages, grpo_loss  # noqa: F401

STAGE_FLAGS = dataclasses.fields(curriculum.Stage)  # each is a flag: --max-tokens, --end-trunc, ...
CHOICES = {"data": ["L1", "L2", "L3"], "agg": AGGS, "loss": LOSSES, "correction": CORRECTIONS,
           "overlong": ["zero", "mask", "penalty"]}


def flag_of(field: str) -> str:
    # torchrun owns --n*: the stage's n is --n-samples; its data split is --split
    return {"n": "--n-samples", "data": "--split"}.get(field, "--" + field.replace("_", "-"))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="FastCuRL: curriculum GRPO with stage-wise context scaling",
        epilog="Stage fields not given keep the recipe's value. With a range of stages a stage "
               "flag takes one value for all of them or one per stage: --max-tokens 40,80,120,80. "
               "A rule flag (--end-*) takes 'off' to drop the recipe's rule.")
    add = ap.add_argument
    add("--stage", default="1", help="a stage (2) or a range run in one process (1-4)")
    add("--recipe", default="toy", choices=sorted(curriculum.RECIPES))
    add("--model", default=None, help="stage 1's starting checkpoint (default: the toy model)")
    add("--data", default=None, help="problem file (default: the toy task)")
    add("--eval-data", default=None, help="held-out file scored at the end of each stage")
    add("--out", default=None, help="output folder (default runs/<recipe>)")
    add("--rollout", default="auto", choices=["auto", "torch", "vllm"])
    add("--template", default=None, choices=["r1", "qwen", "toy"],
        help="prompt format (default: from the checkpoint's tokenizer)")
    add("--save-every", type=int, default=10, help="checkpoint every K steps (0: only the final)")
    add("--keep", type=int, default=2, help="step checkpoints kept (0: all)")
    add("--max-skips", type=int, default=3, help="stop after this many non-finite updates in a row")
    add("--resume", action="store_true")
    add("--seed", type=int, default=0)
    add("--device", default="auto", choices=["auto", "cuda", "cpu"],
        help="auto: GPU LOCAL_RANK when there is a GPU, else the CPU; cpu: CPU ranks anywhere")
    add("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    add("--fsdp", default="hand", choices=["hand", "torch", "none"],
        help="hand: fsdp.py (default); torch: torch's FSDP2 fully_shard; none: plain data parallel")
    add("--token-budget", type=int, default=None, help="tokens per packed micro-batch")
    add("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    add("--eval-k", type=int, default=4, help="samples per held-out problem (0: no eval)")
    add("--eval-every", type=int, default=0,
        help="also score the held-out file every K steps (its first --eval-limit problems)")
    add("--eval-limit", type=int, default=64, help="problems scored by --eval-every (0: all)")
    add("--eval-tokens", type=int, default=None,
        help="the held-out response budget (default: the recipe's largest stage budget, with this "
             "run's overrides)")
    for f in STAGE_FLAGS:  # --batch, --n-samples, --max-tokens, --lr, --end-trunc, ...
        add(flag_of(f.name), dest="st_" + f.name, default=None, help="stage field")
    return ap.parse_args(argv)


def stage_range(text: str, recipe: str) -> range:
    """"2" -> stage 2; "1-4" -> stages 1 to 4 of the recipe."""
    n = len(curriculum.RECIPES[recipe])
    try:
        first, _, last = text.partition("-")
        r = range(int(first), int(last or first) + 1)
    except ValueError:
        r = range(0)
    if not r or r[0] < 1 or r[-1] > n:
        fail(f"--stage {text}: recipe {recipe} has stages 1..{n} (one, or a range like 1-{n})")
    return r


def stage_overrides(a, n: int) -> list[dict]:
    """The command line's stage fields, one dict per stage of the range (a flag's value is one
    value for all of them, or n values separated by commas)."""
    out = [{} for _ in range(n)]
    for f in STAGE_FLAGS:
        raw, flag = getattr(a, "st_" + f.name), flag_of(f.name)
        if raw is None:
            continue
        parts = raw.split(",")
        if len(parts) not in (1, n):
            fail(f"{flag} {raw}: give one value, or {n} separated by commas (one per stage)")
        for i, v in enumerate(parts * n if len(parts) == 1 else parts):
            try:
                if "None" in f.type and v.strip().lower() == "off":
                    out[i][f.name] = None
                else:
                    out[i][f.name] = {"int": int, "str": str}.get(f.type, float)(v)
            except ValueError:
                fail(f"{flag} {v}: not {'an integer' if f.type == 'int' else 'a number'}")
            if f.name in CHOICES and v not in CHOICES[f.name]:
                fail(f"{flag} {v}: must be one of {', '.join(CHOICES[f.name])}")
    return out


# ---- 1. resolve: the command line -> a checked plan ------------------------------------------

@dataclasses.dataclass
class StagePlan:
    """One stage of the run."""
    stage: int
    st: curriculum.Stage        # the recipe's stage with the command line's overrides
    stage_dir: str
    src: str                    # where it starts: --model (stage 1) or stage N-1's final
    prompts: list               # (prompt ids, answer) pairs of the stage's split
    identity: dict              # what makes two runs the same run (run.json)
    resume_from: str | None = None  # a step checkpoint of this stage to continue from
    complete: bool = False      # its final checkpoint exists already


@dataclasses.dataclass
class Plan:
    """The run, resolved from the command line and checked before any compute."""
    args: argparse.Namespace
    stages: list[StagePlan]     # those still to run, in order
    cfg: Config                 # the model's config
    tok: data.Tokenizer
    template: str
    eval_file: str | None       # the held-out file (None: no eval)
    eval_problems: list | None  # its problems, read and checked once
    eval_tokens: int            # the held-out eval's response budget
    max_model_len: int          # the longest prompt + response the engine will be asked for
    engine: tuple[str, str]     # (torch | vllm, why)
    rank: int
    world: int
    device: torch.device


def fail(msg: str):
    """Bad input: one line, exit status 1, nothing written."""
    sys.exit(f"[fastcurl] {msg}")


def resolve(a, rank: int, world: int, device: torch.device) -> Plan | None:
    """Every input of every stage in the range checked (values, files, model, output folder, an
    earlier run in --out); None when they are all complete already."""
    recipe = curriculum.RECIPES[a.recipe]
    stages = stage_range(a.stage, a.recipe)
    full = list(recipe)  # the recipe with this run's overrides
    for k, ov in zip(stages, stage_overrides(a, len(stages))):
        full[k - 1] = dataclasses.replace(recipe[k - 1], **ov)
    for k in stages:
        check_values(a, full[k - 1], world, rank, f" (stage {k})" if len(stages) > 1 else "")
    out = a.out or os.path.join("runs", a.recipe)
    check_writable(os.path.join(out, f"stage{stages[0]}"))
    src = start_checkpoint(a, out, stages[0])
    data_file = a.data or (data.TOY_DATA if a.recipe == "toy" else None)
    if data_file is None:
        fail(f"--recipe {a.recipe} needs --data (a problem file: JSON, JSONL or parquet)")
    eval_file = a.eval_data or (data.TOY_EVAL if a.recipe == "toy" and a.data is None else None)
    eval_file = eval_file if a.eval_k > 0 else None
    if (a.eval_every or any(full[k - 1].end_eval is not None for k in stages)) and not eval_file:
        fail("--eval-every and --end-eval need a held-out file: --eval-data (and --eval-k > 0)")
    if any(full[k - 1].end_eval is not None for k in stages) and not a.eval_every:
        fail("--end-eval needs --eval-every K (the held-out score it reads)")
    eval_problems = None
    try:  # each of these names the file (and line and field) that is wrong
        cfg = load_config(src)
        check_weights(src)
        tok = data.Tokenizer(src)
        template = a.template or tok.template
        sets, mean_len, _ = data.split_by_length(data.load_problems(data_file), template)
        encoded = {k: data.encode_problems(sets[full[k - 1].data], tok, template,
                                           full[k - 1].max_prompt) for k in stages}
        if eval_file:
            eval_problems = data.load_problems(eval_file)
            data.encode_problems(eval_problems, tok, template, max(s.max_prompt for s in full))
    except (ValueError, OSError, ImportError) as e:
        fail(str(e))
    # the recipe's largest budget: the stages' scores compare like for like
    eval_tokens = a.eval_tokens or curriculum.eval_budget(full)
    max_model_len = 0
    for k in stages:  # the longest sequence the engine will see: a stage's budget or the eval's
        st, (prompts, dropped) = full[k - 1], encoded[k]
        longest = max(st.max_tokens, eval_tokens if eval_file else 0)
        max_model_len = max(max_model_len, st.max_prompt + longest)
        if st.max_prompt + longest > cfg.max_position_embeddings:
            fail(f"stage {k}: prompt budget {st.max_prompt} + response budget {longest} exceeds "
                 f"the model's max_position_embeddings {cfg.max_position_embeddings} "
                 f"(--max-prompt, --max-tokens)")
        if len(prompts) < st.batch:
            fail(f"{data_file}: split {st.data} has {len(prompts)} prompts ({dropped} dropped over "
                 f"{st.max_prompt} tokens), fewer than --batch {st.batch}")
    plans = []
    for k in stages:
        st_src = src if k == stages[0] else os.path.join(out, f"stage{k - 1}", "final")
        identity = {"recipe": a.recipe, "stage": k, "seed": a.seed,
                    "data": os.path.abspath(data_file), "model": os.path.abspath(st_src),
                    "world": world, "stage_config": dataclasses.asdict(full[k - 1])}
        sp = StagePlan(k, full[k - 1], os.path.join(out, f"stage{k}"), st_src, encoded[k][0],
                       identity)
        find_earlier(a, sp, plans, cfg, rank)
        plans.append(sp)
    todo = [sp for sp in plans if not sp.complete]
    if not todo:
        return None
    engine = choose_engine(a.rollout, cfg)
    if rank == 0:
        for sp in todo:
            st, dropped = sp.st, encoded[sp.stage][1]
            print(f"[fastcurl] recipe {a.recipe} stage {sp.stage}: {st.data} ({len(sp.prompts)} "
                  f"prompts, {dropped} dropped over {st.max_prompt} tokens; split at mean length "
                  f"{mean_len:.1f}), response budget {st.max_tokens}, batch {st.batch} x "
                  f"n={st.n}, at most {st.steps} steps{rules_text(st)}, world {world}, device "
                  f"{device}, from {sp.src}", flush=True)
        print(f"[fastcurl] rollout engine: {engine[0]} ({engine[1]})", flush=True)
    return Plan(a, todo, cfg, tok, template, eval_file, eval_problems, eval_tokens, max_model_len,
                engine, rank, world, device)


def rules_text(st) -> str:
    rules = [f"truncation <= {st.end_trunc}" if st.end_trunc is not None else "",
             f"plateau {st.end_plateau}" if st.end_plateau else "",
             f"held-out pass@1 >= {st.end_eval}" if st.end_eval is not None else "",
             f"{st.end_epochs} epoch(s)" if st.end_epochs else ""]
    rules = [r for r in rules if r]
    return f" or until {', '.join(rules)} (window {st.end_window})" if rules else ""


def find_earlier(a, sp: StagePlan, before: list[StagePlan], cfg: Config, rank: int):
    """An earlier run of this stage in its folder: complete (skipped), or a step checkpoint to
    continue from (--resume); a stage after one still to run must not hold a run."""
    first_to_run = all(b.complete for b in before)
    if earlier_run(sp.stage_dir, sp.identity, a.resume):
        if not first_to_run:
            fail(f"{sp.stage_dir} holds a run, but an earlier stage of the range is not complete: "
                 f"choose another --out")
        if checkpoint.check_checkpoint(os.path.join(sp.stage_dir, "final")) is None:
            sp.complete = True
            if rank == 0:
                print(f"[fastcurl] stage {sp.stage} is already complete: {sp.stage_dir}/final",
                      flush=True)
            return
        sp.resume_from = checkpoint.latest_checkpoint(sp.stage_dir,
                                                      log=print if rank == 0 else lambda *_: None)
        if sp.resume_from and not checkpoint.same_architecture(load_config(sp.resume_from), cfg):
            fail(f"{sp.resume_from}/config.json does not match {sp.src}/config.json: not the same "
                 f"model")
    if a.resume and sp.resume_from is None and first_to_run and rank == 0:
        # nothing to resume (a crash before the first checkpoint, or a stage not begun)
        print(f"[fastcurl] --resume: no checkpoint in {sp.stage_dir} yet: stage {sp.stage} "
              f"starts from step 0", flush=True)


def check_values(a, st, world: int, rank: int, label: str = ""):
    """Each value in its range, or one line naming the flag, the value (and the stage, `label`)
    and what is allowed."""
    fin = math.isfinite
    rules = [
        ("--batch", st.batch, st.batch >= 1 and st.batch % world == 0,
         f"a positive multiple of the number of ranks ({world})"),
        ("--n-samples", st.n, st.n >= 1, "at least 1 (2 or more to learn anything)"),
        ("--max-tokens", st.max_tokens, st.max_tokens >= 1, "at least 1"),
        ("--max-prompt", st.max_prompt, st.max_prompt >= 1, "at least 1"),
        ("--steps", st.steps, st.steps >= 1, "at least 1"),
        ("--mini-batches", st.mini_batches, 1 <= st.mini_batches <= st.batch // world * st.n,
         "from 1 to the samples per rank (--batch x --n-samples / ranks)"),
        ("--lr", st.lr, fin(st.lr) and st.lr > 0, "a positive number"),
        ("--warmup-steps", st.warmup_steps, st.warmup_steps >= 0, "0 or more"),
        ("--kl-coef", st.kl_coef, fin(st.kl_coef) and st.kl_coef >= 0, "0 or more"),
        ("--entropy-coef", st.entropy_coef, fin(st.entropy_coef), "a finite number"),
        ("--clip-low", st.clip_low, 0 <= st.clip_low < 1, "in [0, 1)"),
        ("--clip-high", st.clip_high, fin(st.clip_high) and st.clip_high >= 0, "0 or more"),
        ("--temperature", st.temperature, fin(st.temperature) and st.temperature > 0, "above 0"),
        ("--top-p", st.top_p, 0 < st.top_p <= 1, "in (0, 1]"),
        ("--save-every", a.save_every, a.save_every >= 0, "0 (only the final) or more"),
        ("--keep", a.keep, a.keep >= 0, "0 (all) or more"),
        ("--max-skips", a.max_skips, a.max_skips >= 1, "at least 1"),
        ("--eval-k", a.eval_k, a.eval_k >= 0, "0 (no eval) or more"),
        ("--token-budget", a.token_budget, a.token_budget is None or a.token_budget >= 1,
         "at least 1"),
        ("--eval-every", a.eval_every, a.eval_every >= 0, "0 (never) or more"),
        ("--eval-limit", a.eval_limit, a.eval_limit >= 0, "0 (all) or more"),
        ("--eval-tokens", a.eval_tokens, a.eval_tokens is None or a.eval_tokens >= 1, "at least 1"),
        ("--end-trunc", st.end_trunc, st.end_trunc is None or 0 <= st.end_trunc <= 1,
         "in [0, 1] or off"),
        ("--end-plateau", st.end_plateau, st.end_plateau >= 0, "0 (off) or more"),
        ("--end-epochs", st.end_epochs, fin(st.end_epochs) and st.end_epochs >= 0,
         "0 (off) or more"),
        ("--end-eval", st.end_eval, st.end_eval is None or 0 <= st.end_eval <= 1,
         "in [0, 1] or off"),
        ("--end-window", st.end_window, st.end_window >= 1, "at least 1"),
        ("--overlong-window", st.overlong_window, 0 <= st.overlong_window <= st.max_tokens,
         "from 0 (a quarter of the budget) to --max-tokens"),
        ("--dynamic-sampling", st.dynamic_sampling, st.dynamic_sampling >= 0, "0 (off) or more"),
    ]
    for flag, value, ok, allowed in rules:
        if not ok:
            fail(f"{flag} {value}{label}: must be {allowed}")
    try:
        check_stage(st)
    except ValueError as e:
        fail(f"{e}{label}")
    if st.n == 1 and rank == 0:
        print("[fastcurl] warning: --n-samples 1: each prompt's group is one sample, so every "
              "advantage is 0 and nothing is learned", flush=True)


def check_writable(stage_dir: str):
    """The output folder, or the nearest folder above it that exists, must be a writable folder."""
    d = os.path.abspath(stage_dir)
    while not os.path.exists(d):
        d = os.path.dirname(d)
    if not os.path.isdir(d):
        fail(f"--out: {d} is a file, not a folder")
    if not os.access(d, os.W_OK | os.X_OK):
        fail(f"--out: {d} is not writable")


def start_checkpoint(a, out: str, stage: int) -> str:
    """Stage 1 starts from --model (the toy model by default), stage N from stage N-1's final."""
    if stage == 1:
        src = a.model or (data.TOY_MODEL if a.recipe == "toy" else None)
        if src is None:
            fail(f"--recipe {a.recipe} --stage 1 needs --model (a Hugging Face checkpoint folder)")
        if not os.path.isdir(src):
            fail(f"--model {src}: no such folder")
        return src
    src = os.path.join(out, f"stage{stage - 1}", "final")
    if not os.path.exists(os.path.join(src, "config.json")):
        fail(f"--stage {stage} starts from stage {stage - 1}'s final checkpoint, but {src} "
             f"does not exist: run --stage {stage - 1} with --out {out} first")
    return src


def earlier_run(stage_dir: str, identity: dict, resume: bool) -> bool:
    """True when stage_dir holds this run and --resume was given; exits when it holds a run
    otherwise."""
    run_file = os.path.join(stage_dir, "run.json")
    if not (os.path.exists(run_file) or os.path.exists(os.path.join(stage_dir, "metrics.jsonl"))):
        return False
    if not resume:
        fail(f"{stage_dir} already holds a run: pass --resume to continue it or choose another "
             f"--out")
    if os.path.exists(run_file):
        with open(run_file) as f:
            old = json.load(f)
        if "stage_config" in old:  # written before a stage field existed: it had its default
            defaults = {f.name: f.default for f in STAGE_FLAGS
                        if f.default is not dataclasses.MISSING}
            old["stage_config"] = {**defaults, **old["stage_config"]}
        diff = [k for k in identity if old.get(k) != identity[k]]
        if diff:
            fail(f"{stage_dir} holds a different run ({', '.join(diff)} differ: {run_file}); "
                 f"resume it with the same arguments or choose another --out")
    return True


# ---- 2. build: the policy and the engine (once), then per stage its reference and trainer -----

@dataclasses.dataclass
class Pieces:
    model: Transformer          # the policy (sharded under --fsdp hand/torch), kept across stages
    engine: object              # rollout.TorchEngine or rollout.VLLMEngine, kept across stages


def build(p: Plan) -> Pieces:
    """The policy at the first stage's starting point (a resume's checkpoint) and the engine, big
    enough for every stage of the run."""
    a, dev, dtype = p.args, p.device, getattr(torch, p.args.dtype)
    start_from = p.stages[0].resume_from or p.stages[0].src
    # the policy: fp32 master shards computing in --dtype; a native engine samples from its own full
    # copy, refreshed after every update (vLLM loads its own from the checkpoint folder)
    if a.fsdp == "none":
        model = gen_model = Transformer.from_pretrained(start_from, dtype=dtype, device=dev)
    else:
        model = Transformer.from_pretrained(start_from, dtype=torch.float32, device=dev)
        gen_model = model if p.engine[0] == "vllm" else \
            Transformer.from_pretrained(start_from, dtype=dtype, device=dev).eval()
        if a.fsdp == "hand":
            fsdp.shard(model, param_dtype=dtype if dtype != torch.float32 else None)
        else:
            fsdp.torch_fully_shard(model, param_dtype=dtype)
    engine = make_engine(p.engine[0], gen_model, p.tok, model_dir=start_from, rank=p.rank,
                         world=p.world, seed=a.seed, dtype=a.dtype, max_model_len=p.max_model_len)
    return Pieces(model, engine)


def begin_stage(p: Plan, sp: StagePlan, x: Pieces) -> tuple[Trainer, data.Sampler, int, dict]:
    """The stage's reference policy (its starting weights, frozen: the previous stage's final, as in
    FastCuRL), a fresh trainer and sampler; a resume restores them -> (trainer, sampler, first
    step, counters). A stage run after another in one process starts exactly as its own command
    would."""
    a, st = p.args, sp.st
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(a.seed * 1009 + p.rank)
    ref = None
    if st.kl_coef:
        ref = Transformer.from_pretrained(sp.src, dtype=dtype, device=p.device).eval()
        ref.requires_grad_(False)
        if a.fsdp != "none":
            (fsdp.shard if a.fsdp == "hand" else fsdp.torch_fully_shard)(ref)
    gc = a.grad_checkpointing if a.grad_checkpointing is not None else a.recipe != "toy"
    budget = a.token_budget or (16384 if a.recipe == "toy" else 32768)
    tcfg = TrainConfig(grad_clip=1.0, token_budget=budget, grad_checkpointing=gc)
    trainer = Trainer(x.model, tcfg, ref, p.tok.pad_id)
    sampler = data.Sampler(len(sp.prompts), st.batch, p.rank, p.world,
                           seed=a.seed * 1000 + sp.stage)
    start, counters = 0, {}
    if sp.resume_from:
        start, counters = checkpoint.restore(sp.resume_from, trainer, sampler, p.rank)
        if p.rank == 0:
            print(f"[fastcurl] resumed from {sp.resume_from} at step {start}", flush=True)
    return trainer, sampler, start, counters


# ---- 3. run: stage after stage, each its loop, its final checkpoint, its held-out eval --------

def run(p: Plan, x: Pieces) -> str | None:
    """-> None, or the message to exit with (the updates kept failing)."""
    stop = checkpoint.StopFlag()
    for i, sp in enumerate(p.stages):
        if i and stop():  # a signal during the last stage's eval: the next one starts on --resume
            if p.rank == 0:
                print(f"[fastcurl] stopped by a signal before stage {sp.stage}: rerun the same "
                      f"command with --resume to continue", flush=True)
            return None
        status, failure = train_stage(p, sp, x, stop)
        if status != "done":
            return failure
    return None


def train_stage(p: Plan, sp: StagePlan, x: Pieces, stop) -> tuple[str, str | None]:
    """One stage: its loop (curriculum.run_stage), then its final checkpoint and held-out score
    -> (status, the message to exit with or None)."""
    a, st = p.args, sp.st
    trainer, sampler, start, counters = begin_stage(p, sp, x)
    if p.rank == 0:  # this run's identity; metrics logged after the checkpoint by a run that died
        os.makedirs(sp.stage_dir, exist_ok=True)
        with open(os.path.join(sp.stage_dir, "run.json"), "w") as f:
            json.dump(sp.identity, f, indent=1)
        curriculum.truncate_metrics(os.path.join(sp.stage_dir, "metrics.jsonl"), start)
    fsdp.barrier()

    def save(path, step, counters, end=None):
        extra = {"step": step, "stage": sp.stage, "sampler": sampler.state(), "recipe": a.recipe,
                 "seed": a.seed, "counters": counters, **({"end": end} if end else {})}
        checkpoint.save_checkpoint(path, x.model, trainer, extra, sp.src, p.rank, keep=a.keep)

    def evaluate(limit=None):  # at the recipe's largest budget: stages compare like for like
        return evaluation.evaluate_file(x.engine, p.tok, p.template, p.eval_file, k=a.eval_k,
                                        temperature=st.temperature, max_tokens=p.eval_tokens,
                                        max_prompt=st.max_prompt, seed=a.seed, rank=p.rank,
                                        world=p.world, problems=p.eval_problems, limit=limit)

    loop = curriculum.Loop(x.engine, trainer, p.tok, sampler, sp.stage_dir, save, seed=a.seed,
                           rank=p.rank, world=p.world, save_every=a.save_every,
                           max_skips=a.max_skips, should_stop=stop, eval_every=a.eval_every,
                           evaluate=lambda: evaluate(a.eval_limit or None))
    status, step, why = curriculum.run_stage(st, sp.stage, sp.prompts, loop, start, counters)
    saved = checkpoint.latest_marker(sp.stage_dir)
    if status == "stopped":
        if p.rank == 0:
            print(f"[fastcurl] stopped by a signal; checkpoint in {saved}: rerun the same command "
                  f"with --resume to continue", flush=True)
        return status, None
    if status == "nan":
        return status, (f"[fastcurl] {a.max_skips} updates in a row had a NaN/inf loss or gradient "
                        f"norm; saved {saved}. Look at the learning rate, the data of the last "
                        f"steps (metrics.jsonl) and --dtype; rerun with --resume after a change.")
    save(os.path.join(sp.stage_dir, "final"), step, counters, end={"step": step, "reason": why})
    if p.eval_file:
        res = evaluate()
        if p.rank == 0:
            res.update(stage=sp.stage, end_step=step, end_reason=why)
            with open(os.path.join(sp.stage_dir, "eval.json"), "w") as f:
                json.dump(res, f, indent=2)
            print(f"[fastcurl] stage {sp.stage} held-out {os.path.basename(p.eval_file)}: pass@1 "
                  f"{res['pass@1']:.3f} (k={a.eval_k}), mean length {res['response_len/mean']:.1f}",
                  flush=True)
    return status, None


def main(argv=None):
    a = parse_args(argv)
    rank, world, device = fsdp.setup_dist(a.device)
    plan = resolve(a, rank, world, device)
    if plan is None:
        return fsdp.close_dist()
    pieces = build(plan)
    failure = run(plan, pieces)
    fsdp.close_dist(pieces.engine)
    if failure:
        sys.exit(failure)


if __name__ == "__main__":
    main()
    fsdp.finish()
