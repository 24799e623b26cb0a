"""On a GPU only (bench/gpu_check.sh runs these): both kernel paths on CUDA, fp32 and bf16, against float64."""
import pytest
import torch

from kernels import fused_logprob_entropy, reference_logprob_entropy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype,fwd_tol,grad_tol", [(torch.float32, 1e-5, 1e-4), (torch.bfloat16, 1e-3, 2e-2)])
@pytest.mark.parametrize("N,H,V,T", [(1000, 256, 50257, 1.0), (333, 1536, 151936, 0.6)])
def test_cuda_against_float64(impl, dtype, fwd_tol, grad_tol, N, H, V, T):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = (torch.randn(N, H, device="cuda", generator=g) * 0.5).to(dtype)
    w = (torch.randn(V, H, device="cuda", generator=g) * 0.05).to(dtype)
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    g_lp, g_ent = torch.randn(N, device="cuda", generator=g), torch.randn(N, device="cuda", generator=g)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = fused_logprob_entropy(h1, w1, y, T, impl=impl)
    h2, w2 = h.double().requires_grad_(), w.double().requires_grad_()  # the same (rounded) inputs, exactly
    lp_ref, ent_ref = reference_logprob_entropy(h2, w2, y, T)
    assert (lp.double() - lp_ref).abs().max() < fwd_tol * max(1.0, lp_ref.abs().max().item())
    assert (ent.double() - ent_ref).abs().max() < fwd_tol * max(1.0, ent_ref.abs().max().item())
    dh, dw = torch.autograd.grad((lp * g_lp + ent * g_ent).sum(), (h1, w1))
    dh_ref, dw_ref = torch.autograd.grad((lp_ref * g_lp.double() + ent_ref * g_ent.double()).sum(), (h2, w2))
    assert (dh.double() - dh_ref).norm() / dh_ref.norm() < grad_tol
    assert (dw.double() - dw_ref).norm() / dw_ref.norm() < grad_tol
