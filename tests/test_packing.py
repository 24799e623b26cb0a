"""Packed training rows: several completions in one row, each prompt once with its samples'
responses after it, positions restarting and attention kept inside each prompt + response, give
what each completion gives alone (values and gradients, Qwen2 and Llama shapes, with and without
activation checkpointing); and skipping the old-log-prob forward (one update per rollout batch)
leaves the loss, the gradients and the metrics as they were."""
import copy
import random

import pytest
import torch

from model import Config, Transformer, init_weights
from rollout import Completion
from trainer import Trainer, TrainConfig, micro_batches

SHAPES = {  # Qwen2: q/k/v biases, tied head; Llama: no biases, its own head
    "qwen2": dict(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  attention_bias=True, tie_word_embeddings=True),
    "llama": dict(vocab_size=50, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                  attention_bias=False, tie_word_embeddings=False),
}


def completions(n, seed=0, engine_logprobs=False, samples=1):
    """n prompts, `samples` completions of each (prompt-major, as the engine returns them)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = [rng.randrange(2, 50) for _ in range(rng.randrange(2, 12))]
        for _ in range(samples):
            r = [rng.randrange(2, 50) for _ in range(rng.randrange(1, 20))]
            lps = [-rng.random() * 3 for _ in r] if engine_logprobs else []
            out.append(Completion(p, r, lps, "stop"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("ckpt", [False, True])
def test_packed_rows_equal_each_sequence_alone(shape, ckpt):
    """In float64 (the model keeps its norms and rotary embedding in fp32, so a layout-dependent
    fp64 rounding can move an fp32 rounding by one ulp: ~1e-7 relative), hidden states at the
    response positions and every parameter's gradient of a random linear function of them."""
    torch.manual_seed(0)
    m = init_weights(Transformer(Config(**SHAPES[shape])), std=0.2, seed=1).double().train()
    m.gradient_checkpointing = ckpt
    comps = completions(4, samples=3) + completions(2, seed=1)
    mbs = micro_batches(comps, 48, 0, "cpu")
    assert len(mbs) > 1 and all(len(mb.index) > 1 for mb in mbs[:-1])  # really packed, several rows
    shared = [n for mb in mbs for n in map(len, mb.packed.responses)]
    assert max(shared) > 1 and len(shared) > 6  # prompts laid out once for several samples, and
    # some group's samples split over two micro-batches (its prompt in both)
    for mb in mbs:  # no padding at all
        assert mb.ids.numel() == sum(mb.packed.prompts) + sum(map(sum, mb.packed.responses))
    G = {i: torch.randn(len(c.response_ids), 64, dtype=torch.float64) for i, c in enumerate(comps)}
    packed, alone = {}, {}
    m.zero_grad()
    for mb in mbs:
        h = m(mb.ids, mb.positions, mb.packed).reshape(-1, 64)[mb.resp_pos]
        loss = 0
        for b, i in enumerate(mb.index):
            n = len(comps[i].response_ids)
            packed[i] = h[b, :n].detach()
            loss = loss + (h[b, :n] * G[i]).sum()
        loss.backward()
    g_packed = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    for i, c in enumerate(comps):
        ids = torch.tensor([c.prompt_ids + c.response_ids])
        h = m(ids)[0, len(c.prompt_ids) - 1:-1]
        alone[i] = h.detach()
        (h * G[i]).sum().backward()
    scale = max(x.abs().max().item() for x in alone.values())
    for i in alone:
        assert (packed[i] - alone[i]).abs().max() <= 1e-6 * scale, i
    g_alone = {k: p.grad for k, p in m.named_parameters() if p.grad is not None}
    assert sorted(g_alone) == sorted(g_packed) and len(g_alone) >= 15  # all but an untied head
    for k, g in g_alone.items():
        assert (g_packed[k] - g).norm() <= 1e-6 * g.norm(), k


def test_skipping_the_old_logprob_forward_changes_nothing():
    """One update per rollout batch: the old log-probs are the forward's own (detached). Against the
    separate no-grad forward: the same gradients, weights and metrics, with KL to a reference and
    truncated importance sampling against engine log-probs on."""
    from settings import Stage
    torch.manual_seed(0)
    base = init_weights(Transformer(Config(**SHAPES["qwen2"])), std=0.2, seed=3)
    ref = copy.deepcopy(base).requires_grad_(False)
    comps = completions(3, seed=5, engine_logprobs=True, samples=4)
    adv = torch.randn(12)
    st = Stage("L2", 20, batch=3, n=4, steps=1, lr=1e-2, kl_coef=0.1, entropy_coef=0.01,
               correction="tis-token", correction_cap=1.5)
    class Recompute(Trainer):  # the separate no-grad forward even with one update per batch
        def old_logprobs(self, mbs, st):
            return self._logprobs(self.model, mbs, st.temperature)

    results = []
    for kind in (Trainer, Recompute):
        m = copy.deepcopy(base)
        tr = kind(m, TrainConfig(token_budget=40), ref)
        calls = []
        m.register_forward_pre_hook(lambda mod, args: calls.append(torch.is_grad_enabled()))
        stats = tr.step(comps, adv, st)
        grads = {k: p.grad.clone() for k, p in m.named_parameters()}
        results.append((stats, grads, {k: v.detach().clone() for k, v in m.state_dict().items()},
                        calls.count(False)))
    (s1, g1, w1, nograd1), (s2, g2, w2, nograd2) = results
    n_mb = len(micro_batches(comps, 40, 0, "cpu"))
    assert nograd1 == 0 and nograd2 == n_mb  # the forward really was skipped, and really run
    for k in g1:  # the same computation up to the separate forward's rounding (identical on a CPU)
        assert torch.allclose(g1[k], g2[k], rtol=1e-6, atol=1e-9), k
        assert torch.allclose(w1[k], w2[k], rtol=1e-6, atol=1e-9), k
    for k in s1:
        assert s1[k] == pytest.approx(s2[k], rel=1e-6, abs=1e-9), k
    assert s1["rollout/logprob_absdiff"] > 0 and s1["prompt_shared_frac"] > 0
