"""Fused log-prob and entropy from hidden states and the LM head, without materialising [N, V] logits.

    z = h W^T / T                 (per token, over the vocabulary)
    lse = log sum_v exp(z_v)
    logprob = z[label] - lse
    entropy = lse - sum_v softmax(z)_v z_v

Backward recomputes z block by block. With p = softmax(z) and upstream gradients g_lp, g_ent:

    dz = g_lp (onehot(label) - p) - g_ent p (z - (lse - entropy))
    dh = dz W / T,   dW = dz^T h / T          (accumulated in fp32)

`impl="torch"` processes chunks of tokens so at most `chunk_elems` logits exist at once (the CPU path and
the reference); `impl="triton"` runs the same algorithm as Triton kernels with an online softmax over
vocabulary tiles; `impl="auto"` takes Triton on CUDA.
"""
from __future__ import annotations

import torch

CHUNK_ELEMS = 1 << 24  # logits held at once by the torch path: 64 MB in fp32


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
        dh = torch.empty(hidden.shape, device=hidden.device, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if ctx.needs_input_grad[1] else None
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
        return (None if dh is None else dh.to(hidden.dtype), None if dw is None else dw.to(weight.dtype),
                None, None, None)


def fused_logprob_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          temperature: float = 1.0, impl: str = "auto", chunk_elems: int = CHUNK_ELEMS):
    """-> (logprob [N], entropy [N]) in fp32, differentiable in hidden [N, H] and weight [V, H]."""
    if impl == "auto":
        impl = "triton" if hidden.is_cuda and _triton_ok() else "torch"
    if impl == "torch":
        return _TorchFused.apply(hidden, weight, labels, float(temperature), chunk_elems)
    if impl == "triton":
        return _triton_logprob_entropy(hidden, weight, labels, float(temperature))
    raise ValueError(f"impl must be auto, torch or triton, not {impl!r}")


def _triton_ok() -> bool:
    return False  # flips to a real check when the Triton kernels land (see _triton_logprob_entropy)


def _triton_logprob_entropy(hidden, weight, labels, temperature):
    raise NotImplementedError("the Triton kernels are not written yet: use impl='torch'")


def reference_logprob_entropy(hidden, weight, labels, temperature=1.0):
    """The naive version: full logits, log_softmax, autograd. The slow reference and the benchmark baseline."""
    z = (hidden.float() @ weight.float().T) / temperature
    logp = torch.log_softmax(z, -1)
    return logp.gather(-1, labels[:, None])[:, 0], -(logp.exp() * logp).sum(-1)
