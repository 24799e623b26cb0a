"""The user's real path on a CPU: the paper's recipe, scaled down, on a tiny random Qwen2 with
DeepSeek-R1-Distill's real vocabulary, tokenizer and chat template (tests/real_vocab.py), trained
on real MATH problems; its final checkpoint read by transformers and vLLM as they read the
source."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

pytestmark = pytest.mark.slow  # starts torchrun and vLLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "assets", "benchmarks")
SCALED_DOWN = ["--max-tokens", "12", "--batch", "4", "--n-samples", "2", "--steps", "2", "--eval-k", "1",
               "--rollout", "torch", "--save-every", "1"]


def grpo(*args):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        f"{ROOT}/grpo.py", "--recipe", "fastcurl-1.5b", *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def held_out(path, n=4):
    problems = json.load(open(os.path.join(BENCH, "math.json")))[:n]
    with open(path, "w") as f:
        for p in problems:
            f.write(json.dumps({"problem": p["problem"], "answer": p["answer"]}) + "\n")
    return str(path)


def safetensors_dtypes(folder):
    from safetensors import safe_open

    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        return {f.get_slice(name).get_dtype() for name in f.keys()}


def test_the_paper_recipe_scaled_down_trains_and_checkpoints_as_the_source(real_model_r1, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    out = tmp_path / "run"
    r = grpo("--stage", "1", "--model", real_model_r1, "--data", os.path.join(BENCH, "train_math.json"),
             "--eval-data", held_out(tmp_path / "held.jsonl"), "--out", str(out), *SCALED_DOWN)
    assert "stage 1 held-out held.jsonl" in r.stdout
    final = out / "stage1" / "final"
    assert json.load(open(out / "stage1" / "eval.json"))["max_tokens"] == 12  # the run's budget, no flag
    # the checkpoint holds the source's tokenizer files, its dtype and a config transformers reads quietly
    for name in os.listdir(real_model_r1):  # every file but the weights
        assert name.startswith("model") or (final / name).exists(), name
    assert (final / "chat_template.jinja").read_text() == open(f"{real_model_r1}/chat_template.jinja").read()
    config = json.load(open(final / "config.json"))
    assert config["torch_dtype"] == "bfloat16" and config["transformers_version"]
    assert safetensors_dtypes(final) == {"BF16"} and safetensors_dtypes(final / "master") == {"F32"}
    assert os.path.getsize(final / "model.safetensors") < 0.6 * os.path.getsize(final / "master" / "model.safetensors")
    records = []
    handler = type("Keep", (__import__("logging").Handler,), {"emit": lambda self, rec: records.append(rec)})()
    hf_logging.get_logger().addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tok = AutoTokenizer.from_pretrained(final)
            model = AutoModelForCausalLM.from_pretrained(final)
    finally:
        hf_logging.get_logger().removeHandler(handler)
    loud = [str(w.message) for w in caught] + [rec.getMessage() for rec in records if rec.levelno >= 30]
    assert not loud, loud
    assert model.dtype == torch.bfloat16
    source = AutoTokenizer.from_pretrained(real_model_r1)
    chat = [{"role": "user", "content": "What is 1 + 1?"}]
    assert tok.apply_chat_template(chat, add_generation_prompt=True) == \
        source.apply_chat_template(chat, add_generation_prompt=True)
    # vLLM serves the final checkpoint as it is (a fresh process: vLLM on a CPU owns its process)
    code = ("from vllm import LLM, SamplingParams; import sys; "
            "llm = LLM(model=sys.argv[1], max_model_len=256, enforce_eager=True, gpu_memory_utilization=0.1); "
            "o = llm.generate([{'prompt_token_ids': [151646, 151644, 16, 151645, 151648, 198]}], "
            "SamplingParams(max_tokens=4, temperature=1.0, seed=0)); "
            "print('DTYPE', llm.llm_engine.model_config.dtype, 'TOKENS', len(o[0].outputs[0].token_ids))")
    v = subprocess.run([sys.executable, "-c", code, str(final)], capture_output=True, text=True, timeout=600)
    assert "DTYPE torch.bfloat16 TOKENS 4" in v.stdout, v.stdout[-2000:] + v.stderr[-3000:]


def test_a_prompt_format_whose_markers_are_not_single_tokens_stops(real_model_r1, tmp_path):
    import grpo

    def plan(*argv):
        options, stage_flags = grpo.parse_args(["--out", str(tmp_path), *argv])
        return grpo.make_plan(options, stage_flags, rank=0, world=1, device=torch.device("cpu"))

    base = ["--recipe", "fastcurl-1.5b", "--data", os.path.join(BENCH, "aime.json"), "--batch", "2"]
    assert plan(*base, "--model", real_model_r1).template == "r1"  # read from the tokenizer
    with pytest.raises(SystemExit, match=r"splits <\|im_start\|> into 6 tokens.*--template"):
        plan(*base, "--model", real_model_r1, "--template", "qwen")
    with pytest.raises(SystemExit, match="splits <｜begin▁of▁sentence｜> into"):
        plan("--template", "r1")  # the toy's character vocabulary
