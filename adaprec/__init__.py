"""adaprec: adaptive-precision training for PyTorch.

``import adaprec`` loads the core (the controller, formats, decisions, events, policies and the simulated
backend) and nothing optional: the sub-packages for optimizers, tasks, tuning, TensorBoard and plots
(:mod:`adaprec.optim`, :mod:`adaprec.tasks`, :mod:`adaprec.tune`, …) are imported the first time they
are used, as attributes (``adaprec.optim.KahanSGD``) or with ``import adaprec.optim``. So Optuna,
TensorBoard, matplotlib and scikit-learn load only for the features that need them.

Example:
    >>> import adaprec
    >>> "fp32" in adaprec.policies.list_policies()
    True
    >>> adaprec.optim.KahanSGD.__name__        # loaded on first use
    'KahanSGD'
"""

from __future__ import annotations

import importlib
from typing import Any

from . import constraints, policies
from .controller import Controller, HistoryEntry, Report
from .decision import Decision
from .events import Event
from .formats import (
    FP32,
    BlockFormat,
    FixedPoint,
    FloatFormat,
    Format,
    IntFormat,
    Precision,
    parse_format,
    register_format,
)
from .quant.layers import register_layer

__version__ = "0.1.0"

#: Sub-modules imported on first attribute access (``adaprec.<name>``) rather than by ``import adaprec``.
LAZY_SUBMODULES = frozenset({
    "cli", "cost", "guard", "integrations", "observers", "optim", "plots", "prt", "quant", "storage_mode",
    "tasks", "tensorboard", "timemodel", "tune",
})

__all__ = [
    "Controller", "HistoryEntry", "Report", "Decision", "Event", "Precision", "IntFormat",
    "FixedPoint", "FloatFormat", "BlockFormat", "FP32", "Format", "parse_format", "register_format",
    "policies", "constraints", "register_layer", "__version__",
]


def __getattr__(name: str) -> Any:
    # PEP 562: only called for names not found the normal way, i.e. sub-modules not imported yet.
    if name in LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'adaprec' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | LAZY_SUBMODULES)
