"""Every setting of a run, declared once: its meaning, default, choices and range.

`Stage` is what one stage of the curriculum trains with (its problems, response budget, batch, the
GRPO coefficients, the rules that end it); `Recipe` is a table of stages with the defaults that go
with it (starting model, problem files, micro-batch budget). Each field is a `setting(...)`; the
command line (`--max-tokens`, ...), its `--help` and the checks of the values are derived from these
declarations by `add_flags`, `parse_value` and `check`. A range is an interval, "[0, 1)" or
"(0, inf)"; a float must also be finite; a field typed `X | None` also takes "off" (None).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import textwrap
import typing

import data
from trainer import AGGS, CORRECTIONS, LOSSES

OFF = "off"


def setting(default=dataclasses.MISSING, help: str = "", *, choices=(), range: str = "",
            flag: str = ""):
    """A dataclass field with its meaning, its choices or its range, and its flag (default
    --field-name)."""
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": tuple(choices), "range": range, "flag": flag})


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def in_range(value, interval: str) -> bool:
    low, high = (float(x) for x in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return above and below and math.isfinite(value)


def describe(interval: str, optional: bool) -> str:
    """"[1, inf)" -> "at least 1"; "(0, inf)" -> "above 0"; "[0, 1)" -> "in [0, 1)"."""
    low, high = (x.strip() for x in interval[1:-1].split(","))
    text = ("a finite number" if low == "-inf" else f"at least {low}" if interval[0] == "["
            else f"above {low}") if high == "inf" else f"in {interval}"
    return text + (" or off" if optional else "")


def value_type(cls, name: str) -> tuple[type, bool]:
    """A field's type from its annotation -> (int | float | str | bool, whether None is allowed)."""
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return (args[0] if args else hint), bool(args)


def parse_value(cls, field: dataclasses.Field, text):
    """The command line's text for a field -> its value, or ValueError naming the flag."""
    kind, optional = value_type(cls, field.name)
    if kind is bool or text is None:
        return text
    if optional and text.strip().lower() == OFF:
        return None
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{flag_of(field)} {text}: not "
                         f"{'an integer' if kind is int else 'a number'}") from None


def check(obj, label: str = ""):
    """Every field of a settings object in its choices and range, or ValueError naming the flag,
    the value (and `label`, e.g. the stage) and what is allowed."""
    for f in dataclasses.fields(obj):
        value, meta = getattr(obj, f.name), f.metadata
        if isinstance(value, str) and not value.strip():  # else "" would quietly be the default
            raise ValueError(f"{flag_of(f)} {value!r}{label}: empty (leave the flag out for its "
                             f"default)")
        if meta["choices"] and value is not None and value not in meta["choices"]:
            raise ValueError(f"{flag_of(f)} {value}{label}: must be one of "
                             f"{', '.join(meta['choices'])}")
        if meta["range"] and value is not None and not in_range(value, meta["range"]):
            raise ValueError(f"{flag_of(f)} {value}{label}: must be "
                             f"{describe(meta['range'], value_type(type(obj), f.name)[1])}")


