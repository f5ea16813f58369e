"""Tensors held in their storage type: compact codes that read as float32 wherever they are used.

A :class:`StoredTensor` keeps a tensor's values as the compact *parts* a codec makes of them — bf16 or
fp16 values, FP8 codes, fixed-point integer codes, block-scaled element codes plus block scales, an
8-bit block-quantized optimizer state — and presents itself to PyTorch as a float32 tensor of the
logical shape. It is a wrapper tensor subclass (``torch.Tensor._make_wrapper_subclass``, the mechanism
torchao's quantized tensors use), so it works everywhere a tensor does: as a parameter of any module,
in ``state_dict()``, in an optimizer.

How each use is served (``__torch_dispatch__``):

* **View ops** (``t``, ``transpose``, ``view``, ``permute``, ``expand``, ``slice``, ``split``, …,
  ``detach``) return another :class:`StoredTensor` that shares the parts and records the view; nothing
  is decoded. This is what keeps memory down during training: a layer computing ``x @ W.t()`` saves
  ``W.t()`` for its backward pass, and what autograd saves is this compact view, not an FP32 copy.
* **Every other op** decodes the stored tensors among its arguments into transient float32 tensors,
  runs, and returns ordinary tensors. A matmul decodes its weight inside the call and frees the copy
  when it returns (also in the backward pass, which decodes again).
* **Writes** (``copy_``, ``add_``, …, also through a view) decode, apply the op, and store the result
  back: the values are rounded into the storage format, as a write into a ``bfloat16`` tensor rounds.
  For a format with a kept scale (fixed point) an external write keeps the scale when the new values
  fit it exactly and picks a new one (:attr:`fit`) otherwise. Optimizers write through
  :meth:`StoredTensor.set_parts_` with parts they encoded themselves.
* ``clone``, ``copy.deepcopy`` and pickling give **plain float32 tensors** (parameters stay parameters):
  a checkpoint of a model or optimizer holding stored tensors is an ordinary one, which
  ``torch.load(weights_only=True)`` reads and a plain model loads.

A codec (:class:`Codec`) turns values into parts and back; formats provide theirs
(:meth:`adaprec.formats.Format.encode_stored` / :meth:`~adaprec.formats.Format.decode_stored` through
:class:`FormatCodec`), optimizer-state codecs live in :mod:`adaprec.optim.state`.

:func:`hold` turns a plain tensor (a parameter) into a stored tensor *in place* — the Python object stays
the same, so the model's modules and the optimizer keep referring to it (``torch.utils.swap_tensors``) —
and :func:`release` turns it back into a plain float32 tensor holding the stored values.

Example:
    >>> import torch
    >>> from adaprec.formats import FloatFormat
    >>> w = torch.nn.Parameter(torch.tensor([[1.0, 2.0], [3.0, 1.0 + 2**-10]]))
    >>> hold(w, FormatCodec(FloatFormat("bf16")))
    >>> w.parts[0].dtype, w.dtype, (torch.ones(1, 2) @ w.t()).tolist()   # 1 + 2**-10 rounded to bf16
    (torch.bfloat16, torch.float32, [[3.0, 4.0]])
    >>> release(w); type(w).__name__, w.tolist()
    ('Parameter', [[1.0, 2.0], [3.0, 1.0]])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

__all__ = ["Codec", "FormatCodec", "StoredTensor", "hold", "release", "is_stored", "values",
           "stored_parts", "VIEW_OPS"]

aten = torch.ops.aten


class Codec(Protocol):
    """Turns float32 values into compact parts and back.

    ``encode(x, state, noise)`` rounds ``x`` into the storage (to nearest; ``noise``, uniform in
    [0, 1) shaped like ``x``, rounds stochastically) and returns its parts; ``decode(parts, state,
    shape)`` gives the float32 values (``decode(encode(x))`` is the rounded ``x``, bit for bit).
    ``state`` is a kept per-tensor state (a fixed-point fractional length) or ``None``.
    """

    name: str

    def encode(self, x: Tensor, state: Tensor | None, noise: Tensor | None = None) -> tuple[Tensor, ...]:
        ...

    def decode(self, parts: tuple[Tensor, ...], state: Tensor | None, shape: torch.Size) -> Tensor:
        ...


class FormatCodec:
    """The codec of a storage format: the format's own ``encode_stored``/``decode_stored``.

    Example:
        >>> import torch
        >>> from adaprec.formats import FixedPoint
        >>> c = FormatCodec(FixedPoint(8))
        >>> parts = c.encode(torch.tensor([0.5, -0.25]), torch.tensor(6.0))
        >>> parts[0], c.decode(parts, torch.tensor(6.0), torch.Size([2]))
        (tensor([ 32, -16], dtype=torch.int8), tensor([ 0.5000, -0.2500]))
    """

    def __init__(self, fmt: Any) -> None:
        self.fmt = fmt
        self.name = fmt.short()

    def encode(self, x: Tensor, state: Tensor | None, noise: Tensor | None = None) -> tuple[Tensor, ...]:
        return self.fmt.encode_stored(x, state, noise)

    def decode(self, parts: tuple[Tensor, ...], state: Tensor | None, shape: torch.Size) -> Tensor:
        return self.fmt.decode_stored(parts, state, shape)

    def __repr__(self) -> str:
        return f"FormatCodec({self.name})"

    # Compared by value: torch.compile guards on a copy of the codec (see StoredTensor.__tensor_flatten__).
    def __eq__(self, other: object) -> bool:
        return isinstance(other, FormatCodec) and other.fmt == self.fmt

    def __hash__(self) -> int:
        return hash(self.fmt)


class _Base:
    """What a stored tensor and all its views share: the codec, the parts, the kept state, the shape."""

    __slots__ = ("codec", "parts", "state", "shape", "fit", "__weakref__")

    def __init__(self, codec: Codec, parts: tuple[Tensor, ...], state: Tensor | None, shape: torch.Size,
                 fit: Callable[[Tensor], Tensor | None] | None) -> None:
        self.codec, self.parts, self.state, self.shape, self.fit = codec, parts, state, shape, fit

    def decode(self) -> Tensor:
        return self.codec.decode(self.parts, self.state, self.shape)

    def store(self, x: Tensor) -> None:
        """An external write: keep the state if ``x`` is exact in it, else re-fit (module docstring)."""
        x = x.detach().to(torch.float32)
        parts = self.codec.encode(x, self.state)
        if self.state is not None and self.fit is not None:
            if not torch.equal(self.codec.decode(parts, self.state, self.shape), x):
                new = self.fit(x)
                if new is not None:
                    self.state.copy_(new.to(self.state))
                    parts = self.codec.encode(x, self.state)
        self.parts = parts


# View ops a stored tensor answers with a compact view (a list: ops returning several views).
VIEW_OPS = frozenset({
    aten.detach.default, aten.alias.default, aten.t.default, aten.transpose.int, aten.permute.default,
    aten.view.default, aten._unsafe_view.default, aten.expand.default, aten.slice.Tensor,
    aten.select.int, aten.unsqueeze.default, aten.squeeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.as_strided.default, aten.unflatten.int, aten.movedim.int, aten.split.Tensor,
    aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default, aten.narrow.default,
})
_ALIASES = frozenset({aten.detach.default, aten.alias.default})
_MULTI = frozenset({aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int, aten.chunk.default})


class StoredTensor(Tensor):
    """A float32-presenting tensor whose values live in compact parts (module docstring).

    Attributes: :attr:`codec`, :attr:`parts` (the compact tensors), :attr:`state` (kept state or
    ``None``). Build one with :meth:`from_values` or turn a tensor into one in place with :func:`hold`.
    """

    _held: _Base
    _vchain: tuple[tuple[Any, tuple, dict, int | None], ...]

    @staticmethod
    def __new__(cls, base: _Base, views: tuple = (), size: Any = None, stride: Any = None,
                offset: int = 0, requires_grad: bool = False) -> StoredTensor:
        size = base.shape if size is None else size
        kw: dict[str, Any] = {"dtype": torch.float32, "device": base.parts[0].device,
                              "requires_grad": requires_grad}
        if stride is not None:
            kw.update(strides=stride, storage_offset=offset)
        t = Tensor._make_wrapper_subclass(cls, size, **kw)
        t._held = base
        t._vchain = views
        return t

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    @classmethod
    def from_values(cls, x: Tensor, codec: Codec, state: Tensor | None = None, *,
                    noise: Tensor | None = None, fit: Callable[[Tensor], Tensor | None] | None = None,
                    requires_grad: bool = False) -> StoredTensor:
        """Encode float values ``x`` (rounded into the storage) into a new stored tensor."""
        x = x.detach().to(torch.float32)
        base = _Base(codec, codec.encode(x, state, noise), state, x.shape, fit)
        return cls(base, requires_grad=requires_grad)

    @classmethod
    def from_parts(cls, parts: tuple[Tensor, ...], codec: Codec, state: Tensor | None, shape: torch.Size, *,
                   fit: Callable[[Tensor], Tensor | None] | None = None,
                   requires_grad: bool = False) -> StoredTensor:
        """A stored tensor of logical ``shape`` over parts already encoded by ``codec``."""
        return cls(_Base(codec, tuple(parts), state, torch.Size(shape), fit), requires_grad=requires_grad)

    # -- what it holds ---------------------------------------------------------------------------
    @property
    def codec(self) -> Codec:
        return self._held.codec

    @property
    def parts(self) -> tuple[Tensor, ...]:
        return self._held.parts

    @property
    def state(self) -> Tensor | None:
        return self._held.state

    @property
    def fit(self) -> Callable[[Tensor], Tensor | None] | None:
        return self._held.fit

    def _check_dtype(self) -> None:
        if self.dtype != torch.float32:  # ``.data =`` of another dtype (model.double()) reached the wrapper
            raise RuntimeError(f"adaprec: the dtype of a stored (compact) tensor was changed to {self.dtype} "
                               "(e.g. model.double() or .half() inside a weight-storage block); convert the "
                               "model before entering the controller, or use StorageMode(compact=False)")

    def plain(self) -> Tensor:
        """The values as a new ordinary float32 tensor (decoded; views applied)."""
        self._check_dtype()
        out = self._held.decode()
        for func, args, kwargs, index in self._vchain:
            out = func(out, *args, **kwargs)
            if index is not None:
                out = out[index]
        return out

    def set_parts_(self, parts: tuple[Tensor, ...], state: Tensor | None = None,
                   codec: Codec | None = None,
                   fit: Callable[[Tensor], Tensor | None] | None = None) -> None:
        """Replace the stored parts and the kept state (and the codec and the :attr:`fit` rule, when
        given): an optimizer's write of values it encoded itself. Only on the tensor itself, not on a
        view of it."""
        if self._vchain:
            raise RuntimeError("set_parts_ writes a whole stored tensor, not a view of one")
        b = self._held
        if codec is not None:
            b.codec = codec
        if fit is not None:
            b.fit = fit
        b.parts = tuple(parts)
        b.state = state

    def nbytes_held(self) -> int:
        """Bytes of the parts and the state (each storage once)."""
        return _storage_bytes([*self.parts, self.state])

    # -- tensor protocol -------------------------------------------------------------------------
    __torch_function__ = torch._C._disabled_torch_function_impl

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"StoredTensor({self.codec.name}, {self.plain()!r})"

    def __reduce_ex__(self, protocol: int) -> Any:
        # A checkpoint holds the values as a plain tensor (parameters stay parameters): readable with
        # weights_only=True and loadable into a model that has never seen adaprec.
        plain = self.plain()
        if getattr(self, "_is_param", False):
            return torch.nn.Parameter(plain, self.requires_grad).__reduce_ex__(protocol)
        return plain.__reduce_ex__(protocol)

    def __deepcopy__(self, memo: dict) -> Tensor:
        plain = self.plain().clone()
        out: Tensor = torch.nn.Parameter(plain, self.requires_grad) if getattr(self, "_is_param", False) \
            else plain.requires_grad_(self.requires_grad)
        memo[id(self)] = out
        return out

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _ALIASES and isinstance(args[0], StoredTensor):
            a = args[0]
            return StoredTensor(a._held, a._vchain, a.shape, a.stride(), a.storage_offset())
        if func in VIEW_OPS and isinstance(args[0], StoredTensor) and \
                not any(isinstance(a, StoredTensor) for a in args[1:]):
            return args[0]._view(func, args[1:], kwargs)
        written = _written_stored(func, args, kwargs)
        if written:
            return _write(func, args, kwargs, written)
        args, kwargs = tree_map(_plain, (args, kwargs))
        return func(*args, **kwargs)

    def _view(self, func: Any, args: tuple, kwargs: dict) -> Any:
        self._check_dtype()
        meta = torch.empty(self._held.shape, device="meta")
        for f, a, k, i in self._vchain:
            meta = f(meta, *a, **k)
            if i is not None:
                meta = meta[i]
        out = func(meta, *args, **kwargs)
        if func in _MULTI:
            return [self._make_view(func, args, kwargs, i, o) for i, o in enumerate(out)]
        return self._make_view(func, args, kwargs, None, out)

    def _make_view(self, func: Any, args: tuple, kwargs: dict, index: int | None,
                   meta: Tensor) -> StoredTensor:
        return StoredTensor(self._held, self._vchain + ((func, args, kwargs, index),), meta.shape,
                            meta.stride(), meta.storage_offset())

    # torch.compile: the parts and the state are the inner tensors; the codec (compared by value), the
    # shape and the views are the context, which compiled code guards on. A format change within one
    # codec's dtype (fx6 -> fx8: int8 codes, the scale in the state tensor) therefore never recompiles.
    def __tensor_flatten__(self) -> tuple[list[str], Any]:
        names = [f"_p{i}" for i in range(len(self.parts))] + (["_st"] if self.state is not None else [])
        return names, (self._held.codec, tuple(self._held.shape), self._vchain)

    def __getattr__(self, name: str) -> Any:
        # The inner tensors by the names __tensor_flatten__ gives, read from the shared parts (never
        # cached on the instance: an optimizer replaces the parts at every step).
        if name == "_st":
            return self._held.state
        if name.startswith("_p") and name[2:].isdigit():
            return self._held.parts[int(name[2:])]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _stable_hash_for_caching(self) -> str:
        # What compiled code depends on (the context above), for torch's compiled-graph cache.
        return f"StoredTensor:{self._held.codec!r}:{tuple(self._held.shape)}:{self._vchain!r}"

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, Tensor], ctx: Any, outer_size: Any,
                             outer_stride: Any) -> StoredTensor:
        codec, shape, views = ctx
        parts = tuple(inner[f"_p{i}"] for i in range(len([k for k in inner if k.startswith("_p")])))
        base = _Base(codec, parts, inner.get("_st"), torch.Size(shape), None)
        return StoredTensor(base, views, outer_size, outer_stride)


def _plain(x: Any) -> Any:
    return x.plain() if isinstance(x, StoredTensor) else x


def _written_stored(func: Any, args: tuple, kwargs: dict) -> list[int]:
    """Positions of the stored tensors among the arguments ``func`` writes to."""
    out = []
    for i, a in enumerate(func._schema.arguments):
        info = a.alias_info
        if info is None or not info.is_write:
            continue
        v = args[i] if i < len(args) else kwargs.get(a.name)
        if isinstance(v, StoredTensor):
            out.append(i)
    return out


def _write(func: Any, args: tuple, kwargs: dict, written: list[int]) -> Any:
    if len(written) != 1 or written[0] != 0:
        raise RuntimeError(f"adaprec: {func} writes to a stored (compact) tensor in a way that is not "
                           "supported; write the whole tensor, e.g. with copy_()")
    dst: StoredTensor = args[0]
    full = dst._held.decode()
    target = full
    for f, a, k, i in dst._vchain:
        target = f(target, *a, **k)
        if i is not None:
            target = target[i]
    rest, kwargs = tree_map(_plain, (args[1:], kwargs))
    func(target, *rest, **kwargs)
    dst._held.store(full)
    return dst


def _storage_bytes(tensors: Any) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if not isinstance(t, Tensor):
            continue
        s = t.untyped_storage()
        if s.data_ptr() in seen:
            continue
        seen.add(s.data_ptr())
        total += s.nbytes()
    return total


def is_stored(t: Any) -> bool:
    """Whether ``t`` is a :class:`StoredTensor`."""
    return isinstance(t, StoredTensor)


def values(t: Tensor) -> Tensor:
    """``t``'s values as a float tensor: ``t`` itself when plain, a decoded copy when stored."""
    return t.plain() if isinstance(t, StoredTensor) else t


