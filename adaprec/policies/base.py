"""The policy protocol and the two policies of the foundation: FP32 and Fixed."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..decision import Decision
from ..formats import Format, Precision, parse_format

if TYPE_CHECKING:  # pragma: no cover
    from ..controller import Controller

__all__ = ["Policy", "FP32Policy", "Fixed"]


class Policy:
    """Base class: a policy reacts to events and emits a :class:`~adaprec.decision.Decision`.

    The controller calls :meth:`attach` on entry (subscribe to the events you need with
    ``ctl.on``), :meth:`decide` before every iteration, :meth:`eval_decision` for ``model.eval()``,
    and :meth:`detach` on exit. Everything that must survive a restart goes into :meth:`state_dict`.

    Example:
        >>> import torch, adaprec
        >>> class HalfThenFull(Policy):
        ...     name = "half_then_full"
        ...     def decide(self, ctl):
        ...         bits = 4 if ctl.step_count < 10 else 8
        ...         return Decision.uniform(Precision.cpt(bits, 8))
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> with adaprec.Controller(model, policy=HalfThenFull()) as ctl:
        ...     _ = model(torch.randn(2, 4)); ctl.step()
        >>> ctl.history[0].layers["0"].weight.bits
        4
    """

    name: str = "policy"
    #: whether the policy needs ``total_steps`` from the controller
    needs_total_steps: bool = False

    def attach(self, ctl: Controller) -> None:
        self.ctl = ctl

    def detach(self) -> None:
        self.ctl = None

    def decide(self, ctl: Controller) -> Decision:
        raise NotImplementedError

    def eval_decision(self, ctl: Controller) -> Decision | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state but got keys {sorted(state)}")

    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this policy (for recipe files and tuning)."""
        return {}

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        raise NotImplementedError(f"policy {cls.name!r} defines no search space")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class FP32Policy(Policy):
    """No quantization at all: the controller only observes (cost meter, statistics, logs).

    Example:
        >>> FP32Policy().decide(None).default.is_fp32
        True
    """

    name = "fp32"

    def decide(self, ctl: Controller) -> Decision:
        return _FP32


_FP32 = Decision.uniform(Precision.fp32())


def _as_format(spec: Any, role: str) -> Format:
    return parse_format(spec, role=role)


class Fixed(Policy):
    """A static precision for the whole run.

    ``bits``: forward (weight and activation) bits or format; ``grad_bits``: backward, defaults to
    ``bits``; ``act_bits`` defaults to ``bits``. Integer widths follow the CPT conventions
    (per-channel weights, per-tensor activations, stochastic rounding of errors); strings such as
    ``"fx8"``, ``"bf16"`` or ``"fp8_e4m3"`` select other formats.

    Example:
        >>> Fixed(bits=8, grad_bits=8).decide(None).default.short()
        'int8/int8'
        >>> Fixed(bits="bf16").decide(None).default.gradient.name
        'bf16'
    """

    name = "fixed"

    def __init__(self, bits: int | str | Format = 8, grad_bits: int | str | Format | None = None,
                 act_bits: int | str | Format | None = None) -> None:
        self.bits, self.grad_bits, self.act_bits = bits, grad_bits, act_bits
        w = _as_format(bits, "weight")
        a = _as_format(bits if act_bits is None else act_bits, "activation")
        g = _as_format(bits if grad_bits is None else grad_bits, "gradient")
        self._decision = Decision.uniform(Precision(w, a, g))

    def decide(self, ctl: Controller) -> Decision:
        return self._decision

    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"bits": self.bits}
        if self.grad_bits is not None:
            cfg["grad_bits"] = self.grad_bits
        if self.act_bits is not None:
            cfg["act_bits"] = self.act_bits
        return cfg

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {"bits": trial.suggest_int("bits", 2, 16),
                "grad_bits": trial.suggest_int("grad_bits", 4, 16)}