class HelpFormatter(argparse.HelpFormatter):
    """--help without breaking a word at its hyphen (token-mean, tis-token stay whole)."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def add_flags(parser, cls, defaults: dict[str, str | None], prefix: str = ""):
    """One flag per field of cls, its help the declaration's meaning, the default (`defaults`;
    None: the meaning says it) and the choices or range; values stay text until parse_value."""
    for f in dataclasses.fields(cls):
        meta, (kind, optional) = f.metadata, value_type(cls, f.name)
        allowed = ("one of " + ", ".join(meta["choices"]) if meta["choices"] else
                   describe(meta["range"], optional) if meta["range"] else "")
        said = [f"default {defaults[f.name]}" if defaults[f.name] is not None else "", allowed]
        help = f"{meta['help']} ({'; '.join(x for x in said if x)})" if any(said) else meta["help"]
        if kind is bool:
            parser.add_argument(flag_of(f), dest=prefix + f.name, default=None, help=help,
                                action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument(flag_of(f), dest=prefix + f.name, default=None, help=help,
                                metavar=f.name.upper())


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of the curriculum (FastCuRL: its data split and response budget grow by stage)."""
    split: str = setting(help="the stage's problems: L1 = prompts no longer than the mean, "
                              "L3 = longer, L2 = all", choices=("L1", "L2", "L3"))
    max_tokens: int = setting(help="response budget in tokens (a response cut there scores 0)",
                              range="[1, inf)")
    batch: int = setting(help="prompts per step over all ranks (a multiple of the ranks)",
                         range="[1, inf)")
    n: int = setting(help="samples per prompt: the group that sets the advantages",
                     range="[1, inf)", flag="--n-samples")
    steps: int = setting(help="the stage's cap on steps (a rule may end it sooner)",
                         range="[1, inf)")
    lr: float = setting(1e-6, "AdamW learning rate", range="(0, inf)")
    warmup_steps: int = setting(0, "updates of linear learning-rate warmup", range="[0, inf)")
    kl_coef: float = setting(0.001, "weight of the k3 KL to the reference (the previous stage's "
                                    "final; 0: no reference)", range="[0, inf)")
    entropy_coef: float = setting(0.001, "weight of the entropy bonus", range="(-inf, inf)")
    clip_low: float = setting(0.2, "the ratio's lower clip is 1 - clip_low", range="[0, 1)")
    clip_high: float = setting(0.2, "the ratio's upper clip is 1 + clip_high", range="[0, inf)")
    temperature: float = setting(0.6, "sampling temperature (log-probs are taken at it too)",
                                 range="(0, inf)")
    top_p: float = setting(1.0, "nucleus sampling mass", range="(0, 1]")
    agg: str = setting("token-mean", "aggregation of token losses: over all tokens, per sequence "
                                     "first, or Dr.GRPO's sum / (B x budget)", choices=AGGS)
    max_prompt: int = setting(1024, "prompt budget in tokens (longer problems are dropped)",
                              range="[1, inf)")
    mini_batches: int = setting(1, "optimizer updates per step (the batch cut into mini-batches)",
                                range="[1, inf)")
    # the rules that end a stage before its cap (curriculum.end_reason), each off by default
    end_trunc: float | None = setting(None, "end when the truncated fraction (--end-window mean) "
                                            "is at most this", range="[0, 1]")
    end_plateau: int = setting(0, "end after this many steps without a new best --end-window mean "
                                  "reward (0: off)", range="[0, inf)")
    end_epochs: float = setting(0.0, "end before a batch would pass this many epochs over the "
                                     "stage's prompts (0: off)", range="[0, inf)")
    end_eval: float | None = setting(None, "end when the held-out pass@1 (every --eval-every "
                                           "steps) is at least this", range="[0, 1]")
    end_window: int = setting(5, "steps in the rules' moving averages", range="[1, inf)")
    # the RL menu (trainer.py: policy_loss, rollout_correction, Trainer.entropy_coef)
    loss: str = setting("grpo", "policy term: GRPO's clipped token ratio, GSPO's sequence ratio, "
                                "CISPO's clipped detached weight", choices=LOSSES)
    correction: str = setting("none", "rollout correction against the engine/trainer log-prob "
                                      "gap: truncated importance weights or masks",
                              choices=CORRECTIONS)
    correction_cap: float = setting(2.0, "C: the importance weight cap, or the kept ratio band "
                                         "[1/C, C] (at least 1 for the mask modes)",
                                    range="(0, inf)")
    target_entropy: float = setting(0.0, "above 0: an adaptive entropy coefficient steering "
                                         "toward this entropy (Skywork-OR1)", range="[0, inf)")
    entropy_lr: float = setting(0.005, "the adaptive coefficient's step per training step",
                                range="[0, inf)")
    entropy_coef_max: float = setting(0.1, "the adaptive coefficient's upper bound",
                                      range="[0, inf)")
    overlong: str = setting("zero", "a response cut at the budget scores 0, is left out of the "
                                    "loss (mask), or gets DAPO's soft penalty",
                            choices=("zero", "mask", "penalty"))
    overlong_window: int = setting(0, "the penalty's window before the budget, in tokens "
                                      "(0: a quarter of the budget)", range="[0, inf)")
    dynamic_sampling: int = setting(0, "DAPO: extra sampling rounds to fill the batch with groups "
                                       "whose rewards differ (0: off)", range="[0, inf)")


