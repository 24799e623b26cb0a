"""FastCuRL with GRPO: the entry point.

    python grpo.py --stage 1                                  # the embedded toy, one process
    torchrun --nproc_per_node 2 grpo.py --stage 1-4           # the whole toy curriculum, two ranks
    torchrun --nproc_per_node 8 grpo.py --recipe fastcurl-1.5b --stage 2 --data deepscaler.json

main() reads the command line, makes the plan (every stage of the range checked before any compute:
values, files, model, output folder, an earlier run to resume), builds the policy and the rollout
engine once, then runs the curriculum (curriculum.run). The GRPO math and the trainer step live in
trainer.py, the settings and recipes in settings.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import importlib
import json
import os
import sys

import torch

import checkpoint
import curriculum
import data
import fsdp
from model import Config, Transformer, check_weights, load_config
from rollout import choose_engine, make_engine
from settings import DEFAULT_RECIPE, RECIPES, HelpFormatter, Recipe, Stage, add_flags, check, \
    check_stage, eval_budget, fit_seed, flag_of, parse_value, setting, stage_defaults
from trainer import TrainConfig


@dataclasses.dataclass(frozen=True)
class Options:
    """The run's settings, the same for every stage (a stage's are settings.Stage)."""
    stage: str = setting("1", "a stage (2) or a range of stages run in one process (1-4)")
    recipe: str = setting(DEFAULT_RECIPE, "the stage table and its defaults", choices=RECIPES)
    model: str | None = setting(None, "the first stage's starting Hugging Face checkpoint "
                                "(default: the recipe's at stage 1, stage N-1's final at stage N)")
    data: str | None = setting(None, "the problem file: JSON, JSONL or parquet, or a bundled set's "
                               "name: math-train, aime-train (default: the recipe's)")
    eval_data: str | None = setting(None, "held-out problems scored at the end of each stage, "
                                    "a file or a bundled set's name: aime24, amc23, math500, "
                                    "minerva, olympiadbench (default: the recipe's, with its data)")
    out: str | None = setting(None, "output folder (default runs/<recipe>)")
    resume: bool = setting(False, "continue the run in --out from its last checkpoint")
    rollout: str = setting("auto", "rollout engine: auto takes vLLM on a GPU when it can serve "
                           "the model, the native torch engine on a CPU (faster there)",
                           choices=("auto", "torch", "vllm"))
    template: str | None = setting(None, "prompt format (default: from the checkpoint's "
                                   "tokenizer)", choices=("r1", "qwen", "toy"))
    device: str = setting("auto", "auto: GPU LOCAL_RANK when there is a GPU, else the CPU",
                          choices=("auto", "cuda", "cpu"))
    dtype: str = setting("float32", "compute dtype (the master weights stay fp32 under fsdp)",
                         choices=("float32", "bfloat16"))
    fsdp: str = setting("hand", "hand: fsdp.py; torch: FSDP2's fully_shard; none: plain data "
                        "parallel", choices=("hand", "torch", "none"))
    token_budget: int | None = setting(None, "tokens per packed training micro-batch (default: "
                                       "the recipe's)", range="[1, inf)")
    grad_checkpointing: bool | None = setting(None, "recompute activations in the backward "
                                              "(default: the recipe's)")
    seed: int = setting(0, "seeds the sampler, the engine and the model's random numbers")
    save_every: int = setting(10, "a checkpoint every K steps (0: only the final)",
                              range="[0, inf)")
    keep: int = setting(2, "step checkpoints kept (0: all)", range="[0, inf)")
    max_skips: int = setting(3, "stop after this many NaN/inf updates in a row", range="[1, inf)")
    eval_k: int = setting(4, "samples per held-out problem (0: no eval)", range="[0, inf)")
    eval_every: int = setting(0, "also score the held-out file every K steps (0: never)",
                              range="[0, inf)")
    eval_limit: int = setting(64, "problems scored by --eval-every (0: all)", range="[0, inf)")
    eval_tokens: int | None = setting(None, "the held-out response budget (default: the largest "
                                      "response budget of the stages run)", range="[1, inf)")
    save_dtype: str = setting("source", "the dtype of the Hugging Face weights saved (source: the "
                              "starting checkpoint's)", choices=("source", "float32", "bfloat16"))
    vllm_memory: float | None = setting(None, "the share of the device's memory vLLM takes "
                                        "(default: 0.4 on a GPU, 0.15 on a CPU)", range="(0, 1]")
    logger: str = setting("none", "also log every metrics.jsonl row to TensorBoard or Weights & "
                          "Biases (one run per stage, in its folder)",
                          choices=("none", "tensorboard", "wandb"))


def parse_args(argv=None) -> tuple[Options, dict[str, str]]:
    """-> (the run's options, the stage flags given: field name -> text)."""
    parser = argparse.ArgumentParser(
        description="FastCuRL: curriculum GRPO with stage-wise context scaling",
        formatter_class=HelpFormatter,
        epilog="Stage flags not given keep the recipe's value. With a range of stages a stage flag "
               "takes one value for all of them or one per stage: --max-tokens 40,80,120,80. A "
               "rule flag (--end-*) takes 'off' to drop the recipe's rule.")
    add_flags(parser, Options, {f.name: None if f.default is None else str(f.default)
                                for f in dataclasses.fields(Options)})
    add_flags(parser, Stage, {f.name: stage_defaults(f) for f in dataclasses.fields(Stage)},
              prefix="stage.")
    given = vars(parser.parse_args(argv))
    try:
        options = Options(**{f.name: parse_value(Options, f, given[f.name])
                             for f in dataclasses.fields(Options) if given[f.name] is not None})
        check(options)
    except ValueError as e:
        fail(str(e))
    check_logger(options.logger)
    return options, {k[6:]: v for k, v in given.items() if k.startswith("stage.") and v is not None}


def check_logger(logger: str):
    """--logger's package imports (an optional extra), checked before anything is written. (Not
    --log: torchrun takes that for an ambiguous abbreviation of its own --log-dir, --logs-specs.)"""
    module = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}.get(logger)
    try:
        if module:
            importlib.import_module(module)
    except ImportError:
        fail(f"--logger {logger}: the {logger} package is not installed (pip install {logger}, or "
             f"pip install -e '.[log]')")


