"""Fused log-prob and entropy from hidden states and the LM head, without materialising
[N, V] logits.

    z = h W^T / T                 (per token, over the vocabulary)
    lse = log sum_v exp(z_v)
    logprob = z[label] - lse
    entropy = lse - sum_v softmax(z)_v z_v

Backward recomputes z block by block. With p = softmax(z) and upstream gradients g_lp, g_ent:

    dz = g_lp (onehot(label) - p) - g_ent p (z - (lse - entropy))
    dh = dz W / T,   dW = dz^T h / T          (accumulated in fp32)

`impl="torch"` processes chunks of tokens so at most `chunk_elems` logits exist at once (the CPU
path and the reference); `impl="triton"` runs the same algorithm as Triton kernels with an online
softmax over vocabulary tiles; `impl="auto"` takes Triton on CUDA.
"""
from __future__ import annotations

import torch

CHUNK_ELEMS = 1 << 24  # logits held at once on a CPU: 64 MB in fp32
CHUNK_ELEMS_CUDA = 1 << 27  # on a GPU: 512 MB in fp32, chunks of about 880 tokens at a 152K
                            # vocabulary


def _chunks(n: int, v: int, chunk_elems: int):
    step = max(1, chunk_elems // max(v, 1))
    return [(s, min(n, s + step)) for s in range(0, n, step)]


class _TorchFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_elems):
        n, v = hidden.shape[0], weight.shape[0]
        w = weight.float()
        lp = torch.empty(n, device=hidden.device, dtype=torch.float32)
        ent = torch.empty_like(lp)
        lse = torch.empty_like(lp)
        for s, e in _chunks(n, v, chunk_elems):
            z = hidden[s:e].float() @ w.T
            z /= temperature
            m = torch.logsumexp(z, -1)
            lse[s:e] = m
            lp[s:e] = z.gather(-1, labels[s:e, None])[:, 0] - m
            z -= m[:, None]                       # z - lse = log p
            ent[s:e] = -(z.exp() * z).sum(-1)     # -sum p log p = lse - sum p z
        ctx.save_for_backward(hidden, weight, labels, lse, ent)
        ctx.temperature, ctx.chunk_elems = temperature, chunk_elems
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, labels, lse, ent = ctx.saved_tensors
        T = ctx.temperature
        n, v = hidden.shape[0], weight.shape[0]
        w = weight.float()
        g_lp = torch.zeros(n, device=hidden.device) if g_lp is None else g_lp.float()
        g_ent = torch.zeros(n, device=hidden.device) if g_ent is None else g_ent.float()
        dh = (torch.empty(hidden.shape, device=hidden.device, dtype=torch.float32)
              if ctx.needs_input_grad[0] else None)
        dw = (torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
              if ctx.needs_input_grad[1] else None)
        for s, e in _chunks(n, v, ctx.chunk_elems):
            h = hidden[s:e].float()
            z = h @ w.T
            z /= T
            p = (z - lse[s:e, None]).exp()
            # dz = -g_lp p - g_ent p (z - E[z]) + g_lp onehot, with E[z] = lse - entropy
            z -= (lse[s:e] - ent[s:e])[:, None]
            z *= g_ent[s:e, None]
            z += g_lp[s:e, None]
            dz = p.mul_(z).neg_()
            dz[torch.arange(e - s, device=dz.device), labels[s:e]] += g_lp[s:e]
            dz /= T
            if dh is not None:
                dh[s:e] = dz @ w
            if dw is not None:
                dw.addmm_(dz.T, h)
        return (None if dh is None else dh.to(hidden.dtype),
                None if dw is None else dw.to(weight.dtype),
                None, None, None)


