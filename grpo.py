"""FastCuRL with GRPO: the entry point, the GRPO math, the trainer step, checkpoints.

    python grpo.py --stage 1                                  # the embedded toy, one process
    torchrun --nproc_per_node 2 grpo.py --stage 1             # the same, two data-parallel ranks
    torchrun --nproc_per_node 8 grpo.py --recipe fastcurl-1.5b --stage 2 --model CKPT --data deepscaler.json

GRPO, per prompt group of n samples with rewards r_1..r_n:
    A_i = (r_i - mean(r)) / (std(r) + eps)                              (group-normalised advantage)
    ratio_t = exp(logp_t - old_logp_t)
    loss_t = -min(ratio_t A, clip(ratio_t, 1 - clip_low, 1 + clip_high) A)
             + kl_coef (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)     (k3 estimator of KL(pi || ref))
             - entropy_coef H_t
aggregated over response tokens by token-mean, seq-mean or Dr.GRPO's sum / (B * T).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import sys

import numpy as np
import torch
import torch.distributed as dist

import curriculum
import data
import fsdp
from kernels import fused_logprob_entropy
from model import Transformer, load_config

HERE = os.path.dirname(os.path.abspath(__file__))
TOY_MODEL = os.path.join(HERE, "assets", "toy", "model")
TOY_DATA = os.path.join(HERE, "assets", "toy", "train.jsonl")
TOY_EVAL = os.path.join(HERE, "assets", "toy", "eval.jsonl")


# ---- the GRPO math ---------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, group_size: int, norm: str = "std", eps: float = 1e-6):
    """A = (r - mean_group) / (std_group + eps) with the unbiased std (as verl); all-equal groups give 0."""
    r = rewards.float().view(-1, group_size)
    a = r - r.mean(-1, keepdim=True)
    if norm == "std":
        a = a / (r.std(-1, keepdim=True) + eps) if group_size > 1 else a
    elif norm != "none":
        raise ValueError(f"norm must be 'std' or 'none', not {norm!r}")
    return a.view(-1)


def grpo_loss(logp, old_logp, adv, mask, *, clip_low=0.2, clip_high=0.2, ref_logp=None, kl_coef=0.0,
              entropy=None, entropy_coef=0.0, agg="token-mean", denom=None, is_weight=None):
    """GRPO loss over [B, T] response tokens (formula in the module docstring); adv is [B].

    is_weight [B, T] (optional) multiplies the policy-gradient term: truncated importance sampling,
    min(exp(old_logp - engine_logp), cap), against the gap between the rollout engine and the trainer.

    agg: "token-mean" = sum / number of tokens; "seq-mean" = mean over sequences of each one's token mean;
    "drgrpo" = sum / (B * T). `denom` replaces the denominator (tokens, sequences or B*T) with a global one,
    so that micro-batches and data-parallel ranks add up to the loss of the whole batch.
    """
    mask = mask.float()
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    pg1, pg2 = ratio * a, ratio.clamp(1 - clip_low, 1 + clip_high) * a
    per_tok = -torch.minimum(pg1, pg2)
    if is_weight is not None:
        per_tok = per_tok * is_weight
    kl = None
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        if kl_coef:
            per_tok = per_tok + kl_coef * kl
    if entropy is not None and entropy_coef:
        per_tok = per_tok - entropy_coef * entropy
    if agg == "token-mean":
        loss = (per_tok * mask).sum() / (mask.sum().clamp(min=1) if denom is None else denom)
    elif agg == "seq-mean":
        seq = (per_tok * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        loss = seq.sum() / (mask.shape[0] if denom is None else denom)
    elif agg == "drgrpo":
        loss = (per_tok * mask).sum() / (mask.numel() if denom is None else denom)
    else:
        raise ValueError(f"agg must be token-mean, seq-mean or drgrpo, not {agg!r}")
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        stats = {"pg_clipfrac": ((pg2 < pg1).float() * mask).sum() / n,
                 "ratio/mean": (ratio * mask).sum() / n,
                 "kl/mean": (kl * mask).sum() / n if kl is not None else torch.zeros(()),
                 "entropy/mean": (entropy * mask).sum() / n if entropy is not None else torch.zeros(()),
                 "tokens": mask.sum()}
    return loss, stats


# ---- the trainer -----------------------------------------------------------------------------

@dataclasses.dataclass
class Rows:
    """A micro-batch in training layout: right-padded [prompt + response] rows."""
    ids: torch.Tensor       # [B, L]
    resp_pos: torch.Tensor  # [B, R] position in the row whose hidden state predicts response token j
    resp_ids: torch.Tensor  # [B, R]
    mask: torch.Tensor      # [B, R] 1 for real response tokens
    index: list[int]        # which completions these rows are


def micro_batches(comps, token_budget: int, pad_id: int, device) -> list[Rows]:
    """Sort completions by length and cut them into micro-batches of at most token_budget padded tokens."""
    order = sorted(range(len(comps)), key=lambda i: len(comps[i].prompt_ids) + len(comps[i].response_ids))
    groups, cur = [], []
    for i in order:
        L = len(comps[i].prompt_ids) + len(comps[i].response_ids)
        if cur and (len(cur) + 1) * L > token_budget:  # rows are sorted, so L is the new padded width
            groups.append(cur)
            cur = []
        cur.append(i)
    groups.append(cur)
    out = []
    for g in groups:
        L = max(len(comps[i].prompt_ids) + len(comps[i].response_ids) for i in g)
        R = max(max(len(comps[i].response_ids) for i in g), 1)
        ids = torch.full((len(g), L), pad_id, dtype=torch.long)
        pos = torch.zeros(len(g), R, dtype=torch.long)
        rid = torch.zeros(len(g), R, dtype=torch.long)
        mask = torch.zeros(len(g), R)
        for b, i in enumerate(g):
            p, r = comps[i].prompt_ids, comps[i].response_ids
            ids[b, :len(p) + len(r)] = torch.tensor(p + r)
            pos[b, :len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r))
            rid[b, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, :len(r)] = 1
        out.append(Rows(ids.to(device), pos.to(device), rid.to(device), mask.to(device), g))
    return out


def token_logprobs(model: Transformer, rows: Rows, temperature: float):
    """Log-probs and entropies [B, R] of the response tokens at the sampling temperature (fused, no logits)."""
    h = model(rows.ids)
    hs = h.gather(1, rows.resp_pos[..., None].expand(-1, -1, h.shape[-1]))
    sel = rows.mask.bool()
    lp, ent = fused_logprob_entropy(hs[sel], model.lm_head.weight, rows.resp_ids[sel], temperature)
    logp = torch.zeros(rows.mask.shape, device=h.device).masked_scatter(sel, lp)
    entropy = torch.zeros(rows.mask.shape, device=h.device).masked_scatter(sel, ent)
    return logp, entropy


def stack_rows(d: dict | None, index: list[int], like: torch.Tensor, fill: float = 0.0):
    """Per-completion 1-D tensors d[i] for i in index as a batch shaped like `like` [B, R], cut or padded with
    `fill` (a completion missing from d, or an empty padding micro-batch, gets `fill` throughout)."""
    if d is None:
        return None
    out = torch.full(like.shape, fill, device=like.device)
    for b, i in enumerate(index):
        if i in d:
            t = d[i][:like.shape[1]]
            out[b, :t.shape[0]] = t
    return out


@dataclasses.dataclass
class TrainConfig:
    lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    token_budget: int = 16384   # padded tokens per micro-batch
    grad_checkpointing: bool = False
    tis_cap: float = 0.0        # > 0: truncated importance sampling against the engine's log-probs


class Trainer:
    """One GRPO update per call: old (and reference) log-probs, then per mini-batch: micro-batch forward and
    backward, gradients summed across ranks (all-reduce, or fsdp's reduce-scatter), clip, AdamW."""

    def __init__(self, model: Transformer, cfg: TrainConfig, ref: Transformer | None = None, pad_id: int = 0):
        self.model, self.cfg, self.ref, self.pad_id = model, cfg, ref, pad_id
        self.sharded = fsdp.is_sharded(model)
        self.device = next(model.parameters()).device
        model.gradient_checkpointing = cfg.grad_checkpointing
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.999),
                                     weight_decay=cfg.weight_decay)
        self.updates = 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1

    def lr_at(self, update: int) -> float:
        w = self.cfg.warmup_steps
        return self.cfg.lr * (min(1.0, (update + 1) / w) if w else 1.0)

    def set_lr(self, lr: float):
        self.cfg.lr = lr

    def full_state_dict(self):
        """(name, full tensor) pairs; under fsdp every rank must consume them (they are all-gathered)."""
        return fsdp.full_state_dict(self.model) if self.sharded else self.model.state_dict().items()

    def _sum(self, x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(x, op=op)
        return x

    def _micro(self, comps, index=None) -> list[Rows]:
        """Micro-batches of these completions; sharded models run collectives in every forward, so all ranks
        get the same number of micro-batches (empty ones padded in: a pad row with no loss tokens)."""
        mbs = micro_batches(comps, self.cfg.token_budget, self.pad_id, self.device)
        if index is not None:
            for mb in mbs:
                mb.index = [index[j] for j in mb.index]
        if self.sharded and self.world > 1:
            n = int(self._sum(torch.tensor([float(len(mbs))]), dist.ReduceOp.MAX).item())
            z = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            mbs += [Rows(torch.full((1, 2), self.pad_id, device=self.device), z, z,
                         torch.zeros(1, 1, device=self.device), []) for _ in range(n - len(mbs))]
        return mbs

    @torch.no_grad()
    def _logprobs(self, model, mbs, temperature):
        out = {}
        for mb in mbs:
            lp, _ = token_logprobs(model, mb, temperature)
            for b, i in enumerate(mb.index):
                out[i] = lp[b]
        return out

    def step(self, comps, adv: torch.Tensor, st, mini_batches: int = 1) -> dict:
        """comps: this rank's completions; adv [len(comps)]; st: the stage (clip, kl, entropy, temperature, agg)."""
        m = self.model
        m.train()
        mbs_all = self._micro(comps)
        old = self._logprobs(m, mbs_all, st.temperature)
        ref = self._logprobs(self.ref, mbs_all, st.temperature) if self.ref is not None and st.kl_coef else None
        gap = {i: old[i][:len(c.logprobs)] - torch.tensor(c.logprobs, device=self.device)
               for i, c in enumerate(comps) if c.logprobs}  # trainer minus engine log-prob, per token
        engine_diff = [d.abs() for d in gap.values()]
        tis = {i: d.exp().clamp(max=self.cfg.tis_cap) for i, d in gap.items()} if self.cfg.tis_cap > 0 else None
        adv = adv.to(self.device)
        stats_sum = {}
        per = math.ceil(len(comps) / mini_batches)
        grad_norm, skipped = torch.zeros(()), 0
        for k in range(mini_batches):
            part = list(range(k * per, min(len(comps), (k + 1) * per)))
            mbs = self._micro([comps[i] for i in part], part)
            local = {"token-mean": float(sum(mb.mask.sum() for mb in mbs)), "seq-mean": float(len(part)),
                     "drgrpo": float(len(part) * st.max_tokens)}[st.agg]
            denom = self._sum(torch.tensor(local, device=self.device)).clamp(min=1)
            if self.sharded:
                denom = denom / self.world  # fsdp averages over ranks; the global-denominator loss wants a sum
            self.opt.zero_grad(set_to_none=True)
            for mb in mbs:
                logp, ent = token_logprobs(m, mb, st.temperature)
                loss, s = grpo_loss(logp, stack_rows(old, mb.index, logp), adv[mb.index] if mb.index else
                                    torch.zeros(len(logp), device=self.device), mb.mask, clip_low=st.clip_low,
                                    clip_high=st.clip_high, ref_logp=stack_rows(ref, mb.index, logp),
                                    kl_coef=st.kl_coef, entropy=ent, entropy_coef=st.entropy_coef, agg=st.agg,
                                    denom=denom, is_weight=stack_rows(tis, mb.index, logp, fill=1.0))
                loss.backward()
                for key, v in s.items():  # token-weighted sums, divided at the end
                    stats_sum[key] = stats_sum.get(key, 0.0) + (v * s["tokens"] if key != "tokens" else v)
            if self.sharded:
                grad_norm = fsdp.clip_grad_norm_(m, self.cfg.grad_clip)
            else:
                grads = [p.grad for p in m.parameters() if p.grad is not None]
                if self.world > 1:  # each rank's loss already carries the global denominator: sum, not mean
                    flat = self._sum(torch.cat([g.flatten() for g in grads]))
                    off = 0
                    for g in grads:
                        g.copy_(flat[off:off + g.numel()].view_as(g))
                        off += g.numel()
                grad_norm = torch.nn.utils.clip_grad_norm_(m.parameters(), self.cfg.grad_clip)
            for g in self.opt.param_groups:
                g["lr"] = self.lr_at(self.updates)
            if torch.isfinite(grad_norm):  # the global norm, identical on every rank: all skip together
                self.opt.step()
            else:
                skipped += 1
            self.updates += 1
        tok = stats_sum.pop("tokens")
        tot = self._sum(torch.stack([tok] + [stats_sum[k] for k in sorted(stats_sum)]).float())
        out = {k: (tot[j + 1] / tot[0].clamp(min=1)).item() for j, k in enumerate(sorted(stats_sum))}
        diffs = torch.cat(engine_diff) if engine_diff else torch.zeros(1)
        dsum = self._sum(torch.stack([diffs.sum(), torch.tensor(float(diffs.numel()))]))
        dmax = self._sum(diffs.max().clone(), dist.ReduceOp.MAX)
        pad_tok = sum(mb.ids.numel() for mb in mbs_all if mb.index)
        real = sum(len(c.prompt_ids) + len(c.response_ids) for c in comps)
        out.update({"grad_norm": float(grad_norm), "lr": self.lr_at(self.updates - 1),
                    "rollout/logprob_absdiff": (dsum[0] / dsum[1].clamp(min=1)).item(),
                    "rollout/logprob_maxdiff": dmax.item(), "pad_frac": 1 - real / max(pad_tok, 1),
                    "skipped_updates": skipped})
        return out

    def state_dict(self) -> dict:
        """This rank's optimizer state (its shards under fsdp) and the update count."""
        return {"opt": self.opt.state_dict(), "updates": self.updates}

    def load_state_dict(self, s: dict):
        self.opt.load_state_dict(s["opt"])
        self.updates = s["updates"]


# ---- checkpoints -----------------------------------------------------------------------------
# <stage dir>/step<K>/: config.json, model.safetensors, tokenizer files (a Hugging Face folder), trainer_state.pt
# (step, sampler, counters), rank<r>.pt (each rank's optimizer state, its shards under fsdp, and random
# states), manifest.json (every file and its size,
# written last). Written into step<K>.tmp and renamed into place, then the `latest` marker is replaced: a
# crash at any moment leaves the previous checkpoint whole and findable.

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json")


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])


