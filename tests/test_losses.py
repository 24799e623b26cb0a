"""The RL menu (issue #17), trainer side: GSPO and CISPO beside GRPO, the rollout corrections, left-out
completions (keep=) and adaptive entropy control.

Math: each policy loss x aggregation and each correction against a float64 plain-loop reference,
values and gradients. Trainer: one update step is the same whatever the micro-batch token budget and
whatever the number of ranks (1 vs 2 under torchrun + gloo, plain data parallel and fsdp.shard), for
every loss x aggregation and the corrections; a left-out completion contributes nothing, and its
tokens and sequence leave the denominators; the entropy coefficient moves, clamps and survives a
state_dict round trip.
"""
import copy
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

from settings import Stage
from trainer import Trainer, TrainConfig, grpo_loss, rollout_correction

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("rl_equiv", f"{HERE}/scripts/rl_equiv.py")
rl_equiv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rl_equiv)

LOSSES = ["grpo", "gspo", "cispo"]
AGGS = ["token-mean", "seq-mean", "drgrpo"]


# ---- the math against plain loops --------------------------------------------------------------

def ref_loss(loss, logp, old, adv, mask, ref, ent, cl, ch, kl_coef, ent_coef, agg, isw):
    """Token by token (and, for GSPO, sequence by sequence) in float64 autograd.

    GSPO is written in its sequence form: L_i = -min(s_i A_i, clip(s_i) A_i) with
    s_i = exp(mean over the response of (logp - old)), every response token of i carrying L_i times
    its weight. The trainer's GSPO-token form must agree in value and gradient (isw per sequence)."""
    B, T = logp.shape
    per = [[None] * T for _ in range(B)]
    for b in range(B):
        n = sum(float(mask[b, t]) for t in range(T))
        if loss == "gspo":
            s = torch.exp(sum((logp[b, t] - old[b, t]) * mask[b, t] for t in range(T)) / n)
            seq = -torch.minimum(s * adv[b], torch.clamp(s, 1 - cl, 1 + ch) * adv[b])
        for t in range(T):
            ratio = torch.exp(logp[b, t] - old[b, t])
            if loss == "grpo":
                x = -torch.minimum(ratio * adv[b], torch.clamp(ratio, 1 - cl, 1 + ch) * adv[b])
            elif loss == "gspo":
                x = seq
            else:  # cispo: the weight min(ratio, 1 + eps_high), no lower bound, no gradient
                x = -min(ratio.item(), 1 + ch) * adv[b] * logp[b, t]
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


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("extras", [False, True])
def test_losses_match_reference(loss, agg, extras):
    g = torch.Generator().manual_seed(1)
    B, T = 6, 7
    logp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_()
    # token ratios exp(+-0.6), sequence ratios exp(+-0.25): past both clip edges either way
    old = logp.detach() + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 1.2
    adv = torch.tensor([1.3, -0.7, 0.0, 2.0, -1.5, 0.9], dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    ref = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3 if extras else None
    ent = (torch.rand(B, T, generator=g, dtype=torch.float64) * 2).requires_grad_() if extras else None
    # correction weights: per token (0/1 and truncated IS) for grpo/cispo, per sequence for gspo
    isw = None
    if extras:
        shape = (B, 1) if loss == "gspo" else (B, T)
        isw = (torch.rand(shape, generator=g, dtype=torch.float64) * 2).expand(B, T).clone()
        isw[0, :] = 0 if loss == "gspo" else isw[0, :]
        isw[2, 3] = 0.0 if loss != "gspo" else isw[2, 3]
    cl, ch = (0.08, 0.1) if loss == "gspo" else (0.2, 0.28)
    kw = dict(kl_coef=0.05 if extras else 0.0, entropy_coef=0.01 if extras else 0.0, agg=agg)
    got, stats = grpo_loss(logp, old, adv, mask, clip_low=cl, clip_high=ch, ref_logp=ref,
                           entropy=ent, is_weight=isw, loss=loss, **kw)
    want = ref_loss(loss, logp, old, adv, mask, ref, ent, cl, ch, kw["kl_coef"], kw["entropy_coef"],
                    agg, isw)
    assert abs(got.item() - want.item()) < 1e-12
    ins = [logp] + ([ent] if ent is not None else [])
    for a, b in zip(torch.autograd.grad(got, ins), torch.autograd.grad(want, ins)):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)
    assert 0 < stats["pg_clipfrac"] < 1  # the clips bind on some tokens, not all
    if loss == "grpo":  # both clip edges are reached, each on the side where it binds
        ratio = torch.exp(logp - old)
        assert ((ratio > 1 + ch) & (adv[:, None] > 0)).any()
        assert ((ratio < 1 - cl) & (adv[:, None] < 0)).any()


