"""--logger tensorboard|wandb with the real packages in their offline modes: the history read back from
TensorBoard's event files and from wandb's offline run file equals metrics.jsonl (same names, same
values, same steps), also after a SIGKILL and --resume into the same run; a missing package is one
line before anything is written."""
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

import curriculum
from bench.kill_resume import kill_all  # SIGKILL the run and every process under it (wandb's too)
from tests.test_resilience import wait_for_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--batch", "4", "--n-samples", "4", "--eval-k", "0", "--save-every", "2", "--rollout", "torch"]
VOLATILE = ("time/", "throughput/")


def need(package: str):
    """Skip without the package, except in CI (FASTCURL_REQUIRE_VLLM=1), which installs it."""
    if importlib.util.find_spec(package) is None:
        reason = f"--logger tests need {package} (pip install -e '.[log]')"
        if os.environ.get("FASTCURL_REQUIRE_VLLM") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def environment(tmp_path, **extra) -> dict:
    """wandb offline and silent, every folder it writes inside tmp_path."""
    wandb_home = tmp_path / "wandb_home"
    return {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
            "WANDB_DIR": str(wandb_home), "WANDB_CONFIG_DIR": str(wandb_home / "config"),
            "WANDB_CACHE_DIR": str(wandb_home / "cache"), "WANDB_DATA_DIR": str(wandb_home / "data"), **extra}


def command(out, log, *args):
    return [sys.executable, f"{ROOT}/grpo.py", "--stage", "1", "--out", str(out), "--logger", log, *SMALL, *args]


