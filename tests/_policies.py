"""Small policies for the integration tests: decisions that depend on what a trainer must get right."""

from __future__ import annotations

from typing import Any

from adaprec.decision import Decision
from adaprec.events import Event
from adaprec.formats import Precision
from adaprec.policies import Policy


class EpochStepBits(Policy):
    """Bits from the iteration and the number of ``EPOCH_COMPLETED`` events seen (kept in its state): a
    resumed run decides like the uninterrupted one only if the checkpoint holds every epoch end before it.
    The errors round stochastically (``Precision.cpt``), so an exact resume also needs the controller's
    rounding generator."""

    name = "epoch-step-bits"

    def __init__(self) -> None:
        self.ended = 0

    def attach(self, ctl: Any) -> None:
        super().attach(ctl)
        self._handle = ctl.on(Event.EPOCH_COMPLETED, self._on_epoch)

    def detach(self) -> None:
        self._handle.remove()
        super().detach()

    def _on_epoch(self, ctl: Any, **_: Any) -> None:
        self.ended += 1
        ctl.refresh()  # the new count applies from the next iteration on (as MuPPET's switches do)

    def decide(self, ctl: Any) -> Decision:
        return Decision.uniform(Precision.cpt(3 + (ctl.step_count + 3 * self.ended) % 6, 8))

    def state_dict(self) -> dict[str, Any]:
        return {"ended": self.ended}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ended = int(state["ended"])


class LossBits(Policy):
    """Bits picked from the latest observed training loss: a decision that depends on a rank-local value."""

    name = "loss-bits"

    def decide(self, ctl: Any) -> Decision:
        loss = ctl.stats.get("loss")
        bits = 6 if loss is None else 3 + int(float(loss) * 1e4) % 5
        return Decision.uniform(Precision.cpt(bits, 8))