def test_cispo_keeps_the_gradient_where_grpo_clips():
    """Positive advantage, ratios e^.5 (past 1 + eps_high) and e^-.5 (past 1 - eps_low): GRPO's
    gradient is 0 on the first; CISPO's is -min(r, 1 + eps_high) A / n on every token, the lower
    side unbounded."""
    logp = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-0.5, 0.5, 0.0]], dtype=torch.float64)
    mask, a = torch.ones(1, 3), torch.tensor([1.0], dtype=torch.float64)
    (g_grpo,) = torch.autograd.grad(grpo_loss(logp, old, a, mask, clip_high=0.3)[0], logp)
    (g_cispo,) = torch.autograd.grad(grpo_loss(logp, old, a, mask, clip_high=0.3, loss="cispo")[0],
                                     logp)
    assert g_grpo[0, 0] == 0
    want = -torch.tensor([1.3, math.exp(-0.5), 1.0], dtype=torch.float64) / 3
    assert torch.allclose(g_cispo[0], want, atol=1e-15)


def test_gspo_clips_whole_sequences():
    """A sequence whose mean log-ratio is past the clip gets no gradient on any token, even one whose
    own ratio is inside; a sequence inside gets s A / n on every token."""
    logp = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-0.3, -0.3, 0.0], [0.01, -0.01, 0.0]], dtype=torch.float64)
    loss, _ = grpo_loss(logp, old, torch.tensor([1.0, 1.0], dtype=torch.float64), torch.ones(2, 3),
                        clip_low=0.1, clip_high=0.1, loss="gspo", agg="seq-mean")
    (g,) = torch.autograd.grad(loss, logp)
    assert (g[0] == 0).all()
    assert torch.allclose(g[1], torch.full((3,), -1.0 / 3 / 2, dtype=torch.float64), atol=1e-15)


def ref_correction(gap, mask, mode, cap):
    """Per sequence, per token, in Python floats."""
    w, out = [], []
    for b in range(len(gap)):
        toks = [t for t in range(len(gap[b])) if mask[b][t]]
        seq_sum = sum(gap[b][t] for t in toks)
        geo = math.exp(seq_sum / max(len(toks), 1))
        wr, orow = [], []
        for t in range(len(gap[b])):
            r = math.exp(gap[b][t])
            if mode == "tis-token":
                x, o = min(r, cap), False
            elif mode == "tis-seq":
                x, o = min(math.exp(seq_sum), cap), False
            elif mode == "mask-token":
                o = not (1 / cap <= r <= cap)
                x = 0.0 if o else 1.0
            else:
                o = not (1 / cap <= geo <= cap)
                x = 0.0 if o else 1.0
            wr.append(x)
            orow.append(o and bool(mask[b][t]))
        w.append(wr)
        out.append(orow)
    return w, out


@pytest.mark.parametrize("mode", ["tis-token", "tis-seq", "mask-token", "mask-seq"])
def test_rollout_correction_matches_reference(mode):
    g = torch.Generator().manual_seed(3)
    B, T = 8, 6
    gap = (torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3)
    mask = torch.ones(B, T, dtype=torch.float64)
    mask[2, 3:] = 0
    mask[5, 1:] = 0
    gap[7] = 40.0  # exp(sum) = e^240 must cap, not overflow (fp32 would give inf before the cap)
    cap = 1.25
    w, out = rollout_correction(gap, mask, mode, cap)
    rw, rout = ref_correction(gap.tolist(), mask.tolist(), mode, cap)
    rw = torch.tensor(rw, dtype=torch.float64)
    assert torch.allclose(w * mask, rw * mask, rtol=1e-12, atol=0)
    assert out.tolist() == rout
    if mode.startswith("mask"):
        frac = (out.sum() / mask.sum()).item()
        assert 0 < frac < 1  # both sides of the band seen
    w32, _ = rollout_correction(gap.float(), mask.float(), mode, cap)
    assert torch.isfinite(w32).all()


