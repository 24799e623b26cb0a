"""Never lose a run: SIGKILL mid-step then --resume equals an uninterrupted run; SIGTERM checkpoints and exits;
a damaged newest checkpoint falls back to the one before; NaN updates are skipped and stop the run."""
import json
import os
import signal
import subprocess
import sys
import time

from bench.kill_resume import kill_all  # SIGKILL torchrun and its workers (they run in sessions of their own)
import pytest

pytestmark = pytest.mark.slow  # every test here starts processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--batch", "4", "--n-samples", "4", "--eval-k", "0", "--save-every", "2", "--rollout", "torch"]
VOLATILE = ("time/", "throughput/")


def cmd(out, *args, nproc=2):
    pre = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    return pre + [f"{ROOT}/grpo.py", "--stage", "1", "--out", str(out), *SMALL, *args]


def run(out, *args, nproc=2, check=True):
    r = subprocess.run(cmd(out, *args, nproc=nproc), cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       capture_output=True, text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def _cmdline(pid: str) -> str:
    try:
        return open(f"/proc/{pid}/cmdline").read().replace("\0", " ")
    except OSError:
        return ""


def metrics(out):
    rows = [json.loads(line) for line in open(f"{out}/stage1/metrics.jsonl")]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def start(out, *args, nproc=2):
    return subprocess.Popen(cmd(out, *args, nproc=nproc), cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_steps(out, n, proc, timeout=300):
    t = time.time()
    f = f"{out}/stage1/metrics.jsonl"
    while time.time() - t < timeout:
        if os.path.exists(f) and sum(1 for _ in open(f)) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise TimeoutError


def test_sigkill_mid_step_then_resume_equals_uninterrupted(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run(ref, "--steps", "12")
    p = start(cut, "--steps", "12")
    wait_for_steps(cut, 5, p)   # checkpoints at steps 2 and 4, step 6 in flight
    assert len(kill_all(p.pid)) == 3  # torchrun and its two workers
    p.wait()
    time.sleep(0.5)
    assert not [q for q in os.listdir("/proc") if q.isdigit() and str(cut) in _cmdline(q)]  # nothing left running
    assert not os.path.exists(cut / "stage1" / "final")
    assert os.path.exists(cut / "stage1" / "step4" / "manifest.json")
    r = run(cut, "--steps", "12", "--resume")
    assert "resumed from" in r.stdout
    assert metrics(cut) == metrics(ref)  # every logged number after the checkpoint, not only the weights
    with open(cut / "stage1" / "final" / "model.safetensors", "rb") as a, \
            open(ref / "stage1" / "final" / "model.safetensors", "rb") as b:
        assert a.read() == b.read()


def test_sigterm_finishes_the_step_checkpoints_and_exits_0(tmp_path):
    out = tmp_path / "one"
    p = start(out, "--steps", "40", nproc=1)
    wait_for_steps(out, 3, p)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr[-2000:]
    assert "stopped by a signal" in stdout
    done = len(metrics(out))
    assert 3 <= done < 40
    latest = open(out / "stage1" / "latest").read().strip()
    assert latest == f"step{done}" and os.path.exists(out / "stage1" / latest / "manifest.json")
    # and under torchrun: the signal reaches both ranks, which stop at the same step
    out2 = tmp_path / "two"
    p = start(out2, "--steps", "40")
    wait_for_steps(out2, 3, p)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=120)
    latest = open(out2 / "stage1" / "latest").read().strip()
    assert os.path.exists(out2 / "stage1" / latest / "rank1.pt")
    r = run(out2, "--steps", "40", "--seed", "1", "--resume", check=False)
    assert "holds a different run (seed 0 -> 1" in r.stderr  # a changed seed: not the same run
    r = run(out2, "--steps", "40", "--resume", "--save-every", "2")
    assert f"resumed from {out2}/stage1/{latest}" in r.stdout


def test_damaged_newest_checkpoint_falls_back(tmp_path):
    out = tmp_path / "run"
    run(out, "--steps", "5", "--keep", "0")
    import shutil
    shutil.rmtree(out / "stage1" / "final")
    weights = out / "stage1" / "step4" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    r = run(out, "--steps", "5", "--resume", "--keep", "0")
    assert "step4 is damaged (model.safetensors has" in r.stdout
    assert f"resumed from {out}/stage1/step2 at step 2" in r.stdout
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4, 5]


def test_keep_prunes_old_checkpoints(tmp_path):
    out = tmp_path / "run"
    run(out, "--steps", "7", "--keep", "2", nproc=1)
    assert sorted(os.listdir(out / "stage1")) == ["final", "latest", "metrics.jsonl", "run.json", "step4", "step6"]


def test_nan_updates_are_skipped_then_the_run_stops(tmp_path):
    out = tmp_path / "run"
    r = run(out, "--steps", "8", "--lr", "1e30", "--max-skips", "2", nproc=1, check=False)
    assert r.returncode != 0 and "2 updates in a row had a NaN/inf" in r.stderr
    rows = metrics(out)
    assert rows[-1]["skipped_steps"] == 2 and len(rows) == 3  # step 1 blew the weights up, 2 and 3 skipped
    assert os.path.exists(out / "stage1" / "step3" / "manifest.json")
