"""Weight storage mode: keep each layer's weights *stored* in the policy's weight format (no FP32 master).

Under the simulated backend a policy's weight format is normally a fake quantization: the optimizer
updates FP32 master weights and every forward rounds a copy. In storage mode the weights themselves
live in the decided format (docs/methods.md#kahan-update): the optimizer — :class:`~adaprec.optim.KahanSGD` or
:class:`~adaprec.optim.Compensated` — writes every update back into that format (with Kahan
compensation, plain or stochastic rounding, as it was built), and whenever the controller changes a
layer's weight format (``Event.PRECISION_CHANGED``) the layer's stored weights are recombined and
re-split, ``w_hp = w + c; w = Q_w(w_hp); c = w_hp - w``, layer by layer.

Held in their storage type (``compact=True``, the default). From the first decision to the end of
the block, every parameter the optimizer holds in a format with a compact form is a
:class:`~adaprec.compact.StoredTensor`: bf16/fp16 values, FP8 codes, ``int8``/``int16``/``int32``
fixed-point codes with the kept scale, block codes with block scales (MX, NVFP4). The parameter objects
stay the same (the optimizer, the modules and ``state_dict()`` keys see no difference) and read as
float32 tensors wherever they are used; a layer whose weights lie on its weight format's own grid
(:meth:`~adaprec.formats.Format.keeps_stored`) skips its weight quantization and computes with the
stored tensor directly, so the tensors its operations save for the backward pass stay compact too.
The compensation is held in its own format, gradients arrive in float32 (as many bytes as a float32
parameter, between ``backward()`` and ``zero_grad()``). Leaving the block — normally or by an exception
— gives the model float32 parameters holding the stored values. ``compact=False`` keeps float32
tensors holding the format's values (the simulation: same numbers, no memory saved).

Which tensors: the weight tensors the backend quantizes (``weight`` of Linear/Conv, every ``weight_*``
of an RNN, the in- and out-projection weights of attention). Everything else the optimizer holds
(biases, norms, embeddings, layers left out of quantization) stays in the optimizer's own
``weight_format``. Weights the optimizer does not hold (frozen) are left alone.

How a decision's weight format becomes a storage format (:func:`storage_spec`):

* ``FixedPoint(b)`` -> ``b``-bit fixed point whose fractional length is chosen at each split and then
  kept (the backend's fixed point re-picks its scale every call; a stored weight cannot). Widths above
  25 bits cannot be held exactly in float32 and are stored as FP32;
* ``FloatFormat`` (bf16, fp16, fp8) -> the same float format (FP8 on its raw grid); ``FP32`` -> FP32;
  block-scaled formats -> the same format, blocks along the tensor's last dimension;
* ``IntFormat(b)`` (CPT's min-max grid, re-fitted to the tensor at every call) has no fixed grid to
  store on. ``int_formats="fixed"`` (default) stores ``max(b, 2)``-bit fixed point — the same width — and
  the backend still rounds that to its min-max grid in each forward; ``int_formats="error"`` refuses.

The compensation is the optimizer's ``comp_format`` (default: as wide as the weight) unless
``StorageMode(comp_format=...)`` says otherwise (Kahan optimizers only). Storage follows the training
decision; a policy's separate evaluation precision only changes the fake-quantized forward in
``model.eval()``. ``ctl.report()`` measures the bytes held (:func:`memory_section`).

Example:
    >>> import torch, adaprec
    >>> import torch.nn.functional as F
    >>> from adaprec.optim import KahanSGD
    >>> _ = torch.manual_seed(0)
    >>> model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    >>> opt = KahanSGD(model.parameters(), lr=0.1, weight_format="fp32")
    >>> policy = adaprec.policies.Fixed(bits="fx4", act_bits="fp32", grad_bits="fp32")
    >>> with adaprec.Controller(model, policy=policy, optimizer=opt, weight_storage=True) as ctl:
    ...     x, y = torch.randn(4, 8), torch.randint(0, 10, (4,))
    ...     F.cross_entropy(model(x), y).backward(); opt.step()
    ...     held = model[0].weight.parts[0].dtype      # int8 codes inside the block
    >>> held, type(model[0].weight).__name__        # a float32 Parameter again afterwards
    (torch.int8, 'Parameter')
    >>> ctl.weight_storage.formats       # the classifier floor keeps layer "2" at 7 bits
    {'0': 'fx4', '2': 'fx7'}
    >>> r = ctl.report()                 # biases stay in the optimizer's own format (fp32 here)
    >>> r["weight_storage"], r["memory_per_param"]["weight"]   # measured bytes per parameter
    ('fx4, fx7; others fp32', 1.274)
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .events import Event
from .formats import Format, Precision
from .optim import optimizer_memory
from .optim._stored import StoredParamsMixin, storage_defaults
from .optim.storage import MASTER_SIGNIFICAND_BITS, significand_bits, storage_format

__all__ = ["StorageMode", "storage_spec", "layer_weights", "memory_section", "make_storage_mode",
           "INT_FORMAT_RULES"]

log = logging.getLogger("adaprec")

#: What storage mode does with a min-max integer weight format: same-width fixed point, or refuse.
INT_FORMAT_RULES = ("fixed", "error")


def storage_spec(fmt: Format, int_formats: str = "fixed") -> str:
    """The storage format (canonical name) that holds weights decided to be in ``fmt``.

    Example:
        >>> from adaprec.formats import FixedPoint, FloatFormat, IntFormat, FP32
        >>> [storage_spec(f) for f in (FixedPoint(12), FloatFormat("bf16"), IntFormat(4), FP32())]
        ['fx12', 'bf16', 'fx4', 'fp32']
    """
    if int_formats not in INT_FORMAT_RULES:
        raise ValueError(f"int_formats must be one of {INT_FORMAT_RULES}, got {int_formats!r}")
    stored = fmt.storage()
    if int_formats == "error" and stored.short() != fmt.with_rounding("nearest").short():
        raise ValueError(
            f"weight_storage: the policy's weight format {fmt.short()} cannot hold stored weights on its own "
            f"grid (it would be stored as {stored.short()}); use a fixed-point or float policy, or "
            "StorageMode(int_formats='fixed') to store it that way")
    # A float32 tensor holds at most 24 significand bits exactly: wider formats are stored as FP32.
    return "fp32" if stored.significand_bits > MASTER_SIGNIFICAND_BITS else stored.short()


def layer_weights(module: nn.Module) -> list[Tensor]:
    """The weight tensors of a quantizable layer that the backend quantizes (biases excluded).

    Example:
        >>> [tuple(w.shape) for w in layer_weights(nn.LSTM(3, 4))]
        [(16, 3), (16, 4)]
    """
    if isinstance(module, nn.RNNBase):
        ws = [getattr(module, n) for n in module._flat_weights_names if n.startswith("weight")]
    elif isinstance(module, nn.MultiheadAttention):
        names = ["in_proj_weight"] if module._qkv_same_embed_dim else \
            ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
        ws = [getattr(module, n) for n in names] + [module.out_proj.weight]
    else:
        ws = [getattr(module, "weight", None)]
    return [w for w in ws if isinstance(w, Tensor)]


class StorageMode:
    """Apply the controller's per-layer weight format to the optimizer's *stored* weights.

    Turn it on with ``adaprec.Controller(..., optimizer=opt, weight_storage=True)`` (or pass a
    configured ``StorageMode``), where ``opt`` is an :class:`~adaprec.optim.KahanSGD` or an
    :class:`~adaprec.optim.Compensated` wrapper. It can also be attached by hand before or inside the
    ``with`` block (``StorageMode().attach(ctl)``); attached inside, it applies the formats in force
    at once.

    Args:
        comp_format: compensation format of every stored layer (needs ``update="kahan"`` optimizer
            groups); ``None`` keeps the ``comp_format`` the optimizer was built with, whose ``None`` is
            the weight's width (a fixed-point one is dropped for float or FP32 weights).
        int_formats: ``"fixed"`` stores an ``IntFormat(b)`` decision as ``b``-bit fixed point;
            ``"error"`` refuses such policies (module docstring).
        compact: hold the parameters in their storage type inside the block (default), or keep
            float32 tensors holding the formats' values (``False``: the same numbers, no memory
            saved). Where torch cannot swap the parameters in place (under DDP, whose reducer refers
            to them), weight storage warns and goes on as with ``False``.

    :attr:`formats` maps each stored layer to its storage format; :attr:`resplits` counts the
    layer format changes applied (the first split of each layer included). Per-layer formats are
    per-parameter overrides in the optimizer (:meth:`~adaprec.optim.KahanSGD.set_param_format`),
    saved with ``opt.state_dict()``.

    Example:
        >>> StorageMode(int_formats="error")
        StorageMode(comp_format=None, int_formats='error', compact=True)
    """

    def __init__(self, *, comp_format: object = None, int_formats: str = "fixed",
                 compact: bool = True) -> None:
        if not isinstance(compact, bool):
            raise TypeError(f"compact must be True or False, got {compact!r}")
        if int_formats not in INT_FORMAT_RULES:
            raise ValueError(f"int_formats must be one of {INT_FORMAT_RULES}, got {int_formats!r}")
        if comp_format is not None:
            c = storage_format(comp_format, role="compensation")
            if significand_bits(c) > MASTER_SIGNIFICAND_BITS:
                raise ValueError(
                    f"weight storage: compensation format {c.short()} is wider than the FP32 master it "
                    f"replaces ({significand_bits(c)} significand bits, float32 holds "
                    f"{MASTER_SIGNIFICAND_BITS}); use at most fx{MASTER_SIGNIFICAND_BITS + 1}, a float "
                    "format, 'fp32', or None (the weight's width)")
            comp_format = c.short()
        self.comp_format = comp_format
        self.int_formats = int_formats
        self.compact = compact
        self.formats: dict[str, str] = {}
        self.memory_at_release: Any = None
        self.resplits = 0
        self.ctl: Any = None
        self._weights: dict[str, list[Tensor]] = {}
        self._handle: Any = None

    def __repr__(self) -> str:
        return (f"StorageMode(comp_format={self.comp_format!r}, int_formats={self.int_formats!r}, "
                f"compact={self.compact!r})")

    # ------------------------------------------------------------------ wiring
    def attach(self, ctl: Any) -> StorageMode:
        """Check the controller's optimizer and model, then follow its precision changes."""
        if self.ctl is not None:
            raise RuntimeError("this StorageMode is already attached to a controller; make a new one")
        opt = ctl.optimizer
        if opt is None:
            raise ValueError("weight storage needs the optimizer: adaprec.Controller(model, ..., "
                             "optimizer=opt, weight_storage=True) with opt an adaprec.optim.KahanSGD or "
                             "adaprec.optim.Compensated(inner)")
        if not isinstance(opt, StoredParamsMixin):
            raise TypeError(
                f"weight storage needs an optimizer that writes to low-precision storage — "
                f"adaprec.optim.KahanSGD or adaprec.optim.Compensated(inner) — got "
                f"{type(opt).__module__}.{type(opt).__name__}, which updates FP32 weights (a master copy); "
                f"wrap it, e.g. Compensated({type(opt).__name__}(...)) for SGD/Adam/AdamW/RMSprop/Adagrad")
        in_model = {id(p) for p in ctl.model.parameters()}
        held = [p for g in opt.param_groups for p in g["params"]]
        foreign = [i for i, p in enumerate(held) if id(p) not in in_model]
        if foreign:
            raise ValueError(f"weight storage: {len(foreign)} of the optimizer's {len(held)} parameters "
                             f"(positions {foreign[:5]}{'…' if len(foreign) > 5 else ''}) are not parameters "
                             "of the model; build the optimizer from model.parameters()")
        if self.comp_format is not None:
            modes = sorted({g["update"] for g in opt.param_groups} - {"kahan"})
            if modes:
                raise ValueError(f"weight storage: comp_format={self.comp_format!r} needs update='kahan' "
                                 f"in every optimizer group, found update={modes}")
        held_ids = {id(p) for p in held}
        modules = dict(ctl.model.named_modules())
        self._weights = {}
        for name in ctl.layer_names:
            ws = [w for w in layer_weights(modules[name]) if id(w) in held_ids]
            if ws:
                self._weights[name] = ws
        self.ctl = ctl
        self._handle = ctl.on(Event.PRECISION_CHANGED, self._on_change)
        if getattr(ctl, "_current", None):  # attached inside the block: catch up now
            self.apply(ctl.current)
        return self

    def detach(self) -> None:
        """Stop following precision changes (the stored weights stay as they are)."""
        if self._handle is not None:
            self._handle.remove()
        self._handle, self.ctl = None, None

    def release(self) -> None:
        """Give the model float32 parameters holding the stored values (the controller calls this when
        its block ends, also after an exception); the memory held until then stays in the report."""
        ctl = self.ctl
        if ctl is None:
            return
        opt = ctl.optimizer
        for name in self._weights:
            site = getattr(ctl.backend, "sites", {}).get(name)
            if site is not None:
                site.stored_weight = None
        if opt.holds_params:
            self.memory_at_release = optimizer_memory(opt)
            opt.release_params()

    def _on_change(self, ctl: Any, new: dict[str, Precision] | None = None, **_: Any) -> None:
        if new:
            self.apply(new)

    # ------------------------------------------------------------------ the work
    def target_formats(self, layers: dict[str, Precision]) -> dict[str, str]:
        """The storage format of every stored layer under the per-layer precisions ``layers``."""
        return {name: storage_spec(layers[name].weight, self.int_formats)
                for name in self._weights if name in layers}

    @torch.no_grad()
    def apply(self, layers: dict[str, Precision]) -> None:
        """Re-split every layer whose storage format differs from the one ``layers`` decide."""
        opt = self.ctl.optimizer
        targets = self.target_formats(layers)
        # A tensor shared by two layers (tied weights) is stored in the finer of their formats.
        per_param: dict[int, tuple[Tensor, str]] = {}
        for name, spec in targets.items():
            for w in self._weights[name]:
                have = per_param.get(id(w))
                if have is None or _finer(spec, have[1]):
                    per_param[id(w)] = (w, spec)
        # The compensation: this mode's comp_format, else the one the optimizer group was built with
        # (None there too: as wide as the weight).
        group_comp = {id(p): g.get("comp_format") for g in opt.param_groups for p in g["params"]}
        wanted: dict[tuple[str, str | None], list[Tensor]] = {}
        for w, spec in per_param.values():
            comp = self.comp_format
            if comp is None and group_comp[id(w)] is not None:
                comp = group_comp[id(w)]
                if comp.startswith("fx") and not spec.startswith("fx"):
                    comp = None  # the group's fixed-point compensation cannot hang off a float weight
            wanted.setdefault((spec, comp), []).append(w)
        for spec, comp in wanted:
            if comp is not None:
                storage_defaults(spec, comp, "kahan")  # a clear error before anything changes
        for (spec, comp), ws in wanted.items():
            stale = [w for w in ws if opt.param_format(w) != (spec, comp)]
            if stale:
                opt.set_param_format(stale, spec, comp)
        changed = [n for n, s in targets.items() if self.formats.get(n) != s]
        self.resplits += len(changed)
        if changed:
            log.debug("adaprec: weight storage re-split %s", {n: targets[n] for n in changed})
        self.formats.update(targets)
        if self.compact and not opt.holds_params:
            try:
                opt.hold_params(self.ctl.model)
            except RuntimeError as e:  # e.g. DDP's reducer refers to the parameters: keep float32 tensors
                opt.release_params()
                self.compact = False
                warnings.warn("adaprec: weight storage cannot hold the parameters in their storage types "
                              f"here: torch cannot swap them in place ({e.__cause__ or e}); it goes on with "
                              "float32 tensors holding the stored values (the same numbers, no memory "
                              "saved). StorageMode(compact=False) asks for that upfront", stacklevel=2)
        # A layer whose weights lie on its weight format's own grid needs no weight quantization.
        sites = getattr(self.ctl.backend, "sites", {})
        for name, spec in targets.items():
            site = sites.get(name)
            if site is None:
                continue
            fmt = layers[name].weight
            keeps = all(opt.param_format(w) is not None and opt.param_format(w)[0] == spec
                        for w in self._weights[name])
            site.stored_weight = fmt if keeps and spec == fmt.storage().short() and \
                fmt.keeps_stored(site.kind.axis) else None


