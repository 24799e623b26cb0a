"""Fused log-prob / entropy (torch twin) against float64 autograd on full logits."""
import pytest
import torch

from kernels import fused_logprob_entropy, reference_logprob_entropy


def case(N, H, V, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g) * 1.5).to(dtype)
    w = (torch.randn(V, H, generator=g) * 0.3).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    return h, w, y, torch.randn(N, generator=g), torch.randn(N, generator=g)


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("N,H,V,T,chunk", [(37, 16, 101, 1.0, 500), (64, 32, 257, 0.6, 1 << 24),
                                           (5, 8, 3, 1.7, 7), (130, 24, 1000, 0.9, 4096),
                                           (300, 16, 2500, 0.8, 1 << 11)])
def test_torch_twin_matches_float64(N, H, V, T, chunk, keep):
    """Tiles of every shape (one, a row of them, a column, a grid with ragged edges: VOCAB_TILE is
    1,024 columns), the logits recomputed in the backward or kept (in memory left dirty by an
    earlier call, as the trainer's reused buffer is)."""
    h, w, y, g_lp, g_ent = case(N, H, V, N + V)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    memory = torch.full((N * V + 3,), float("nan")) if keep else None
    lp, ent = fused_logprob_entropy(h1, w1, y, T, impl="torch", chunk_elems=chunk, keep=memory)
    h2, w2 = h.double().requires_grad_(), w.double().requires_grad_()
    lp_ref, ent_ref = reference_logprob_entropy(h2, w2, y, T)
    assert lp.dtype == ent.dtype == torch.float32
    assert (lp.double() - lp_ref).abs().max() < 1e-5
    assert (ent.double() - ent_ref).abs().max() < 1e-5
    for upstream in ((g_lp, g_ent), (g_lp, None), (None, g_ent)):
        outs = [o for o, u in zip((lp, ent), upstream) if u is not None]
        refs = [o for o, u in zip((lp_ref, ent_ref), upstream) if u is not None]
        us = [u for u in upstream if u is not None]
        dh, dw = torch.autograd.grad(outs, (h1, w1), us, retain_graph=True)
        dh_ref, dw_ref = torch.autograd.grad(refs, (h2, w2), [u.double() for u in us], retain_graph=True)
        for a, b in ((dh, dh_ref), (dw, dw_ref)):
            assert ((a.double() - b).norm() / b.norm()) < 1e-4


def test_bf16_inputs_give_fp32_outputs_and_input_dtype_grads():
    h, w, y, g_lp, g_ent = case(20, 16, 50, 3, torch.bfloat16)
    h.requires_grad_(), w.requires_grad_()
    lp, ent = fused_logprob_entropy(h, w, y, 1.0, impl="torch")
    assert lp.dtype == torch.float32
    lp_ref, ent_ref = reference_logprob_entropy(h.double(), w.double(), y)
    assert (lp.double() - lp_ref).abs().max() < 1e-4
    (lp * g_lp + ent * g_ent).sum().backward()
    assert h.grad.dtype == w.grad.dtype == torch.bfloat16


def test_weight_only_or_hidden_only_grads():
    h, w, y, _, _ = case(9, 8, 30, 5)
    w.requires_grad_()
    lp, _ = fused_logprob_entropy(h, w, y, impl="torch")
    lp.sum().backward()
    assert w.grad is not None and h.grad is None
