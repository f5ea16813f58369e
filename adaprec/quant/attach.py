"""How a quantization site is attached to a layer, and removed again without a trace.

The mechanism: **module hooks** for the activations and the error, and a **cached dynamic subclass**
for the weights, for copies and for device moves.

* A forward pre-hook quantizes the activation inputs (straight-through) and computes the quantized
  weights of this call; a forward hook (``always_call=True``, first in line) marks the output so that
  the error flowing back into it is quantized, counts the call's multiply-accumulates and drops the
  quantized weights — also when the forward raised. Hooks run on every path through
  ``module(...)``: the class's own ``forward``, a subclass's ``forward``, and an instance ``forward``
  put there by another library (accelerate's hooks, ``torch.func``-style wrappers) alike.
* The layer's class is swapped for a subclass made once per layer type (``module.__class__ =
  Quantized[type]``, cached; same ``__name__``). Its properties return the quantized weights while
  the layer's forward runs and the parameters themselves everywhere else, so whatever code reads
  ``self.weight`` inside the forward computes with the quantized value, and the optimizer,
  ``state_dict()`` (same keys: DESIGN.md contract 2), weight initialisation and ``.grad`` see the
  parameters. LSTM/GRU/RNN kernels read ``_flat_weights``; for them that list is the property.
* ``__reduce_ex__`` of the subclass makes every ``copy.deepcopy``, ``copy.copy`` and pickle taken
  inside the block a **plain** module of the original class with the current weights and without
  adaprec's hooks (so ``torch.save(model)``, ``AveragedModel``/EMA copies and a deepcopy all give a
  plain FP32 model). ``_apply`` moves the site's state (format parameters, activation range) along
  with the parameters on ``.to(device)``/``.cuda()``/``.to_empty()``; it stays float32 under dtype
  moves (the kernels compute in float32, see :mod:`adaprec.quant.site`).
* ``detach`` removes the hooks, puts the original class back and deletes the two attributes it
  added: the module is exactly what it was (DESIGN.md contract 1).

Why not the alternatives. An instance ``forward`` (adaprec 0.1) is bypassed by another library's
instance ``forward`` and by a subclass's, and its closures made deepcopy compute with the original's
weights and pickling fail. ``torch.nn.utils.parametrize`` renames the weight's ``state_dict`` key.
Swapping tensors into ``_parameters`` for each call (``torch.func.functional_call``) makes every code
path see a non-Parameter for the duration and needs the RNN flat-weight cache rebuilt twice per call.
Hooks plus a property cost a few microseconds of Python per layer call in eager mode (measured in
``benchmarks/overhead.py``), and under ``torch.compile`` they trace into the graph without breaks; the
bit-widths stay in tensors, so changing them never recompiles (DESIGN.md contract 3).

**Activation checkpointing.** ``torch.utils.checkpoint`` runs a second forward of the checkpointed
layers during the backward pass (both ``use_reentrant=True`` and ``False``). A forward that starts while
autograd is executing a backward is that recompute — the same test ``torch.utils.checkpoint`` itself
makes (``torch._C._current_graph_task_id() != -1``). It quantizes exactly as the first forward did (for
stochastic forward rounding the site replays the rounding generator's state saved at that forward, in
call order; torch's checkpoint restores only torch's own generators) but neither bills its forward
product again nor folds the batch range into the activation range a second time. (A reentrant
checkpoint runs the first forward without autograd: that forward bills its forward product only, and
the recompute bills the backward products; see ``LayerSite.count``.)

Example:
    >>> import copy, torch
    >>> from adaprec.formats import Precision
    >>> from adaprec.quant.layers import layer_kind
    >>> from adaprec.quant.site import LayerSite
    >>> lin = torch.nn.Linear(4, 3)
    >>> site = LayerSite("fc", lin, kind=layer_kind(lin))
    >>> att = attach(lin, site)
    >>> site.set(Precision.cpt(2, 8))
    >>> x = torch.randn(5, 4)
    >>> q = lin(x)                                   # quantized weights and inputs
    >>> plain = copy.deepcopy(lin)                   # a plain Linear with the same weights
    >>> fp32 = torch.nn.functional.linear(x, lin.weight, lin.bias)
    >>> type(plain) is torch.nn.Linear, torch.equal(plain(x), fp32), torch.equal(q, fp32)
    (True, True, False)
    >>> att.remove(); type(lin) is torch.nn.Linear, sorted(vars(lin)) == sorted(vars(plain))
    (True, True)
"""

