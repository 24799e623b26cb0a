"""The policy: a Qwen2 / Llama-family decoder in plain torch, with Hugging Face checkpoints in
and out.

    h_0 = embed(ids)
    h_l = h_{l-1} + Attn(RMSNorm(h_{l-1}));  h_l = h_l + MLP(RMSNorm(h_l))      for l = 1..L
    out = RMSNorm(h_L)                       (returned; the LM head is applied by the caller)

Attn is grouped-query attention with rotary embeddings (rotate-half convention, as in transformers),
q/k/v biases when the config has them (Qwen2); MLP is SwiGLU: down(silu(gate(x)) * up(x)).
Parameter names equal the Hugging Face ones (model.layers.0.self_attn.q_proj.weight, ...), so a
state_dict is a checkpoint and a checkpoint is a state_dict.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    max_position_embeddings: int = 32768
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool | None = None  # None: True for qwen2 (q/k/v biases), False for llama
    model_type: str = "qwen2"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str = "float32"
    # the source's; else the release whose config format this is (transformers 5 takes a config
    # without one for a possible Mistral one and warns that its tokenizer's regex may be wrong)
    transformers_version: str = "4.45.0"

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.attention_bias is None:
            self.attention_bias = self.model_type == "qwen2"

    @classmethod
    def from_hf(cls, d: dict, path: str = "config.json") -> "Config":
        """Read a transformers config.json dict; refuse what this file does not implement and a
        field that is missing, of the wrong type or out of range, naming it."""
        if not isinstance(d, dict):
            raise ValueError(f"{path}: not a JSON object")
        mt = d.get("model_type")
        if mt not in ("qwen2", "llama"):
            raise ValueError(f"{path}: model_type {mt!r} is not supported (qwen2 or llama)")
        rp = d.get("rope_parameters") or {}  # transformers >= 5 moves rope_theta in here
        for rs in (d.get("rope_scaling"), rp):
            if rs and (not isinstance(rs, dict)
                       or rs.get("rope_type", rs.get("type")) not in (None, "default")):
                raise ValueError(f"{path}: rope scaling {rs} is not supported (plain RoPE only)")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known and v is not None}
        if "rope_theta" not in kw and "rope_theta" in rp:
            kw["rope_theta"] = rp["rope_theta"]
        kw["attention_bias"] = mt == "qwen2" or d.get("attention_bias") or False
        if "num_attention_heads" in kw:
            kw.setdefault("num_key_value_heads", kw["num_attention_heads"])
        kw["torch_dtype"] = str(d.get("torch_dtype") or d.get("dtype") or "float32")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in kw]
        if missing:
            raise ValueError(f"{path}: missing field(s) {', '.join(missing)}")
        for f in fields(cls):
            if f.name in kw and not of_type(kw[f.name], f.type):
                raise ValueError(f"{path}: {f.name} is {kw[f.name]!r}, expected "
                                 f"{f.type.removesuffix(' | None')}")
            if f.type == "int" and kw.get(f.name, 1) < 1:  # the sizes and counts
                raise ValueError(f"{path}: {f.name} is {kw[f.name]}, expected at least 1")
        cfg = cls(**kw)
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise ValueError(f"{path}: num_attention_heads {cfg.num_attention_heads} is not a "
                             f"multiple of num_key_value_heads {cfg.num_key_value_heads}")
        if cfg.head_dim < 2 or cfg.head_dim % 2:
            raise ValueError(f"{path}: head_dim {cfg.head_dim} (else hidden_size / "
                             "num_attention_heads) must be even and at least 2 (rotary embeddings)")
        return cfg

    def to_hf(self) -> dict:
        d = asdict(self)
        arch = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[self.model_type]
        d.update(architectures=[arch], hidden_act="silu", use_cache=True)
        if self.model_type == "qwen2":
            d.pop("attention_bias")
            d.update(use_sliding_window=False, sliding_window=None,
                     max_window_layers=self.num_hidden_layers)
        else:
            d["mlp_bias"] = False
        return d


def of_type(value, annotation: str) -> bool:
    """Whether a JSON value fits a Config field's annotation ("int | list[int] | None", ...); a
    boolean is no number and a number no boolean."""
    types = {"int": int, "float": (int, float), "bool": bool, "str": str}
    for kind in annotation.split(" | "):
        if kind == "list[int]" and isinstance(value, list):
            return all(of_type(v, "int") for v in value)
        if isinstance(value, types.get(kind, ())) and isinstance(value, bool) == (kind == "bool"):
            return True
    return False


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 as transformers does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def rope(pos: torch.Tensor, head_dim: int, theta: float):
    """pos [B, T] -> cos, sin [B, 1, T, D]: angle_i = pos / theta^(2i/D), halves duplicated."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    ang = pos.float()[..., None] * inv_freq
    ang = torch.cat([ang, ang], dim=-1)[:, None]
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    """x * cos + rotate_half(x) * sin, where rotate_half([a, b]) = [-b, a]."""
    a, b = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat([-b, a], dim=-1) * sin).to(x.dtype)


