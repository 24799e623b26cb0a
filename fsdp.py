"""Fully sharded data parallel, by hand, on torch.distributed.

Units: one per transformer block, plus a root unit for the rest (embedding, final norm, LM
head). Each unit's parameters are flattened into one fp32 vector, padded to a multiple of the
world size W, and rank r keeps only slice r: `module.parameters()` then yields exactly these
shards, so a stock AdamW steps sharded state, and every rank holds 1/W of the parameters,
gradients and optimizer state.

    unit     | at rest           | forward                         | backward
    ---------+-------------------+---------------------------------+--------------------------------
    block i  | shard (P/W, fp32) | all-gather full (param_dtype),  | all-gather again, compute,
             |                   | compute, free                   | reduce-scatter grad (mean,
             |                   |                                 | reduce_dtype) into shard, free
    root     | shard, and the    | all-gather once per update (the | reduce-scatter grad into shard,
             | full copy kept    | copy is kept: every pass of a   | full copy kept
             | gathered          | step and the engine's use it)   |

The module's own parameters become views into a unit's gathered buffer `full`; freeing the buffer
frees its storage (views and autograd keep their metadata) and gathering writes it back, so the
autograd graph of a forward stays valid through a free and re-gather. Gradients of all views land
in `full.grad`; a post-accumulate-grad hook on `full` reduce-scatters them once per backward.
Gradient accumulation over micro-batches adds the reduce-scattered pieces into the shard's .grad.
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn


# ---- processes -------------------------------------------------------------------------------
# One device per process, chosen once: CUDA (device LOCAL_RANK) under NCCL, or the CPU under gloo.
# Every collective in this project takes tensors on comm_device(), the one place that knows which.

def exit_once(message: str):
    """Bad input: the line on rank 0 only (every rank finds the same), exit status 1 on every rank.
    The other ranks wait a moment first: torchrun stops all ranks once one has exited, which could
    otherwise stop rank 0 before it has said why."""
    if int(os.environ.get("RANK", "0")):
        time.sleep(2)
        sys.exit(1)
    sys.exit(message)


def setup_dist(device: str = "auto") -> tuple[int, int, torch.device]:
    """Join the torchrun job (if any) -> (rank, world, compute device); device: auto|cuda|cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            exit_once("[fastcurl] --device cuda: this torch sees no CUDA GPU (pass --device cpu)")
        procs, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
        if procs > gpus:
            exit_once(f"[fastcurl] {procs} processes on this machine but {gpus} GPU(s): use "
                     f"--nproc_per_node {gpus} or less, or pass --device cpu to run "
                     f"{procs} CPU ranks")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return (*_rank_world(), dev)


def comm_device() -> torch.device:
    """Where a collective's tensors live: the current GPU under NCCL, else the CPU (gloo)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier():
    if dist.is_initialized():
        dist.barrier()


def close_dist(engine=None):
    """Leave torch.distributed cleanly; a vLLM engine ends its own groups (and the world) itself."""
    barrier()
    if dist.is_initialized() and getattr(engine, "name", "") != "vllm":
        dist.destroy_process_group()


def finish(code: int = 0):
    """End a script. Under torchrun the process ends at once (os._exit) after flushing its output:
    gloo's worker threads free a finished collective's tensors a moment after it returns, and when
    that lands in the interpreter's shutdown the process aborts (std::terminate, exit -6: about 1 in
    7 runs of the 2-rank FSDP test). Checkpoints, metrics and logs are all written and closed before
    this point."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


# ---- sharding ----------------------------------------------------------------------------------

# torch >= 2.13 renames the flat collectives; older ones only have the first names
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# gloo's all-gather and reduce-scatter are slower than its all-reduce of the whole vector (2 CPU
# ranks, 156 MB: all-reduce 0.105 s, reduce-scatter 0.231 s, all-gather 0.190 s), so on gloo both
# are an all-reduce: of the gathered vector with zeros beside this rank's piece, of the gradient
def _gather_flat(full: torch.Tensor, piece: torch.Tensor):
    """full <- every rank's piece, in rank order (full: W pieces)."""
    if dist.get_backend() != "gloo":
        return _all_gather_single(full, piece)
    rank, world = _rank_world()
    full.zero_()
    full.chunk(world)[rank].copy_(piece)
    dist.all_reduce(full)


