"""Issue 14 item 6: the controller over an FSDP2 model (``torch.distributed.fsdp.fully_shard``), 2 processes,
gloo, loopback; checkpoints through ``torch.distributed.checkpoint`` (DCP).

Under FSDP2 the parameters are DTensor shards, gathered around each sharded module's forward. Checked:

* the layers quantize the *whole* weight (gathered), not a shard: a quantized forward equals the same
  controller's on a plain copy of the model in one process;
* every rank takes the same decisions, with a policy that reads the rank-local loss (averaged by
  ``ctl.observe``);
* the cost meter counts the global batch: the MACs are those of both ranks' batches, and the GBitOPs
  those MACs at the decided precisions;
* leaving the block restores the FSDP model exactly (its classes, hooks, state_dict keys, outputs);
* a DCP checkpoint with the sharded model, optimizer and ``ControllerState`` resumes bit for bit: the
  run continued from it ends with the same weights, decisions and cost as the run that never stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import adaprec
from adaprec.policies import Fixed

from _distributed import WORLD
from _policies import LossBits

EPOCHS, SAVE_AT, BATCHES, LOCAL_BATCH = 4, 2, 2, 8
DIMS = ((10, 16), (16, 16), (16, 3))  # the three Linear layers (in, out)

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _plain(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(*DIMS[0]), nn.ReLU(), nn.Linear(*DIMS[1]), nn.ReLU(), nn.Linear(*DIMS[2]))


def _sharded(seed: int = 0) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = _plain(seed)
    fully_shard(model[0])  # per layer, as for transformer blocks; the rest with the root
    fully_shard(model[2])
    fully_shard(model)
    return model


def _shard(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)  # every rank has its own data
    return [(torch.randn(LOCAL_BATCH, 10, generator=g), torch.randint(0, 3, (LOCAL_BATCH,), generator=g))
            for _ in range(BATCHES)]


def _train(model: nn.Module, opt: torch.optim.Optimizer, ctl: Any, data: list, epochs: range) -> None:
    for _ in epochs:
        for x, y in ctl.epoch(data):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ctl.observe(loss=loss.detach())


def _full(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.detach().clone() for k, v in sd.items()}


def _fingerprint(model: nn.Module) -> list[tuple[str, str, tuple, tuple]]:
    """Each module's class, hooks and own attributes: what leaving the block must give back."""
    return [(n, type(m).__qualname__, tuple(m._forward_pre_hooks), tuple(m._forward_hooks),
             tuple(sorted(vars(m)))) for n, m in model.named_modules()]


def _quantizes_the_gathered_weights(rank: int) -> bool:
    model, x = _sharded(), torch.randn(4, 10)
    plain = _plain()
    policy = Fixed(bits=4, grad_bits=8)  # per-channel weights: a shard would give other channels' scales
    with adaprec.Controller(model, policy=policy, classifier_floor=False):
        model.eval()
        got = model(x)
    with adaprec.Controller(plain, policy=policy, classifier_floor=False):
        plain.eval()
        want = plain(x)
    return torch.equal(got, want) and not torch.equal(got, plain(x))


def scenario(rank: int, out: str) -> dict[str, Any]:
    """On each rank, in the shared two-process group (tests/_distributed.py)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from adaprec.integrations.dcp import ControllerState

    result: dict[str, Any] = {"gathered": _quantizes_the_gathered_weights(rank)}
    data = _shard(rank)
    ckpt = str(Path(out) / "dcp")

    # The run that never stops; a DCP checkpoint after SAVE_AT epochs.
    model = _sharded()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before, keys, x = _fingerprint(model), list(model.state_dict()), torch.randn(5, 10)
    with adaprec.Controller(model, policy=LossBits(), optimizer=opt) as ctl:
        _train(model, opt, ctl, data, range(SAVE_AT))
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd, "adaprec": ControllerState(ctl)}, checkpoint_id=ckpt)
        _train(model, opt, ctl, data, range(SAVE_AT, EPOCHS))
    histories: list[Any] = [None] * WORLD
    dist.all_gather_object(histories, [(h.step, h.layers) for h in ctl.history])
    full = _full(model)
    plain = _plain()
    plain.load_state_dict(full)
    result.update(histories=histories, history=ctl.history, report=dict(ctl.report()), weights=full,
                  restored=(_fingerprint(model) == before and list(model.state_dict()) == keys
                            and torch.equal(model(x), plain(x))))

    # A new run from the checkpoint: other initial weights, everything must come from it.
    model2 = _sharded(seed=5)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    ctl2 = adaprec.Controller(model2, policy=LossBits(), optimizer=opt2)
    msd2, osd2 = get_state_dict(model2, opt2)
    state = {"model": msd2, "optim": osd2, "adaprec": ControllerState(ctl2)}
    dcp.load(state, checkpoint_id=ckpt)  # the controller's state is applied when it starts
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    with ctl2:
        _train(model2, opt2, ctl2, data, range(SAVE_AT, EPOCHS))
    result.update(resumed_history=ctl2.history, resumed_report=dict(ctl2.report()),
                  resumed_weights=_full(model2))
    return result


def test_fsdp2_two_processes(two_ranks: Any) -> None:
    ranks = two_ranks("test_fsdp:scenario")

    for r in ranks:
        assert r["gathered"], "a sharded layer did not quantize its whole weight"
        assert r["restored"], "the FSDP model was not restored exactly"
    gathered = ranks[0]["histories"]
    assert gathered[0] == gathered[1], "the ranks took different decisions"
    assert len(gathered[0]) > 3  # the loss-driven policy changed its mind: the check has teeth

    # Cost of the global batch: every step's MACs are both ranks' batches, at the decided precisions.
    steps = EPOCHS * BATCHES
    macs = sum(WORLD * LOCAL_BATCH * i * o for i, o in DIMS)  # one training forward of both batches
    rep = ranks[0]["report"]
    assert rep["steps"] == steps and rep["gmacs"] == pytest.approx(steps * macs / 1e9, rel=1e-12)
    hist = ranks[0]["history"]
    at = [next(h for h in reversed(hist) if h.step <= t) for t in range(steps)]

    def per_mac(name: str, p: Any) -> float:
        # The first layer's input is data (no gradient wanted): its input-gradient product E x W never
        # runs and is not billed.
        return p.bitops_per_mac() - (p.gradient.cost_bits * p.weight.cost_bits if name == "0" else 0.0)

    bitops = sum(sum(WORLD * LOCAL_BATCH * i * o * per_mac(name, h.layers[name])
                     for name, (i, o) in zip(("0", "2", "4"), DIMS)) for h in at)
    assert rep["gbitops"] == pytest.approx(bitops / 1e9, rel=1e-12)

    # The checkpoint: the resumed run is the uninterrupted one, bit for bit, on every rank.
    for r in ranks:
        assert r["resumed_history"] == r["history"]
        assert r["resumed_report"] == r["report"]
        assert all(torch.equal(r["resumed_weights"][k], v) for k, v in r["weights"].items())
    assert all(torch.equal(ranks[1]["weights"][k], v) for k, v in ranks[0]["weights"].items())
