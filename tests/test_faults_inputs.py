"""Odd inputs to the problem files and eval.py's flags: a FIFO or a folder as a problem
file, a pretty-printed JSON object, eval.py's value ranges and --out, data.py split --out under a
file, held-out prompts longer than the engine takes. Each is one line naming the flag or file, a
non-zero exit, nothing written, and the corrected command runs."""
import json
import os
import subprocess
import sys

import pytest

import data
import eval as evaluate
from tests.test_plan import QUICK, plan_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args, timeout=120):
    """A CLI in a subprocess: a hang is a TimeoutExpired, so a failed test, not a stuck one."""
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def one_line(r, *needles):
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr[-3000:]
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def exit_line(call, *argv) -> str:
    """The SystemExit line of an in-process CLI call."""
    with pytest.raises(SystemExit) as e:
        call(*argv)
    line = str(e.value.code)
    assert "\n" not in line and line.startswith("[fastcurl] "), line
    return line


def small_file(tmp_path, n=8):
    path = tmp_path / "small.jsonl"
    data.write_jsonl(str(path), data.load_problems(data.TOY_DATA)[:n])
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("script,flag", [("grpo.py", "--data"), ("grpo.py", "--eval-data"),
                                         ("eval.py", "--data")])
def test_a_fifo_as_a_problem_file_is_one_line_not_a_hang(tmp_path, script, flag):
    fifo, out = tmp_path / "problems.jsonl", tmp_path / "out"
    os.mkfifo(fifo)
    args = [*QUICK, "--eval-k", "1", "--out", str(out)] if script == "grpo.py" else []
    one_line(run(script, flag, str(fifo), *args), f"{fifo}: not a regular file")
    assert not out.exists()


def test_a_folder_as_a_problem_file_is_one_line(tmp_path):
    folder, out = tmp_path / "problems", tmp_path / "out"
    folder.mkdir()
    for flag in ("--data", "--eval-data"):
        assert f"{folder}: not a regular file" in exit_line(
            plan_of, flag, str(folder), *QUICK, "--eval-k", "1", "--out", str(out))
    assert f"{folder}: not a regular file" in exit_line(
        evaluate.main, ["--data", str(folder), "--device", "cpu"])
    assert not out.exists()


def test_a_pretty_printed_object_is_named_as_such(tmp_path):
    path, out = tmp_path / "problems.json", tmp_path / "out"
    row = {"problem": "1+2", "answer": "3"}
    path.write_text(json.dumps(row, indent=2))
    line = exit_line(plan_of, "--data", str(path), *QUICK, "--out", str(out))
    assert f"{path}: one JSON object over several lines" in line and "a JSON list" in line, line
    assert "invalid JSON" not in line and not out.exists()
    path.write_text(json.dumps(row))  # one object on one line is a JSON-lines file of one problem
    assert data.load_problems(str(path))[0].answer == "3"
    path.write_text(json.dumps({"problems": [row] * 8}, indent=2))  # a list wrapped in an object
    assert "one JSON object" in exit_line(plan_of, "--data", str(path), *QUICK, "--out", str(out))


@pytest.mark.parametrize("flag,value,allowed", [("--max-tokens", "0", "at least 1"),
                                                ("--max-prompt", "0", "at least 1"),
                                                ("--temperature", "inf", "above 0"),
                                                ("--top-p", "0", "in (0, 1]")])
def test_eval_flags_have_grpos_ranges(tmp_path, flag, value, allowed):
    out = tmp_path / "out"
    line = exit_line(evaluate.main, [flag, value, "--device", "cpu"])
    assert f"{flag} " in line and f": must be {allowed}" in line, line
    grpo_line = exit_line(plan_of, flag, value, *QUICK, "--out", str(out))
    assert line.split(": must be")[1] == grpo_line.split(": must be")[1], (line, grpo_line)


def test_eval_out_an_existing_folder_is_one_line_then_a_file_there_is_written(tmp_path, capsys):
    small = small_file(tmp_path, 2)
    args = ["--data", small, "--k", "1", "--max-tokens", "4", "--rollout", "torch", "--device", "cpu"]
    line = exit_line(evaluate.main, [*args, "--out", str(tmp_path)])
    assert f"--out {tmp_path}: a folder" in line, line
    evaluate.main([*args, "--out", str(tmp_path / "results.json")])
    assert json.loads((tmp_path / "results.json").read_text())["results"][0]["problems"] == 2


