"""Device discipline, checked on a CPU: inside `project_tensors_on_meta()`, a tensor factory (torch.tensor,
zeros, ones, full, arange, rand*, ...) called from the project's own code without `device=` makes its tensor
on the meta device, as if the default device were a GPU that the data never reached. Where such a tensor
meets the model's tensors, goes into a collective or is read on the host, the run fails at that line, the
way it would fail on CUDA. torch's own internals (AdamW's step counters, ...) are left alone.

    python tests/device_guard.py grpo.py ARGS...     # run a script's main() under the guard (torchrun too)
"""
from __future__ import annotations

import os
import sys

import torch
from torch.overrides import TorchFunctionMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORE = {os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith(".py")}  # the top-level modules
FACTORIES = {torch.tensor, torch.as_tensor, torch.scalar_tensor, torch.zeros, torch.ones, torch.full,
             torch.empty, torch.arange, torch.linspace, torch.eye, torch.rand, torch.randn, torch.randint,
             torch.randperm}


class project_tensors_on_meta(TorchFunctionMode):
    def __init__(self, files=CORE):
        super().__init__()
        self.files = set(files)
        self.caught = []  # (file:line, factory) of every tensor made without a device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            caller = sys._getframe(1)
            if caller.f_code.co_filename in self.files:
                self.caught.append((f"{os.path.basename(caller.f_code.co_filename)}:{caller.f_lineno}",
                                    func.__name__))
                kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


def main():
    script, argv = sys.argv[1], sys.argv[2:]
    sys.path.insert(0, ROOT)
    import importlib
    mod = importlib.import_module(os.path.splitext(os.path.basename(script))[0])
    guard = project_tensors_on_meta()
    try:
        with guard:
            mod.main(argv)
    finally:
        for where, name in dict.fromkeys(guard.caught):
            print(f"[device-guard] {where}: torch.{name}(...) without a device", file=sys.stderr, flush=True)
    import fsdp
    fsdp.finish(0)


if __name__ == "__main__":
    main()
