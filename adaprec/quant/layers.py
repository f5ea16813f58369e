"""The layer table: which module types adaprec quantizes, and what it needs to know about each.

One entry (:class:`LayerKind`) per module type, the same shape for torch's layers and for third-party
ones added with :func:`register_layer`:

* ``weights`` — the parameters the layer computes with, by name (dotted names reach into child
  modules, e.g. ``"out_proj.weight"``), or a callable ``(module) -> names`` when they depend on the
  instance (an LSTM's layer count). While the layer's forward runs, reading one of them returns its
  quantized value; everywhere else it is the parameter itself.
* ``macs`` — ``(module, inputs, output) -> int``: the multiply-accumulates of the forward products of
  one call (``inputs`` are the activation inputs, after quantization; ``output`` what forward returned).
  The cost meter multiplies them by the bit-widths (docs/methods.md#bitops).
* ``inputs`` — how many leading arguments of ``forward`` are activations to quantize (by position, or
  by the parameter's name when passed as keyword); the same tensor passed twice is quantized once.
* ``output`` — for a layer returning a tuple, the index of the element whose gradient is the layer's
  error (it is quantized in the backward); a tensor output is used as it is.
* ``channel_dim`` — the weights' output-channel dimension (0 for torch's layers; 1 for Hugging Face's
  ``Conv1D``, whose weight is ``(in, out)``): weights are quantized laid out ``(out, in, ...)``, so
  per-channel formats take their channels, and block-scaled formats their blocks, where a Linear's do.
* ``axis`` — the dimension the layer's products reduce over in its activations (and weights, laid out
  as above): block-scaled formats block along it. ``-1`` (features last) for Linear-like layers, ``1``
  for convolutions (channels).

A layer whose products are not all visible from outside — an LSTM's hidden-to-hidden product runs inside
torch's kernel — has a ``forward`` of its own in its entry (:mod:`adaprec.quant.rnn`): it quantizes
every product itself and is used for layers that compute with their type's own ``forward``.

Types are matched along the MRO, most specific entry first, so subclasses of a registered type are
quantized like it (their own ``forward`` included: see :mod:`adaprec.quant.attach`). Child modules named
by a dotted weight (``MultiheadAttention.out_proj``) belong to their parent and are never layers of
their own.

Example:
    >>> import torch
    >>> class Scale(torch.nn.Module):
    ...     def __init__(self, n):
    ...         super().__init__()
    ...         self.gain = torch.nn.Parameter(torch.ones(n))
    ...     def forward(self, x):
    ...         return x * self.gain
    >>> _ = register_layer(Scale, weights=["gain"], macs=lambda m, inputs, out: out.numel())
    >>> [n for n, _ in find_layers(torch.nn.Sequential(Scale(3), torch.nn.Linear(3, 2)))]
    ['0', '1']
    >>> unregister_layer(Scale)
"""

from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from math import prod
from typing import Any

from torch import nn

from .rnn import rnn_forward, rnn_macs, rnn_weights

__all__ = ["LayerKind", "register_layer", "unregister_layer", "layer_kind", "quantizable_types",
           "find_layers", "QUANTIZABLE", "LayerFilter"]

Weights = Sequence[str] | Callable[[nn.Module], Sequence[str]]
LayerFilter = None | str | Iterable[str] | Callable[[str, nn.Module], bool]


@dataclass(frozen=True)
class LayerKind:
    """What adaprec needs to know about one layer type (see the module docstring).

    Example:
        >>> import torch
        >>> kind = layer_kind(torch.nn.Conv2d(1, 2, 3))
        >>> kind.type.__name__, kind.weights, kind.axis, kind.input_names
        ('Conv2d', ('weight',), 1, ('input',))
    """

    type: type[nn.Module]
    weights: Weights
    macs: Callable[[nn.Module, tuple[Any, ...], Any], int]
    inputs: int = 1
    output: int = 0
    channel_dim: int = 0
    axis: int = -1
    input_names: tuple[str, ...] = ()
    #: a class-level forward that quantizes the layer's inner products itself (the site's ``native``
    #: calls), for layers computing with ``type.forward``; ``None``: the hooks quantize around it
    forward: Callable[..., Any] | None = None

    def own_forward(self, module: nn.Module) -> Callable[..., Any] | None:
        """:attr:`forward`, if ``module`` computes with its type's own forward (no override in a subclass,
        no instance forward set by another library); else ``None``."""
        if self.forward is None or "forward" in module.__dict__:
            return None
        return self.forward if type(module).forward is self.type.forward else None

    def weight_names(self, module: nn.Module) -> list[str]:
        names = self.weights(module) if callable(self.weights) else self.weights
        return list(names)


_TABLE: dict[type[nn.Module], LayerKind] = {}