# ---- the trainer: micro-batch and rank invariance ----------------------------------------------

# Two runs that differ only in how the same sum is split (micro-batches, ranks) differ by fp32
# rounding: a sum of n terms reordered moves by at most about n u (u = 6e-8) of its terms' sizes;
# with ~500 response tokens per step that is 3e-5, and 1e-6..3e-6 is what is seen (weights' move,
# per tensor). A wrong denominator or a token counted twice or dropped moves a tensor's update by
# at least one token's share, 1/500 = 2e-3. The bound sits between them.
TOL = 1e-4


def assert_same_move(a, b, what):
    for k in b:
        assert (a[k] - b[k]).norm() <= TOL * b[k].norm(), (what, k)
    assert sum(v.norm() for v in b.values()) > 0


@pytest.fixture(scope="module")
def one_process():
    return {case: rl_equiv.run_case(case) for case in rl_equiv.CASES}


@pytest.mark.slow
@pytest.mark.parametrize("case", rl_equiv.CASES, ids=lambda c: "-".join(map(str, c)))
def test_token_budget_changes_nothing(case, one_process):
    """Micro-batches of 40 tokens (many) vs 10,000 (one per mini-batch): the same update."""
    move, stats = one_process[case]
    big, big_stats = rl_equiv.run_case(case, token_budget=10_000)
    assert_same_move(big, move, case)
    for k in ("pg_clipfrac", "ratio/mean", "rollout/masked_frac", "kl/mean", "entropy/mean"):
        assert big_stats[k] == pytest.approx(stats[k], rel=1e-5, abs=1e-7), k
    assert stats["pg_clipfrac"] > 0  # the second mini-batch really ran off ratio 1
    assert (stats["rollout/masked_frac"] > 0) == case[2].startswith("mask")


