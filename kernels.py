"""Fused log-prob and entropy from hidden states and the LM head, without materialising [N, V]
logits (unless the caller hands memory to keep them in: see `keep`).

    z = h W^T / T                 (per token, over the vocabulary)
    lse = log sum_v exp(z_v)
    logprob = z[label] - lse
    entropy = lse - sum_v softmax(z)_v z_v

Backward recomputes z tile by tile. With p = softmax(z) and upstream gradients g_lp, g_ent:

    dz = g_lp (onehot(label) - p) - g_ent p (z - (lse - entropy))
    dh = dz W / T,   dW = dz^T h / T          (accumulated in fp32)

Both implementations walk the logits in tiles (tokens x a slice of the vocabulary) with an online
softmax. `impl="torch"` does it with torch calls on tiles of at most `chunk_elems` logits (the CPU
path: a tile stays in cache; at 152K its forward is 2.3x, its backward 1.5x faster than on whole
rows of logits); `impl="triton"` runs the same algorithm as Triton kernels; `impl="auto"` takes
Triton on CUDA.
"""
from __future__ import annotations

import functools
import os

import torch

CHUNK_ELEMS = 1 << 19  # logits in one tile on a CPU: 2 MB in fp32, which stays in cache
CHUNK_ELEMS_CUDA = 1 << 27  # on a GPU: 512 MB in fp32
VOCAB_TILE = 1024  # vocabulary columns of one tile on the torch path
KEEP_ELEMS = 1 << 30  # on a CPU the trainer keeps up to this many logits (4 GB) for the backward


def _tiles(n: int, v: int, chunk_elems: int):
    """The [n, v] logits cut into tiles of at most chunk_elems entries, VOCAB_TILE columns wide ->
    (row ranges, column ranges)."""
    cols = max(1, min(v, VOCAB_TILE, chunk_elems))
    rows = max(1, chunk_elems // cols)
    return ([(s, min(n, s + rows)) for s in range(0, n, rows)],
            [(c, min(v, c + cols)) for c in range(0, v, cols)])


class _TorchFused(torch.autograd.Function):
    """Tile by tile, the vocabulary outside (its tile of W stays in cache), tokens inside. Forward:
    an online softmax, per token a running max m, S = sum e^(z - m) and D = sum e^(z - m) (z - m),
    rescaled when m grows; then lse = m + log S and entropy = log S - D / S. Backward takes each
    tile's z again (recomputed, or read from `keep`), turns it into dz and adds dz W to dh and
    dz^T h to dW."""
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_elems, keep):
        (n, device), v = (hidden.shape[0], hidden.device), weight.shape[0]
        hs, w = hidden.float() / temperature, weight.float()  # z = hs W^T
        kept = None if keep is None else keep[:n * v].view(n, v)
        m = torch.full((n,), -torch.inf, device=device)
        total, spread = torch.zeros(n, device=device), torch.zeros(n, device=device)
        rows, cols = _tiles(n, v, chunk_elems)
        buffers = torch.empty(3, chunk_elems, device=device)
        for c0, c1 in cols:
            for s, e in rows:
                tile = buffers[:, :(e - s) * (c1 - c0)].view(3, e - s, c1 - c0)
                z = torch.mm(hs[s:e], w[c0:c1].T, out=tile[0] if kept is None else kept[s:e, c0:c1])
                m_old = m[s:e]
                m_new = torch.maximum(m_old, z.amax(-1))
                scale = torch.exp(m_old - m_new)  # 0 on the first tile (m_old = -inf)
                shift = torch.where(total[s:e] > 0, m_old - m_new, 0.0)
                z = torch.sub(z, m_new[:, None], out=tile[1])
                p = torch.exp(z, out=tile[2])
                spread[s:e] = scale * (spread[s:e] + shift * total[s:e]) + torch.linalg.vecdot(p, z)
                total[s:e] = scale * total[s:e] + p.sum(-1)
                m[s:e] = m_new
        log_total = total.log()
        lse, ent = m + log_total, log_total - spread / total
        lp = (hs * w[labels]).sum(-1) - lse
        ctx.save_for_backward(hidden, weight, labels, lse, ent)
        ctx.temperature, ctx.chunk_elems, ctx.kept = temperature, chunk_elems, kept
        return lp, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        hidden, weight, labels, lse, ent = ctx.saved_tensors
        (n, device), v = (hidden.shape[0], hidden.device), weight.shape[0]
        hs, w = hidden.float() / ctx.temperature, weight.float()
        zeros = torch.zeros(n, device=device)
        g_lp = zeros if g_lp is None else g_lp.float()
        g_ent = zeros if g_ent is None else g_ent.float()
        # dL/dz = p (a + b log p) + g_lp onehot(label), with p = e^(z - lse),
        # a = -g_lp - g_ent entropy and b = -g_ent
        a, b = (-g_lp - g_ent * ent)[:, None], -g_ent[:, None]
        dhs = torch.zeros_like(hs) if ctx.needs_input_grad[0] else None
        dw = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        rows, cols = _tiles(n, v, ctx.chunk_elems)
        buffers = torch.empty(2, ctx.chunk_elems, device=device)
        for c0, c1 in cols:
            for s, e in rows:
                tile = buffers[:, :(e - s) * (c1 - c0)].view(2, e - s, c1 - c0)
                if ctx.kept is None:
                    logp = torch.mm(hs[s:e], w[c0:c1].T, out=tile[0]).sub_(lse[s:e, None])
                else:
                    logp = torch.sub(ctx.kept[s:e, c0:c1], lse[s:e, None], out=tile[0])
                dz = torch.exp(logp, out=tile[1])
                dz *= logp.mul_(b[s:e]).add_(a[s:e])
                if dhs is not None:
                    dhs[s:e].addmm_(dz, w[c0:c1])
                if dw is not None:
                    dw[c0:c1].addmm_(dz.T, hs[s:e])
        if dhs is not None:  # the g_lp onehot(label) part of dz
            dhs += g_lp[:, None] * w[labels]
        if dw is not None:
            dw.index_add_(0, labels, g_lp[:, None] * hs)
        dh = None if dhs is None else (dhs / ctx.temperature).to(hidden.dtype)
        return dh, None if dw is None else dw.to(weight.dtype), None, None, None, None


