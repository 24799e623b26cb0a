"""No redundant gathers: in a training step the root unit (embedding, final norm, head: most of a small
model's parameters at the real vocabulary) is gathered once per update however many micro-batches and passes
use it, a frozen reference's root once in all, blocks once per forward and once per backward; and a unit kept
gathered follows every change of its shard, including one its version counter does not see (fused AdamW)."""
import importlib.util
import os

import pytest
import torch

import fsdp
from settings import Stage
from trainer import Trainer, TrainConfig

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("rl_equiv", f"{HERE}/scripts/rl_equiv.py")
rl_equiv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rl_equiv)


def sharded_model():
    from model import Config, Transformer, init_weights
    return fsdp.shard(init_weights(Transformer(Config(**rl_equiv.CFG)), std=0.1, seed=0))


def count_gathers(monkeypatch) -> dict:
    counts = {}
    real = fsdp.Unit._gather_into

    def counting(unit, buf):
        counts[id(unit)] = counts.get(id(unit), 0) + 1
        real(unit, buf)
    monkeypatch.setattr(fsdp.Unit, "_gather_into", counting)
    return counts


@pytest.mark.parametrize("budget", [40, 400])  # several micro-batches, or one
def test_a_step_gathers_the_root_once_per_update(monkeypatch, budget):
    counts = count_gathers(monkeypatch)
    policy, reference = sharded_model(), sharded_model()
    reference.eval().requires_grad_(False)
    trainer = Trainer(policy, TrainConfig(grad_clip=1e9, token_budget=budget), reference)
    stage = Stage("L2", max_tokens=16, batch=8, n=4, steps=2, lr=1e-3, kl_coef=0.01, temperature=0.8)
    root, blocks = policy._fsdp_units[-1], policy._fsdp_units[:-1]
    for step in range(2):
        comps, adv, _ = rl_equiv.batch(policy, 0.8)  # sampling from the policy: a forward of its own
        counts.clear()
        trainer.step(comps, adv, stage)
        micro = len(trainer._micro(comps, list(range(len(comps)))))
        assert micro > 1 or budget == 400
        for _ in trainer.full_state_dict(compute=True):  # the new weights into the engine's copy
            pass
        # the step's forwards and backwards take the root gathered for the sampling (step 0: by
        # rl_equiv's forward; then by the push after the previous update); the push gathers it anew
        assert counts.get(id(root), 0) == 1, (step, micro)
        assert all(counts[id(b)] == 2 * micro + 1 for b in blocks)  # forward, backward, the push
        assert counts.get(id(reference._fsdp_units[-1]), 0) == (1 if step == 0 else 0)


def test_a_unit_kept_gathered_follows_every_change_of_its_shard():
    model = sharded_model()
    root = model._fsdp_units[-1]
    tokens = torch.tensor([[5, 6, 7, 8]])
    model(tokens)
    n = root.shard.numel()  # one process: the shard is the whole flat vector
    assert root.gathered() and torch.equal(root.full.detach()[:n], root.shard.detach())
    with torch.no_grad():
        root.shard.mul_(0.5)  # a change the version counter sees (a load, a foreach optimizer)
    model(tokens)
    assert torch.equal(root.full.detach()[:n], root.shard.detach())
    root.shard.data.mul_(2.0)  # one it does not see, as fused AdamW's
    fsdp.weights_changed(model)  # what the trainer's optimizer hook calls after every step
    model(tokens)
    assert torch.equal(root.full.detach()[:n], root.shard.detach())
    trainer = Trainer(model, TrainConfig())  # its optimizer is fused: no version bump
    assert trainer.opt.defaults["fused"]
    trainer.opt.param_groups[0]["lr"] = 0.1
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    trainer.opt.step()
    model(tokens)
    assert torch.equal(root.full.detach()[:n], root.shard.detach())
