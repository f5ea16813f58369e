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

import logging
import math
from fnmatch import fnmatchcase
from typing import Any

from torch import nn

from .formats import Format, Precision

__all__ = ["Floor", "Clamp", "Pin", "ClassifierFloor", "classifier_bits", "find_classifier",
           "select_layers", "raise_format", "check_selector_matches"]

log = logging.getLogger("adaprec")

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


def _check_selector(selector: Any, what: str) -> str | list[str]:
    """A layer selector must be a non-empty name/pattern or a non-empty list of them."""
    sels = [selector] if isinstance(selector, str) else selector
    if isinstance(sels, list | tuple) and sels and all(isinstance(s, str) and s for s in sels):
        return selector if isinstance(selector, str) else list(selector)
    raise TypeError(f"{what}: layers must be a layer name, a pattern, 'first', 'last' or a list of them, "
                    f"got {selector!r}")


def check_selector_matches(selector: str | list[str], names: list[str], what: str) -> None:
    """Raise if a name or pattern of ``selector`` matches none of the quantized layers ``names``.

    Example:
        >>> check_selector_matches(["first", "fc"], ["conv", "fc"], "Floor")
        >>> check_selector_matches("fc2", ["conv", "fc"], "Floor")
        Traceback (most recent call last):
        ...
        ValueError: Floor: 'fc2' matches no quantized layer; the quantized layers are ['conv', 'fc']
    """
    sels = [selector] if isinstance(selector, str) else list(selector)
    for s in sels:
        if not select_layers(s, names):
            raise ValueError(f"{what}: {s!r} matches no quantized layer; the quantized layers are {names}")


def raise_format(fmt: Format, bits: int) -> Format:
    """``fmt`` with at least ``bits`` bits: the lowest level of its ladder that has them
    (:meth:`~adaprec.formats.Format.at_least`; integer/fixed formats widen, floats move up to bf16/FP32,
    block-scaled formats climb mxfp4 -> mxfp6 -> mxfp8 -> bf16)."""
    return fmt.at_least(bits)


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
        self.layers, self.bits, self.roles = _check_selector(layers, "Floor"), bits, _check_roles(roles)

    def validate(self, names: list[str]) -> None:
        """Called by the Controller before it touches the model: every selector must match a layer."""
        check_selector_matches(self.layers, names, repr(self))

    def __call__(self, layers: dict[str, Precision], ctl: Any) -> dict[str, Precision]:
        out = dict(layers)
        for n in select_layers(self.layers, list(layers)):
            p = out[n]
            out[n] = p.map(lambda f: f.at_least(self.bits), self.roles)
        return out

    def __repr__(self) -> str:
        return f"Floor({self.layers!r}, {self.bits})"