def _finer(a: str, b: str) -> bool:
    return significand_bits(storage_format(a)) > significand_bits(storage_format(b))


def _bits_then_name(spec: str) -> tuple[int, str]:
    return storage_format(spec).bits, spec


def make_storage_mode(spec: bool | StorageMode | None) -> StorageMode | None:
    """Read the Controller's ``weight_storage=`` argument: ``False``/``None`` (off), ``True`` (default
    :class:`StorageMode`) or a configured :class:`StorageMode`."""
    if spec is True:
        return StorageMode()
    if spec is False or spec is None:
        return None
    if isinstance(spec, StorageMode):
        return spec
    raise TypeError(f"weight_storage must be True, False or an adaprec.storage_mode.StorageMode, "
                    f"got {spec!r}")


# ---------------------------------------------------------------------------------------------- memory
def memory_section(ctl: Any) -> Callable[[], dict[str, Any]]:
    """A report section: the measured bytes per parameter of weights, compensation and optimizer state
    (:func:`adaprec.optim.optimizer_memory`), and of the gradients held at that moment.

    Measured when the report is made; for weight storage that held the parameters compactly, after the
    block the figures are those measured when it ended (the model holds float32 parameters again).
    ``memory_vs_fp32`` is the total over the same parameters and optimizer state in float32.
    """

    def section() -> dict[str, Any]:
        opt = ctl.optimizer
        mode = ctl.weight_storage
        held = mode is not None and mode.memory_at_release is not None and not _holds(opt)
        r = mode.memory_at_release if held else optimizer_memory(opt)
        n = r.params or 1
        out: dict[str, Any] = {
            "bytes_per_param": round(r.total / n, 3),
            "memory_per_param": {"weight": round(r.weight / n, 3),
                                 "compensation": round(r.compensation / n, 3),
                                 "optimizer_state": round(r.optimizer_state / n, 3)},
            "gradient_bytes_per_param": round(r.gradients / n, 3),
            "memory_vs_fp32": round(r.total / r.fp32_total, 4) if r.fp32_total else 1.0,
        }
        if isinstance(opt, StoredParamsMixin):
            own = {p: opt.param_format(p) for g in opt.param_groups for p in g["params"]}
            fmts = sorted({f[0] for f in own.values() if f is not None}, key=_bits_then_name)
            rest = sorted({g["weight_format"] for g in opt.param_groups
                           if any(own[p] is None for p in g["params"])}, key=_bits_then_name)
            out["weight_storage"] = ", ".join(fmts) + (f"; others {', '.join(rest)}" if fmts and rest else
                                                       ", ".join(rest) if not fmts else "")
        else:
            out["weight_storage"] = "fp32 master"
        return out

    return section


def _holds(opt: Any) -> bool:
    return bool(getattr(opt, "holds_params", False))