class KVCache:
    """Static cache [L, B, Hkv, Tmax, D]; all rows share one write column (prompts left-padded)."""

    def __init__(self, cfg: Config, batch: int, max_len: int, device, dtype):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k, self.v = (torch.zeros(shape, device=device, dtype=dtype) for _ in range(2))
        self.pos = 0  # columns filled so far

    def update(self, layer: int, k, v):
        t = k.shape[2]
        self.k[layer, :, :, self.pos:self.pos + t] = k
        self.v[layer, :, :, self.pos:self.pos + t] = v
        return self.k[layer, :, :, :self.pos + t], self.v[layer, :, :, :self.pos + t]

    def select(self, rows: torch.Tensor):
        """Keep (or repeat) batch rows: expand a prompt to n samples, drop finished sequences."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]


@dataclass
class Packed:
    """Groups laid back to back, filling one row (no padding): a prompt of prompts[g] tokens, then
    the responses that continue it, of responses[g] tokens each. A response attends (causally) to
    its prompt and itself, never to another response, so each prompt is computed once for all of
    its samples; the caller's position ids restart at 0 at each prompt and continue from the
    prompt's length in each of its responses. Every prompt has at least one response."""
    prompts: list[int]
    responses: list[list[int]]


def packed_attention(q, k, v, packed: Packed):
    """Causal attention over [prompt, response] for each response of each group: the prompt's own
    rows come from its first response's call (the later ones recompute and drop them: a few rows
    of attention, against a prompt's whole forward saved per sample). One call per sequence: on a
    CPU 4-8x faster than one call with a block mask; on CUDA each call is a flash kernel. split,
    not slices: its backward is one concatenation, a slice's a zero-filled full-size copy."""
    sizes = [n for p, rs in zip(packed.prompts, packed.responses) for n in (p, *rs)]
    qs, ks, vs = (iter(t.split(sizes, dim=2)) for t in (q, k, v))
    out = []
    for p, rs in zip(packed.prompts, packed.responses):
        pq, pk, pv = next(qs), next(ks), next(vs)
        for j, r in enumerate(rs):
            rq, rk, rv = next(qs), next(ks), next(vs)
            y = F.scaled_dot_product_attention(torch.cat([pq, rq], 2), torch.cat([pk, rk], 2),
                                               torch.cat([pv, rv], 2), is_causal=True,
                                               enable_gqa=True)
            prompt_rows, response_rows = y.split([p, r], dim=2)
            out += [prompt_rows, response_rows] if j == 0 else [response_rows]
    return torch.cat(out, dim=2)


