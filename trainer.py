"""The GRPO math and the trainer step: advantages, the policy losses, one update per rollout batch.

GRPO, per prompt group of n samples with rewards r_1..r_n:
    A_i = (r_i - mean(r)) / (std(r) + eps)                              (group-normalised advantage)
    ratio_t = exp(logp_t - old_logp_t)
    loss_t = w_t pg_t               (w_t: the rollout correction's weight, 1 without; see below)
             + kl_coef (exp(ref_t - logp_t) - (ref_t - logp_t) - 1)   (k3 estimate of KL(pi||ref))
             - entropy_coef H_t
aggregated over response tokens by token-mean, seq-mean or Dr.GRPO's sum / (B * T). The policy
term pg_t is the stage's `loss` (policy_loss has the details; rollout_correction the weights w_t):
    grpo   -min(ratio_t A, clip(ratio_t, 1 - clip_low, 1 + clip_high) A)          (token ratio)
    gspo   the same with the sequence ratio s_i = exp(mean_t (logp_t - old_logp_t))  (GSPO)
    cispo  -sg[min(ratio_t, 1 + clip_high)] A logp_t                   (MiniMax-M1's CISPO)

Every tensor here is made on the trainer's device (the model's), which under NCCL is also the device
of the collectives (fsdp.comm_device); per-step metrics reach the host once, at the end of the step.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

import fsdp
from kernels import KEEP_ELEMS, fused_logprob_entropy
from model import Packed, Transformer


# ---- the GRPO math ---------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, group_size: int, norm: str = "std", eps: float = 1e-6):
    """A = (r - mean_group) / (std_group + eps), unbiased std (as verl); all-equal groups give 0."""
    if norm not in ("std", "none"):
        raise ValueError(f"norm must be 'std' or 'none', not {norm!r}")
    r = rewards.float().view(-1, group_size)
    a = r - r.mean(-1, keepdim=True)
    return (a / (r.std(-1, keepdim=True) + eps) if norm == "std" and group_size > 1 else a).view(-1)


LOSSES = ("grpo", "gspo", "cispo")
CORRECTIONS = ("none", "tis-token", "tis-seq", "mask-token", "mask-seq")
AGGS = ("token-mean", "seq-mean", "drgrpo")
# a step's sums over micro-batches and ranks: the tokens, then token-weighted stats (metrics' order)
STAT_KEYS = ("tokens", "entropy/mean", "kl/mean", "pg_clipfrac", "ratio/mean",
             "rollout/masked_frac")


def policy_loss(logp, old_logp, adv, mask, loss="grpo", clip_low=0.2, clip_high=0.2):
    """Per token [B, T]: the policy-gradient term, whether it clipped, the ratio used; adv [B].

    grpo: r_t = exp(logp_t - old_t),  pg_t = -min(r_t A, clip(r_t, 1 - clip_low, 1 + clip_high) A).

    gspo (Zheng et al. 2025, GSPO): the sequence ratio s = exp(1/|y| sum_t (logp_t - old_t)) over
    the response's |y| tokens, clipped at sequence level, written in the paper's GSPO-token form
        s_t = sg[s] exp(logp_t - sg[logp_t])           (value s at every token, d s_t = s d logp_t)
        pg_t = -min(s_t A, clip(s_t, 1 - clip_low, 1 + clip_high) A)
    so the token aggregations apply: with seq-mean it is GSPO's sequence loss
    mean_i -min(s_i A_i, clip(s_i) A_i) exactly (value and gradient); token-mean weighs sequence i
    by its length (|y_i| / total tokens), Dr.GRPO by |y_i| / (B T). A per-token rollout weight
    multiplies each token's term (its own gradient share), a per-sequence one the sequence's loss.
    The clip range is the stage's: GSPO's ratios are length-normalised and sit near 1, and the
    paper clips at about 3e-4 / 4e-4 (not 0.2): set clip_low / clip_high for it.

    cispo (MiniMax-M1, 2025): the importance weight is clipped and detached, never the gradient:
        pg_t = -sg[min(r_t, 1 + clip_high)] A logp_t
    so every token keeps a gradient (-w_t A d logp_t), unlike grpo's clipped tokens. The paper's
    lower bound 1 - eps_low is "not imposed" (eps_low set large) and only eps_high is tuned: we
    follow it, clip_low is unused under cispo. At ratio 1 (one update per batch) its value differs
    from grpo's but its gradient is the same (-A d logp_t).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, not {loss!r}")
    a = adv[:, None]
    if loss == "gspo":  # log s from detached log-probs: sg[s]
        log_s = ((logp.detach() - old_logp) * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        ratio = torch.exp(log_s[:, None] + logp - logp.detach())
    else:
        ratio = torch.exp(logp - old_logp)
    if loss == "cispo":
        weight = ratio.detach().clamp(max=1 + clip_high)
        return -weight * a * logp, ratio.detach() > 1 + clip_high, ratio
    pg1, pg2 = ratio * a, ratio.clamp(1 - clip_low, 1 + clip_high) * a
    return -torch.minimum(pg1, pg2), pg2 < pg1, ratio


def grpo_loss(logp, old_logp, adv, mask, *, clip_low=0.2, clip_high=0.2, ref_logp=None, kl_coef=0.0,
              entropy=None, entropy_coef=0.0, agg="token-mean", denom=None, is_weight=None,
              loss="grpo"):
    """The loss over [B, T] response tokens (formula in the module docstring); adv is [B]; loss:
    the policy term, "grpo", "gspo" or "cispo" (policy_loss); is_weight [B, T] (optional): the
    rollout correction's w_t (rollout_correction), on the policy term only.

    agg: "token-mean" = sum / number of tokens; "seq-mean" = mean over sequences of each one's token
    mean; "drgrpo" = sum / (B * T). `denom` replaces the denominator (tokens, sequences or B*T) with
    a global one, so that micro-batches and data-parallel ranks add up to the whole batch's loss.
    """
    mask = mask.float() if not mask.is_floating_point() else mask
    per_tok, clipped, ratio = policy_loss(logp, old_logp, adv, mask, loss, clip_low, clip_high)
    if is_weight is not None:
        per_tok = per_tok * is_weight
    kl = None if ref_logp is None else torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
    if kl is not None and kl_coef:
        per_tok = per_tok + kl_coef * kl
    if entropy is not None and entropy_coef:
        per_tok = per_tok - entropy_coef * entropy
    if agg == "seq-mean":
        seq = (per_tok * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        out = seq.sum() / (mask.shape[0] if denom is None else denom)
    elif agg in ("token-mean", "drgrpo"):
        own = mask.sum().clamp(min=1) if agg == "token-mean" else mask.numel()
        out = (per_tok * mask).sum() / (own if denom is None else denom)
    else:
        raise ValueError(f"agg must be token-mean, seq-mean or drgrpo, not {agg!r}")
    with torch.no_grad():
        tokens = mask.sum()
        def token_mean(x):  # 0 for a term left out
            return logp.new_zeros(()) if x is None else (x * mask).sum() / tokens.clamp(min=1)
        stats = {"pg_clipfrac": token_mean(clipped), "ratio/mean": token_mean(ratio),
                 "kl/mean": token_mean(kl), "entropy/mean": token_mean(entropy), "tokens": tokens}
    return out, stats


def rollout_correction(gap, mask, mode: str, cap: float):
    """Weights [B, T] for the policy term against the engine/trainer mismatch, and which tokens they
    leave out [B, T] (bool). gap_t = old_logp_t - engine_logp_t (the trainer's log-prob before the
    update minus the sampler's; 0 where the engine gave none); C = cap:

        tis-token   w_t = min(exp(gap_t), C)                     (truncated importance sampling)
        tis-seq     w_t = min(exp(sum_u gap_u), C) for every token of the sequence
        mask-token  w_t = 1 if 1/C <= exp(gap_t) <= C else 0
        mask-seq    w_t = 1 if 1/C <= exp(mean_u gap_u) <= C else 0, for the whole sequence

    tis-seq uses the sum: exp(sum) is the product of the token ratios, the true sequence-level
    ratio pi_train(y) / pi_engine(y) (verl's sequence-level IS); the mean would be a length-
    normalised stand-in, not an importance weight. mask-seq uses the mean (the geometric-mean
    ratio): the largest token gap grows with the length, so an any-token rule would mask long
    responses more than short ones; the mean is length-neutral. It sits near 1, so its C wants to
    be near 1 too (e.g. 1.01). Masked tokens keep their KL and entropy terms and stay in the
    aggregation's denominator (Trainer._denominator, counted before the forward that measures the
    gap), so micro-batches and ranks still add up to the whole batch's loss.
    """
    mask = mask.to(gap.dtype)
    log_ratio = gap * mask  # per token [B, T]; per sequence [B, 1]: its sum (tis-seq) or mean
    if mode == "tis-seq":
        log_ratio = log_ratio.sum(-1, keepdim=True)
    elif mode == "mask-seq":
        log_ratio = log_ratio.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    elif mode not in ("tis-token", "mask-token"):
        raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)}, not {mode!r}")
    if mode.startswith("tis"):  # weights only, no token left out
        weight = log_ratio.exp().clamp(max=cap).expand_as(mask)
        return weight, torch.zeros_like(mask, dtype=torch.bool)
    out = (log_ratio.abs() > math.log(cap)).expand_as(mask) & mask.bool()
    return (~out).to(mask.dtype), out


