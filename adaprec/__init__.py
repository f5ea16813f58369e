"""adaprec: adaptive-precision training for PyTorch.

Example:
    >>> import adaprec
    >>> "fp32" in adaprec.policies.list_policies()
    True
"""

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

__all__ = [
    "Controller", "HistoryEntry", "Report", "Decision", "Event", "Precision", "IntFormat",
    "FixedPoint", "FloatFormat", "BlockFormat", "FP32", "Format", "parse_format", "register_format",
    "policies", "constraints", "register_layer", "__version__",
]
