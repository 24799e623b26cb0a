"""The Triton kernels through Triton's real compiler for NVIDIA GPUs, on a machine without one.

The CPU interpreter accepts programs the compiler rejects and says nothing of registers or shared memory.
Here every kernel is compiled to a cubin in every autotune configuration it can run with, for sm_80 (A100),
sm_90 (H100, H200) and sm_100 (B200), with bf16 and fp32 operands at every target and fp16 at sm_90
(FASTCURL_COMPILE_ALL=1: at every target; fp16 and bf16 compile to the same shared memory and registers).
The arguments are not written here: a forward and backward pass of `kernels.fused_logprob_entropy` on meta
tensors at the 1.5B shape records every launch it makes, and Triton's own launch binder turns each into the
signature, constexprs and alignment attributes a GPU launch compiles. The configurations are those the
kernels' autotune prune (`kernels._fitting`) keeps at the target's shared memory limit per block. A compile
error fails the test, and so does a kept configuration whose compiled shared memory is past that limit.
Run with -s for the table of shared memory, registers and stack (spills) per kernel and configuration.

The compiles run in fresh worker processes, one per core: conftest sets TRITON_INTERPRET=1 for this
process, under which `triton.jit` makes interpreted functions, `kernels` builds one small configuration and
the interpreter patches triton.language while it runs; a worker started without the variable builds the
real kernels with their full autotune lists. The compiled kernels land in Triton's cache
(TRITON_CACHE_DIR, default ~/.triton/cache), so a rerun of unchanged kernels takes seconds.
"""
import concurrent.futures
import multiprocessing
import os
import resource
import subprocess
import tempfile
import time
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip("triton")

# Shared memory per block (bytes), CUDA C Programming Guide, "Technical Specifications per Compute
# Capability": 163 KB on 8.0, 227 KB on 9.0 and 10.0.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024, 100: 227 * 1024}
TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
TARGETS = [80, 90] + ([100] if TRITON_VERSION >= (3, 3) else [])  # Blackwell since Triton 3.3
DTYPE_TARGETS = {"bfloat16": TARGETS, "float32": TARGETS,
                 "float16": TARGETS if os.environ.get("FASTCURL_COMPILE_ALL") == "1" else [90]}
# The 1.5B shape: hidden 1536, vocabulary 151,936; a ragged token count (not a multiple of 16)
TOKENS, HIDDEN, VOCAB = 4093, 1536, 151936
KERNEL_NAMES = ("fwd", "dz", "mm_acc")
_LAUNCHES = {}  # a worker's distinct launches by dtype


def record_launches(dtype_name):
    """-> [(kernel index, autotuner, {argument: value})]: every launch of one forward and backward on
    meta tensors, made by the GPU path (a GPU's chunk sizes) into the real kernels, which record them."""
    import kernels

    autotuners = kernels._build_kernels()
    launches = []

    class Recorder:
        def __init__(self, index):
            self.index = index

        def __getitem__(self, grid):
            names = autotuners[self.index].fn.arg_names
            return lambda *args, **kwargs: launches.append(
                (self.index, autotuners[self.index], dict(zip(names, args)) | kwargs))

    saved = kernels._kernels
    kernels._kernels = lambda: tuple(Recorder(index) for index in range(3))
    try:
        dtype = getattr(torch, dtype_name)
        hidden = torch.empty(TOKENS, HIDDEN, dtype=dtype, device="meta", requires_grad=True)
        weight = torch.empty(VOCAB, HIDDEN, dtype=dtype, device="meta", requires_grad=True)
        labels = torch.empty(TOKENS, dtype=torch.long, device="meta")
        logprob, entropy = kernels.fused_logprob_entropy(hidden, weight, labels, 0.6, impl="triton",
                                                         chunk_elems=kernels.DZ_ELEMS_CUDA)
        torch.autograd.grad((logprob + entropy).sum(), (hidden, weight))
    finally:
        kernels._kernels = saved
    return launches


def compile_args(autotuner, arguments, config, capability):
    """-> (ASTSource, options) of one launch in one configuration, made by the binder a launch runs
    (an argument the kernel does not take, or one missing, raises here)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = autotuner.fn
    backend = make_backend(GPUTarget("cuda", capability, 32))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound, specialization, options = binder(**arguments, **config.all_kwargs())
    options, signature, constexprs, attrs = jit._pack_args(backend, options, bound, specialization, options)
    return ASTSource(jit, signature, constexprs, attrs), options


def distinct_launches(dtype_name):
    """-> the launches that compile to different programs (the same signature, constexprs and alignment
    attributes compile once), in order; kept for the worker's next task."""
    if dtype_name not in _LAUNCHES:
        distinct = {}
        for index, autotuner, arguments in record_launches(dtype_name):
            source, _ = compile_args(autotuner, arguments, autotuner.configs[0], 90)
            key = (index, repr(source.signature), repr(source.constants), repr(source.attrs))
            distinct.setdefault(key, (index, autotuner, arguments))
        _LAUNCHES[dtype_name] = list(distinct.values())
    return _LAUNCHES[dtype_name]


def launch_name(index, arguments):
    return KERNEL_NAMES[index] + (" a^T" if arguments.get("A_COLS") else "")  # mm_acc(dz^T, h): dW


def tile_name(config):
    blocks = "x".join(str(value) for value in config.kwargs.values())
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


