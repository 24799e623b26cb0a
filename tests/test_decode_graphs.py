"""The static-shape decode step (the body of the CUDA graph) against the dynamic one: the same tokens,
greedy and sampled, through row dropping; on a GPU also the graph replay itself."""
import pytest
import torch

import rollout
from model import Config, Transformer, init_weights
from rollout import TorchEngine

PROMPTS = [[5, 9, 11, 40, 2], [7], [13, 14, 15, 16, 17, 18, 19, 20, 21], [30, 31]]


def tiny(seed, device="cpu"):
    cfg = Config(vocab_size=61, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, eos_token_id=3)
    return init_weights(Transformer(cfg), std=0.2, seed=seed).to(device).eval()


@pytest.fixture
def selects(monkeypatch):
    """Counts KVCache.select calls: the expansion to n samples, then one per drop of finished rows."""
    calls = []
    orig = rollout.KVCache.select

    def counted(self, rows):
        calls.append(len(rows))
        return orig(self, rows)
    monkeypatch.setattr(rollout.KVCache, "select", counted)
    return calls


def run(m, decode, packed=None, **kw):
    eng = TorchEngine(m, [3], pad_id=0, decode=decode, packed=packed)
    return eng.generate(PROMPTS, **kw)


@pytest.mark.parametrize("packed", [None, False])
def test_static_greedy_equals_dynamic(selects, packed):
    """Greedy, token for token, with rows finishing at EOS and leaving the batch (checked: the cache
    was cut at least once after the expansion)."""
    kw = dict(n=3, max_tokens=40, temperature=0.0)
    for seed in range(6):
        m = tiny(seed)
        selects.clear()
        a = run(m, "dynamic", packed, **kw)
        dropped = len(selects) > 1
        b = run(m, "static", packed, **kw)
        assert [c.response_ids for c in a] == [c.response_ids for c in b]
        assert [c.finish_reason for c in a] == [c.finish_reason for c in b]
        if dropped:
            return
    pytest.fail("no seed made rows finish early enough to be dropped")


def test_static_sampling_equals_dynamic(selects):
    """Seeded sampling: the same uniforms meet logits equal up to fp32 rounding (the masked
    columns add exact zeros to the softmax; only the order of the sums can differ), so the same tokens,
    and log-probs within 1e-5 (the bound the engine-vs-trainer test uses for the same quantity)."""
    m = tiny(7)
    kw = dict(n=8, max_tokens=48, temperature=1.0, top_p=0.95, seed=3)
    a = run(m, "dynamic", **kw)
    assert len(selects) > 2 and len({len(c.response_ids) for c in a}) > 1
    b = run(m, "static", **kw)
    assert [c.response_ids for c in a] == [c.response_ids for c in b]
    for x, y in zip(a, b):
        assert torch.allclose(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-5)


def test_graph_needs_cuda_and_decode_is_checked():
    m = tiny(0)
    with pytest.raises(ValueError):
        TorchEngine(m, [3], decode="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError):
            TorchEngine(m, [3], decode="graph")
    assert TorchEngine(m, [3]).decode == "dynamic"  # the CPU default: as fast as before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_equals_eager_static(dtype):
    """The recorded graph replays exactly the static step's kernels: identical tokens and
    log-probs; greedy equals the dynamic path's tokens in fp32."""
    m = tiny(1, "cuda").to(dtype)
    kw = dict(n=4, max_tokens=40, temperature=1.0, seed=2)
    g, s = run(m, "graph", **kw), run(m, "static", **kw)
    assert [c.response_ids for c in g] == [c.response_ids for c in s]
    assert [c.logprobs for c in g] == [c.logprobs for c in s]
    assert TorchEngine(m, [3]).decode == "graph"
    if dtype == torch.float32:
        kw = dict(n=2, max_tokens=40, temperature=0.0)
        assert [c.response_ids for c in run(m, "graph", **kw)] == \
            [c.response_ids for c in run(m, "dynamic", **kw)]


def test_static_decode_names_its_devices():
    """Every tensor the static path makes names its device (tests/device_guard.py)."""
    from tests.device_guard import project_tensors_on_meta
    m = tiny(0)
    with project_tensors_on_meta() as guard:
        run(m, "static", n=2, max_tokens=8, temperature=1.0, seed=1)
    assert not guard.caught, guard.caught