def fail(message: str):
    """Bad input: one line (rank 0's under torchrun), exit status 1, nothing written."""
    fsdp.exit_once(f"[fastcurl] {message}")


# ---- the plan: every stage of the range, checked before any compute ------------------------------

@dataclasses.dataclass
class StagePlan:
    """One stage of the run."""
    number: int
    settings: Stage             # the recipe's stage with the command line's overrides
    dir: str                    # its output folder
    src: str                    # where it starts: --model (stage 1) or stage N-1's final
    prompts: list               # (prompt ids, answer) pairs of its split
    identity: dict              # what makes two runs the same run (run.json)
    resume_from: str | None = None  # a step checkpoint of this stage to continue from
    complete: bool = False      # its final checkpoint exists already


@dataclasses.dataclass
class Plan:
    """The run, resolved from the command line."""
    options: Options
    stages: list[StagePlan]     # those still to run, in order
    tok: data.Tokenizer
    template: str
    eval_file: str | None       # the held-out file (None: no eval)
    eval_problems: list | None  # its problems, read and checked once
    eval_tokens: int            # the held-out response budget
    max_model_len: int          # the longest prompt + response the engine will be asked for
    engine: tuple[str, str]     # (torch | vllm, why)
    save_dtype: torch.dtype     # the checkpoints' Hugging Face weights
    train: TrainConfig          # the trainer's token budget and gradient checkpointing
    rank: int
    world: int
    device: torch.device


