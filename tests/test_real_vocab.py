"""The real-vocabulary fixture (tests/real_vocab.py): the tokenizer splits text as tiktoken does,
carries R1-Distill's and Qwen2.5-Instruct's tokens at their real ids, and fastcurl's prompts equal
the real chat templates' token for token."""
import logging
import os
import random
import unicodedata
import warnings

import pytest

import data
from tests import real_vocab

# Hand-picked texts, one per kind of trouble; varied_texts() adds generated ones
TEXTS = [
    "Let's think step by step", "Hello world", " Hello", "hello  world", "HELLO WORLD'S",
    "I'm here, they'll go, we've seen, you'd know, it's THEIR'S", "don't DON'T Don'T",
    "12345678901234567890", "3.14159265358979", "-0.5e-10", "1,000,000", "x^2+y^2=z^2",
    "\\frac{1}{2} + \\sqrt{3} = \\boxed{\\dfrac{\\pi}{4}}",
    "$\\int_0^\\infty e^{-x^2}\\,dx = \\frac{\\sqrt{\\pi}}{2}$",
    "\\begin{align*} a &= b \\\\ c &\\le d \\end{align*}",
    "Find all $n \\in \\mathbb{Z}^+$ such that $n^2 \\equiv 1 \\pmod{8}$.",
    "def f(x):\n    return x ** 2  # square\n\n\nprint(f(3))",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "   leading spaces", "trailing spaces   ", "\t\ttabs\t", "a\r\nb\rc\nd", "\n\n\n",
    "many     spaces     between", " ", "", "\u00a0non-breaking\u00a0space", "\u3000ideographic",
    "数学题：求方程 x²+2x+1=0 的解。", "日本語のテキストとカタカナ、ひらがな", "한국어 문장입니다.",
    "Ελληνικά γράμματα αβγ", "Кириллица и числа 42", "עברית ومرحبا بالعالم", "हिन्दी पाठ",
    "emoji 😀🎉👍🏽 and 👨‍👩‍👧‍👦 family", "flags 🇫🇷🇯🇵", "math ∑∫∂√∞≠≤≥ ∀x∃y",
    "café naïve coöperate façade", "Zürich Straße", "ﬁ ligature ﬀ", "…—–‘’“”",
    "\u200bzero\u200dwidth\u200c", "tab\tand\vvertical\ffeed", "\x00\x01\x7f control",
    "'s 're 've 'm 'll 'd 't", "''''", "!!!???...", "a-b_c.d/e\\f|g", "<html><body></body></html>",
    "http://example.com/path?q=1&r=2#frag", "user@example.com", "```python\nx = 1\n```",
]

POOLS = [
    "0123456789", " \t\n\r", "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "+-*/=()[]{}^_\\$&%#@!?.,;:'\"<>|~`", "αβγδεζηθλμπσφχψωΩΔΣ∑∏∫∂√∞≈≠≤≥∈∉⊂∪∩",
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可里后",
    "あいうえおかきくけこアイウエオ", "😀😂🤔🎉🔥✅❌👍🏽🚀", "éèêëàâäôöûüçñßøåæ",
]
WORDS = ["the", "The", " number", " of", "integer", " solutions", "\\frac", "\\sqrt", "{", "}",
         "$", " $", "\n", "  ", "x", "y_1", "2024", " 7", "'s", " isn't", "π", "≤", "😀", "数学"]