def test_split_out_under_a_file_is_one_line(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    line = exit_line(data.main, ["split", data.TOY_EVAL, "--out", str(a_file / "splits")])
    assert f"--out {a_file / 'splits'}: cannot be made a folder" in line, line
    line = exit_line(data.main, ["split", data.TOY_EVAL, "--out", str(a_file)])
    assert f"--out {a_file}: cannot be made a folder (File exists)" in line, line
    data.main(["split", data.TOY_EVAL, "--out", str(tmp_path / "splits")])
    assert sorted(os.listdir(tmp_path / "splits")) == ["L1.jsonl", "L2.jsonl", "L3.jsonl"]


def with_long_prompts(path):
    """Five held-out problems, the 2nd and 4th 40 tokens long."""
    short = data.load_problems(data.TOY_EVAL)[:3]
    long = data.Problem("+".join(["1"] * 20), "20")
    data.write_jsonl(str(path), [short[0], long, short[1], long, short[2]])
    return str(path)


def test_held_out_prompts_longer_than_the_engine_takes_are_dropped_and_counted(tmp_path, capsys):
    # eval.py's engine serves --max-prompt + --max-tokens = 24 tokens: a prompt of 24 or more would
    # be refused by vLLM mid-eval (prompt plus at least one response token), so it is never sent
    path, results = with_long_prompts(tmp_path / "held_out.jsonl"), tmp_path / "results.json"
    evaluate.main(["--data", path, "--k", "1", "--max-prompt", "16", "--max-tokens", "8",
                   "--rollout", "torch", "--device", "cpu", "--out", str(results)])
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.split()[1] == "3" and "(2 dropped: prompt + 1 token over the engine's" in row, row
    result = json.loads(results.read_text())["results"][0]
    assert (result["problems"], result["dropped"]) == (3, 2)
    assert [r["index"] for r in result["per_problem"]] == [0, 2, 4]


def test_evaluate_file_never_sends_a_prompt_the_engine_cannot_take(monkeypatch):
    from model import Transformer
    from rollout import make_engine
    tok = data.Tokenizer(data.TOY_MODEL)
    model = Transformer.from_pretrained(data.TOY_MODEL)
    engine = make_engine("torch", model, tok, model_dir=data.TOY_MODEL, max_model_len=12)
    sent, generate = [], engine.generate
    monkeypatch.setattr(engine, "generate", lambda prompts, **kw: sent.extend(prompts) or generate(
        prompts, **kw))
    problems = [data.Problem("1+2", "3"), data.Problem("+".join(["1"] * 6), "6")]
    lengths = [len(tok.encode(data.format_prompt(p.problem, "toy"))) for p in problems]
    assert lengths[0] < 12 <= lengths[1], lengths
    result = evaluate.evaluate_file(engine, tok, "toy", "held_out", problems=problems, k=2,
                                    temperature=1.0, max_tokens=4, max_prompt=64)
    assert (result["problems"], result["dropped"]) == (1, 1) and len(sent) == 1
    problems = problems[1:]  # every prompt too long: a result of no problems, not a crash
    result = evaluate.evaluate_file(engine, tok, "toy", "held_out", problems=problems, k=2,
                                    temperature=1.0, max_tokens=4, max_prompt=64)
    assert (result["problems"], result["dropped"], result["pass@1"]) == (0, 1, 0.0)


@pytest.mark.slow
def test_vllm_is_never_sent_a_prompt_it_refuses(tmp_path):
    if os.environ.get("FASTCURL_REQUIRE_VLLM") != "1":
        pytest.importorskip("vllm")
    path = with_long_prompts(tmp_path / "held_out.jsonl")
    r = run("eval.py", "--data", path, "--k", "1", "--max-prompt", "16", "--max-tokens", "8",
            "--rollout", "vllm", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rollout engine: vllm" in r.stdout and "(2 dropped: prompt + 1 token" in r.stdout


def test_plot_reads_what_a_kill_or_a_copy_leaves_and_names_a_missing_folder(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [{"step": 1, "stage": 1, "reward/mean": 0.1}, {"step": 2, "stage": 2, "reward/mean": 0.3}]
    (tmp_path / "stage1").mkdir()
    (tmp_path / "stage1" / "metrics.jsonl").write_text(json.dumps(rows[0]) + '\n{"step": 2, "st')
    (tmp_path / "stage1.bak").mkdir()  # a copy the user made: not a stage
    (tmp_path / "stage1.bak" / "metrics.jsonl").write_text("not json\n")
    (tmp_path / "stage2").mkdir()
    (tmp_path / "stage2" / "metrics.jsonl").write_text(json.dumps(rows[1]) + "\n")
    r = run("curriculum.py", "plot", str(tmp_path))
    assert r.returncode == 0 and os.path.exists(tmp_path / "curriculum.png"), r.stderr[-3000:]
    assert r.stderr == f"[fastcurl] {tmp_path}/stage1/metrics.jsonl: skipped 1 line(s) that are " \
                       f"not metrics rows\n"
    r = run("curriculum.py", "plot", str(tmp_path / "elsewhere"))
    assert r.returncode == 1 and r.stderr == f"{tmp_path}/elsewhere: no such folder (a run's --out)\n"
    r = run("curriculum.py", "plot", str(tmp_path), str(tmp_path / "no" / "plot.png"))
    assert r.returncode == 1 and "plot.png: cannot write the plot (No such file" in r.stderr
