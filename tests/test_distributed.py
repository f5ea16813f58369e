"""DESIGN.md contract 6 under real ``torch.distributed``: DDP over gloo, two processes on loopback.

Two processes (``torch.multiprocessing``, spawn; started once for every two-process test, see
``tests/_distributed.py``) train the same small model on different data shards. Each rank returns
what it saw; rank 0 also gathers every rank's decision history
with ``all_gather_object``. Checked:

* every rank takes the same decisions at every step — MuPPET (driven by gradient diversity) and a
  policy that reads the *rank-local* training loss, which only agrees because ``ctl.observe`` averages
  statistics over ranks (with ``sync_stats=False`` the same policy diverges: the check can fail);
* gradient diversity is computed from all ranks: every rank publishes the same value, equal to what a
  single process computes from the gradients of the global batch;
* the cost meter counts the global batch: twice a single process's BitOPs for the same local batch;
* leaving the ``with`` block restores the model and the optimizer exactly on every rank.

Nothing can hang CI: the process group has a 60 s timeout and the parent kills both ranks after 240 s.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import adaprec
from adaprec.observers.diversity import GradientDiversity
from adaprec.policies import MuPPET

from _distributed import WORLD
from _policies import LossBits

EPOCHS, BATCHES, LOCAL_BATCH = 6, 3, 8

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _model() -> nn.Module:
    torch.manual_seed(0)  # same initial weights on every rank (DDP would broadcast rank 0's anyway)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))


def _shard(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)  # every rank has its own data
    return [(torch.randn(LOCAL_BATCH, 10, generator=g), torch.randint(0, 3, (LOCAL_BATCH,), generator=g))
            for _ in range(BATCHES)]


def _train(net: nn.Module, opt: torch.optim.Optimizer, ctl: Any, data: list) -> None:
    for _ in range(EPOCHS):
        for x, y in ctl.epoch(data):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ctl.observe(loss=loss.detach())


def _restored(model: nn.Module, opt: torch.optim.Optimizer, keys: list[str]) -> bool:
    """Contract 1 on this rank: no leftovers, same keys, bitwise the plain architecture's outputs."""
    clean = all("forward" not in vars(m) for m in model.modules()) and "step" not in vars(opt) \
        and not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    plain = _model()
    plain.load_state_dict(model.state_dict())
    x = torch.randn(5, 10)
    return clean and list(model.state_dict()) == keys and torch.equal(model(x), plain(x))


def _run(rank: int, policy: Any, sync_stats: bool = True, observer: bool = False) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model()
    keys = list(model.state_dict())
    net = DDP(model)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    ctl = adaprec.Controller(net, policy=policy, optimizer=opt, sync_stats=sync_stats)
    with ctl:
        obs = GradientDiversity(resolution=2).attach(ctl) if observer else None
        _train(net, opt, ctl, _shard(rank))
    histories: list[Any] = [None] * WORLD
    dist.all_gather_object(histories, [(h.step, h.layers) for h in ctl.history])
    return {
        "histories": histories,
        "diversity": [h.value for h in obs.history] if obs is not None else None,
        "switches": getattr(ctl.policy, "switches", None),
        "gbitops": ctl.report()["gbitops"],
        "restored": _restored(model, opt, keys),
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
    }


def scenario(rank: int, out: str) -> dict[str, Any]:
    """On each rank, in the shared two-process group (tests/_distributed.py)."""
    muppet = MuPPET(levels=(6, 8, 12, "fp32"), resolution=2, patience=1, alpha=1.0, beta=0.0)
    return {
        "muppet": _run(rank, muppet),
        "loss": _run(rank, LossBits()),
        "loss_unsynced": _run(rank, LossBits(), sync_stats=False),
        "fp32": _run(rank, "fp32", observer=True),
    }


def _single_process(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[float], float]:
    """The fp32 run in one process on ``batches``: diversity per window and GBitOPs."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with adaprec.Controller(model, policy="fp32", optimizer=opt) as ctl:
        obs = GradientDiversity(resolution=2).attach(ctl)
        _train(model, opt, ctl, batches)
    return [h.value for h in obs.history], ctl.report()["gbitops"]


def test_ddp_two_processes_agree_and_count_the_global_batch(two_ranks: Any) -> None:
    ranks = two_ranks("test_distributed:scenario")

    for run in ("muppet", "loss", "fp32"):
        gathered = ranks[0][run]["histories"]
        assert gathered == ranks[1][run]["histories"]  # every rank gathered the same lists
        assert gathered[0] == gathered[1], f"{run}: the ranks took different decisions"
        for r in ranks:  # same updates everywhere (DDP) and the model left exactly as it was
            assert r[run]["restored"], f"{run}: the model or optimizer was not restored"
            assert all(torch.equal(v, ranks[0][run]["weights"][k]) for k, v in r[run]["weights"].items())
    # The checks have teeth: the loss policy changes its mind, MuPPET switched, and without averaging
    # the statistics the loss policy's decisions differ between the ranks.
    assert len(ranks[0]["loss"]["histories"][0]) > 3
    switches = [r["muppet"]["switches"] for r in ranks]
    assert len(switches[0]) >= 1 and switches[0] == switches[1]
    unsynced = ranks[0]["loss_unsynced"]["histories"]
    assert unsynced[0] != unsynced[1]

    # Gradient diversity from all ranks: the same on both, and that of the global batch's gradients.
    div = [r["fp32"]["diversity"] for r in ranks]
    assert div[0] == div[1] and len(div[0]) == EPOCHS // 2 and all(math.isfinite(v) for v in div[0])
    shards = [_shard(r) for r in range(WORLD)]
    global_batches = [(torch.cat([s[i][0] for s in shards]), torch.cat([s[i][1] for s in shards]))
                      for i in range(BATCHES)]
    single_div, single_global = _single_process(global_batches)
    assert single_div == pytest.approx(div[0], rel=1e-4)
    local_div = _single_process(shards[0])[0]
    assert local_div != pytest.approx(div[0], rel=1e-2)  # rank 0's own data alone gives another value

    # Cost of the global batch: 2x one process with the same local batch, = one process with 2x the batch.
    _, single_local = _single_process(shards[0])
    for r in ranks:
        assert r["fp32"]["gbitops"] == pytest.approx(WORLD * single_local, rel=1e-12)
        assert r["fp32"]["gbitops"] == pytest.approx(single_global, rel=1e-12)