def stage_settings(options: Options, overrides: dict[str, str], world: int) -> dict[int, Stage]:
    """The stages of --stage A-B: the recipe's, with the command line's stage flags (one value
    for all, or one per stage separated by commas), each checked."""
    table = RECIPES[options.recipe].stages
    first, _, last = options.stage.partition("-")
    numbers = range(int(first), int(last or first) + 1) \
        if first.isdigit() and (last or first).isdigit() else range(0)
    if not numbers or numbers[0] < 1 or numbers[-1] > len(table):
        fail(f"--stage {options.stage}: recipe {options.recipe} has stages 1..{len(table)} (one, "
             f"or a range like 1-{len(table)})")
    stages = {k: table[k - 1] for k in numbers}
    fields = {f.name: f for f in dataclasses.fields(Stage)}
    try:
        for name, text in overrides.items():
            field, values = fields[name], text.split(",")
            if len(values) not in (1, len(numbers)):
                raise ValueError(f"{flag_of(field)} {text}: give one value, or "
                                 f"{len(numbers)} separated by commas (one per stage)")
            for k, value in zip(numbers, values * len(numbers) if len(values) == 1 else values):
                stages[k] = dataclasses.replace(stages[k],
                                                **{name: parse_value(Stage, field, value)})
        for k, stage in stages.items():
            check_stage(stage, world, f" (stage {k})" if len(numbers) > 1 else "")
    except ValueError as e:
        fail(str(e))
    return stages


def make_plan(options: Options, overrides: dict, rank: int, world: int, device) -> Plan | None:
    """Every input of every stage in the range checked; None when all are complete already."""
    recipe = RECIPES[options.recipe]
    stages = stage_settings(options, overrides, world)
    out = options.out or os.path.join("runs", options.recipe)
    for k in stages:
        check_writable(os.path.join(out, f"stage{k}"))
    src = start_checkpoint(options, recipe, out, min(stages))
    data_file = data.problem_file(options.data or recipe.data)
    if data_file is None:
        fail(f"--recipe {options.recipe} needs --data (a problem file: JSON, JSONL or parquet)")
    eval_file = data.problem_file(options.eval_data) or (
        recipe.eval_data if options.data is None else None)
    eval_file = eval_file if options.eval_k > 0 else None
    with_eval_rule = any(s.end_eval is not None for s in stages.values())
    if (options.eval_every or with_eval_rule) and not eval_file:
        fail("--eval-every and --end-eval need a held-out file: --eval-data (and --eval-k > 0)")
    if with_eval_rule and not options.eval_every:
        fail("--end-eval needs --eval-every K (the held-out score it reads)")
    eval_tokens = options.eval_tokens or eval_budget(stages.values())
    config, tok, template, encoded, eval_problems, mean_len = read_inputs(
        options, src, data_file, eval_file, stages)
    max_model_len = 0
    for k, stage in stages.items():  # the longest sequence: a stage's budget or the eval's
        longest = max(stage.max_tokens, eval_tokens if eval_file else 0)
        max_model_len = max(max_model_len, stage.max_prompt + longest)
        if stage.max_prompt + longest > config.max_position_embeddings:
            flag = "--max-tokens" if longest == stage.max_tokens else "--eval-tokens"
            fail(f"stage {k}: prompt budget {stage.max_prompt} + response budget {longest} exceeds "
                 f"the model's max_position_embeddings {config.max_position_embeddings} "
                 f"(--max-prompt, {flag})")
        prompts, dropped = encoded[k]
        if len(prompts) < stage.batch:
            fail(f"{data_file}: split {stage.split} has {len(prompts)} prompts ({dropped} dropped "
                 f"over {stage.max_prompt} tokens), fewer than --batch {stage.batch}")
    plans, data_sha256 = [], checkpoint.sha256(data_file)
    log = (lambda text: print(text, flush=True)) if rank == 0 else (lambda text: None)
    for k, stage in stages.items():
        stage_src = src if k == min(stages) else os.path.join(out, f"stage{k - 1}", "final")
        identity = {"recipe": options.recipe, "stage": k, "seed": options.seed,
                    "data": inside(data_file, out), "data_sha256": data_sha256,
                    "model": inside(stage_src, out), "world": world, "fsdp": options.fsdp,
                    "dtype": options.dtype, "stage_config": dataclasses.asdict(stage)}
        stage_plan = StagePlan(k, stage, os.path.join(out, f"stage{k}"), stage_src,
                               encoded[k][0], identity)
        find_earlier(options, stage_plan, plans, config, log)
        plans.append(stage_plan)
    todo = [p for p in plans if not p.complete]
    if not todo:
        return None
    save_dtype = config.torch_dtype if options.save_dtype == "source" else options.save_dtype
    if not isinstance(getattr(torch, save_dtype, None), torch.dtype):
        fail(f"{src}/config.json: torch_dtype {save_dtype!r} is not a torch dtype (--save-dtype)")
    engine = choose_engine(options.rollout, config, device)
    plan = Plan(options, todo, tok, template, eval_file, eval_problems, eval_tokens,
                max_model_len, engine, getattr(torch, save_dtype),
                TrainConfig(token_budget=options.token_budget or recipe.token_budget,
                            grad_checkpointing=recipe.grad_checkpointing
                            if options.grad_checkpointing is None else options.grad_checkpointing),
                rank, world, device)
    if rank == 0:
        print_plan(plan, {k: encoded[k][1] for k in stages}, mean_len)
    return plan


