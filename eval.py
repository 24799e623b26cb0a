"""Evaluate a checkpoint: pass@1 averaged over k samples per problem (the paper's metric), pass@k.

    python eval.py                                 # the toy checkpoint on the toy held-out set
    python eval.py --model CKPT --bench paper [--limit 100] [--out results.json]  # the paper's 5
    python eval.py --model CKPT --data my.jsonl,math500 --k 16 --temperature 0.6 --max-tokens 32768
    torchrun --nproc_per_node 8 eval.py ...        # problems sharded across ranks, gathered on 0

    pass@1 = mean over problems of c / k;  pass@k (unbiased, Chen et al. 2021) = 1 - C(k - c, k) /
    C(k, k) = 1 if any of the k samples is right; c = right samples of the problem.

Every input is checked before the model loads; --out gets the results so far after each file.
The paper's sets (--bench) come with the project: data.NAMED_SETS, assets/benchmarks/.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

import data
from checkpoint import write_atomic
from fsdp import close_dist, finish, setup_dist
from model import Transformer, check_weights
from reward import score_completions
from rollout import choose_engine, make_engine
from settings import DEFAULT_RECIPE, PAPER, RECIPES, check, eval_budget, fit_seed


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c right: 1 - C(n-c, k) / C(n, k)."""
    return 1.0 if n - c < k else 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def evaluate_file(engine, tok, template: str, path: str, *, problems: list, k: int,
                  temperature: float, top_p: float = 1.0, max_tokens: int, max_prompt: int,
                  seed: int = 0, rank: int = 0, world: int = 1, limit: int | None = None) -> dict:
    """Score the first `limit` problems of the file at `path`; under several ranks each takes
    problems rank::world and every rank gets all. A prompt that leaves the engine no room for a
    response token (vLLM refuses it, mid-eval) is not sent: counted in "dropped"."""
    probs = problems[:limit]
    mine = range(rank, len(probs), world)
    enc, _ = data.encode_problems([probs[i] for i in mine], tok, template, 10 ** 9)
    room = engine.max_model_len or math.inf
    kept = [(i, ids, answer) for i, (ids, answer) in zip(mine, enc) if len(ids) < room]
    t0 = time.time()
    progress = progress_printer(os.path.basename(path), len(kept), world) if rank == 0 else None
    comps = engine.generate([ids for _, ids, _ in kept], n=k, max_tokens=max_tokens,
                            temperature=temperature, top_p=top_p, seed=seed + rank,
                            progress=progress)
    rewards = score_completions(comps, [answer for *_, answer in kept for _ in range(k)],
                                tok.decode)
    rows = []
    for j, (i, ids, _) in enumerate(kept):
        cs = comps[j * k:(j + 1) * k]
        rows.append({"index": i, "problem": probs[i].problem, "answer": probs[i].answer,
                     "correct": int(sum(rewards[j * k:(j + 1) * k])), "k": k,
                     "lengths": [len(c.response_ids) for c in cs],
                     "truncated": sum(c.finish_reason == "length" for c in cs),
                     "prompt_over_budget": len(ids) > max_prompt,
                     "sample": tok.decode(cs[0].response_ids)})
    if world > 1:
        allrows = [None] * world
        dist.all_gather_object(allrows, rows)
        rows = sorted((r for part in allrows for r in part), key=lambda r: r["index"])
    lens, scored = [n for r in rows for n in r["lengths"]] or [0], max(len(rows), 1)
    return {"file": path, "problems": len(rows), "dropped": len(probs) - len(rows), "k": k,
            "temperature": temperature, "max_tokens": max_tokens,
            "pass@1": sum(r["correct"] / k for r in rows) / scored,
            f"pass@{k}": sum(pass_at_k(k, r["correct"], k) for r in rows) / scored,
            "response_len/mean": sum(lens) / len(lens), "response_len/max": max(lens),
            "truncated_frac": sum(r["truncated"] for r in rows) / len(lens),
            "time_s": time.time() - t0, "per_problem": rows}


PROGRESS_EVERY_S = 30.0  # seconds between two progress lines of a long evaluation


def progress_printer(name: str, total: int, world: int):
    """-> progress(problems done, response tokens so far) for engine.generate: a line every
    PROGRESS_EVERY_S seconds with the problems done, tokens/s and the time left (rank 0's)."""
    start = last = time.time()

    def progress(done: int, tokens: int):
        nonlocal last
        now = time.time()
        if now - last < PROGRESS_EVERY_S or not done:
            return
        last, left = now, (total - done) * (now - start) / done
        print(f"[fastcurl] {name}: {done}/{total} problems" + (" (rank 0's share)" if world > 1
              else "") + f", {tokens / (now - start):.0f} tokens/s, eta {left // 60:.0f}m"
              f"{left % 60:02.0f}s", flush=True)
    return progress


