"""The event bus, alone and as driven by the Controller."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaprec
from adaprec.events import Event, EventBus


def _recorder(log: list, tag: str):
    return lambda ctl, **data: log.append((tag, data))


def test_every_and_once() -> None:
    bus, log = EventBus(), []
    bus.on("tick", _recorder(log, "every3"), every=3)
    bus.on("tick", _recorder(log, "once2"), once=2)
    for i in range(7):
        bus.fire("tick", None, i=i)
    assert [(t, d["i"]) for t, d in log] == [("once2", 1), ("every3", 2), ("every3", 5)]
    assert bus.has_handlers("tick")


def test_remove_and_context_manager() -> None:
    bus, log = EventBus(), []
    h = bus.on(Event.EPOCH_COMPLETED, _recorder(log, "a"))
    bus.fire(Event.EPOCH_COMPLETED, None)
    h.remove()
    h.remove()  # removing twice is harmless
    bus.fire(Event.EPOCH_COMPLETED, None)
    with bus.on(Event.EPOCH_COMPLETED, _recorder(log, "b")):
        bus.fire(Event.EPOCH_COMPLETED, None)
    bus.fire(Event.EPOCH_COMPLETED, None)
    assert [t for t, _ in log] == ["a", "b"]
    assert not bus.has_handlers(Event.EPOCH_COMPLETED)


def test_handlers_run_in_subscription_order() -> None:
    bus, log = EventBus(), []
    for tag in "cab":
        bus.on("e", _recorder(log, tag))
    bus.fire("e", None)
    assert [t for t, _ in log] == ["c", "a", "b"]


def test_string_names_alias_builtin_events() -> None:
    bus, log = EventBus(), []
    bus.on("epoch_completed", _recorder(log, "by-name"))
    bus.fire(Event.EPOCH_COMPLETED, None)
    bus.on(Event.FIT_STARTED, _recorder(log, "by-enum"))
    bus.fire("fit_started", None)
    assert [t for t, _ in log] == ["by-name", "by-enum"]


def test_custom_events_carry_data_and_ctl() -> None:
    bus, seen = EventBus(), []
    bus.on(("my", "event"), lambda ctl, **d: seen.append((ctl, d)))
    bus.fire(("my", "event"), "the-ctl", path="a.pt", n=3)
    bus.fire("unrelated", "the-ctl")  # no handlers: nothing happens
    assert seen == [("the-ctl", {"path": "a.pt", "n": 3})]


def test_handler_exceptions_propagate_and_stop_later_handlers() -> None:
    bus, log = EventBus(), []

    def boom(ctl, **d):
        raise KeyError("from handler")

    bus.on("e", boom)
    bus.on("e", _recorder(log, "later"))
    with pytest.raises(KeyError, match="from handler"):
        bus.fire("e", None)
    assert log == []


def test_changes_during_dispatch() -> None:
    bus, log = EventBus(), []
    handles = {}

    def first(ctl, **d):
        log.append("first")
        handles["second"].remove()  # removed while this very event is being dispatched
        bus.on("e", _recorder(log, "added"))

    bus.on("e", first)
    handles["second"] = bus.on("e", lambda ctl, **d: log.append("second"))
    bus.fire("e", None)
    assert log == ["first"]  # the removed handler is not called, the new one waits for the next firing
    bus.fire("e", None)
    assert log[1:] == ["first", ("added", {})]


@pytest.mark.parametrize("kwargs", [{"every": 0}, {"every": 1.5}, {"once": 0}, {"once": True}])
def test_bad_filters(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        EventBus().on("e", lambda ctl: None, **kwargs)


def test_handler_must_be_callable() -> None:
    with pytest.raises(TypeError, match="callable"):
        EventBus().on("e", "not a function")  # type: ignore[arg-type]


# --- events of a real loop -------------------------------------------------------------------------

_LOOP_EVENTS = [e for e in Event]


def _subscribe_all(ctl: adaprec.Controller, log: list) -> None:
    for e in _LOOP_EVENTS:
        ctl.on(e, lambda c, _e=e, **d: log.append((_e.name, d.get("step", d.get("epoch")))))


def test_event_sequence_with_optimizer(tiny_cnn: nn.Module) -> None:
    opt = torch.optim.SGD(tiny_cnn.parameters(), lr=0.01)
    data = [(torch.randn(2, 1, 8, 8), torch.randint(0, 3, (2,))) for _ in range(2)]
    log: list = []
    ctl = adaprec.Controller(tiny_cnn, policy="fixed", optimizer=opt)
    _subscribe_all(ctl, log)
    with ctl:
        for x, y in ctl.epoch(data):
            loss = F.cross_entropy(tiny_cnn(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ctl.observe(loss=loss.detach())
    names = [n for n, _ in log]
    assert names == [
        "FIT_STARTED", "ITERATION_STARTED", "PRECISION_CHANGED", "EPOCH_STARTED",
        "BEFORE_OPTIMIZER_STEP", "ITERATION_COMPLETED", "ITERATION_STARTED", "METRICS_OBSERVED",
        "BEFORE_OPTIMIZER_STEP", "ITERATION_COMPLETED", "ITERATION_STARTED", "METRICS_OBSERVED",
        "EPOCH_COMPLETED", "FIT_COMPLETED",
    ]
    steps = [s for n, s in log if n == "ITERATION_COMPLETED"]
    assert steps == [0, 1]
    assert ctl.stats["loss"] is not None and ctl.step_count == 2 and ctl.epoch_index == 1


def test_exception_event_and_restore(tiny_cnn: nn.Module) -> None:
    log: list = []
    ctl = adaprec.Controller(tiny_cnn, policy="fixed")
    ctl.on(Event.EXCEPTION_RAISED, lambda c, exception: log.append(exception))
    ctl.on(Event.FIT_COMPLETED, lambda c: log.append("completed"))
    with pytest.raises(ZeroDivisionError), ctl:
        tiny_cnn(torch.randn(1, 1, 8, 8))
        raise ZeroDivisionError("raised inside the with block")
    assert len(log) == 1 and isinstance(log[0], ZeroDivisionError)
    assert all("forward" not in m.__dict__ for m in tiny_cnn.modules())


def test_failing_handler_inside_loop_still_restores(tiny_cnn: nn.Module) -> None:
    def fail(ctl, **d):
        raise RuntimeError("handler failed")

    ctl = adaprec.Controller(tiny_cnn, policy="fixed")
    ctl.on(Event.ITERATION_COMPLETED, fail)
    with pytest.raises(RuntimeError, match="handler failed"), ctl:
        tiny_cnn(torch.randn(1, 1, 8, 8)).sum().backward()
        ctl.step()
    assert all("forward" not in m.__dict__ for m in tiny_cnn.modules())


def test_every_once_through_controller(tiny_cnn: nn.Module) -> None:
    seen: list = []
    ctl = adaprec.Controller(tiny_cnn, policy="fp32")
    ctl.on(Event.ITERATION_COMPLETED, lambda c, step: seen.append(("every2", step)), every=2)
    ctl.on(Event.ITERATION_COMPLETED, lambda c, step: seen.append(("once3", step)), once=3)
    ctl.on("checkpoint", lambda c, path: seen.append(("custom", path)))
    with ctl:
        for _ in range(5):
            ctl.step()
        ctl.fire("checkpoint", path="x.pt")
    assert seen == [("every2", 1), ("once3", 2), ("every2", 3), ("custom", "x.pt")]