from __future__ import annotations

import copyreg
import inspect
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from .site import LayerSite

__all__ = ["attach", "Attachment", "is_attached", "site_of"]

SITE = "_adaprec_site"        # on a layer: its LayerSite
OWNER = "_adaprec_weights"    # on a module holding quantized weights: {parameter name: (site, key)}
_KEYS = (SITE, OWNER)
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def is_attached(module: nn.Module) -> bool:
    """Whether some controller's site is attached to ``module`` now."""
    return SITE in module.__dict__


def site_of(module: nn.Module) -> LayerSite | None:
    return module.__dict__.get(SITE)


# --- the hooks -------------------------------------------------------------------------------------

def _in_backward() -> bool:
    """True while autograd executes a backward pass: a forward now is a checkpoint recompute."""
    if torch.compiler.is_compiling() or _GRAPH_TASK_ID is None:
        return False
    return _GRAPH_TASK_ID() != -1


_GRAPH_TASK_ID = getattr(torch._C, "_current_graph_task_id", None)


def _act(q, x: Any, training: bool, update: bool) -> Any:
    if isinstance(x, PackedSequence):  # RNN input: quantize the packed values, keep the layout
        return x._replace(data=q(x.data, training, update=update))
    if isinstance(x, Tensor) and x.is_floating_point():
        return q(x, training, update=update)
    return x


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    site: LayerSite = module.__dict__[SITE]
    training = module.training
    site.recomputing = training and _in_backward()
    if site.native[training]:  # this call's forward quantizes by itself (hardware routes)
        return None
    r = site.roles(training)
    token = site.begin_rounding(training) if site.sr_forward else None
    out = None
    if r.activation.active:
        # Activations before weights: stochastic rounding draws in the order the hardware routes use.
        out = _quantize_inputs(site, r.activation, args, kwargs, training, not site.recomputing)
    # Weights stored on the grid of the weight format (weight storage) are already quantized: the layer
    # reads the parameters themselves. Held compactly, they reach the layer's ops as compact tensors, so
    # what the ops save for the backward pass stays compact (adaprec.compact).
    if r.weight.active and r.weight.fmt != site.stored_weight:
        dim = site.kind.channel_dim
        site.w = {spec.key: r.weight(spec.raw(), channel_dim=dim) for spec in site.weights}
    site.end_rounding(token)
    return out


def _quantize_inputs(site: LayerSite, q, args: tuple, kwargs: dict, training: bool,
                     update: bool) -> tuple[tuple, dict]:
    kind = site.kind
    if kind.inputs == 1 and args and not kwargs:  # the common case (Linear, conv, RNN), kept cheap
        return (_act(q, args[0], training, update),) + args[1:], kwargs
    # Quantize each distinct tensor once and keep identities: self-attention passes one tensor as
    # query, key and value, and the attention code checks ``query is key`` for its packed projection.
    seen: list[tuple[Any, Any]] = []

    def one(x: Any) -> Any:
        for orig, qx in seen:
            if orig is x:
                return qx
        qx = _act(q, x, training, update)
        seen.append((x, qx))
        return qx

    n = min(kind.inputs, len(args))
    if n:
        args = tuple(one(a) for a in args[:n]) + tuple(args[n:])
    if kwargs:
        for name in kind.input_names[n:]:
            if name in kwargs:
                kwargs = dict(kwargs)
                kwargs[name] = one(kwargs[name])
    return args, kwargs


