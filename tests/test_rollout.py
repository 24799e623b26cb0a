"""The native engine: greedy equals argmax without a cache; its log-probs equal the trainer's."""
import pytest
import torch

from trainer import micro_batches, token_logprobs
from model import Config, Transformer, init_weights
from rollout import TorchEngine


def tiny(seed=0):
    cfg = Config(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, eos_token_id=3)
    return init_weights(Transformer(cfg), std=0.2, seed=seed).eval()


PROMPTS = [[5, 9, 11, 40, 2], [7], [13, 14, 15, 16, 17, 18, 19, 20, 21], [30, 31]]


def argmax_no_cache(model, prompt, max_tokens, eos):
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(max_tokens):
            z = model.logits(model(torch.tensor([ids])))[0, -1]
            t = int(z.argmax())
            out.append(t)
            ids.append(t)
            if t == eos:
                break
    return out


def test_greedy_equals_stepwise_argmax():
    m = tiny()
    eng = TorchEngine(m, [3], pad_id=0)
    comps = eng.generate(PROMPTS, n=2, max_tokens=24, temperature=0.0)
    assert len(comps) == 8
    for i, p in enumerate(PROMPTS):
        want = argmax_no_cache(m, p, 24, 3)
        for j in range(2):
            c = comps[i * 2 + j]
            assert c.prompt_ids == p
            assert c.response_ids == want
            assert c.finish_reason == ("stop" if want[-1] == 3 else "length")


def test_sampled_logprobs_equal_trainer_logprobs():
    m = tiny(1)
    eng = TorchEngine(m, [3], pad_id=0)
    for T in (1.0, 0.7):
        comps = eng.generate(PROMPTS, n=3, max_tokens=20, temperature=T, seed=5)
        lens = {len(c.response_ids) for c in comps}
        assert len(lens) > 1 or max(lens) == 20
        with torch.no_grad():
            for mb in micro_batches(comps, 64, 0, "cpu"):  # several packed micro-batches
                lp, _ = token_logprobs(m, mb, T)
                for b, i in enumerate(mb.index):
                    got = lp[b, :len(comps[i].logprobs)]
                    assert torch.allclose(got, torch.tensor(comps[i].logprobs), atol=1e-5)


def test_seeded_sampling_is_reproducible_and_top_p_restricts():
    m = tiny(2)
    eng = TorchEngine(m, [3])
    a = eng.generate(PROMPTS, n=4, max_tokens=12, temperature=1.0, seed=9)
    b = eng.generate(PROMPTS, n=4, max_tokens=12, temperature=1.0, seed=9)
    c = eng.generate(PROMPTS, n=4, max_tokens=12, temperature=1.0, seed=10)
    assert [x.response_ids for x in a] == [x.response_ids for x in b]
    assert [x.response_ids for x in a] != [x.response_ids for x in c]
    # top_p -> 0 keeps only the most likely token: greedy
    g = eng.generate(PROMPTS, n=1, max_tokens=12, temperature=0.0)
    t = eng.generate(PROMPTS, n=1, max_tokens=12, temperature=1.0, top_p=1e-6, seed=3)
    assert [x.response_ids for x in g] == [x.response_ids for x in t]


def test_split_calls_match_one_call():
    """max_rows forces several internal batches; the seeds keep each prompt's output independent of batching."""
    m = tiny(3)
    one = TorchEngine(m, [3], max_rows=512).generate(PROMPTS, n=2, max_tokens=10, temperature=0.0)
    many = TorchEngine(m, [3], max_rows=2).generate(PROMPTS, n=2, max_tokens=10, temperature=0.0)
    assert [c.response_ids for c in one] == [c.response_ids for c in many]


def test_sampler_draws_from_the_tempered_top_p_distribution():
    """Frequencies over 200K draws match softmax(z / T) (cut to top-p and renormalised) within sampling noise;
    tokens outside the top-p set, and those of zero probability, are never drawn."""
    from rollout import sample
    g = torch.Generator().manual_seed(0)
    z = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -30.0, float("-inf"), 1.5])
    rows = 200_000
    for T, top_p in ((1.0, 1.0), (0.7, 1.0), (1.0, 0.8)):
        tok, lp = sample(z.expand(rows, -1).clone(), T, top_p, g)
        want = torch.softmax(z.double() / T, -1)
        assert torch.allclose(lp.double(), want.log()[tok], atol=1e-5)  # log-prob of the tempered distribution
        if top_p < 1:
            order = want.argsort(descending=True)
            keep = order[:int(((want[order].cumsum(0) - want[order]) <= top_p).sum())]
            cut = torch.zeros_like(want)
            cut[keep] = want[keep]
            want = cut / cut.sum()
        freq = torch.bincount(tok, minlength=len(z)).double() / rows
        assert (freq[want == 0] == 0).all()
        sd = (want * (1 - want) / rows).sqrt()
        assert ((freq - want).abs() <= 5 * sd + 1e-12).all(), (T, top_p, freq, want)


