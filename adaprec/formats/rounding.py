"""Rounding shared by every format kernel: round-to-nearest-even and cheap stochastic rounding, drawing
from generators of adaprec's own.

Stochastic rounding uses ``floor(v + r)`` with ``r ~ U(0, 1)``, which has the same distribution as
``round(v + U(-0.5, 0.5))`` and saves one operation. On the CPU ``r`` has 16-bit resolution,
``r = (u + 0.5) / 2^16`` with ``u`` uniform on ``0..2^16-1``, cut from 64-bit random words: four noise
values per generator draw make it about 4x cheaper than ``torch.rand_like``, and the bias it leaves is at
most 2^-17 of a grid step (``rand_like``'s own floats have 24 bits). ``torch.compile`` calls the same
generator (opaque custom ops), so compiled and eager CPU code draw the same noise words. On other
devices the noise is ``torch.rand`` (fused and cheap there).

Which generator: every kernel takes an ``rng`` key. Key ``0`` is torch's default generator (what a
format used on its own, ``fmt.quantize(x)``, draws from). A :class:`~adaprec.Controller` registers a
:class:`RoundingRNG` of its own (seeded from ``torch.initial_seed()`` without drawing from torch's stream)
and points its layers at it, so a quantized run consumes nothing from the user's random stream: a
``DataLoader`` shuffles the same with and without the controller, and the generator's state is saved in
``ctl.state_dict()``. The key is a plain int, constant for a run, so compiled code does not recompile.

Example:
    >>> import torch
    >>> rng = RoundingRNG(seed=7)
    >>> key = register_rng(rng)
    >>> a = round_(torch.full((4,), 0.5), stochastic=True, rng=key)
    >>> rng.load_state_dict(RoundingRNG(seed=7).state_dict())   # back to the start of the stream
    >>> torch.equal(a, round_(torch.full((4,), 0.5), stochastic=True, rng=key))
    True
    >>> unregister_rng(key)
"""

from __future__ import annotations

import itertools
import threading
from typing import Any

import torch
from torch import Tensor

__all__ = ["RoundingRNG", "register_rng", "unregister_rng", "generator", "add_uniform_noise_", "round_",
           "uniform_like", "draw_noise", "round_with", "NOISE_SCALE", "NOISE_OFFSET"]

_NOISE_SCALE = NOISE_SCALE = 2.0**-16
_NOISE_OFFSET = NOISE_OFFSET = 0.5 + 2.0**-17  # int16 lanes are -2^15..2^15-1: shift to (u + 0.5) / 2^16


