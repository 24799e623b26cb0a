"""The paper's benchmarks shipped with the project and evaluated by name: every bundled file loads and
each gold answer scores 1 against itself; `eval.py --bench paper` runs all five sets end to end on a
model with the real R1-Distill vocabulary (native engine and vLLM) and prints the table with the
paper's figures; the toy says in one line why it cannot; grpo.py takes the same names; a long
evaluation prints its progress, from either engine."""
import json
import os
import subprocess
import sys

import pytest

import data
import eval as evaluate
import reward
from tests.test_plan import plan_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"aime24": 30, "amc23": 83, "math500": 500, "minerva": 272, "olympiadbench": 675,
         "math-train": 7470, "aime-train": 975}  # assets/benchmarks/README.md


def run_eval(*args, timeout=300):
    return subprocess.run([sys.executable, f"{ROOT}/eval.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="2"))


def test_every_bundled_set_loads_and_each_gold_answer_scores_itself():
    assert set(data.NAMED_SETS) == set(SIZES) and set(data.PAPER_BENCHMARKS) < set(SIZES)
    for name, size in SIZES.items():
        problems = data.load_problems(data.problem_file(name))
        assert len(problems) == size, name
        for p in problems:
            golds = p.answer if isinstance(p.answer, list) else [p.answer]
            assert reward.math_reward(f"so \\boxed{{{reward.final_answer(str(golds[0]))}}}",
                                      p.answer) == 1.0, (name, p.source, p.answer)


def test_the_toy_cannot_write_the_benchmarks_and_says_so_in_one_line():
    r = run_eval("--bench", "paper", "--limit", "1")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert "--bench: " in r.stderr and "the toy's character vocabulary, which cannot write" in r.stderr


@pytest.mark.parametrize("args,line", [
    (["--bench", "aime25"], "--bench aime25: not one of aime24, amc23, math500, minerva, "
                            "olympiadbench, paper"),
    (["--bench", "aime24", "--data", "math500"], "--bench and --data: give one of them")])
def test_bench_mistakes_are_one_line(args, line):
    r = run_eval(*args)
    assert r.returncode == 1 and r.stderr == f"[fastcurl] {line}\n", r.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["torch", "vllm"])
def test_the_paper_benchmarks_end_to_end_on_the_real_vocabulary(real_model_r1, tmp_path, engine):
    if engine == "vllm" and os.environ.get("FASTCURL_REQUIRE_VLLM") != "1":
        pytest.importorskip("vllm")
    out = tmp_path / "results.json"
    r = run_eval("--bench", "paper", "--model", real_model_r1, "--limit", "2", "--k", "1",
                 "--max-tokens", "8", "--rollout", engine, "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"rollout engine: {engine}" in r.stdout
    table = out.with_suffix(".md").read_text()
    assert table in r.stdout and json.loads(out.read_text())["table"] == table
    rows = table.splitlines()
    assert rows[0] == ("| set | problems | pass@1 | FastCuRL-1.5B-V3 (paper) | DeepScaleR-1.5B-Preview "
                       "(paper) | R1-Distill-Qwen-1.5B (paper) |")
    assert rows[2].startswith("| aime24 | 2/30 | ") and rows[2].endswith(" | 49.6 | 43.1 | 28.8 |")
    assert rows[6].startswith("| olympiadbench | 2/675 | ") and rows[6].endswith(" | 54.5 | 50.0 | 43.3 |")
    assert rows[7].startswith("| mean | | ") and rows[7].endswith(" | 61.6 | 56.9 | 48.9 |")
    results = json.loads(out.read_text())["results"]
    assert [(x["name"], x["problems"], x["k"], x["max_tokens"], x["temperature"]) for x in results] == [
        (name, 2, 1, 8, 0.6) for name in data.PAPER_BENCHMARKS]  # the paper's temperature


def test_grpo_takes_the_bundled_sets_by_name(real_model_r1, tmp_path):
    plan = plan_of("--recipe", "fastcurl-1.5b", "--model", real_model_r1, "--data", "math-train",
                   "--eval-data", "aime24", "--out", str(tmp_path), "--eval-tokens", "64")
    assert plan.eval_file == data.problem_file("aime24") and len(plan.eval_problems) == 30
    assert plan.stages[0].identity["data_sha256"] == __import__("checkpoint").sha256(
        data.problem_file("math-train"))


PROGRESS_CHECK = """
import json, sys
sys.path.insert(0, {root!r})
import data
from model import Transformer
from rollout import make_engine
tok = data.Tokenizer(data.TOY_MODEL)
model = None if {engine!r} == "vllm" else Transformer.from_pretrained(data.TOY_MODEL)
generator = make_engine({engine!r}, model, tok, model_dir=data.TOY_MODEL, max_model_len=128)
generator.max_rows = 2  # the native engine: one problem of n = 2 per internal batch
calls = []
prompts = [tok.encode(data.format_prompt(p.problem, "toy")) for p in data.load_problems(data.TOY_EVAL)[:5]]
completions = generator.generate(prompts, n=2, max_tokens=16, progress=lambda *a: calls.append(a))
print(json.dumps([calls, sum(len(c.response_ids) for c in completions)]))
"""


@pytest.mark.parametrize("engine", ["torch", pytest.param("vllm", marks=pytest.mark.slow)])
def test_either_engine_reports_each_prompt_as_it_finishes(engine):
    if engine == "vllm" and os.environ.get("FASTCURL_REQUIRE_VLLM") != "1":
        pytest.importorskip("vllm")
    r = subprocess.run([sys.executable, "-c", PROGRESS_CHECK.format(root=ROOT, engine=engine)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)  # vLLM in a process of its own
    assert r.returncode == 0, r.stderr[-3000:]
    calls, tokens = json.loads(r.stdout.strip().splitlines()[-1])
    assert [done for done, _ in calls] == [1, 2, 3, 4, 5]
    assert calls[-1][1] == tokens and all(a[1] <= b[1] for a, b in zip(calls, calls[1:]))


def test_a_long_evaluation_prints_its_progress(monkeypatch, capsys):
    from model import Transformer
    from rollout import make_engine
    tok = data.Tokenizer(data.TOY_MODEL)
    generator = make_engine("torch", Transformer.from_pretrained(data.TOY_MODEL), tok,
                            model_dir=data.TOY_MODEL, max_model_len=128)
    generator.max_rows = 2  # one problem of k = 2 per internal batch: a report after each
    monkeypatch.setattr(evaluate, "PROGRESS_EVERY_S", 0.0)  # every report printed
    problems = data.load_problems(data.TOY_EVAL)[:4]
    evaluate.evaluate_file(generator, tok, "toy", "held_out.jsonl", problems=problems, k=2,
                           temperature=1.0, max_tokens=8, max_prompt=64)
    lines = [line for line in capsys.readouterr().out.splitlines() if "problems," in line]
    assert [line.split(":")[1].split(" problems")[0].strip() for line in lines] == \
        ["1/4", "2/4", "3/4", "4/4"], lines
    assert all(" tokens/s, eta " in line and line.startswith("[fastcurl] held_out.jsonl: ")
               for line in lines)
