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


EPS32 = torch.finfo(torch.float32).eps


def logit_error_bound(h, w, T):
    """Worst-case fp32 rounding of z = h w^T / T over H products (Higham's gamma_H): H eps |h| |w| / T,
    with the largest row norms standing in for every |h_n| |w_v| (Cauchy-Schwarz)."""
    H = h.shape[1]
    return H * EPS32 * h.double().norm(dim=1).max().item() * w.double().norm(dim=1).max().item() / T


def check_against_float64(h, w, y, T, g_lp, g_ent, grad_tol, chunk=None):
    """Forward within the logit bound (logprob = z_y - lse moves by at most 2 max|dz|; the entropy,
    lse - E[z], by at most 2 max|dz| + max|dz| 2 max|z|), gradients within grad_tol in relative norm."""
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp, ent = fused_logprob_entropy(h1, w1, y, T, impl="triton", chunk_elems=chunk)
    h2, w2 = h.double().requires_grad_(), w.double().requires_grad_()
    lp_ref, ent_ref = reference_logprob_entropy(h2, w2, y, T)
    dzmax = logit_error_bound(h, w, T)
    zmax = (h.double() @ w.double().T).abs().max().item() / T
    assert (lp.double() - lp_ref).abs().max() <= 2 * dzmax
    assert (ent.double() - ent_ref).abs().max() <= dzmax * (2 + 2 * zmax)
    dh, dw = torch.autograd.grad((lp * g_lp + ent * g_ent).sum(), (h1, w1))
    dh_ref, dw_ref = torch.autograd.grad((lp_ref * g_lp.double() + ent_ref * g_ent.double()).sum(), (h2, w2))
    assert dh.dtype == h.dtype and dw.dtype == w.dtype
    assert (dh.double() - dh_ref).norm() / dh_ref.norm() < grad_tol
    assert (dw.double() - dw_ref).norm() / dw_ref.norm() < grad_tol


def make(N, H, V, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g) * 1.5).to(dtype).to(DEV)
    w = (torch.randn(V, H, generator=g) * 0.3).to(dtype).to(DEV)
    y = torch.randint(0, V, (N,), generator=g).to(DEV)
    y[0] = V - 1
    return h, w, y, torch.randn(N, generator=g).to(DEV), torch.randn(N, generator=g).to(DEV)


@pytest.mark.parametrize("splits,vocab_chunk", [(1, 8192), (3, 48), (5, 48)])
def test_vocab_splits_and_vocab_chunks(monkeypatch, splits, vocab_chunk):
    """The forward's vocabulary splits merged (5 splits of V = 130 at 64-column tiles: two have no
    columns), the backward's vocabulary chunks (48 columns: a ragged last chunk) with token chunks
    of 6 (chunk_elems 300): each against float64. Gradients: fp32 throughout, so the relative error
    is a few eps times the condition of the sums, far below 1e-4."""
    import kernels
    monkeypatch.setattr(kernels, "_vocab_splits", lambda n, device: splits)
    monkeypatch.setattr(kernels, "VOCAB_CHUNK", vocab_chunk)
    check_against_float64(*make(41, 40, 130, splits + vocab_chunk)[:3], 0.7,
                          *make(41, 40, 130, 7)[3:], grad_tol=1e-4, chunk=300)


def test_bf16_inputs():
    """bf16 h and W (fp32 arithmetic under the interpreter, as fp32 accumulation on a GPU): the
    forward within the fp32 bound of the same rounded inputs; gradients carry dz rounded to bf16 and
    the result rounded to bf16, each a relative 2^-8 at most: 2^-7 in all."""
    h, w, y, g_lp, g_ent = make(19, 32, 70, 11, torch.bfloat16)
    check_against_float64(h, w, y, 0.6, g_lp, g_ent, grad_tol=2 ** -7, chunk=200)


def test_one_gradient_at_a_time():
    """Only W, or only h, needs a gradient; only the entropy has an upstream gradient."""
    h, w, y, _, g_ent = make(23, 16, 90, 5)
    w1 = w.clone().requires_grad_()
    _, ent = fused_logprob_entropy(h, w1, y, 1.1, impl="triton", chunk_elems=100)
    (dw,) = torch.autograd.grad((ent * g_ent).sum(), w1)
    w2 = w.double().requires_grad_()
    (dw_ref,) = torch.autograd.grad((reference_logprob_entropy(h.double(), w2, y, 1.1)[1] * g_ent.double()).sum(), w2)
    assert (dw.double() - dw_ref).norm() / dw_ref.norm() < 1e-4


@pytest.mark.parametrize("transpose_a", [False, True])
def test_accumulating_matmul(transpose_a):
    """c += a @ b inside the kernel (a transposed view as the backward's dz^T): against float64 within
    the gamma_K bound K eps sum|a||b| per entry, plus one rounding of the sum into c."""
    import kernels
    g = torch.Generator().manual_seed(int(transpose_a))
    M, N, K = 45, 70, 37
    a = torch.randn(K, M, generator=g).T if transpose_a else torch.randn(M, K, generator=g)
    b, c = torch.randn(K, N, generator=g), torch.randn(M, N, generator=g)
    c0 = c.double()
    want = c0 + a.double() @ b.double()
    kernels._mm_acc(a, b, c)
    bound = (K + 1) * EPS32 * (c0.abs() + a.double().abs() @ b.double().abs())
    assert ((c.double() - want).abs() <= bound).all()


def test_triton_path_names_its_devices():
    """Every tensor the Triton path makes, forward and backward, names its device (tests/device_guard.py)."""
    from tests.device_guard import project_tensors_on_meta
    h, w, y, g_lp, _ = make(9, 16, 40, 2)
    h.requires_grad_(), w.requires_grad_()
    with project_tensors_on_meta() as guard:
        lp, ent = fused_logprob_entropy(h, w, y, 0.8, impl="triton", chunk_elems=100)
        (lp * g_lp).sum().backward()
    assert not guard.caught, guard.caught


def test_kept_logits_are_refused_on_the_triton_path():
    """keep= holds the torch path's logits; the Triton kernels never write them, so asking says so."""
    h, w, y, _, _ = make(4, 8, 10, 1)
    with pytest.raises(ValueError, match="keep is the torch path's"):
        fused_logprob_entropy(h, w, y, impl="triton", keep=torch.empty(40))
