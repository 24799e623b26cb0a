"""The native engine: greedy equals argmax without a cache; its log-probs equal the trainer's."""
import torch

from grpo import micro_batches, token_logprobs
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
            for mb in micro_batches(comps, 64, 0, "cpu"):  # several micro-batches, padded rows
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
