"""Kill a 2-rank toy run with SIGKILL at random moments, resume it, and count exact resumes.

    python bench/kill_resume.py [--trials 10]        # writes bench/results/kill_resume.json

Exact = every metric logged after resuming (all but the timings) and the final weights equal those of a run
that never stopped. Native engine, CPU, checkpoints every 2 steps.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import save_result  # noqa: E402
ARGS = ["--stage", "1", "--batch", "4", "--n-samples", "4", "--eval-k", "0", "--save-every", "2", "--rollout",
        "torch", "--steps", "12"]


def cmd(out):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            os.path.join(ROOT, "grpo.py"), "--out", out, *ARGS]


def kill_all(pid: int):
    """SIGKILL torchrun and every process under it: its workers run in sessions of their own, so killing its
    process group alone would leave them running. Returns the pids signalled."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    kids = {}
    for c, par in zip(out[::2], out[1::2]):
        kids.setdefault(int(par), []).append(int(c))
    todo, tree = [pid], []
    while todo:
        q = todo.pop()
        tree.append(q)
        todo += kids.get(q, [])
    for q in tree:
        try:
            os.kill(q, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return tree


def metrics(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "stage1", "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/"))} for r in rows]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    rng = random.Random(a.seed)
    tmp = tempfile.mkdtemp()
    ref = os.path.join(tmp, "ref")
    t = time.time()
    subprocess.run(cmd(ref), cwd=ROOT, env=env, check=True, capture_output=True)
    full_s = time.time() - t
    want = metrics(ref)
    want_w = open(os.path.join(ref, "stage1", "final", "model.safetensors"), "rb").read()
    trials = []
    for i in range(a.trials):
        out = os.path.join(tmp, f"t{i}")
        delay = rng.uniform(0.2, 0.9) * full_s
        p = subprocess.Popen(cmd(out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        finished = p.poll() is not None
        if not finished:
            kill_all(p.pid)  # the whole job at once, as a crash of the machine would
        p.wait()
        logged = len(metrics(out)) if os.path.exists(os.path.join(out, "stage1", "metrics.jsonl")) else 0
        r = subprocess.run(cmd(out) + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True)
        same = (r.returncode == 0 and metrics(out) == want and
                open(os.path.join(out, "stage1", "final", "model.safetensors"), "rb").read() == want_w)
        trials.append({"kill_after_s": round(delay, 2), "killed": not finished, "steps_logged_at_kill": logged,
                       "resumed_from": next((ln.split("resumed from ")[1] for ln in r.stdout.splitlines()
                                             if "resumed from" in ln), "scratch"), "exact": same})
        print(json.dumps(trials[-1]), flush=True)
        shutil.rmtree(out, ignore_errors=True)
    res = {"trials": trials, "exact": sum(t["exact"] for t in trials), "of": len(trials),
           "uninterrupted_run_s": round(full_s, 1), "date": time.strftime("%Y-%m-%d")}
    save_result("kill_resume.json", res, indent=1)
    print(f"{res['exact']}/{res['of']} resumed exactly")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
