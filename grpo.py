"""FastCuRL with GRPO: the entry point.

    python grpo.py --stage 1                                  # the embedded toy, one process
    torchrun --nproc_per_node 2 grpo.py --stage 1             # the same, two data-parallel ranks
    torchrun --nproc_per_node 8 grpo.py --recipe fastcurl-1.5b --stage 2 --data deepscaler.json

main() is three steps: resolve (the command line -> a checked Plan, before any compute), build
(policy, reference, trainer, rollout engine, sampler; a resume restores them), run (the stage's loop
from curriculum.py, the final checkpoint, the held-out eval). The GRPO math and the trainer step
live in trainer.py, the loop in curriculum.py, checkpoints in checkpoint.py.
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
# group_advantages and grpo_loss are also grpo.* names, as DESIGN.md's contracts spell them
from trainer import Trainer, TrainConfig, group_advantages, grpo_loss  # noqa: F401

STAGE_FLAGS = [f for f in dataclasses.fields(curriculum.Stage) if f.name not in ("data", "steps")]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="FastCuRL: curriculum GRPO with stage-wise context scaling",
        epilog="Stage fields not given keep the recipe's value.")
    add = ap.add_argument
    add("--stage", type=int, default=1)
    add("--recipe", default="toy", choices=sorted(curriculum.RECIPES))
    add("--model", default=None, help="stage 1's starting checkpoint (default: the toy model)")
    add("--data", default=None, help="problem file (default: the toy task)")
    add("--eval-data", default=None, help="held-out file scored at the end of the stage")
    add("--out", default=None, help="output folder (default runs/<recipe>)")
    add("--rollout", default="auto", choices=["auto", "torch", "vllm"])
    add("--steps", type=int, default=None, help="override the stage's number of steps")
    add("--split", default=None, choices=["L1", "L2", "L3"], help="override the stage's data split")
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
    add("--tis-cap", type=float, default=0.0,
        help="truncated importance sampling: weight the loss by min(exp(trainer - engine logp), C)")
    add("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    add("--eval-k", type=int, default=4, help="samples per held-out problem at the end (0: skip)")
    for f in STAGE_FLAGS:  # --batch, --n-samples, --max-tokens, --lr, --kl-coef, ...
        # torchrun owns --n*: the stage's n is --n-samples
        flag = "--n-samples" if f.name == "n" else "--" + f.name.replace("_", "-")
        add(flag, dest=f.name, default=None, type={"int": int, "str": str}.get(f.type, float),
            help="stage override",
            choices=["token-mean", "seq-mean", "drgrpo"] if f.name == "agg" else None)
    return ap.parse_args(argv)


# ---- 1. resolve: the command line -> a checked plan ------------------------------------------

@dataclasses.dataclass
class Plan:
    """The run, resolved from the command line and checked before any compute."""
    args: argparse.Namespace
    st: curriculum.Stage        # the recipe's stage with the command line's overrides
    stage_dir: str
    src: str                    # where the stage starts: --model (stage 1) or stage N-1's final
    resume_from: str | None     # a step checkpoint of this stage to continue from
    cfg: Config                 # the model's config
    tok: data.Tokenizer
    template: str
    prompts: list               # (prompt ids, answer) pairs of the stage's split
    eval_file: str | None       # the held-out file scored at the end (None: no eval)
    eval_problems: list | None  # its problems, read and checked once
    eval_tokens: int            # the held-out eval's response budget
    max_model_len: int          # the longest prompt + response the engine will be asked for
    engine: tuple[str, str]     # (torch | vllm, why)
    identity: dict              # what makes two runs the same run (run.json)
    rank: int
    world: int
    device: torch.device


def fail(msg: str):
    """Bad input: one line, exit status 1, nothing written."""
    sys.exit(f"[fastcurl] {msg}")


def resolve(a, rank: int, world: int, device: torch.device) -> Plan | None:
    """Every input checked (values, files, model, output folder, an earlier run in --out); None when
    the stage is complete already."""
    stages = curriculum.RECIPES[a.recipe]
    if not 1 <= a.stage <= len(stages):
        fail(f"--stage {a.stage}: recipe {a.recipe} has stages 1..{len(stages)}")
    overrides = {f.name: getattr(a, f.name) for f in STAGE_FLAGS if getattr(a, f.name) is not None}
    overrides.update({k: v for k, v in (("steps", a.steps), ("data", a.split)) if v is not None})
    st = dataclasses.replace(stages[a.stage - 1], **overrides)
    check_values(a, st, world, rank)
    stage_dir = os.path.join(a.out or os.path.join("runs", a.recipe), f"stage{a.stage}")
    check_writable(stage_dir)
    src = start_checkpoint(a, os.path.dirname(stage_dir))
    data_file = a.data or (data.TOY_DATA if a.recipe == "toy" else None)
    if data_file is None:
        fail(f"--recipe {a.recipe} needs --data (a problem file: JSON, JSONL or parquet)")
    eval_file = a.eval_data or (data.TOY_EVAL if a.recipe == "toy" and a.data is None else None)
    eval_file = eval_file if a.eval_k > 0 else None
    eval_problems = None
    try:  # each of these names the file (and line and field) that is wrong
        cfg = load_config(src)
        check_weights(src)
        tok = data.Tokenizer(src)
        template = a.template or tok.template
        sets, mean_len, _ = data.split_by_length(data.load_problems(data_file), template)
        prompts, dropped = data.encode_problems(sets[st.data], tok, template, st.max_prompt)
        if eval_file:
            eval_problems = data.load_problems(eval_file)
            data.encode_problems(eval_problems, tok, template, st.max_prompt)
    except (ValueError, OSError, ImportError) as e:
        fail(str(e))
    # the longest sequence the engine will see: this stage's budget or the eval's (recipe's largest)
    eval_tokens = curriculum.eval_budget(stages[:a.stage - 1] + [st] + stages[a.stage:])
    longest = max(st.max_tokens, eval_tokens if eval_file else 0)
    max_model_len = st.max_prompt + longest
    if max_model_len > cfg.max_position_embeddings:
        fail(f"stage {a.stage}: prompt budget {st.max_prompt} + response budget {longest} exceeds "
             f"the model's max_position_embeddings {cfg.max_position_embeddings} (--max-prompt, "
             f"--max-tokens)")
    if len(prompts) < st.batch:
        fail(f"{data_file}: split {st.data} has {len(prompts)} prompts ({dropped} dropped over "
             f"{st.max_prompt} tokens), fewer than --batch {st.batch}")
    identity = {"recipe": a.recipe, "stage": a.stage, "seed": a.seed,
                "data": os.path.abspath(data_file), "model": os.path.abspath(src), "world": world,
                "stage_config": dataclasses.asdict(st)}
    resume_from = None
    if earlier_run(stage_dir, identity, a.resume):
        if checkpoint.check_checkpoint(os.path.join(stage_dir, "final")) is None:
            if rank == 0:
                print(f"[fastcurl] stage {a.stage} is already complete: {stage_dir}/final",
                      flush=True)
            return None
        resume_from = checkpoint.latest_checkpoint(stage_dir,
                                                   log=print if rank == 0 else lambda *_: None)
        if resume_from and not checkpoint.same_architecture(load_config(resume_from), cfg):
            fail(f"{resume_from}/config.json does not match {src}/config.json: not the same model")
    if a.resume and resume_from is None and rank == 0:  # a crash before the first checkpoint
        print(f"[fastcurl] --resume: no checkpoint in {stage_dir} yet: the stage starts from "
              f"step 0", flush=True)
    engine = choose_engine(a.rollout, cfg)
    if rank == 0:
        print(f"[fastcurl] recipe {a.recipe} stage {a.stage}: {st.data} ({len(prompts)} prompts, "
              f"{dropped} dropped over {st.max_prompt} tokens; split at mean length "
              f"{mean_len:.1f}), "
              f"response budget {st.max_tokens}, batch {st.batch} x n={st.n}, {st.steps} steps, "
              f"world {world}, device {device}, from {src}", flush=True)
        print(f"[fastcurl] rollout engine: {engine[0]} ({engine[1]})", flush=True)
    return Plan(a, st, stage_dir, src, resume_from, cfg, tok, template, prompts, eval_file,
                eval_problems, eval_tokens, max_model_len, engine, identity, rank, world, device)


def check_values(a, st, world: int, rank: int):
    """Each value in its range, or one line naming the flag, the value and what is allowed."""
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
        ("--tis-cap", a.tis_cap, fin(a.tis_cap) and a.tis_cap >= 0, "0 (off) or more"),
    ]
    for flag, value, ok, allowed in rules:
        if not ok:
            fail(f"{flag} {value}: must be {allowed}")
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


def start_checkpoint(a, out: str) -> str:
    """Stage 1 starts from --model (the toy model by default), stage N from stage N-1's final."""
    if a.stage == 1:
        src = a.model or (data.TOY_MODEL if a.recipe == "toy" else None)
        if src is None:
            fail(f"--recipe {a.recipe} --stage 1 needs --model (a Hugging Face checkpoint folder)")
        if not os.path.isdir(src):
            fail(f"--model {src}: no such folder")
        return src
    src = os.path.join(out, f"stage{a.stage - 1}", "final")
    if not os.path.exists(os.path.join(src, "config.json")):
        fail(f"--stage {a.stage} starts from stage {a.stage - 1}'s final checkpoint, but {src} "
             f"does not exist: run --stage {a.stage - 1} with --out {out} first")
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
        diff = [k for k in identity if old.get(k) != identity[k]]
        if diff:
            fail(f"{stage_dir} holds a different run ({', '.join(diff)} differ: {run_file}); "
                 f"resume it with the same arguments or choose another --out")
    return True


