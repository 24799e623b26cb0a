"""The Triton kernels (under TRITON_INTERPRET=1 on a CPU) against float64 autograd on full logits."""
import pytest
import torch

from kernels import fused_logprob_entropy, reference_logprob_entropy

pytest.importorskip("triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("N,H,V,T,chunk", [(37, 40, 101, 1.0, 1 << 24), (20, 32, 130, 0.6, 300), (3, 16, 7, 1.3, 10)])
def test_triton_matches_float64(N, H, V, T, chunk):
    """Odd V (vocab tiles past V masked), N not a multiple of the token block, H not of the H block."""
    g = torch.Generator().manual_seed(N)
    h = (torch.randn(N, H, generator=g) * 1.5).to(DEV)
    w = (torch.randn(V, H, generator=g) * 0.3).to(DEV)
    y = torch.randint(0, V, (N,), generator=g).to(DEV)
    y[0] = V - 1  # the last column, inside the masked tile
    g_lp, g_ent = torch.randn(N, generator=g).to(DEV), torch.randn(N, generator=g).to(DEV)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = fused_logprob_entropy(h1, w1, y, T, impl="triton", chunk_elems=chunk)
    h2, w2 = h.double().requires_grad_(), w.double().requires_grad_()
    lp_ref, ent_ref = reference_logprob_entropy(h2, w2, y, T)
    assert (lp.double() - lp_ref).abs().max() < 1e-5
    assert (ent.double() - ent_ref).abs().max() < 1e-5
    dh, dw = torch.autograd.grad((lp * g_lp + ent * g_ent).sum(), (h1, w1))
    dh_ref, dw_ref = torch.autograd.grad((lp_ref * g_lp.double() + ent_ref * g_ent.double()).sum(), (h2, w2))
    assert (dh.double() - dh_ref).norm() / dh_ref.norm() < 1e-4
    assert (dw.double() - dw_ref).norm() / dw_ref.norm() < 1e-4
    # one output's gradient alone
    h3 = h.clone().requires_grad_()
    lp3, _ = fused_logprob_entropy(h3, w, y, T, impl="triton")
    (dh3,) = torch.autograd.grad(lp3.sum(), h3)
    h4 = h.double().requires_grad_()
    (dh4,) = torch.autograd.grad(reference_logprob_entropy(h4, w.double(), y, T)[0].sum(), h4)
    assert (dh3.double() - dh4).norm() / dh4.norm() < 1e-4