def check_stage(stage: Stage, world: int, label: str = ""):
    """A stage's values (check), then the rules between fields; ValueError naming the flag."""
    check(stage, label)
    rules = [
        ("--batch", stage.batch, stage.batch % world == 0,
         f"a positive multiple of the number of ranks ({world})"),
        ("--mini-batches", stage.mini_batches, stage.mini_batches <= stage.batch // world * stage.n,
         "from 1 to the samples per rank (--batch x --n-samples / ranks)"),
        ("--overlong-window", stage.overlong_window, stage.overlong_window <= stage.max_tokens,
         "from 0 (a quarter of the budget) to --max-tokens"),
        ("--correction-cap", stage.correction_cap,
         stage.correction_cap >= 1 or not stage.correction.startswith("mask"),
         "1 or more for the mask modes"),
    ]
    for flag, value, ok, allowed in rules:
        if not ok:
            raise ValueError(f"{flag} {value}{label}: must be {allowed}")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A curriculum (its stages) and the defaults that go with it."""
    stages: tuple[Stage, ...]
    template: str                    # the prompt format of the model the recipe is for
    model: str | None = None         # stage 1's starting checkpoint (None: --model is required)
    data: str | None = None          # the problem file (None: --data is required)
    eval_data: str | None = None     # the held-out file that goes with `data`
    eval_tokens: int | None = None   # eval.py's response budget (None: the largest stage budget)
    token_budget: int = 32768        # tokens per packed training micro-batch
    grad_checkpointing: bool = True  # recompute activations in the backward


def eval_budget(stages) -> int:
    """The held-out eval's response budget: the largest of the stages', so that the scores of the
    stages compare like for like."""
    return max(s.max_tokens for s in stages)


def _fastcurl(split, budget, **kw):
    return Stage(split, budget, **{"batch": 64, "n": 8, "end_epochs": 1, **kw})


def _toy(split, budget, steps, **kw):
    return Stage(split, budget, batch=16, n=8, steps=steps, lr=1e-4, temperature=1.0,
                 max_prompt=64, **kw)


RECIPES = {
    # FastCuRL-1.5B-Preview (stages 1-4) and the V2/V3 fifth stage: lr 1e-6, KL (k3) 0.001, entropy
    # 0.001, clip 0.2, temperature 0.6, prompt budget 1024, mini-batch 64 prompts, one PPO epoch.
    # Its stages were switched by hand: stage 1 when about 10% of the responses were cut (step ~160
    # in batch-128 units), each stage at most one epoch; those are the rules here, and `steps` is
    # each stage's cap (how stages 2-4 split their 1,400 batch-64 steps is our estimate).
    "fastcurl-1.5b": Recipe((
        _fastcurl("L1", 8192, batch=128, steps=160, mini_batches=2, end_trunc=0.1, end_window=10),
        _fastcurl("L2", 16384, steps=400),
        _fastcurl("L3", 24576, steps=400),
        _fastcurl("L2", 16384, n=16, steps=600),
        _fastcurl("L2", 16384, n=16, steps=200, kl_coef=0.0, entropy_coef=1e-6),
    ), template="r1", eval_tokens=32768),
    # the same shape on the embedded toy: budgets 40/80/120/80 tokens = 1:2:3:2 like 8K/16K/24K/16K;
    # stage 1 ends once at most 5% of its responses are cut over 5 steps (the toy's 10%: it starts
    # at 20%), the others once the 5-step mean sampled reward stops rising for 8 steps
    "toy": Recipe((
        _toy("L1", 40, 40, end_trunc=0.05),
        _toy("L2", 80, 40, end_plateau=8),
        _toy("L3", 120, 30, end_plateau=8),
        _toy("L2", 80, 40, end_plateau=8),
    ), template="toy", model=data.TOY_MODEL, data=data.TOY_DATA, eval_data=data.TOY_EVAL,
        token_budget=16384, grad_checkpointing=False),
}
DEFAULT_RECIPE = "toy"   # runs on any laptop CPU
PAPER = "fastcurl-1.5b"  # the recipe whose evaluation settings are the paper's


def stage_defaults(field: dataclasses.Field) -> str:
    """A stage field's value in each recipe, for --help: "toy: 40,80,120,80; fastcurl-1.5b: ..."."""
    parts = []
    for name, recipe in RECIPES.items():
        values = [OFF if v is None else str(v) for v in
                  (getattr(s, field.name) for s in recipe.stages)]
        parts.append(f"{name}: {values[0] if len(set(values)) == 1 else ','.join(values)}")
    return "; ".join(parts)


def fit_seed(seed: int, bits: int = 62) -> int:
    """A derived seed that every generator takes (a 64-bit integer, with room for the small
    offsets added later: rank, round, chunk): reduced modulo 2**bits where it is out of
    (-2**bits, 2**bits), so that the seeds of any --seed in that range stay as they are."""
    return seed if abs(seed) < 1 << bits else seed % (1 << bits)
