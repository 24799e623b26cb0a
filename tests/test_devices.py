"""Device discipline without a GPU (tests/device_guard.py): the main command, a resume and the evaluator run
with every tensor that the project makes without naming its device put on the meta device; one process and
two torchrun ranks (collectives, fsdp). A reintroduced device mix fails here as it would on CUDA.
And the launch: more ranks than GPUs stops with one line; --device cpu runs CPU ranks on any machine."""
import os
import subprocess
import sys

import pytest
import torch

from tests.device_guard import project_tensors_on_meta

pytestmark = pytest.mark.slow  # every test here starts processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUARD = os.path.join(ROOT, "tests", "device_guard.py")
SMALL = ["--steps", "2", "--batch", "4", "--n-samples", "4", "--save-every", "1", "--rollout", "torch",
         "--device", "cpu", "--correction", "tis-token", "--correction-cap", "2", "--mini-batches", "2"]


def guarded(*args, nproc=1):
    pre = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    r = subprocess.run(pre + [GUARD, *args], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "[device-guard]" not in r.stderr, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def test_the_guard_moves_unnamed_tensors_to_meta(tmp_path):
    src = tmp_path / "mod.py"
    src.write_text("import torch\n"
                   "def bad(x):\n    return x + torch.tensor([1.0])\n"
                   "def good(x):\n    return x + torch.tensor([1.0], device=x.device)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import mod
    finally:
        sys.path.remove(str(tmp_path))
    x = torch.zeros(1)
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    with project_tensors_on_meta(files=[str(src)]) as guard:
        assert mod.good(x).tolist() == [1.0]
        with pytest.raises(RuntimeError):  # a CPU tensor meets a tensor the default device made
            mod.bad(x).tolist()
        p.sum().backward()
        opt.step()  # torch's own tensors (AdamW's step counters) are left alone
    assert [w for w, _ in guard.caught] == ["mod.py:3"]


def test_main_command_resume_and_eval_under_the_guard(tmp_path):
    out = str(tmp_path / "run")
    r = guarded("grpo.py", "--stage", "1", "--out", out, "--eval-k", "1", *SMALL)
    assert "stage 1 step 2/2" in r.stdout and "held-out" in r.stdout
    r = guarded("grpo.py", "--stage", "2", "--out", out, "--eval-k", "0", "--fsdp", "none", *SMALL[:-4])
    assert "stage 2 step 2/2" in r.stdout
    os.remove(f"{out}/stage2/final/manifest.json")  # as if it died before the end: resume from step 1
    r = guarded("grpo.py", "--stage", "2", "--out", out, "--eval-k", "0", "--fsdp", "none", "--resume",
                *SMALL[:-4])
    assert "resumed from" in r.stdout
    problems = tmp_path / "few.jsonl"
    problems.write_text("".join(open(os.path.join(ROOT, "assets", "toy", "eval.jsonl")).readlines()[:6]))
    r = guarded("eval.py", "--data", str(problems), "--k", "2", "--rollout", "torch", "--device", "cpu")
    assert "few.jsonl" in r.stdout


def test_two_ranks_under_the_guard(tmp_path):
    r = guarded("grpo.py", "--stage", "1", "--out", str(tmp_path / "run"), "--eval-k", "1", *SMALL, nproc=2)
    assert "stage 1 step 2/2" in r.stdout and "world 2" in r.stdout


def test_more_ranks_than_gpus_is_one_clear_line(tmp_path):
    """On a GPU machine --device cuda with more ranks than GPUs stops before any compute; on a CPU
    machine --device cuda says there is no GPU. Either way: one line, naming --device cpu."""
    n = torch.cuda.device_count() + 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           os.path.join(ROOT, "grpo.py"), "--out", str(tmp_path), "--device", "cuda", "--steps", "1"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "--device cpu" in r.stderr
    assert "invalid device ordinal" not in r.stderr
    for f in ("grpo.py", "fsdp.py"):  # no traceback through the project (torchrun prints one of its own)
        assert f'File "{os.path.join(ROOT, f)}"' not in r.stderr
    assert not os.listdir(tmp_path)
