"""Constraints post-process a policy's per-layer decision, so policies stay simple.

A constraint is any callable ``(layers: dict[name, Precision], ctl) -> dict[name, Precision]``. The
layer selector ``"first"`` / ``"last"`` means the first / last quantized layer in definition order;
anything else is an fnmatch pattern on layer names.

Example:
    >>> from adaprec.formats import Precision
    >>> layers = {"conv1": Precision.cpt(3, 8), "fc": Precision.cpt(3, 8)}
    >>> out = Floor("first", 8)(layers, None)
    >>> out["conv1"].weight.bits, out["fc"].weight.bits
    (8, 3)
"""

from __future__ import annotations

import dataclasses
from fnmatch import fnmatchcase
from typing import Any

from .formats import FP32, FloatFormat, Format, Precision

__all__ = ["Floor", "Clamp", "Pin", "select_layers", "raise_format"]

_ROLES = ("weight", "activation", "gradient")


def select_layers(selector: str | list[str], names: list[str]) -> list[str]:
    """Resolve ``"first"``, ``"last"``, a name, an fnmatch pattern or a list of them."""
    sels = [selector] if isinstance(selector, str) else list(selector)
    out: list[str] = []
    for s in sels:
        if s == "first":
            hit = names[:1]
        elif s == "last":
            hit = names[-1:]
        else:
            hit = [n for n in names if n == s or fnmatchcase(n, s)]
        out += [h for h in hit if h not in out]
    return out


def raise_format(fmt: Format, bits: int) -> Format:
    """``fmt`` with at least ``bits`` bits: integer/fixed formats widen, floats move up to bf16/FP32."""
    if fmt.bits >= bits:
        return fmt
    if isinstance(fmt, FloatFormat):
        return FloatFormat("bf16", fmt.rounding) if bits <= 16 else FP32()
    if bits >= 32:
        return FP32()
    return dataclasses.replace(fmt, bits=bits)


def _check_roles(roles: tuple[str, ...]) -> tuple[str, ...]:
    roles = tuple(roles)
    bad = [r for r in roles if r not in _ROLES]
    if bad or not roles:
        raise ValueError(f"roles must be a non-empty subset of {_ROLES}, got {roles}")
    return roles


class Floor:
    """Keep the selected layers at no fewer than ``bits`` bits (e.g. the first layer at 8).

    Example:
        >>> from adaprec.formats import Precision
        >>> Floor("fc", 10, roles=("gradient",))({"fc": Precision.cpt(4, 8)}, None)["fc"].short()
        'int4/int10'
    """

    def __init__(self, layers: str | list[str], bits: int, roles: tuple[str, ...] = _ROLES) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 32:
            raise ValueError(f"Floor: bits must be an integer in 1..32, got {bits!r}")
        self.layers, self.bits, self.roles = layers, bits, _check_roles(roles)

    def __call__(self, layers: dict[str, Precision], ctl: Any) -> dict[str, Precision]:
        out = dict(layers)
        for n in select_layers(self.layers, list(layers)):
            p = out[n]
            out[n] = dataclasses.replace(
                p, **{r: raise_format(getattr(p, r), self.bits) for r in self.roles})
        return out

    def __repr__(self) -> str:
        return f"Floor({self.layers!r}, {self.bits})"


class Clamp:
    """Clamp every integer/fixed-point width of every layer into ``[min_bits, max_bits]``.

    Example:
        >>> from adaprec.formats import Precision
        >>> Clamp(4, 6)({"a": Precision.cpt(3, 8)}, None)["a"].short()
        'int4/int6'
    """

    def __init__(self, min_bits: int = 1, max_bits: int = 32) -> None:
        ints = all(isinstance(b, int) and not isinstance(b, bool) for b in (min_bits, max_bits))
        if not (ints and 1 <= min_bits <= max_bits <= 32):
            raise ValueError("Clamp: need integers 1 <= min_bits <= max_bits <= 32, "
                             f"got {min_bits!r}, {max_bits!r}")
        self.min_bits, self.max_bits = min_bits, max_bits

    def _clamp(self, f: Format) -> Format:
        if f.kind not in ("int", "fixed"):
            return f
        return dataclasses.replace(f, bits=min(max(f.bits, self.min_bits), self.max_bits))

    def __call__(self, layers: dict[str, Precision], ctl: Any) -> dict[str, Precision]:
        return {n: dataclasses.replace(p, **{r: self._clamp(getattr(p, r)) for r in _ROLES})
                for n, p in layers.items()}


class Pin:
    """Always use ``precision`` on the selected layers (e.g. keep the classifier at FP32).

    Example:
        >>> from adaprec.formats import Precision
        >>> layers = {"a": Precision.cpt(3, 8), "b": Precision.cpt(3, 8)}
        >>> Pin("last", Precision.fp32())(layers, None)["b"].is_fp32
        True
    """

    def __init__(self, layers: str | list[str], precision: Precision) -> None:
        if not isinstance(precision, Precision):
            raise TypeError(f"Pin: precision must be a Precision, got {type(precision).__name__}")
        self.layers, self.precision = layers, precision

    def __call__(self, layers: dict[str, Precision], ctl: Any) -> dict[str, Precision]:
        out = dict(layers)
        for n in select_layers(self.layers, list(layers)):
            out[n] = self.precision
        return out
