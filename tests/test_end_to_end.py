"""The main command for real: torchrun, 2 gloo ranks, the toy, stage 1 then stage 2 from its checkpoint."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.slow  # every test here starts processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ["step", "stage", "reward/mean", "reward/std", "response_len/mean", "response_len/max", "truncated_frac",
        "entropy/mean", "kl/mean", "pg_clipfrac", "grad_norm", "lr", "zero_adv_frac", "time/rollout_s",
        "time/train_s", "time/sync_s", "throughput/tokens_per_s", "prompt_shared_frac", "rollout/logprob_absdiff"]


def grpo(*args, nproc=2, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    pre = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    r = subprocess.run(pre + [f"{ROOT}/grpo.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    if check:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def test_two_stages_under_torchrun(tmp_path):
    out = str(tmp_path / "run")
    small = ["--out", out, "--steps", "3", "--batch", "4", "--n-samples", "4", "--save-every", "2", "--eval-k", "1",
             "--rollout", "torch"]
    r = grpo("--stage", "1", *small)
    assert "stage 1 step 3/3 reward" in r.stdout and "held-out eval.jsonl: pass@1" in r.stdout
    rows = [json.loads(l) for l in open(f"{out}/stage1/metrics.jsonl")]
    assert [x["step"] for x in rows] == [1, 2, 3]
    for k in KEYS:
        assert k in rows[0], k
    assert rows[0]["rollout/logprob_absdiff"] < 1e-4  # the native engine and the trainer agree
    for d in ("step2", "final"):
        assert os.path.exists(f"{out}/stage1/{d}/model.safetensors")
        assert os.path.exists(f"{out}/stage1/{d}/trainer_state.pt")
    # stage 2 starts from stage 1's final checkpoint
    r = grpo("--stage", "2", *small)
    assert "stage1/final" in r.stdout
    assert json.loads(open(f"{out}/stage2/metrics.jsonl").readline())["stage"] == 2
    # the checkpoint is a Hugging Face folder transformers reads
    transformers = pytest.importorskip("transformers")
    from model import Transformer
    theirs = transformers.AutoModelForCausalLM.from_pretrained(f"{out}/stage2/final").eval()
    ours = Transformer.from_pretrained(f"{out}/stage2/final")
    ids = torch.tensor([[5, 6, 13, 7, 15]])
    with torch.no_grad():
        assert (theirs(ids).logits - ours.logits(ours(ids))).abs().max() < 1e-4
    # the plot
    pytest.importorskip("matplotlib")
    p = subprocess.run([sys.executable, f"{ROOT}/curriculum.py", "plot", out], capture_output=True, text=True)
    assert p.returncode == 0 and os.path.getsize(f"{out}/curriculum.png") > 5000


def test_clear_errors_before_compute(tmp_path):
    out = str(tmp_path / "run")
    r = grpo("--stage", "3", "--out", out, nproc=1, check=False)
    assert r.returncode != 0 and "stage2/final does not exist" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2"}\n')
    r = grpo("--stage", "1", "--out", out, "--data", str(bad), nproc=1, check=False)
    assert r.returncode != 0 and "bad.jsonl:2: missing field 'answer'" in r.stderr
    r = grpo("--stage", "1", "--out", out, "--max-tokens", "4000", nproc=1, check=False)
    assert r.returncode != 0 and "exceeds the model's max_position_embeddings" in r.stderr
    os.makedirs(f"{out}/stage1")
    open(f"{out}/stage1/metrics.jsonl", "w").write("{}\n")
    r = grpo("--stage", "1", "--out", out, nproc=1, check=False)
    assert r.returncode != 0 and "already holds a run" in r.stderr


def test_the_reference_computes_in_the_run_dtype(tmp_path):
    """Under --dtype bfloat16 --fsdp hand the reference is built and sharded as the policy is: the same
    weights gathered in the same dtype through the same micro-batches give bit-equal log-probs, so the
    k3 KL of the first step is exactly 0 (a reference computing in fp32 gives ~1e-6)."""
    out = str(tmp_path / "run")
    grpo("--out", out, "--dtype", "bfloat16", "--fsdp", "hand", "--steps", "1", "--batch", "4",
         "--n-samples", "4", "--eval-k", "0", "--rollout", "torch", "--device", "cpu", nproc=1)
    row = json.loads(open(f"{out}/stage1/metrics.jsonl").readline())
    assert row["kl/mean"] == 0.0 and row["ratio/mean"] == 1.0