def plan(dtype_name):
    """-> for each distinct launch: its name, its configurations' names and, per target, the indices of
    those the kernels' prune keeps there (run in a worker)."""
    import kernels

    launches = []
    for index, autotuner, arguments in distinct_launches(dtype_name):
        element_size = next(iter(arguments.values())).element_size()
        kept = {capability: [autotuner.configs.index(config) for config in
                             kernels._fitting(autotuner.configs, element_size, SHARED_LIMIT[capability])]
                for capability in DTYPE_TARGETS[dtype_name]}
        launches.append((launch_name(index, arguments), [tile_name(c) for c in autotuner.configs], kept))
    return launches


def cpu_seconds():
    """CPU time of this process and its finished children (ptxas), whatever else loads the machine."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def cubin_resources(cubin, name):
    """Registers per thread and stack frame (spills) of the cubin, by the cuobjdump shipped with Triton."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        dump = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", file.name],
                              capture_output=True, text=True, check=True).stdout
    fields = dict(field.partition(":")[::2] for field in dump.split(f"Function {name}:", 1)[1].split()[:6])
    return dict(registers=int(fields["REG"]), stack=int(fields["STACK"]))


def compile_one(dtype_name, capability, launch_index, config_index):
    """Compile one (dtype, target, launch, configuration) in this worker -> a row of the report."""
    from triton.backends.compiler import GPUTarget

    index, autotuner, arguments = distinct_launches(dtype_name)[launch_index]
    config = autotuner.configs[config_index]
    row = dict(kernel=launch_name(index, arguments), dtype=dtype_name, sm=capability,
               config=tile_name(config))
    start = cpu_seconds()
    try:
        source, options = compile_args(autotuner, arguments, config, capability)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options.__dict__)
    except Exception as error:  # the compiler's messages are the finding, the innermost last
        messages = []
        while error is not None:
            messages.append(f"{type(error).__name__}: {error}")
            error = error.__cause__
        return row | dict(error="\n".join(messages)[-3000:])
    row |= dict(shared=compiled.metadata.shared, cpu_s=cpu_seconds() - start)
    return row | cubin_resources(compiled.asm["cubin"], compiled.metadata.name)


def compile_everything():
    """-> (a row per compile of every kept (dtype, target, launch, configuration), a row per configuration
    the prune skips, the (dtype, target, launch) left with none), compiled by one worker per core."""
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max(1, workers), mp_context=context) as pool:
        tasks, skipped, empty = [], [], []
        for dtype_name, launches in zip(DTYPE_TARGETS, pool.map(plan, DTYPE_TARGETS)):
            for launch_index, (kernel, configs, kept) in enumerate(launches):
                for capability, indices in kept.items():
                    tasks += [(dtype_name, capability, launch_index, index) for index in indices]
                    skipped += [dict(kernel=kernel, dtype=dtype_name, sm=capability, config=config)
                                for index, config in enumerate(configs) if index not in indices]
                    empty += [] if indices else [(kernel, dtype_name, capability)]
        return list(pool.map(compile_one, *zip(*tasks))), skipped, empty


def report(rows):
    lines = [f"{'kernel':10} {'dtype':8} {'sm':>3} {'config':18} {'shared KB':>9} {'regs':>4} {'stack':>5} "
             f"{'cpu s':>5}"]
    for row in sorted(rows, key=lambda r: (r["sm"], r["kernel"], r["dtype"], r["config"])):
        head = f"{row['kernel']:10} {row['dtype']:8} {row['sm']:>3} {row['config']:18}"
        if "error" in row:
            lines.append(f"{head} ERROR {row['error'].strip().splitlines()[-1][:120]}")
        elif "shared" not in row:
            lines.append(f"{head} skipped: its operand tiles do not fit (kernels._fitting)")
        else:
            lines.append(f"{head} {row['shared'] / 1024:9.1f} {row['registers']:>4} {row['stack']:>5} "
                         f"{row['cpu_s']:5.1f}")
    return "\n".join(lines)


@pytest.mark.slow
def test_every_kernel_compiles_for_nvidia_targets(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the workers inherit this environment
    start = time.perf_counter()
    rows, skipped, empty = compile_everything()
    cpu = sum(row.get("cpu_s", 0) for row in rows)
    print(f"\n{len(rows)} compiles in {time.perf_counter() - start:.0f} s ({cpu:.0f} CPU s compiling)\n"
          f"{report(rows + skipped)}")
    errors = [row for row in rows if "error" in row]
    assert not errors, "\n\n".join(f"{r['kernel']} {r['dtype']} sm_{r['sm']} {r['config']}:\n{r['error']}"
                                   for r in errors[:2]) + f"\n\n{len(errors)} compiles failed"
    over = [row for row in rows if row["shared"] > SHARED_LIMIT[row["sm"]]]
    assert not over, "shared memory past the limit per block:\n" + "\n".join(
        f"{r['kernel']} {r['dtype']} sm_{r['sm']} {r['config']}: {r['shared']} > {SHARED_LIMIT[r['sm']]}"
        for r in over)
    assert not empty, f"no configuration fits: {empty}"


def test_prune_keeps_the_tiles_that_fit(monkeypatch):
    """Autotune's prune reads the operand dtype from the launch's first argument and the limit from the
    GPU: at an A100's 163 KB, bf16 keeps every matmul tile, fp32 only 128x128x32 over 4 stages."""
    import kernels

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the full lists, as on a GPU
    configs = kernels._mm_configs()
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(shared_memory_per_block_optin=SHARED_LIMIT[80]))
    every = [tile_name(config) for config in configs]
    for dtype, want in ((torch.bfloat16, every), (torch.float32, ["128x128x32 w4 s4"])):
        arguments = dict(a_ptr=torch.empty(1, dtype=dtype), b_ptr=torch.empty(1, dtype=dtype))
        assert [tile_name(c) for c in kernels._prune(configs, arguments, UPCAST=False)] == want