def register_layer(layer_type: type[nn.Module], *, weights: Weights,
                   macs: Callable[[nn.Module, tuple[Any, ...], Any], int], inputs: int = 1,
                   output: int = 0, channel_dim: int = 0, axis: int = -1,
                   replace: bool = False) -> LayerKind:
    """Teach adaprec a layer type: its weights, its cost, its activation inputs (module docstring).

    Returns the :class:`LayerKind`. Registering a type twice is an error unless ``replace=True``.

    Example:
        >>> import torch
        >>> class Bilinear2(torch.nn.Bilinear):
        ...     pass
        >>> kind = register_layer(Bilinear2, weights=["weight"], inputs=2,
        ...                       macs=lambda m, inputs, out: out.numel() * m.in1_features * m.in2_features)
        >>> kind.inputs, layer_kind(Bilinear2(2, 3, 4)) is kind
        (2, True)
        >>> unregister_layer(Bilinear2)
    """
    if not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise TypeError(f"register_layer: layer_type must be a torch.nn.Module subclass, got {layer_type!r}")
    if layer_type in _TABLE and not replace:
        raise ValueError(f"register_layer: {layer_type.__name__} is already registered; pass replace=True "
                         "to change its entry")
    if isinstance(weights, str) or not (callable(weights) or isinstance(weights, Sequence)):
        raise TypeError("register_layer: weights must be a list of parameter names (dotted names reach child "
                        f"modules) or a callable (module) -> names, got {weights!r}")
    if not callable(weights):
        weights = tuple(weights)
        if not weights or not all(isinstance(w, str) and w for w in weights):
            raise ValueError(f"register_layer: weights must name at least one parameter, got {weights!r}")
    if not callable(macs):
        raise TypeError("register_layer: macs must be a callable (module, inputs, output) -> int, "
                        f"got {macs!r}")
    for name, v, lo in (("inputs", inputs, 0), ("output", output, 0), ("channel_dim", channel_dim, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"register_layer: {name} must be an integer >= {lo}, got {v!r}")
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise ValueError(f"register_layer: axis must be an integer dimension, got {axis!r}")
    kind = LayerKind(layer_type, weights, macs, inputs, output, channel_dim, axis,
                     _forward_arg_names(layer_type, inputs))
    _TABLE[layer_type] = kind
    return kind


def unregister_layer(layer_type: type[nn.Module]) -> None:
    """Remove a type registered with :func:`register_layer` (layers already attached keep working)."""
    if _TABLE.pop(layer_type, None) is None:
        raise KeyError(f"unregister_layer: {getattr(layer_type, '__name__', layer_type)!r} is not registered")


def _forward_arg_names(layer_type: type[nn.Module], n: int) -> tuple[str, ...]:
    """Names of the first ``n`` parameters of ``forward`` (after ``self``): activations passed by keyword."""
    try:
        params = list(inspect.signature(layer_type.forward).parameters.values())[1:]
    except (TypeError, ValueError):  # a builtin or an unusual callable: positions only
        return ()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in params[:n] if p.kind in kinds)


def layer_kind(module: nn.Module) -> LayerKind | None:
    """The table entry for ``module``'s type (the most specific registered base class), or ``None``."""
    _register_optional()
    for cls in type(module).__mro__:
        kind = _TABLE.get(cls)
        if kind is not None:
            return kind
    return None


def quantizable_types() -> tuple[type[nn.Module], ...]:
    """Every registered layer type (torch's, optional integrations', and yours)."""
    _register_optional()
    return tuple(_TABLE)


# --- torch's layers --------------------------------------------------------------------------------

def _first(out: Any) -> Any:
    return out[0] if isinstance(out, tuple | list) else out


def _mha_weights(m: nn.MultiheadAttention) -> list[str]:
    qkv = ["in_proj_weight"] if m._qkv_same_embed_dim else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    return qkv + ["out_proj.weight"]


def _mha_macs(m: nn.MultiheadAttention, inputs: tuple[Any, ...], out: Any) -> dict[Any, int]:
    """Each projection costs (its input's elements) x embed_dim MACs; the out-projection reads one
    embed_dim vector per query token (keys and values may have their own length and width).

    The attention products in between are not quantized, so two operands stay FP32 and are billed so
    (docs/methods.md#bitops): the attention output that the out-projection multiplies (forward and
    weight gradient), and the errors at the q/k/v projections' outputs, which arrive from the attention
    products (their input and weight gradients)."""
    q, k, v = inputs
    e = m.embed_dim
    proj = (q.numel() + k.numel() + v.numel()) * e
    o = q.numel() * e
    if m._qkv_same_embed_dim:
        w_rg = [m.in_proj_weight.requires_grad] * 3
    else:
        w_rg = [m.q_proj_weight.requires_grad, m.k_proj_weight.requires_grad, m.v_proj_weight.requires_grad]
    x_rg = [t.requires_grad for t in (q, k, v)]
    b = m.in_proj_bias
    flows = any(w_rg) or any(x_rg) or (b is not None and b.requires_grad)  # grad reaches the attention
    sizes = [t.numel() * e for t in (q, k, v)]
    return {"forward": proj, ("forward", True, False): o,
            ("input_grad", False, True): sum(n for n, r in zip(sizes, x_rg) if r),
            "input_grad": o if flows else 0,
            ("weight_grad", False, True): sum(n for n, r in zip(sizes, w_rg) if r),
            ("weight_grad", True, False): o if m.out_proj.weight.requires_grad else 0}


