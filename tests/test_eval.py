"""The evaluator: the unbiased pass@k estimator, and the command on a small file."""
import json
import math
import os
import subprocess
import sys

from eval import pass_at_k
import pytest

pytestmark = pytest.mark.slow  # every test here starts processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pass_at_k_is_the_unbiased_estimator():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                want = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert abs(pass_at_k(n, c, k) - want) < 1e-12


def test_eval_command_on_a_small_file(tmp_path):
    rows = [json.loads(line) for line in open(f"{ROOT}/assets/toy/eval.jsonl")][:12]
    rows[0]["answer"] = [rows[0]["answer"], "999"]  # a list of acceptable answers
    (tmp_path / "small.jsonl").write_text("\n".join(map(json.dumps, rows)))
    out = tmp_path / "res.json"
    r = subprocess.run([sys.executable, f"{ROOT}/eval.py", "--data", str(tmp_path / "small.jsonl"), "--k", "3",
                        "--rollout", "torch", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "small.jsonl" in r.stdout and "pass@1" in r.stdout
    res = json.load(open(out))["results"][0]
    assert res["problems"] == 12 and res["k"] == 3 and len(res["per_problem"]) == 12
    per = res["per_problem"]
    assert abs(res["pass@1"] - sum(p["correct"] / 3 for p in per) / 12) < 1e-12
    assert res["pass@3"] >= res["pass@1"] and 0 <= res["pass@1"] <= 1
    assert all(len(p["lengths"]) == 3 for p in per)


def test_eval_loads_no_copy_of_the_weights_when_vllm_serves(tmp_path, monkeypatch, capsys):
    """vLLM loads the checkpoint itself: eval.py must not hold a second full copy (7 GB at 1.5B).
    The native engine on a model built here stands in for vLLM, which owns its process on a CPU."""
    import eval as evaluator
    from model import Transformer
    from rollout import TorchEngine

    rows = [json.loads(line) for line in open(f"{ROOT}/assets/toy/eval.jsonl")][:4]
    (tmp_path / "small.jsonl").write_text("\n".join(map(json.dumps, rows)))
    stand_in = Transformer.from_pretrained(f"{ROOT}/assets/toy/model")
    loads = []
    monkeypatch.setattr(Transformer, "from_pretrained", classmethod(lambda cls, *a, **k: loads.append(a)))
    monkeypatch.setattr(evaluator, "choose_engine", lambda kind, config, device: ("vllm", "a stand-in"))
    monkeypatch.setattr(evaluator, "make_engine",
                        lambda kind, model, tok, **kw: TorchEngine(stand_in, tok.eos_ids, tok.pad_id))
    evaluator.main(["--data", str(tmp_path / "small.jsonl"), "--k", "1"])
    assert "small.jsonl" in capsys.readouterr().out and loads == []
