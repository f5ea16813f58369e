"""Give low-precision storage with Kahan compensation to a standard torch optimizer.

:class:`Compensated` wraps an optimizer whose step is a pure function of the parameters, their
gradients and its own state. It snapshots the parameters, lets the inner optimizer step, recovers the
step as ``Δ = p_after - p_before`` and writes it back through the storage format
(docs/methods.md#kahan-update). For AdamW the decoupled weight decay is part of ``Δ``, so it is compensated
too.
``Δ`` is recovered to float32 accuracy relative to the weight — as exact as an FP32 master copy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import SGD, Adagrad, Adam, AdamW, Optimizer, RMSprop

from ..compact import is_stored
from ._stored import STORAGE_KEYS, StoredParamsMixin, storage_defaults
from .state import STATE_FORMATS, read_state
from .state import state_format as state_format_of

__all__ = ["Compensated", "SUPPORTED_INNER"]

#: Inner optimizers :class:`Compensated` accepts (exact types: a subclass may change what step does).
SUPPORTED_INNER: tuple[type[Optimizer], ...] = (SGD, Adam, AdamW, RMSprop, Adagrad)


class Compensated(StoredParamsMixin, Optimizer):
    """Wrap ``SGD``, ``Adam``, ``AdamW``, ``RMSprop`` or ``Adagrad`` so that its parameters are *stored*
    in ``weight_format`` and its steps are written back with Kahan compensation (or plain / stochastic
    rounding, ``update=``).

    The wrapper shares the inner optimizer's ``param_groups`` (so LR schedulers may be given either
    object) and keeps the compensation state itself; ``state_dict()`` holds both (the inner state under
    ``"inner"``). Construction rounds the parameters in place into the storage format. Storage settings
    are per group, as in :class:`~adaprec.optim.KahanSGD`.

    ``state_format`` (``"fp32"``, ``"bf16"``, ``"bf16_stochastic"``, ``"8bit"``;
    :mod:`adaprec.optim.state`) holds the inner optimizer's parameter-sized buffers (momentum, Adam's
    moments, …) in low precision between steps. Then, and whenever the parameters are held compactly
    (weight storage inside a controller block), the inner optimizer steps one parameter at a time on
    float32 copies: its buffers decoded, its update taken, the buffers encoded again — so only one
    parameter's float32 working set exists at a time.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.ones(4))
        >>> opt = Compensated(torch.optim.Adam([w], lr=1e-3), weight_format="bf16")
        >>> for _ in range(100):                   # each step ~1e-3, under half a bf16 step at 1.0
        ...     w.grad = torch.ones(4)
        ...     opt.step()
        >>> bool(abs(float(w.detach()[0] + opt.state[w]["comp"][0]) - 0.9) < 2e-3)   # ~100 * 1e-3 was kept
        True
    """

    def __init__(
        self,
        optimizer: Optimizer,
        weight_format: object = "bf16",
        comp_format: object = None,
        update: str = "kahan",
        *,
        headroom_bits: int = 1,
        zero_range: float = 1.0,
        overflow: str = "rescale",
        state_format: str = "fp32",
        seed: int | None = None,
    ) -> None:
        if type(optimizer) not in SUPPORTED_INNER:
            names = ", ".join(f"torch.optim.{c.__name__}" for c in SUPPORTED_INNER)
            got = f"{type(optimizer).__module__}.{type(optimizer).__name__}"
            hint = (" It already writes to low-precision storage itself."
                    if isinstance(optimizer, StoredParamsMixin) else "")
            raise TypeError(
                f"Compensated supports {names} (exact types; their step is a pure function of parameters, "
                f"gradients and their own state); got {got}.{hint}")
        defaults = storage_defaults(weight_format, comp_format, update, headroom_bits=headroom_bits,
                                    zero_range=zero_range, overflow=overflow)
        if state_format not in STATE_FORMATS:
            state_format_of(state_format)  # raises, naming the allowed formats
        defaults["state_format"] = state_format
        self.inner = optimizer
        self._init_stored(seed)
        self._adopting = True
        # Optimizer.__init__ fills our storage keys into the inner optimizer's group dicts and adopts
        # those very dicts; afterwards both objects share one list of groups.
        super().__init__(optimizer.param_groups, defaults)
        self.param_groups = optimizer.param_groups
        self._adopting = False
        for group in self.param_groups:
            self._split_group(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer (torch semantics) and split it into storage."""
        if self._adopting:
            super().add_param_group(param_group)
            return
        self.inner.add_param_group(param_group)
        group = self.param_groups[-1]
        for k in (*STORAGE_KEYS, "state_format"):
            group.setdefault(k, self.defaults[k])
        self._split_group(group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run the inner step, then write its update back through the storage format."""
        storages = [self._split_group(g) for g in self.param_groups]
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError("Compensated does not support sparse gradients")
        if self._holding or any(self._state_format(g) is not None for g in self.param_groups):
            return self._step_each(storages, closure)
        # Without a closure only parameters that already have a gradient can move; with one, the
        # gradients appear inside the inner step, so every parameter is snapshot.
        before: list[list[Tensor | None]] = [
            [p.detach().clone() if (closure is not None or p.grad is not None) else None
             for p in g["params"]] for g in self.param_groups]
        loss = self.inner.step(closure) if closure is not None else self.inner.step()
        for group, storage, snaps in zip(self.param_groups, storages, before):
            for p, old in zip(group["params"], snaps):
                if old is None or p.grad is None:
                    continue  # the inner optimizer skips parameters without a gradient
                delta = p.detach() - old
                p.copy_(old)
                self._write_back(p, delta, group, storage)
        return loss

    def _step_each(self, storages: list[Any], closure: Callable[[], Any] | None) -> Any:
        """The inner step one parameter at a time, on float32 values and buffers (class docstring)."""
        loss = None
        if closure is not None:  # the gradients of this step, as the inner optimizer's step would
            with torch.enable_grad():
                loss = closure()
        for group, storage in zip(self.param_groups, storages):
            params = group["params"]
            try:
                for p in params:
                    if p.grad is not None:
                        self._step_one(group, p, storage)
            finally:
                group["params"] = params
        return loss

    def _step_one(self, group: dict[str, Any], p: Tensor, storage: Any) -> None:
        state = self.inner.state
        stored = is_stored(p)
        # The tensor the inner optimizer updates: the parameter itself when it is a plain float
        # tensor, else a float32 copy of its values carrying its gradient.
        work = p.plain() if stored else p
        before = work.clone()
        if stored:
            work.grad = p.grad
        own = state.pop(p, None)
        if own:
            state[work] = {k: read_state(v) if k in self._buffer_keys(p, own) else v for k, v in own.items()}
        group["params"] = [work]
        try:
            self.inner.step()
        finally:
            new = state.pop(work, {})
            if stored:
                work.grad = None
            keys = self._buffer_keys(p, new)
            state[p] = {k: self._hold_buffer(group, v) if k in keys else v for k, v in new.items()}
        delta = work - before
        if not stored:
            p.copy_(before)
        self._write_back(p, delta, group, storage)

    def _buffer_keys(self, p: Tensor, st: dict[str, Any]) -> list[str]:
        # The inner optimizer's parameter-sized float buffers; its step counter stays as it is.
        return [k for k in super()._buffer_keys(p, st) if k != "step"]

    def _buffer_states(self, p: Tensor) -> list[dict[str, Any]]:
        st = self.inner.state.get(p)
        return [st] if st else []

    def state_dict(self) -> dict[str, Any]:
        """Compensation state (``"state"``, ``"param_groups"``), RNG state, and the inner state dict."""
        sd = super().state_dict()
        sd["inner"] = self.inner.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        if "inner" not in state_dict:
            raise ValueError("this state dict has no 'inner' entry; was it saved by "
                             "Compensated.state_dict()?")
        self.inner.load_state_dict(state_dict.pop("inner"))
        # The base loader rebuilds our group list; re-share the inner optimizer's (freshly loaded) one.
        self.param_groups = self.inner.param_groups
        super().load_state_dict(state_dict)
        self.param_groups = self.inner.param_groups