def train(tmp_path, out, log, *args):
    r = subprocess.run(command(out, log, *args), cwd=ROOT, env=environment(tmp_path), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def kill_after(tmp_path, out, log, rows: int):
    """Start --steps 6, SIGKILL it (and wandb's process) once `rows` metrics lines are written:
    the checkpoint is step 2 (rows 3) or step 4 (rows 5), the row after it logged by a process
    that died. Returns the metrics rows it left."""
    p = subprocess.Popen(command(out, log, "--steps", "6"), cwd=ROOT, env=environment(tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_steps(out, rows, p)
    kill_all(p.pid)
    p.wait()
    time.sleep(0.5)
    return metrics(out)


def resumed_step(result) -> int:
    """The checkpoint's step that --resume continued from (its progress line)."""
    return int(re.search(r"resumed from \S+ at step (\d+)", result.stdout).group(1))


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in open(f"{out}/stage1/metrics.jsonl")]


def without_volatile(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not k.startswith(VOLATILE)} for row in rows]


# ---- TensorBoard ---------------------------------------------------------------------------------

def tensorboard_history(folder) -> tuple[list[dict], dict]:
    """The event files read back (purged steps dropped, as TensorBoard shows them) -> (rows in step
    order: {"step", tag: value}, each of a step's text tags -> [(step, text)])."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    rows, texts = {}, {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            assert tag not in rows.setdefault(event.step, {}), f"{tag} twice at step {event.step}"
            rows[event.step][tag] = event.value
    for tag in events.Tags()["tensors"]:  # add_text's summaries
        texts[tag.split("/text_summary")[0]] = [
            (event.step, tensor_util.make_ndarray(event.tensor_proto).item().decode())
            for event in events.Tensors(tag)]
    return [rows[step] for step in sorted(rows)], texts


def as_float32(rows: list[dict]) -> list[dict]:
    """metrics.jsonl's numbers as TensorBoard keeps them (float32); texts left out."""
    return [{k: float(np.float32(v)) for k, v in row.items() if not isinstance(v, str)} for row in rows]


@pytest.mark.slow
def test_tensorboard_history_equals_metrics(tmp_path):
    need("tensorboard")
    out = tmp_path / "run"
    train(tmp_path, out, "tensorboard", "--steps", "4")
    rows, texts = tensorboard_history(out / "stage1" / "tensorboard")
    logged = metrics(out)
    assert len(logged) == 4 and rows == as_float32(logged)  # every key of every row, same names
    assert texts["stage_end"] == [(4, logged[-1]["stage_end"])]
    assert texts["run.json"] == [(0, json.dumps(json.load(open(out / "stage1" / "run.json")), indent=1))]


@pytest.mark.slow
def test_tensorboard_kill_and_resume_keeps_one_history(tmp_path):
    need("tensorboard")
    out = tmp_path / "run"
    left = kill_after(tmp_path, out, "tensorboard", 3)
    assert not os.path.exists(out / "stage1" / "final")
    saved = resumed_step(train(tmp_path, out, "tensorboard", "--steps", "6", "--resume"))
    rows, texts = tensorboard_history(out / "stage1" / "tensorboard")
    logged = metrics(out)
    # the killed process logged a step after its checkpoint: the resume logs it again, and only the
    # new one is shown (purge_step), as metrics.jsonl keeps only the new line
    assert len(left) > saved and left[saved]["time/train_s"] != logged[saved]["time/train_s"]
    assert len(logged) == 6 and rows == as_float32(logged)
    assert len(os.listdir(out / "stage1" / "tensorboard")) == 2  # one event file per process
    assert [step for step, _ in texts["run.json"]] == [0, saved]


@pytest.mark.slow
def test_tensorboard_under_torchrun_from_rank_0_only(tmp_path):
    """torchrun passes --logger on (--log it would refuse: an ambiguous abbreviation of its own
    --log-dir and --logs-specs); rank 0 alone writes the events."""
    need("tensorboard")
    out = tmp_path / "run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r = subprocess.run(torchrun + command(out, "tensorboard", "--steps", "2")[1:], cwd=ROOT,
                       env=environment(tmp_path), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert len(os.listdir(out / "stage1" / "tensorboard")) == 1
    assert tensorboard_history(out / "stage1" / "tensorboard")[0] == as_float32(metrics(out))


def test_tensorboard_logger_purges_the_steps_after_the_checkpoint(tmp_path):
    """In process, no training: a run logs steps 1-3 and dies (no close: its files then hold every
    row logged); the resume from the checkpoint at step 2 logs 3-4 with other values: TensorBoard
    shows 1, 2 of the first and 3, 4 of the second."""
    need("tensorboard")
    plan = SimpleNamespace(options=SimpleNamespace(logger="tensorboard"), rank=0)
    stage_plan = SimpleNamespace(dir=str(tmp_path), identity={"stage": 1}, number=1)
    first, second = curriculum.StageLogger(), curriculum.StageLogger()
    first.open(plan, stage_plan, 0)
    rows = [{"step": step, "reward/mean": step / 10, **{f"other/{k}": k for k in range(30)}}
            for step in (1, 2, 3)]
    for row in rows:
        first.log(row)
    # the files as a kill at this moment would leave them: every row logged is in them
    shutil.copytree(tmp_path / "tensorboard", tmp_path / "at_the_kill")
    assert tensorboard_history(tmp_path / "at_the_kill")[0] == as_float32(rows)
    second.open(plan, stage_plan, 2)
    for step in (3, 4):
        second.log({"step": step, "reward/mean": step / 100})
    second.close()
    assert tensorboard_history(tmp_path / "tensorboard")[0] == as_float32(
        rows[:2] + [{"step": 3, "reward/mean": 0.03}, {"step": 4, "reward/mean": 0.04}])


def test_no_logger_on_other_ranks_or_without_the_flag(tmp_path):
    for log, rank in (("tensorboard", 1), ("none", 0)):
        logger = curriculum.StageLogger()
        logger.open(SimpleNamespace(options=SimpleNamespace(logger=log), rank=rank),
                    SimpleNamespace(dir=str(tmp_path), identity={}, number=1), 0)
        logger.log({"step": 1, "reward/mean": 0.5})
        logger.close()
    assert os.listdir(tmp_path) == []


def test_the_logger_is_closed_however_the_run_ends(tmp_path, monkeypatch):
    """An error in a stage (as a signal's or a NaN's early return) still closes the stage's logger
    run: what it had logged is written and the run ended."""
    need("tensorboard")
    plan = SimpleNamespace(options=SimpleNamespace(logger="tensorboard"), rank=0)
    opened = []

    def failing_stages(plan, policy, engine, stop, logger):
        logger.open(plan, SimpleNamespace(dir=str(tmp_path), identity={}, number=1), 0)
        opened.append(logger)
        raise RuntimeError("a stage failed")

    monkeypatch.setattr(curriculum, "run_stages", failing_stages)
    with pytest.raises(RuntimeError):
        curriculum.run(plan, None, None, lambda: False)
    assert opened[0].writer is None and opened[0].kind == "none"


# ---- wandb ---------------------------------------------------------------------------------------

def wandb_records(path):
    """An offline run's .wandb file: a LevelDB-style log (wandb 0.31 has no Python reader of its
    own): a 7-byte file header, then 32 KiB blocks of chunks, each a 7-byte header (crc32c, length,
    type: 1 full, 2 first, 3 middle, 4 last) and its bytes; a record is one protobuf Record."""
    from wandb.proto import wandb_internal_pb2

    raw, block = open(path, "rb").read(), 32768
    assert raw[:4] == b":W&B", raw[:7]
    position, pieces = 7, b""
    while position + 7 <= len(raw):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[position:position + 7])
        if kind == 0:
            break
        pieces += raw[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record
            pieces = b""


def wandb_runs(stage_dir) -> list[dict]:
    """Each offline run folder of the stage, oldest first -> {"id", "name", "project", "config",
    "history": rows without wandb's own keys (_step, _runtime, _timestamp)}."""
    runs = []
    folder = os.path.join(stage_dir, "wandb")
    for name in sorted(n for n in os.listdir(folder) if n.startswith("offline-run-")):
        (file,) = [f for f in os.listdir(os.path.join(folder, name)) if f.endswith(".wandb")]
        run = {"history": [], "config": {}}
        for record in wandb_records(os.path.join(folder, name, file)):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(id=record.run.run_id, name=record.run.display_name, project=record.run.project)
                run["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                run["history"].append({k: v for k, v in row.items() if not k.startswith("_")})
        run["config"].pop("_wandb", None)
        runs.append(run)
    return runs


@pytest.mark.slow
def test_wandb_offline_history_equals_metrics(tmp_path):
    need("wandb")
    out = tmp_path / "run"
    train(tmp_path, out, "wandb", "--steps", "4")
    (run,) = wandb_runs(out / "stage1")
    logged = metrics(out)
    assert len(logged) == 4 and run["history"] == logged  # stage_end as text in the last row
    assert run["id"] == open(out / "stage1" / "wandb_id").read()
    assert (run["name"], run["project"]) == ("run-stage1", "fastcurl")
    assert run["config"] == json.load(open(out / "stage1" / "run.json"))


@pytest.mark.slow
def test_wandb_kill_and_resume_continues_the_same_run(tmp_path):
    need("wandb")
    out = tmp_path / "run"
    left = kill_after(tmp_path, out, "wandb", 3)
    saved = resumed_step(train(tmp_path, out, "wandb", "--steps", "6", "--resume"))
    assert len(left) > saved  # a step after the checkpoint was logged by the killed process
    first, second = wandb_runs(out / "stage1")
    assert first["id"] == second["id"] == open(out / "stage1" / "wandb_id").read()
    # what the killed process logged was kept (but what wandb had not written in its last 0.25 s)
    assert first["history"] == left[:len(first["history"])] and len(first["history"]) >= saved
    union = {}
    for row in first["history"] + second["history"]:  # each step's first occurrence
        union.setdefault(row["step"], row)
    logged = metrics(out)
    assert len(logged) == 6
    assert without_volatile([union[step] for step in sorted(union)]) == without_volatile(logged)
    assert second["history"][0]["step"] == saved + 1  # the resume from the checkpoint


@pytest.mark.slow
def test_a_wandb_run_that_cannot_start_is_one_line(tmp_path):
    """Online without an API key (HOME in tmp: no ~/.netrc) wandb.init fails: one line, every rank
    stops before a step."""
    need("wandb")
    out = tmp_path / "run"
    env = {k: v for k, v in environment(tmp_path, WANDB_MODE="online", HOME=str(tmp_path)).items()
           if k != "WANDB_API_KEY"}
    r = subprocess.run(command(out, "wandb", "--steps", "2"), cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("[fastcurl] --logger wandb cannot start: ")
    assert "API key" in r.stderr and not os.path.exists(out / "stage1" / "metrics.jsonl")


# ---- a missing package ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("log", ["tensorboard", "wandb"])
def test_a_missing_logger_package_is_one_line(tmp_path, log):
    """A package of that name first on the path whose import fails, as a missing one does."""
    fake = tmp_path / "fake" / log  # --logger's name is its package's
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"raise ImportError(\"No module named '{log}'\")\n")
    out = tmp_path / "run"
    r = subprocess.run(command(out, log), cwd=ROOT, env=environment(tmp_path, PYTHONPATH=str(tmp_path / "fake")),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"[fastcurl] --logger {log}: the {log} package is not installed (pip install {log}, or "
                        f"pip install -e '.[log]')\n")
    assert not out.exists()  # nothing written
