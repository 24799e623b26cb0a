"""Faults during a run: a signal in a stage's last step or during vLLM's start-up, a torn
metrics.jsonl line, seeds of any size, a full disk. Each drives the real CLI (torchrun where ranks matter)."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import checkpoint

from tests.test_resilience import ROOT, cmd, metrics, run, start, wait_for_steps

pytestmark = pytest.mark.slow  # every test here starts processes


def one_line(r, needle):
    """Status non-zero, the message on stderr, no worker's traceback (torchrun adds its own
    ChildFailedError report after any worker's non-zero status)."""
    assert r.returncode != 0 and needle in r.stderr, (r.stdout[-1000:], r.stderr[-3000:])
    assert not re.search(r"\[rank\d\]: Traceback", r.stderr), r.stderr[-3000:]


def same_weights(a, b):
    with open(a / "stage1" / "final" / "model.safetensors", "rb") as x, \
            open(b / "stage1" / "final" / "model.safetensors", "rb") as y:
        return x.read() == y.read()


def test_a_signal_in_the_stages_last_step_then_resume_ends_the_stage(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run(ref, "--steps", "3")
    p = start(cut, "--steps", "3")
    wait_for_steps(cut, 2, p)  # step 3, the cap, in flight
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=300)  # torchrun's own status is 1 (SignalException)
    assert "stopped by a signal" in stdout, stdout[-2000:] + stderr[-3000:]
    assert os.path.exists(cut / "stage1" / "step3" / "manifest.json")
    assert not os.path.exists(cut / "stage1" / "final")
    r = run(cut, "--steps", "3", "--resume")
    assert "resumed from" in r.stdout and "step 4/" not in r.stdout, r.stdout
    assert metrics(cut) == metrics(ref)
    assert same_weights(cut, ref)


