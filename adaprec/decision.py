"""What a policy emits: a default :class:`~adaprec.formats.Precision` plus per-layer overrides.

Example:
    >>> from adaprec.decision import Decision
    >>> from adaprec.formats import Precision
    >>> d = Decision.uniform(Precision.cpt(4, 8)).with_override("fc*", Precision.fp32())
    >>> d.for_layer("fc").is_fp32, d.for_layer("conv1").weight.bits
    (True, 4)
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from .formats import Precision

__all__ = ["Decision"]


@dataclass(frozen=True)
class Decision:
    """A default precision and ``(pattern, precision)`` overrides; the last matching override wins.

    Patterns are layer names (as in ``model.named_modules()``) or fnmatch patterns.

    Example:
        >>> Decision.uniform(Precision.fp32()) == Decision.uniform(Precision.fp32())
        True
    """

    default: Precision
    overrides: tuple[tuple[str, Precision], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.default, Precision):
            raise TypeError(f"Decision.default must be a Precision, got {type(self.default).__name__}")
        ov = tuple((str(k), v) for k, v in (self.overrides.items() if isinstance(self.overrides, dict)
                                            else self.overrides))
        for k, v in ov:
            if not isinstance(v, Precision):
                raise TypeError(f"override for {k!r} must be a Precision, got {type(v).__name__}")
        object.__setattr__(self, "overrides", ov)

    @classmethod
    def uniform(cls, precision: Precision) -> Decision:
        return cls(precision)

    def with_override(self, pattern: str, precision: Precision) -> Decision:
        return Decision(self.default, self.overrides + ((pattern, precision),))

    def for_layer(self, name: str) -> Precision:
        out = self.default
        for pattern, prec in self.overrides:
            if pattern == name or fnmatchcase(name, pattern):
                out = prec
        return out

    def resolve(self, names: list[str]) -> dict[str, Precision]:
        if not self.overrides:
            return dict.fromkeys(names, self.default)
        return {n: self.for_layer(n) for n in names}