def fused_logprob_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          temperature: float = 1.0, impl: str = "auto",
                          chunk_elems: int | None = None):
    """-> (logprob [N], entropy [N]) in fp32, differentiable in hidden [N, H] and weight [V, H]."""
    chunk_elems = chunk_elems or (CHUNK_ELEMS_CUDA if hidden.is_cuda else CHUNK_ELEMS)
    if impl == "auto":
        impl = "triton" if hidden.is_cuda and _triton_ok() else "torch"
    if impl == "torch":
        return _TorchFused.apply(hidden, weight, labels, float(temperature), chunk_elems)
    if impl == "triton":
        return _triton_logprob_entropy(hidden, weight, labels, float(temperature), chunk_elems)
    raise ValueError(f"impl must be auto, torch or triton, not {impl!r}")


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


# ---- Triton ----------------------------------------------------------------------------------
# Forward: one program per BLOCK_N tokens walks the vocabulary in BLOCK_V tiles; each tile's logits
# come from tl.dot over BLOCK_H slices of the hidden size and are folded into running (max, sum exp,
# sum exp*z) in fp32 (online softmax), the label's logit picked up in the same pass. Nothing [N, V]
# is written.
# Backward: token chunks; per chunk z = h W^T / T by the matmul library into a [C, V] scratch
# buffer, one Triton pass turns it into dz in place, then dh = dz W / T and dW += dz^T h / T (two
# more matmuls): about 8 N H V FLOPs in all with the recompute, and C x V extra memory instead of
# N x V.

_KERNELS = None