def _inputs(kind, args: tuple, kwargs: dict) -> tuple:
    got = list(args[:kind.inputs])
    for name in kind.input_names[len(got):]:
        if name in kwargs:
            got.append(kwargs[name])
    return tuple(got)


def _mark_error(g, out: Any, index: int) -> Any:
    if isinstance(out, PackedSequence):
        return out._replace(data=g.grad(out.data))
    if isinstance(out, Tensor):
        return g.grad(out) if out.is_floating_point() else out
    if isinstance(out, tuple | list) and len(out) > index:
        items = list(out)
        items[index] = _mark_error(g, items[index], 0)
        if isinstance(out, list):
            return items
        return type(out)(*items) if hasattr(out, "_fields") else tuple(items)  # a namedtuple, a tuple
    return out


def _post_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    site: LayerSite = module.__dict__[SITE]
    site.w = None  # first: also when the forward raised (always_call), so no quantized weight leaks out
    if output is None:
        return None
    training = module.training
    kind = site.kind
    if training:  # the site bills the products that run (a recompute: its backward's only)
        inputs = _inputs(kind, args, kwargs)
        site.count(kind.macs(module, inputs, output), inputs)
    if site.native[training]:
        return None
    g = site.roles(training).gradient
    if not g.active:
        return None
    return _mark_error(g, output, kind.output)


# --- the dynamic subclasses ------------------------------------------------------------------------

_CLASSES: dict[tuple[Any, ...], type] = {}


def _raw_getter(cls: type, pname: str) -> Callable[[nn.Module], Any]:
    """How ``cls`` without adaprec's classes produces ``module.<pname>``: a property of the class (a
    parametrized layer's weight), an instance attribute (the old hook-based ``weight_norm`` keeps the
    computed weight there), or ``nn.Module.__getattr__`` (a registered parameter)."""
    for c in cls.__mro__:
        if "_adaprec_base" in vars(c):
            continue  # ours
        static = vars(c).get(pname)
        if isinstance(static, property) and static.fget is not None:
            return static.fget
        if static is not None:
            break

    def raw(m: nn.Module) -> Any:
        d = m.__dict__
        return d[pname] if pname in d else nn.Module.__getattr__(m, pname)

    return raw


class _WeightSpec:
    """One quantized weight of a layer: its key, the module holding it and how to read it raw."""

    __slots__ = ("key", "owner", "pname", "cls", "getter")

    def __init__(self, key: str, owner: nn.Module, pname: str) -> None:
        self.key, self.owner, self.pname = key, owner, pname
        self.cls = type(owner)
        self.getter = _raw_getter(self.cls, pname)

    def raw(self) -> Any:
        owner = self.owner
        if type(owner) is not self.cls:  # a class put on top inside the block (parametrize)
            self.cls = type(owner)
            self.getter = _raw_getter(self.cls, self.pname)
        return self.getter(owner)


def _weight_property(base: type, pname: str) -> property:
    raw = _raw_getter(base, pname)

    def fget(self: nn.Module) -> Any:
        site, key = self.__dict__[OWNER][pname]
        w = site.w
        if w is not None and key in w:
            return w[key]
        return raw(self)

    static = inspect.getattr_static(base, pname, None)
    if isinstance(static, property):
        fset, fdel = static.fset, static.fdel
    else:
        # nn.Module.__setattr__ handles Parameters itself; plain values (weight_norm's computed
        # weight) reach object.__setattr__, i.e. here: keep them where the class without us would.
        def fset(self: nn.Module, value: Any) -> None:
            self.__dict__[pname] = value

        def fdel(self: nn.Module) -> None:
            if pname not in self.__dict__:
                raise AttributeError(pname)
            del self.__dict__[pname]

    return property(fget, fset, fdel, doc=f"{pname}: quantized while the layer's forward runs (adaprec)")