# ---- training layout -------------------------------------------------------------------------

@dataclasses.dataclass
class Rows:
    """A micro-batch in training layout: for the model, each prompt once and its completions'
    responses after it, in one row; for the loss, the response tokens as a [B, R] batch (a
    completion per row)."""
    ids: torch.Tensor       # [1, L] the packed tokens
    positions: torch.Tensor | None  # [1, L] from 0 in each prompt, on from it in its responses
    packed: Packed | None   # the prompts' and responses' lengths in the row (model.Packed)
    resp_pos: torch.Tensor  # [B, R] where in the row the hidden state predicting token j of b is
    resp_ids: torch.Tensor  # [B, R]
    mask: torch.Tensor      # [B, R] 1 for real response tokens
    index: list[int]        # which completions these rows are


def micro_batches(comps, token_budget: int, pad_id: int, device) -> list[Rows]:
    """Completions in micro-batches of at most token_budget tokens (a longer one alone), a prompt's
    samples together while they fit, each prompt laid out once per micro-batch with its samples'
    responses after it: no padding reaches the model, and no prompt twice. Laid out on the host,
    one copy per tensor to `device`."""
    by_prompt = {}
    for i, c in enumerate(comps):
        by_prompt.setdefault(tuple(c.prompt_ids), []).append(i)
    batches, used = [], 0  # each micro-batch: {prompt: [completions]}
    for prompt, members in by_prompt.items():
        for i in members:
            cost = len(comps[i].response_ids) + (0 if batches and prompt in batches[-1] else
                                                 len(prompt))
            if batches and used + cost <= token_budget:
                batches[-1].setdefault(prompt, []).append(i)
                used += cost
            else:
                batches.append({prompt: [i]})
                used = len(prompt) + len(comps[i].response_ids)
    out, host = [], torch.device("cpu")
    for batch in batches:
        index = [i for members in batch.values() for i in members]
        R = max(max(len(comps[i].response_ids) for i in index), 1)
        resp_pos, rid = torch.zeros(2, len(index), R, dtype=torch.long, device=host)
        mask = torch.zeros(len(index), R, device=host)
        ids, positions, b = [], [], 0
        for prompt, members in batch.items():
            last = len(ids) + len(prompt) - 1  # the prompt's last token predicts each first token
            ids += prompt
            positions += range(len(prompt))
            for i in members:
                r = comps[i].response_ids
                predictors = [last, *range(len(ids), len(ids) + len(r) - 1)][:len(r)]
                resp_pos[b, :len(r)] = torch.tensor(predictors, dtype=torch.long, device=host)
                ids += r
                positions += range(len(prompt), len(prompt) + len(r))
                rid[b, :len(r)] = torch.tensor(r, dtype=torch.long, device=host)
                mask[b, :len(r)] = 1
                b += 1
        packed = Packed([len(p) for p in batch], [[len(comps[i].response_ids) for i in members]
                                                  for members in batch.values()])
        row = torch.tensor([ids, positions], dtype=torch.long, device=host).to(device)
        out.append(Rows(row[:1], row[1:], packed, resp_pos.to(device), rid.to(device),
                        mask.to(device), index))
    return out