def save_checkpoint(path: str, model: Transformer, trainer: Trainer, extra: dict, src_dir: str, rank: int = 0,
                    keep: int = 0):
    """Write the checkpoint atomically (see above); keep the newest `keep` step folders (0: all)."""
    tmp = path + ".tmp"
    weights = trainer.full_state_dict()  # under fsdp: gathered unit by unit, every rank takes part
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=weights, dtype=torch.float32)
        for fn in TOKENIZER_FILES:
            if os.path.exists(os.path.join(src_dir, fn)):
                shutil.copy(os.path.join(src_dir, fn), tmp)
        torch.save(extra, os.path.join(tmp, "trainer_state.pt"))
    else:
        for _ in weights:
            pass
    _barrier()
    torch.save({"rng": rng_state(), "trainer": trainer.state_dict()}, os.path.join(tmp, f"rank{rank}.pt"))
    _barrier()
    if rank == 0:
        files = sorted(os.listdir(tmp))
        for fn in files:
            with open(os.path.join(tmp, fn), "rb+") as f:
                os.fsync(f.fileno())
        manifest = {"files": {fn: os.path.getsize(os.path.join(tmp, fn)) for fn in files}, **{
            k: v for k, v in extra.items() if isinstance(v, (int, str))}}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        parent = os.path.dirname(path)
        with open(os.path.join(parent, "latest.tmp"), "w") as f:
            f.write(os.path.basename(path) + "\n")
        os.replace(os.path.join(parent, "latest.tmp"), os.path.join(parent, "latest"))
        _fsync_dir(parent)
        if keep:
            for old in step_dirs(parent)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()


