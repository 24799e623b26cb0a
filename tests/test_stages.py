"""Stages that end by rule (curriculum.end_reason) on synthetic metric streams: each rule ends the
stage exactly where it should and never before; and the whole range of stages in one process:
equal to the stages run one command at a time, and a SIGKILL in stage 2 then --resume equal to an
uninterrupted run, with 2 ranks under torchrun switching stage at the same step, from a bf16
source (checkpoints in bf16, fp32 master weights carried across stages and resumes)."""
import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from curriculum import StageState, end_reason, shape_rewards
from settings import RECIPES, Stage
from rollout import Completion
from data import Sampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def first_end(st, reward=None, trunc=None, evals=None, n_prompts=10 ** 6, steps=None):
    """Feed the streams step by step as train_stage does -> (step, reason) of the first rule that
    fires."""
    steps = steps or st.steps
    state = StageState()
    for step in range(1, steps + 1):
        state.step, state.drawn = step, step * st.batch
        state.rewards.append(reward[step - 1] if reward else 0.0)
        state.truncated.append(trunc[step - 1] if trunc else 1.0)
        if evals and step in evals:
            state.evals.append([step, evals[step]])
        why = end_reason(st, state, n_prompts)
        if why:
            return step, why.split(":")[0]
    return None, None


BASE = Stage("L1", 40, batch=16, n=8, steps=50)


def test_truncation_rule_waits_for_a_full_window_then_ends_at_the_threshold():
    st = dataclasses.replace(BASE, end_trunc=0.1, end_window=3)
    assert first_end(st, trunc=[0.0] * 50) == (3, "truncation")  # not at 1 or 2: no full window
    assert first_end(st, trunc=[0.5, 0.0, 0.0, 0.0] + [0.0] * 46) == (4, "truncation")
    # exactly at the threshold counts (0.1 + 0.1 + 0.1 rounds above 0.3 / 3 in floating point)
    assert first_end(st, trunc=[0.1] * 50) == (3, "truncation")
    assert first_end(st, trunc=[0.3, 0.2, 0.11, 0.1, 0.1, 0.09] + [0.5] * 44) == (6, "truncation")
    assert first_end(st, trunc=[0.2] * 50) == (50, "steps")  # never below: the cap


def test_plateau_rule_counts_steps_since_the_best_moving_average():
    st = dataclasses.replace(BASE, end_plateau=3, end_window=2)
    # 2-step means from step 2: 0.3, 0.5 (best, step 3), 0.45, 0.4, 0.35 -> 3 steps later: step 6
    r = [0.1, 0.5, 0.5, 0.4, 0.4, 0.3] + [0.0] * 44
    assert first_end(st, reward=r) == (6, "plateau")
    assert first_end(st, reward=[i / 100 for i in range(50)]) == (50, "steps")  # always rising
    # a tie is not an improvement; a new best resets the count
    assert first_end(st, reward=[0.5] * 50) == (5, "plateau")
    r = [0.1, 0.5, 0.5, 0.4, 0.4, 0.9, 0.9] + [0.0] * 43
    assert first_end(st, reward=r) == (10, "plateau")


def test_epoch_rule_stops_before_a_batch_would_pass_the_epochs_and_agrees_with_the_sampler():
    st = dataclasses.replace(BASE, end_epochs=1)
    assert first_end(st, n_prompts=100) == (6, "epochs")  # 6 x 16 = 96 of 100; a 7th passes it
    s = Sampler(100, 16)
    for _ in range(6):
        s.next()
    assert s.epoch == 0
    s.next()
    assert s.epoch == 1  # the sampler's 7th batch is indeed the next epoch's
    assert first_end(dataclasses.replace(st, end_epochs=0.5), n_prompts=100) == (3, "epochs")
    assert first_end(dataclasses.replace(st, end_epochs=2), n_prompts=100) == (12, "epochs")


def test_eval_rule_reads_only_the_score_of_this_step():
    st = dataclasses.replace(BASE, end_eval=0.4)
    assert first_end(st, evals={5: 0.3, 10: 0.4, 15: 0.5}) == (10, "eval")
    assert first_end(st, evals={5: 0.3, 10: 0.39}) == (50, "steps")


def test_rules_off_by_default_and_the_cap_ends_the_stage():
    assert first_end(BASE, reward=[0.5] * 50, trunc=[0.0] * 50, evals={1: 1.0},
                     n_prompts=1) == (50, "steps")
    toy1 = RECIPES["toy"].stages[0]
    assert toy1.end_trunc is not None and all(s.end_plateau for s in RECIPES["toy"].stages[1:])
    assert RECIPES["fastcurl-1.5b"].stages[0].end_trunc == 0.1
    assert all(s.end_epochs == 1 for s in RECIPES["fastcurl-1.5b"].stages)