def read_inputs(options, src, data_file, eval_file, stages):
    """The model's config, weights (checked) and tokenizer; the problems encoded per stage; the
    held-out problems -> (config, tok, template, {stage: (prompts, dropped)}, held-out problems,
    the mean prompt length). Each error names its file (and line and field)."""
    try:
        config = load_config(src)
        check_weights(src)
        tok = data.Tokenizer(src)
        if tok.tok.get_vocab_size() > config.vocab_size:  # its ids would index past the embedding
            raise ValueError(f"{src}/config.json: vocab_size {config.vocab_size} is smaller than "
                             f"the {tok.tok.get_vocab_size()} tokens of its tokenizer.json")
        template = options.template or tok.template
        data.check_template(tok, template, src)
        sets, mean_len, _ = data.split_by_length(data.load_problems(data_file), template)
        encoded = {k: data.encode_problems(sets[s.split], tok, template, s.max_prompt)
                   for k, s in stages.items()}
        eval_problems = data.load_problems(eval_file) if eval_file else None
        if eval_problems:  # its characters
            data.encode_problems(eval_problems, tok, template, 10 ** 9)
    except (ValueError, OSError, ImportError) as e:
        fail(str(e))
    return config, tok, template, encoded, eval_problems, mean_len


def print_plan(plan: Plan, dropped: dict, mean_len: float):
    for p in plan.stages:
        s = p.settings
        rules = [text for on, text in [
            (s.end_trunc is not None, f"truncation <= {s.end_trunc}"),
            (s.end_plateau, f"plateau {s.end_plateau}"),
            (s.end_eval is not None, f"held-out pass@1 >= {s.end_eval}"),
            (s.end_epochs, f"{s.end_epochs} epoch(s)")] if on]
        until = f" or until {', '.join(rules)} (window {s.end_window})" if rules else ""
        print(f"[fastcurl] recipe {plan.options.recipe} stage {p.number}: {s.split} "
              f"({len(p.prompts)} prompts, {dropped[p.number]} dropped over {s.max_prompt} tokens; "
              f"split at mean length {mean_len:.1f}), response budget {s.max_tokens}, batch "
              f"{s.batch} x n={s.n}, at most {s.steps} steps{until}, world {plan.world}, device "
              f"{plan.device}, from {p.src}{' (--model)' if p.src == plan.options.model else ''}",
              flush=True)
    print(f"[fastcurl] rollout engine: {plan.engine[0]} ({plan.engine[1]})", flush=True)
    if any(p.settings.n == 1 for p in plan.stages):
        print("[fastcurl] warning: --n-samples 1: each prompt's group is one sample, so every "
              "advantage is 0 and nothing is learned", flush=True)


