"""The small base class of observers: handlers that watch a run and publish statistics.

An observer subscribes to controller events in :meth:`Observer.attach`, registers itself in
``ctl.components`` (so ``ctl.state_dict()`` saves its state) and writes what it measures into
``ctl.stats``. :meth:`Observer.detach` removes its handlers again.

Example:
    >>> import torch, adaprec
    >>> from adaprec.events import Event
    >>> class StepCounter(Observer):
    ...     name = "step_counter"
    ...     def __init__(self):
    ...         super().__init__(); self.n = 0
    ...     def _subscribe(self, ctl):
    ...         self._on(ctl, Event.ITERATION_COMPLETED, self._tick)
    ...     def _tick(self, ctl, **_):
    ...         self.n += 1; ctl.stats["steps_seen"] = self.n
    ...     def state_dict(self):
    ...         return {"n": self.n}
    ...     def load_state_dict(self, d):
    ...         self.n = d["n"]
    >>> model = torch.nn.Linear(2, 2)
    >>> with adaprec.Controller(model) as ctl:
    ...     obs = StepCounter().attach(ctl)
    ...     ctl.step(); ctl.step()
    >>> ctl.stats["steps_seen"], "step_counter" in ctl.components
    (2, True)
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from ..controller import Controller
    from ..events import Handle

__all__ = ["Observer"]


class Observer:
    """Base class: subscribe in :meth:`_subscribe`, keep state in :meth:`state_dict`.

    ``name`` is the key under which the observer sits in ``ctl.components``; two observers with the
    same name on one controller are an error (their saved states would overwrite each other).

    Example:
        >>> Observer().name
        'observer'
    """

    name: str = "observer"

    def __init__(self) -> None:
        self.ctl: Controller | None = None
        self._handles: list[Handle] = []

    def attach(self, ctl: Controller, name: str | None = None) -> Observer:
        """Subscribe to ``ctl``'s events and register in ``ctl.components``; returns ``self``."""
        if self.ctl is not None:
            raise RuntimeError(f"{type(self).__name__} is already attached to a controller; "
                               "detach() it first or create a new one")
        if name is not None:
            if not isinstance(name, str) or not name:
                raise ValueError(f"observer name must be a non-empty string, got {name!r}")
            self.name = name
        other = ctl.components.get(self.name)
        if other is not None and other is not self:
            raise ValueError(f"ctl.components already holds {self.name!r} ({type(other).__name__}); "
                             f"attach this {type(self).__name__} under another name=")
        self.ctl = ctl
        try:
            self._subscribe(ctl)
        except BaseException:
            self.detach()
            raise
        ctl.components[self.name] = self
        return self

    def detach(self) -> None:
        """Remove the handlers (the state stays readable)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.ctl = None

    def _on(self, ctl: Controller, event: Hashable, fn: Callable[..., Any]) -> None:
        self._handles.append(ctl.on(event, fn))

    def _subscribe(self, ctl: Controller) -> None:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
