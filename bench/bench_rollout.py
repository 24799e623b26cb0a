"""Generated tokens/s: the native engine, vLLM and transformers' generate, same prompts, n and budget.

    python bench/bench_rollout.py [--shapes toy,0.5b]        # writes bench/results/rollout-<device>.json
    python bench/bench_rollout.py --shapes 152k-8,152k-32,152k-64 --engines torch,vllm   # -> rollout-cpu-152k.json
    python bench/bench_rollout.py --shapes 1.5b --engines torch,torch-dynamic,transformers --dtype bfloat16

Shapes: the shipped toy checkpoint, and randomly initialised Qwen2-shaped ~0.5B (hidden 896, 24 layers) and
DeepSeek-R1-Distill-Qwen-1.5B-shaped models (vocabulary 151936) written to a temporary folder. Every engine runs in its own process (vLLM sets the thread
count of the process it lives in), samples at temperature 1 with no EOS so that every sequence runs to the
budget. Engines: torch (the native engine as configured by default: CUDA graphs on a GPU, the dynamic cache
on a CPU), torch-dynamic (eager decode, attention over the filled columns: the CPU path, and the GPU path
before graphs), torch-static (the graph's static step run eagerly), vllm, transformers. Also the weight push: the time to stream all weights into the running vLLM engine (update_weights),
the first push (which allocates) and the median of the next three (what every training step pays).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from bench.common import save_result  # noqa: E402

HALF_B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
              num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1e6)


ONE_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
              num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e4)


# the real vocabulary on the smallest model (hidden 128, 2 layers): the head and the sampler are the decode
TINY_152K = dict(vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e4)


def worker(engine: str, model_dir: str, prompts: int, n: int, prompt_len: int, max_tokens: int,
           dtype: str = "float32") -> dict:
    import torch

    from model import Transformer, load_config
    cfg = load_config(model_dir)
    dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dt = getattr(torch, dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    ps = [torch.randint(3, cfg.vocab_size, (prompt_len,), generator=g, device="cpu").tolist()
          for _ in range(prompts)]
    res = {"engine": engine, "dtype": dtype}
    if engine.startswith("torch"):
        from rollout import TorchEngine
        m = Transformer.from_pretrained(model_dir, dtype=dt, device=dev).eval()
        eng = TorchEngine(m, [], pad_id=0, decode=engine.partition("-")[2] or None)
        res["decode"] = eng.decode
        run = lambda: eng.generate(ps, n=n, max_tokens=max_tokens, temperature=1.0, seed=1)  # noqa: E731
    elif engine == "vllm":
        from rollout import VLLMEngine
        eng = VLLMEngine(model_dir, max_model_len=prompt_len + max_tokens + 8, dtype=dtype,
                         gpu_memory_utilization=0.6 if cfg.hidden_size > 512 else None)  # fp32 0.5B: 2 GB of weights
        from vllm import SamplingParams
        sp = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=1)
        run = lambda: eng.llm.generate([{"prompt_token_ids": p} for p in ps], sp, use_tqdm=False)  # noqa: E731
    else:
        import transformers
        m = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dt).to(dev).eval()
        ids = torch.tensor(ps, device=dev)

        def run():
            with torch.no_grad():
                return m.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0,
                                  top_k=0, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                  num_return_sequences=n, pad_token_id=0)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    run()  # warm up
    sync()
    t = time.perf_counter()
    run()
    sync()
    dt = time.perf_counter() - t
    res.update(seconds=dt, tokens_per_s=prompts * n * max_tokens / dt)
    if engine == "vllm":  # the weight push of the full model: the first (allocates), then the next three
        m = Transformer.from_pretrained(model_dir)
        pushes = []
        for _ in range(4):
            t = time.perf_counter()
            eng.update_weights(m.state_dict().items())
            pushes.append(time.perf_counter() - t)
        res.update(weight_push_first_s=pushes[0], weight_push_s=sorted(pushes[1:])[1])
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="toy,0.5b")
    ap.add_argument("--engines", default="torch,vllm,transformers")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--max-tokens", type=int, default=None, help="override every shape's response budget")
    ap.add_argument("--worker", nargs=6, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        e, d, p, n, pl, mt = a.worker
        print(json.dumps(worker(e, d, int(p), int(n), int(pl), int(mt), a.dtype)))
        return
    import torch

    from model import Config, Transformer, init_weights
    settings = {"toy": dict(prompts=16, n=8, prompt_len=8, max_tokens=64),
                "0.5b": dict(prompts=8, n=8, prompt_len=16, max_tokens=32),
                "1.5b": dict(prompts=16, n=4, prompt_len=64, max_tokens=128),
                **{f"152k-{rows}": dict(prompts=rows // 4, n=4, prompt_len=64, max_tokens=64)
                   for rows in (8, 32, 64)}}
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
           "date": time.strftime("%Y-%m-%d"), "shapes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in a.shapes.split(","):
            if shape == "toy":
                d = os.path.join(ROOT, "assets", "toy", "model")
            else:
                model = shape.split("-")[0]  # the 152k-<rows> shapes share one model
                d = os.path.join(tmp, model)
                if not os.path.exists(d):
                    m = init_weights(Transformer(Config(**{"0.5b": HALF_B, "1.5b": ONE_5B, "152k": TINY_152K}[model])),
                                     std=0.02)
                    m.save_pretrained(d, dtype=getattr(torch, a.dtype))
                    res[f"{model}_params"] = m.num_params()
                    del m
            s = dict(settings[shape], **({"max_tokens": a.max_tokens} if a.max_tokens else {}))
            rows = {}
            for e in a.engines.split(","):
                r = subprocess.run([sys.executable, __file__, "--worker", e, d, str(s["prompts"]), str(s["n"]),
                                    str(s["prompt_len"]), str(s["max_tokens"]), "--dtype", a.dtype],
                                   capture_output=True, text=True,
                                   env=dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count())))
                rows[e] = (json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0
                           else {"error": r.stderr.strip().splitlines()[-1][:200]})
                print(shape, json.dumps(rows[e]), flush=True)
            ok = {k: v for k, v in rows.items() if "tokens_per_s" in v}
            if "torch" in ok:
                for k in ok:
                    rows[k]["native_over_this"] = ok["torch"]["tokens_per_s"] / ok[k]["tokens_per_s"]
            res["shapes"][shape] = {"settings": s, "engines": rows}
    dev = "gpu" if torch.cuda.is_available() else "cpu"
    save_result(f"rollout-{dev}" + ("-152k" if a.shapes.startswith("152k") else "") + ".json", res)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
