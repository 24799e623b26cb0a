"""Bad input, as a new user types it: one line naming the flag, file or field, a non-zero exit, nothing
left in the output folder, and the corrected command then runs. Also: a second SIGTERM ends the run at
once, a zeroed checkpoint file of the right size is caught by its sha256, eval.py and data.py check
their inputs before any compute."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # every test here starts processes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(ROOT, "assets", "toy")
QUICK = ["--steps", "1", "--batch", "4", "--n-samples", "2", "--eval-k", "0", "--rollout", "torch",
         "--device", "cpu"]


def run(script, *args, timeout=300):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def one_line_error(r, *needles):
    """Exit status 1, the message on stderr's last line, no traceback."""
    assert r.returncode == 1, (r.returncode, r.stdout[-1000:], r.stderr[-3000:])
    last = r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    for n in needles:
        assert n in last, (n, last)


def test_bad_grpo_inputs_write_nothing_then_the_fixed_command_runs(tmp_path):
    out = tmp_path / "run"
    one = tmp_path / "one.jsonl"
    one.write_text('{"problem": "1+1", "answer": "2"}\n')
    unk = tmp_path / "letters.jsonl"
    unk.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+x", "answer": "4"}\n')
    empty_model = tmp_path / "empty_model"
    empty_model.mkdir()
    shutil.copy(os.path.join(TOY, "model", "config.json"), empty_model)
    shutil.copy(os.path.join(TOY, "model", "tokenizer.json"), empty_model)
    cut_model = tmp_path / "cut_model"
    shutil.copytree(os.path.join(TOY, "model"), cut_model)
    w = cut_model / "model.safetensors"
    with open(w, "r+b") as f:
        f.truncate(os.path.getsize(w) - 100)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["--batch", "-4"], ["--batch -4: must be at least 1"]),
        (["--batch", "0"], ["--batch 0"]),
        (["--n-samples", "0"], ["--n-samples 0: must be at least 1"]),
        (["--max-tokens", "-5"], ["--max-tokens -5: must be at least 1"]),
        (["--max-tokens", "0"], ["--max-tokens 0"]),
        (["--lr", "-1"], ["--lr -1.0: must be above 0"]),
        (["--lr", "fast"], ["--lr fast: not a number"]),
        (["--loss", "ppo"], ["--loss ppo: must be one of grpo, gspo, cispo"]),
        (["--end-trunc", "2"], ["--end-trunc 2.0: must be in [0, 1] or off"]),
        (["--save-every", "-1"], ["--save-every -1: must be at least 0"]),
        (["--eval-k", "two"], ["--eval-k two: not an integer"]),
        (["--max-tokens", "40,80"], ["--max-tokens 40,80: give one value, or 1 separated by commas"]),
        (["--clip-low", "1.5"], ["--clip-low 1.5"]),
        (["--temperature", "0"], ["--temperature 0.0"]),
        (["--mini-batches", "0"], ["--mini-batches 0"]),
        (["--data", str(one)], [str(one), "1 prompts", "fewer than --batch 4"]),
        (["--data", str(unk)], [f"{unk}:2", "outside the model's vocabulary", "'x'"]),
        (["--data", str(tmp_path / "nope.jsonl")], ["nope.jsonl: no such problem file"]),
        (["--model", str(tmp_path / "nope")], ["--model", "no such folder"]),
        (["--model", str(empty_model)], ["neither model.safetensors nor"]),
        (["--model", str(cut_model)], ["model.safetensors: truncated or damaged"]),
        (["--stage", "9"], ["--stage 9: recipe toy has stages 1..4"]),
    ]
    for args, needles in cases:
        r = run("grpo.py", "--out", str(out), *QUICK, *args)
        one_line_error(r, *needles)
        assert not out.exists(), (args, os.listdir(out))
    r = run("grpo.py", "--out", str(a_file / "run"), *QUICK)
    one_line_error(r, "--out", "is a file, not a folder")
    # the corrected command runs where the failed ones ran (--resume with nothing to resume says so:
    # a run killed before its first checkpoint starts again); settings that cannot learn warn
    r = run("grpo.py", "--out", str(out), *QUICK[:4], "--n-samples", "1", "--max-tokens", "1",
            *QUICK[6:], "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--resume: no checkpoint in" in r.stdout
    assert "--n-samples 1: each prompt's group is one sample" in r.stdout
    assert "every response of step 1 was cut at the budget" in r.stdout
    assert json.loads(open(out / "stage1" / "metrics.jsonl").readline())["step"] == 1


def test_a_second_sigterm_ends_the_run_at_once(tmp_path):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "grpo.py"), "--out", str(out), "--steps",
                          "200", "--batch", "4", "--n-samples", "4", "--save-every", "1",
                          "--rollout", "torch", "--device", "cpu"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    metrics = out / "stage1" / "metrics.jsonl"
    t = time.time()
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert p.poll() is None and time.time() - t < 120, p.communicate()
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    # two signals that arrive while Python is inside one long C call (a matmul) are merged into
    # one, so keep sending until the process is gone: the first one handled sets the flag, the
    # next one handled ends the process (the step and its checkpoint take far longer than 20 ms)
    t = time.time()
    while p.poll() is None and time.time() - t < 30:
        time.sleep(0.02)
        p.send_signal(signal.SIGTERM)
    stdout, _ = p.communicate(timeout=30)
    assert p.returncode == 128 + signal.SIGTERM and "second SIGTERM: exiting now" in stdout
    assert len(metrics.read_text().splitlines()) < 200
    # the newest checkpoint written before the second signal is whole
    import checkpoint
    assert checkpoint.latest_checkpoint(str(out / "stage1")) is not None