def _scatter_flat(piece: torch.Tensor, full: torch.Tensor):
    """piece <- this rank's piece of the sum over ranks of full (full may be overwritten)."""
    if dist.get_backend() != "gloo":
        return _reduce_scatter_single(piece, full, op=dist.ReduceOp.SUM)
    rank, world = _rank_world()
    dist.all_reduce(full)
    piece.copy_(full.chunk(world)[rank])


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


class Unit:
    """One flat-sharded group of parameters (one block, or the root's leftovers), gathered around
    its owner's forward; with `reshard` freed after it, else kept until the backward."""

    def __init__(self, owner: nn.Module, params: list, param_dtype, reduce_dtype, reshard: bool):
        # params: [(name in the full model, tensor, homes [(module, attr), ...], several if tied)]
        rank, self.W = _rank_world()
        self.reduce_dtype, self.reshard = reduce_dtype, reshard
        self.entries, off = [], 0
        for name, p, homes in params:
            self.entries.append((name, off, p.shape, homes))
            off += p.numel()
            for mod, attr in homes:
                del mod._parameters[attr]
        self.padded = math.ceil(off / self.W) * self.W
        flat = torch.zeros(self.padded, dtype=torch.float32, device=params[0][1].device)
        torch.cat([p.detach().reshape(-1).float() for _, p, _ in params], out=flat[:off])
        self.shard = nn.Parameter(flat.chunk(self.W)[rank].clone())
        self.full = torch.zeros(self.padded, dtype=param_dtype or torch.float32, device=flat.device,
                                requires_grad=True)
        self.full.register_post_accumulate_grad_hook(self._reduce_grad)
        self.in_backward = False
        self._set_views()
        self._free()
        owner.register_parameter("flat_shard", self.shard)
        owner.register_forward_pre_hook(self.pre_forward)
        owner.register_forward_hook(self.post_forward)

    def gathered(self) -> bool:
        return self.full.untyped_storage().size() > 0

    def _free(self):
        self.full.untyped_storage().resize_(0)
        self.gathered_from = None

    def _shard_version(self) -> tuple[int, int]:
        """Changes whenever the shard's values may have (an optimizer step, a load: in place)."""
        return self.shard._version, self.shard.data_ptr()

    def gather(self):
        """All-gather the flat parameter into `full`.data (autograd's version stays as it was),
        unless it holds the shard's current values already: the root, kept gathered, is gathered
        once per update for every pass of a step (old log-probs, forwards, the engine's copy), a
        frozen reference's root once per stage."""
        if self.gathered() and self.gathered_from == self._shard_version():
            return
        if not self.gathered():
            self.full.untyped_storage().resize_(self.padded * self.full.element_size())
        self._gather_into(self.full.data)
        self.gathered_from = self._shard_version()

    def _gather_into(self, buf: torch.Tensor):
        """buf <- every rank's shard, in buf's dtype."""
        src = self.shard.detach().to(buf.dtype)
        if self.W == 1:
            buf.copy_(src)
        else:
            _gather_flat(buf, src)

    def _set_views(self):
        """Set each attribute to its piece of `full` (views made in grad mode, for autograd). One
        split for all: its backward writes the pieces' gradients into one buffer of full's size,
        where a slice per parameter would each fill one of its own with zeros, then sum them."""
        sizes = [math.prod(shape) for _, _, shape, _ in self.entries]
        pieces = torch.split(self.full, sizes + [self.padded - sum(sizes)])
        for (_, _, shape, homes), piece in zip(self.entries, pieces):
            for mod, attr in homes:
                setattr(mod, attr, piece.view(shape))

    def pre_forward(self, module, args):
        if not self.in_backward:  # a recompute in the backward (activation checkpointing) has them
            self.gather()
            self._set_views()

    def post_forward(self, module, args, output):
        if self.in_backward:
            return output
        if torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._pre_backward)
        if self.reshard:
            self._free()  # gathered again for the backward, if one comes
        return output

    def _pre_backward(self, grad):
        if not self.in_backward:
            self.in_backward = True
            if not self.gathered():
                self.gather()
        return grad

    def _reduce_grad(self, full):
        """full.grad -> mean over ranks (reduce_dtype) -> this rank's slice, added to shard.grad."""
        piece = g = full.grad.to(self.reduce_dtype)
        full.grad = None
        if self.W > 1:
            piece = torch.empty(self.shard.numel(), dtype=self.reduce_dtype, device=g.device)
            _scatter_flat(piece, g)
            piece /= self.W
        piece = piece.to(self.shard.dtype)
        self.shard.grad = piece if self.shard.grad is None else self.shard.grad + piece
        self.in_backward = False
        if self.reshard:
            self._free()

    def full_tensors(self, compute: bool = False):
        """(name, tensor) of each parameter of the unit, gathered from all ranks: fp32 (not
        kept), or with compute in the compute dtype, gathered as for a forward."""
        if compute:
            self.gather()
            buf = self.full.detach()
        else:
            buf = torch.empty(self.padded, dtype=torch.float32, device=self.shard.device)
            self._gather_into(buf)
        for name, o, shape, _ in self.entries:
            yield name, buf[o:o + math.prod(shape)].view(shape)
        if compute and self.reshard:
            self._free()


