"""Rebuild the embedded toy: task files, a character tokenizer, and a tiny Qwen2 warmed up on solution traces.

    python assets/toy/make_toy.py            # about 10 minutes on 2 CPU cores; same numbers on a rerun

The traces are deliberately imperfect so that RL has something to fix: each step of a running sum
slips (off by 1-3, carried on to a wrong answer) with probability SLIP and is written twice with
probability REPEAT, so the warmed-up model is sometimes wrong, wrong more often on longer problems,
and wordier than it needs to be.
"""
import argparse
import json
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
import data  # noqa: E402
from model import Config, Transformer, init_weights  # noqa: E402

SLIP, REPEAT = 0.12, 0.15
CHARS = list("0123456789+-=,. {}")


def toy_problem(rng: random.Random, n_terms: int) -> data.Problem:
    terms = [rng.randint(1, 9) for _ in range(n_terms)]
    return data.Problem("+".join(map(str, terms)), str(sum(terms)))


def toy_trace(problem: str, rng: random.Random, slip_p: float = 0.0,
              repeat_p: float = 0.0) -> str:
    """Running sums "3+5=8,8+2=10.\\boxed{10}"; each step may slip (off by 1-3, carried on) or be
    repeated."""
    terms = [int(t) for t in problem.split("+")]
    acc, steps = terms[0], []
    for t in terms[1:]:
        res = acc + t
        if rng.random() < slip_p:
            res = max(0, res + rng.choice([-3, -2, -1, 1, 2, 3]))
        step = f"{acc}+{t}={res}"
        steps.append(step)
        if rng.random() < repeat_p:
            steps.append(step)
        acc = res
    return ",".join(steps) + f".\\boxed{{{acc}}}"


def toy_sets(seed: int = 0, n_train: int = 20000, n_eval: int = 512, terms=(2, 8)):
    """Deterministic train / held-out sets, term counts uniform in `terms`; no held-out problem is
    in train."""
    rng = random.Random(seed)
    ev = [toy_problem(rng, rng.randint(*terms)) for _ in range(n_eval)]
    seen = {p.problem for p in ev}
    tr = []
    while len(tr) < n_train:
        p = toy_problem(rng, rng.randint(*terms))
        if p.problem not in seen:
            tr.append(p)
    return tr, ev


def build_tokenizer(out: str):
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "<eos>", "<unk>")])
    tok.add_tokens(["\\boxed{"])
    tok.decoder = decoders.Fuse()
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>", "pad_token": "<pad>",
                   "unk_token": "<unk>", "model_max_length": 512}, f, indent=2)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": 1, "pad_token_id": 0}, f, indent=2)
    return data.Tokenizer(out)


def toy_config() -> Config:
    return Config(vocab_size=32, hidden_size=256, intermediate_size=640, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                  rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, model_type="qwen2",
                  bos_token_id=None, eos_token_id=1)


def batch_of_traces(probs, tok, rng, bs):
    """Right-padded [prompt + trace + eos] rows and the response mask (loss on the trace and eos only)."""
    rows, masks = [], []
    for p in rng.sample(probs, bs):
        prompt = tok.encode(data.format_prompt(p.problem, "toy"))
        resp = tok.encode(toy_trace(p.problem, rng, SLIP, REPEAT)) + tok.eos_ids
        rows.append(prompt + resp)
        masks.append([0] * len(prompt) + [1] * len(resp))
    T = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_id] * (T - len(r)) for r in rows])
    mask = torch.tensor([m + [0] * (T - len(m)) for m in masks], dtype=torch.float)
    return ids, mask


def evaluate(model, tok, probs, k=4, temperature=1.0, max_tokens=160, seed=0):
    """pass@1 averaged over k samples, mean response length, accuracy by number of terms."""
    from reward import math_reward
    from rollout import TorchEngine

    eng = TorchEngine(model, tok.eos_ids, tok.pad_id)
    prompts = [tok.encode(data.format_prompt(p.problem, "toy")) for p in probs]
    comps = eng.generate(prompts, n=k, max_tokens=max_tokens, temperature=temperature, seed=seed)
    by_terms, total, lens = {}, 0.0, []
    for i, c in enumerate(comps):
        p = probs[i // k]
        r = math_reward(tok.decode(c.response_ids), p.answer)
        total += r
        lens.append(len(c.response_ids))
        by_terms.setdefault(p.problem.count("+") + 1, []).append(r)
    return {"pass@1": total / len(comps), "mean_len": sum(lens) / len(lens),
            "by_terms": {t: sum(v) / len(v) for t, v in sorted(by_terms.items())}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-k", type=int, default=4)
    ap.add_argument("--probe-every", type=int, default=0, help="quick held-out probe every K steps")
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    os.makedirs(a.out, exist_ok=True)
    train, held = toy_sets(a.seed)
    data.write_jsonl(os.path.join(a.out, "train.jsonl"), train)
    data.write_jsonl(os.path.join(a.out, "eval.jsonl"), held)
    mdir = os.path.join(a.out, "model")
    os.makedirs(mdir, exist_ok=True)
    tok = build_tokenizer(mdir)
    model = init_weights(Transformer(toy_config()), seed=a.seed)
    print(f"toy model: {model.num_params() / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    # warmup then constant: the model after s steps of a long run is the model of a run with --steps s
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    rng = random.Random(a.seed)
    t0 = time.time()
    for step in range(a.steps):
        ids, mask = batch_of_traces(train, tok, rng, a.batch)
        h = model(ids[:, :-1])
        loss = (F.cross_entropy(model.logits(h).flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
                * mask[:, 1:].flatten()).sum() / mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == a.steps - 1:
            print(f"step {step:5d} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
        if a.probe_every and (step + 1) % a.probe_every == 0:
            r = evaluate(model, tok, held[:256], k=1, seed=1)
            print(f"  probe after {step + 1} steps: pass@1 {r['pass@1']:.3f} len {r['mean_len']:.1f} "
                  f"{ {t: round(v, 2) for t, v in r['by_terms'].items()} }", flush=True)
            model.save_pretrained(os.path.join(a.out, "probes", f"step{step + 1}"))
    model.save_pretrained(mdir)
    card = evaluate(model, tok, held, k=a.eval_k)
    card.update(steps=a.steps, batch=a.batch, lr=a.lr, seed=a.seed, slip=SLIP, repeat=REPEAT,
                params=model.num_params(), eval="held-out eval.jsonl, T=1.0, pass@1 over k samples",
                k=a.eval_k, torch=torch.__version__)
    with open(os.path.join(mdir, "toy_card.json"), "w") as f:
        json.dump(card, f, indent=2)
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