def _flat_weights_get(self: nn.Module) -> list[Any]:
    raw = self.__dict__["_flat_weights"]
    site = self.__dict__.get(SITE)
    w = None if site is None else site.w
    if w is None:
        return raw
    return [w.get(n, t) for n, t in zip(self._flat_weights_names, raw)]


def _flat_weights_set(self: nn.Module, value: list[Any]) -> None:
    self.__dict__["_flat_weights"] = value


def _strip(state: Any, hook_ids: frozenset[int]) -> Any:
    """A module's pickled state without adaprec's attributes and hooks."""
    slots = None
    if isinstance(state, tuple) and len(state) == 2:
        state, slots = state
    if not isinstance(state, dict):
        return state if slots is None else (state, slots)
    state = {k: v for k, v in state.items() if k not in _KEYS}
    for name in _HOOK_DICTS:
        d = state.get(name)
        if d is not None and hook_ids and any(i in d for i in hook_ids):
            state[name] = type(d)((i, h) for i, h in d.items() if i not in hook_ids)
    return state if slots is None else (state, slots)


def _newobj_plain(base: type, *args: Any) -> Any:
    """Reconstructor for a plain module whose class takes ``__new__`` arguments (rare)."""
    return base.__new__(base, *args)


def _reduce_ex(self: nn.Module, protocol: int) -> Any:
    # Copies and pickles of a quantized module are plain modules of the original class. The pickler
    # refuses ``copyreg.__newobj__`` with a class other than ``type(obj)``, so a plain instance is made
    # by ``copyreg._reconstructor`` (standard library: loading needs no adaprec), then given the state.
    cls = type(self)
    base = cls._adaprec_base
    rv = base.__reduce_ex__(self, protocol)
    if not isinstance(rv, tuple) or len(rv) < 3:
        return rv
    fn, args, state, *rest = rv
    if fn is copyreg.__newobj__ and args and args[0] is cls:
        fn, args = (copyreg._reconstructor, (base, object, None)) if len(args) == 1 else \
            (_newobj_plain, (base,) + tuple(args[1:]))
    elif fn is copyreg._reconstructor and args and args[0] is cls:  # protocols 0 and 1
        args = (base,) + tuple(args[1:])
    site = self.__dict__.get(SITE)
    return (fn, args, _strip(state, site.hook_ids if site is not None else frozenset()), *rest)


def _apply(self: nn.Module, fn: Callable[..., Any], recurse: bool = True) -> nn.Module:
    out = type(self)._adaprec_base._apply(self, fn, recurse)
    site = self.__dict__.get(SITE)
    if site is not None:
        site.follow(self)
    return out


def _quantized_class(base: type, props: tuple[str, ...], layer: bool,
                     forward: Callable[..., Any] | None) -> type:
    key = (base, props, layer, forward)
    cls = _CLASSES.get(key)
    if cls is not None:
        return cls
    ns: dict[str, Any] = {"__module__": base.__module__, "__qualname__": base.__qualname__,
                          "_adaprec_base": base, "__reduce_ex__": _reduce_ex}
    for pname in props:
        ns[pname] = _weight_property(base, pname)
    if layer:
        ns["_apply"] = _apply
        if issubclass(base, nn.RNNBase):
            # The RNN kernels read this cached list, not the attributes (see nn.RNNBase.forward).
            ns["_flat_weights"] = property(_flat_weights_get, _flat_weights_set)
    if forward is not None:
        ns["forward"] = forward
    cls = type(base.__name__, (base,), ns)
    _CLASSES[key] = cls
    return cls


def _unstack(cls: type, base: type) -> bool:
    """Take our class out from under a class made on top of it inside the block (e.g.
    ``torch.nn.utils.parametrize`` makes one per module): its bases become ``base`` again."""
    for c in cls.__mro__[1:]:
        if "_adaprec_base" in vars(c) and c._adaprec_base is base:
            owner = next((k for k in cls.__mro__ if c in k.__bases__), None)
            if owner is None:
                return False
            try:
                owner.__bases__ = tuple(base if b is c else b for b in owner.__bases__)
            except TypeError:
                return False
            return True
    return True  # our class is not there any more (someone set __class__ back): nothing to undo


