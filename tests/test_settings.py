"""Every setting declared once: the flags, --help, parsing and checks come from the declarations in
settings.py and grpo.Options; recipes own their defaults (no code branches on a recipe's name)."""
import ast
import dataclasses
import os

import pytest

import grpo
from settings import RECIPES, Stage, check, check_stage, describe, in_range, parse_value

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))


def test_every_flag_has_a_meaning_and_the_choices(capsys):
    with pytest.raises(SystemExit):
        grpo.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(Stage) + dataclasses.fields(grpo.Options):
        assert field.metadata["help"], field.name
    assert "stage field" not in text
    for word in ("gspo", "cispo", "drgrpo", "seq-mean", "tis-token", "mask-seq", "penalty",
                 "toy: 40,80,120,80", "fastcurl-1.5b: 8192,16384,24576,16384,16384"):
        assert word in text, word


def test_values_parse_with_their_real_types():
    options, stage_flags = grpo.parse_args(["--token-budget", "7", "--seed", "3", "--end-trunc", "off",
                                            "--max-tokens", "40,80", "--resume"])
    assert options.token_budget == 7 and type(options.token_budget) is int  # int | None: an int
    assert options.seed == 3 and options.resume is True and options.grad_checkpointing is None
    assert stage_flags == {"end_trunc": "off", "max_tokens": "40,80"}
    fields = {f.name: f for f in dataclasses.fields(Stage)}
    assert parse_value(Stage, fields["end_trunc"], "off") is None
    assert parse_value(Stage, fields["end_trunc"], "0.5") == 0.5
    assert type(parse_value(Stage, fields["max_tokens"], "12")) is int
    with pytest.raises(ValueError, match="--max-tokens 1.5: not an integer"):
        parse_value(Stage, fields["max_tokens"], "1.5")


def test_ranges_are_checked_in_one_place():
    assert in_range(0, "[0, 1)") and not in_range(1, "[0, 1)") and not in_range(0, "(0, inf)")
    assert not in_range(float("nan"), "(-inf, inf)") and not in_range(float("inf"), "[0, inf)")
    assert describe("[1, inf)", False) == "at least 1" and describe("(0, inf)", True) == "above 0 or off"
    stage = RECIPES["toy"].stages[0]
    for name, value, message in [("clip_low", 1.0, "--clip-low 1.0: must be in [0, 1)"),
                                 ("loss", "ppo", "--loss ppo: must be one of grpo, gspo, cispo"),
                                 ("n", 0, "--n-samples 0: must be at least 1"),
                                 ("entropy_coef", float("nan"), "must be a finite number")]:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
            check(dataclasses.replace(stage, **{name: value}))
    with pytest.raises(ValueError, match="--batch 16: must be a positive multiple of the number of ranks"):
        check_stage(stage, world=3)
    with pytest.raises(ValueError, match="--correction-cap 0.5"):
        check_stage(dataclasses.replace(stage, correction="mask-token", correction_cap=0.5), world=1)
    check_stage(dataclasses.replace(stage, correction="tis-token", correction_cap=0.5), world=1)
    for recipe in RECIPES.values():  # every recipe's own stages pass
        for s in recipe.stages:
            check_stage(s, world=1)


def test_no_code_branches_on_a_recipe_name():
    """A recipe owns its defaults: no comparison of a recipe with a recipe's name in the project's code
    (the toy prompt format, also called "toy", is not a recipe)."""
    found = []
    for name in CORE:
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, name)).read())):
            if isinstance(node, ast.Compare) and "recipe" in ast.unparse(node):
                strings = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                found += [f"{name}:{node.lineno}" for s in strings if s in RECIPES]
    assert not found, found