def _build_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def fwd_kernel(h_ptr, w_ptr, y_ptr, lp_ptr, ent_ptr, lse_ptr, N, V, H, inv_t,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        # UPCAST: fp32 operands (the CPU interpreter has no bf16 arithmetic); on a GPU bf16/fp16
        # tiles go to the tensor cores as they are, fp32 tiles in full "ieee" precision, always
        # accumulating in fp32
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        label = tl.load(y_ptr + rows, mask=row_ok, other=0)
        m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_N,), tl.float32)
        sz = tl.zeros((BLOCK_N,), tl.float32)
        zy = tl.zeros((BLOCK_N,), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
            for h0 in range(0, H, BLOCK_H):
                hk = h0 + tl.arange(0, BLOCK_H)
                hk_ok = hk < H
                a = tl.load(h_ptr + rows[:, None] * H + hk[None, :],
                            mask=row_ok[:, None] & hk_ok[None, :], other=0.0)
                b = tl.load(w_ptr + cols[:, None] * H + hk[None, :],
                            mask=col_ok[:, None] & hk_ok[None, :], other=0.0)
                if UPCAST:
                    a, b = a.to(tl.float32), b.to(tl.float32)
                acc += tl.dot(a, tl.trans(b), input_precision=PRECISION)
            z = tl.where(col_ok[None, :], acc * inv_t, float("-inf"))  # columns past V add nothing
            m_new = tl.maximum(m, tl.max(z, 1))
            scale = tl.exp(m - m_new)
            e = tl.exp(z - m_new[:, None])
            s = s * scale + tl.sum(e, 1)
            sz = sz * scale + tl.sum(e * tl.where(col_ok[None, :], z, 0.0), 1)  # no 0 * -inf
            zy += tl.sum(tl.where(cols[None, :] == label[:, None], z, 0.0), 1)
            m = m_new
        lse = m + tl.log(s)
        tl.store(lp_ptr + rows, zy - lse, mask=row_ok)
        tl.store(ent_ptr + rows, lse - sz / s, mask=row_ok)
        tl.store(lse_ptr + rows, lse, mask=row_ok)

    @triton.jit
    def dz_kernel(z_ptr, y_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, V, inv_t,
                  BLOCK_V: tl.constexpr):
        """In place, one row per program: z -> dz = (g_lp (onehot - p) - g_ent p (z - E[z])) / T."""
        row = tl.program_id(0)
        label = tl.load(y_ptr + row)
        lse = tl.load(lse_ptr + row)
        ez = lse - tl.load(ent_ptr + row)
        g_lp = tl.load(glp_ptr + row)
        g_ent = tl.load(gent_ptr + row)
        base = z_ptr + row.to(tl.int64) * V
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            ok = cols < V
            z = tl.load(base + cols, mask=ok, other=0.0).to(tl.float32)
            p = tl.exp(z - lse)
            dz = -g_lp * p - g_ent * p * (z - ez) + tl.where(cols == label, g_lp, 0.0)
            tl.store(base + cols, (dz * inv_t).to(z_ptr.dtype.element_ty), mask=ok)

    return fwd_kernel, dz_kernel


class _TritonFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_elems):
        import triton

        global _KERNELS
        _KERNELS = _KERNELS or _build_kernels()
        fwd, _ = _KERNELS
        h, w = hidden.contiguous(), weight.to(hidden.dtype).contiguous()
        n, hdim = h.shape
        v = w.shape[0]
        lp = torch.empty(n, device=h.device, dtype=torch.float32)
        ent, lse = torch.empty_like(lp), torch.empty_like(lp)
        BLOCK_N, BLOCK_V, BLOCK_H = (64, 128, 64) if h.is_cuda else (16, 64, 32)
        fwd[(triton.cdiv(n, BLOCK_N),)](h, w, labels.contiguous(), lp, ent, lse, n, v, hdim,
                                        1.0 / temperature,
                                        BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, BLOCK_H=BLOCK_H,
                                        UPCAST=not h.is_cuda,
                                        PRECISION="ieee" if h.dtype == torch.float32 else "tf32")
        ctx.save_for_backward(h, w, labels, lse, ent)
        ctx.temperature, ctx.chunk_elems, ctx.w_dtype = temperature, chunk_elems, weight.dtype
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        _, dz_kernel = _KERNELS
        h, w, labels, lse, ent = ctx.saved_tensors
        n, v = h.shape[0], w.shape[0]
        g_lp = torch.zeros(n, device=h.device) if g_lp is None else g_lp.float().contiguous()
        g_ent = torch.zeros(n, device=h.device) if g_ent is None else g_ent.float().contiguous()
        # the matmuls run in the input dtype (bf16 tensor cores on GPU) and accumulate in fp32
        mm_dtype = h.dtype if h.is_cuda else torch.float32
        wm = w.to(mm_dtype)
        dh = (torch.empty(h.shape, device=h.device, dtype=torch.float32)
              if ctx.needs_input_grad[0] else None)
        dw = (torch.zeros(w.shape, device=w.device, dtype=torch.float32)
              if ctx.needs_input_grad[1] else None)
        for s, e in _chunks(n, v, ctx.chunk_elems):
            hc = h[s:e].to(mm_dtype)
            z = _mm_f32(hc, wm.T)  # fp32 logits: bf16-rounded ones would put 10% errors into p
            z /= ctx.temperature
            dz_kernel[(e - s,)](z, labels[s:e].contiguous(), lse[s:e].contiguous(),
                                ent[s:e].contiguous(),
                                g_lp[s:e].contiguous(), g_ent[s:e].contiguous(), v,
                                1.0 / ctx.temperature,
                                BLOCK_V=1024 if h.is_cuda else 256)
            dz = z.to(mm_dtype)
            if dh is not None:
                dh[s:e] = (dz @ wm).float()
            if dw is not None:
                dw += (dz.T @ hc).float()
        return (None if dh is None else dh.to(h.dtype),
                None if dw is None else dw.to(ctx.w_dtype),
                None, None, None)


def _mm_f32(a, b):
    """a @ b with an fp32 result: bf16/fp16 inputs on tensor cores with fp32 output where torch
    offers it."""
    if a.dtype != torch.float32 and a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    return a.float() @ b.float()


def _triton_logprob_entropy(hidden, weight, labels, temperature, chunk_elems):
    return _TritonFused.apply(hidden, weight, labels, temperature, chunk_elems)


def reference_logprob_entropy(hidden, weight, labels, temperature=1.0):
    """The naive version: full logits, log_softmax, autograd. The slow reference and the benchmark
    baseline."""
    z = (hidden.float() @ weight.float().T) / temperature
    logp = torch.log_softmax(z, -1)
    return logp.gather(-1, labels[:, None])[:, 0], -(logp.exp() * logp).sum(-1)