def fused_logprob_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          temperature: float = 1.0, impl: str = "auto",
                          chunk_elems: int | None = None, keep: torch.Tensor | None = None):
    """-> (logprob [N], entropy [N]) in fp32, differentiable in hidden [N, H] and weight [V, H].
    keep (torch path): fp32 memory of at least N * V entries that holds the logits from the forward
    to the backward, which then reads them instead of recomputing them (a quarter of the FLOPs);
    the caller leaves it alone until the backward has run, and may reuse it after."""
    if impl == "auto":
        impl = "triton" if hidden.is_cuda and _triton_ok() else "torch"
    cuda_elems = DZ_ELEMS_CUDA if impl == "triton" else CHUNK_ELEMS_CUDA
    chunk_elems = chunk_elems or (cuda_elems if hidden.is_cuda else CHUNK_ELEMS)
    if impl == "triton":
        if keep is not None:
            raise ValueError("keep is the torch path's: the Triton kernels recompute the logits")
        return _TritonFused.apply(hidden, weight, labels, float(temperature), chunk_elems)
    if impl != "torch":
        raise ValueError(f"impl must be auto, torch or triton, not {impl!r}")
    return _TorchFused.apply(hidden, weight, labels, float(temperature), chunk_elems, keep)


def _triton_ok() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except ImportError:
        return False


# ---- Triton ----------------------------------------------------------------------------------
# Forward: a grid of (token block, vocabulary split) programs; each walks its split of the
# vocabulary in BLOCK_V tiles, gets each tile's logits from tl.dot over BLOCK_H slices of the
# hidden size and folds them into running (max m, sum exp s, sum exp*z, label logit) in fp32 (an
# online softmax). The splits (more programs than token blocks when N is small) are merged after:
#     M = max_k m_k,  S = sum_k s_k e^(m_k - M),  lse = M + log S,
#     entropy = lse - sum_k sz_k e^(m_k - M) / S,  logprob = sum_k zy_k - lse.
# Nothing [N, V] is written.
# Backward, vocabulary chunks (VOCAB_CHUNK columns) outside, token chunks inside, three kernels:
#     dz = (g_lp (onehot - p) - g_ent p (z - E[z])) / T    z recomputed by a matmul whose epilogue
#                                                          makes dz (one write, in the matmul dtype)
#     dh[chunk] += dz W[vc]        (fp32 [N, H] accumulator, added to inside the matmul)
#     dW[vc]    += dz^T h[chunk]   (fp32 [VOCAB_CHUNK, H] accumulator, cast into dW per chunk)
# 8 N H V FLOPs in all (forward, recompute, dh, dW), all on tensor cores with fp32 accumulation;
# extra memory: dh in fp32 (4 N H bytes), one vocabulary chunk of dW in fp32, and a dz scratch of
# `chunk_elems` entries. Tile shapes are autotuned on a GPU at first use (keyed on the shapes, token
# counts rounded up to a power of two); the interpreter (CPU) gets one small configuration.

