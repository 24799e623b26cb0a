"""Data parallel on real torchrun + gloo: two ranks end with identical weights, equal to one process."""
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def run(out, nproc, agg):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, f"{HERE}/scripts/train_equiv.py", str(out), agg]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(29500 + os.getpid() % 1000), f"{HERE}/scripts/train_equiv.py", str(out), agg]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean"])
def test_two_ranks_equal_one(tmp_path, agg):
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    run(tmp_path / "one", 1, agg)
    run(tmp_path / "two", 2, agg)
    one = torch.load(tmp_path / "one" / "rank0.pt")
    r0, r1 = torch.load(tmp_path / "two" / "rank0.pt"), torch.load(tmp_path / "two" / "rank1.pt")
    for name, w in one["weights"].items():
        assert torch.equal(r0["weights"][name], r1["weights"][name]), name
        assert (r0["weights"][name] - w).abs().max() < 1e-5, name
    # the clip bound (grad_clip 0.05): the reported norm is the global one and identical everywhere
    for s1, s0, s2 in zip(one["stats"], r0["stats"], r1["stats"]):
        assert s1["grad_norm"] > 0.05
        assert abs(s1["grad_norm"] - s0["grad_norm"]) < 1e-5 and s0["grad_norm"] == s2["grad_norm"]
        assert abs(s1["kl/mean"] - s0["kl/mean"]) < 1e-6
    assert one["stats"][-1]["kl/mean"] > 0  # the policy moved away from the reference
