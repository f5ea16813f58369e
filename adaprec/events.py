"""Events of a training run and the small bus that dispatches them.

Everything that reacts to training — policies, observers, the cost meter, loggers — is a handler on
this bus; nothing polls. Handlers run in the order they were added; their exceptions propagate.

Example:
    >>> from adaprec.events import Event, EventBus
    >>> bus, seen = EventBus(), []
    >>> h = bus.on(Event.EPOCH_COMPLETED, lambda ctl, **d: seen.append(d["epoch"]), every=2)
    >>> for e in range(5):
    ...     bus.fire(Event.EPOCH_COMPLETED, None, epoch=e)
    >>> seen
    [1, 3]
    >>> h.remove(); bus.fire(Event.EPOCH_COMPLETED, None, epoch=5); seen
    [1, 3]
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable
from enum import Enum
from typing import Any

__all__ = ["Event", "EventBus", "Handle"]


class Event(str, Enum):
    """The built-in events, in the order a run meets them."""

    FIT_STARTED = "fit_started"
    EPOCH_STARTED = "epoch_started"
    ITERATION_STARTED = "iteration_started"
    BEFORE_OPTIMIZER_STEP = "before_optimizer_step"
    ITERATION_COMPLETED = "iteration_completed"
    METRICS_OBSERVED = "metrics_observed"
    EPOCH_COMPLETED = "epoch_completed"
    PRECISION_CHANGED = "precision_changed"
    FIT_COMPLETED = "fit_completed"
    EXCEPTION_RAISED = "exception_raised"


class Handle:
    """Returned by :meth:`EventBus.on`; ``remove()`` unsubscribes (also usable as a context manager).

    Example:
        >>> bus = EventBus()
        >>> with bus.on("my_event", lambda ctl, **d: None):
        ...     bus.has_handlers("my_event")
        True
        >>> bus.has_handlers("my_event")
        False
    """

    def __init__(self, bus: EventBus, event: Hashable, key: int) -> None:
        self._bus, self._event, self._key = bus, event, key

    def remove(self) -> None:
        self._bus._handlers.get(self._event, {}).pop(self._key, None)

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class _Entry:
    __slots__ = ("fn", "every", "once", "count")

    def __init__(self, fn: Callable[..., Any], every: int, once: int | None) -> None:
        self.fn, self.every, self.once, self.count = fn, every, once, 0


class EventBus:
    """Dispatches events (members of :class:`Event` or any hashable custom key) to handlers.

    Example:
        >>> bus = EventBus()
        >>> _ = bus.on("checkpoint", lambda ctl, **d: print("saved", d["path"]), once=1)
        >>> bus.fire("checkpoint", None, path="a.pt"); bus.fire("checkpoint", None, path="b.pt")
        saved a.pt
    """

    def __init__(self) -> None:
        self._handlers: dict[Hashable, dict[int, _Entry]] = {}
        self._keys = itertools.count()

    def on(
        self,
        event: Hashable,
        handler: Callable[..., Any],
        *,
        every: int = 1,
        once: int | None = None,
    ) -> Handle:
        """Call ``handler(ctl, **data)`` on ``event``; ``every=n``: on every n-th firing only;
        ``once=n``: on the n-th firing only, then never again."""
        if not callable(handler):
            raise TypeError(f"handler must be callable, got {type(handler).__name__}")
        for name, v in (("every", every), ("once", once)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if isinstance(event, str) and not isinstance(event, Event):
            try:
                event = Event(event)
            except ValueError:
                pass  # a custom event
        key = next(self._keys)
        self._handlers.setdefault(event, {})[key] = _Entry(handler, every, once)
        return Handle(self, event, key)

    def has_handlers(self, event: Hashable) -> bool:
        return bool(self._handlers.get(event))

    def fire(self, event: Hashable, ctl: Any, **data: Any) -> None:
        entries = self._handlers.get(event)
        if not entries:
            return
        # Copy: a handler may add or remove handlers while we iterate. One removed by an earlier
        # handler of this same firing is not called any more; one added now waits for the next firing.
        for key, entry in list(entries.items()):
            if key not in entries:
                continue
            entry.count += 1
            if entry.once is not None:
                if entry.count != entry.once:
                    continue
                entries.pop(key, None)
            elif entry.count % entry.every:
                continue
            entry.fn(ctl, **data)

    def clear(self) -> None:
        self._handlers.clear()
