"""Gradient diversity (Yin et al. 2018) as MuPPET measures it, and a windowed intra-epoch variant.

Yin's diversity of gradients ``g_1 .. g_n`` of one tensor is ``Σ_k ||g_k||² / ||Σ_k g_k||²``: ``1/n`` when
all gradients are identical, ``1`` when they are mutually orthogonal, larger when they cancel out.

* :class:`GradientDiversity` — MuPPET's inter-epoch estimator (docs/methods.md#muppet-rule): at the end of
  every epoch ``j`` it takes the last minibatch's gradient of every parameter tensor; the windows are the
  absolute epochs ``{0..r-1}, {r..2r-1}, …`` and at the last epoch of each window it computes the
  diversity of every tensor over the window's ``r`` gradients, their unweighted mean (``Δ_j``) and a
  per-layer view (for every quantized layer, the unweighted mean over its own parameter tensors).
* :class:`WindowedDiversity` — the same statistic inside an epoch: every ``k`` steps over the last ``n``
  step gradients (``n <= k``, windows by absolute step index), for runs with few, long epochs.

Memory: neither estimator stores the ``r`` (or ``n``) gradients. Because the statistic only needs
``Σ_k g_k`` and ``Σ_k ||g_k||²`` they keep **one gradient-sized float32 buffer per parameter tensor plus
two scalars per tensor**, and add each gradient in as it arrives. ``GradientDiversity(capture="copy")``
adds a second gradient-sized buffer (see below).

Which gradient is "the last one of the epoch"? The estimator reads it at ``ITERATION_COMPLETED``
(right after ``optimizer.step()`` or ``ctl.step()``, before any ``zero_grad`` that follows the step):

* ``capture="reference"`` (default) keeps a *reference* to each ``p.grad`` there — no copy and no
  per-step cost. It is exact when ``zero_grad()`` comes before ``backward()`` (the usual loop) and when
  gradients are zeroed after the step with ``set_to_none=True`` (torch's default; the old tensor stays
  untouched, but it is kept alive until the epoch ends). It is wrong if something zeroes or changes the
  gradient tensors *in place* after the last step of an epoch (``zero_grad(set_to_none=False)`` after
  ``step()``, an optimizer that edits ``p.grad``); all-zero gradients are detected and raise.
* ``capture="copy"`` copies every gradient into a preallocated buffer at every step (``copy_``): robust
  to anything, at one extra gradient-sized buffer per tensor and one copy per step.

Distributed: under DDP the gradients are already averaged over ranks in ``backward()``, so every rank
sees the same gradient and computes the same diversity; when ``torch.distributed`` is initialized the
results are also broadcast from rank 0 (a handful of scalars, once per window) so that all ranks take
bitwise-identical decisions. Without gradient averaging (no DDP) the statistic is rank 0's.

Published statistics (``ctl.observe``, so loggers see ``METRICS_OBSERVED``): ``grad_diversity`` (the
mean ``Δ_j``) and ``grad_diversity/<layer>`` per quantized layer (``grad_diversity_windowed…`` for the
windowed estimator).

Example:
    >>> import torch
    >>> g = torch.randn(10)
    >>> round(gradient_diversity([g, g, g, g]), 6)
    0.25
    >>> round(gradient_diversity(list(torch.eye(3))), 6)
    1.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..events import Event
from .base import Observer

if TYPE_CHECKING:  # pragma: no cover
    from ..controller import Controller

__all__ = ["gradient_diversity", "DiversityAccumulator", "DiversityResult", "GradientDiversity",
           "WindowedDiversity"]

ParamFilter = Callable[[str, torch.nn.Parameter], bool] | None
_CAPTURES = ("reference", "copy")


def gradient_diversity(grads: Sequence[Tensor]) -> float:
    """Yin's gradient diversity ``Σ_k ||g_k||² / ||Σ_k g_k||²`` of same-shaped tensors, in float64.

    Returns ``inf`` when the gradients cancel exactly and ``nan`` when all are zero.

    Example:
        >>> import torch
        >>> gradient_diversity([torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])])
        inf
    """
    grads = list(grads)
    if not grads:
        raise ValueError("gradient_diversity needs at least one gradient")
    shape = grads[0].shape
    for g in grads:
        if not isinstance(g, Tensor):
            raise TypeError(f"gradient_diversity takes tensors, got {type(g).__name__}")
        if g.shape != shape:
            raise ValueError(f"all gradients must have the same shape; got {tuple(shape)} and "
                             f"{tuple(g.shape)}")
    flat = [g.detach().reshape(-1).to(torch.float64) for g in grads]
    num = sum(float(f.dot(f)) for f in flat)
    total = torch.stack(flat).sum(0)
    return _ratio(num, float(total.dot(total)))


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return math.inf if num > 0 else math.nan


def _buffer_dtype(p: Tensor) -> torch.dtype:
    # Half-precision gradients are summed in float32 so that the window sum does not round.
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


class DiversityAccumulator:
    """Running ``Σ g`` (one buffer per tensor) and ``Σ ||g||²`` (scalars) for Yin's diversity.

    Example:
        >>> import torch
        >>> acc = DiversityAccumulator([torch.zeros(3)])
        >>> for g in torch.eye(3):
        ...     _ = acc.add([g])
        >>> acc.counts, [round(v, 6) for v in acc.diversity(required=3).tolist()]
        ([3], [1.0])
    """

    def __init__(self, like: Sequence[Tensor]) -> None:
        self.sums = [torch.zeros_like(p, dtype=_buffer_dtype(p), memory_format=torch.contiguous_format)
                     for p in like]
        self.sq = [torch.zeros((), dtype=torch.float64, device=p.device) for p in like]
        self.counts = [0] * len(self.sums)

    def add(self, grads: Sequence[Tensor | None]) -> Tensor:
        """Add one gradient per tensor (``None`` skips that tensor); returns the summed squared norm."""
        total = None
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.detach()
            self.sums[i].add_(g)
            n2 = torch.linalg.vector_norm(g, dtype=torch.float64).square()
            self.sq[i].add_(n2)
            self.counts[i] += 1
            total = n2 if total is None else total + n2.to(total.device)
        return torch.zeros((), dtype=torch.float64) if total is None else total

    def diversity(self, required: int) -> Tensor:
        """Per-tensor diversity (float64, on the first tensor's device); ``nan`` where fewer than
        ``required`` gradients were added or every gradient was zero."""
        if not self.sums:
            return torch.zeros(0, dtype=torch.float64)
        dev = self.sums[0].device
        out = []
        for s, q, c in zip(self.sums, self.sq, self.counts):
            den = torch.linalg.vector_norm(s, dtype=torch.float64).square().to(dev)
            q = q.to(dev)
            val = torch.where(den > 0, q / den.clamp_min(torch.finfo(torch.float64).tiny),
                              torch.where(q > 0, torch.full_like(q, math.inf), torch.full_like(q, math.nan)))
            out.append(val if c >= required else torch.full_like(q, math.nan))
        return torch.stack(out)

    def reset(self) -> None:
        for s, q in zip(self.sums, self.sq):
            s.zero_()
            q.zero_()
        self.counts = [0] * len(self.sums)

    def state_dict(self) -> dict[str, Any]:
        return {"sums": [s.clone() for s in self.sums], "sq": [q.clone() for q in self.sq],
                "counts": list(self.counts)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        if len(d["sums"]) != len(self.sums):
            raise ValueError(f"diversity state has {len(d['sums'])} tensors, this observer tracks "
                             f"{len(self.sums)}")
        for s, v in zip(self.sums, d["sums"]):
            if s.shape != v.shape:
                raise ValueError(f"diversity state tensor of shape {tuple(v.shape)} does not match the "
                                 f"parameter's shape {tuple(s.shape)}")
            s.copy_(v)
        for q, v in zip(self.sq, d["sq"]):
            q.copy_(v)
        self.counts = [int(c) for c in d["counts"]]


@dataclass(frozen=True)
class DiversityResult:
    """One diversity estimate: the mean over tensors, per layer and (latest result only) per tensor.

    ``epoch``/``step``: when it was computed; ``first``/``last``: the window (epochs for the
    inter-epoch estimator, steps for the windowed one). ``value`` is ``nan`` when no tensor had a full
    window (e.g. the observer was attached in the middle of one).
    """

    epoch: int
    step: int
    first: int
    last: int
    value: float
    per_layer: dict[str, float] = field(default_factory=dict)
    per_tensor: dict[str, float] | None = None


class _DiversityObserver(Observer):
    """Shared parts: which tensors, the layer map, computing and publishing a result."""

    def __init__(self, params: ParamFilter, stat: str, publish: bool) -> None:
        super().__init__()
        if params is not None and not callable(params):
            raise TypeError("params= takes None (all trainable parameters) or a callable "
                            "(name, parameter) -> bool")
        if not isinstance(stat, str) or not stat:
            raise ValueError(f"stat must be a non-empty string, got {stat!r}")
        self.params_filter = params
        self.stat = stat
        self.publish = bool(publish)
        self.names: list[str] = []
        self._params: list[torch.nn.Parameter] = []
        self.layer_tensors: dict[str, list[int]] = {}
        self._acc: DiversityAccumulator | None = None
        self._pending: dict[str, Any] | None = None
        self.result: DiversityResult | None = None
        self.history: list[DiversityResult] = []

    def _resolve(self, ctl: Controller) -> None:
        named = [(n, p) for n, p in ctl.model.named_parameters()
                 if p.requires_grad and (self.params_filter is None or self.params_filter(n, p))]
        if not named:
            raise ValueError(f"{type(self).__name__}: no trainable parameters to watch "
                             "(all have requires_grad=False or the params= filter rejected them)")
        self.names = [n for n, _ in named]
        self._params = [p for _, p in named]
        index = {id(p): i for i, p in enumerate(self._params)}
        self.layer_tensors = {}
        for layer in ctl.layer_names:
            module = ctl.model.get_submodule(layer) if layer else ctl.model
            idx = [index[id(p)] for p in module.parameters() if id(p) in index]
            if idx:
                self.layer_tensors[layer] = idx
        self._acc = DiversityAccumulator(self._params)

    def _finish(self, ctl: Controller, epoch: int, first: int, last: int, required: int) -> DiversityResult:
        assert self._acc is not None
        per = _agree(self._acc.diversity(required)).tolist()
        self._acc.reset()
        per_layer = {layer: _mean([per[i] for i in idx]) for layer, idx in self.layer_tensors.items()}
        value = _mean(per)
        res = DiversityResult(epoch, ctl.step_count, first, last, value, per_layer,
                              dict(zip(self.names, per)))
        self.result = res
        self.history.append(DiversityResult(epoch, ctl.step_count, first, last, value, per_layer))
        if self.publish and not math.isnan(value):
            stats = {self.stat: value}
            stats.update({f"{self.stat}/{k}": v for k, v in per_layer.items() if not math.isnan(v)})
            ctl.observe(**stats)
        return res

    def _base_state(self) -> dict[str, Any]:
        return {"names": list(self.names),
                "acc": None if self._acc is None else self._acc.state_dict(),
                # Plain dicts, so the state loads with torch.load(weights_only=True).
                "result": None if self.result is None else asdict(self.result),
                "history": [asdict(h) for h in self.history]}

    def _load_base(self, d: dict[str, Any]) -> None:
        if list(d["names"]) != self.names:
            raise ValueError(f"{type(self).__name__} state is for parameters {d['names'][:4]}…, this "
                             f"observer watches {self.names[:4]}…")
        if d["acc"] is not None:
            self._acc.load_state_dict(d["acc"])
        self.result = None if d["result"] is None else DiversityResult(**d["result"])
        self.history = [DiversityResult(**h) for h in d["history"]]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._acc is None:  # not attached yet: apply once the tensors are known
            self._pending = state
            return
        self._load(state)

    def _load(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _apply_pending(self) -> None:
        if self._pending is not None:
            state, self._pending = self._pending, None
            self._load(state)


def _mean(xs: list[float]) -> float:
    """Unweighted mean that skips ``nan`` (tensors without a full window or without gradient)."""
    vals = [x for x in xs if not math.isnan(x)]
    return sum(vals) / len(vals) if vals else math.nan


def _agree(values: Tensor) -> Tensor:
    """Make every rank use rank 0's numbers (identical under DDP anyway; this removes any doubt)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.broadcast(values, src=0)
    return values


def _check_int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    return v


class GradientDiversity(_DiversityObserver):
    """MuPPET's inter-epoch gradient diversity over windows of ``resolution`` absolute epochs.

    Args:
        resolution: ``r``, the number of epochs per window (checks at epochs ``r-1, 2r-1, …``).
        capture: ``"reference"`` (no per-step cost) or ``"copy"`` (robust to in-place zeroing; one
            extra buffer per tensor) — see the module docstring.
        params: ``None`` (every trainable parameter of the model) or ``(name, param) -> bool``.
        stat: the name of the published statistic.
        publish: write the results into ``ctl.stats`` via ``ctl.observe``.

    A window the observer did not see completely (attached or resumed without its state in the
    middle of one) gives ``nan`` and publishes nothing. ``result`` holds the latest
    :class:`DiversityResult`, ``history`` all of them (without the per-tensor values).

    Example:
        >>> import torch, adaprec
        >>> model = torch.nn.Linear(3, 1, bias=False)
        >>> with adaprec.Controller(model) as ctl:
        ...     obs = GradientDiversity(resolution=3).attach(ctl)
        ...     for e in range(3):
        ...         for _ in ctl.epoch([0]):
        ...             model.weight.grad = torch.eye(3)[e:e + 1].clone(); ctl.step()
        >>> round(ctl.stats["grad_diversity"], 6), obs.result.first, obs.result.last
        (1.0, 0, 2)
    """

    name = "grad_diversity"

    def __init__(self, resolution: int = 3, *, capture: str = "reference", params: ParamFilter = None,
                 stat: str = "grad_diversity", publish: bool = True) -> None:
        super().__init__(params, stat, publish)
        self.resolution = _check_int("resolution", resolution, 1)
        if capture not in _CAPTURES:
            raise ValueError(f"capture must be one of {_CAPTURES}, got {capture!r}")
        self.capture = capture
        self._window: int | None = None
        self._last: list[Tensor | None] | None = None
        self._buf: list[Tensor] = []
        self._have: list[bool] = []

    def _subscribe(self, ctl: Controller) -> None:
        self._resolve(ctl)
        if self.capture == "copy":
            self._buf = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in self._params]
            self._have = [False] * len(self._params)
        self._on(ctl, Event.ITERATION_COMPLETED, self._capture)
        self._on(ctl, Event.EPOCH_COMPLETED, self._epoch_end)
        self._apply_pending()

    def _capture(self, ctl: Controller, **_: Any) -> None:
        if self.capture == "reference":
            self._last = [p.grad for p in self._params]
            return
        for i, p in enumerate(self._params):
            g = p.grad
            self._have[i] = g is not None
            if g is not None:
                self._buf[i].copy_(g)
        self._last = [b if h else None for b, h in zip(self._buf, self._have)]

    def _epoch_end(self, ctl: Controller, epoch: int, **_: Any) -> None:
        j, r = int(epoch), self.resolution
        if self._window != j // r:
            # A new window (by absolute epoch); anything left over belongs to an unfinished one.
            self._acc.reset()
            self._window = j // r
        grads = self._last if self._last is not None else [p.grad for p in self._params]
        self._last = None  # drop the references: the next epoch captures afresh
        if all(g is None for g in grads):
            raise RuntimeError(
                f"GradientDiversity: no parameter has a gradient at the end of epoch {j}. Call "
                "loss.backward() in the loop, and step the controller (optimizer= or ctl.step()) after it")
        total = self._acc.add(grads)
        if float(total) == 0.0:  # one sync per epoch
            hint = ("gradients were zeroed in place after the last step; zero them before backward() "
                    "or use capture='copy'") if self.capture == "reference" else \
                "were they zeroed before ctl.step()?"
            raise RuntimeError(f"GradientDiversity: every gradient is exactly zero at the end of epoch "
                               f"{j}; {hint}")
        if j % r == r - 1:
            self._finish(ctl, j, j - r + 1, j, required=r)

    def state_dict(self) -> dict[str, Any]:
        d = self._base_state()
        d.update(resolution=self.resolution, window=self._window)
        return d

    def _load(self, d: dict[str, Any]) -> None:
        if int(d["resolution"]) != self.resolution:
            raise ValueError(f"GradientDiversity state has resolution {d['resolution']}, this observer "
                             f"uses {self.resolution}")
        self._load_base(d)
        self._window = d["window"]


