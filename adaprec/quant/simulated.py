"""The simulated backend: fake quantization of quantizable layers in pure PyTorch.

For every selected layer the backend installs an instance-level ``forward`` that quantizes the input
activation (STE), the weight (STE) and — in the backward — the error arriving at the layer's output
(stochastic rounding for CPT/MuPPET gradients), then calls the layer's own computation. Why not a
parametrization? ``torch.nn.utils.parametrize`` renames the weight's ``state_dict`` key, which DESIGN.md
contract 2 forbids; an instance ``forward`` leaves keys, parameters and buffers untouched and is gone
again after :meth:`SimulatedBackend.detach`.

Supported layers: ``Conv1d/2d/3d``, ``Linear``, ``LSTM``/``GRU``/``RNN`` (all weight matrices; the
input sequence and the output sequence's gradient) and ``MultiheadAttention`` (in-projection and
out-projection weights; query/key/value inputs; the attention output's gradient — the attention
products themselves are not quantized).

Example:
    >>> import torch
    >>> from adaprec.formats import Precision
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    >>> be = SimulatedBackend()
    >>> names = be.attach(model, find_layers(model))
    >>> be.apply({"0": Precision.cpt(2, 8)})
    >>> y = model(torch.randn(3, 8)); be.detach(); names
    ['0']
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable
from fnmatch import fnmatchcase
from math import prod

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from torch.nn.utils.stateless import _reparametrize_module

from ..formats import Precision
from .site import LayerSite

__all__ = ["QUANTIZABLE", "find_layers", "SimulatedBackend", "LayerFilter"]

QUANTIZABLE: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.LSTM, nn.GRU, nn.RNN, nn.MultiheadAttention,
)

LayerFilter = None | Iterable[str] | Callable[[str, nn.Module], bool]


def find_layers(model: nn.Module, layers: LayerFilter = None) -> list[tuple[str, nn.Module]]:
    """The quantizable layers of ``model`` in definition order, filtered by ``layers``.

    ``layers``: ``None`` (all), fnmatch patterns on the layer name (a leading ``!`` excludes), or a
    callable ``(name, module) -> bool``. The ``out_proj`` of a ``MultiheadAttention`` belongs to
    its parent (the attention module never calls it), so it is never a layer of its own.
    """
    mha_children = {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}
    found = [
        (n, m) for n, m in model.named_modules()
        if isinstance(m, QUANTIZABLE) and id(m) not in mha_children
    ]
    custom = [n for n, m in found if not _stock_forward(m)]
    if custom:
        warnings.warn(f"adaprec leaves layers {custom} in FP32: their class overrides forward(), which "
                      "the simulated backend would replace", stacklevel=2)
        found = [(n, m) for n, m in found if n not in custom]
    if layers is None:
        return found
    if callable(layers):
        return [(n, m) for n, m in found if layers(n, m)]
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


def _stock_forward(m: nn.Module) -> bool:
    """Whether a Linear/Conv layer still computes with torch's own ``forward``.

    The backend re-implements these two forwards (quantized operands, then the same functional call),
    so a subclass with its own ``forward`` (weight standardisation, LoRA…) cannot be wrapped without
    changing what it computes. RNNs and attention wrap the class's own forward and are always fine.
    """
    if isinstance(m, nn.Linear):
        return type(m).forward is nn.Linear.forward
    if isinstance(m, nn.modules.conv._ConvNd):
        return type(m).forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)
    return True


# --- the instance forwards -------------------------------------------------------------------------

def _weight(roles, w: Tensor) -> Tensor:
    return roles.weight(w) if roles.weight.active else w


def _act(roles, x: Tensor, training: bool) -> Tensor:
    if not roles.activation.active:
        return x
    if isinstance(x, PackedSequence):  # RNN input: quantize the packed values, keep the layout
        return x._replace(data=roles.activation(x.data, training))
    return roles.activation(x, training)


def _out(roles, y: Tensor) -> Tensor:
    if not roles.gradient.active:
        return y
    if isinstance(y, PackedSequence):
        return y._replace(data=roles.gradient.grad(y.data))
    return roles.gradient.grad(y)


def _linear_forward(site: LayerSite, module: nn.Linear, x: Tensor) -> Tensor:
    training = module.training
    r = site.roles(training)
    y = nn.functional.linear(_act(r, x, training), _weight(r, module.weight), module.bias)
    if training:
        site.count(y.numel() * module.in_features)
    return _out(r, y)


def _conv_forward(site: LayerSite, module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    training = module.training
    r = site.roles(training)
    y = module._conv_forward(_act(r, x, training), _weight(r, module.weight), module.bias)
    if training:
        site.count(y.numel() * (module.in_channels // module.groups) * prod(module.kernel_size))
    return _out(r, y)


def _rnn_forward(site: LayerSite, module: nn.RNNBase, orig, x, *args, **kwargs):
    training = module.training
    r = site.roles(training)
    saved = module._flat_weights
    # The RNN kernels read this list; swapping it (and restoring it) leaves the parameters alone.
    module._flat_weights = [
        _weight(r, w) if (w is not None and n.startswith("weight")) else w
        for n, w in zip(module._flat_weights_names, saved)
    ]
    try:
        out = orig(_act(r, x, training), *args, **kwargs)
    finally:
        module._flat_weights = saved
    if training:
        tokens = x.data.shape[0] if isinstance(x, PackedSequence) else x.numel() // module.input_size
        per_token = sum(w.numel() for n, w in zip(module._flat_weights_names, saved)
                        if n.startswith("weight"))
        site.count(tokens * per_token)
    return (_out(r, out[0]),) + tuple(out[1:])


def _mha_forward(site: LayerSite, module: nn.MultiheadAttention, orig, query, key, value, *args, **kwargs):
    training = module.training
    r = site.roles(training)
    names = ["in_proj_weight"] if module._qkv_same_embed_dim else \
        ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    params = {n: _weight(r, getattr(module, n)) for n in names}
    params["out_proj.weight"] = _weight(r, module.out_proj.weight)
    # Self-attention passes one tensor three times: quantize it once and keep the identities, which
    # the attention code checks to take its packed (single-matmul) in-projection.
    q = _act(r, query, training)
    k = q if key is query else _act(r, key, training)
    v = k if value is key else (q if value is query else _act(r, value, training))
    with _reparametrize_module(module, params):
        out = orig(q, k, v, *args, **kwargs)
    if training:
        # Each projection costs (its input's elements) x embed_dim MACs; the out-projection reads one
        # embed_dim vector per query token. Keys and values may have their own length (cross-attention).
        site.count((2 * query.numel() + key.numel() + value.numel()) * module.embed_dim)
    return (_out(r, out[0]),) + tuple(out[1:])


def _make_forward(site: LayerSite, module: nn.Module):
    if isinstance(module, nn.Linear):
        return lambda x: _linear_forward(site, module, x)
    if isinstance(module, nn.modules.conv._ConvNd):
        return lambda x: _conv_forward(site, module, x)
    orig = type(module).forward.__get__(module)
    if isinstance(module, nn.RNNBase):
        return lambda x, *a, **k: _rnn_forward(site, module, orig, x, *a, **k)
    if isinstance(module, nn.MultiheadAttention):
        return lambda q, k, v, *a, **kw: _mha_forward(site, module, orig, q, k, v, *a, **kw)
    raise TypeError(f"{type(module).__name__} is not a quantizable layer type")


# --- the backend -----------------------------------------------------------------------------------

class SimulatedBackend:
    """Attach sites to layers, apply per-layer precisions, detach without a trace.

    ``macs`` is one float64 tensor with a slot per layer; every training forward adds its
    multiply-accumulates to its slot in place (shapes are known on the host, so this never syncs and
    never recompiles a compiled model). The cost meter reads and clears it once per step.

    Example:
        >>> import torch
        >>> be = SimulatedBackend()
        >>> m = torch.nn.Linear(3, 3)
        >>> be.attach(m, [("", m)])
        ['']
        >>> be.detach(); "forward" in m.__dict__
        False
    """

    name = "simulated"

    def __init__(self) -> None:
        self.sites: dict[str, LayerSite] = {}
        self.macs: Tensor | None = None
        self._saved: list[tuple[nn.Module, object]] = []
        self._holds_fastpath = False

    def attach(self, model: nn.Module, layers: list[tuple[str, nn.Module]]) -> list[str]:
        taken = [n for n, m in layers if m in _ATTACHED]
        if taken:
            raise RuntimeError(f"layers {taken} are already quantized by another active adaprec "
                               "Controller; leave that one first")
        device = next(model.parameters()).device
        self.macs = torch.zeros(len(layers), dtype=torch.float64, device=device)
        try:
            for i, (name, module) in enumerate(layers):
                site = LayerSite(name, module, self.macs[i])
                self.sites[name] = site
                self._saved.append((module, module.__dict__.get("forward", _MISSING)))
                module.forward = _make_forward(site, module)
                _ATTACHED.add(module)
            if any(isinstance(m, nn.TransformerEncoderLayer) for m in model.modules()):
                _fastpath_off()
                self._holds_fastpath = True
        except BaseException:
            self.detach()
            raise
        return list(self.sites)

    def apply(self, train: dict[str, Precision], eval: dict[str, Precision] | None = None) -> None:
        for name, prec in train.items():
            self.sites[name].set(prec, None if eval is None else eval.get(name))

    def set_rng(self, key: int) -> None:
        """Point every site's stochastic rounding at the generator ``key`` (the controller's own)."""
        for site in self.sites.values():
            site.set_rng(key)

    def detach(self) -> None:
        for module, fwd in reversed(self._saved):
            _ATTACHED.discard(module)
            if fwd is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = fwd
        self._saved.clear()
        self.sites.clear()
        if self._holds_fastpath:
            self._holds_fastpath = False
            _fastpath_release()

    def state_dict(self) -> dict:
        return {n: s.state() for n, s in self.sites.items()}

    def load_state_dict(self, d: dict) -> None:
        for n, st in d.items():
            if n in self.sites:
                self.sites[n].load_state(st)


_MISSING = object()

# In eval mode without autograd, nn.TransformerEncoderLayer runs a fused C++ "fast path" that reads its
# weights directly and never calls the Linear/MultiheadAttention forwards, so quantization would be
# skipped silently. The switch is global: keep it off while any backend on such a model is attached
# and put the user's setting back when the last one detaches.
_FASTPATH = {"holders": 0, "saved": True}


def _fastpath_off() -> None:
    if _FASTPATH["holders"] == 0:
        _FASTPATH["saved"] = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
    _FASTPATH["holders"] += 1


def _fastpath_release() -> None:
    _FASTPATH["holders"] -= 1
    if _FASTPATH["holders"] == 0:
        torch.backends.mha.set_fastpath_enabled(_FASTPATH["saved"])
_ATTACHED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # layers some backend currently owns