def shard(module: nn.Module, param_dtype=None, reduce_dtype=torch.float32) -> nn.Module:
    """Shard a model.Transformer in place (one unit per block + the root) and return it."""
    names = {}  # id -> (name, tensor, homes): a tied parameter once, under its first name
    for name, p in module.named_parameters(remove_duplicate=False):
        path, _, attr = name.rpartition(".")
        names.setdefault(id(p), (name, p, []))[2].append((module.get_submodule(path), attr))
    blocks = [Unit(block, [names.pop(id(p)) for p in block.parameters()], param_dtype,
                   reduce_dtype, reshard=True) for block in module.model.layers]
    root = Unit(module, list(names.values()), param_dtype, reduce_dtype, reshard=False)
    module._fsdp_units = blocks + [root]
    return module


def weights_changed(module: nn.Module):
    """After an optimizer step: every unit gathers anew before its next use (a fused optimizer
    changes the shards without the version bump gather() also looks at)."""
    for u in getattr(module, "_fsdp_units", ()):
        u.gathered_from = None


def is_sharded(module) -> bool:
    """Sharded by shard() or by torch_fully_shard()."""
    return hasattr(module, "_fsdp_units") or getattr(module, "_fsdp2", False)


def clip_grad_norm_(module: nn.Module, max_norm: float) -> torch.Tensor:
    """Scale every shard's gradient so that the global L2 norm (all ranks) is at most max_norm."""
    if getattr(module, "_fsdp2", False):
        n = torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm)
        return n.full_tensor() if hasattr(n, "full_tensor") else n
    units = module._fsdp_units
    grads = [u.shard.grad for u in units if u.shard.grad is not None]
    sq = torch.zeros((), dtype=torch.float32, device=units[0].shard.device)
    for grad in grads:
        sq += grad.float().pow(2).sum()
    if units[0].W > 1:
        dist.all_reduce(sq)
    total = sq.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(coef)
    return total


def full_state_dict(module: nn.Module, compute: bool = False):
    """Yield (name, full fp32 tensor) unit by unit, names as in the unsharded model's state_dict (a
    tied head under both names), so the whole model is never held twice. compute: in the compute
    dtype instead, for an inference copy (the root then stays gathered for the next forward).
    Every rank must iterate it (collectives)."""
    if getattr(module, "_fsdp2", False):
        for name, t in module.state_dict().items():
            yield name, t.full_tensor() if hasattr(t, "full_tensor") else t
        return
    for u in module._fsdp_units:
        for name, t in u.full_tensors(compute):
            yield name, t
            if (name == "model.embed_tokens.weight"
                    and getattr(module.config, "tie_word_embeddings", False)):
                yield "lm_head.weight", t


def local_bytes(module: nn.Module, opt: torch.optim.Optimizer | None = None) -> dict:
    """Bytes this rank holds in parameters, gradients, optimizer state (a DTensor's local part)."""
    def nbytes(t):
        return (t.to_local() if hasattr(t, "to_local") else t).nbytes
    ps = list(module.parameters())
    out = {"params": sum(nbytes(p) for p in ps),
           "grads": sum(nbytes(p.grad) for p in ps if p.grad is not None)}
    if opt is not None:
        out["optimizer"] = sum(nbytes(v) for st in opt.state.values() for v in st.values()
                               if isinstance(v, torch.Tensor) and v.dim() > 0)
    return out


def torch_fully_shard(module: nn.Module, param_dtype=None, reduce_dtype=torch.float32):
    """The same units with torch's FSDP2 `fully_shard`: for comparison, or for those who like it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():  # one process without torchrun: a group of one, in memory
        cuda = next(module.parameters()).is_cuda
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for blk in module.model.layers:
        fully_shard(blk, mp_policy=mp)
    fully_shard(module, mp_policy=mp, reshard_after_forward=False)
    module._fsdp2 = True
    return module