def same_architecture(c1, c2) -> bool:
    """Configs equal in everything but the stored dtype."""
    return dataclasses.replace(c1, torch_dtype="") == dataclasses.replace(c2, torch_dtype="")


def step_dirs(stage_dir: str) -> list[str]:
    """step<K> folders, oldest first."""
    ds = [d for d in os.listdir(stage_dir) if d.startswith("step") and d[4:].isdigit()] if os.path.isdir(
        stage_dir) else []
    return [os.path.join(stage_dir, d) for d in sorted(ds, key=lambda d: int(d[4:]))]


def check_checkpoint(path: str) -> str | None:
    """None when complete; else what is wrong (a missing manifest, a missing file, a size that differs)."""
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError):
        return "no readable manifest.json (the write never finished)"
    for fn, size in files.items():
        p = os.path.join(path, fn)
        if not os.path.exists(p):
            return f"{fn} is missing"
        if os.path.getsize(p) != size:
            return f"{fn} has {os.path.getsize(p)} bytes, the manifest says {size}"
    return None


def latest_checkpoint(stage_dir: str, log=print) -> str | None:
    """The newest complete step checkpoint of a stage; a damaged newer one is skipped with a warning."""
    for path in reversed(step_dirs(stage_dir)):
        problem = check_checkpoint(path)
        if problem is None:
            return path
        log(f"[fastcurl] warning: checkpoint {path} is damaged ({problem}); falling back to the one before")
    return None


