"""model.py against transformers: same logits both ways round, checkpoints readable by each other."""
import os

import pytest
import torch

from model import Config, Transformer, init_weights, load_config

transformers = pytest.importorskip("transformers")


def small_config(kind: str, tied: bool) -> Config:
    return Config(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rope_theta=5000.0,
                  rms_norm_eps=1e-5, tie_word_embeddings=tied, attention_bias=kind == "qwen2", model_type=kind,
                  eos_token_id=1)


def randomize(model, seed=0):
    """Random everything, norms and biases included, so no term can hide behind a 1 or a 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "norm" in name else 0.08) + ("norm" in name))
    return model


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32,
                                                             attn_implementation="eager").eval()


@pytest.mark.parametrize("kind,tied", [("qwen2", True), ("qwen2", False), ("llama", False), ("llama", True)])
def test_ours_to_transformers_and_back(tmp_path, kind, tied):
    ours = randomize(Transformer(small_config(kind, tied)))
    ours.save_pretrained(str(tmp_path / "ours"))
    theirs = hf_model(str(tmp_path / "ours"))
    ids = torch.randint(0, 97, (3, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = theirs(ids).logits
        got = ours.logits(ours(ids))
    assert (got - ref).abs().max() < 1e-4
    # and their checkpoint loads into ours
    theirs.save_pretrained(str(tmp_path / "theirs"))
    back = Transformer.from_pretrained(str(tmp_path / "theirs"))
    with torch.no_grad():
        assert (back.logits(back(ids)) - ref).abs().max() < 1e-4
    assert back.config.tie_word_embeddings == tied


def test_transformers_checkpoint_random_init(tmp_path):
    """A model transformers builds (its own init, Qwen2 biases) read by ours."""
    cfg = transformers.Qwen2Config(vocab_size=150, hidden_size=128, intermediate_size=200, num_hidden_layers=3,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    theirs = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    theirs.save_pretrained(str(tmp_path))
    ours = Transformer.from_pretrained(str(tmp_path))
    ids = torch.randint(0, 150, (2, 17))
    with torch.no_grad():
        assert (ours.logits(ours(ids)) - theirs(ids).logits).abs().max() < 1e-4


def test_sharded_checkpoint_roundtrip(tmp_path):
    m = randomize(Transformer(small_config("qwen2", False)))
    m.save_pretrained(str(tmp_path), max_shard_bytes=40_000)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    back = Transformer.from_pretrained(str(tmp_path))
    for (n, a), (_, b) in zip(m.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    theirs = hf_model(str(tmp_path))
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert (theirs(ids).logits - m.logits(m(ids))).abs().max() < 1e-4


def test_bad_checkpoints_say_what_is_wrong(tmp_path):
    m = Transformer(small_config("qwen2", False))
    init_weights(m)
    m.save_pretrained(str(tmp_path))
    cfg = (tmp_path / "config.json").read_text().replace('"hidden_size": 64', '"hidden_size": 32')
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match="model.safetensors: .* has shape"):
        Transformer.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: invalid JSON"):
        load_config(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Transformer.from_pretrained(str(tmp_path / "nowhere"))


def test_r1_distill_1p5b_shape_on_meta():
    cfg = Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072, rope_theta=10000.0,
                 tie_word_embeddings=False, model_type="qwen2")
    with torch.device("meta"):
        m = Transformer(cfg)
    n = m.num_params()
    print(f"DeepSeek-R1-Distill-Qwen-1.5B shape: {n:,} parameters")
    # embed + head 2 x 151936 x 1536; per layer q,k,v (+bias), o, 3 MLP matrices, 2 norms; final norm
    per_layer = (1536 * 1536 + 1536) + 2 * (1536 * 256 + 256) + 1536 * 1536 + 3 * 1536 * 8960 + 2 * 1536
    assert n == 2 * 151936 * 1536 + 28 * per_layer + 1536 == 1_777_088_000
    ids = torch.zeros(1, 4, dtype=torch.long, device="meta")
    assert m(ids).shape == (1, 4, 1536)


def test_gradient_checkpointing_same_gradients():
    m = randomize(Transformer(small_config("qwen2", True)))
    ids = torch.randint(0, 97, (2, 11))
    grads = []
    for gc in (False, True):
        m.zero_grad()
        m.gradient_checkpointing = gc
        m.train()
        m.logits(m(ids)).square().mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)
