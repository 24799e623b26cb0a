"""The sympy worker pool never loses an answer: after a real time-out, under load, every comparison is
computed or counted in reward_errors()."""
import subprocess
import sys

import pytest

import reward


@pytest.mark.slow
def test_no_answer_is_lost_after_a_time_out_under_load(monkeypatch):
    reward.start_workers()
    monkeypatch.setattr(reward, "SYMPY_TIMEOUT", 0.3)  # shorter than a replacement worker's start
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        reward.reward_errors()
        assert not reward.is_equiv("9^{9^{9^{9^{9}}}}", "1")  # overruns: its worker is killed and replaced
        assert reward.reward_errors() >= 1
        pairs = [(f"{k}(x+1)", f"{k}x+{k}") for k in range(2, 26)]  # equal once parsed: no simplify needed
        results = [reward.is_equiv(a, b) for a, b in pairs]
        assert results.count(False) == reward.reward_errors()  # an answer not computed is counted
        assert all(results), results
    finally:
        for process in busy:
            process.kill()
            process.wait()
