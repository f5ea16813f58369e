"""Number formats and the per-layer :class:`Precision`.

Every format *kind* lives in one module and owns all its rules — naming and parsing, its quantize kernel,
its ladder, cost bits, storage and hardware dtype (the protocol is documented in
:mod:`adaprec.formats.base`). The rest of adaprec asks the format; nothing outside this package checks a
format's kind. Kinds:

* :class:`IntFormat` — CPT/SBM's min-max integer grid (:mod:`.integer`);
* :class:`FixedPoint` — MuPPET's dynamic fixed point (:mod:`.fixed`);
* :class:`FloatFormat` — BF16, FP16, per-tensor scaled FP8 and raw FP8 (:mod:`.floating`);
* :class:`BlockFormat` — MXFP8/6/4, MXINT8 and NVFP4 (:mod:`.block`);
* :class:`FP32` — full precision (:mod:`.full`).

A format of your own is a :class:`Format` subclass registered with :func:`register_format`.

Example:
    >>> import torch
    >>> from adaprec.formats import IntFormat, FloatFormat, Precision, parse_format
    >>> IntFormat(4).quantize(torch.linspace(0, 1, 100)).unique().numel()
    16
    >>> parse_format("fp8_e4m3")
    FloatFormat(name='fp8_e4m3', rounding='nearest', scaled=True)
    >>> Precision.cpt(4, 8).weight
    IntFormat(bits=4, per_channel=True, rounding='nearest')
"""

from .base import Format, parse_format, register_format, registered_formats, run_kernel
from .block import BLOCK_FORMATS, BlockFormat  # noqa: I001 - after floating, whose grids it uses
from .fixed import FixedPoint
from .floating import ELEMENT_FORMATS, FLOAT_FORMATS, FloatFormat
from .full import FP32
from .integer import IntFormat
from .precision import Precision, ceil_log2
from .rounding import RoundingRNG

__all__ = [
    "Format", "IntFormat", "FixedPoint", "FloatFormat", "BlockFormat", "FP32", "Precision", "parse_format",
    "register_format", "registered_formats", "run_kernel", "FLOAT_FORMATS", "ELEMENT_FORMATS",
    "BLOCK_FORMATS", "RoundingRNG", "ceil_log2",
]
