"""Low-precision parameter storage and compensated updates (docs/methods.md#kahan-update).

* :class:`Storage`, :func:`storage_format`, :func:`resplit` — how a weight is stored (fixed point with
  a kept fractional length, bf16/fp16/fp8, FP32) and its Kahan compensation;
* :class:`KahanSGD` — SGD writing to low-precision storage (``update="kahan" | "nearest" | "stochastic"``);
* :class:`Compensated` — the same write-back around ``SGD``/``Adam``/``AdamW``/``RMSprop``/``Adagrad``;
* :func:`bytes_per_param`, :func:`optimizer_memory` — the modelled memory of weights, compensation and
  optimizer state (simulation keeps float32 tensors; the formats say what storage would cost).

Example:
    >>> import torch
    >>> from adaprec.optim import KahanSGD, optimizer_memory
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = KahanSGD(model.parameters(), lr=0.1, weight_format="fx8")
    >>> optimizer_memory(opt).per_param
    2.0
"""

from .compensated import SUPPORTED_INNER, Compensated
from .kahan import KahanSGD
from .memory import MemoryCost, MemoryReport, bytes_per_param, optimizer_memory, state_buffers
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
    "MemoryCost",
    "MemoryReport",
    "bytes_per_param",
    "optimizer_memory",
    "state_buffers",
]