def check_writable(stage_dir: str):
    """The output folder, or the nearest folder above it that exists, must be a writable folder,
    and the names of the folders still to make within the file system's limit."""
    folder = os.path.abspath(stage_dir)
    while not os.path.exists(folder):
        if os.path.islink(folder):
            fail(f"--out: {folder} is a link to {os.readlink(folder)}, which does not exist")
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        fail(f"--out: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        fail(f"--out: {folder} is not writable")
    limit = os.pathconf(folder, "PC_NAME_MAX")
    for name in os.path.relpath(os.path.abspath(stage_dir), folder).split(os.sep):
        if len(os.fsencode(name)) > limit:
            fail(f"--out: the folder name {name[:20]}... is {len(os.fsencode(name))} bytes long: "
                 f"this file system takes at most {limit}")


def start_checkpoint(options: Options, recipe: Recipe, out: str, stage: int) -> str:
    """The first stage of the run starts from --model; without it, stage 1 from the recipe's model
    and stage N from stage N-1's final in --out."""
    if stage == 1 or options.model:
        src = options.model or recipe.model
        if src is None:
            fail(f"--recipe {options.recipe} --stage 1 needs --model (a Hugging Face checkpoint "
                 f"folder)")
        if not os.path.isdir(src):
            fail(f"--model {src}: no such folder")
        return src
    src = os.path.join(out, f"stage{stage - 1}", "final")
    if not os.path.exists(os.path.join(src, "config.json")):
        fail(f"--stage {stage} starts from stage {stage - 1}'s final checkpoint, but {src} "
             f"does not exist: run --stage {stage - 1} with --out {out} first")
    if problem := checkpoint.check_checkpoint(src, content=True):
        fail(f"--stage {stage} starts from {src}, which is damaged ({problem}): run --stage "
             f"{stage - 1} again, or pass --model")
    return src


def find_earlier(options: Options, stage_plan: StagePlan, before: list, config: Config, log):
    """An earlier run of this stage in its folder: complete (skipped), or a checkpoint to continue
    from (--resume); a stage after one still to run must not hold a run. A folder that holds a run
    without --resume, or a different run (run.json), stops with one line. A final checkpoint ended
    by the stage's cap is continued when --steps is now larger; one ended by a rule is complete."""
    first_to_run = all(b.complete for b in before)
    run_file = os.path.join(stage_plan.dir, "run.json")
    if os.path.exists(run_file) or os.path.exists(os.path.join(stage_plan.dir, "metrics.jsonl")):
        if not options.resume:
            fail(f"{stage_plan.dir} already holds a run: pass --resume to continue it or choose "
                 f"another --out")
        check_identity(stage_plan, run_file, log)
        if not first_to_run:
            fail(f"{stage_plan.dir} holds a run, but an earlier stage of the range is not "
                 f"complete: choose another --out")
        final = os.path.join(stage_plan.dir, "final")
        if checkpoint.check_checkpoint(final) is None:
            ended = torch.load(os.path.join(final, "trainer_state.pt"), weights_only=False)
            ended = ended["state"]
            if not ended["end"].startswith("steps:") or ended["step"] >= stage_plan.settings.steps:
                stage_plan.complete = True
                log(f"[fastcurl] stage {stage_plan.number} is already complete: {final}")
                return
            stage_plan.resume_from = final
            log(f"[fastcurl] stage {stage_plan.number} ended at its cap, step {ended['step']}: "
                f"continuing from {final} to --steps {stage_plan.settings.steps}")
        else:
            stage_plan.resume_from = checkpoint.latest_checkpoint(stage_plan.dir, log=log)
        resume_from = stage_plan.resume_from
        if resume_from and not checkpoint.same_architecture(load_config(resume_from), config):
            fail(f"{resume_from}/config.json does not match {stage_plan.src}/config.json: not "
                 f"the same model")
    if options.resume and stage_plan.resume_from is None and first_to_run:
        # nothing to resume (a crash before the first checkpoint, or a stage not begun)
        log(f"[fastcurl] --resume: no checkpoint in {stage_plan.dir} yet: stage "
            f"{stage_plan.number} starts from step 0")


# what may change on a resume, logged: the data file's path (its content is data_sha256), the
# learning rate (the advice after a NaN stop), the cap on steps (a finished stage continued)
MAY_CHANGE = ("data", "stage_config.lr", "stage_config.steps")


def check_identity(stage_plan: StagePlan, run_file: str, log):
    """The run in the folder is this run: run.json readable, and every field the same but those
    that may change (logged); else one line naming each field with its old and new values."""
    if not os.path.exists(run_file):
        fail(f"{stage_plan.dir} holds a run (metrics.jsonl) but no run.json, so it cannot be "
             f"checked to be this run: choose another --out")
    try:
        with open(run_file) as f:
            old = json.load(f)
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError) as e:
        fail(f"{run_file} is damaged ({e}): restore it, or choose another --out")
    flat = lambda identity: {**{k: v for k, v in identity.items() if k != "stage_config"}, **{
        f"stage_config.{k}": v for k, v in (identity.get("stage_config") or {}).items()}}
    old, new = flat(old), flat(stage_plan.identity)
    differ = [f"{k} {old.get(k)} -> {new[k]}" for k in new if old.get(k) != new[k]]
    if refused := [d for d in differ if d.split()[0] not in MAY_CHANGE]:
        fail(f"{stage_plan.dir} holds a different run ({'; '.join(refused)}: {run_file}); "
             f"resume it with the same arguments or choose another --out")
    if differ:
        log(f"[fastcurl] --resume of {stage_plan.dir} with changes: {'; '.join(differ)}")


