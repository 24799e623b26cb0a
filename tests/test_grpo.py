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


def ref_loss(logp, old, adv, mask, ref, ent, clip_low, clip_high, kl_coef, ent_coef, agg, isw=None):
    """Token by token in float64 autograd."""
    B, T = logp.shape
    per = [[None] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            ratio = torch.exp(logp[b, t] - old[b, t])
            clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
            x = -torch.minimum(ratio * adv[b], clipped * adv[b])
            if isw is not None:
                x = x * isw[b, t]
            if ref is not None:
                d = ref[b, t] - logp[b, t]
                x = x + kl_coef * (torch.exp(d) - d - 1)
            if ent is not None:
                x = x - ent_coef * ent[b, t]
            per[b][t] = x * mask[b, t]
    if agg == "token-mean":
        return sum(sum(row) for row in per) / mask.sum()
    if agg == "seq-mean":
        return sum(sum(per[b]) / mask[b].sum() for b in range(B)) / B
    return sum(sum(row) for row in per) / (B * T)


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean", "drgrpo"])
@pytest.mark.parametrize("with_kl_ent", [False, True])
def test_grpo_loss_matches_reference(agg, with_kl_ent):
    g = torch.Generator().manual_seed(1)
    B, T = 5, 7
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_()
    # ratios spread well past both clip edges: exp(+-0.6)
    old = (logp.detach() + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 1.2)
    adv = torch.tensor([1.3, -0.7, 0.0, 2.0, -1.5], dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    ref = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 if with_kl_ent else None
    ent = (torch.rand(B, T, generator=g, dtype=torch.float64) * 2).requires_grad_() if with_kl_ent else None
    isw = torch.rand(B, T, generator=g, dtype=torch.float64) * 2 if with_kl_ent else None  # TIS weights
    kw = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.05 if with_kl_ent else 0.0,
              entropy_coef=0.01 if with_kl_ent else 0.0, agg=agg)
    loss, stats = grpo_loss(logp, old, adv, mask, ref_logp=ref, entropy=ent, is_weight=isw, **kw)
    want = ref_loss(logp, old, adv, mask, ref, ent, 0.2, 0.28, kw["kl_coef"], kw["entropy_coef"], agg, isw)
    assert abs(loss.item() - want.item()) < 1e-12
    ins = [logp] + ([ent] if ent is not None else [])
    g1 = torch.autograd.grad(loss, ins)
    g2 = torch.autograd.grad(want, ins)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-12)
    ratio = torch.exp(logp - old)
    assert ((ratio > 1.28) & (adv[:, None] > 0)).any() and ((ratio < 0.8) & (adv[:, None] < 0)).any()
    assert 0 < stats["pg_clipfrac"] < 1


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