def test_a_torn_last_metrics_line_is_dropped_and_a_damaged_one_named(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run(ref, "--steps", "3")
    # what a kill while step 3's line was written leaves: step2/, 2 rows and half of the third
    shutil.copytree(ref, cut)
    shutil.rmtree(cut / "stage1" / "final")
    rows = (ref / "stage1" / "metrics.jsonl").read_text().splitlines(keepends=True)
    (cut / "stage1" / "metrics.jsonl").write_text("".join(rows[:2]) + rows[2][:len(rows[2]) // 2])
    r = run(cut, "--steps", "3", "--resume")
    assert r.stdout.count("last line was cut short") == 1, r.stdout
    assert metrics(cut) == metrics(ref)
    assert same_weights(cut, ref)
    # a damaged line that is not the last: one line naming the file and line, nothing rewritten
    rows[1] = rows[1][:20] + "\n"
    (cut / "stage1" / "metrics.jsonl").write_text("".join(rows))
    shutil.rmtree(cut / "stage1" / "final")
    r = run(cut, "--steps", "3", "--resume", check=False)
    one_line(r, f"{cut}/stage1/metrics.jsonl line 2 is not a metrics row")
    assert (cut / "stage1" / "metrics.jsonl").read_text() == "".join(rows)


@pytest.mark.parametrize("seed", [20000, 2 ** 70])
def test_seeds_of_any_size(tmp_path, seed):
    out = tmp_path / "run"
    r = run(out, "--steps", "2", "--seed", str(seed), "--eval-k", "2", "--dynamic-sampling", "1")
    assert "step 2/2" in r.stdout and os.path.exists(out / "stage1" / "eval.json"), r.stdout


@pytest.fixture
def small_disk(tmp_path):
    """A real small filesystem (tmpfs, mounted as root): mount(size) (re)mounts it at its path."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = []

    def mount(size):
        opts = f"remount,size={size}" if mounted else f"size={size}"
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(disk)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(size)
        return disk
    yield mount
    if mounted:
        subprocess.run(["umount", str(disk)])


def test_a_full_disk_at_a_checkpoint_then_the_rerun_continues_exactly(tmp_path, small_disk):
    ref = tmp_path / "ref"
    run(ref, "--steps", "3")
    disk = small_disk("40M")  # step2/ (~32 MB) fits, final/ does not
    out = disk / "run"
    r = run(out, "--steps", "3", check=False)
    one_line(r, f"{out}/stage1: no space left on its disk")
    assert "MiB free" in r.stderr
    left = sorted(os.listdir(out / "stage1"))
    assert left == ["latest", "metrics.jsonl", "run.json", "step2"], left  # no .tmp
    assert checkpoint.check_checkpoint(str(out / "stage1" / "step2"), content=True) is None
    small_disk("100M")  # space freed
    r = run(out, "--steps", "3", "--resume")
    assert f"resumed from {out}/stage1/step2" in r.stdout
    assert metrics(out) == metrics(ref)
    assert same_weights(out, ref)


def test_a_full_disk_before_the_first_step_is_one_line(tmp_path, small_disk):
    disk = small_disk("3M")
    out = disk / "run"
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:  # the disk full to its last byte
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    os.close(fd)
    r = run(out, "--steps", "1", check=False)
    one_line(r, f"{out}/stage1: no space left on its disk")
    assert os.listdir(out / "stage1") == []  # neither run.json nor its .tmp
    os.remove(disk / "filler")
    r = run(out, "--steps", "1", "--save-every", "0", "--resume", check=False)
    assert r.returncode != 0 and "no space left" in r.stderr  # the final checkpoint: 3 MB is little
    assert [n for n in os.listdir(out / "stage1") if n.endswith(".tmp")] == []


def needs_vllm():
    if os.environ.get("FASTCURL_REQUIRE_VLLM") != "1":
        pytest.importorskip("vllm")


@pytest.mark.parametrize("delay", [0.0, 2.0])  # in vLLM's import, in its engine's start
def test_a_sigint_during_vllm_start_up_stops_cleanly_then_the_same_command_runs(tmp_path, delay):
    needs_vllm()
    out = tmp_path / "run"
    args = ["--steps", "1", "--eval-k", "0", "--rollout", "vllm"]
    p = subprocess.Popen(cmd(out, *args, nproc=1), cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = []
    for line in p.stdout:  # the engine's start begins after this line
        lines.append(line)
        if "rollout engine: vllm" in line:
            time.sleep(delay)
            p.send_signal(signal.SIGINT)
            break
    lines += p.stdout.readlines()
    output = "".join(lines)
    assert p.wait(timeout=300) == 0, output[-3000:]
    assert "stopped by a signal before stage 1 trained: rerun the same command" in output, output[-3000:]
    assert "Traceback" not in output and "step 1/1" not in output, output[-3000:]
    assert not os.path.exists(out / "stage1" / "run.json")
    r = run(out, *args, nproc=1)
    assert "step 1/1" in r.stdout and os.path.exists(out / "stage1" / "final"), r.stdout[-2000:]


@pytest.mark.parametrize("engine", ["torch", "vllm"])  # 2**40 + 5 after fit_seed: over 32 bits
def test_eval_seeds_of_any_size(engine):
    if engine == "vllm":
        needs_vllm()
    r = subprocess.run([sys.executable, f"{ROOT}/eval.py", "--seed", str(2 ** 70 + 2 ** 40 + 5), "--limit", "2",
                        "--k", "1", "--max-tokens", "4", "--rollout", engine], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "eval.jsonl" in r.stdout, r.stderr[-3000:]


def test_a_kill_during_the_end_of_stage_eval_then_resume_scores_it_and_ends_the_stage(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    args = ["--steps", "2", "--eval-k", "8"]  # the held-out eval: 256 problems x 8 samples, seconds
    run(ref, *args, nproc=1)
    p = subprocess.Popen(cmd(cut, *args, nproc=1), cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    for line in p.stdout:
        if "stage 1 ends after step 2" in line:  # the eval starts now
            time.sleep(0.5)
            p.kill()
            break
    p.wait(timeout=60)
    assert not os.path.exists(cut / "stage1" / "eval.json")
    assert not os.path.exists(cut / "stage1" / "final")  # not complete without its eval
    r = run(cut, *args, "--resume", nproc=1)
    assert "step 3/" not in r.stdout and "held-out" in r.stdout, r.stdout[-2000:]
    drop = ("time_s",)
    scores = [{k: v for k, v in json.load(open(d / "stage1" / "eval.json")).items() if k not in drop}
              for d in (ref, cut)]
    assert scores[0] == scores[1]
    assert metrics(cut) == metrics(ref) and same_weights(cut, ref)