VOCAB_CHUNK = 8192    # dW rows accumulated in fp32 at once: 48 MB at H = 1536
DZ_ELEMS_CUDA = 1 << 25  # dz entries held at once on a GPU: 64 MB in bf16


def _chunks(n: int, v: int, chunk_elems: int):
    """Token ranges of at most chunk_elems // v tokens (the backward's dz scratch holds one)."""
    step = max(1, chunk_elems // max(v, 1))
    return [(s, min(n, s + step)) for s in range(0, n, step)]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _configs(names, options, one):
    """Autotune candidates: each tuple in `options` on a GPU; `one` alone under the interpreter
    (nothing to time on a CPU, and it keeps the tests fast)."""
    import triton
    return [triton.Config(dict(zip(names, r[:-2])), num_warps=r[-2], num_stages=r[-1])
            for r in ([one] if _interpreting() else options)]


def _fitting(configs, element_size: int, shared_limit: int):
    """The configurations whose operand tiles fit the shared memory per block:
        num_stages (BLOCK_M + BLOCK_N) BLOCK_K element_size <= shared_limit
    (the pipeline's buffers of both operand tiles; Triton allocates one stage fewer on sm_80 and
    for fp32 operands). The tiles are sized for 16-bit operands; fp32 ones skip the largest."""
    def shared(config):
        rows, cols, depth = config.kwargs.values()
        return config.num_stages * (rows + cols) * depth * element_size
    return [config for config in configs if shared(config) <= shared_limit]


def _prune(configs, named_args, **kwargs):
    """Autotune's early prune: the configurations that fit this GPU for these operands."""
    operand = next(iter(named_args.values()))
    limit = torch.cuda.get_device_properties(operand.device).shared_memory_per_block_optin
    return _fitting(configs, operand.element_size(), limit)


def _bucket(n: int) -> int:
    """Autotune key for a token count: the next power of two (one tuning per size class)."""
    return 1 << max(0, int(n) - 1).bit_length()


def _mm_configs():
    """Tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of the backward's matmuls."""
    return _configs(("BLOCK_M", "BLOCK_N", "BLOCK_K"),
                    [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3),
                     (128, 128, 32, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4)],
                    (32, 32, 16, 4, 1))