def varied_texts(count: int = 400, seed: int = 0) -> list[str]:
    """Random mixes of characters from the pools and of whole words, lengths 1 to 80."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        if i % 2:
            pool = "".join(rng.sample(POOLS, rng.randint(1, 3)))
            out.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 80))))
        else:
            out.append("".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20))))
    return out


@pytest.fixture(scope="module")
def tiktoken_encoding(qwen_tiktoken):
    tiktoken = pytest.importorskip("tiktoken")
    ranks = real_vocab.load_ranks(qwen_tiktoken)
    return tiktoken.Encoding("qwen", pat_str=real_vocab.QWEN2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={})


def folder_tokenizer(folder):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))


# ---- the pieces, on small inputs ----------------------------------------------------------------

def test_byte_map_covers_every_byte_once():
    table = real_vocab.byte_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ"


def test_merges_follow_the_merged_tokens_rank():
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"bc": 4, b"abc": 5}
    assert real_vocab.merges_from_ranks(ranks) == [
        (b"a", b"b"), (b"b", b"c"), (b"a", b"bc"), (b"ab", b"c")]


# ---- the full vocabulary ------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("flavor", ["r1", "qwen"])
def test_tokenizer_matches_tiktoken(request, flavor, tiktoken_encoding):
    """tiktoken does not normalize; ours applies NFC as Qwen2's tokenizer.json does, so the texts go
    to tiktoken in NFC."""
    tok = folder_tokenizer(request.getfixturevalue(f"real_model_{flavor}"))
    texts = TEXTS + varied_texts()
    assert len(texts) > 400
    mismatches = []
    for text in texts:
        ours = tok.encode(text, add_special_tokens=False).ids
        theirs = tiktoken_encoding.encode(unicodedata.normalize("NFC", text), disallowed_special=())
        if ours != theirs:
            mismatches.append((text, ours, theirs))
        assert tok.decode(ours, skip_special_tokens=False) == unicodedata.normalize("NFC", text)
    assert not mismatches, mismatches[:5]


@pytest.mark.slow
def test_field_notes_check_values(real_model_r1):
    tok = folder_tokenizer(real_model_r1)
    assert tok.encode("Let's think step by step", add_special_tokens=False).ids == [
        10061, 594, 1744, 3019, 553, 3019]
    assert tok.encode("Hello world", add_special_tokens=False).ids == [9707, 1879]
    assert tok.encode("<｜Assistant｜><think>\n", add_special_tokens=False).ids == [
        151645, 151648, 198]
    assert tok.encode("Hello world").ids == [151646, 9707, 1879]  # the post-processor's BOS
    assert tok.get_vocab_size() == 151_665


@pytest.mark.slow
@pytest.mark.parametrize("flavor", ["r1", "qwen"])
def test_added_tokens_are_single_ids_at_their_real_ids(request, flavor):
    tok = folder_tokenizer(request.getfixturevalue(f"real_model_{flavor}"))
    for offset, (content, special) in enumerate(real_vocab.ADDED_TOKENS[flavor]):
        assert tok.encode(content, add_special_tokens=False).ids == [151643 + offset], content
        assert tok.encode(f"x{content}y", add_special_tokens=False).ids[1] == 151643 + offset
        assert (tok.decode([151643 + offset]) == "") == special, content


@pytest.mark.slow
@pytest.mark.parametrize("flavor", ["r1", "qwen"])
def test_fastcurl_reads_the_folder(request, flavor):
    folder = request.getfixturevalue(f"real_model_{flavor}")
    tok = data.Tokenizer(folder)
    assert tok.template == flavor
    assert tok.eos_ids == ([151643] if flavor == "r1" else [151645, 151643])
    assert tok.pad_id == 151643 and tok.unk_id is None
    text = "Solve $x^2 = 4$. 数学 😀"
    assert tok.decode(tok.encode(text)) == text


# ---- fastcurl's prompts against the real chat templates -----------------------------------------

PROBLEMS = [
    "What is $1+1$?",
    "Let $f(x) = x^2 - 3x + 2$. Find all real $x$ with $f(x) = 0$.",
    "Compute \\[\\sum_{k=1}^{100} k^2.\\]",
    "  A problem with leading spaces and a trailing newline.\n",
    "Line one.\n\nLine two, after a blank line.\n\t- an indented item",
    "求所有满足 $x^2+y^2=25$ 的整数解 (x, y) 的个数。",
    "Emoji 🎲: two dice are rolled; what is P(sum = 7)?",
    "Quote's and \"double quotes\" and a backslash \\ here.",
]


def prompt_pairs(folder, template, system=None):
    """(fastcurl's ids, the chat template's ids) for each problem."""
    from transformers import AutoTokenizer

    ours, theirs = data.Tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    pairs = []
    for problem in PROBLEMS:
        messages = [{"role": "user", "content": data.user_turn(problem, template)}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        out = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        pairs.append((ours.encode(data.format_prompt(problem, template)),
                      list(out["input_ids"] if hasattr(out, "keys") else out)))
    return pairs


@pytest.mark.slow
def test_r1_prompts_equal_the_chat_template(real_model_r1):
    for ours, theirs in prompt_pairs(real_model_r1, "r1"):
        assert ours == theirs
        assert ours[0] == 151646 and ours[-3:] == [151645, 151648, 198]


@pytest.mark.slow
def test_qwen_prompts_equal_the_chat_template(real_model_qwen):
    """fastcurl's qwen prompt carries its own system message; the template is given the same."""
    for ours, theirs in prompt_pairs(real_model_qwen, "qwen", system=data.QWEN_SYSTEM):
        assert ours == theirs
        assert ours[0] == 151644 and ours[-3:] == [151644, 77091, 198]  # <|im_start|>assistant\n


# ---- transformers loads the folders quietly ------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("flavor", ["r1", "qwen"])
def test_transformers_loads_the_folder_without_warnings(request, flavor):
    import torch
    import transformers

    folder = request.getfixturevalue(f"real_model_{flavor}")
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(f"{record.name}: {record.getMessage()}")

    handler = Keep(level=logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tok = transformers.AutoTokenizer.from_pretrained(folder)
            model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    finally:
        logger.removeHandler(handler)
    assert not records, records
    assert not [str(w.message) for w in caught], [str(w.message) for w in caught]
    assert model.dtype == torch.bfloat16 and model.config.vocab_size == 151_936
    assert model.generation_config.eos_token_id == (151643 if flavor == "r1" else [151645, 151643])
    ours = folder_tokenizer(folder)
    for text in TEXTS:  # transformers' Qwen2Tokenizer splits as tokenizer.json does
        assert tok(text, add_special_tokens=False)["input_ids"] == ours.encode(
            text, add_special_tokens=False).ids, text
    ids = tok("Hello world", return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == ([151646, 9707, 1879] if flavor == "r1" else [9707, 1879])
    with torch.no_grad():
        assert model(ids).logits.shape == (1, ids.shape[1], 151_936)