@pytest.mark.slow
def test_packed_cpu_weights_follow_in_place_updates():
    """The CPU engine decodes on pre-packed copies of the weights; after an in-place update of the policy
    (an optimizer step, a copy_ from the trainer) it must sample from the new weights, not the packed old ones."""
    m = tiny(4)
    eng = TorchEngine(m, [3], pad_id=0)
    assert eng.packed == torch.backends.mkldnn.is_available()
    plain = TorchEngine(m, [3], pad_id=0, packed=False)
    before = eng.generate(PROMPTS, n=1, max_tokens=16, temperature=0.0)
    assert [c.response_ids for c in before] == [argmax_no_cache(m, p, 16, 3) for p in PROMPTS]
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m.logits(m(torch.tensor([PROMPTS[2]]))).pow(2).mean().backward()
    opt.step()  # in place, like the trainer's AdamW
    after = eng.generate(PROMPTS, n=1, max_tokens=16, temperature=0.0)
    want = [argmax_no_cache(m, p, 16, 3) for p in PROMPTS]
    assert [c.response_ids for c in after] == want != [c.response_ids for c in before]
    assert [c.response_ids for c in plain.generate(PROMPTS, n=1, max_tokens=16, temperature=0.0)] == want
    with torch.no_grad():
        m.lm_head.weight.copy_(torch.randn_like(m.lm_head.weight))  # the head alone (tied: the embedding too)
    assert [c.response_ids for c in eng.generate(PROMPTS, n=1, max_tokens=16, temperature=0.0)] == \
        [argmax_no_cache(m, p, 16, 3) for p in PROMPTS]


@pytest.mark.parametrize("temperature", [1.0, 0.6])
@pytest.mark.parametrize("block_bytes", [1 << 19, 4096 * 8])  # one block; blocks of 1,024 / 256 entries
def test_the_two_pass_sampler_draws_what_the_whole_row_sampler_draws(monkeypatch, temperature, block_bytes):
    """The same uniforms give the same tokens as the inverse CDF over the whole row (float64 sums
    both; only a uniform within float rounding of a boundary could differ: none here) and the same
    log-probs; whole blocks of -inf, a 152K vocabulary and NaN/inf rows included."""
    import rollout
    monkeypatch.setattr(rollout, "SAMPLE_BLOCK_BYTES", block_bytes)
    cases = [torch.randn(64, 5000) * 3, torch.randn(8, 151936) * 2, torch.randn(33, 999)]
    cases[0][:, 1024:3000] = float("-inf")  # blocks with no mass
    cases[0][:, 4000] += 40.0  # one token holds nearly all of it
    for logits in cases:
        new = rollout.sample(logits, temperature, 1.0, torch.Generator().manual_seed(5))
        old = rollout._sample_full(logits, temperature, 1.0, torch.Generator().manual_seed(5))
        assert torch.equal(new[0], old[0])
        assert torch.allclose(new[1], old[1], atol=2e-5, rtol=1e-5)
    bad = torch.randn(4, 300)
    bad[1, 7], bad[2, 9] = float("nan"), float("inf")
    new = rollout.sample(bad, temperature, 1.0, torch.Generator().manual_seed(1))
    old = rollout._sample_full(bad, temperature, 1.0, torch.Generator().manual_seed(1))
    assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1])


def test_auto_takes_the_native_engine_on_a_cpu_and_vllm_on_a_gpu():
    from model import load_config
    from rollout import choose_engine
    import data
    cfg = load_config(data.TOY_MODEL)
    assert choose_engine("auto", cfg, torch.device("cpu"))[0] == "torch"
    assert choose_engine("torch", cfg, torch.device("cuda")) == ("torch", "asked for torch")
    pytest.importorskip("vllm")
    assert choose_engine("auto", cfg, torch.device("cuda")) == ("vllm", "auto: on a GPU")
    assert choose_engine("vllm", cfg, torch.device("cpu")) == ("vllm", "asked for")