class StopFlag:
    """SIGTERM / SIGINT set a flag; the loop finishes its step, checkpoints and exits 0 on every rank."""

    def __init__(self):
        import signal
        self.hit = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._set)

    def _set(self, signum, frame):
        self.hit = True

    def __call__(self) -> bool:
        flag = torch.tensor([float(self.hit)])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # one rank signalled: all stop at the same step
        return bool(flag.item())


# ---- the command line ------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="FastCuRL: curriculum GRPO with stage-wise context scaling",
                                 epilog="Stage fields not given keep the recipe's value.")
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--recipe", default="toy", choices=sorted(curriculum.RECIPES))
    ap.add_argument("--model", default=None, help="stage 1's starting checkpoint (default: the toy model)")
    ap.add_argument("--data", default=None, help="problem file (default: the toy task)")
    ap.add_argument("--eval-data", default=None, help="held-out file scored at the end of the stage")
    ap.add_argument("--out", default=None, help="output folder (default runs/<recipe>)")
    ap.add_argument("--rollout", default="auto", choices=["auto", "torch", "vllm"])
    ap.add_argument("--steps", type=int, default=None, help="override the stage's number of steps")
    ap.add_argument("--split", default=None, choices=["L1", "L2", "L3"], help="override the stage's data split")
    ap.add_argument("--template", default=None, choices=["r1", "qwen", "toy"],
                    help="prompt format (default: from the checkpoint's tokenizer)")
    ap.add_argument("--save-every", type=int, default=10, help="checkpoint every K steps (0: only the final)")
    ap.add_argument("--keep", type=int, default=2, help="step checkpoints kept (0: all)")
    ap.add_argument("--max-skips", type=int, default=3, help="stop after this many non-finite updates in a row")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
    ap.add_argument("--fsdp", default="hand", choices=["hand", "torch", "none"],
                    help="hand: fsdp.py (default); torch: torch's FSDP2 fully_shard; none: plain data parallel")
    ap.add_argument("--token-budget", type=int, default=None, help="padded tokens per micro-batch")
    ap.add_argument("--tis-cap", type=float, default=0.0,
                    help="truncated importance sampling: weight the loss by min(exp(trainer - engine log-prob), C)")
    ap.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--eval-k", type=int, default=4, help="samples per held-out problem at the end (0: skip)")
    for f in dataclasses.fields(curriculum.Stage):  # --batch, --n-samples, --max-tokens, --lr, --kl-coef, ...
        if f.name not in ("data", "steps"):
            flag = "--n-samples" if f.name == "n" else "--" + f.name.replace("_", "-")  # torchrun owns --n*
            ap.add_argument(flag, dest=f.name, default=None, type=int if f.type == "int" else
                            str if f.type == "str" else float, help="stage override",
                            choices=["token-mean", "seq-mean", "drgrpo"] if f.name == "agg" else None)
    return ap.parse_args(argv)