def token_logprobs(model: Transformer, rows: Rows, temperature: float, keep=None):
    """Log-probs and entropies [B, R] of the response tokens at temperature T (fused: no logits;
    keep: memory the logits may stay in until the backward, see fused_logprob_entropy)."""
    h = model(rows.ids, rows.positions, rows.packed)
    hs = h.reshape(-1, h.shape[-1])[rows.resp_pos]
    sel = rows.mask.bool()
    lp, ent = fused_logprob_entropy(hs[sel], model.lm_head.weight, rows.resp_ids[sel], temperature,
                                    keep=keep)
    zeros = torch.zeros(rows.mask.shape, device=h.device)
    return zeros.masked_scatter(sel, lp), zeros.masked_scatter(sel, ent)


def stack_rows(d: dict, index: list[int], like: torch.Tensor):
    """Per-completion 1-D tensors d[i] for i in index as a batch shaped like `like` [B, R], cut or
    padded with 0 (a completion missing from d, or a padding micro-batch, is 0 throughout)."""
    out = torch.zeros(like.shape, device=like.device)
    for b, i in enumerate(index):
        if i in d:
            out[b, :len(d[i])] = d[i][:out.shape[1]]
    return out


# ---- the trainer -----------------------------------------------------------------------------

@dataclasses.dataclass
class TrainConfig:
    """What is not per stage (the stage carries the lr, warmup and every RL setting of the step)."""
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    token_budget: int = 16384   # tokens per packed micro-batch
    grad_checkpointing: bool = False


