"""Modelled training time on real accelerators, from the cost meter's MACs and the precision history.

MuPPET reports a *modelled* speedup on an NVIDIA Turing GPU; this module gives the same kind of figure
for any run, on a T4 (Turing) and an H100, using vendor peak dense throughputs
(docs/methods.md#modelled-training-time).

The model, and its assumptions (read them before quoting a number):

1. **Only the quantized layers' matrix products are timed**, the ones that ran: per layer and step up to
   three products of ``M`` multiply-accumulates each (forward ``W x A``, error ``E x W``, weight
   gradient ``E x A``), each ``2 M`` operations, with the MACs and operand widths the
   :class:`~adaprec.cost.CostMeter` counted per product kind (an operand a layer leaves FP32 is timed
   as FP32; docs/methods.md#bitops). Everything else (element-wise
   ops, normalisation, the optimizer, quantize/dequantize, data loading, memory traffic) is either
   ignored or, with ``other_fraction = f``, taken as a fixed share ``f`` of the FP32 step time that
   precision does not change (Amdahl).
2. **Every product runs at peak** on the fastest hardware input type that holds *both* operands
   exactly, no faster: fp32 -> FP32 CUDA cores (TF32 would round, so it is used only for formats it
   holds exactly); bf16 -> BF16; fp16 -> FP16; fp8 -> FP8 (on a T4, which has no FP8, it runs as FP16);
   integer / fixed point with ``b`` bits -> INT4 if ``b <= 4`` (T4 only), INT8 if ``b <= 8``, FP16/TF32
   if ``b <= 12`` (fixed point, signed; 11 for unsigned integer grids — an 11-bit significand holds such
   integers exactly), and otherwise INT8 in ``ceil(b/8)`` slices per operand (``ceil(b_a/8) *
   ceil(b_b/8)`` INT8 passes, e.g. 16 x 16 bits = 4 passes). The per-tensor power-of-two scale of
   dynamic fixed point and the zero point of integer grids cost nothing.
3. One training step's time is the sum over layers and products (no overlap between layers, no
   launch overheads); a run's time is the sum over its steps at the precisions actually in force
   (changes are folded in at every ``PRECISION_CHANGED``, so per-step schedules are exact too).

Absolute seconds are therefore lower bounds for the quantized products; the *speedup vs FP32* is the
figure to read. It is the same kind of model the MuPPET paper's 1.84x (Turing) rests on, whose exact
per-level mapping is not published; results can differ from theirs for that reason.

Example:
    >>> from adaprec.formats import Precision
    >>> round(relative_speed(Precision.fixed_point(8), "t4"), 2)   # INT8 130 TOPS vs FP32 8.1 TFLOP/s
    16.05
    >>> round(relative_speed(Precision.fixed_point(16), "t4"), 2)  # 4 INT8 passes
    4.01
    >>> round(relative_speed(Precision.uniform("bf16"), "h100"), 2)
    14.76
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .cost import KINDS, OPERANDS
from .events import Event
from .formats import FP32, Format, Precision
from .observers.base import Observer

if TYPE_CHECKING:  # pragma: no cover
    from .controller import Controller

__all__ = ["Hardware", "HARDWARE", "product_rate", "step_seconds_per_mac", "kind_seconds_per_mac",
           "relative_speed", "TrainingTimeModel", "attach_time_model"]


@dataclass(frozen=True)
class Hardware:
    """An accelerator's peak dense throughput per input type, in operations per second (2 per MAC).

    Example:
        >>> HARDWARE["t4"].peak["int8"]
        130000000000000.0
    """

    name: str
    peak: dict[str, float]

    def __post_init__(self) -> None:
        if "fp32" not in self.peak:
            raise ValueError(f"Hardware {self.name!r}: the peak table needs an 'fp32' entry (the fallback)")
        bad = sorted(set(self.peak) - set(_TYPES))
        if bad:
            raise ValueError(f"Hardware {self.name!r}: unknown input types {bad}; known: {list(_TYPES)}")
        for k, v in self.peak.items():
            if not (isinstance(v, int | float) and v > 0 and math.isfinite(v)):
                raise ValueError(f"Hardware {self.name!r}: peak[{k!r}] must be a positive number, got {v!r}")


_TYPES = ("fp32", "tf32", "fp16", "bf16", "fp8", "int8", "int4")

#: docs/methods.md#modelled-training-time (vendor peak dense figures).
HARDWARE: dict[str, Hardware] = {
    "t4": Hardware("NVIDIA T4 (Turing)", {"fp32": 8.1e12, "fp16": 65e12, "int8": 130e12, "int4": 260e12}),
    "h100": Hardware("NVIDIA H100 SXM", {"fp32": 67e12, "tf32": 495e12, "fp16": 989e12, "bf16": 989e12,
                                         "fp8": 1979e12, "int8": 1979e12}),
}


def _hardware(hw: str | Hardware) -> Hardware:
    if isinstance(hw, Hardware):
        return hw
    if isinstance(hw, str) and hw.lower() in HARDWARE:
        return HARDWARE[hw.lower()]
    raise ValueError(f"unknown hardware {hw!r}; known: {sorted(HARDWARE)} (or pass a Hardware object)")


def product_rate(a: Format, b: Format, hardware: str | Hardware) -> tuple[float, str]:
    """Operations per second of one product with operand formats ``a`` and ``b``, and the type used.

    Example:
        >>> from adaprec.formats import FixedPoint, FP32
        >>> product_rate(FixedPoint(8), FixedPoint(16), "t4")
        (65000000000000.0, 'int8')
        >>> product_rate(FixedPoint(8), FP32(), "h100")
        (67000000000000.0, 'fp32')
    """
    hw = _hardware(hardware)
    ta, tb = a.exact_in(), b.exact_in()  # each format knows the hardware types that hold it
    best = (0.0, "fp32")
    for t in ta.keys() & tb.keys():
        if t in hw.peak:
            rate = hw.peak[t] / (ta[t] * tb[t])
            if rate > best[0]:
                best = (rate, t)
    return best


def step_seconds_per_mac(p: Precision, hardware: str | Hardware) -> float:
    """Seconds one MAC of the forward product costs, summed over the step's three products."""
    w, a, g = p.weight, p.activation, p.gradient
    return sum(2.0 / product_rate(x, y, hardware)[0] for x, y in ((w, a), (g, w), (g, a)))


