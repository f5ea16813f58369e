"""SGD whose parameters live in a low-precision storage format, with Kahan-compensated updates.

docs/methods.md#kahan-update (Park et al., arXiv 1810.05486): without an FP32 master copy, a step smaller than
half a step of the weight grid is rounded away ("swamping"). :class:`KahanSGD` keeps a per-weight
compensation ``c`` on a finer grid and writes each step back as
``y = Q_c(Δ + c); w' = Q_w(w + y); c = Q_c(y - (w' - w))``, where ``Δ`` is the whole SGD step
(weight decay and momentum included — decay applied straight to a low-precision weight would vanish).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._stored import StoredParamsMixin, storage_defaults
from .state import STATE_FORMATS, read_state, state_format

__all__ = ["KahanSGD"]


def _nonneg(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


class KahanSGD(StoredParamsMixin, Optimizer):
    """SGD (momentum, Nesterov, weight decay as in :class:`torch.optim.SGD`) with low-precision storage.

    Args:
        params: parameters or parameter groups (float32/float64 tensors). A group may override any
            hyperparameter, including the storage settings below.
        lr, momentum, dampening, nesterov, weight_decay: as in :class:`torch.optim.SGD`; the step is
            ``Δ = -lr * d`` with ``d = grad + weight_decay * w`` passed through the momentum buffer.
        weight_format: storage format of the weights (``"fx8"``/an int for fixed point with a kept
            fractional length, ``"bf16"``, ``"fp16"``, ``"fp8_e4m3"``, ``"fp8_e5m2"``, ``"fp32"``).
        comp_format: compensation format (``update="kahan"`` only); ``None`` = same width as the weight.
        update: ``"kahan"`` (compensated), ``"nearest"`` (plain rounding of ``w + Δ``, swamps) or
            ``"stochastic"`` (stochastic rounding of ``w + Δ``, unbiased, no compensation).
        headroom_bits, zero_range, overflow: how a fixed-point tensor's kept fractional length is
            chosen and what happens when the weights outgrow it (:mod:`adaprec.optim.storage`).
        state_format: how the momentum buffer is held between steps: ``"fp32"``, ``"bf16"``,
            ``"bf16_stochastic"`` or ``"8bit"`` (:mod:`adaprec.optim.state`).
        seed: seed of the optimizer's own stochastic-rounding generator (saved in ``state_dict()``);
            ``None`` uses ``torch.initial_seed()`` (set by ``torch.manual_seed``; the global RNG stream
            is not touched).

    The constructor rounds the parameters in place into their storage format (the residual goes
    into the compensation); an already-stored tensor is left unchanged. State per parameter:
    ``"comp"`` (held in the compensation format's compact form), ``"w_fl"`` and ``"momentum_buffer"``
    (in ``state_format``). The parameters themselves stay float32 tensors holding values of the
    format, except inside a controller block with weight storage, which holds them compactly
    (:meth:`~adaprec.optim._stored.StoredParamsMixin.hold_params`). What it all occupies:
    :func:`adaprec.optim.optimizer_memory`.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(3))
        >>> opt = KahanSGD([w], lr=2.0**-9, weight_format="fx8")    # grid step of w: 2**-5
        >>> for _ in range(32):
        ...     w.grad = torch.ones(3)
        ...     opt.step()
        >>> w.detach(), opt.state[w]["comp"]       # 32 steps of 1/16 grid step each; c in int8 codes
        (tensor([0.9375, 0.9375, 0.9375]), StoredTensor(fx8, tensor([0., 0., 0.])))
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        *,
        weight_format: object = "bf16",
        comp_format: object = None,
        update: str = "kahan",
        headroom_bits: int = 1,
        zero_range: float = 1.0,
        overflow: str = "rescale",
        state_format: str = "fp32",
        seed: int | None = None,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay, state_format=state_format)
        self._check_hyper(defaults)
        defaults.update(storage_defaults(weight_format, comp_format, update, headroom_bits=headroom_bits,
                                         zero_range=zero_range, overflow=overflow))
        self._init_stored(seed)
        super().__init__(params, defaults)

    @staticmethod
    def _check_hyper(group: dict[str, Any]) -> None:
        lr = group["lr"]
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr < 0:
            raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
        for name in ("momentum", "dampening", "weight_decay"):
            _nonneg(name, group[name])
        if not isinstance(group["nesterov"], bool):
            raise ValueError(f"nesterov must be a bool, got {group['nesterov']!r}")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov=True needs momentum > 0 and dampening = 0 (as in torch.optim.SGD)")
        if group.get("state_format", "fp32") not in STATE_FORMATS:
            state_format(group["state_format"])  # raises, naming the allowed formats

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (torch semantics) and split its parameters into their storage format."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._check_hyper(group)
        self._split_group(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SGD step written back through the storage format; returns ``closure()``'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            storage = self._split_group(group)  # re-splits first if the group's format was changed
            lr = self._check_lr(group)
            momentum, dampening = group["momentum"], group["dampening"]
            nesterov, wd = group["nesterov"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("KahanSGD does not support sparse gradients")
                d = p.grad.add(p, alpha=wd) if wd != 0 else p.grad
                if momentum != 0:
                    st = self.state[p]
                    held = st.get("momentum_buffer")
                    if held is None:
                        buf = torch.clone(d).detach()
                    else:  # float32 for the update (a decoded copy when held compactly)
                        buf = read_state(held)
                        buf.mul_(momentum).add_(d, alpha=1 - dampening)
                    st["momentum_buffer"] = self._hold_buffer(group, buf, into=held)
                    d = d.add(buf, alpha=momentum) if nesterov else buf
                self._write_back(p, d, group, storage, alpha=-lr)
        return loss