class Trainer:
    """Old (and reference) log-probs, then one GRPO update per mini-batch: micro-batch forward and
    backward, gradients summed across ranks (all-reduce, or fsdp's reduce-scatter), clip, AdamW."""

    def __init__(self, model: Transformer, cfg: TrainConfig, ref: Transformer | None = None,
                 pad_id: int = 0):
        self.model, self.cfg, self.ref, self.pad_id = model, cfg, ref, pad_id
        self.sharded = fsdp.is_sharded(model)
        self.device = next(model.parameters()).device
        model.gradient_checkpointing = cfg.grad_checkpointing
        # the learning rate is the stage's, set before every update (lr_at); fused: one pass over
        # each parameter (179M on a CPU: 0.08 s, the loop over tensors 0.6 s)
        self.opt = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=cfg.weight_decay,
                                     fused=True)
        if self.sharded:  # the units kept gathered hold the old weights after an update
            self.opt.register_step_post_hook(lambda *_: fsdp.weights_changed(model))
        self.updates = 0
        self.kept_logits = torch.empty(0, device=self.device)  # see _keep
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        # adaptive entropy control (_entropy_coef): alpha (None before the first step) and on/off
        self.ent_coef, self.ent_active = None, True

    @staticmethod
    def lr_at(update: int, st) -> float:
        """The stage's lr with a linear warmup over its first st.warmup_steps updates."""
        return st.lr * min(1.0, (update + 1) / max(st.warmup_steps, 1))

    def full_state_dict(self, compute: bool = False):
        """(name, full tensor) pairs; under fsdp every rank must consume them (all-gathered).
        compute: the weights as the forward uses them (--dtype), for the rollout engine's copy."""
        if not self.sharded:
            return self.model.state_dict().items()
        return fsdp.full_state_dict(self.model, compute)

    def _sum(self, x: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(x, op=op)
        return x

    def _micro(self, comps, index: list[int]) -> list[Rows]:
        """Micro-batches of comps[i], i in index; sharded models run collectives in every forward,
        so all ranks get as many micro-batches (empty ones padded in: a pad row, no loss tokens)."""
        mbs = micro_batches([comps[i] for i in index], self.cfg.token_budget, self.pad_id,
                            self.device)
        for mb in mbs:
            mb.index = [index[j] for j in mb.index]
        if self.sharded and self.world > 1:
            n = int(self._sum(torch.tensor(float(len(mbs)), device=self.device), dist.ReduceOp.MAX))
            z = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            mbs += [Rows(torch.full((1, 2), self.pad_id, device=self.device), None, None, z, z,
                         torch.zeros(1, 1, device=self.device), []) for _ in range(n - len(mbs))]
        return mbs

    @torch.no_grad()
    def _logprobs(self, model, mbs, temperature):
        return {i: logp for mb in mbs
                for i, logp in zip(mb.index, token_logprobs(model, mb, temperature)[0])}

    def _denominator(self, mbs, n_seqs: int, st):
        """The aggregation's denominator over the whole mini-batch on all ranks: tokens, sequences
        or B * T of the completions in mbs (left-out ones, keep False, are not there) -> (the
        loss's denominator, the global count unclamped: 0 when no rank has anything to learn)."""
        local = (sum(mb.mask.sum() for mb in mbs) if st.agg == "token-mean" else
                 n_seqs if st.agg == "seq-mean" else n_seqs * st.max_tokens)
        total = self._sum(torch.tensor(float(local), device=self.device))
        # fsdp averages gradients over ranks; the global-denominator loss wants a sum
        return total.clamp(min=1) / (self.world if self.sharded else 1), total

    def _reduce_and_clip(self) -> torch.Tensor:
        """Sum gradients over ranks (fsdp reduce-scattered them), clip them -> their global norm."""
        if self.sharded:
            return fsdp.clip_grad_norm_(self.model, self.cfg.grad_clip)
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.world > 1 and all(p.grad is None for p in params):
            for p in params:  # this rank had nothing to learn (every completion left out)
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params if p.grad is not None]
        if self.world > 1:  # each rank's loss already carries the global denominator: sum, not mean
            flat = self._sum(torch.cat([g.flatten() for g in grads]))
            for g, summed in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(summed.view_as(g))
        return torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)

    def step(self, comps, adv: torch.Tensor, st, keep=None) -> dict:
        """comps: this rank's completions; adv [len(comps)]; st: the stage (mini_batches: optimizer
        updates per step); keep: None, or a bool per completion: False leaves it out of the step
        entirely (DAPO's overlong filtering): no forward, no policy/KL/entropy term, not in any
        denominator (tokens, sequences, B * T). Mini-batches are cut by position in comps before the
        left-out ones are dropped, so keep moves nothing into another update."""
        self.model.train()
        kept = [i for i in range(len(comps)) if keep is None or keep[i]]
        per = math.ceil(len(comps) / st.mini_batches)
        parts = [[i for i in kept if k * per <= i < (k + 1) * per] for k in range(st.mini_batches)]
        mbs_all = self._micro(comps, kept)
        old = self.old_logprobs(mbs_all, st)
        use_ref = self.ref is not None and st.kl_coef
        ref = self._logprobs(self.ref, mbs_all, st.temperature) if use_ref else None
        adv = adv.to(self.device)
        ent_coef = self._entropy_coef(st)
        sums = {k: torch.zeros((), device=self.device) for k in STAT_KEYS}
        gap, skipped, start, grad_norm = {}, 0, self.updates, torch.zeros((), device=self.device)
        for part in parts:
            mbs = mbs_all if st.mini_batches == 1 else self._micro(comps, part)
            denom, total = self._denominator(mbs, len(part), st)
            self.opt.zero_grad(set_to_none=True)
            if not bool(total > 0):  # no rank has a completion in this mini-batch: no update
                continue
            for mb in mbs:
                mb_sums, mb_gap = self._micro_step(mb, comps, adv, st, old, ref, denom, ent_coef)
                sums = {k: sums[k] + mb_sums[k] for k in sums}
                gap.update(mb_gap)
            grad_norm = self._reduce_and_clip()
            for g in self.opt.param_groups:
                g["lr"] = self.lr_at(self.updates, st)
            if torch.isfinite(grad_norm):  # the global norm, same on every rank: all skip together
                self.opt.step()
            else:
                skipped += 1
            self.updates += 1
        out = self._metrics(sums, gap, mbs_all, [comps[i] for i in kept])
        out.update({"grad_norm": float(grad_norm), "lr": self.lr_at(max(self.updates - 1, 0), st),
                    "skipped_updates": skipped, "entropy/coef": ent_coef})
        if self.updates > start:  # some mini-batch measured the entropy
            self._entropy_update(st, out["entropy/mean"])
        return out

    def old_logprobs(self, mbs, st) -> dict | None:
        """The log-probs before the update, per completion. With one update per rollout batch the
        policy being trained is the one that sampled, so each micro-batch's own log-probs,
        detached, are the old ones (ratio 1, the same loss and gradient): None, no extra forward.
        With several mini-batches the later ones need the log-probs from before the first update."""
        return None if st.mini_batches == 1 else self._logprobs(self.model, mbs, st.temperature)

    def _keep(self, mb: Rows) -> torch.Tensor | None:
        """Memory for the micro-batch's logits from its forward to its backward, which then skips
        recomputing them: on a CPU, up to KEEP_ELEMS of them, in one buffer grown to the largest
        micro-batch and reused (a fresh one each time costs more in page faults than it saves)."""
        need = int(mb.mask.sum()) * self.model.config.vocab_size if self.device.type == "cpu" else 0
        if not 0 < need <= KEEP_ELEMS:
            return None
        if self.kept_logits.numel() < need:
            self.kept_logits = torch.empty(need, device=self.device)
        return self.kept_logits

    def _micro_step(self, mb: Rows, comps, adv, st, old, ref, denom, ent_coef) -> tuple[dict, dict]:
        """Forward, loss and backward of one micro-batch -> (its stats as token-weighted sums, the
        trainer-minus-engine log-prob gap of its completions before any update: {index: [R]})."""
        logp, ent = token_logprobs(self.model, mb, st.temperature, self._keep(mb))
        old_logp = logp.detach() if old is None else stack_rows(old, mb.index, logp)
        ref_logp = None if ref is None else stack_rows(ref, mb.index, logp)
        gap = {i: old_logp[b, :len(comps[i].logprobs)] - old_logp.new_tensor(comps[i].logprobs)
               for b, i in enumerate(mb.index) if comps[i].logprobs}
        weight, masked = (None, None) if st.correction == "none" else rollout_correction(
            stack_rows(gap, mb.index, old_logp), mb.mask, st.correction, st.correction_cap)
        mb_adv = adv[mb.index] if mb.index else logp.new_zeros(len(logp))  # a pad row: A = 0
        loss, stats = grpo_loss(logp, old_logp, mb_adv, mb.mask, clip_low=st.clip_low,
                                clip_high=st.clip_high, ref_logp=ref_logp, kl_coef=st.kl_coef,
                                entropy=ent, entropy_coef=ent_coef, agg=st.agg, denom=denom,
                                is_weight=weight, loss=st.loss)
        loss.backward()
        sums = {k: v * stats["tokens"] if k != "tokens" else v for k, v in stats.items()}
        sums["rollout/masked_frac"] = masked.sum() if masked is not None else logp.new_zeros(())
        return sums, gap

    def _metrics(self, sums: dict, gap: dict, mbs_all, comps) -> dict:
        """Token-weighted means over all ranks (rollout/masked_frac: the share of response tokens
        left out), the trainer/engine log-prob gap and the share of the completions' tokens that
        laying each prompt out once saved; one copy to the host."""
        tot = self._sum(torch.stack([sums[k] for k in STAT_KEYS]).float())
        diffs = torch.cat([d.abs() for d in gap.values()] or [torch.zeros(1, device=self.device)])
        dsum = self._sum(torch.stack([diffs.sum(), diffs.new_tensor(float(diffs.numel()))]))
        dmax = self._sum(diffs.max().clone(), dist.ReduceOp.MAX)
        host = torch.cat([tot[1:] / tot[0].clamp(min=1), (dsum[0] / dsum[1].clamp(min=1))[None],
                          dmax[None].to(tot.dtype)]).tolist()
        out = dict(zip(STAT_KEYS[1:], host))
        out["rollout/logprob_absdiff"], out["rollout/logprob_maxdiff"] = host[-2], host[-1]
        computed = sum(mb.ids.numel() for mb in mbs_all if mb.index)
        alone = sum(len(c.prompt_ids) + len(c.response_ids) for c in comps)
        out["prompt_shared_frac"] = 1 - computed / alone if alone else 0.0
        return out

    def _entropy_coef(self, st) -> float:
        """This step's entropy coefficient: st.entropy_coef, unless st.target_entropy > 0: then
        Skywork-OR1's adaptive entropy control. The trainer keeps a coefficient alpha (starting at
        st.entropy_coef) and, after each step whose measured entropy is e (the token mean over all
        ranks, at the sampling temperature: set the target for that temperature),
            alpha <- clamp(alpha + entropy_lr * sign(target - e), 0, entropy_coef_max)
            coef = alpha if e <= target else 0    (the term is on only at or below the target)
        Skywork measures e on the step's batch before its update; here e comes from the step's own
        forward, the one the loss needs, so the rule runs one step later: a step uses the alpha and
        the e <= target of the step before (the first step: alpha = st.entropy_coef, on). Skywork's
        step is 0.005 (entropy_lr's default) and it only floors alpha at 0; entropy_coef_max is our
        guard against a coefficient that climbs while the entropy cannot reach the target."""
        if not st.target_entropy:
            return st.entropy_coef
        self.ent_coef = st.entropy_coef if self.ent_coef is None else self.ent_coef
        return self.ent_coef if self.ent_active else 0.0

    def _entropy_update(self, st, entropy: float):
        """The adaptive coefficient's move after a step (_entropy_coef); nothing when it is off."""
        if st.target_entropy:
            sign = (entropy < st.target_entropy) - (entropy > st.target_entropy)
            self.ent_coef = min(max(self.ent_coef + st.entropy_lr * sign, 0.0), st.entropy_coef_max)
            self.ent_active = entropy <= st.target_entropy

    def state_dict(self) -> dict:
        """This rank's optimizer state (its shards under fsdp), the update count and the adaptive
        entropy coefficient (the same on every rank)."""
        return {"opt": self.opt.state_dict(), "updates": self.updates,
                "entropy_coef": self.ent_coef, "entropy_active": self.ent_active}

    def load_state_dict(self, state: dict):
        self.opt.load_state_dict(state["opt"])
        self.updates = state["updates"]
        self.ent_coef, self.ent_active = state["entropy_coef"], state["entropy_active"]