def setup_dist():
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return rank, world


def main(argv=None):
    a = parse_args(argv)
    rank, world = setup_dist()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    stages = curriculum.RECIPES[a.recipe]
    if not 1 <= a.stage <= len(stages):
        sys.exit(f"--stage {a.stage}: recipe {a.recipe} has stages 1..{len(stages)}")
    overrides = {f.name: getattr(a, f.name) for f in dataclasses.fields(curriculum.Stage)
                 if f.name not in ("data", "steps") and getattr(a, f.name) is not None}
    if a.steps is not None:
        overrides["steps"] = a.steps
    if a.split is not None:
        overrides["data"] = a.split
    st = dataclasses.replace(stages[a.stage - 1], **overrides)
    out = a.out or os.path.join("runs", a.recipe)
    stage_dir = os.path.join(out, f"stage{a.stage}")
    if a.stage == 1:
        src = a.model or (TOY_MODEL if a.recipe == "toy" else None)
        if src is None:
            sys.exit(f"--recipe {a.recipe} --stage 1 needs --model (a Hugging Face checkpoint folder)")
    else:
        src = os.path.join(out, f"stage{a.stage - 1}", "final")
        if not os.path.exists(os.path.join(src, "config.json")):
            sys.exit(f"--stage {a.stage} starts from stage {a.stage - 1}'s final checkpoint, but {src} does not "
                     f"exist: run --stage {a.stage - 1} with --out {out} first")
    data_file = a.data or (TOY_DATA if a.recipe == "toy" else None)
    if data_file is None:
        sys.exit(f"--recipe {a.recipe} needs --data (a problem file: JSON, JSONL or parquet)")
    eval_file = a.eval_data or (TOY_EVAL if a.recipe == "toy" and a.data is None else None)

    # everything that can be wrong with the inputs is found here, before any compute
    try:
        tok = data.Tokenizer(src)
        template = a.template or tok.template
        problems = data.load_problems(data_file)
        sets, mean_len, _ = data.split_by_length(problems, template)
        cfg = load_config(src)
    except (ValueError, OSError, ImportError) as e:  # each names the file (and line and field)
        sys.exit(f"[fastcurl] {e}")
    if st.max_prompt + st.max_tokens > cfg.max_position_embeddings:
        sys.exit(f"stage {a.stage}: prompt budget {st.max_prompt} + response budget {st.max_tokens} exceeds the "
                 f"model's max_position_embeddings {cfg.max_position_embeddings}")
    prompts, dropped = data.encode_problems(sets[st.data], tok, template, st.max_prompt)
    identity = {"recipe": a.recipe, "stage": a.stage, "seed": a.seed, "data": os.path.abspath(data_file),
                "model": os.path.abspath(src), "world": world, "stage_config": dataclasses.asdict(st)}
    resume_from, run_file = None, os.path.join(stage_dir, "run.json")
    if os.path.exists(run_file) or os.path.exists(os.path.join(stage_dir, "metrics.jsonl")):
        if not a.resume:
            sys.exit(f"{stage_dir} already holds a run: pass --resume to continue it or choose another --out")
        if os.path.exists(run_file):
            with open(run_file) as f:
                old = json.load(f)
            diff = [k for k in identity if old.get(k) != identity[k]]
            if diff:
                sys.exit(f"{stage_dir} holds a different run ({', '.join(diff)} differ: {run_file}); "
                         f"resume it with the same arguments or choose another --out")
        if check_checkpoint(os.path.join(stage_dir, "final")) is None:
            if rank == 0:
                print(f"[fastcurl] stage {a.stage} is already complete: {stage_dir}/final", flush=True)
            return close_dist()
        resume_from = latest_checkpoint(stage_dir, log=print if rank == 0 else lambda *_: None)
        if resume_from and not same_architecture(load_config(resume_from), cfg):
            sys.exit(f"{resume_from}/config.json does not match {src}/config.json: not the same model")
    _barrier()
    if rank == 0:
        os.makedirs(stage_dir, exist_ok=True)
        with open(run_file, "w") as f:
            json.dump(identity, f, indent=1)
        print(f"[fastcurl] recipe {a.recipe} stage {a.stage}: {st.data} ({len(prompts)} prompts, {dropped} dropped "
              f"over {st.max_prompt} tokens; split at mean length {mean_len:.1f}), response budget {st.max_tokens}, "
              f"batch {st.batch} x n={st.n}, {st.steps} steps, world {world}, device {device}, from {src}",
              flush=True)

    dtype = getattr(torch, a.dtype)
    torch.manual_seed(a.seed * 1009 + rank)
    start_from = resume_from or src
    ref = Transformer.from_pretrained(src, dtype=dtype, device=device).eval() if st.kl_coef else None
    if ref is not None:
        ref.requires_grad_(False)
    use_vllm = a.rollout == "vllm" or (a.rollout == "auto" and curriculum.vllm_usable(cfg) is None)
    if a.fsdp == "none":
        model = gen_model = Transformer.from_pretrained(start_from, dtype=dtype, device=device)
    else:  # fp32 master shards, compute in --dtype; a native engine gets its own full copy, refreshed every step
        model = Transformer.from_pretrained(start_from, dtype=torch.float32, device=device)
        gen_model = model if use_vllm else Transformer.from_pretrained(start_from, dtype=dtype, device=device).eval()
        if a.fsdp == "hand":
            fsdp.shard(model, param_dtype=dtype if dtype != torch.float32 else None)
            if ref is not None:
                fsdp.shard(ref)
        else:
            fsdp.torch_fully_shard(model, param_dtype=dtype)
            if ref is not None:
                fsdp.torch_fully_shard(ref)
    gc = a.grad_checkpointing if a.grad_checkpointing is not None else a.recipe != "toy"
    tcfg = TrainConfig(lr=st.lr, warmup_steps=st.warmup_steps, grad_clip=1.0,
                       token_budget=a.token_budget or (16384 if a.recipe == "toy" else 32768),
                       grad_checkpointing=gc, tis_cap=a.tis_cap)
    trainer = Trainer(model, tcfg, ref, tok.pad_id)
    engine = curriculum.make_engine(a.rollout, gen_model, tok, model_dir=start_from, rank=rank, world=world,
                                    seed=a.seed, dtype=a.dtype, log=rank == 0,
                                    max_model_len=max(s.max_prompt + s.max_tokens for s in stages))
    sampler = data.Sampler(len(prompts), st.batch, rank, world, seed=a.seed * 1000 + a.stage)
    start, counters = 0, {}
    if resume_from:
        state = torch.load(os.path.join(resume_from, "trainer_state.pt"), weights_only=False)
        mine = torch.load(os.path.join(resume_from, f"rank{rank}.pt"), weights_only=False)
        trainer.load_state_dict(mine["trainer"])
        set_rng_state(mine["rng"])
        sampler.load_state(state["sampler"])
        start, counters = state["step"], state.get("counters", {})
        if rank == 0:
            print(f"[fastcurl] resumed from {resume_from} at step {start}", flush=True)
    if rank == 0:  # metrics logged after the checkpoint by a run that died are logged again
        curriculum.truncate_metrics(os.path.join(stage_dir, "metrics.jsonl"), start)

    def save(path, step, counters):
        save_checkpoint(path, model, trainer, {"step": step, "stage": a.stage, "sampler": sampler.state(),
                                               "recipe": a.recipe, "seed": a.seed, "counters": counters},
                        src, rank, keep=a.keep)

    stop = StopFlag()
    status = curriculum.run_stage(st, a.stage, prompts, engine, trainer, tok, sampler, stage_dir, start=start,
                                  seed=a.seed, rank=rank, world=world, save=save, save_every=a.save_every,
                                  should_stop=stop, max_skips=a.max_skips, counters=counters)
    if status != "done":
        close_dist(engine)
        if status == "stopped":
            if rank == 0:
                print(f"[fastcurl] stopped by a signal; checkpoint in {latest_checkpoint(stage_dir)}: "
                      f"rerun the same command with --resume to continue", flush=True)
            return
        sys.exit(f"[fastcurl] {a.max_skips} updates in a row had a NaN/inf loss or gradient norm; saved "
                 f"{latest_checkpoint(stage_dir)}. Look at the learning rate, the data of the last steps "
                 f"(metrics.jsonl) and --dtype; rerun with --resume after a change.")
    save(os.path.join(stage_dir, "final"), st.steps, counters)
    if eval_file and a.eval_k > 0:  # held-out pass@1 at the largest budget of the recipe, so stages compare like with like
        import eval as evaluate
        res = evaluate.evaluate_file(engine, tok, template, eval_file, k=a.eval_k, temperature=st.temperature,
                                     max_tokens=max(s.max_tokens for s in stages), max_prompt=st.max_prompt,
                                     seed=a.seed, rank=rank, world=world)
        if rank == 0:
            res["stage"] = a.stage
            with open(os.path.join(stage_dir, "eval.json"), "w") as f:
                json.dump(res, f, indent=2)
            print(f"[fastcurl] stage {a.stage} held-out {os.path.basename(eval_file)}: pass@1 {res['pass@1']:.3f} "
                  f"(k={a.eval_k}), mean length {res['response_len/mean']:.1f}", flush=True)
    close_dist(engine)


def close_dist(engine=None):
    """Leave torch.distributed cleanly; a vLLM engine tears down its own groups (and the world) at exit."""
    _barrier()
    if dist.is_initialized() and getattr(engine, "name", "") != "vllm":
        dist.destroy_process_group()


def finish(code: int = 0):
    """End a script. Under torchrun the process ends at once (os._exit) after flushing its output: gloo's worker
    threads free a finished collective's tensors a moment after it returns, and when that lands in the
    interpreter's shutdown the process aborts (std::terminate, exit -6: about 1 in 7 runs of the 2-rank FSDP
    test). Checkpoints, metrics and logs are all written and closed before this point."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    main()
    finish()
