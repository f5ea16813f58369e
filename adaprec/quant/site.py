"""Quantization sites: the state one layer needs to fake its weight, input and output-gradient formats.

A :class:`Quantizer` holds one role's format as tensors (filled in place when the format changes) and
applies it; :class:`LayerSite` groups a layer's three roles for training and for evaluation, and counts
the multiply-accumulates of training forwards for the cost meter. Nothing here is registered on the
model, so ``model.state_dict()`` keeps its keys (DESIGN.md contract 2).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..formats import FP32, Format, Precision
from . import kernels

__all__ = ["Quantizer", "LayerSite", "ste", "quantize_grad"]


_HALF = (torch.float16, torch.bfloat16)


def _in_float32(fn, x: Tensor, *args: object) -> Tensor:
    """``fn(x, ...)`` computed in float32 for half-precision ``x``, cast back and kept finite.

    The kernels' arithmetic (scales, ``v + noise``, frexp) loses the low bits in bf16/fp16: stochastic
    rounding became biased (+0.4 grid steps in bf16) and fp16 scales underflowed to inf/NaN. A value
    a format rounds up past the dtype's largest finite number (bf16's grid on an fp16 tensor) saturates
    to it instead of becoming inf, like the formats themselves saturate.
    """
    if x.dtype not in _HALF:
        return fn(x, *args)
    y = fn(x.float(), *args)
    big = torch.finfo(x.dtype).max
    return y.clamp_(-big, big).to(x.dtype)


def _f32(t: Tensor | None) -> Tensor | None:
    return t if t is None or t.dtype == torch.float32 else t.float()


class _STE(torch.autograd.Function):
    """Quantize in the forward, pass the gradient straight through."""

    @staticmethod
    def forward(ctx, x, kind, p, per_channel, stochastic, lo, hi):  # noqa: D102
        if x.dtype in _HALF:
            return _in_float32(kernels.quantize, x, kind, p, per_channel, stochastic, _f32(lo), _f32(hi))
        return kernels.quantize(x, kind, p, per_channel, stochastic, lo, hi)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        # The identity: differentiable again as it is, so create_graph=True sees a straight-through path.
        return g, None, None, None, None, None, None


class _GradQuant(torch.autograd.Function):
    """Identity in the forward; quantize the incoming gradient (the layer's error) in the backward."""

    @staticmethod
    def forward(ctx, x, kind, p, stochastic):  # noqa: D102
        ctx.kind, ctx.stochastic = kind, stochastic
        # A copy of the 3 numbers: the backward uses the format of the forward it belongs to, even if
        # the controller changes bits in place before ``loss.backward()`` (saving ``p`` itself would
        # make autograd fail with "modified by an inplace operation").
        ctx.save_for_backward(p.clone())
        # A detached alias, not ``view_as``: autograd forbids in-place ops on views returned by a custom
        # Function, and layers are commonly followed by ``ReLU(inplace=True)``. The alias shares the
        # version counter, so in-place use is exactly as safe as on the layer's own output.
        return x.detach()

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        (p,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True (a gradient penalty, higher-order derivatives): the quantized error
            # must itself be differentiable. Rounding has a zero derivative, which would silently zero
            # every second-order term through this layer; the straight-through estimator treats the
            # error quantizer as the identity there, as the forward quantizers are treated.
            return ste(g, ctx.kind, p, False, ctx.stochastic), None, None, None
        return _in_float32(kernels.quantize, g, ctx.kind, p, False, ctx.stochastic), None, None, None


def ste(x: Tensor, kind: str, p: Tensor, per_channel: bool, stochastic: bool,
        lo: Tensor | None = None, hi: Tensor | None = None) -> Tensor:
    """Fake-quantize ``x`` with a straight-through gradient."""
    return _STE.apply(x, kind, p, per_channel, stochastic, lo, hi)


def quantize_grad(x: Tensor, kind: str, p: Tensor, stochastic: bool) -> Tensor:
    """Return ``x`` unchanged; the gradient flowing back through it is quantized."""
    return _GradQuant.apply(x, kind, p, stochastic)


class Quantizer:
    """One role (weight, activation or gradient) of one layer.

    The format's numbers live in the 3-element tensor ``p`` and are overwritten in place; ``kind``,
    ``per_channel`` and ``stochastic`` are Python values (changing them changes the traced program).
    Activation quantizers with ``track_range`` keep an EMA (momentum 0.9) of the batch min/max that
    eval mode uses instead of the batch range (METHODS.md §1.2).

    Example:
        >>> import torch
        >>> from adaprec.formats import IntFormat
        >>> q = Quantizer(torch.device("cpu"))
        >>> q.set(IntFormat(2))
        >>> q(torch.tensor([0.0, 0.1, 0.5, 1.0])).tolist()
        [0.0, 0.0, 0.6666666865348816, 1.0]
    """

    __slots__ = ("fmt", "kind", "per_channel", "stochastic", "p", "range", "seen", "momentum")

    def __init__(self, device: torch.device, track_range: bool = False, momentum: float = 0.9) -> None:
        self.fmt: Format = FP32()
        self.kind = "fp32"
        self.per_channel = False
        self.stochastic = False
        self.p = torch.zeros(3, device=device)
        self.range = torch.zeros(2, device=device) if track_range else None
        self.seen = torch.zeros((), dtype=torch.bool, device=device) if track_range else None
        self.momentum = momentum

    def set(self, fmt: Format) -> None:
        if fmt == self.fmt:
            return
        self.fmt = fmt
        self.kind = fmt.kind
        self.per_channel = fmt.per_channel
        self.stochastic = fmt.stochastic
        self.p.copy_(torch.tensor(fmt.params(), dtype=self.p.dtype))

    @property
    def active(self) -> bool:
        return self.kind != "fp32"

    def __call__(self, x: Tensor, training: bool = True, *, channel_dim: int = 0,
                 update: bool = True) -> Tensor:
        """Fake-quantize ``x`` (STE).

        ``channel_dim``: the output-channel dimension for per-channel formats (the kernels take dim 0);
        ``update=False`` leaves the running activation range alone (an activation-checkpoint recompute).
        """
        if self.range is not None and self.kind == "int" and not self.per_channel:
            lo, hi = self._range(x, training, update)
            return ste(x, self.kind, self.p, False, self.stochastic, lo, hi)
        if channel_dim and self.per_channel and x.dim() > channel_dim:
            y = ste(x.movedim(channel_dim, 0), self.kind, self.p, True, self.stochastic)
            return y.movedim(0, channel_dim)
        return ste(x, self.kind, self.p, self.per_channel, self.stochastic)

    def grad(self, y: Tensor) -> Tensor:
        """Mark ``y`` so that the gradient flowing back into it is quantized."""
        if not y.requires_grad:
            return y
        return quantize_grad(y, self.kind, self.p, self.stochastic)

    @torch.no_grad()
    def _range(self, x: Tensor, training: bool, update: bool = True) -> tuple[Tensor, Tensor]:
        """Batch range in training (also folded into the EMA unless ``update=False``); the EMA in eval,
        once one exists."""
        lo, hi = torch.aminmax(x.detach())
        cur = torch.stack((lo, hi)).to(self.range.dtype)
        if training:
            if not update:
                return lo, hi
            ema = self.range * self.momentum + cur * (1.0 - self.momentum)
            self.range.copy_(torch.where(self.seen, ema, cur))
            self.seen.fill_(True)
            return lo, hi
        r = torch.where(self.seen, self.range, cur)
        return r[0], r[1]

    def state(self) -> dict[str, Tensor]:
        return {} if self.range is None else {"range": self.range.clone(), "seen": self.seen.clone()}

    def to(self, device: torch.device) -> None:
        """Move the format parameters and the running range to ``device`` (they stay float32)."""
        self.p = self.p.to(device)
        if self.range is not None:
            self.range = self.range.to(device)
            self.seen = self.seen.to(device)

    def load_state(self, d: dict[str, Tensor]) -> None:
        if self.range is not None and d:
            self.range.copy_(d["range"])
            self.seen.copy_(d["seen"])


class _Roles:
    __slots__ = ("weight", "activation", "gradient", "precision")

    def __init__(self, device: torch.device, track_range: bool) -> None:
        self.weight = Quantizer(device)
        self.activation = Quantizer(device, track_range=track_range)
        self.gradient = Quantizer(device)
        self.precision = Precision.fp32()

    def set(self, prec: Precision) -> None:
        self.weight.set(prec.weight)
        self.activation.set(prec.activation)
        self.gradient.set(prec.gradient)
        self.precision = prec


class LayerSite:
    """The quantization state of one layer: training and evaluation roles, and a MAC counter.

    ``macs`` (a 0-d float64 tensor, usually a slot of the backend's counter) accumulates the
    multiply-accumulates of the forward products of training forwards until the cost meter reads it.
    ``kind`` is the layer's :class:`~adaprec.quant.layers.LayerKind` (looked up when not given). While
    the layer's forward runs (between the hooks of :mod:`adaprec.quant.attach`), ``w`` holds the
    quantized weights of that call by name; ``native[training]`` is set by a backend whose own forward
    quantizes (the hardware routes), and ``recomputing`` marks an activation-checkpoint recompute.

    Example:
        >>> import torch
        >>> site = LayerSite("fc", torch.nn.Linear(4, 2))
        >>> site.set(Precision.cpt(4, 8))
        >>> site.train.weight.kind, site.eval.weight.kind
        ('int', 'int')
    """

    def __init__(self, name: str, module: torch.nn.Module, macs: Tensor | None = None,
                 kind: object | None = None) -> None:
        self.name = name
        self.module = module
        if kind is None:
            from .layers import layer_kind  # late: layers imports nothing from here, but keep it cheap

            kind = layer_kind(module)
        self.kind = kind
        device = next(module.parameters()).device
        self.device = device
        self.train = _Roles(device, track_range=True)
        self.eval = _Roles(device, track_range=False)
        self._share_range()
        self.macs = torch.zeros((), dtype=torch.float64, device=device) if macs is None else macs
        self.w: dict[str, Tensor] | None = None
        self.recomputing = False
        self.native = [False, False]  # indexed by ``training``
        self.weights: list[Any] = []  # adaprec.quant.attach._WeightSpec, one per quantized weight
        self.hook_ids: frozenset[int] = frozenset()
        self.backend: Any = None  # a backend's own per-layer state (the hardware routes)

    def _share_range(self) -> None:
        # Eval mode reads the running range collected by the training activation quantizer.
        self.eval.activation.range = self.train.activation.range
        self.eval.activation.seen = self.train.activation.seen

    def roles(self, training: bool) -> _Roles:
        return self.train if training else self.eval

    def set(self, train: Precision, eval: Precision | None = None) -> None:
        self.train.set(train)
        self.eval.set(train if eval is None else eval)

    def count(self, macs: int) -> None:
        """Add one training forward's multiply-accumulates (an in-place add: no sync, no guard)."""
        self.macs.add_(macs)

    def follow(self, module: torch.nn.Module) -> None:
        """Keep the state on the device of ``module``'s parameters (after ``.to()``/``.cuda()``).

        The MAC counter stays where it is: it only ever adds host integers.
        """
        p = next(module.parameters(), None)
        if p is None or p.device == self.device:
            return
        for roles in (self.train, self.eval):
            roles.weight.to(p.device)
            roles.gradient.to(p.device)
            p_only = roles.activation.range is None or roles is self.eval
            if p_only:
                roles.activation.p = roles.activation.p.to(p.device)
            else:
                roles.activation.to(p.device)
        self._share_range()
        self.device = p.device

    def state(self) -> dict[str, Tensor]:
        return self.train.activation.state()

    def load_state(self, d: dict[str, Tensor]) -> None:
        self.train.activation.load_state(d)
