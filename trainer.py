"""The GRPO math and the trainer step: advantages, the clipped loss, one update per rollout batch.

GRPO, per prompt group of n samples with rewards r_1..r_n:
    A_i = (r_i - mean(r)) / (std(r) + eps)                              (group-normalised advantage)
    ratio_t = exp(logp_t - old_logp_t)
    loss_t = -min(ratio_t A, clip(ratio_t, 1 - clip_low, 1 + clip_high) A)
             + kl_coef (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)   (k3 estimate of KL(pi||ref))
             - entropy_coef H_t
aggregated over response tokens by token-mean, seq-mean or Dr.GRPO's sum / (B * T).

Every tensor here is made on the trainer's device (the model's), which under NCCL is also the device
of the collectives (fsdp.comm_device); per-step metrics reach the host once, at the end of the step.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

import fsdp
from kernels import fused_logprob_entropy
from model import Packed, Transformer


# ---- the GRPO math ---------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, group_size: int, norm: str = "std", eps: float = 1e-6):
    """A = (r - mean_group) / (std_group + eps) with the unbiased std (as verl); all-equal groups
    give 0."""
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
    min(exp(old_logp - engine_logp), cap), against the gap between the rollout engine and the
    trainer.

    agg: "token-mean" = sum / number of tokens; "seq-mean" = mean over sequences of each one's token
    mean; "drgrpo" = sum / (B * T). `denom` replaces the denominator (tokens, sequences or B*T) with
    a global one, so that micro-batches and data-parallel ranks add up to the loss of the whole
    batch.
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
        zero = logp.new_zeros(())
        stats = {"pg_clipfrac": ((pg2 < pg1).float() * mask).sum() / n,
                 "ratio/mean": (ratio * mask).sum() / n,
                 "kl/mean": (kl * mask).sum() / n if kl is not None else zero,
                 "entropy/mean": (entropy * mask).sum() / n if entropy is not None else zero,
                 "tokens": mask.sum()}
    return loss, stats


# ---- training layout -------------------------------------------------------------------------

@dataclasses.dataclass
class Rows:
    """A micro-batch in training layout: completions (prompt + response) packed back to back in one
    row for the model, and their response tokens as a [B, R] batch (one completion per row) for the
    loss."""
    ids: torch.Tensor       # [1, L] the packed tokens
    positions: torch.Tensor | None  # [1, L] positions, restarting at 0 in each completion
    packed: Packed | None   # the completions' lengths in the row (attention stays inside each)
    resp_pos: torch.Tensor  # [B, R] where in the row the hidden state predicting token j of b is
    resp_ids: torch.Tensor  # [B, R]
    mask: torch.Tensor      # [B, R] 1 for real response tokens
    index: list[int]        # which completions these rows are


def micro_batches(comps, token_budget: int, pad_id: int, device) -> list[Rows]:
    """Pack completions, sorted by length, into micro-batches of at most token_budget tokens (one
    longer than the budget gets one of its own): no padding tokens reach the model. Laid out on the
    host, then moved to `device` in one copy per tensor."""
    def length(i):
        return len(comps[i].prompt_ids) + len(comps[i].response_ids)

    groups, cur, used = [], [], 0
    for i in sorted(range(len(comps)), key=length):
        if cur and used + length(i) > token_budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += length(i)
    groups.append(cur)
    out, host = [], torch.device("cpu")
    for g in groups:
        R = max(max(len(comps[i].response_ids) for i in g), 1)
        resp_pos = torch.zeros(len(g), R, dtype=torch.long, device=host)
        rid = torch.zeros(len(g), R, dtype=torch.long, device=host)
        mask = torch.zeros(len(g), R, device=host)
        ids, positions, lengths = [], [], []
        for b, i in enumerate(g):
            p, r = comps[i].prompt_ids, comps[i].response_ids
            start = len(ids)
            ids += p + r
            positions += range(len(p) + len(r))
            lengths.append(len(p) + len(r))
            resp_pos[b, :len(r)] = torch.arange(start + len(p) - 1, start + len(p) - 1 + len(r),
                                                device=host)
            rid[b, :len(r)] = torch.tensor(r, dtype=torch.long, device=host)
            mask[b, :len(r)] = 1
        row = torch.tensor([ids, positions], dtype=torch.long, device=host).to(device)
        out.append(Rows(row[:1], row[1:], Packed(lengths), resp_pos.to(device), rid.to(device),
                        mask.to(device), g))
    return out


def token_logprobs(model: Transformer, rows: Rows, temperature: float):
    """Log-probs and entropies [B, R] of the response tokens at the sampling temperature (fused, no
    logits)."""
    h = model(rows.ids, rows.positions, rows.packed)
    hs = h.reshape(-1, h.shape[-1])[rows.resp_pos]
    sel = rows.mask.bool()
    lp, ent = fused_logprob_entropy(hs[sel], model.lm_head.weight, rows.resp_ids[sel], temperature)
    logp = torch.zeros(rows.mask.shape, device=h.device).masked_scatter(sel, lp)
    entropy = torch.zeros(rows.mask.shape, device=h.device).masked_scatter(sel, ent)
    return logp, entropy


def stack_rows(d: dict | None, index: list[int], like: torch.Tensor, fill: float = 0.0):
    """Per-completion 1-D tensors d[i] for i in index as a batch shaped like `like` [B, R], cut or
    padded with `fill` (a completion missing from d, or an empty padding micro-batch, gets `fill`
    throughout)."""
    if d is None:
        return None
    out = torch.full(like.shape, fill, device=like.device)
    for b, i in enumerate(index):
        if i in d:
            t = d[i][:like.shape[1]]
            out[b, :t.shape[0]] = t
    return out


# ---- the trainer -----------------------------------------------------------------------------

@dataclasses.dataclass
class TrainConfig:
    """What is not per stage (the stage carries lr, warmup, clip, KL, entropy, aggregation and
    mini-batches)."""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    token_budget: int = 16384   # tokens per packed micro-batch
    grad_checkpointing: bool = False
    tis_cap: float = 0.0        # > 0: truncated importance sampling against the engine's log-probs
    recompute_old: bool = False  # run the old-log-prob forward even when it is this one (a check)


class Trainer:
    """One GRPO update per mini-batch: old (and reference) log-probs, then per mini-batch:
    micro-batch forward and backward, gradients summed across ranks (all-reduce, or fsdp's
    reduce-scatter), clip, AdamW."""

    def __init__(self, model: Transformer, cfg: TrainConfig, ref: Transformer | None = None,
                 pad_id: int = 0):
        self.model, self.cfg, self.ref, self.pad_id = model, cfg, ref, pad_id
        self.sharded = fsdp.is_sharded(model)
        self.device = next(model.parameters()).device
        model.gradient_checkpointing = cfg.grad_checkpointing
        # the learning rate is the stage's, set before every update (lr_at)
        self.opt = torch.optim.AdamW(model.parameters(), lr=0.0, betas=(0.9, 0.999),
                                     weight_decay=cfg.weight_decay)
        self.updates = 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1

    @staticmethod
    def lr_at(update: int, st) -> float:
        """The stage's lr with a linear warmup over its first st.warmup_steps updates."""
        w = st.warmup_steps
        return st.lr * (min(1.0, (update + 1) / w) if w else 1.0)

    def full_state_dict(self):
        """(name, full tensor) pairs; under fsdp every rank must consume them (all-gathered)."""
        return fsdp.full_state_dict(self.model) if self.sharded else self.model.state_dict().items()

    def _sum(self, x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(x, op=op)
        return x

    def _micro(self, comps, index=None) -> list[Rows]:
        """Micro-batches of these completions; sharded models run collectives in every forward, so
        all ranks get the same number of micro-batches (empty ones padded in: a pad row with no loss
        tokens)."""
        mbs = micro_batches(comps, self.cfg.token_budget, self.pad_id, self.device)
        if index is not None:
            for mb in mbs:
                mb.index = [index[j] for j in mb.index]
        if self.sharded and self.world > 1:
            count = torch.tensor([float(len(mbs))], device=self.device)
            n = int(self._sum(count, dist.ReduceOp.MAX).item())
            z = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            mbs += [Rows(torch.full((1, 2), self.pad_id, device=self.device), None, None, z, z,
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

    def _denominator(self, mbs, n_seqs: int, st) -> torch.Tensor:
        """The aggregation's denominator over the whole mini-batch on all ranks: tokens, sequences
        or B * T."""
        local = {"token-mean": lambda: float(sum(mb.mask.sum() for mb in mbs)),
                 "seq-mean": lambda: float(n_seqs),
                 "drgrpo": lambda: float(n_seqs * st.max_tokens)}[st.agg]()
        denom = self._sum(torch.tensor(local, device=self.device)).clamp(min=1)
        # fsdp averages gradients over ranks; the global-denominator loss wants a sum
        return denom / self.world if self.sharded else denom

    def _reduce_and_clip(self) -> torch.Tensor:
        """Sum gradients over ranks (fsdp reduce-scattered them already), clip to the global norm;
        -> the norm."""
        m = self.model
        if self.sharded:
            return fsdp.clip_grad_norm_(m, self.cfg.grad_clip)
        grads = [p.grad for p in m.parameters() if p.grad is not None]
        if self.world > 1:  # each rank's loss already carries the global denominator: sum, not mean
            flat = self._sum(torch.cat([g.flatten() for g in grads]))
            off = 0
            for g in grads:
                g.copy_(flat[off:off + g.numel()].view_as(g))
                off += g.numel()
        return torch.nn.utils.clip_grad_norm_(m.parameters(), self.cfg.grad_clip)

    def step(self, comps, adv: torch.Tensor, st) -> dict:
        """comps: this rank's completions; adv [len(comps)]; st: the stage (lr, warmup, clip, kl,
        entropy, temperature, agg, max_tokens, mini_batches: optimizer updates per step)."""
        m = self.model
        m.train()
        mbs_all = self._micro(comps)
        # old log-probs: with one update per rollout batch the policy being trained is the one that
        # sampled, so each micro-batch's own log-probs, detached, are the old ones (ratio 1, the
        # same loss and gradient) and no extra forward is needed; with several mini-batches the
        # later ones need the log-probs from before the first update
        reuse = st.mini_batches == 1 and not self.cfg.recompute_old
        old = None if reuse else self._logprobs(m, mbs_all, st.temperature)
        ref = None
        if self.ref is not None and st.kl_coef:
            ref = self._logprobs(self.ref, mbs_all, st.temperature)
        adv = adv.to(self.device)
        sums, gap, skipped, grad_norm = {}, {}, 0, None
        per = math.ceil(len(comps) / st.mini_batches)
        for k in range(st.mini_batches):
            part = list(range(k * per, min(len(comps), (k + 1) * per)))
            mbs = mbs_all if st.mini_batches == 1 else self._micro([comps[i] for i in part], part)
            denom = self._denominator(mbs, len(part), st)
            self.opt.zero_grad(set_to_none=True)
            for mb in mbs:
                logp, ent = token_logprobs(m, mb, st.temperature)
                old_logp = logp.detach() if reuse else stack_rows(old, mb.index, logp)
                ref_logp = stack_rows(ref, mb.index, logp)
                is_weight = self._engine_gap(comps, mb, old_logp, gap)
                # a padding micro-batch (no rows of this rank) has no advantages
                mb_adv = adv[mb.index] if mb.index else logp.new_zeros(len(logp))
                loss, s = grpo_loss(logp, old_logp, mb_adv, mb.mask, clip_low=st.clip_low,
                                    clip_high=st.clip_high, ref_logp=ref_logp, kl_coef=st.kl_coef,
                                    entropy=ent, entropy_coef=st.entropy_coef, agg=st.agg,
                                    denom=denom, is_weight=is_weight)
                loss.backward()
                for key, v in s.items():  # token-weighted sums, divided at the end
                    sums[key] = sums.get(key, 0.0) + (v * s["tokens"] if key != "tokens" else v)
            grad_norm = self._reduce_and_clip()
            for g in self.opt.param_groups:
                g["lr"] = self.lr_at(self.updates, st)
            if torch.isfinite(grad_norm):  # the global norm, same on every rank: all skip together
                self.opt.step()
            else:
                skipped += 1
            self.updates += 1
        out = self._metrics(sums, gap, mbs_all, comps)
        out.update({"grad_norm": float(grad_norm), "lr": self.lr_at(self.updates - 1, st),
                    "skipped_updates": skipped})
        return out

    def _engine_gap(self, comps, mb: Rows, old_logp: torch.Tensor, gap: dict):
        """Record trainer minus engine log-prob per token of this micro-batch's completions (before
        any update) in `gap`; -> the truncated importance weights min(exp(gap), cap) [B, R], or
        None without --tis-cap."""
        for b, i in enumerate(mb.index):
            if comps[i].logprobs and i not in gap:
                n = len(comps[i].logprobs)
                gap[i] = old_logp[b, :n] - torch.tensor(comps[i].logprobs, device=self.device)
        if self.cfg.tis_cap <= 0:
            return None
        tis = {i: gap[i].exp().clamp(max=self.cfg.tis_cap) for i in mb.index if i in gap}
        return stack_rows(tis, mb.index, old_logp, fill=1.0)

    def _metrics(self, sums: dict, gap: dict, mbs_all, comps) -> dict:
        """Token-weighted means over all ranks, the trainer/engine log-prob gap and the padding
        share; the tensors reach the host in one copy."""
        tok = sums.pop("tokens")
        keys = sorted(sums)
        tot = self._sum(torch.stack([tok] + [sums[k] for k in keys]).float())
        diffs = torch.cat([d.abs() for d in gap.values()]) if gap else \
            torch.zeros(1, device=self.device)
        dsum = self._sum(torch.stack([diffs.sum(), diffs.new_tensor(float(diffs.numel()))]))
        dmax = self._sum(diffs.max().clone(), dist.ReduceOp.MAX)
        host = torch.cat([tot[1:] / tot[0].clamp(min=1), (dsum[0] / dsum[1].clamp(min=1))[None],
                          dmax[None].to(tot.dtype)]).tolist()
        out = dict(zip(keys, host))
        out["rollout/logprob_absdiff"], out["rollout/logprob_maxdiff"] = host[-2], host[-1]
        pad_tok = sum(mb.ids.numel() for mb in mbs_all if mb.index)
        real = sum(len(c.prompt_ids) + len(c.response_ids) for c in comps)
        out["pad_frac"] = 1 - real / max(pad_tok, 1)
        return out

    def state_dict(self) -> dict:
        """This rank's optimizer state (its shards under fsdp) and the update count."""
        return {"opt": self.opt.state_dict(), "updates": self.updates}

    def load_state_dict(self, s: dict):
        self.opt.load_state_dict(s["opt"])
        self.updates = s["updates"]
