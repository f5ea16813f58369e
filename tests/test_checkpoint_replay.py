"""Activation checkpointing with stochastic *forward* rounding (MuPPET's fixed point): the recompute
draws the same noise as the forward it repeats, so training is bitwise the same with and without
checkpointing (torch.utils.checkpoint restores torch's own generators; adaprec's rounding generator is
replayed by the layer hooks)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import adaprec
from adaprec.policies import Fixed


def _train(mode: str | None) -> list[torch.Tensor]:
    torch.manual_seed(0)
    body = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32))
    head = torch.nn.Linear(32, 4)
    model = torch.nn.Sequential(body, head)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with adaprec.Controller(model, policy=Fixed(bits="fx6"), classifier_floor=False, optimizer=opt):
        for _ in range(3):
            x = torch.randn(8, 16, requires_grad=True)  # reentrant checkpoints need an input with grad
            h = body(x) if mode is None else checkpoint(body, x, use_reentrant=mode == "reentrant")
            opt.zero_grad()
            head(h).square().mean().backward()
            opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_checkpointed_training_with_stochastic_forward_rounding_is_bitwise_the_same(mode):
    plain = _train(None)
    assert all(torch.equal(a, b) for a, b in zip(plain, _train(mode)))


def test_recurrent_layers_replay_too():
    def run(ck: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        lstm = torch.nn.LSTM(8, 16, batch_first=True)
        head = torch.nn.Linear(16, 4)
        model = torch.nn.ModuleDict({"lstm": lstm, "head": head})
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with adaprec.Controller(model, policy=Fixed(bits="fx6"), classifier_floor=False, optimizer=opt):
            for _ in range(2):
                x = torch.randn(4, 5, 8, requires_grad=True)
                out = checkpoint(lambda t: lstm(t)[0], x, use_reentrant=False) if ck else lstm(x)[0]
                opt.zero_grad()
                head(out).square().mean().backward()
                opt.step()
        return [p.detach().clone() for p in model.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True)))
