"""A whole GRPO step side by side with TRL's GRPOTrainer: same model, data and settings, one CPU process.

    python bench/bench_trl.py                 # builds .bench-trl/ (a venv with trl) on first use
    python bench/bench_trl.py --shape 23.6m --rounds 3 --steps 6    # the larger model
    python bench/bench_trl.py --shape 152k --rounds 3 --steps 6     # the real vocabulary
The two sides alternate (fastcurl, TRL, fastcurl, TRL, ...: --rounds pairs), so a machine that slows down
slows both; the result is the median of the per-round tokens/s ratios with their range. Shapes: the shipped
toy checkpoint, a randomly initialised 23.6M-parameter Qwen2 with the toy's tokenizer (hidden 512,
8 layers, 8 heads, 4 KV heads, MLP 1408) written to a temporary folder, and 152k: the same body with
R1-Distill-Qwen's real vocabulary of 151,936 tokens and tokenizer (tests/real_vocab.py; 179M parameters, the
embedding and the untied head 87% of them), where the head and the sampler cost most. Phases: ours from metrics.jsonl
(sampling, training), TRL's from its own profiling timers (per step, averaged over all steps).

TRL is installed only in this benchmark's own environment (.bench-trl/: a venv that sees the project venv's
torch and transformers through a .pth file, plus `pip install trl==TRL_VERSION`); it is never a dependency.

Both sides: the shipped toy checkpoint, toy stage 1 (short problems, 16 prompts x 8 samples per step, 40-token
budget, temperature 1, lr 1e-4 constant, KL (k3) 0.001 to the reference, entropy bonus 0.001, clip 0.2/0.2,
token-mean loss (TRL: "dapo"), group std-normalised advantages, grad clip 1, one update per rollout batch),
fp32, generation by each side's own engine without vLLM (ours: the native engine; TRL: transformers' generate).
A step is everything: sampling, rewards, old/ref log-probs, the update, the weights back into the sampler.
Tokens are prompt + response tokens of the step (TRL's num_input_tokens_seen; ours the same count).
Writes bench/results/trl-<shape>.json.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import save_result  # noqa: E402
TRL_VERSION = "1.16.0"
TOY = os.path.join(ROOT, "assets", "toy")


def summarise(step_s: list[float], tokens: list[float], lens: list[float], rewards: list[float]) -> dict:
    t, n = step_s[2:], tokens[2:]  # the first two steps warm up (allocations, first packing, thread pools)
    return {"steps_timed": len(t), "step_s_median": statistics.median(t), "tokens_per_s": sum(n) / sum(t),
            "response_len_mean": statistics.mean(lens), "reward_first": rewards[0], "reward_last": rewards[-1]}


SHAPE_23M = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=64)


def make_model(shape: str, tmp: str) -> str:
    """The folder of the model both sides train: the toy, or a random 23.6M Qwen2 with its tokenizer."""
    src = os.path.join(TOY, "model")
    if shape == "toy":
        return src
    if shape == "152k":  # the real R1-Distill tokenizer (tests/real_vocab.py), the 23.6M shape's body
        from tests import real_vocab
        return real_vocab.build_model_folder(os.path.join(tmp, shape), "r1", hidden=512, layers=8, heads=8,
                                             kv_heads=4, intermediate=1408)
    import shutil

    import dataclasses

    from model import Transformer, init_weights, load_config
    cfg = dataclasses.replace(load_config(src), **SHAPE_23M)
    d = os.path.join(tmp, shape)
    m = init_weights(Transformer(cfg), std=0.02)
    m.save_pretrained(d)
    for fn in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(os.path.join(src, fn), d)
    print(f"{shape}: {m.num_params() / 1e6:.1f}M parameters", flush=True)
    return d


def ours(steps: int, out: str, model_dir: str) -> dict:
    shutil_rm(out)
    cmd = [sys.executable, os.path.join(ROOT, "grpo.py"), "--recipe", "toy", "--stage", "1", "--steps", str(steps),
           "--rollout", "torch", "--fsdp", "none", "--eval-k", "0", "--save-every", "0", "--out", out,
           "--model", model_dir, "--template", "toy"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    rows = [json.loads(line) for line in open(os.path.join(out, "stage1", "metrics.jsonl"))]
    step_s = [r["time/rollout_s"] + r["time/train_s"] + r["time/sync_s"] for r in rows]
    res = summarise(step_s, [r["throughput/tokens_per_s"] * s for r, s in zip(rows, step_s)],
                    [r["response_len/mean"] for r in rows], [r["reward/mean"] for r in rows])
    res["phases_s"] = {k: statistics.median(r[f"time/{k}_s"] for r in rows[2:]) for k in ("rollout", "train")}
    res["prompt_shared_frac"] = statistics.mean(r["prompt_shared_frac"] for r in rows)
    return res


def shutil_rm(path):
    import shutil
    shutil.rmtree(path, ignore_errors=True)


def trl_side(steps: int, out: str, model_dir: str) -> dict:
    """Runs inside the TRL environment."""
    import torch
    import transformers
    import trl
    from datasets import Dataset

    import data
    from reward import score_batch

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ours_tok = data.Tokenizer(model_dir)
    sets, _, _ = data.split_by_length(data.load_problems(os.path.join(TOY, "train.jsonl")), "toy")
    prompts = [data.format_prompt(p.problem, "toy") for p in sets["L1"]]
    assert tok(prompts[0], add_special_tokens=False)["input_ids"] == ours_tok.encode(prompts[0])  # same token ids
    ds = Dataset.from_dict({"prompt": prompts, "answer": [p.answer for p in sets["L1"]]})
    eos = ours_tok.eos_ids[0]

    def reward(completions, answer, completion_ids, **_):
        scores = score_batch(completions, answer)
        return [0.0 if eos not in ids else s for s, ids in zip(scores, completion_ids)]  # cut at the budget: 0

    cfg = trl.GRPOConfig(
        output_dir=out, max_steps=steps, per_device_train_batch_size=128, gradient_accumulation_steps=1,
        num_generations=8, steps_per_generation=1, num_iterations=1,
        max_completion_length=40, temperature=1.0, top_p=1.0, top_k=0, learning_rate=1e-4,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, beta=0.001,
        epsilon=0.2, epsilon_high=0.2, loss_type="dapo", scale_rewards="group", entropy_coef=0.001,
        use_cpu=True, bf16=False, fp16=False, report_to="none", logging_steps=1, save_strategy="no",
        disable_dropout=True, seed=0, dataloader_num_workers=0, use_vllm=False, log_completions=False)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    step_s, tokens = [], []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t, self.n = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, args, state, control, **kw):
            step_s.append(time.perf_counter() - self.t)
            tokens.append(state.num_input_tokens_seen - self.n)

    from trl.extras import profiling
    phases = {}  # TRL's own timers (they report only to wandb/mlflow/trackio): name -> seconds, all steps

    def grab(ctx, duration):
        phases[ctx.name] = phases.get(ctx.name, 0.0) + duration

    profiling.ProfilingContext._log_metrics = grab
    tr = trl.GRPOTrainer(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, processing_class=tok,
                         callbacks=[Clock()])
    tr.train()
    logs = [h for h in tr.state.log_history if "reward" in h]
    res = summarise(step_s, tokens, [h["completions/mean_length"] for h in logs], [h["reward"] for h in logs])
    res["phases_s"] = {k: v / steps for k, v in sorted(phases.items())}  # per step, warm-up included
    res["versions"] = {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__}
    return res


def trl_python(env_dir: str) -> str:
    py = os.path.join(env_dir, "bin", "python")
    if not os.path.exists(py):
        print(f"building {env_dir} (trl {TRL_VERSION}) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", env_dir], check=True)
        site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                              check=True, capture_output=True, text=True).stdout.strip()
        with open(os.path.join(site, "_fastcurl_base.pth"), "w") as f:  # the running venv's torch, transformers
            f.write(sysconfig.get_paths()["purelib"] + "\n")
        subprocess.run([py, "-m", "pip", "install", "-q", f"trl=={TRL_VERSION}"], check=True)
    return py


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--shape", default="toy", choices=["toy", "23.6m", "152k"])
    ap.add_argument("--rounds", type=int, default=3, help="alternating fastcurl/TRL pairs")
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--env", default=os.path.join(ROOT, ".bench-trl"))
    ap.add_argument("--side", choices=["trl"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:
        print(json.dumps(trl_side(a.steps, a.out, a.model)))
        return
    import torch
    threads = str(os.cpu_count())
    env = dict(os.environ, OMP_NUM_THREADS=threads)
    os.environ["OMP_NUM_THREADS"] = threads
    py = trl_python(a.env)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(a.shape, tmp)
        for k in range(a.rounds):
            mine = ours(a.steps, os.path.join(tmp, "ours"), model_dir)
            print("fastcurl", json.dumps(mine), flush=True)
            r = subprocess.run([py, __file__, "--side", "trl", "--steps", str(a.steps), "--out",
                                os.path.join(tmp, f"trl{k}"), "--model", model_dir],
                               cwd=ROOT, capture_output=True, text=True, env=env)
            if r.returncode != 0:
                raise SystemExit(f"TRL side failed:\n{r.stderr[-3000:]}")
            theirs = json.loads(r.stdout.strip().splitlines()[-1])
            print("trl", json.dumps(theirs), flush=True)
            rounds.append({"fastcurl": mine, "trl": theirs,
                           "tokens_per_s_ratio": mine["tokens_per_s"] / theirs["tokens_per_s"]})
    ratios = sorted(x["tokens_per_s_ratio"] for x in rounds)
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
           "date": time.strftime("%Y-%m-%d"), "threads": int(threads), "steps": a.steps, "shape": a.shape,
           "rounds": rounds, "tokens_per_s_ratio_median": statistics.median(ratios),
           "tokens_per_s_ratio_range": [ratios[0], ratios[-1]]}
    save_result(f"trl-{a.shape}.json", res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