class RoundingRNG:
    """The generators (one per device, made on first use) that stochastic rounding draws from.

    ``seed`` fixes every device's stream (device ``d`` uses ``seed + 1_000_003 * index``).
    :meth:`state_dict` / :meth:`load_state_dict` save and restore all of them.

    Example:
        >>> r = RoundingRNG(seed=1)
        >>> g = r.get(torch.device("cpu")); g.initial_seed()
        1
    """

    def __init__(self, seed: int) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"RoundingRNG: seed must be an int, got {seed!r}")
        self.seed = seed % (2**63)
        self._gens: dict[str, torch.Generator] = {}

    def get(self, device: torch.device) -> torch.Generator:
        key = str(device)
        g = self._gens.get(key)
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed((self.seed + 1_000_003 * (device.index or 0)) % (2**63))
            self._gens[key] = g
        return g

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "states": {k: g.get_state() for k, g in self._gens.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "seed" not in state or "states" not in state:
            raise ValueError("not a RoundingRNG state_dict: expected keys 'seed' and 'states'")
        self.seed = int(state["seed"])
        self._gens = {}
        for dev, st in state["states"].items():
            device = torch.device(dev)
            if device.type == "cuda" and not torch.cuda.is_available():
                continue  # a GPU run resumed on a CPU: that stream is never drawn from here
            self.get(device).set_state(st)


_REGISTRY: dict[int, RoundingRNG] = {}
_KEYS = itertools.count(1)


def register_rng(rng: RoundingRNG) -> int:
    """Make ``rng`` drawable by kernels; returns its key (never 0, which is torch's generator)."""
    key = next(_KEYS)
    _REGISTRY[key] = rng
    return key


def unregister_rng(key: int) -> None:
    _REGISTRY.pop(key, None)


def generator(key: int, device: torch.device) -> torch.Generator | None:
    """The generator behind ``key`` on ``device`` (``None``: torch's default generator)."""
    if key == 0:
        return None
    rng = _REGISTRY.get(key)
    if rng is None:
        raise RuntimeError(f"adaprec: rounding generator {key} is gone (its Controller has exited); "
                           "quantize inside the Controller's with block")
    return rng.get(device)


def uniform_like(x: Tensor, rng: int = 0) -> Tensor:
    """``U(0, 1)`` noise shaped like ``x`` (float32) from the generator ``rng``."""
    g = generator(rng, x.device)
    return torch.rand(x.shape, generator=g, device=x.device, dtype=torch.float32)


def _lanes_stride(like: Tensor) -> tuple[int, ...]:
    # ``like``'s own strides when it is dense (e.g. channels_last conv gradients), else contiguous ones:
    # compiled code then walks noise and values in the same order (a transposed read is not vectorized).
    return torch.empty_like(like, dtype=torch.int16, device="meta").stride()


def _seeded_op(name: str, impl):
    """``impl`` as an opaque custom op that draws random numbers (so torch.compile never replays it)."""
    try:
        return torch.library.custom_op(name, impl, mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
    except TypeError:  # torch < 2.5: no tags argument
        return torch.library.custom_op(name, impl, mutates_args=())


def _noise_lanes_impl(like: Tensor, rng: int) -> Tensor:
    n = like.numel()
    # random_(-2^63, None) fills all 64 bits; each word gives four independent 16-bit lanes.
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device)
    words.random_(-(2**63), None, generator=generator(rng, like.device))
    return words.view(torch.int16)[:n].as_strided(like.shape, _lanes_stride(like))


# An opaque op, so that torch.compile calls it as it is instead of inlining it: Inductor's own CPU random
# numbers are generated element by element and made stochastic rounding ~3x slower than eager. Compiled
# and eager code then also draw the same noise from the same generator.
_noise_lanes = _seeded_op("adaprec::noise_lanes", _noise_lanes_impl)
_noise_lanes.register_fake(lambda like, rng: like.new_empty_strided(like.shape, _lanes_stride(like),
                                                                    dtype=torch.int16))

_SCRATCH = threading.local()
_SCRATCH_MAX = 1 << 24  # elements (64 MiB of float32); larger noise converts into a fresh tensor


def _lanes_as_float(lanes: Tensor) -> Tensor:
    """The int16 lanes as float32, in a per-thread scratch buffer reused from call to call.

    Adding int16 to float32 directly makes PyTorch convert into a fresh float32 tensor first; on the CPU
    every fresh activation-sized tensor costs page faults (about 4 ms per 2M values), while converting
    into memory already mapped costs ~0.4 ms.
    """
    n = lanes.numel()
    if n > _SCRATCH_MAX or lanes.device.type != "cpu":
        return lanes.to(torch.float32)
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < n:
        buf = _SCRATCH.buf = torch.empty(n, dtype=torch.float32)
    # The lanes are dense (see _lanes_stride), so their strides address exactly n slots of the buffer.
    return buf.as_strided(lanes.shape, lanes.stride()).copy_(lanes)


def add_uniform_noise_(v: Tensor, rng: int = 0) -> Tensor:
    """Add ``U(0, 1)`` noise to the float32 tensor ``v`` in place (module docstring: how it is drawn)."""
    if v.device.type != "cpu":
        return v.add_(uniform_like(v, rng))
    return v.add_(_lanes_as_float(_noise_lanes(v, rng)), alpha=_NOISE_SCALE).add_(_NOISE_OFFSET)


def _sr_floor_impl(v: Tensor, rng: int) -> Tensor:
    out = torch.empty_like(v)
    torch.add(v, _lanes_as_float(_noise_lanes_impl(out, rng)), alpha=_NOISE_SCALE, out=out)
    return out.add_(_NOISE_OFFSET).floor_()


# Compiled CPU code rounds stochastically through this opaque op (same noise as eager). Why not the lanes
# op plus a fused add: Inductor picks the layout of conv gradients (channels_last) *after* tracing, so
# lanes traced as contiguous are read transposed and the fused kernel is not vectorized (~6x slower); here
# the noise is cut in the layout the values really have.
_sr_floor = _seeded_op("adaprec::sr_floor", _sr_floor_impl)
_sr_floor.register_fake(lambda v, rng: torch.empty_like(v))


def round_(v: Tensor, stochastic: bool, rng: int = 0) -> Tensor:
    """Round ``v`` to integers, in place in eager mode: stochastically (``floor(v + U(0,1))``), or to
    nearest with ties to even (numpy's ``rint``)."""
    if stochastic:
        if v.device.type == "cpu" and torch.compiler.is_compiling():
            return _sr_floor(v, rng)
        return add_uniform_noise_(v, rng).floor_()
    return v.round_()


def _noise_f32_impl(like: Tensor, rng: int) -> Tensor:
    n = like.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=like.device)
    words.random_(-(2**63), None, generator=generator(rng, like.device))
    # Converted flat, in memory order, then laid out like `like` (the same lanes _noise_lanes_impl gives).
    return words.view(torch.int16)[:n].to(torch.float32).as_strided(like.shape, _lanes_stride(like))


# The same lanes as float32 values, from one opaque op: compiled code that consumes int16 lanes is not
# vectorized by Inductor (the int16 load blocks it; measured ~4x slower), float32 lanes are.
_noise_f32 = _seeded_op("adaprec::noise_lanes_f32", _noise_f32_impl)
_noise_f32.register_fake(lambda like, rng: like.new_empty_strided(like.shape, _lanes_stride(like),
                                                                  dtype=torch.float32))


def draw_noise(like: Tensor, rng: int = 0) -> Tensor:
    """The stochastic-rounding noise :func:`round_` would draw now for a tensor shaped and laid out like
    ``like``, drawn ahead so that several roundings can share it (:func:`round_with`).

    On the CPU these are the 16-bit lanes as float32 (``-2^15 .. 2^15 - 1``); elsewhere ``U(0, 1)``.
    ``round_with(v, draw_noise(v, rng))`` equals ``round_(v, True, rng)`` bit for bit. In eager mode on the
    CPU the result lives in a per-thread scratch buffer: use it before the next draw on the thread.
    """
    if like.device.type != "cpu":
        return uniform_like(like, rng)
    if torch.compiler.is_compiling():
        return _noise_f32(like, rng)
    # Eager: the lanes converted into the per-thread scratch buffer, as add_uniform_noise_ does (valid
    # until the next draw on this thread; a fresh activation-sized tensor costs page faults).
    return _lanes_as_float(_noise_lanes_impl(like, rng))


def round_with(v: Tensor, noise: Tensor) -> Tensor:
    """Round ``v`` stochastically with noise from :func:`draw_noise` (in place in eager mode)."""
    if v.device.type != "cpu":
        return v.add_(noise).floor_()
    # The same two additions as add_uniform_noise_: the lane product is exact, so fused code agrees.
    return v.add_(noise, alpha=_NOISE_SCALE).add_(_NOISE_OFFSET).floor_()