class WindowedDiversity(_DiversityObserver):
    """Intra-epoch gradient diversity: every ``every`` steps, over the last ``window`` step gradients.

    Windows follow the absolute step index: block ``b`` covers steps ``b*every .. (b+1)*every - 1`` and
    its last ``window`` gradients are summed (read at ``ITERATION_COMPLETED``, so any ``zero_grad``
    placement works). ``window <= every`` keeps the memory at one buffer per tensor.

    Example:
        >>> import torch, adaprec
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> with adaprec.Controller(model) as ctl:
        ...     obs = WindowedDiversity(every=4, window=2).attach(ctl)
        ...     for t in range(4):
        ...         model.weight.grad = torch.ones(1, 2); ctl.step()
        >>> round(ctl.stats["grad_diversity_windowed"], 6), (obs.result.first, obs.result.last)
        (0.5, (2, 3))
    """

    name = "grad_diversity_windowed"

    def __init__(self, every: int, window: int | None = None, *, params: ParamFilter = None,
                 stat: str = "grad_diversity_windowed", publish: bool = True) -> None:
        super().__init__(params, stat, publish)
        self.every = _check_int("every", every, 2)
        self.window = self.every if window is None else _check_int("window", window, 2)
        if self.window > self.every:
            raise ValueError(f"window ({self.window}) must not exceed every ({self.every}): windows do "
                             "not overlap, which keeps the memory at one buffer per tensor")
        self._block: int | None = None

    def _subscribe(self, ctl: Controller) -> None:
        self._resolve(ctl)
        self._on(ctl, Event.ITERATION_COMPLETED, self._step)
        self._apply_pending()

    def _step(self, ctl: Controller, step: int, **_: Any) -> None:
        t, k = int(step), self.every
        if self._block != t // k:
            self._acc.reset()
            self._block = t // k
        if t % k >= k - self.window:
            self._acc.add([p.grad for p in self._params])
        if t % k == k - 1:
            self._finish(ctl, ctl.epoch_index, t - self.window + 1, t, required=self.window)

    def state_dict(self) -> dict[str, Any]:
        d = self._base_state()
        d.update(every=self.every, window_size=self.window, block=self._block)
        return d

    def _load(self, d: dict[str, Any]) -> None:
        if (int(d["every"]), int(d["window_size"])) != (self.every, self.window):
            raise ValueError(f"WindowedDiversity state has every={d['every']}, window={d['window_size']}; "
                             f"this observer uses every={self.every}, window={self.window}")
        self._load_base(d)
        self._block = d["block"]