class Clamp:
    """Clamp every free bit-width (integer, fixed point) of every layer into ``[min_bits, max_bits]``;
    formats without a free width (floats, block-scaled) are left as they are
    (:meth:`~adaprec.formats.Format.clamp`).

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

    def __call__(self, layers: dict[str, Precision], ctl: Any) -> dict[str, Precision]:
        return {n: p.map(lambda f: f.clamp(self.min_bits, self.max_bits)) for n, p in layers.items()}


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
        self.layers, self.precision = _check_selector(layers, "Pin"), precision

    def validate(self, names: list[str]) -> None:
        """Called by the Controller before it touches the model: every selector must match a layer."""
        check_selector_matches(self.layers, names, f"Pin({self.layers!r})")

    def __call__(self, layers: dict[str, Precision], ctl: Any) -> dict[str, Precision]:
        out = dict(layers)
        for n in select_layers(self.layers, list(layers)):
            out[n] = self.precision
        return out


def classifier_bits(num_classes: int, margin: int = 2) -> int:
    """The classifier floor (docs/methods.md#classifier-floor): ``ceil(log2 C) + 1 + margin`` bits, at most
    32.

    A ``b``-bit error grid keeps the non-target errors ``δ ≈ 1/C`` only if ``b >= log2 C + 1``; the
    margin adds room for the range of the error tensor.

    Example:
        >>> [classifier_bits(c) for c in (2, 10, 100, 1000)]
        [4, 7, 10, 13]
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 (a softmax over fewer than two classes has "
                         f"nothing to floor), got {num_classes!r}")
    if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
        raise ValueError(f"margin must be an int >= 0, got {margin!r}")
    return min(32, math.ceil(math.log2(num_classes)) + 1 + margin)


def find_classifier(model: nn.Module, quantized: list[str]) -> str | None:
    """The auto-detected classifier of ``model``: the name of its *last quantizable module in definition
    order* (``Linear``, ``Conv*``, ``LSTM``/``GRU``/``RNN``, ``MultiheadAttention`` and registered
    types; quantized or not), if
    that module is an ``nn.Linear`` with ``out_features >= 2`` and is among the ``quantized`` layers;
    otherwise ``None`` (no floor).

    So a head left in FP32 (``layers=["!fc"]``) is not replaced by a hidden layer, a model ending in a
    1x1-convolution or an RNN gets no floor, and a language model's decoder (a Linear over the
    vocabulary) counts as a classifier. Definition order is the order of ``named_modules()``: a model
    that registers its head before its body must name it (``ClassifierFloor("head")``).

    Example:
        >>> m = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 10))
        >>> find_classifier(m, ["0", "2"]), find_classifier(m, ["0"])
        ('2', None)
    """
    from .quant.layers import find_layers  # late: keeps ``import adaprec.constraints`` free of the backend

    found = find_layers(model)
    last: tuple[str, nn.Module] | None = found[-1] if found else None
    if last is None:
        return None
    name, module = last
    if isinstance(module, nn.Linear) and module.out_features >= 2 and name in quantized:
        return name
    return None


class ClassifierFloor:
    """Keep the classifier at ``ceil(log2 C) + 1 + margin`` bits forward and backward
    (docs/methods.md#classifier-floor).

    On by default in :class:`adaprec.Controller` (``classifier_floor=True``); pass
    ``classifier_floor=False`` to drop it, or ``classifier_floor=ClassifierFloor(...)`` to configure it.

    Args:
        layer: ``None`` finds the classifier (:func:`find_classifier`: the model's last quantizable
            module, if it is a quantized ``nn.Linear`` with at least two outputs); or a quantized layer's
            name (or ``"last"``) to name it.
        margin: extra bits above ``ceil(log2 C) + 1``.
        num_classes: ``C``; ``None`` reads the layer's ``out_features``.
        roles: which formats the floor raises; forward (weight, activation) and backward (gradient).

    Only the classifier is touched, and only formats below the floor are raised (integer and fixed
    point widen; floats narrower than the floor move to bf16/FP32, see :func:`raise_format`). The first
    time it raises a given decision it logs at INFO on the ``"adaprec"`` logger (repeats at DEBUG);
    :attr:`raised` counts the decisions it raised.

    Example:
        >>> import torch
        >>> from adaprec.formats import Precision
        >>> floor = ClassifierFloor("fc", num_classes=100)
        >>> out = floor({"conv": Precision.cpt(4, 8), "fc": Precision.cpt(4, 8)}, None)
        >>> floor.bits, out["fc"].short(), out["conv"].short()
        (10, 'int10/int10', 'int4/int8')
    """

    def __init__(self, layer: str | None = None, margin: int = 2, *, num_classes: int | None = None,
                 roles: tuple[str, ...] = _ROLES) -> None:
        if layer is not None and (not isinstance(layer, str) or not layer):
            raise TypeError(f"ClassifierFloor: layer must be a layer name, 'last' or None (auto-detect), "
                            f"got {layer!r}")
        classifier_bits(2, margin)  # validates margin
        if num_classes is not None:
            classifier_bits(num_classes, margin)
        self.layer, self.margin, self.num_classes = layer, margin, num_classes
        self.roles = _check_roles(roles)
        self.raised = 0
        self._resolved: tuple[Any, str | None, int | None] | None = None  # (cache key, name, bits)
        self._logged: set[tuple[str, str]] = set()

    @property
    def bits(self) -> int | None:
        """The floor in force (``None`` before it has seen a model, or when no classifier was found)."""
        if self._resolved is not None:
            return self._resolved[2]
        return None if self.num_classes is None else classifier_bits(self.num_classes, self.margin)

    @property
    def target(self) -> str | None:
        """The layer the floor applies to (``None`` until resolved, or when none was found)."""
        return None if self._resolved is None else self._resolved[1]

    def validate(self, names: list[str]) -> None:
        """Called by the Controller before it touches the model: a named classifier must be a layer."""
        if self.layer is not None and self.layer != "last" and self.layer not in names:
            raise ValueError(f"ClassifierFloor: {self.layer!r} is not a quantized layer; the quantized "
                             f"layers are {names}")

    def _resolve(self, names: list[str], ctl: Any) -> tuple[str | None, int | None]:
        model = getattr(ctl, "model", None)
        key = (id(model), tuple(names))
        if self._resolved is not None and self._resolved[0] == key:
            return self._resolved[1], self._resolved[2]
        if self.layer is None:
            if model is None:
                raise ValueError("ClassifierFloor(layer=None) finds the classifier from the controller's "
                                 "model; used on its own, name the layer and num_classes")
            name = find_classifier(model, names)
            if name is None:
                log.debug("adaprec: no classifier floor: the model's last quantizable module is not a "
                          "quantized nn.Linear with >= 2 outputs")
        else:
            hit = select_layers(self.layer, names) if self.layer == "last" else \
                [n for n in names if n == self.layer]
            if not hit:
                raise ValueError(f"ClassifierFloor: {self.layer!r} is not a quantized layer; the quantized "
                                 f"layers are {names}")
            name = hit[0]
        bits = None
        if name is not None:
            c = self.num_classes
            if c is None:
                module = dict(model.named_modules()).get(name) if model is not None else None
                if not isinstance(module, nn.Linear):
                    kind = "unknown" if module is None else type(module).__name__
                    raise ValueError(f"ClassifierFloor: cannot read the number of classes of layer {name!r} "
                                     f"({kind}); pass num_classes=")
                c = module.out_features
                if c < 2:
                    raise ValueError(f"ClassifierFloor: layer {name!r} has out_features={c}; the floor is "
                                     "for softmax classifiers with >= 2 classes (pass another layer)")
            bits = classifier_bits(c, self.margin)
        self._resolved = (key, name, bits)
        return name, bits

    def __call__(self, layers: dict[str, Precision], ctl: Any) -> dict[str, Precision]:
        name, bits = self._resolve(list(layers), ctl)
        if name is None or bits is None:
            return layers
        p = layers[name]
        new = p.map(lambda f: f.at_least(bits), self.roles)
        if new == p:
            return layers
        self.raised += 1
        what = (name, p.short())
        level = logging.DEBUG if what in self._logged else logging.INFO
        self._logged.add(what)
        log.log(level, "adaprec: classifier floor raised layer %r from %s to %s (%d bits = ceil(log2 C) + 1 "
                "+ %d)", name, p.short(), new.short(), bits, self.margin)
        out = dict(layers)
        out[name] = new
        return out

    def __repr__(self) -> str:
        return f"ClassifierFloor(layer={self.layer!r}, margin={self.margin})"


def make_classifier_floor(spec: bool | ClassifierFloor | None) -> ClassifierFloor | None:
    """Read the Controller's ``classifier_floor=`` argument: ``True`` (default settings), ``False``/``None``
    (off) or a :class:`ClassifierFloor`."""
    if spec is True:
        return ClassifierFloor()
    if spec is False or spec is None:
        return None
    if isinstance(spec, ClassifierFloor):
        return spec
    raise TypeError(f"classifier_floor must be True, False or an adaprec.constraints.ClassifierFloor, "
                    f"got {spec!r}")