def test_a_zeroed_checkpoint_file_of_the_right_size_falls_back(tmp_path):
    out = tmp_path / "run"
    args = ["--out", str(out), "--steps", "3", "--batch", "4", "--n-samples", "2", "--eval-k", "0",
            "--save-every", "1", "--keep", "0", "--rollout", "torch", "--device", "cpu"]
    assert run("grpo.py", *args).returncode == 0
    shutil.rmtree(out / "stage1" / "final")
    state = out / "stage1" / "step2" / "trainer_state.pt"
    state.write_bytes(bytes(os.path.getsize(state)))
    assert oct(os.stat(out / "stage1" / "step1" / "model.safetensors").st_mode & 0o777) == \
        oct(0o666 & ~_umask())
    r = run("grpo.py", *args, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step2 is damaged (trainer_state.pt's content differs from its sha256" in r.stdout
    assert f"resumed from {out}/stage1/step1 at step 1" in r.stdout


def _umask():
    u = os.umask(0o022)
    os.umask(u)
    return u


def test_eval_and_split_check_inputs_first(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(open(os.path.join(TOY, "eval.jsonl")).readlines()[:4]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1"}\n')
    out = tmp_path / "res.json"
    r = run("eval.py", "--data", f"{good},{bad}", "--k", "1", "--rollout", "torch", "--out", str(out))
    one_line_error(r, "bad.jsonl:1: missing field 'answer'")
    assert "rollout engine" not in r.stdout and not out.exists()  # nothing started, nothing written
    one_line_error(run("eval.py", "--model", str(tmp_path / "nope")), "no such folder")
    one_line_error(run("eval.py", "--k", "0", "--data", str(good)), "--k 0")
    # two files, --limit: both files' scores written
    r = run("eval.py", "--data", f"{good},{good}", "--k", "1", "--limit", "2", "--rollout", "torch",
            "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert [x["problems"] for x in json.load(open(out))["results"]] == [2, 2]
    one_line_error(run("data.py", "split", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)),
                   "nope.jsonl: no such problem file")
    one_line_error(run("data.py", "split", str(bad), "--out", str(tmp_path)), "missing field")
    r = run("curriculum.py", "--help")
    assert r.returncode == 0 and "usage: python curriculum.py plot" in r.stdout


def test_eval_with_vllm_fits_the_toy_positions(tmp_path):
    if os.environ.get("FASTCURL_REQUIRE_VLLM") != "1":
        pytest.importorskip("vllm")
    good = tmp_path / "good.jsonl"
    good.write_text("".join(open(os.path.join(TOY, "eval.jsonl")).readlines()[:4]))
    r = run("eval.py", "--data", str(good), "--k", "1", "--rollout", "vllm", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rollout engine: vllm" in r.stdout and "good.jsonl" in r.stdout
    assert "Failed to load weights" not in r.stderr