def _build_kernels():
    """-> (fwd_kernel, dz_kernel, mm_acc_kernel), each under its autotuner. The device functions
    they call are made here, as module globals (where the interpreter looks callees up)."""
    global _rows_dot_rows, _tile
    import triton
    import triton.language as tl

    @triton.jit
    def _rows_dot_rows(a_rows, b_rows, row_ok, col_ok, K, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
                       PRECISION: tl.constexpr):
        """acc[BLOCK_M, BLOCK_N] = a[rows, :K] b[cols, :K]^T in fp32, from pointers to the rows'
        starts (a_rows [BLOCK_M, 1], b_rows [BLOCK_N, 1]), BLOCK_K columns at a time."""
        # UPCAST: fp32 operands (the CPU interpreter has no bf16 arithmetic); on a GPU bf16/fp16
        # tiles go to the tensor cores as they are, fp32 tiles in full "ieee" precision
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            a = tl.load(a_rows + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_rows + kk[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(a, tl.trans(b), input_precision=PRECISION)
        return acc

    @triton.jit
    def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's tile of an [M, N] output -> (rows, cols, row_ok, col_ok); programs walk
        the tiles 8 row blocks at a time (L2 reuse)."""
        pid, n_n = tl.program_id(0), tl.cdiv(N, BLOCK_N)
        first = pid // (8 * n_n) * 8
        size = tl.minimum(tl.cdiv(M, BLOCK_M) - first, 8)
        pm, pn = first + (pid % (8 * n_n)) % size, (pid % (8 * n_n)) // size
        rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
        return rows, cols, rows < M, cols < N
    return (_build_forward(), *_build_backward())


def _build_forward():
    import triton
    import triton.language as tl

    @triton.autotune(configs=_configs(("BLOCK_N", "BLOCK_V", "BLOCK_H"),
                                      [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3),
                                       (128, 64, 64, 4, 4), (64, 256, 64, 8, 3),
                                       (128, 128, 128, 8, 3), (64, 128, 128, 4, 3)],
                                      (16, 64, 32, 4, 1)),
                     key=["N_KEY", "V", "H"], prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def fwd_kernel(h_ptr, w_ptr, y_ptr, part_ptr, N, V, H, inv_t, N_KEY,
                   BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """part[:, split, rows] = (m, s, sz, zy) of these tokens over this program's split."""
        pid, sid, n_split = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
        v_per = tl.cdiv(tl.cdiv(V, n_split), BLOCK_V) * BLOCK_V
        v_lo = sid * v_per
        v_hi = tl.minimum(V, v_lo + v_per)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        label = tl.load(y_ptr + rows, mask=row_ok, other=0)
        m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_N,), tl.float32)
        sz = tl.zeros((BLOCK_N,), tl.float32)
        zy = tl.zeros((BLOCK_N,), tl.float32)
        for v0 in range(v_lo, v_hi, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < v_hi
            acc = _rows_dot_rows(h_ptr + rows.to(tl.int64)[:, None] * H,
                                 w_ptr + cols.to(tl.int64)[:, None] * H, row_ok, col_ok, H,
                                 BLOCK_N, BLOCK_V, BLOCK_H, UPCAST, PRECISION)
            z = tl.where(col_ok[None, :], acc * inv_t, float("-inf"))  # columns past the split
            m_new = tl.maximum(m, tl.max(z, 1))                         # add nothing
            scale = tl.exp(m - m_new)
            e = tl.exp(z - m_new[:, None])
            s = s * scale + tl.sum(e, 1)
            sz = sz * scale + tl.sum(e * tl.where(col_ok[None, :], z, 0.0), 1)  # no 0 * -inf
            zy += tl.sum(tl.where(cols[None, :] == label[:, None], z, 0.0), 1)
            m = m_new
        out = part_ptr + sid * N + rows
        tl.store(out, m, mask=row_ok)
        tl.store(out + n_split * N, s, mask=row_ok)
        tl.store(out + 2 * n_split * N, sz, mask=row_ok)
        tl.store(out + 3 * n_split * N, zy, mask=row_ok)
    return fwd_kernel


def _build_backward():
    import triton
    import triton.language as tl

    @triton.autotune(configs=_mm_configs(), key=["M_KEY", "VC", "H"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def dz_kernel(h_ptr, w_ptr, dz_ptr, y_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, M, VC, H, v_off,
                  inv_t, M_KEY, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """dz[M, VC] = (g_lp (onehot - p) - g_ent p (z - E[z])) / T, z = h W^T / T, p = e^(z-lse)
        for tokens h[M, H] and vocabulary rows W[VC, H] (columns v_off...), E[z] = lse - ent."""
        rows, cols, row_ok, col_ok = _tile(M, VC, BLOCK_M, BLOCK_N)
        z = _rows_dot_rows(h_ptr + rows[:, None] * H, w_ptr + cols[:, None] * H, row_ok, col_ok, H,
                           BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION) * inv_t
        label = tl.load(y_ptr + rows, mask=row_ok, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        ez = lse - tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
        g_lp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
        g_ent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
        p = tl.exp(z - lse[:, None])
        dz = -p * (g_lp[:, None] + g_ent[:, None] * (z - ez[:, None]))
        dz += tl.where(cols[None, :] + v_off == label[:, None], g_lp[:, None], 0.0)
        tl.store(dz_ptr + rows[:, None] * VC + cols[None, :],
                 (dz * inv_t).to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.autotune(configs=_mm_configs(), key=["M_KEY", "N", "K_KEY", "A_COLS"],
                     restore_value=["c_ptr"], prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def mm_acc_kernel(a_ptr, b_ptr, c_ptr, M, N, K, s_am, s_ak, s_bk, s_bn, M_KEY, K_KEY, A_COLS,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """c[M, N] += a[M, K] b[K, N], added inside the matmul into a contiguous fp32 c; a and b by
        strides (a transposed view is a stride swap). A_COLS, a's layout, is a tuning key only."""
        rows, cols, row_ok, col_ok = _tile(M, N, BLOCK_M, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + rows[:, None] * s_am + kk[None, :] * s_ak,
                        mask=row_ok[:, None] & (kk < K)[None, :], other=0.0)
            b = tl.load(b_ptr + kk[:, None] * s_bk + cols[None, :] * s_bn,
                        mask=(kk < K)[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc += tl.dot(a, b, input_precision=PRECISION)
        c = c_ptr + rows[:, None] * N + cols[None, :]
        ok = row_ok[:, None] & col_ok[None, :]
        tl.store(c, tl.load(c, mask=ok, other=0.0) + acc, mask=ok)
    return dz_kernel, mm_acc_kernel


_kernels = functools.cache(_build_kernels)  # built once, at first use


def _vocab_splits(n: int, device: torch.device) -> int:
    """Forward programs per token block: enough (token block, split) programs to fill the GPU
    twice over at 128 tokens a block; 1 on a CPU."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(16, 2 * sms * 128 // max(n, 1)))


def _mode(t: torch.Tensor) -> dict:
    """Kernel flags: UPCAST (the interpreter computes in fp32) and PRECISION of tl.dot."""
    return dict(UPCAST=_interpreting(), PRECISION="ieee" if t.dtype == torch.float32 else "tf32")


def _grid2d(m: int, n: int):
    """Launch grid of a tiled [m, n] output: one program per (BLOCK_M, BLOCK_N) tile."""
    import triton
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)


def _mm_acc(a, b, c):
    """c += a @ b inside one kernel; c fp32 contiguous, a and b any strides."""
    (M, K), N = a.shape, b.shape[1]
    _kernels()[2][_grid2d(M, N)](a, b, c, M, N, K, *a.stride(), *b.stride(), _bucket(M), _bucket(K),
                                 int(a.stride(0) == 1), **_mode(a))


class _TritonFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk_elems):
        import triton
        h, w, y = hidden.contiguous(), weight.to(hidden.dtype).contiguous(), labels.contiguous()
        (n, hdim), v = h.shape, w.shape[0]
        splits = _vocab_splits(n, h.device)
        part = torch.empty(4, splits, n, device=h.device, dtype=torch.float32)
        _kernels()[0][lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)](
            h, w, y, part, n, v, hdim, 1.0 / temperature, _bucket(n), **_mode(h))
        m, s, sz, zy = part.unbind(0)
        big = m.amax(0)
        scale = torch.exp(m - big)  # a split with no columns: m = -inf, weight 0
        tot = (s * scale).sum(0)
        lse = big + tot.log()
        ent = lse - (sz * scale).sum(0) / tot
        ctx.save_for_backward(h, w, y, lse, ent)
        ctx.temperature, ctx.chunk_elems, ctx.w_dtype = temperature, chunk_elems, weight.dtype
        return zy.sum(0) - lse, ent

    @staticmethod
    def backward(ctx, g_lp, g_ent):
        h, w, y, lse, ent = ctx.saved_tensors
        (n, hdim), v = h.shape, w.shape[0]
        z0 = torch.zeros(n, device=h.device, dtype=torch.float32)
        g_lp, g_ent = (z0 if g is None else g.float().contiguous() for g in (g_lp, g_ent))
        dh = torch.zeros_like(h, dtype=torch.float32) if ctx.needs_input_grad[0] else None
        dw = torch.empty_like(w, dtype=ctx.w_dtype) if ctx.needs_input_grad[1] else None
        vc = max(1, min(v, VOCAB_CHUNK, ctx.chunk_elems))
        c = max(1, min(n, ctx.chunk_elems // vc))
        scratch = torch.empty(c * vc, device=h.device, dtype=h.dtype)
        for v0 in range(0, v, vc):
            wv = w[v0:v0 + vc]
            dwv = None if dw is None else torch.zeros_like(wv, dtype=torch.float32)
            for s, e in _chunks(n, vc, ctx.chunk_elems):
                dz = scratch[:(e - s) * len(wv)].view(e - s, len(wv))
                _kernels()[1][_grid2d(*dz.shape)](
                    h[s:e], wv, dz, y[s:e], lse[s:e], ent[s:e], g_lp[s:e], g_ent[s:e], *dz.shape,
                    hdim, v0, 1.0 / ctx.temperature, _bucket(e - s), **_mode(h))
                if dh is not None:
                    _mm_acc(dz, wv, dh[s:e])
                if dwv is not None:
                    _mm_acc(dz.T, h[s:e], dwv)
            if dw is not None:
                dw[v0:v0 + vc] = dwv
        return (None if dh is None else dh.to(h.dtype), dw, None, None, None)


def reference_logprob_entropy(hidden, weight, labels, temperature=1.0):
    """Full logits, log_softmax, autograd: the naive reference and the benchmark baseline."""
    logp = torch.log_softmax((hidden.float() @ weight.float().T) / temperature, -1)
    return logp.gather(-1, labels[:, None])[:, 0], -(logp.exp() * logp).sum(-1)
