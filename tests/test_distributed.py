"""Data parallel and FSDP on real torchrun + gloo: the ranks agree, and equal one process on the whole batch."""
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # every test here starts processes

HERE = os.path.dirname(os.path.abspath(__file__))


def run(out, nproc, agg="token-mean", mode="dp"):
    out.mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if nproc == 1:
        cmd = [sys.executable, f"{HERE}/scripts/train_equiv.py", str(out), agg, mode]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               f"{HERE}/scripts/train_equiv.py", str(out), agg, mode]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [torch.load(out / f"rank{i}.pt") for i in range(nproc)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return {agg: run(tmp_path_factory.mktemp(agg), 1, agg)[0] for agg in ("token-mean", "seq-mean")}


# train_equiv.py: 3 AdamW steps at lr 3e-3. AdamW moves an element by about lr per step at most
# (|m / sqrt(v)| <= 1 while a gradient keeps its sign), so lr x steps bounds how far any weight can go.
# One process and two ranks sum the same gradients in a different order; in fp32 that rounding reaches
# the weights through Adam's normalisation, most where a gradient element nearly cancels (seen: up to
# 1.1e-5 = 0.4% of lr x steps on one machine). A wrong reduction (a rank's share missing or doubled,
# a wrong denominator) changes the direction of whole tensors' updates: O(lr) per element. The bound
# sits between the two, as a fraction of the largest possible move, not a number tuned to one machine.
MAX_MOVE = 3e-3 * 3


def close(a, b, frac=1e-2):
    for name, w in a["weights"].items():
        assert (b["weights"][name] - w).abs().max() < frac * MAX_MOVE, name


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean"])
@pytest.mark.parametrize("mode", ["dp", "hand"])
def test_two_ranks_equal_one(tmp_path, one_process, agg, mode):
    one = one_process[agg]
    r0, r1 = run(tmp_path, 2, agg, mode)
    for name in one["weights"]:
        assert torch.equal(r0["weights"][name], r1["weights"][name]), name
    close(one, r0)
    # the clip binds (grad_clip 0.05); the reported norm is the global one, identical on every rank
    for s1, s0, s2 in zip(one["stats"], r0["stats"], r1["stats"]):
        assert s1["grad_norm"] > 0.05
        assert abs(s1["grad_norm"] - s0["grad_norm"]) < 1e-5 and s0["grad_norm"] == s2["grad_norm"]
        assert abs(s1["kl/mean"] - s0["kl/mean"]) < 1e-6
    assert one["stats"][-1]["kl/mean"] > 0  # the policy moved away from the reference


def test_fsdp_holds_one_world_th_and_matches_fsdp2(tmp_path, one_process):
    dp = run(tmp_path / "dp", 2)[0]
    hand = run(tmp_path / "hand", 2, mode="hand")
    theirs = run(tmp_path / "torch", 2, mode="torch")
    close(theirs[0], hand[0])
    close(one_process["token-mean"], theirs[0])
    for kind in ("params", "grads", "optimizer"):
        full = dp["bytes"][kind]
        for r in hand:  # flat shards are padded to a multiple of the world size: at most a few elements more
            assert full / 2 <= r["bytes"][kind] <= full / 2 + 64, (kind, full, r["bytes"][kind])


def test_bf16_params_stay_close_to_fp32(tmp_path, one_process):
    """bf16 compute with fp32 master shards and fp32 reduce: the first step's gradient norm within bf16
    tolerance, and the whole weight vector after 3 AdamW steps within 1% (Adam turns the sign of tiny
    gradients, e.g. of the key biases whose true gradient is 0, into full-size updates, so per-tensor
    comparisons of those are noise)."""
    bf = run(tmp_path, 2, mode="hand-bf16")[0]
    one = one_process["token-mean"]
    g_bf, g_fp = bf["stats"][0]["grad_norm"], one["stats"][0]["grad_norm"]
    assert abs(g_bf - g_fp) / g_fp < 2e-2
    num = sum((bf["weights"][k] - w).pow(2).sum() for k, w in one["weights"].items())
    den = sum(w.pow(2).sum() for w in one["weights"].values())
    assert (num / den).sqrt() < 1e-2
    assert any(not torch.equal(bf["weights"][k], w) for k, w in one["weights"].items())  # bf16 really ran
