"""Low-precision parameter storage and compensated updates (docs/methods.md#kahan-update).

* :class:`Storage`, :func:`storage_format`, :func:`resplit` — how a weight is stored (fixed point with
  a kept fractional length, bf16/fp16/fp8, block-scaled, FP32) and its Kahan compensation;
* :class:`KahanSGD` — SGD writing to low-precision storage (``update="kahan" | "nearest" | "stochastic"``);
* :class:`Compensated` — the same write-back around ``SGD``/``Adam``/``AdamW``/``RMSprop``/``Adagrad``;
* ``state_format=`` of both (:mod:`adaprec.optim.state`) — momentum and moments in bf16 or 8 bits;
* :func:`optimizer_memory` — the measured bytes of parameters, compensation, optimizer state and
  gradients.

Example:
    >>> import torch
    >>> from adaprec.optim import KahanSGD, optimizer_memory
    >>> model = torch.nn.Linear(64, 16)
    >>> opt = KahanSGD(model.parameters(), lr=0.1, weight_format="fx8")
    >>> r = optimizer_memory(opt)    # float32 parameters holding fx8 values, an int8 compensation
    >>> r.weight / r.params, round(r.compensation / r.params, 2)     # (+ a 4-byte scale per tensor)
    (4.0, 1.01)
"""

from .compensated import SUPPORTED_INNER, Compensated
from .kahan import KahanSGD
from .memory import MemoryReport, held_tensors, optimizer_memory
from .state import STATE_FORMATS, state_format
from .storage import (
    MASTER_SIGNIFICAND_BITS,
    OVERFLOW_MODES,
    UPDATE_MODES,
    Storage,
    format_name,
    resplit,
    significand_bits,
    storage_format,
)

__all__ = [
    "Storage",
    "storage_format",
    "format_name",
    "significand_bits",
    "resplit",
    "UPDATE_MODES",
    "OVERFLOW_MODES",
    "MASTER_SIGNIFICAND_BITS",
    "KahanSGD",
    "Compensated",
    "SUPPORTED_INNER",
    "STATE_FORMATS",
    "state_format",
    "MemoryReport",
    "optimizer_memory",
    "held_tensors",
]
