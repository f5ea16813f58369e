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

from ..formats import FP32, Format, Precision, run_kernel

__all__ = ["Quantizer", "LayerSite", "ste", "quantize_grad"]


class _STE(torch.autograd.Function):
    """Quantize in the forward, pass the gradient straight through."""

    @staticmethod
    def forward(ctx, x, kernel, spec, p, lo, hi, axis, rng):  # noqa: D102
        return run_kernel(kernel, x, p, spec, lo, hi, axis, rng)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        # The identity: differentiable again as it is, so create_graph=True sees a straight-through path.
        return g, None, None, None, None, None, None, None


class _GradQuant(torch.autograd.Function):
    """Identity in the forward; quantize the incoming gradient (the layer's error) in the backward."""

    @staticmethod
    def forward(ctx, x, kernel, spec, p, axis, rng):  # noqa: D102
        ctx.kernel, ctx.spec, ctx.axis, ctx.rng = kernel, spec, axis, rng
        # A copy of the numbers: the backward uses the format of the forward it belongs to, even if the
        # controller changes bits in place before ``loss.backward()`` (saving ``p`` itself would make
        # autograd fail with "modified by an inplace operation").
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
            q = ste(g, ctx.kernel, ctx.spec, p, None, None, ctx.axis, ctx.rng)
            return q, None, None, None, None, None
        q = run_kernel(ctx.kernel, g, p, ctx.spec, None, None, ctx.axis, ctx.rng)
        return q, None, None, None, None, None


def ste(x: Tensor, fmt_kernel, spec, p: Tensor, lo: Tensor | None = None, hi: Tensor | None = None,
        axis: int = -1, rng: int = 0) -> Tensor:
    """Fake-quantize ``x`` with a format kernel and a straight-through gradient."""
    return _STE.apply(x, fmt_kernel, spec, p, lo, hi, axis, rng)


def quantize_grad(x: Tensor, fmt_kernel, spec, p: Tensor, axis: int = -1, rng: int = 0) -> Tensor:
    """Return ``x`` unchanged; the gradient flowing back through it is quantized."""
    return _GradQuant.apply(x, fmt_kernel, spec, p, axis, rng)


class Quantizer:
    """One role (weight, activation or gradient) of one layer.

    The format's numbers (:meth:`~adaprec.formats.Format.params`) live in the tensor ``p`` and are
    overwritten in place when only they change; the format's kernel and static options
    (:meth:`~adaprec.formats.Format.kernel_spec`) are Python values (changing them changes the traced
    program). ``axis`` is the dimension along which the layer's product reduces (block-scaled formats put
    their blocks there); ``rng`` the stochastic-rounding generator key. Activation quantizers with
    ``track_range`` keep an EMA (momentum 0.9) of the batch min/max that eval mode uses instead of the batch
    range, for formats that read one (:attr:`~adaprec.formats.Format.uses_range`;
    docs/methods.md#sbm-quantizer).

    Example:
        >>> import torch
        >>> from adaprec.formats import IntFormat
        >>> q = Quantizer(torch.device("cpu"))
        >>> q.set(IntFormat(2))
        >>> q(torch.tensor([0.0, 0.1, 0.5, 1.0])).tolist()
        [0.0, 0.0, 0.6666666865348816, 1.0]
    """

    __slots__ = ("fmt", "kernel", "spec", "active", "ranged", "p", "axis", "rng", "range", "seen",
                 "momentum")

    def __init__(self, device: torch.device, track_range: bool = False, momentum: float = 0.9,
                 axis: int = -1) -> None:
        self.fmt: Format = FP32()
        self.kernel = FP32.kernel
        self.spec = self.fmt.kernel_spec()
        self.active = False
        self.ranged = False
        self.p = torch.zeros(1, device=device)
        self.axis = axis
        self.rng = 0
        self.range = torch.zeros(2, device=device) if track_range else None
        self.seen = torch.zeros((), dtype=torch.bool, device=device) if track_range else None
        self.momentum = momentum

    def set(self, fmt: Format) -> None:
        if fmt == self.fmt:
            return
        self.fmt = fmt
        self.kernel = type(fmt).kernel
        self.spec = fmt.kernel_spec()
        self.active = not fmt.is_identity
        self.ranged = self.range is not None and fmt.uses_range
        params = torch.tensor(fmt.params(), dtype=self.p.dtype)
        if params.shape == self.p.shape:
            self.p.copy_(params)  # in place: compiled code reading p sees the new numbers, no recompile
        else:
            self.p = params.to(self.p.device)

    @property
    def stochastic(self) -> bool:
        return self.fmt.stochastic

    @property
    def per_channel(self) -> bool:
        return self.fmt.per_channel

    def __call__(self, x: Tensor, training: bool = True, *, channel_dim: int = 0,
                 update: bool = True) -> Tensor:
        """Fake-quantize ``x`` (STE).

        ``channel_dim``: a weight's output-channel dimension when it is not 0 (Hugging Face's ``Conv1D``
        stores ``(in, out)``): the weight is quantized laid out like a Linear's, ``(out, in)``.
        ``update=False`` leaves the running activation range alone (an activation-checkpoint recompute).
        """
        if self.ranged:
            lo, hi = self._range(x, training, update)
            return ste(x, self.kernel, self.spec, self.p, lo, hi, self.axis, self.rng)
        if channel_dim and x.dim() > channel_dim:
            y = ste(x.movedim(channel_dim, 0), self.kernel, self.spec, self.p, None, None, self.axis,
                    self.rng)
            return y.movedim(0, channel_dim)
        return ste(x, self.kernel, self.spec, self.p, None, None, self.axis, self.rng)

    def grad(self, y: Tensor) -> Tensor:
        """Mark ``y`` so that the gradient flowing back into it is quantized."""
        if not y.requires_grad:
            return y
        return quantize_grad(y, self.kernel, self.spec, self.p, self.axis, self.rng)

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

    def load_state(self, d: dict[str, Tensor]) -> None:
        if self.range is not None and d:
            self.range.copy_(d["range"])
            self.seen.copy_(d["seen"])

    def to(self, device: torch.device, with_range: bool = True) -> None:
        """Move the format parameters (and the running range) to ``device``; they keep their dtype."""
        self.p = self.p.to(device)
        if with_range and self.range is not None:
            self.range = self.range.to(device)
            self.seen = self.seen.to(device)