# --- attaching -------------------------------------------------------------------------------------

class Attachment:
    """A site attached to a layer (returned by :func:`attach`); :meth:`remove` restores the layer.

    Example:
        >>> import torch
        >>> from adaprec.quant.site import LayerSite
        >>> lin = torch.nn.Linear(2, 2)
        >>> att = attach(lin, LayerSite("l", lin))
        >>> type(lin) is torch.nn.Linear, is_attached(lin)
        (False, True)
        >>> att.remove(); type(lin) is torch.nn.Linear, is_attached(lin)
        (True, False)
    """

    def __init__(self, layer: nn.Module, site: LayerSite, owners: list[tuple[nn.Module, type]],
                 handles: list[Any]) -> None:
        self.layer, self.site, self.owners, self.handles = layer, site, owners, handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for module, base in reversed(self.owners):
            cls = type(module)
            if getattr(cls, "_adaprec_base", None) is base and "_adaprec_base" in vars(cls):
                module.__class__ = base
            elif not _unstack(cls, base):
                warnings.warn(f"adaprec: the class of {base.__name__} layer {self.site.name!r} was "
                              "replaced inside the Controller's block in a way adaprec cannot undo; its "
                              "quantized properties stay on it", stacklevel=2)
            for k in _KEYS:
                module.__dict__.pop(k, None)
        self.owners = []
        self.site.w = None


def attach(layer: nn.Module, site: LayerSite, forward: Callable[..., Any] | None = None) -> Attachment:
    """Attach ``site`` (built with the layer's :class:`~adaprec.quant.layers.LayerKind`) to ``layer``.

    ``forward``: an optional class-level forward for the layer's dynamic subclass (the hardware
    backend's routes); the hooks run around it as around any forward.
    """
    if is_attached(layer):
        raise RuntimeError(f"layer {site.name!r} already has an adaprec site attached")
    kind = site.kind
    names = kind.weight_names(layer)
    by_owner: dict[int, tuple[nn.Module, list[tuple[str, str]]]] = {}
    where = []
    for key in names:
        path, _, pname = key.rpartition(".")
        owner = layer.get_submodule(path) if path else layer
        if is_attached(owner) or (owner is not layer and OWNER in owner.__dict__):
            raise RuntimeError(f"layer {site.name!r}: {key!r} belongs to a module another site quantizes")
        by_owner.setdefault(id(owner), (owner, []))[1].append((pname, key))
        where.append((key, owner, pname))
    if id(layer) not in by_owner:
        by_owner[id(layer)] = (layer, [])
    rnn = isinstance(layer, nn.RNNBase)
    owners: list[tuple[nn.Module, type]] = []
    handles: list[Any] = []
    att = Attachment(layer, site, owners, handles)
    try:
        for owner, pairs in by_owner.values():
            is_layer = owner is layer
            props = () if (is_layer and rnn) else tuple(p for p, _ in pairs)
            base = type(owner)
            cls = _quantized_class(base, props, is_layer, forward if is_layer else None)
            owner.__dict__[OWNER] = {p: (site, k) for p, k in pairs}
            if is_layer:
                owner.__dict__[SITE] = site
            owners.append((owner, base))
            owner.__class__ = cls
        # After the class swap: a spec re-reads its getter only when the class changes again, so a
        # compiled forward sees a constant class (no recompilation).
        site.weights = [_WeightSpec(key, owner, pname) for key, owner, pname in where]
        handles.append(layer.register_forward_pre_hook(_pre_hook, with_kwargs=True))
        handles.append(layer.register_forward_hook(_post_hook, with_kwargs=True, always_call=True,
                                                   prepend=True))
        site.hook_ids = frozenset(h.id for h in handles)
    except BaseException:
        att.remove()
        raise
    return att
