"""Shared fixtures. Keep this file small: fixtures that only one test file needs live in that file."""

from __future__ import annotations

import pytest
import torch
from torch import nn

# The test models are tiny: one intra-op thread is as fast, and it avoids OpenMP threads spinning
# against each other (and against other jobs) on small shared CI machines, which made steps 20x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same global RNG state (stochastic rounding draws from it)."""
    torch.manual_seed(0)


@pytest.fixture
def tiny_cnn() -> nn.Module:
    """Conv -> ReLU -> Linear on 1x8x8 inputs, 3 classes: the smallest model with both layer kinds."""
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory: pytest.TempPathFactory):
    """The results of the two-process scenarios (tests/_distributed.py), all run in one start of the
    workers: ``two_ranks("test_fsdp:scenario")`` -> ``[rank 0's result, rank 1's result]``."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from _distributed import SCENARIOS, WORLD, results, run_scenarios, spawn

    out = tmp_path_factory.mktemp("two_ranks")
    spawn(run_scenarios, (str(out), SCENARIOS), WORLD)
    return lambda name: results(out, name)
