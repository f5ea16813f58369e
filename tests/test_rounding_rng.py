"""Stochastic rounding draws from the controller's own generator: the user's random stream is untouched
(a DataLoader shuffles the same with and without adaprec), the generator is saved and restored with the
controller, and two controllers do not share a stream."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import adaprec
from adaprec.formats.rounding import RoundingRNG, register_rng, round_, unregister_rng
from adaprec.policies import CPT, Fixed


def _orders(with_controller: bool, policy=None, epochs: int = 3) -> list[list[int]]:
    torch.manual_seed(123)
    data = TensorDataset(torch.randn(40, 8), torch.randint(0, 3, (40,)), torch.arange(40))
    loader = DataLoader(data, batch_size=8, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    orders = []

    def run(loop):
        for _ in range(epochs):
            seen = []
            for x, y, idx in loop(loader):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                seen += idx.tolist()
            orders.append(seen)

    if with_controller:
        with adaprec.Controller(model, policy=policy, optimizer=opt, total_steps=5 * epochs) as ctl:
            run(ctl.epoch)
    else:
        run(iter)
    return orders


def test_dataloader_shuffles_the_same_with_and_without_the_controller():
    plain = _orders(False)
    # Stochastic rounding of every error (and, for fixed point, of weights and activations too).
    assert _orders(True, CPT(bits=(3, 8), grad_bits=8, cycles=3)) == plain
    assert _orders(True, Fixed(bits="fx8")) == plain
    assert plain[0] != plain[1]  # the loader really reshuffles


def test_generator_is_saved_and_restored_with_the_controller():
    model = torch.nn.Linear(8, 8)
    with adaprec.Controller(model, policy=Fixed(bits="fx6")) as ctl:
        state = ctl.state_dict()
        assert "rounding_rng" in state
        x = torch.randn(4, 8)
        a = model(x)
        b = model(x)
        assert not torch.equal(a, b)  # stochastic weights and activations: fresh draws
        ctl.load_state_dict(state)
        assert torch.equal(model(x), a)  # the same draws again after restoring


def test_two_controllers_draw_from_their_own_streams():
    torch.manual_seed(0)
    m1, m2 = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    m2.load_state_dict(m1.state_dict())
    x = torch.randn(4, 8)
    with adaprec.Controller(m1, policy=Fixed(bits="fx6")) as c1:
        alone = m1(x)
        c1.rounding_rng.load_state_dict(RoundingRNG(c1.rounding_rng.seed).state_dict())
        with adaprec.Controller(m2, policy=Fixed(bits="fx6")) as c2:
            c2.rounding_rng.load_state_dict(RoundingRNG(c1.rounding_rng.seed + 1).state_dict())
            _ = m2(x)  # draws from c2's generator only
            again = m1(x)
    assert torch.equal(alone, again)


def test_round_with_a_registered_generator_is_reproducible():
    rng = RoundingRNG(5)
    key = register_rng(rng)
    try:
        start = rng.state_dict()
        v = torch.full((1000,), 0.25)
        a = round_(v.clone(), True, key)
        rng.load_state_dict(start)
        assert torch.equal(round_(v.clone(), True, key), a)
        assert 150 < int(a.sum()) < 350  # P(1) = 0.25
    finally:
        unregister_rng(key)