def stored_parts(t: Tensor) -> list[Tensor]:
    """The tensors that hold ``t``'s values: its parts and state when stored, else ``t`` itself."""
    if isinstance(t, StoredTensor):
        return [p for p in (*t.parts, t.state) if p is not None]
    return [t]


def _swap(t: Tensor, new: Tensor, owner: Any) -> None:
    # nn.RNNBase keeps weak references to its weights (for cuDNN's flat buffer), and swap_tensors refuses
    # a tensor with weak references; torch's own Module._apply drops and rebuilds them around a swap
    # the same way.
    refs = owner is not None and hasattr(owner, "_flat_weight_refs")
    if refs:
        owner._flat_weight_refs = []
    try:
        torch.utils.swap_tensors(t, new)
    finally:
        if refs:
            owner._init_flat_weights()


@torch.no_grad()
def hold(t: Tensor, codec: Codec, state: Tensor | None = None, *,
         fit: Callable[[Tensor], Tensor | None] | None = None, owner: Any = None) -> None:
    """Turn the plain float32 tensor ``t`` into a :class:`StoredTensor` in place (same Python object).

    Its gradient, ``requires_grad`` and parameter-ness are kept. ``owner``: the module holding ``t`` (so
    that an RNN's weight references are rebuilt). Raises ``RuntimeError`` when torch cannot swap the
    tensor (a live autograd graph or another weak reference holds it, e.g. DDP's gradient hooks).
    """
    if isinstance(t, StoredTensor):
        raise RuntimeError("hold(): the tensor is already stored")
    if t.dtype != torch.float32:
        raise TypeError(f"hold(): stored tensors replace float32 tensors, got {t.dtype}")
    grad = t.grad
    t.grad = None
    new = StoredTensor.from_values(t.detach(), codec, state, fit=fit, requires_grad=t.requires_grad)
    if isinstance(t, torch.nn.Parameter):
        new._is_param = True
    try:
        _swap(t, new, owner)
    except RuntimeError as e:
        raise RuntimeError(f"adaprec: cannot hold this {tuple(t.shape)} tensor in its storage type: torch "
                           f"cannot swap it in place ({e}; a live autograd graph or a wrapper such as "
                           "DistributedDataParallel refers to it). Use "
                           "adaprec.storage_mode.StorageMode(compact=False) to keep float32 tensors") from e
    finally:
        t.grad = grad


@torch.no_grad()
def release(t: Tensor, owner: Any = None) -> None:
    """Turn the stored tensor ``t`` back into a plain float32 tensor with its values, in place."""
    if not isinstance(t, StoredTensor):
        raise RuntimeError("release(): the tensor is not stored")
    grad = t.grad
    t.grad = None
    plain = t.plain()
    new: Tensor = torch.nn.Parameter(plain, t.requires_grad) if getattr(t, "_is_param", False) \
        else plain.requires_grad_(t.requires_grad)
    try:
        _swap(t, new, owner)
    finally:
        t.grad = grad
