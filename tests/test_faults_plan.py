"""#29, the plan's share: what a run will write or read is checked before any compute, a run's
identity (run.json) catches what changes its results and allows what may change on a resume, one run
per output folder, and a bad input is one line (one rank's under torchrun)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import grpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--steps", "1", "--batch", "4", "--n-samples", "2", "--eval-k", "0", "--rollout", "torch",
         "--device", "cpu"]


def plan_of(*argv):
    options, stage_flags = grpo.parse_args(list(argv))
    return grpo.make_plan(options, stage_flags, rank=0, world=1, device=torch.device("cpu"))


def refused(*argv) -> str:
    """The one line make_plan (or the flags' checks) stops with."""
    with pytest.raises(SystemExit) as e:
        plan_of(*argv)
    return str(e.value)


def run(*args, timeout=300, **popen):
    return subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), **popen)


def one_line_error(r, *needles):
    assert r.returncode == 1, (r.returncode, r.stdout[-1000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    for n in needles:
        assert n in last, (n, last)
    return last


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-step run of stage 1 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    r = run("--out", str(out), *QUICK)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def copy_of(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# ---- 1. every stage's folder and the source checkpoint, before stage 1 trains ------------------

def test_a_later_stage_folder_in_the_way_is_found_before_stage_1(tmp_path):
    (tmp_path / "stage2").write_text("")
    line = refused("--stage", "1-2", "--out", str(tmp_path))
    assert "stage2 is a file, not a folder" in line and line.startswith("[fastcurl] --out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_later_stage_folder_not_writable_is_found_before_stage_1(tmp_path):
    (tmp_path / "stage2").mkdir(mode=0o555)
    assert "stage2 is not writable" in refused("--stage", "1-2", "--out", str(tmp_path))


def test_a_damaged_previous_final_is_one_line(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    weights = out / "stage1" / "final" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # same size: only its sha256 tells
    weights.write_bytes(bytes(data))
    line = refused("--stage", "2", "--out", str(out), *QUICK)
    assert "stage1/final, which is damaged (model.safetensors's content differs" in line