# ---- 2. build: the policy, its reference, the trainer, the engine, the sampler ---------------

@dataclasses.dataclass
class Pieces:
    model: Transformer          # the policy (sharded under --fsdp hand/torch)
    trainer: Trainer
    engine: object              # rollout.TorchEngine or rollout.VLLMEngine
    sampler: data.Sampler
    start: int                  # the first step to run (a resume's checkpoint step)
    counters: dict              # skipped steps, reward errors, ... carried through checkpoints


def build(p: Plan) -> Pieces:
    a, st, dev = p.args, p.st, p.device
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(a.seed * 1009 + p.rank)
    start_from = p.resume_from or p.src
    # the reference policy (for the KL term): the stage's starting weights, frozen
    ref = Transformer.from_pretrained(p.src, dtype=dtype, device=dev).eval() if st.kl_coef else None
    if ref is not None:
        ref.requires_grad_(False)
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
        if ref is not None:
            (fsdp.shard if a.fsdp == "hand" else fsdp.torch_fully_shard)(ref)
    gc = a.grad_checkpointing if a.grad_checkpointing is not None else a.recipe != "toy"
    budget = a.token_budget or (16384 if a.recipe == "toy" else 32768)
    tcfg = TrainConfig(grad_clip=1.0, token_budget=budget, grad_checkpointing=gc)
    trainer = Trainer(model, tcfg, ref, p.tok.pad_id)
    engine = make_engine(p.engine[0], gen_model, p.tok, model_dir=start_from, rank=p.rank,
                         world=p.world, seed=a.seed, dtype=a.dtype, max_model_len=p.max_model_len)
    sampler = data.Sampler(len(p.prompts), st.batch, p.rank, p.world, seed=a.seed * 1000 + a.stage)
    start, counters = 0, {}
    if p.resume_from:
        start, counters = checkpoint.restore(p.resume_from, trainer, sampler, p.rank)
        if p.rank == 0:
            print(f"[fastcurl] resumed from {p.resume_from} at step {start}", flush=True)
    return Pieces(model, trainer, engine, sampler, start, counters)