def inside(path: str, out: str) -> str:
    """A path for run.json: relative to the output folder when inside it (the folder may move)."""
    relative = os.path.relpath(os.path.abspath(path), os.path.abspath(out))
    return os.path.abspath(path) if relative.split(os.sep)[0] == ".." else relative


def build(plan: Plan):
    """-> (the policy at the first stage's start (a resume's checkpoint), the rollout engine sized
    for every stage). Under fsdp the native engine samples from its own full copy of the policy,
    refreshed after every update (vLLM loads its own from the checkpoint folder)."""
    start_from = checkpoint.weights_folder(plan.stages[0].resume_from or plan.stages[0].src)
    policy = curriculum.load_model(start_from, plan.options, plan.device)
    sampler_model = policy
    if plan.options.fsdp != "none" and plan.engine[0] == "torch":
        sampler_model = Transformer.from_pretrained(
            start_from, dtype=getattr(torch, plan.options.dtype), device=plan.device).eval()
    engine = make_engine(plan.engine[0], sampler_model, plan.tok, model_dir=start_from,
                         rank=plan.rank, world=plan.world, dtype=plan.options.dtype,
                         seed=fit_seed(plan.options.seed),
                         max_model_len=plan.max_model_len, memory=plan.options.vllm_memory)
    return policy, engine


def lock_folder(out: str):
    """One run per output folder at a time: an exclusive lock on out/.lock, held while the process
    lives (the system drops it when the process ends, however it ends; children do not inherit
    it)."""
    os.makedirs(out, exist_ok=True)
    fd = os.open(os.path.join(out, ".lock"), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fail(f"--out {out}: another run is writing there (it holds {out}/.lock): wait for it to "
             f"end or choose another --out")
    LOCKS.append(fd)


LOCKS = []  # the open lock files: closing one would drop its lock


def main(argv=None):
    stop = checkpoint.StopFlag()  # from here on a SIGTERM / SIGINT stops the run cleanly
    options, stage_flags = parse_args(argv)
    rank, world, device = fsdp.setup_dist(options.device)
    plan = make_plan(options, stage_flags, rank, world, device)
    if plan is None:
        return fsdp.close_dist()
    if rank == 0:
        lock_folder(os.path.dirname(plan.stages[0].dir))
    fsdp.barrier()  # every rank's checks done before rank 0 writes run.json, which they look for
    policy, engine = build(plan)
    failure = curriculum.run(plan, policy, engine, stop)
    fsdp.close_dist(engine)
    if failure:
        sys.exit(failure)


if __name__ == "__main__":
    main()
    fsdp.finish()