def kind_seconds_per_mac(p: Precision, hardware: str | Hardware) -> list[float]:
    """Seconds per MAC of each product kind (:data:`adaprec.cost.KINDS`) at precision ``p``; an operand
    the layer leaves unquantized is FP32."""
    fp32 = FP32()
    out = []
    for product, lq, rq in KINDS:
        left, right = OPERANDS[product]
        a = getattr(p, left) if lq else fp32
        b = getattr(p, right) if rq else fp32
        out.append(2.0 / product_rate(a, b, hardware)[0])
    return out


def relative_speed(p: Precision, hardware: str | Hardware) -> float:
    """How many times faster a layer's training products run at ``p`` than at FP32 (model above)."""
    return step_seconds_per_mac(Precision.fp32(), hardware) / step_seconds_per_mac(p, hardware)


class TrainingTimeModel(Observer):
    """Accumulates the modelled time of a run's quantized products on each hardware; adds
    ``modelled_speedup_vs_fp32``, ``modelled_seconds`` and ``modelled_seconds_fp32`` to ``ctl.report()``.

    MACs counted before :meth:`attach` are charged at the precision in force when it attaches. State
    (time so far, the MACs already charged, the current rates) is saved with ``ctl.state_dict()``.
    Only tensor operations at precision changes; nothing per step.

    Args:
        hardware: names in :data:`HARDWARE` or :class:`Hardware` objects.
        other_fraction: share of the FP32 step time outside the quantized products, in [0, 1).

    Example:
        >>> import torch, adaprec
        >>> model = torch.nn.Linear(16, 16)
        >>> with adaprec.Controller(model, policy=adaprec.policies.Fixed(bits="fx8")) as ctl:
        ...     tm = TrainingTimeModel().attach(ctl)
        ...     model(torch.randn(4, 16)).sum().backward(); ctl.step()
        >>> round(ctl.report()["modelled_speedup_vs_fp32"]["t4"], 2)
        16.05
    """

    name = "time_model"

    def __init__(self, hardware: Iterable[str | Hardware] = ("t4", "h100"), *,
                 other_fraction: float = 0.0) -> None:
        super().__init__()
        self.hardware = [_hardware(h) for h in hardware]
        if not self.hardware:
            raise ValueError("hardware must name at least one accelerator")
        keys = [self._key(h) for h in self.hardware]
        if len(set(keys)) != len(keys):
            raise ValueError(f"hardware names must be distinct, got {keys}")
        if isinstance(other_fraction, bool) or not isinstance(other_fraction, int | float) \
                or not 0.0 <= other_fraction < 1.0:
            raise ValueError(f"other_fraction must be a number in [0, 1), got {other_fraction!r}")
        self.other_fraction = float(other_fraction)
        self.keys = keys
        # seconds per MAC of one FP32 product
        self._fp32 = torch.tensor([2.0 / product_rate(FP32(), FP32(), h)[0] for h in self.hardware],
                                  dtype=torch.float64)
        self._factors: Tensor | None = None   # (hardware, layers, kinds) seconds per MAC now in force
        self._base: Tensor | None = None      # (layers, kinds) MACs already charged
        self._acc: Tensor | None = None       # (hardware,) seconds so far
        self._pending: dict[str, Any] | None = None

    @staticmethod
    def _key(h: Hardware) -> str:
        for k, v in HARDWARE.items():
            if v == h:
                return k
        return h.name

    def _subscribe(self, ctl: Controller) -> None:
        if ctl.cost is None:
            raise RuntimeError("TrainingTimeModel needs an entered Controller (it reads ctl.cost)")
        macs = ctl.cost.product_macs
        self._fp32 = self._fp32.to(macs.device)
        self._base = macs.clone()
        self._acc = torch.zeros(len(self.hardware), dtype=torch.float64, device=macs.device)
        self._factors = self._rates(ctl, ctl.current)
        self._on(ctl, Event.PRECISION_CHANGED, self._changed)
        ctl.add_report_section(self.name, self.report)
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.load_state_dict(state)

    def _rates(self, ctl: Controller, layers: dict[str, Precision] | None) -> Tensor:
        layers = layers or {}
        names = ctl.cost.names
        rows = [[kind_seconds_per_mac(layers.get(n, Precision.fp32()), h) for n in names]
                for h in self.hardware]
        return torch.tensor(rows, dtype=torch.float64, device=ctl.cost.product_macs.device).reshape(
            len(self.hardware), len(names), len(KINDS))

    def _fold(self, macs: Tensor) -> None:
        self._acc.add_((self._factors * (macs - self._base)).sum(dim=(1, 2)))
        self._base.copy_(macs)

    def _changed(self, ctl: Controller, new: dict[str, Precision], **_: Any) -> None:
        # MACs since the last change ran at the old precisions; charge them, then switch rates.
        self._fold(ctl.cost.product_macs)
        self._factors = self._rates(ctl, new)

    def seconds(self) -> dict[str, float]:
        """Modelled seconds of the run so far on each hardware (``other_fraction`` included)."""
        if self._acc is None:
            raise RuntimeError("TrainingTimeModel is not attached to a controller")
        macs = self.ctl.cost.product_macs if self.ctl is not None else self._base
        now = self._acc + (self._factors * (macs - self._base)).sum(dim=(1, 2))
        other = self._fp32_seconds(macs) * self.other_fraction
        return dict(zip(self.keys, (now + other).tolist()))

    def _fp32_seconds(self, macs: Tensor) -> Tensor:
        """FP32 time of the whole step (products and the rest) for the MACs counted so far."""
        return macs.sum() * self._fp32 / (1.0 - self.other_fraction)

    def fp32_seconds(self) -> dict[str, float]:
        macs = self.ctl.cost.product_macs if self.ctl is not None else self._base
        return dict(zip(self.keys, self._fp32_seconds(macs).tolist()))

    def report(self) -> dict[str, Any]:
        t, t0 = self.seconds(), self.fp32_seconds()
        return {
            "modelled_speedup_vs_fp32": {k: (t0[k] / t[k] if t[k] > 0 else math.nan) for k in self.keys},
            "modelled_seconds": t,
            "modelled_seconds_fp32": t0,
        }

    def detach(self) -> None:
        # Keep reading the final MAC counts after the controller is left (report() stays valid).
        if self.ctl is not None and self._base is not None:
            self._fold(self.ctl.cost.product_macs)
        super().detach()

    def state_dict(self) -> dict[str, Any]:
        if self._acc is None:
            return {}
        return {"hardware": list(self.keys), "acc": self._acc.clone(), "base": self._base.clone(),
                "factors": self._factors.clone()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if not d:
            return
        if self._acc is None:
            self._pending = d
            return
        if list(d["hardware"]) != self.keys:
            raise ValueError(f"time-model state is for hardware {d['hardware']}, this one models {self.keys}")
        base, factors = d["base"], d["factors"]
        if base.shape[0] != self._base.shape[0]:
            raise ValueError("time-model state is for a different number of layers")
        self._acc.copy_(d["acc"])
        if base.dim() == 1:  # saved before products were counted: three equal products per forward MAC
            self._base.zero_()
            for i in (0, 4, 8):
                self._base[:, i] = base
            return  # the rates in force are recomputed from the controller's current precisions
        self._base.copy_(base)
        self._factors = factors.to(self._base.device).clone()


def attach_time_model(ctl: Controller, **kwargs: Any) -> TrainingTimeModel:
    """The controller's :class:`TrainingTimeModel`, attaching one if there is none yet.

    Example:
        >>> import torch, adaprec
        >>> with adaprec.Controller(torch.nn.Linear(2, 2)) as ctl:
        ...     attach_time_model(ctl) is attach_time_model(ctl)
        True
    """
    tm = ctl.components.get(TrainingTimeModel.name)
    if isinstance(tm, TrainingTimeModel):
        return tm
    return TrainingTimeModel(**kwargs).attach(ctl)
