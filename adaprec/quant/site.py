"""Quantization sites: the state one layer needs to fake its weight, input and output-gradient formats.

A :class:`Quantizer` holds one role's format as tensors (filled in place when the format changes) and
applies it; :class:`LayerSite` groups a layer's three roles for training and for evaluation, and counts
the multiply-accumulates of training forwards for the cost meter. Nothing here is registered on the
model, so ``model.state_dict()`` keeps its keys (DESIGN.md contract 2).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from ..cost import KINDS, macs_vector
from ..formats import FP32, Format, Precision, rounding, run_kernel
from ..formats.codes import tensor_range

__all__ = ["Quantizer", "LayerSite", "ste", "quantize_grad"]

#: Training forwards per layer and iteration whose rounding state is kept for a checkpoint recompute
#: (a bound against a loop that never completes iterations; one entry is a few KB).
_REPLAY_MAX = 64


class _STE(torch.autograd.Function):
    """Quantize in the forward, pass the gradient straight through."""

    @staticmethod
    def forward(ctx, x, kernel, spec, p, lo, hi, axis, rng):  # noqa: D102
        y = run_kernel(kernel, x, p, spec, lo, hi, axis, rng)
        if torch.compiler.is_compiling():
            # The layer's backward needs the quantized tensor. Left to itself, torch.compile's partitioner
            # recomputes it there from the input (it is "cheap" pointwise work), fused into the backward's
            # kernels, where it ran several times slower than here (measured: benchmarks/overhead.py).
            # An opaque copy cannot be recomputed, so the quantized tensor is saved instead.
            y = _saved(y)
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        # The identity: differentiable again as it is, so create_graph=True sees a straight-through path.
        return g, None, None, None, None, None, None, None


def _saved_impl(y: Tensor) -> Tensor:
    return y.clone()


_saved = torch.library.custom_op("adaprec::saved", _saved_impl, mutates_args=())
_saved.register_fake(lambda y: torch.empty_like(y))


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

    def own(self, x: Tensor) -> Tensor:
        """Fake-quantize ``x`` (STE) by the format's own rule on ``x`` alone: a min-max grid takes
        ``x``'s own range, never the running range of the layer's input (a recurrent layer's hidden
        state, the input of its second layer)."""
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
        lo, hi = tensor_range(x)
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

    ``macs`` (a float64 row over the product kinds of :data:`adaprec.cost.KINDS`, usually a row of the
    backend's counter) accumulates the multiply-accumulates of the products of training calls until the
    cost meter reads it (:meth:`count`).
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
        self.macs = torch.zeros(len(KINDS), dtype=torch.float64, device=device) if macs is None else macs
        self._rows: dict[tuple[float, ...], Tensor] = {}  # MAC rows already on the device, by value
        self.deferred = 0  # training forwards without autograd whose backward a checkpoint recompute runs
        self.call_macs: Any = None  # a forward that counts its own products leaves them here (RNNs)
        self.w: dict[str, Tensor] | None = None
        self.stored_weight: Format | None = None
        self.recomputing = False
        self.native = [False, False]  # indexed by ``training``
        self.weights: list[Any] = []  # adaprec.quant.attach._WeightSpec, one per quantized weight
        self.hook_ids: frozenset[int] = frozenset()
        self.backend: Any = None  # a backend's own per-layer state (the hardware routes)
        # Stochastic forward rounding (MuPPET's fixed point) under activation checkpointing: the state of
        # the rounding generator at each training forward of this iteration, so that the recompute draws
        # the same noise as the forward it replays (torch.utils.checkpoint restores torch's own
        # generators, not adaprec's). Cleared when the controller completes an iteration.
        self.replay: deque[Tensor] = deque(maxlen=_REPLAY_MAX)
        self.sr_forward = False

    def _share_range(self) -> None:
        # Eval mode reads the running range collected by the training activation quantizer.
        self.eval.activation.range = self.train.activation.range
        self.eval.activation.seen = self.train.activation.seen

    def roles(self, training: bool) -> _Roles:
        return self.train if training else self.eval

    def set(self, train: Precision, eval: Precision | None = None) -> None:
        self.train.set(train)
        self.eval.set(train if eval is None else eval)
        self.sr_forward = any(q.active and q.stochastic for q in (self.train.weight, self.train.activation))

    def begin_rounding(self, training: bool) -> tuple[torch.Generator, Tensor] | None:
        """Before one forward quantizes: save the rounding generator's state (a first forward with
        stochastic forward rounding) or set it to the state saved at the forward this checkpoint
        recompute repeats. Returns what :meth:`end_rounding` needs to go back, or ``None``."""
        if not (training and self.sr_forward) or torch.compiler.is_compiling():
            return None
        gen = self.generator()
        if gen is None:
            return None
        if not self.recomputing:
            self.replay.append(gen.get_state())
            return None
        if not self.replay:
            return None
        resume = gen.get_state()
        gen.set_state(self.replay.popleft())
        return gen, resume

    @staticmethod
    def end_rounding(token: tuple[torch.Generator, Tensor] | None) -> None:
        """After a recompute's quantization: the generator continues where the run is."""
        if token is not None:
            token[0].set_state(token[1])

    def generator(self) -> torch.Generator | None:
        """The controller's rounding generator on this layer's device (``None``: torch's own, which
        ``torch.utils.checkpoint`` already restores for a recompute)."""
        return rounding.generator(self.train.activation.rng, self.device)

    def set_rng(self, key: int) -> None:
        """Draw stochastic rounding from the generator ``key`` (:mod:`adaprec.formats.rounding`)."""
        for roles in (self.train, self.eval):
            for q in (roles.weight, roles.activation, roles.gradient):
                q.rng = key

    def count(self, macs: int | Mapping, inputs: tuple = ()) -> None:
        """Bill one training call's products (docs/methods.md#bitops; an in-place add: no sync).

        ``macs`` is what the layer table's ``macs`` returned: an int (the forward's MACs; the input
        gradient is billed as the same size when an activation input in ``inputs`` requires grad, the
        weight gradient when a quantized weight does) or a mapping ``{product kind: MACs}``
        (:func:`adaprec.cost.kind_index`) in which the layer says itself which products its backward
        runs. Backward products are billed with the forward when autograd records it. A training forward
        without autograd (the first forward of a reentrant activation checkpoint) bills its forward only,
        and the recompute in the backward bills the backward products; a recompute never bills its
        forward again.
        """
        if isinstance(macs, Mapping):
            row = macs_vector(macs)
        else:
            m = float(macs)
            row = [0.0] * len(KINDS)
            row[0] = m
            if any(_requires_grad(x) for x in inputs):
                row[4] = m
            if any(spec.raw().requires_grad for spec in self.weights):
                row[8] = m
        if self.recomputing:
            if not self.deferred:
                return
            self.deferred -= 1
            row[:4] = (0.0,) * 4
        elif not torch.is_grad_enabled():
            self.deferred += 1
            row[4:] = (0.0,) * (len(KINDS) - 4)
        if torch.compiler.is_compiling():  # a constant of the traced program (a cache would add guards)
            self.macs.add_(torch.tensor(row, dtype=torch.float64, device=self.macs.device))
            return
        key = tuple(row)
        vec = self._rows.get(key)
        if vec is None:
            if len(self._rows) > 64:  # varying shapes (packed sequences): keep the cache small
                self._rows.clear()
            vec = self._rows[key] = torch.tensor(row, dtype=torch.float64, device=self.macs.device)
        self.macs.add_(vec)

    def end_iteration(self) -> None:
        """Forget what a checkpoint recompute of this iteration would have needed: forwards without
        autograd that no recompute claimed, and the saved rounding-generator states."""
        self.deferred = 0
        if self.replay:
            self.replay.clear()

    def follow(self, module: torch.nn.Module) -> None:
        """Keep the state on the device of ``module``'s parameters (after ``.to()``/``.cuda()``).

        The MAC counter stays where it is (the cost meter reads it there).
        """
        p = next(module.parameters(), None)
        if p is None or p.device == self.device:
            return
        for roles in (self.train, self.eval):
            roles.weight.to(p.device)
            roles.gradient.to(p.device)
            roles.activation.to(p.device, with_range=roles is self.train)
        self._share_range()
        self._rows.clear()
        self.device = p.device

    def state(self) -> dict[str, Tensor]:
        return self.train.activation.state()

    def load_state(self, d: dict[str, Tensor]) -> None:
        self.train.activation.load_state(d)


def _requires_grad(x: Any) -> bool:
    if isinstance(x, PackedSequence):
        x = x.data
    return isinstance(x, Tensor) and x.requires_grad