register_layer(nn.Linear, weights=["weight"], macs=lambda m, i, out: out.numel() * m.in_features)
for _conv in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_layer(_conv, weights=["weight"], axis=1,
                   macs=lambda m, i, out: out.numel() * (m.in_channels // m.groups) * prod(m.kernel_size))
for _rnn in (nn.LSTM, nn.GRU, nn.RNN):
    _TABLE[_rnn] = replace(register_layer(_rnn, weights=rnn_weights, macs=rnn_macs), forward=rnn_forward)
register_layer(nn.MultiheadAttention, weights=_mha_weights, macs=_mha_macs, inputs=3)

#: torch's layer types that adaprec quantizes out of the box.
QUANTIZABLE: tuple[type[nn.Module], ...] = tuple(_TABLE)

_OPTIONAL_DONE: set[str] = set()


def _register_optional() -> None:
    """Hugging Face's ``Conv1D`` (GPT-2's layers), once ``transformers`` has been imported by the user.

    Importing transformers ourselves would cost seconds at every ``import adaprec``; a model built from
    it has imported it already.
    """
    if "hf" in _OPTIONAL_DONE:
        return
    mod = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(mod, "Conv1D", None) if mod is not None else None
    if conv1d is None:
        return
    _OPTIONAL_DONE.add("hf")
    if conv1d not in _TABLE:
        # weight is (in, out): the transpose of Linear's, so output channels run along dim 1.
        register_layer(conv1d, weights=["weight"], channel_dim=1,
                       macs=lambda m, i, out: out.numel() * m.weight.shape[0])


# --- choosing layers -------------------------------------------------------------------------------

def _owned_children(model: nn.Module) -> set[int]:
    """Modules that a registered layer reads weights from (``MultiheadAttention.out_proj``)."""
    owned: set[int] = set()
    for m in model.modules():
        kind = layer_kind(m)
        if kind is None:
            continue
        for w in kind.weight_names(m):
            if "." in w:
                owned.add(id(m.get_submodule(w.rsplit(".", 1)[0])))
    return owned


def find_layers(model: nn.Module, layers: LayerFilter = None, *,
                filter_fn: Callable[[nn.Module, str], bool] | None = None) -> list[tuple[str, nn.Module]]:
    """The quantizable layers of ``model`` in definition order, filtered by ``layers`` or ``filter_fn``.

    ``layers``: ``None`` (all), fnmatch patterns on the layer name (a leading ``!`` excludes), or a
    callable ``(name, module) -> bool``. ``filter_fn``: torchao's argument order, ``(module, fqn) ->
    bool`` (``quantize_(model, config, filter_fn=...)``); give one of the two. Children that a layer
    reads its weights from (the ``out_proj`` of a ``MultiheadAttention``) belong to it and are never
    layers of their own.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.Linear(2, 2))
        >>> [n for n, _ in find_layers(m, filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear))]
        ['2']
    """
    if filter_fn is not None:
        if layers is not None:
            raise ValueError("give layers= (name, module) or filter_fn= (module, fqn), not both")
        if not callable(filter_fn):
            raise TypeError(f"filter_fn= takes a callable (module, fqn) -> bool, got {filter_fn!r}")
    owned = _owned_children(model)
    found = [(n, m) for n, m in model.named_modules() if id(m) not in owned and layer_kind(m) is not None]
    if filter_fn is not None:
        return [(n, m) for n, m in found if _check_bool(filter_fn(m, n), "filter_fn")]
    if layers is None:
        return found
    if callable(layers):
        return [(n, m) for n, m in found if _check_bool(layers(n, m), "layers=")]
    if isinstance(layers, str):
        layers = [layers]
    usage = "layers= takes None (all), a callable (name, module) -> bool, or a list of name patterns"
    if not isinstance(layers, Iterable):
        raise TypeError(f"{usage}; got {layers!r}")
    pats = list(layers)
    if not all(isinstance(p, str) for p in pats):
        raise TypeError(f"{usage}; got {pats!r}")
    if not pats:
        raise ValueError(f"{usage}; an empty list would select no layer (pass None to quantize all)")
    inc = [p for p in pats if not p.startswith("!")]
    exc = [p[1:] for p in pats if p.startswith("!")]

    def keep(n: str) -> bool:
        if inc and not any(fnmatchcase(n, p) for p in inc):
            return False
        return not any(fnmatchcase(n, p) for p in exc)

    return [(n, m) for n, m in found if keep(n)]


def _check_bool(v: Any, what: str) -> bool:
    if not isinstance(v, bool):
        # A filter written for the other argument order usually returns a non-bool or raises; a
        # truthy non-bool (a module, a name) is almost surely that slip.
        warnings.warn(f"the {what} filter returned {type(v).__name__}, not bool; layers= callables take "
                      "(name, module), filter_fn= callables take (module, fqn)", stacklevel=3)
    return bool(v)
