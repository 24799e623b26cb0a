"""GRPO math against a float64 reference written as plain loops, values and gradients."""
import math

import pytest
import torch

from trainer import group_advantages, grpo_loss


def ref_advantages(rewards, g, norm, eps):
    out = []
    for s in range(0, len(rewards), g):
        grp = rewards[s:s + g]
        mu = sum(grp) / g
        sd = math.sqrt(sum((x - mu) ** 2 for x in grp) / (g - 1))
        out += [(x - mu) / (sd + eps) if norm == "std" else x - mu for x in grp]
    return out


@pytest.mark.parametrize("norm", ["std", "none"])
def test_group_advantages(norm):
    g = torch.Generator().manual_seed(0)
    r = (torch.rand(6 * 8, generator=g) > 0.5).double()
    r[:8] = 1.0  # an all-equal group
    r[8:16] = torch.rand(8, generator=g, dtype=torch.float64)  # non-binary rewards too
    got = group_advantages(r, 8, norm=norm)
    want = ref_advantages(r.tolist(), 8, norm, 1e-6)
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6)
    assert (got[:8] == 0).all()


# grpo_loss against a float64 plain loop, for every policy loss and aggregation: tests/test_losses.py


def test_clip_sides_and_gradients():
    """Positive advantage: no gradient once ratio > 1 + clip_high; negative: none once ratio < 1 - clip_low."""
    logp = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-0.5, 0.5, -0.1, 0.1]], dtype=torch.float64)  # ratios e^.5, e^-.5, e^.1, e^-.1
    mask = torch.ones(1, 4)
    for a, dead in ((1.0, [0]), (-1.0, [1])):
        loss, _ = grpo_loss(logp, old, torch.tensor([a], dtype=torch.float64), mask, clip_low=0.2, clip_high=0.3)
        (g,) = torch.autograd.grad(loss, logp)
        for t in range(4):
            assert (g[0, t] == 0) == (t in dead), (a, t, g)


def test_denominators_add_up_across_microbatches():
    g = torch.Generator().manual_seed(2)
    logp = -torch.rand(6, 5, generator=g, dtype=torch.float64)
    old = logp + 0.1 * torch.randn(6, 5, generator=g, dtype=torch.float64)
    adv = torch.randn(6, generator=g, dtype=torch.float64)
    mask = (torch.rand(6, 5, generator=g) > 0.3).double()
    mask[:, 0] = 1
    for agg, denom in (("token-mean", mask.sum()), ("seq-mean", 6.0), ("drgrpo", 30.0)):
        whole, _ = grpo_loss(logp, old, adv, mask, agg=agg)
        parts = sum(grpo_loss(logp[s:s + 2], old[s:s + 2], adv[s:s + 2], mask[s:s + 2], agg=agg, denom=denom)[0]
                    for s in (0, 2, 4))
        assert abs(whole.item() - parts.item()) < 1e-12, agg
