"""Bad input found by the plan: what a run will write or read is checked before any compute, a run's
identity (run.json) catches what changes its results and allows what may change on a resume, one run
per output folder, and a bad input is one line (one rank's under torchrun)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import grpo
from tests.test_plan import QUICK, plan_of

pytestmark = pytest.mark.slow  # most tests here start processes or train a step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def refused(*argv) -> str:
    """The one line make_plan (or the flags' checks) stops with."""
    with pytest.raises(SystemExit) as e:
        plan_of(*argv)
    return str(e.value)


def run(*args, timeout=300, **popen):
    return subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), **popen)


def one_line_error(r, *needles):
    assert r.returncode == 1, (r.returncode, r.stdout[-1000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    for n in needles:
        assert n in last, (n, last)
    return last


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-step run of stages 1-2 (copy it before changing it)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    r = run("--stage", "1-2", "--out", str(out), *QUICK)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def copy_of(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# ---- 1. every stage's folder and the source checkpoint, before stage 1 trains ------------------

def test_a_later_stage_folder_in_the_way_is_found_before_stage_1(tmp_path):
    (tmp_path / "stage2").write_text("")
    line = refused("--stage", "1-2", "--out", str(tmp_path))
    assert "stage2 is a file, not a folder" in line and line.startswith("[fastcurl] --out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder")
def test_a_later_stage_folder_not_writable_is_found_before_stage_1(tmp_path):
    (tmp_path / "stage2").mkdir(mode=0o555)
    assert "stage2 is not writable" in refused("--stage", "1-2", "--out", str(tmp_path))


def test_out_a_dangling_link_is_one_line_then_the_corrected_command_runs(tmp_path):
    link = tmp_path / "runs"
    link.symlink_to(tmp_path / "gone" / "runs")
    line = refused("--out", str(link), *QUICK)
    assert line == f"[fastcurl] --out: {link} is a link to {tmp_path}/gone/runs, which does not exist"
    (tmp_path / "gone" / "runs").mkdir(parents=True)
    assert plan_of("--out", str(link), *QUICK).stages[0].dir == f"{link}/stage1"


def test_out_a_name_over_the_file_systems_limit_is_one_line(tmp_path):
    line = refused("--out", str(tmp_path / ("a" * 300) / "b"), *QUICK)
    assert line.startswith("[fastcurl] --out: the folder name aaaaaaaa") and "300 bytes" in line
    assert os.listdir(tmp_path) == []


def test_a_damaged_previous_final_is_one_line(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    shutil.rmtree(out / "stage2")
    weights = out / "stage1" / "final" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # same size: only its sha256 tells
    weights.write_bytes(bytes(data))
    line = refused("--stage", "2", "--out", str(out), *QUICK)
    assert "stage1/final, which is damaged (model.safetensors's content differs" in line


# ---- 2. run.json damaged or missing -------------------------------------------------------------

def test_run_json_not_json_is_one_line(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    (out / "stage1" / "run.json").write_text('{"recipe": "toy", "st')
    line = refused("--out", str(out), *QUICK, "--resume")
    assert "stage1/run.json is damaged" in line and "choose another --out" in line


def test_run_json_missing_beside_a_run_is_one_line(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    (out / "stage1" / "run.json").unlink()
    assert "holds a run (metrics.jsonl) but no run.json" in refused(
        "--out", str(out), *QUICK, "--resume", "--lr", "0.5")


# ---- 3. the identity: what changes the results is refused by name, lr and steps may change --------

def test_what_changes_the_results_is_named_with_old_and_new_values(finished, tmp_path, capsys):
    out = str(copy_of(finished, tmp_path))
    train = os.path.join(ROOT, "assets", "toy", "train.jsonl")
    same, edited = tmp_path / "same.jsonl", tmp_path / "edited.jsonl"
    shutil.copy(train, same)
    edited.write_text("".join(open(train).readlines()[:-1]))  # one row fewer
    assert plan_of("--out", out, *QUICK, "--resume", "--data", str(same)) is None  # complete
    assert f"data {train} -> {same}" in capsys.readouterr().out  # a moved file: logged
    line = refused("--out", out, *QUICK, "--resume", "--data", str(edited))
    assert "data_sha256 " in line and "holds a different run" in line
    line = refused("--out", out, *QUICK, "--resume", "--dtype", "bfloat16", "--fsdp", "none",
                   "--max-tokens", "30")
    assert "fsdp hand -> none; dtype float32 -> bfloat16; stage_config.max_tokens 40 -> 30" in line
    options, flags = grpo.parse_args(["--out", out, *QUICK, "--resume"])
    with pytest.raises(SystemExit) as e:
        grpo.make_plan(options, flags, rank=0, world=2, device=torch.device("cpu"))
    assert "world 1 -> 2" in str(e.value)


def test_a_changed_learning_rate_is_allowed_and_logged(finished, tmp_path, capsys):
    out = str(copy_of(finished, tmp_path))
    assert plan_of("--out", out, *QUICK, "--resume", "--lr", "5e-05") is None
    assert "with changes: stage_config.lr 0.0001 -> 5e-05" in capsys.readouterr().out


def test_a_finished_stage_continues_to_a_larger_steps(finished, tmp_path):
    """A final ended by its cap continues from there to the new cap; the steps after equal those
    of a run given the larger cap from the start."""
    out = copy_of(finished, tmp_path)
    quick2 = [*QUICK, "--steps", "2"]
    r = run("--out", str(out), *quick2, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ended at its cap, step 1: continuing from" in r.stdout
    assert "with changes: stage_config.steps 1 -> 2" in r.stdout
    r = run("--out", str(tmp_path / "straight"), *quick2)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [[{k: v for k, v in json.loads(line).items() if not k.startswith(("time/", "through"))}
             for line in open(folder / "stage1" / "metrics.jsonl")]
            for folder in (out, tmp_path / "straight")]
    assert rows[0][0].pop("stage_end") == "steps: the stage's cap, 1"  # the first cap: history
    assert len(rows[0]) == 2 and rows[0] == rows[1]
    assert plan_of("--out", str(out), *quick2, "--resume") is None  # now complete at 2


# ---- 4. run.json's paths inside the folder are relative: a moved folder resumes ------------------

def test_a_moved_run_folder_resumes(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    moved = tmp_path / "elsewhere"
    os.rename(out, moved)
    assert json.loads((moved / "stage2" / "run.json").read_text())["model"] == \
        os.path.join("stage1", "final")
    assert plan_of("--stage", "1-2", "--out", str(moved), *QUICK, "--resume") is None


# ---- 5. empty text for a setting -----------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--model", "--out", "--data", "--eval-data"])
def test_empty_text_for_a_path_is_one_line(flag):
    assert refused(flag, "", *QUICK) == f"[fastcurl] {flag} '': empty (leave the flag out for " \
        f"its default)"


# ---- 6. a vocabulary larger than the model's embedding ------------------------------------------

def test_vocab_size_below_the_tokenizer_is_one_line_before_run_json(tmp_path):
    from safetensors.torch import load_file, save_file
    model = tmp_path / "model"
    shutil.copytree(os.path.join(ROOT, "assets", "toy", "model"), model)
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] = 16  # the tokenizer has 22 tokens
    (model / "config.json").write_text(json.dumps(config))
    weights = load_file(model / "model.safetensors")
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"][:16].clone()
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "run"
    line = refused("--model", str(model), "--out", str(out), *QUICK)
    assert "config.json: vocab_size 16 is smaller than the 22 tokens of its tokenizer.json" in line
    assert not out.exists()


# ---- 7. --fsdp torch without torchrun: a group of one ----------------------------------------

def test_fsdp_torch_runs_on_one_process_like_hand(finished, tmp_path):
    r = run("--out", str(tmp_path / "run"), *QUICK, "--fsdp", "torch")
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [{k: v for k, v in json.loads(open(folder / "stage1" / "metrics.jsonl").readline())
             .items() if not k.startswith(("time/", "through"))}
            for folder in (tmp_path / "run", finished)]
    assert rows[0].pop("grad_norm") == pytest.approx(rows[1].pop("grad_norm"), rel=1e-5)
    assert rows[0] == rows[1]  # FSDP2 sums the gradient norm in another order


# ---- 8. one run per output folder ---------------------------------------------------------------

def test_a_second_run_into_a_folder_in_use_is_one_line(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(600)"),
        str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = run("--out", str(out), *QUICK)
        one_line_error(r, f"--out {out}: another run is writing there")
        assert sorted(os.listdir(out)) == [".lock"]
    finally:
        holder.kill()  # as a crash would: the lock goes with the process
        holder.wait()
    r = run("--out", str(out), *QUICK)
    assert r.returncode == 0, r.stderr[-3000:]


# ---- 9. under torchrun, rank 0 says it -----------------------------------------------------------

@pytest.mark.parametrize("bad", [["--batch", "-4"], ["--data", "no/such.jsonl"]])
def test_under_torchrun_a_bad_input_is_said_once(tmp_path, bad):
    """(before the process group, and after it); torchrun then adds its own ChildFailedError."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", os.path.join(ROOT, "grpo.py"), "--out", str(out),
                        *QUICK, *bad], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.startswith("[fastcurl]")]
    assert len(lines) == 1 and bad[1] in lines[0], r.stderr[-3000:]
    assert not out.exists()