# ---- 3. run: the stage's loop, the final checkpoint, the held-out eval -----------------------

def run(p: Plan, x: Pieces) -> str | None:
    """-> None, or the message to exit with (the updates kept failing)."""
    a, st = p.args, p.st
    if p.rank == 0:  # this run's identity; metrics logged after the checkpoint by a run that died
        os.makedirs(p.stage_dir, exist_ok=True)
        with open(os.path.join(p.stage_dir, "run.json"), "w") as f:
            json.dump(p.identity, f, indent=1)
        curriculum.truncate_metrics(os.path.join(p.stage_dir, "metrics.jsonl"), x.start)
    fsdp.barrier()

    def save(path, step, counters):
        extra = {"step": step, "stage": a.stage, "sampler": x.sampler.state(), "recipe": a.recipe,
                 "seed": a.seed, "counters": counters}
        checkpoint.save_checkpoint(path, x.model, x.trainer, extra, p.src, p.rank, keep=a.keep)

    loop = curriculum.Loop(x.engine, x.trainer, p.tok, x.sampler, p.stage_dir, save, seed=a.seed,
                           rank=p.rank, world=p.world, save_every=a.save_every,
                           max_skips=a.max_skips, should_stop=checkpoint.StopFlag())
    status = curriculum.run_stage(st, a.stage, p.prompts, loop, start=x.start, counters=x.counters)
    saved = checkpoint.latest_marker(p.stage_dir)
    if status == "stopped":
        if p.rank == 0:
            print(f"[fastcurl] stopped by a signal; checkpoint in {saved}: rerun the same command "
                  f"with --resume to continue", flush=True)
        return None
    if status == "nan":
        return (f"[fastcurl] {a.max_skips} updates in a row had a NaN/inf loss or gradient norm; "
                f"saved {saved}. Look at the learning rate, the data of the last steps "
                f"(metrics.jsonl) and --dtype; rerun with --resume after a change.")
    save(os.path.join(p.stage_dir, "final"), st.steps, x.counters)
    if p.eval_file:  # at the recipe's largest budget: stages compare like for like
        res = evaluation.evaluate_file(x.engine, p.tok, p.template, p.eval_file, k=a.eval_k,
                                       temperature=st.temperature, max_tokens=p.eval_tokens,
                                       max_prompt=st.max_prompt, seed=a.seed, rank=p.rank,
                                       world=p.world, problems=p.eval_problems)
        if p.rank == 0:
            res["stage"] = a.stage
            with open(os.path.join(p.stage_dir, "eval.json"), "w") as f:
                json.dump(res, f, indent=2)
            print(f"[fastcurl] stage {a.stage} held-out {os.path.basename(p.eval_file)}: pass@1 "
                  f"{res['pass@1']:.3f} (k={a.eval_k}), mean length {res['response_len/mean']:.1f}",
                  flush=True)
    return None


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