@pytest.mark.slow
def test_two_ranks_equal_one(tmp_path, one_process):
    """One torchrun launch (2 ranks, gloo, CPU) runs every case, plain data parallel and
    fsdp.shard; each rank's update equals the one process's on the whole batch."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           f"{HERE}/scripts/rl_equiv.py", str(tmp_path)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    for case in rl_equiv.CASES:
        move, stats = one_process[case]
        for mode in ("dp", "hand"):
            for res in ranks:
                got, s = res[(case, mode)]
                assert_same_move(got, move, (case, mode))
                for k in ("pg_clipfrac", "ratio/mean", "rollout/masked_frac", "entropy/mean"):
                    assert s[k] == pytest.approx(stats[k], rel=1e-5, abs=1e-7), (case, mode, k)


# ---- left-out completions ----------------------------------------------------------------------

def tiny_trainer(budget=40, lr=0.0):
    from model import Config, Transformer, init_weights
    m = init_weights(Transformer(Config(**rl_equiv.CFG)), std=0.1, seed=0)
    tr = Trainer(m, TrainConfig(grad_clip=1e9, token_budget=budget))
    tr.opt = torch.optim.SGD(m.parameters(), lr=lr)
    return tr


def stage(**kw):
    base = dict(max_tokens=16, batch=8, n=4, steps=1, lr=1e-3, kl_coef=0.0, entropy_coef=0.01,
                temperature=0.8)
    return Stage("L2", **{**base, **kw})


def grads(tr):
    return {k: p.grad.clone() for k, p in tr.model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("agg", AGGS)
def test_left_out_completions_contribute_nothing(agg):
    """keep=False on some completions gives the gradient of the batch without them (so their tokens
    and sequences are out of the denominators too), whatever their tokens and advantages."""
    tr0 = tiny_trainer()
    comps, adv, keep = rl_equiv.batch(tr0.model, 0.8)
    st = stage(agg=agg, loss="gspo", correction="tis-token")
    kept = [i for i in range(len(comps)) if keep[i]]
    tr0.step([comps[i] for i in kept], adv[kept], st)
    want = grads(tr0)
    tr1 = tiny_trainer()
    s1 = tr1.step(comps, adv, st, keep=keep)
    got = grads(tr1)
    for k in want:
        assert (got[k] - want[k]).norm() <= TOL * want[k].norm(), k
    # the left-out ones changed: other tokens, other advantages; nothing moves
    comps2 = copy.deepcopy(comps)
    adv2 = adv.clone()
    for i in range(len(comps)):
        if not keep[i]:
            comps2[i].response_ids = [(t + 7) % 38 + 2 for t in comps2[i].response_ids]
            adv2[i] = 100.0
    tr2 = tiny_trainer()
    s2 = tr2.step(comps2, adv2, st, keep=keep)
    assert all(torch.equal(v, grads(tr2)[k]) for k, v in got.items())
    assert s1["entropy/mean"] == s2["entropy/mean"]


def test_everything_left_out_is_no_update():
    tr = tiny_trainer(lr=1.0)
    comps, adv, _ = rl_equiv.batch(tr.model, 0.8)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    s = tr.step(comps, adv, stage(), keep=[False] * len(comps))
    assert all(torch.equal(v, tr.model.state_dict()[k]) for k, v in before.items())
    assert s["grad_norm"] == 0 and tr.updates == 0 and s["prompt_shared_frac"] == 0.0


# ---- adaptive entropy control ------------------------------------------------------------------

@pytest.mark.slow
def test_entropy_coefficient_moves_clamps_and_is_saved():
    tr = tiny_trainer()
    comps, adv, _ = rl_equiv.batch(tr.model, 0.8)
    # the toy policy's entropy is about log(40) = 3.7 at temperature 0.8: a target of 10 is above it
    up = stage(entropy_coef=0.01, target_entropy=10.0, entropy_lr=0.004, entropy_coef_max=0.02)
    coefs = [tr.step(comps, adv, up)["entropy/coef"] for _ in range(4)]
    assert coefs == pytest.approx([0.01, 0.014, 0.018, 0.02])  # up by entropy_lr, then the max
    assert tr.ent_coef == pytest.approx(0.02)
    saved = tr.state_dict()
    tr2 = tiny_trainer()
    tr2.load_state_dict(copy.deepcopy(saved))
    assert tr2.step(comps, adv, up)["entropy/coef"] == pytest.approx(0.02)
    # above the target: the term is off from the step after the first measurement (the rule runs
    # one step late: the first step still sees the last entropy below the old target), and the
    # coefficient walks down to 0 and stays there
    down = stage(entropy_coef=0.01, target_entropy=0.5, entropy_lr=0.004, entropy_coef_max=0.02)
    tr.ent_coef = 0.006
    coefs = [tr.step(comps, adv, down)["entropy/coef"] for _ in range(3)]
    assert coefs == pytest.approx([0.006, 0.0, 0.0]) and tr.ent_coef == 0.0 and not tr.ent_active
    # a fresh trainer starts at the stage's coefficient; off (target 0): the stage's, no state moved
    tr3 = tiny_trainer()
    assert tr3.step(comps, adv, up)["entropy/coef"] == pytest.approx(0.01)
    assert tr3.step(comps, adv, stage(entropy_coef=0.003))["entropy/coef"] == 0.003


def test_entropy_coefficient_is_the_loss_coefficient():
    """The adaptive coefficient is what the loss uses: the gradient equals a fixed-coefficient
    step's with that value, and differs from the stage's."""
    comps, adv, _ = rl_equiv.batch(tiny_trainer().model, 0.8)
    tr = tiny_trainer()
    tr.ent_coef = 0.5
    tr.step(comps, adv, stage(entropy_coef=0.01, target_entropy=10.0, entropy_coef_max=1.0))
    fixed = tiny_trainer()
    fixed.step(comps, adv, stage(entropy_coef=0.5))
    stage_value = tiny_trainer()
    stage_value.step(comps, adv, stage(entropy_coef=0.01))
    g, gf, gs = grads(tr), grads(fixed), grads(stage_value)
    assert all(torch.equal(g[k], gf[k]) for k in g)
    assert any(not torch.allclose(g[k], gs[k]) for k in g)