class Attention(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_attention_heads * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, h, bias=False)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None):
        B, T, _ = x.shape
        q, k, v = (proj(x).view(B, T, -1, self.cfg.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        if isinstance(mask, Packed):
            y = packed_attention(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Holds the `model.*` parameters, so names match transformers' Qwen2Model / LlamaModel."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False

    def forward(self, input_ids, position_ids=None, mask=None, cache: KVCache | None = None):
        """Final normed hidden states [B, T, H].

        Training: prompts and their responses packed into a row, `mask` a Packed with their spans
        and `position_ids` to match (or one sequence per row: no mask, positions 0..T-1).
        Generation: left-padded rows with `position_ids`, a boolean `mask` [B, 1, T, S] and a
        `cache`."""
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = rope(position_ids, self.config.head_dim, self.config.rope_theta)
        x = self.model.embed_tokens(input_ids)
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.model.layers:
            x = (checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False) if recompute
                 else layer(x, cos, sin, mask, cache))
        return self.model.norm(x)

    def logits(self, hidden):
        """z = h W^T in fp32, for a few positions (training uses kernels.fused_logprob_entropy)."""
        return hidden.float() @ self.lm_head.weight.float().T

    def num_params(self) -> int:
        # a tied head is one parameter, counted once
        return sum(p.numel() for p in self.parameters())

    # ---- Hugging Face checkpoints -------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str, dtype=torch.float32, device="cpu") -> "Transformer":
        """Build on the meta device, allocate once, then copy tensors in shard by shard."""
        from safetensors import safe_open

        cfg = check_weights(path)  # every tensor's name and shape, before anything is allocated
        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device=device).to(dtype)  # allocates each parameter apart: re-tie the head
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        params = dict(model.named_parameters())  # a tied head once, as model.embed_tokens.weight
        for file in checkpoint_files(path):
            with safe_open(file, framework="pt", device="cpu") as f, torch.no_grad():
                for name in f.keys():
                    if name in params:  # not a rotary buffer, nor a tied checkpoint's head
                        params[name].copy_(f.get_tensor(name))
        return model

    def save_pretrained(self, path: str, state_dict=None, max_shard_bytes: int = 5 << 30,
                        dtype=None):
        """Write config.json + model.safetensors (or shards + index), for transformers and vLLM.

        `state_dict` may be an iterator of (name, tensor), e.g. fsdp.full_state_dict, so the caller
        never holds a second full copy; by default the module's own parameters are written."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        items = state_dict if state_dict is not None else self.state_dict().items()
        dtype = dtype or next(self.parameters()).dtype
        # shards are written as they fill (never more than one in memory), renamed once counted
        shards, cur, size, total = [], {}, 0, 0

        def flush():
            fn = os.path.join(path, f"model-part{len(shards) + 1:05d}.safetensors")
            save_file(cur, fn, metadata={"format": "pt"})
            shards.append((fn, list(cur)))

        for name, t in items:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            t = t.detach().to("cpu", dtype).contiguous()
            if cur and size + t.nbytes > max_shard_bytes:
                flush()
                cur, size = {}, 0
            cur[name], size, total = t, size + t.nbytes, total + t.nbytes
        flush()
        if len(shards) == 1:
            os.replace(shards[0][0], os.path.join(path, "model.safetensors"))
        else:
            weight_map = {}
            for i, (tmp, names) in enumerate(shards):
                fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                os.replace(tmp, os.path.join(path, fn))
                weight_map.update(dict.fromkeys(names, fn))
            with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f,
                          indent=2)
        config = self.config.to_hf() | {"torch_dtype": str(dtype).removeprefix("torch.")}
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=2)


def load_config(path: str) -> Config:
    fn = os.path.join(path, "config.json")
    if not os.path.exists(fn):
        raise FileNotFoundError(f"{path}: no config.json "
                                "(is this a Hugging Face checkpoint folder?)")
    try:
        with open(fn, "rb") as f:
            d = json.loads(f.read())
    except json.JSONDecodeError as e:
        raise ValueError(f"{fn}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{fn}: not UTF-8 text") from None
    return Config.from_hf(d, fn)


def checkpoint_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index, "rb") as f:
                files = sorted(set(json.loads(f.read())["weight_map"].values()))
            return [os.path.join(path, fn) for fn in files]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{index}: not a JSON object whose weight_map names each tensor's "
                             "file") from None
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")


FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}  # the safetensors dtypes a model loads


def read_header(file: str) -> dict[str, tuple]:
    """A safetensors file's tensors -> {name: shape}, from its header alone (an 8-byte length, a
    JSON header with each tensor's dtype, shape and byte range, then the bytes up to the file's
    end), or ValueError naming the file: missing, unreadable, truncated, damaged or not float."""
    if not os.path.exists(file):
        raise ValueError(f"{file}: missing (named by model.safetensors.index.json)")
    size = os.path.getsize(file)
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n) if 0 < n <= size - 8 else b"")
        header.pop("__metadata__", None)
        tensors = {k: (v["dtype"], tuple(int(d) for d in v["shape"])) for k, v in header.items()}
        ranges = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()}
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        raise ValueError(f"{file}: not a readable safetensors file") from None
    if 8 + n + end != size:
        raise ValueError(f"{file}: truncated or damaged: its header describes {8 + n + end} "
                         f"bytes, the file has {size}")
    for name, (dtype, shape) in tensors.items():
        if dtype not in FLOAT_BYTES:
            raise ValueError(f"{file}: {name} has dtype {dtype!r}, expected one of "
                             f"{', '.join(FLOAT_BYTES)}")
        if ranges[name] != FLOAT_BYTES[dtype] * math.prod(shape):
            raise ValueError(f"{file}: damaged: {name}'s {ranges[name]} bytes do not hold "
                             f"{dtype} {shape}")
    return {name: shape for name, (_, shape) in tensors.items()}


def check_weights(path: str) -> Config:
    """-> the folder's Config, once every weight file's header (no tensor data) holds exactly the
    tensors config.json implies, in name and shape, as from_pretrained loads them."""
    cfg = load_config(path)
    with torch.device("meta"):
        want = {name: tuple(p.shape) for name, p in Transformer(cfg).named_parameters()}
    missing, files = set(want), checkpoint_files(path)
    for file in files:
        for name, shape in read_header(file).items():
            if name.endswith("rotary_emb.inv_freq") or (
                    name == "lm_head.weight" and cfg.tie_word_embeddings):
                continue  # a computed buffer; a tied checkpoint's copy of the embedding
            if name not in missing:
                raise ValueError(f"{file}: unexpected tensor {name!r} for a {cfg.model_type} "
                                 f"model{' (a second copy)' if name in want else ''}")
            if shape != want[name]:
                raise ValueError(f"{file}: {name} has shape {shape}, config.json implies "
                                 f"{want[name]}")
            missing.discard(name)
    if missing:
        where = files[0] if len(files) == 1 else os.path.join(path, "model.safetensors.index.json")
        raise ValueError(f"{where}: lacks {len(missing)} tensor(s) that config.json implies, e.g. "
                         f"{', '.join(sorted(missing)[:3])}")
    return cfg


def init_weights(model: Transformer, std: float = 0.02, seed: int = 0):
    """Random init (normal(0, std) for matrices, zeros for biases, ones for norms), reproducible:
    drawn on the CPU from one seeded generator and copied to each parameter's device, so every
    device gets the same weights."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g, device="cpu") * std)
    return model