def checked_settings(a, recipe):
    """The flags grpo.py has too, as a stage of the recipe (its defaults, the eval budget) checked
    against the same ranges; --k, --limit and --out. ValueError naming the flag."""
    budget = recipe.eval_tokens or eval_budget(recipe.stages)
    given = {"max_tokens": budget if a.max_tokens is None else a.max_tokens,
             "max_prompt": a.max_prompt, "temperature": a.temperature, "top_p": a.top_p}
    stage = dataclasses.replace(recipe.stages[0],
                                **{k: v for k, v in given.items() if v is not None})
    check(stage)
    for flag, value in (("--k", a.k), ("--limit", a.limit)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} {value}: must be at least 1")
    if a.out and os.path.isdir(a.out):
        raise ValueError(f"--out {a.out}: a folder; give the results file's name")
    return stage


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add = ap.add_argument
    add("--recipe", choices=sorted(RECIPES),
        help="whose defaults: held-out file, temperature, budgets (default: the recipe for the "
             f"checkpoint's prompt format; {PAPER}'s, the paper's, for any other)")
    add("--model", help=f"checkpoint folder (default: the {DEFAULT_RECIPE} model)")
    add("--bench", help="the paper's test sets by name, comma-separated: "
                        f"{','.join(data.PAPER_BENCHMARKS)}, or paper for all five")
    add("--data", help="comma-separated problem files or bundled sets' names (default: the "
                       "recipe's held-out file)")
    add("--k", type=int, default=16, help="samples per problem")
    add("--limit", type=int, help="only the first N problems of each file")
    add("--temperature", type=float, help="default: the recipe's first stage's")
    add("--top-p", type=float, default=1.0)
    add("--max-tokens", type=int, help="default: the recipe's eval budget")
    add("--max-prompt", type=int, help="default: the recipe's prompt budget")
    add("--rollout", default="auto", choices=["auto", "torch", "vllm"])
    add("--template", choices=["r1", "qwen", "toy"])
    add("--seed", type=int, default=0)
    add("--device", default="auto", choices=["auto", "cuda", "cpu"])
    add("--dtype", default="float32", choices=["float32", "bfloat16"])
    add("--out", help="write a JSON with per-problem results (after each file) and, beside it, "
                      "the results table (.md)")
    return ap.parse_args(argv)


def problem_files(a, recipe, template: str) -> list[tuple[str, str]]:
    """--bench or --data (or the recipe's held-out file) -> [(name shown, path)]."""
    if a.bench and a.data:
        raise ValueError("--bench and --data: give one of them")
    if a.bench:
        names = data.PAPER_BENCHMARKS if a.bench == "paper" else a.bench.split(",")
        if unknown := [n for n in names if n not in data.PAPER_BENCHMARKS]:
            raise ValueError(f"--bench {','.join(unknown)}: not one of "
                             f"{', '.join(data.PAPER_BENCHMARKS)}, paper")
        if template == "toy":
            raise ValueError(f"--bench: {a.model} has the toy's character vocabulary, which "
                             f"cannot write these problems: give a real model with --model")
    else:
        names = (a.data or recipe.eval_data or "").split(",")
        if names == [""]:
            raise ValueError("--data: give the problem files to score")
    return [(n if n in data.NAMED_SETS else os.path.basename(n), data.problem_file(n))
            for n in names]


