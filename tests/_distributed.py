"""The two-process tests over ``torch.distributed`` (gloo, loopback) share one start of the workers.

Starting processes that import torch costs several seconds each on a small machine, so the test
modules do not spawn their own: each defines a *scenario*, ``fn(rank, out) -> result`` (a module-level
function, run on every rank inside one process group), listed in :data:`SCENARIOS`. The session fixture
``two_ranks`` (``tests/conftest.py``) runs them all once and gives each test the results of every rank:
``two_ranks("test_fsdp:scenario")`` is ``[result of rank 0, result of rank 1]``. A scenario that raises
fails only the tests that ask for it, with its traceback.

Nothing can hang CI: the process group has a 60 s timeout and :func:`spawn` kills the workers after its
deadline.
"""

from __future__ import annotations

import datetime
import importlib
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
#: Every two-process scenario of the suite, as "module:function".
SCENARIOS = ("test_distributed:scenario", "test_fsdp:scenario")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int, port: int, world: int) -> None:
    """In a worker: one intra-op thread (tiny models, a shared machine) and a gloo group on loopback."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def spawn(worker: Callable[..., Any], args: tuple, nprocs: int, deadline_s: float = 240) -> None:
    """Run ``worker(rank, port, *args)`` on ``nprocs`` processes (spawn); fail the test if one raises or
    they do not finish within ``deadline_s``."""
    ctx = mp.start_processes(worker, args=(free_port(), *args), nprocs=nprocs, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=5):  # raises ProcessRaisedException if a rank failed
            if time.monotonic() > deadline:
                pytest.fail(f"the workers did not finish within {deadline_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)


class Failed(str):
    """A scenario's traceback, in place of its result."""


def run_scenarios(rank: int, port: int, out: str, names: tuple[str, ...]) -> None:
    """The worker: every scenario in turn on this rank, each one's result (or traceback) saved."""
    init(rank, port, WORLD)
    results: dict[str, Any] = {}
    try:
        for name in names:
            module, fn = name.split(":")
            sub = Path(out) / name.replace(":", "-")
            sub.mkdir(exist_ok=True)
            try:
                results[name] = getattr(importlib.import_module(module), fn)(rank, str(sub))
            except Exception:
                results[name] = Failed(traceback.format_exc())
                break  # the other rank may wait in a collective of this scenario: stop here
            dist.barrier()
    finally:
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.destroy_process_group()


def results(out: Path, name: str) -> list[Any]:
    """The results of scenario ``name`` on every rank; fails the calling test if one raised."""
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    got = [r.get(name, Failed(f"{name} did not run (an earlier scenario failed)")) for r in ranks]
    for r, res in enumerate(got):
        if isinstance(res, Failed):
            pytest.fail(f"scenario {name} failed on rank {r}:\n{res}")
    return got
