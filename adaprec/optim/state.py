"""Low-precision optimizer state: momentum and Adam's moments held in bf16 or in 8 bits
(docs/methods.md#optimizer-state).

``state_format=`` of :class:`~adaprec.optim.KahanSGD` and :class:`~adaprec.optim.Compensated` says how
the parameter-sized state buffers (SGD's momentum, Adam's two moments, RMSprop's and Adagrad's
averages) are held *between* steps; each step decodes a parameter's buffers into float32, updates them
there, and encodes them again (one rounding per buffer and step). Held buffers are
:class:`~adaprec.compact.StoredTensor` objects: they read as float32 tensors anywhere, and a checkpoint
(``opt.state_dict()`` saved with ``torch.save``) holds them as ordinary float32 tensors, which load back
exactly (decoding then encoding again gives the same codes).

==================  ===========================================================================
``state_format``    how a buffer is held (bytes per element)
==================  ===========================================================================
``"fp32"``          float32, as torch does (4)
``"bf16"``          bfloat16, rounded to nearest even (2)
``"bf16_stochastic"``  bfloat16, rounded stochastically with the optimizer's own generator (2):
                    unbiased, so small updates of a slowly moving average survive on average
``"8bit"``          block-wise dynamic quantization (Dettmers et al., "8-bit Optimizers via
                    Block-wise Quantization", 2022): blocks of 2048 consecutive elements, each
                    scaled by its largest magnitude (a float32 per block) and rounded to the
                    nearest of 256 values of a dynamic ("tree") map (1 + 4/2048)
``"fp8"``           block-wise FP8: blocks of 2048 scaled by a power of two so that the largest
                    magnitude is at most 448, then FP8 E4M3 (1 + 1/2048); cheaper to encode
==================  ===========================================================================

The 8-bit map (:func:`dynamic_map`) spreads its 256 values over seven decades: in decade ``E`` (values
in ``(10^-(E+1), 10^-E]`` of the block's largest magnitude) it has ``2^F`` evenly spaced values
``10^-E * (0.1 + 0.9 (f + 1) / 2^F)``, ``f = 0 .. 2^F - 1``. A signed buffer uses one bit for the sign
and ``F = 6 - E`` for ``E = 0..6`` (smallest nonzero magnitude ``10^-6``); a buffer with no negative
value (Adam's second moment) uses all eight bits for the magnitude, ``F = 7 - E`` for ``E = 0..7``
(smallest ``10^-7``). Zero is exact, and so is each block's largest magnitude (the map's value 1).
Which of the two maps a buffer uses is decided at each encode from its values, and recorded with it.

One departure from rounding to nearest, in both 8-bit formats: in a buffer without negative values
(Adam's second moment ``v``) a positive value never rounds to zero, it becomes the format's smallest
positive value instead. A ``v`` rounded to zero would turn Adam's step for that element into ``m / eps``
— a jump of up to ``10^4`` times the learning rate where ``m`` survived the rounding; overstating a tiny
``v`` only makes that element's step smaller.
Compensated ("Kahan") bf16 state would cost two bf16 words per element, as much as float32, and is not
offered.

Example:
    >>> import torch
    >>> fmt = state_format("8bit")
    >>> x = torch.tensor([0.5, -0.25, 1e-3, 0.0])
    >>> parts = fmt.encode(x, None)          # one block: its largest magnitude 0.5 is exact
    >>> [p.dtype for p in parts], fmt.decode(parts, None, x.shape).tolist()
    ([torch.uint8, torch.float32, torch.bool], [0.5, -0.24687500298023224, 0.0010625000577419996, 0.0])
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..compact import StoredTensor, is_stored, values
from ..formats import FloatFormat

__all__ = ["STATE_FORMATS", "state_format", "StateFormat", "Float16State", "Blockwise8bitState",
           "BlockwiseFP8State",
           "dynamic_map", "hold_state", "read_state"]

#: The names ``state_format=`` accepts.
STATE_FORMATS = ("fp32", "bf16", "bf16_stochastic", "8bit", "fp8")

#: Elements per block of the 8-bit state (one float32 scale each).
BLOCK = 2048

#: The smallest positive FP8 E4M3 value (a subnormal).
_E4M3_TINY = 2.0**-9


class StateFormat:
    """How a state buffer is held: a codec (:class:`adaprec.compact.Codec`) plus its rounding.

    ``stochastic``: whether :meth:`encode` wants noise (uniform in [0, 1), shaped like the buffer).
    ``fp32`` is ``None`` in :func:`state_format` (nothing to encode).
    """

    name: str = "abstract"
    stochastic: bool = False

    def encode(self, x: Tensor, state: Tensor | None, noise: Tensor | None = None) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def decode(self, parts: tuple[Tensor, ...], state: Tensor | None, shape: torch.Size) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def __eq__(self, other: object) -> bool:  # by value (as adaprec.compact.FormatCodec)
        return type(other) is type(self) and vars(other) == vars(self)

    def __hash__(self) -> int:
        return hash((type(self), self.name))


class Float16State(StateFormat):
    """A state buffer in bfloat16 (to nearest, or stochastically with noise).

    Example:
        >>> import torch
        >>> f = Float16State(stochastic=False)
        >>> f.decode(f.encode(torch.tensor([1 + 2**-9]), None), None, torch.Size([1]))
        tensor([1.])
    """

    def __init__(self, stochastic: bool) -> None:
        self.stochastic = stochastic
        self.name = "bf16_stochastic" if stochastic else "bf16"
        self._fmt = FloatFormat("bf16")

    def encode(self, x: Tensor, state: Tensor | None, noise: Tensor | None = None) -> tuple[Tensor, ...]:
        return self._fmt.encode_stored(x, None, noise if self.stochastic else None)

    def decode(self, parts: tuple[Tensor, ...], state: Tensor | None, shape: torch.Size) -> Tensor:
        return self._fmt.decode_stored(parts, None, shape)


@functools.cache
def _map_values(signed: bool) -> tuple[float, ...]:
    mags = [0.0]
    bits = 7 if signed else 8
    for e in range(bits):
        f_bits = bits - 1 - e
        n = 2**f_bits
        mags += [10.0 ** (-e) * (0.1 + 0.9 * (f + 1) / n) for f in range(n)]
    vals = sorted(set(mags) | ({-m for m in mags} if signed else set()))
    return tuple(vals)


@functools.cache
def _map_tensor(signed: bool, device: str) -> Tensor:
    return torch.tensor(_map_values(signed), dtype=torch.float32, device=device)


def dynamic_map(signed: bool, device: torch.device | str = "cpu") -> Tensor:
    """The sorted values of the 8-bit dynamic map (module docstring): 255 for ``signed`` (zero once),
    256 otherwise.

    Example:
        >>> m = dynamic_map(signed=False)
        >>> len(m), float(m[-1]), float(m[1])
        (256, 1.0, 1.0000000116860974e-07)
    """
    return _map_tensor(signed, str(torch.device(device)))


@functools.cache
def _midpoints(signed: bool, device: str) -> Tensor:
    vals = _map_tensor(signed, device)
    return (vals[1:] + vals[:-1]) / 2


class Blockwise8bitState(StateFormat):
    """Block-wise dynamic 8-bit quantization of a state buffer (module docstring).

    Parts: the codes (``uint8``, the index of the nearest map value, one per element), the
    blocks' largest magnitudes (``float32``) and whether the signed map was used (``bool``, 0-d).

    Example:
        >>> import torch
        >>> f = Blockwise8bitState(block=4)
        >>> x = torch.tensor([4.0, -2.0, 0.5, 0.0, 1e-3, 0.0, 0.0, 0.0])
        >>> f.decode(f.encode(x, None), None, x.shape).tolist()   # each block's largest value is exact
        [4.0, -1.975000023841858, 0.512499988079071, 0.0, 0.0010000000474974513, 0.0, 0.0, 0.0]
    """

    def __init__(self, block: int = BLOCK) -> None:
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"block must be a positive int, got {block!r}")
        self.block = block
        self.name = "8bit"

    def encode(self, x: Tensor, state: Tensor | None, noise: Tensor | None = None) -> tuple[Tensor, ...]:
        flat = x.detach().reshape(-1).to(torch.float32)
        n = flat.numel()
        nb = max(1, -(-n // self.block))
        if nb * self.block != n:
            flat = torch.nn.functional.pad(flat, (0, nb * self.block - n))
        blocks = flat.reshape(nb, self.block)
        absmax = blocks.abs().amax(1)
        safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        signed = bool(flat.min() < 0)
        # The nearest map value (a tie goes to the lower one).
        codes = torch.bucketize(blocks / safe[:, None], _midpoints(signed, str(x.device)))
        if not signed:  # a positive value never becomes 0 (module docstring)
            codes = torch.where(blocks > 0, codes.clamp_min(1), codes)
        codes = codes.to(torch.uint8).reshape(-1)[:n]
        return codes.clone(), absmax, torch.tensor(signed, device=x.device)

    def decode(self, parts: tuple[Tensor, ...], state: Tensor | None, shape: torch.Size) -> Tensor:
        codes, absmax, signed = parts
        vals = dynamic_map(bool(signed), codes.device)
        n = codes.numel()
        out = vals.index_select(0, codes.to(torch.int32))
        out = torch.nn.functional.pad(out, (0, absmax.numel() * self.block - n))
        out = out.reshape(absmax.numel(), self.block).mul_(absmax[:, None])
        return out.reshape(-1)[:n].reshape(shape)


class BlockwiseFP8State(StateFormat):
    """Block-wise FP8 state: blocks of ``block`` elements scaled by a power of two ``2^e`` (the smallest
    with ``max|x| / 2^e <= 448``; ``e`` kept as ``int8``) and cast to ``float8_e4m3fn`` (to nearest even).

    Encoding is one division and a cast (the dynamic map's nearest-value search costs several times more
    on a CPU); 3 mantissa bits, about 18 binades below each block's largest magnitude.

    Example:
        >>> import torch
        >>> f = BlockwiseFP8State(block=4)
        >>> x = torch.tensor([3.0, -0.3, 1e-3, 0.0])
        >>> f.decode(f.encode(x, None), None, x.shape).tolist()   # 2^e = 2^-7: codes 384, -38.4 -> -40
        [3.0, -0.3125, 0.0009765625, 0.0]
    """

    def __init__(self, block: int = BLOCK) -> None:
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ValueError(f"block must be a positive int, got {block!r}")
        self.block = block
        self.name = "fp8"

    def encode(self, x: Tensor, state: Tensor | None, noise: Tensor | None = None) -> tuple[Tensor, ...]:
        flat = x.detach().reshape(-1).to(torch.float32)
        n = flat.numel()
        nb = max(1, -(-n // self.block))
        blocks = torch.nn.functional.pad(flat, (0, nb * self.block - n)).reshape(nb, self.block)
        absmax = blocks.abs().amax(1)
        e = torch.ceil(torch.log2(absmax / 448.0))
        e = torch.where(absmax > 0, e, torch.zeros_like(e)).clamp_(-126, 127)
        v = blocks / torch.exp2(e)[:, None]
        if not bool(flat.min() < 0):  # a positive value never becomes 0 (module docstring)
            v = torch.where(v > 0, v.clamp_min(_E4M3_TINY), v)
        codes = v.to(torch.float8_e4m3fn).reshape(-1)[:n]
        return codes.clone(), e.to(torch.int8)

    def decode(self, parts: tuple[Tensor, ...], state: Tensor | None, shape: torch.Size) -> Tensor:
        codes, e = parts
        n = codes.numel()
        out = torch.nn.functional.pad(codes.to(torch.float32), (0, e.numel() * self.block - n))
        out = out.reshape(e.numel(), self.block).mul_(torch.exp2(e.to(torch.float32))[:, None])
        return out.reshape(-1)[:n].reshape(shape)


def state_format(spec: object) -> StateFormat | None:
    """Read ``state_format=``: one of :data:`STATE_FORMATS` (``None`` for ``"fp32"``) or a
    :class:`StateFormat`.

    Example:
        >>> state_format("fp32") is None, state_format("bf16").name, state_format("8bit").block
        (True, 'bf16', 2048)
    """
    if isinstance(spec, StateFormat):
        return spec
    if spec == "fp32" or spec is None:
        return None
    if spec == "bf16":
        return Float16State(stochastic=False)
    if spec == "bf16_stochastic":
        return Float16State(stochastic=True)
    if spec == "8bit":
        return Blockwise8bitState()
    if spec == "fp8":
        return BlockwiseFP8State()
    raise ValueError(f"unknown state_format {spec!r}; use one of {STATE_FORMATS}")


def read_state(t: Tensor) -> Tensor:
    """A state buffer's values in float32 (a decoded copy when it is held compactly)."""
    return values(t)


def hold_state(x: Tensor, fmt: StateFormat | None, generator: torch.Generator | None = None,
               into: Tensor | None = None) -> Tensor:
    """Hold the float32 buffer ``x`` in ``fmt`` (returns ``x`` itself for ``None``, i.e. fp32).

    ``into``: a buffer held before, re-used (its parts replaced) when it is a stored tensor.
    ``generator`` draws the noise of a stochastic format; without one it rounds to nearest (how a
    loaded buffer, already on its grid, is held again without drawing noise).
    """
    if fmt is None or x.dtype != torch.float32:
        return x
    noise = None
    if fmt.stochastic and generator is not None:
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
    parts = fmt.encode(x, None, noise)
    if into is not None and is_stored(into) and into.codec is fmt and into.shape == x.shape:
        into.set_parts_(parts)
        return into
    t = StoredTensor.from_parts(parts, fmt, None, x.shape)
    return t