def main(argv=None):
    a = parse_args(argv)
    rank, world, device = setup_dist(a.device)
    a.model = a.model or RECIPES[a.recipe or DEFAULT_RECIPE].model
    # every input checked before the model loads
    try:
        if not os.path.isdir(a.model):
            raise ValueError(f"--model {a.model}: no such folder")
        config = check_weights(a.model)
        tok = data.Tokenizer(a.model)
        template = a.template or tok.template
        data.check_template(tok, template, a.model)
        recipe = RECIPES[a.recipe] if a.recipe else next(
            (r for r in RECIPES.values() if r.template == template), RECIPES[PAPER])
        files = [(name, path, data.load_problems(path))
                 for name, path in problem_files(a, recipe, template)]
        for *_, problems in files:
            data.encode_problems(problems[:a.limit], tok, template, 10 ** 9)
        stage = checked_settings(a, recipe)
    except (ValueError, OSError, ImportError) as e:
        raise SystemExit(f"[fastcurl] {e}")
    temperature, max_tokens, max_prompt = stage.temperature, stage.max_tokens, stage.max_prompt
    if max_prompt + max_tokens > (positions := config.max_position_embeddings):
        raise SystemExit(f"[fastcurl] --max-prompt {max_prompt} + --max-tokens {max_tokens} "
                         f"exceeds {a.model}'s max_position_embeddings {positions}")
    if a.out and rank == 0:
        out_dir = os.path.dirname(os.path.abspath(a.out))
        if not os.path.isdir(out_dir) or not os.access(out_dir, os.W_OK):
            raise SystemExit(f"[fastcurl] --out {a.out}: {out_dir} is not a writable folder")
    kind, why = choose_engine(a.rollout, config, device)  # vLLM loads its own copy of the weights
    model = None if kind == "vllm" else Transformer.from_pretrained(
        a.model, dtype=getattr(torch, a.dtype), device=device)
    if rank == 0:
        print(f"[fastcurl] rollout engine: {kind} ({why})", flush=True)
    seed = fit_seed(a.seed)
    engine = make_engine(kind, model, tok, model_dir=a.model, rank=rank, world=world, seed=seed,
                         dtype=a.dtype, max_model_len=max_prompt + max_tokens)
    results = []
    for name, path, problems in files:
        results.append(evaluate_file(engine, tok, template, path, k=a.k, temperature=temperature,
                                     top_p=a.top_p, max_tokens=max_tokens, max_prompt=max_prompt,
                                     seed=seed, rank=rank, world=world, problems=problems,
                                     limit=a.limit) | {"name": name, "in_file": len(problems)})
        if rank == 0:
            print_row(results[-1], a.k, header=len(results) == 1)
            table = results_table(results, a.k)
            if a.out:  # written as each file is done: a later failure keeps the earlier scores
                report = {"model": a.model, "results": results, "table": table}
                if problem := (write_atomic(a.out, json.dumps(report, indent=2)) or write_atomic(
                        os.path.splitext(a.out)[0] + ".md", table)):
                    sys.exit(problem)
    if rank == 0 and (len(files) > 1 or files[0][0] in data.PAPER_BENCHMARKS):
        print(f"\n{table}", flush=True)
    close_dist(engine)


# pass@1 (%) in the FastCuRL paper's table (16 samples at T = 0.6 within 32K tokens), in
# data.PAPER_BENCHMARKS' order
PAPER_SCORES = {"FastCuRL-1.5B-V3": (49.6, 78.5, 90.5, 34.7, 54.5),
                "DeepScaleR-1.5B-Preview": (43.1, 73.6, 87.8, 30.2, 50.0),
                "R1-Distill-Qwen-1.5B": (28.8, 62.9, 82.8, 26.5, 43.3)}


def results_table(results: list[dict], k: int) -> str:
    """Markdown: pass@1 (and pass@k) in % per set, the paper's pass@1 beside the bundled test
    sets, and the means when every set is one of them."""
    ours = ["pass@1"] + ([f"pass@{k}"] if k > 1 else [])
    lines = [f"| set | problems | {' | '.join(ours)} | "
             + " | ".join(f"{name} (paper)" for name in PAPER_SCORES) + " |",
             "|---" * (2 + len(ours) + len(PAPER_SCORES)) + "|"]
    columns = []  # a row's figures: ours, then the paper's for a bundled test set
    for r in results:
        paper = [scores[data.PAPER_BENCHMARKS.index(r["name"])] for scores in
                 PAPER_SCORES.values()] if r["name"] in data.PAPER_BENCHMARKS else []
        columns.append([100 * r[key] for key in ours] + paper)
        cells = [f"{x:.1f}" for x in columns[-1]] + [""] * (len(PAPER_SCORES) - len(paper))
        lines.append(f"| {r['name']} | {r['problems']}/{r['in_file']} | {' | '.join(cells)} |")
    if len(results) > 1 and all(len(c) == len(ours) + len(PAPER_SCORES) for c in columns):
        means = [sum(column) / len(columns) for column in zip(*columns)]
        lines.append("| mean | | " + " | ".join(f"{x:.1f}" for x in means) + " |")
    return "\n".join(lines) + "\n"


def print_row(r: dict, k: int, header: bool):
    if header:
        print(f"{'set':32s}     n  pass@1  pass@k      len    max  trunc")
    dropped = (f"  ({r['dropped']} dropped: prompt + 1 token over the engine's max_model_len)"
               if r["dropped"] else "")
    print(f"{r['name'][:32]:32s} {r['problems']:5d} {100 * r['pass@1']:7.1f} "
          f"{100 * r[f'pass@{k}']:7.1f} {r['response_len/mean']:8.1f} {r['response_len/max']:6d} "
          f"{100 * r['truncated_frac']:6.1f}{dropped}", flush=True)


if __name__ == "__main__":
    finish(main() or 0)
