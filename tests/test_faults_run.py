"""#29, faults during a run: a signal in a stage's last step, a torn metrics.jsonl line, seeds of any
size, a full disk. Each drives the real CLI (torchrun where ranks matter)."""
import json
import os
import signal
import time

import pytest

from tests.test_resilience import metrics, run, start, wait_for_steps

pytestmark = pytest.mark.slow  # every test here starts processes


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
