"""The plan grpo.py makes from a command line, before any compute (in-process, the toy recipe)."""
import pytest
import torch

import data
import grpo


QUICK = ["--steps", "1", "--batch", "4", "--n-samples", "2", "--eval-k", "0", "--rollout", "torch",
         "--device", "cpu"]  # a run of one small step


def plan_of(*argv):
    options, stage_flags = grpo.parse_args(list(argv))
    return grpo.make_plan(options, stage_flags, rank=0, world=1, device=torch.device("cpu"))


def test_the_eval_budget_is_the_largest_of_the_stages_run(tmp_path):
    # the toy recipe's stages have budgets 40, 80, 120, 80: a run of stage 1 scores at 40, not 120
    assert plan_of("--stage", "1", "--out", str(tmp_path / "a")).eval_tokens == 40
    assert plan_of("--stage", "1-2", "--max-tokens", "30,50", "--out", str(tmp_path / "b")).eval_tokens == 50
    assert plan_of("--stage", "1", "--eval-tokens", "99", "--out", str(tmp_path / "c")).eval_tokens == 99


def test_an_eval_budget_over_the_positions_names_its_flag(tmp_path, capsys):
    # the toy model has 512 positions; prompts take 64 of them
    with pytest.raises(SystemExit) as e:
        plan_of("--stage", "1", "--eval-tokens", "500", "--out", str(tmp_path))
    assert "--eval-tokens" in str(e.value) and "--max-tokens" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        plan_of("--stage", "1", "--max-tokens", "500", "--out", str(tmp_path))
    assert "--max-tokens" in str(e.value)


def test_model_starts_a_later_stage_and_its_reference(tmp_path, capsys):
    plan = plan_of("--stage", "2", "--model", data.TOY_MODEL, "--out", str(tmp_path))
    assert plan.stages[0].src == data.TOY_MODEL  # curriculum.run loads the reference from src too
    assert plan.stages[0].identity["model"].endswith("model")
    assert f"from {data.TOY_MODEL} (--model)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # without --model, stage 2 needs stage 1's final
        plan_of("--stage", "2", "--out", str(tmp_path / "fresh"))
    assert "run --stage 1" in str(e.value)