def test_overlong_penalty_against_the_formula():
    """DAPO's soft overlong punishment, B = 40, L = 10: 0 up to 30 tokens, then linear to -1 at
    40 (a cut response); zero and mask leave the rewards alone."""
    st = Stage("L1", 40, batch=1, n=1, steps=1, overlong="penalty", overlong_window=10)
    lens = [0, 5, 30, 31, 35, 39, 40]
    comps = [Completion([1], [2] * k, [], "length" if k == 40 else "stop") for k in lens]
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    want = [x - (0 if k <= 30 else (k - 30) / 10) for x, k in zip(r.tolist(), lens)]
    got = shape_rewards(st, comps, r).tolist()
    assert got == [pytest.approx(w, abs=1e-15) for w in want] and got[-1] == -1.0
    assert shape_rewards(dataclasses.replace(st, overlong_window=0), comps, r)[4] == -0.5
    for mode in ("zero", "mask"):
        assert torch.equal(shape_rewards(dataclasses.replace(st, overlong=mode), comps, r), r)


# ---- the range in one process, 2 ranks -----------------------------------------------------------

# stage 1 ends by its truncation rule at step 2 (a 2-step mean <= 1 always holds), stage 2 at its cap
# (stage 2 with dynamic sampling and the overlong penalty: their state resumes exactly too)
SMALL = ["--batch", "4", "--n-samples", "4", "--rollout", "torch", "--save-every", "1",
         "--steps", "5,3", "--end-trunc", "1,off", "--end-window", "2", "--end-plateau", "0",
         "--eval-k", "1", "--eval-every", "2", "--eval-limit", "4", "--dynamic-sampling", "0,2",
         "--overlong", "mask,penalty"]
VOLATILE = ("time/", "throughput/")


def torchrun(out, stage, *extra):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            f"{ROOT}/grpo.py", "--stage", stage, "--out", str(out), *SMALL, *extra]


def run(args):
    r = subprocess.run(args, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def metrics(out):
    rows = []
    for s in (1, 2):
        rows += [json.loads(line) for line in open(f"{out}/stage{s}/metrics.jsonl")]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def weights(out):
    with open(f"{out}/stage2/final/model.safetensors", "rb") as f, \
            open(f"{out}/stage2/final/master/model.safetensors", "rb") as master:
        return f.read(), master.read()


def bf16_toy(folder):
    """The toy model stored in bf16, as the real model is: its checkpoints are then bf16 too."""
    import shutil

    from model import Transformer

    toy = os.path.join(ROOT, "assets", "toy", "model")
    Transformer.from_pretrained(toy).save_pretrained(str(folder), dtype=torch.bfloat16)
    for name in os.listdir(toy):
        if name.startswith("token") or name.startswith("generation"):
            shutil.copy(os.path.join(toy, name), folder)
    return str(folder)


@pytest.mark.slow
def test_stage_range_in_one_process_equals_separate_commands_and_resumes_after_a_kill(tmp_path):
    from bench.kill_resume import kill_all
    one, sep, cut = tmp_path / "one", tmp_path / "sep", tmp_path / "cut"
    source = ["--model", bf16_toy(tmp_path / "bf16")]
    r = run(torchrun(one, "1-2", *source))
    assert r.stdout.count("rollout engine:") == 1  # one engine for both stages
    rows = metrics(one)
    assert [(m["stage"], m["step"]) for m in rows] == [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3)]
    assert rows[1]["stage_end"].startswith("truncation") and rows[4]["stage_end"].startswith("steps")
    assert [("eval/pass@1" in m) for m in rows] == [False, True, False, True, False]
    assert [("dynamic/rounds" in m) for m in rows] == [False, False, True, True, True]
    ev = json.load(open(one / "stage1" / "eval.json"))
    assert (ev["end_step"], ev["end_reason"].split(":")[0]) == (2, "truncation")
    assert "stage 1 ends after step 2: truncation" in r.stdout
    for s in (1, 2):  # every rank saw the same global metrics, rule and step (its own view, saved)
        views = [torch.load(one / f"stage{s}" / "final" / f"rank{k}.pt", weights_only=False)["extra"]
                 for k in (0, 1)]
        assert views[0] == views[1] and views[0]["state"]["step"] == (2, 3)[s - 1]
        assert views[0]["state"]["end"] and len(views[0]["state"]["truncated"]) == (2, 3)[s - 1]
    # the same stages as two commands (stage 2 reads stage 1's final from disk): the same numbers
    run(torchrun(sep, "1", "--steps", "5", "--end-trunc", "1", "--dynamic-sampling", "0",
                 "--overlong", "mask", *source))
    run(torchrun(sep, "2", "--steps", "3", "--end-trunc", "off", "--dynamic-sampling", "2",
                 "--overlong", "penalty"))
    assert metrics(sep) == metrics(one) and weights(sep) == weights(one)
    # SIGKILL in stage 2 (its step-1 checkpoint written, step 2 under way), then --resume
    p = subprocess.Popen(torchrun(cut, "1-2", *source), cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    t, f = time.time(), cut / "stage2" / "step1" / "manifest.json"
    while not f.exists():
        assert p.poll() is None and time.time() - t < 300, p.communicate()
        time.sleep(0.05)
    kill_all(p.pid)
    p.wait()
    assert not (cut / "stage2" / "final").exists()
    r = run(torchrun(cut, "1-2", "--resume", *source))
    assert "stage 1 is already complete" in r.stdout and "resumed from" in r.stdout
    assert metrics(cut) == metrics(one) and weights(cut) == weights(one)
