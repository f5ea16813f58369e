"""Shared machinery of the optimizers that keep their parameters in a low-precision storage format.

Both :class:`~adaprec.optim.KahanSGD` and :class:`~adaprec.optim.Compensated` are
:class:`torch.optim.Optimizer` subclasses whose parameter groups carry the storage settings
(``weight_format``, ``comp_format``, ``update``, ``headroom_bits``, ``zero_range``, ``overflow``) as
strings and numbers, so that ``state_dict()`` loads with ``torch.load(weights_only=True)``. Per
parameter the state holds ``"comp"`` (the Kahan residual, update ``"kahan"`` only) and ``"w_fl"``
(the kept fractional length, fixed-point weights only). Each group remembers in ``"_split"`` the
storage its parameters are currently split into; when a group's settings change (by :meth:`set_format`
or by editing the group), the next step re-splits its parameters first
(:func:`~adaprec.optim.storage.resplit`).

Single parameters may override their group's weight and compensation formats
(:meth:`~StoredParamsMixin.set_param_format`): that is how :mod:`adaprec.storage_mode` gives every
layer its own format without regrouping the optimizer (which would detach LR schedulers, whose
per-group base rates are fixed when they are built). The overrides and the layouts their parameters
are split into are saved under ``"adaprec_param_formats"`` in ``state_dict()``, keyed by the
parameter's index as torch numbers them — not in the per-parameter state, whose non-tensor values torch
rebuilds element by element on load (a string would not survive).

Held in compact form. Inside a controller block with weight storage (:mod:`adaprec.storage_mode`),
:meth:`~StoredParamsMixin.hold_params` turns every parameter whose storage format has a compact form
(:attr:`~adaprec.formats.Format.packs_stored`) into a :class:`~adaprec.compact.StoredTensor` holding
it in that form — bf16 values, FP8 or integer codes, block codes and scales — until
:meth:`~StoredParamsMixin.release_params` gives the model float32 parameters with the same values
back. The compensation is held in its own format's compact form whenever the parameter is float32,
and the group's ``state_format`` (:mod:`adaprec.optim.state`) says how the optimizer's own buffers are
held. Compact or not, the arithmetic is the same: an update decodes, computes in float32 and encodes
(each value is rounded once, exactly as the simulation rounds it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..compact import FormatCodec, hold, is_stored, release, values
from .state import StateFormat, hold_state, state_format
from .storage import UPDATE_MODES, Storage, format_name

STORAGE_KEYS = ("weight_format", "comp_format", "update", "headroom_bits", "zero_range", "overflow")
_OPTION_KEYS = ("headroom_bits", "zero_range", "overflow")  # Storage fields besides the two formats
_RNG_KEY = "adaprec_sr_rng"
_PARAM_FORMATS_KEY = "adaprec_param_formats"


def check_update(update: object) -> str:
    if update not in UPDATE_MODES:
        raise ValueError(f"unknown update mode {update!r}; expected one of {UPDATE_MODES}")
    return str(update)


def storage_defaults(weight_format: object, comp_format: object, update: object,
                     **options: Any) -> dict[str, Any]:
    """Validate storage settings and return them in their canonical, serialisable form."""
    update = check_update(update)
    if comp_format is not None and update != "kahan":
        raise ValueError(
            f"comp_format={comp_format!r} is only used with update='kahan' (got update={update!r}); "
            f"leave comp_format=None")
    storage = Storage(weight_format, comp_format, **options)
    out = {
        "weight_format": format_name(storage.weight),
        "comp_format": None if comp_format is None else format_name(storage.comp),
        "update": update,
    }
    out.update({k: getattr(storage, k) for k in _OPTION_KEYS})
    return out


def group_storage(group: dict[str, Any]) -> Storage:
    """The :class:`Storage` described by a (canonical) parameter group."""
    return Storage(group["weight_format"], group["comp_format"], **{k: group[k] for k in _OPTION_KEYS})


class StoredParamsMixin:
    """Split-on-add, re-split-on-change, compensated write-back, and a resumable RNG for stochastic
    rounding. Meant to be mixed into a :class:`torch.optim.Optimizer` subclass."""

    param_groups: list[dict[str, Any]]
    state: dict[Tensor, dict[str, Any]]
    defaults: dict[str, Any]

    def _init_stored(self, seed: int | None) -> None:
        """Set up before ``Optimizer.__init__`` runs (it calls ``add_param_group``)."""
        # id(group) -> (the group's raw storage settings, their Storage): skips re-validating every step.
        self._storage_cache: dict[int, tuple[tuple[Any, ...], Storage]] = {}
        if seed is None:
            # torch.manual_seed decides it, without drawing from (and so shifting) the global RNG stream.
            seed = torch.initial_seed()
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        self._sr_seed = seed
        self._sr_generators: dict[str, torch.Generator] = {}
        # Per-parameter overrides of the group's (weight_format, comp_format), canonical names, and the
        # layout each overridden parameter is currently split into (keys are the parameter tensors).
        self._param_formats: dict[Tensor, tuple[str, str | None]] = {}
        self._param_layouts: dict[Tensor, str] = {}
        self._param_storage_cache: dict[tuple[Any, ...], Storage] = {}
        # hold_params(): parameters are held compactly; the module owning each (for RNN weights).
        self._holding = False
        self._owners: dict[int, Any] = {}
        self._state_formats: dict[str, StateFormat | None] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        g = self._sr_generators.get(key)
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed(self._sr_seed)
            self._sr_generators[key] = g
        return g

    # ------------------------------------------------------------------ groups and splitting
    def _storage(self, group: dict[str, Any]) -> Storage:
        # Normalise in place: users may have written Format objects or aliases into the group, or
        # loaded groups saved by a plain torch optimizer (missing keys take the optimizer's defaults).
        for k in STORAGE_KEYS:
            group.setdefault(k, self.defaults[k])
        raw = tuple(group[k] for k in STORAGE_KEYS)
        hit = self._storage_cache.get(id(group))
        if hit is not None and hit[0] == raw:
            return hit[1]
        group.update(storage_defaults(group["weight_format"], group["comp_format"], group["update"],
                                      **{k: group[k] for k in _OPTION_KEYS}))
        storage = group_storage(group)
        self._storage_cache[id(group)] = (tuple(group[k] for k in STORAGE_KEYS), storage)
        return storage

    @staticmethod
    def _check_params(params: Iterable[Tensor]) -> None:
        for p in params:
            if p.dtype not in (torch.float32, torch.float64):
                raise TypeError(
                    f"adaprec.optim simulates storage formats in float32 tensors; got a parameter of dtype "
                    f"{p.dtype}. Keep the model in float32 (or float64) and choose the stored format with "
                    f"weight_format= (e.g. 'bf16', 'fx8')")

    def _param_storage(self, p: Tensor, group: dict[str, Any], storage: Storage) -> Storage:
        """The storage of ``p``: its own override if it has one, else its group's ``storage``."""
        ov = self._param_formats.get(p)
        if ov is None:
            return storage
        key = (storage.key(), ov)
        hit = self._param_storage_cache.get(key)
        if hit is None:
            hit = Storage(ov[0], ov[1], **{k: group[k] for k in _OPTION_KEYS})
            self._param_storage_cache[key] = hit
        return hit

    @torch.no_grad()
    def _split_param(self, p: Tensor, storage: Storage, kahan: bool) -> None:
        """Recombine ``p + comp`` and re-split it into ``storage`` (docs/methods.md#kahan-update)."""
        st = self.state[p]
        comp = st.get("comp")
        w_hp = values(p) + values(comp) if comp is not None else values(p).clone()
        fl = storage.fit(w_hp)
        w = self._put_param(p, w_hp, storage, fl)
        if kahan:
            st["comp"] = storage.new_comp(w_hp - w, fl, compact=p.dtype == torch.float32)
        else:
            st.pop("comp", None)  # the residual went into w_hp above
        if fl is None:
            st.pop("w_fl", None)
        else:
            st["w_fl"] = fl

    def _holds(self, p: Tensor, storage: Storage) -> bool:
        return self._holding and storage.weight.packs_stored and p.dtype == torch.float32

    def _put_param(self, p: Tensor, x: Tensor, storage: Storage, fl: Tensor | None,
                   parts: tuple[Tensor, ...] | None = None) -> Tensor:
        """Round ``x`` onto ``storage``'s weight grid into ``p`` — held compactly when the optimizer holds
        parameters and the format has a compact form, plain float32 otherwise — and return the values.
        ``parts``: ``x``'s compact parts, already encoded."""
        fmt = storage.weight
        if self._holds(p, storage):
            if parts is None:
                parts = fmt.encode_stored(x, fl)
            if not is_stored(p):
                hold(p, FormatCodec(fmt), fl, fit=storage.fit, owner=self._owners.get(id(p)))
            p.set_parts_(parts, fl, p.codec if p.codec.name == fmt.short() else FormatCodec(fmt), storage.fit)
            return fmt.decode_stored(parts, fl, p.shape)
        if is_stored(p):
            release(p, owner=self._owners.get(id(p)))
        w = storage.quantize_weight(x, fl)
        p.copy_(w)
        return w

    # ------------------------------------------------------------------ holding parameters compactly
    @torch.no_grad()
    def hold_params(self, model: torch.nn.Module | None = None) -> None:
        """Hold every parameter whose storage format has a compact form in that form, in place (the
        parameter objects stay the same; see the module docstring). ``model``: the module tree the
        parameters belong to, so that recurrent layers' weight lists are rebuilt after the swap.
        Raises ``RuntimeError`` when torch cannot swap a parameter (a live autograd graph refers to it).

        A parameter's values stay as they are (they already lie on its grid); only where encoding
        them would round them again (NVFP4, whose scales depend on the values) is ``w + c`` re-split.
        """
        self._owners = {}
        if model is not None:
            for m in model.modules():
                for t in m._parameters.values():
                    if t is not None:
                        self._owners.setdefault(id(t), m)
        self._holding = True
        for group in self.param_groups:
            storage = self._storage(group)
            for p in group["params"]:
                s = self._param_storage(p, group, storage)
                if not self._holds(p, s):
                    continue
                fl = self.state[p].get("w_fl")
                v = values(p)
                parts = s.weight.encode_stored(v, fl)
                if torch.equal(s.weight.decode_stored(parts, fl, v.shape), v):
                    self._put_param(p, v, s, fl, parts)
                else:
                    self._split_param(p, s, group["update"] == "kahan")

    @torch.no_grad()
    def release_params(self) -> None:
        """Give every held parameter back as a plain float32 tensor with its stored values."""
        self._holding = False
        for group in self.param_groups:
            for p in group["params"]:
                if is_stored(p):
                    release(p, owner=self._owners.get(id(p)))
        self._owners = {}

    @property
    def holds_params(self) -> bool:
        """Whether :meth:`hold_params` is in force."""
        return self._holding

    # ------------------------------------------------------------------ the optimizer's own state
    def _state_format(self, group: dict[str, Any]) -> StateFormat | None:
        name = group.setdefault("state_format", self.defaults.get("state_format", "fp32"))
        if name not in self._state_formats:
            self._state_formats[name] = state_format(name)
        return self._state_formats[name]

    def _hold_buffer(self, group: dict[str, Any], x: Tensor, into: Tensor | None = None) -> Tensor:
        """Hold the float32 state buffer ``x`` in the group's ``state_format``."""
        fmt = self._state_format(group)
        return hold_state(x, fmt, self._generator(x.device) if fmt is not None and fmt.stochastic else None,
                          into)

    @torch.no_grad()
    def _split_group(self, group: dict[str, Any]) -> Storage:
        """Make the group's parameters match its storage settings (no-op when they already do).

        Returns the group's storage; parameters with an override are split into their own."""
        storage = self._storage(group)
        layout = f"{storage.key()}/{group['update']}"
        fresh = group.get("_split") == layout
        if fresh and not self._param_layouts and not self._param_formats:
            return storage  # the common case: one check per group and step
        kahan = group["update"] == "kahan"
        for p in group["params"]:
            s = self._param_storage(p, group, storage)
            if s is storage:
                if fresh and p not in self._param_layouts:
                    continue
                self._param_layouts.pop(p, None)  # an override was removed: back to the group's format
            else:
                own = f"{s.key()}/{group['update']}"
                if self._param_layouts.get(p) == own:
                    continue
                self._param_layouts[p] = own
            self._check_params([p])
            self._split_param(p, s, kahan)
        group["_split"] = layout
        return storage

    def set_param_format(self, params: Iterable[Tensor], weight_format: object,
                         comp_format: object = None) -> None:
        """Store single parameters in their own format (``None`` reverts them to their group's), and
        re-split them now: ``w + c`` is recombined and split into the new weight and compensation grids.

        The group's other settings (update mode, headroom, overflow) still apply. ``comp_format`` needs
        ``update="kahan"`` in the parameter's group; ``None`` means the same width as the weight.
        """
        params = list(params)
        where: dict[Tensor, dict[str, Any]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                where[p] = group
        missing = [i for i, p in enumerate(params) if p not in where]
        if missing:
            raise ValueError(f"set_param_format: tensors at positions {missing} are not parameters of this "
                             "optimizer (pass tensors from its param_groups)")
        if weight_format is None:
            if comp_format is not None:
                raise ValueError("set_param_format: comp_format needs a weight_format (weight_format=None "
                                 "reverts the parameters to their group's formats)")
            for p in params:
                self._param_formats.pop(p, None)
        else:
            for p in params:
                group = where[p]
                self._storage(group)  # normalise the group first
                canon = storage_defaults(weight_format, comp_format, group["update"],
                                         **{k: group[k] for k in _OPTION_KEYS})
                self._param_formats[p] = (canon["weight_format"], canon["comp_format"])
        for group in {id(where[p]): where[p] for p in params}.values():
            self._split_group(group)

    def param_format(self, param: Tensor) -> tuple[str, str | None] | None:
        """The ``(weight_format, comp_format)`` override of ``param``, or ``None`` (its group's)."""
        return self._param_formats.get(param)

    def set_format(self, weight_format: object, comp_format: object = None, *, update: str | None = None,
                   groups: Iterable[int] | None = None) -> None:
        """Switch the storage format of some (default: all) parameter groups now, re-splitting
        ``w + c`` into the new weight and compensation grids (docs/methods.md#kahan-update)."""
        idx = list(range(len(self.param_groups))) if groups is None else list(groups)
        for i in idx:
            if not (isinstance(i, int) and 0 <= i < len(self.param_groups)):
                raise ValueError(f"group index {i!r} out of range 0..{len(self.param_groups) - 1}")
        for i in idx:
            group = self.param_groups[i]
            new = storage_defaults(weight_format, comp_format, update or group["update"],
                                   **{k: group[k] for k in _OPTION_KEYS})
            group.update(new)
            self._split_group(group)

    def storage_for(self, param: Tensor) -> Storage:
        """The storage a parameter is kept in (its override, else its group's settings)."""
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return self._param_storage(param, group, self._storage(group))
        raise KeyError("this tensor is not a parameter of the optimizer")

    # ------------------------------------------------------------------ the write-back
    def _write_back(self, p: Tensor, delta: Tensor, group: dict[str, Any], storage: Storage,
                    alpha: float = 1.0) -> None:
        st = self.state[p]
        update = group["update"]
        storage = self._param_storage(p, group, storage)
        gen = self._generator(p.device) if update == "stochastic" else None
        storage.add_(p, delta, comp=st.get("comp"), fl=st.get("w_fl"), update=update, generator=gen,
                     alpha=alpha)

    @staticmethod
    def _check_lr(group: dict[str, Any]) -> float:
        lr = group["lr"]
        lr = float(lr.item()) if isinstance(lr, Tensor) else lr
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not math.isfinite(lr) or lr < 0:
            raise ValueError(f"lr must be a finite number >= 0, got {group['lr']!r}")
        return float(lr)

    # ------------------------------------------------------------------ state dicts
    def state_dict(self) -> dict[str, Any]:
        """The usual optimizer state dict plus the state of the stochastic-rounding generator."""
        sd = super().state_dict()  # type: ignore[misc]
        sd[_RNG_KEY] = self._rng_state()
        sd[_PARAM_FORMATS_KEY] = {
            i: [*self._param_formats[p], self._param_layouts.get(p)]
            for i, p in enumerate(self._flat_params()) if p in self._param_formats}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        rng = state_dict.pop(_RNG_KEY, None)
        formats = state_dict.pop(_PARAM_FORMATS_KEY, {})
        super().load_state_dict(state_dict)  # type: ignore[misc]
        self._load_rng_state(rng)
        flat = self._flat_params()
        self._param_formats, self._param_layouts = {}, {}
        for i, (wf, cf, layout) in formats.items():
            if not 0 <= int(i) < len(flat):
                raise ValueError(f"the state dict overrides the format of parameter {i}, but this optimizer "
                                 f"has {len(flat)} parameters")
            p = flat[int(i)]
            self._param_formats[p] = (wf, cf)
            if layout is not None:  # the loaded comp/w_fl are already split this way
                self._param_layouts[p] = layout
        self._hold_loaded_state()

    @torch.no_grad()
    def _hold_loaded_state(self) -> None:
        """A checkpoint holds plain float32 tensors: hold them again as this optimizer holds its state
        (compensation and buffers compactly, held parameters on the loaded kept state). Values on their
        grids encode exactly, and no rounding noise is drawn, so a resumed run continues bit for bit."""
        for group in self.param_groups:
            storage = self._storage(group)
            fmt = self._state_format(group)
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                s = self._param_storage(p, group, storage)
                fl = st.get("w_fl")
                if is_stored(p):  # re-encode on the loaded kept state (exact for the saved values)
                    self._put_param(p, p.plain(), s, fl)
                if "comp" in st and p.dtype == torch.float32:
                    st["comp"] = s.hold_comp(st["comp"], fl)
            for p in group["params"]:
                for bst in self._buffer_states(p):
                    for k in self._buffer_keys(p, bst):
                        bst[k] = hold_state(values(bst[k]), fmt)

    def _buffer_keys(self, p: Tensor, st: dict[str, Any]) -> list[str]:
        """The keys of the optimizer's own parameter-sized buffers in a state dict of ``p`` (not the
        compensation, not the kept state)."""
        return [k for k, v in st.items() if k not in ("comp", "w_fl") and isinstance(v, Tensor)
                and v.shape == p.shape and v.is_floating_point()]

    def _buffer_states(self, p: Tensor) -> list[dict[str, Any]]:
        """The state dicts holding ``p``'s optimizer buffers (this optimizer's own state here)."""
        st = self.state.get(p)
        return [st] if st else []

    def _flat_params(self) -> list[Tensor]:
        """Parameters in the order torch's ``state_dict()`` numbers them."""
        return [p for g in self.param_groups for p in g["params"]]

    # ------------------------------------------------------------------ RNG
    def _rng_state(self) -> dict[str, Any]:
        return {"seed": self._sr_seed,
                "generators": {k: g.get_state() for k, g in self._sr_generators.items()}}

    def _load_rng_state(self, d: dict[str, Any] | None) -> None:
        if d is None:
            return
        self._sr_seed = int(d["seed"])
        self._sr_generators = {}
        for key, gstate in d["generators"].items():
            self._generator(torch.device(key)).set_state(gstate)
