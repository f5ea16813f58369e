"""The controller's state inside a ``torch.distributed.checkpoint`` (DCP) checkpoint: FSDP2, torchrun.

``ControllerState(ctl)`` is a ``Stateful`` entry for ``dcp.save``/``dcp.load``, next to the sharded model
and optimizer state that ``torch.distributed.checkpoint.state_dict.get_state_dict`` gives. Each rank
stores its own controller state under its own key (``rank<r>``): the policy, counters, history and cost
are the same on every rank, but the stochastic-rounding generator and the activation ranges are the
rank's own, and an exact resume needs them. Resume with the same number of processes.

The state is one opaque entry per rank (a few kilobytes, serialised with ``torch.save``), so it loads
into a controller whose state has another shape (a fresh one, before :meth:`~adaprec.Controller.start`).
Loading gives it to :meth:`adaprec.Controller.load_state_dict`, checked there; before the start it is
applied when the controller starts.

Example (one process; under torchrun every rank runs the same lines):
    >>> import tempfile, torch, adaprec
    >>> import torch.distributed.checkpoint as dcp
    >>> from adaprec.integrations.dcp import ControllerState
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> with adaprec.Controller(model, policy=adaprec.policies.Fixed(bits=6)) as ctl:
    ...     model(torch.randn(2, 4)).sum().backward(); ctl.step()
    ...     path = tempfile.mkdtemp()
    ...     _ = dcp.save({"model": model.state_dict(), "adaprec": ControllerState(ctl)}, checkpoint_id=path,
    ...                  no_dist=True)
    >>> model2 = torch.nn.Sequential(torch.nn.Linear(4, 4))
    >>> ctl2 = adaprec.Controller(model2, policy=adaprec.policies.Fixed(bits=6))
    >>> state = {"model": model2.state_dict(), "adaprec": ControllerState(ctl2)}
    >>> dcp.load(state, checkpoint_id=path, no_dist=True)   # fills the model's tensors, gives ctl2 its state
    >>> with ctl2:
    ...     ctl2.step_count, ctl2.history == ctl.history
    (1, True)
"""

from __future__ import annotations

import io
from typing import Any

import torch

from ..controller import Controller

__all__ = ["ControllerState"]


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class ControllerState:
    """A ``torch.distributed.checkpoint`` ``Stateful`` holding this rank's controller state (module
    docstring). ``state_dict()``/``load_state_dict()`` are what ``dcp.save``/``dcp.load`` call.

    Example:
        >>> import torch, adaprec
        >>> ctl = adaprec.Controller(torch.nn.Linear(2, 2), policy="fixed")
        >>> list(ControllerState(ctl).state_dict())            # this rank's key
        ['rank0']
    """

    def __init__(self, controller: Controller) -> None:
        if not isinstance(controller, Controller):
            raise TypeError(f"ControllerState needs an adaprec.Controller, got {type(controller).__name__}")
        self.controller = controller

    def state_dict(self) -> dict[str, bytes]:
        # Bytes are a leaf for DCP: the controller's nested state is not flattened into entries whose
        # shapes a fresh controller could not mirror when loading.
        buf = io.BytesIO()
        torch.save(self.controller.state_dict(), buf)
        return {f"rank{_rank()}": buf.getvalue()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        key = f"rank{_rank()}"
        blob = state_dict.get(key)
        if not isinstance(blob, bytes):
            raise ValueError(f"ControllerState: the checkpoint holds no controller state for {key} (it has "
                             f"{sorted(state_dict)}); resume with as many processes as saved it")
        # adaprec's state types are allow-listed for weights_only loading.
        self.controller.load_state_dict(torch.load(io.BytesIO(blob), weights_only=True))
