"""Running a test's worker function on several processes over ``torch.distributed`` on loopback.

Nothing can hang CI: the workers' process group should have a timeout (``init(rank, port)`` gives one of
60 s) and :func:`spawn` kills every worker after ``deadline_s``.
"""

from __future__ import annotations

import datetime
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(rank: int, port: int, world: int) -> None:
    """In a worker: one intra-op thread (tiny models, a shared machine) and a gloo group on loopback."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def spawn(worker: Callable[..., Any], args: tuple, nprocs: int, deadline_s: float = 150) -> None:
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