class _Roles:
    __slots__ = ("weight", "activation", "gradient", "precision")

    def __init__(self, device: torch.device, track_range: bool, axis: int = -1) -> None:
        self.weight = Quantizer(device, axis=axis)
        self.activation = Quantizer(device, track_range=track_range, axis=axis)
        self.gradient = Quantizer(device, axis=axis)
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
    ``stored_weight`` is set by weight storage (:mod:`adaprec.storage_mode`) to a weight format whose
    quantization leaves the stored weights as they are (:meth:`~adaprec.formats.Format.keeps_stored`):
    while the weight role has that format the forward reads the stored weights themselves.

    Example:
        >>> import torch
        >>> site = LayerSite("fc", torch.nn.Linear(4, 2))
        >>> site.set(Precision.cpt(4, 8))
        >>> site.train.weight.fmt.short(), site.eval.weight.active
        ('int4', True)
    """

    def __init__(self, name: str, module: torch.nn.Module, macs: Tensor | None = None,
                 kind: Any = None) -> None:
        self.name = name
        self.module = module
        if kind is None:
            from .layers import layer_kind  # late: the layer table is a sibling module

            kind = layer_kind(module)
        self.kind = kind
        device = next(module.parameters()).device
        self.device = device
        # The reduction dimension of the layer's products (block-scaled formats block along it), from the
        # layer table: the channel dimension of convolution tensors, the feature (last) dimension else.
        axis = -1 if kind is None else kind.axis
        self.train = _Roles(device, track_range=True, axis=axis)
        self.eval = _Roles(device, track_range=False, axis=axis)
        self._share_range()
        self.macs = torch.zeros((), dtype=torch.float64, device=device) if macs is None else macs
        self.w: dict[str, Tensor] | None = None
        self.stored_weight: Format | None = None
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

    def set_rng(self, key: int) -> None:
        """Draw stochastic rounding from the generator ``key`` (:mod:`adaprec.formats.rounding`)."""
        for roles in (self.train, self.eval):
            for q in (roles.weight, roles.activation, roles.gradient):
                q.rng = key

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
            roles.activation.to(p.device, with_range=roles is self.train)
        self._share_range()
        self.device = p.device

    def state(self) -> dict[str, Tensor]:
        return self.train.activation.state()

    def load_state(self, d: dict[str, Tensor]) -> None:
        self.train.activation.load_state(d)
