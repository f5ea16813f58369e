"""The hardware backend: run a layer on real low-precision kernels when its decision allows it.

``Controller(model, backend="hardware")`` attaches the same sites as the simulated backend (same
``attach``/``apply``/``detach`` contract, same exact restore, same resumable state) and, for every
Linear and convolution layer, picks at each :meth:`HardwareBackend.apply` a *route* from the layer's
current precision. Everything that no real kernel can run goes through the simulated path unchanged.

Routes (a "16-bit float" below is ``FloatFormat("bf16")`` or ``FloatFormat("fp16")``):

=========  =====================================================  =====================================
route      when (all conditions)                                  what runs
=========  =====================================================  =====================================
``lowp``   Linear or Conv1d/2d/3d; weight and activation the      autocast-style: weight, input and bias
           same 16-bit float, nearest rounding; gradient the      cast to that dtype, product in it,
           same 16-bit float (either rounding); the dtype's       output cast back to float32. The
           matmul runs on the device                              error is cast to the dtype by the
                                                                  backward (fp16 and stochastic
                                                                  errors first go through the
                                                                  simulated gradient quantizer, which
                                                                  saturates / rounds stochastically)
``fp8``    Linear; weight and activation ``fp8_e4m3``, nearest;   ``torch._scaled_mm`` with dynamic
           gradient ``fp8_e5m2`` or ``fp8_e4m3`` (either          per-tensor scales (amax / max finite)
           rounding); ``_scaled_mm`` runs on the device           forward E4M3 x E4M3, backward error in
                                                                  the gradient format x E4M3 (both
                                                                  products); bias added in float32
``fp8``    the same, but the call's shape is not allowed on the   the same scaled FP8 numbers with the
(emul.)    device (CUDA: every dim of the product a multiple of   product in float32 (``fp8`` is decided
           16), ``_scaled_mm`` is missing, or the layer is a      per call, by shape; convs always
           convolution                                            emulate)
``int8``   Linear or Conv1d/2d/3d (one group, numeric zero        the integer codes of the formats
           padding); weight and activation formats with integer   (:meth:`Format.encode`) multiplied on a
           codes of <= 8 bits (CPT's min-max grid ``int2``..      *code kernel* (``via``): ``int_mm``
           ``int8``, fixed point ``fx2``..``fx8``), either        (``torch._int_mm``, Linear only),
           rounding; activation per tensor; any gradient format;  ``bf16`` (bf16 products, float32
           the code kernel runs on the device (see                results: exact) or ``bf16-out``
           :class:`HardwareBackend`'s ``codes``). Per call,       (result rounded to bf16); offsets
           CUDA's ``_int_mm`` needs M > 16 and K, N multiples     folded in exactly. All three products
           of 8 (else the same codes multiply in float32)         on codes; the input gradient with
                                                                  per-channel weight scales is a
                                                                  documented variant
                                                                  (:mod:`adaprec.quant.intcodes`)
``sim``    everything else: other widths and formats (int and    the simulated backend's fake
           fixed point > 8 bits, block-scaled, stochastic fwd.,   quantization, exactly as with
           mixed roles), LSTM/GRU/RNN/MultiheadAttention, a       ``backend="simulated"`` (layers in
           route whose kernel the device lacks (except fp8)       FP32 run their own forward)
=========  =====================================================  =====================================

FP8 means *scaled* FP8 everywhere, as FP8 training is done on real hardware: each tensor is divided by
``amax / max_finite`` before the cast — the simulated backend's ``FloatFormat("fp8_e4m3")`` computes the
same numbers, so the ``fp8`` and ``sim`` routes agree. The raw grid (``"fp8_e4m3_unscaled"``) has no
kernel and always simulates.

Which route a precision takes follows from what each format says about itself
(:attr:`~adaprec.formats.Format.hardware_dtype`, :meth:`~adaprec.formats.Format.encode`); the backend
never checks a format's kind.

Which kernels exist is found by running each one once on the model's device at ``attach`` (torch 2.15:
on the CPU ``bfloat16``/``float16`` matmuls and convolutions, ``torch._scaled_mm`` and ``torch._int_mm``
all run, without shape restrictions). ``strict_shapes`` (default: on for CUDA only) applies the CUDA
shape rules anyway. A route change is a change of the traced program: under ``torch.compile`` each
route compiles once (at most five variants per layer); bit-width changes *within* a route (``sim``, or
CPT's widths 2..8 on ``int8``) never recompile (DESIGN.md contract 3). Scales are tensors: no host sync
per step. Which code kernel ``int8`` uses, and why, is in docs/methods.md#hardware-integer-codes.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    >>> be = HardwareBackend()
    >>> be.attach(model, [("0", model[0]), ("2", model[2])])
    ['0', '2']
    >>> be.apply({"0": hardware_precision("fp8"), "2": Precision.cpt(12, 8)})
    >>> {n: r.kind for n, (r, _) in be.routes().items()}
    {'0': 'fp8', '2': 'sim'}
    >>> model(torch.randn(4, 32)).shape
    torch.Size([4, 16])
    >>> be.detach(); "forward" in model[0].__dict__
    False
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..formats import FloatFormat, Precision, parse_format
from ..formats.floating import scaled_codes
from .attach import SITE
from .intcodes import CODE_KERNELS, CodesConv, CodesLinear, bf16_accumulate_ok, conv_ok
from .simulated import SimulatedBackend
from .site import LayerSite

__all__ = ["HardwareBackend", "Route", "hardware_precision", "route_for", "probe_kernels", "KERNELS"]

#: Kernel families the backend knows; ``HardwareBackend(kernels=...)`` takes a subset.
KERNELS: tuple[str, ...] = ("bf16", "fp16", "fp8", "int8")

_LOWP = {"bf16": torch.bfloat16, "fp16": torch.float16}
_LOWP_DTYPES = frozenset(_LOWP.values())
_FP8_DTYPES = frozenset((torch.float8_e4m3fn, torch.float8_e5m2))


@dataclass(frozen=True)
class Route:
    """How one layer runs for one mode (training or evaluation).

    ``kind``: ``"sim"``, ``"lowp"``, ``"fp8"`` or ``"int8"``; ``dtype``: the forward dtype (lowp, fp8);
    ``grad_dtype``: the FP8 error dtype; ``grad_quant``: whether the error first goes through the
    simulated gradient quantizer (stochastic rounding, fp16 saturation); ``kernel``: whether a real
    kernel runs (``False``: the same numbers, emulated in float32); ``via``: the ``int8`` route's code
    kernel (:data:`~adaprec.quant.intcodes.CODE_KERNELS`).

    Example:
        >>> route_for(hardware_precision("bf16"), torch.nn.Linear(2, 2), {"bf16"}).kind
        'lowp'
    """

    kind: str
    dtype: torch.dtype | None = None
    grad_dtype: torch.dtype | None = None
    grad_quant: bool = False
    kernel: bool = True
    via: str | None = None


_SIM = Route("sim", kernel=False)


def hardware_precision(name: str) -> Precision:
    """The :class:`Precision` a hardware kernel runs: "fp8", "bf16", "fp16", "int8" or "fp32".

    ``"fp8"`` is E4M3 weights and activations with E5M2 errors; ``"int8"`` is CPT's 8/8 (per-channel
    weights, stochastic errors); the 16-bit floats round errors to nearest, as autocast does.

    Example:
        >>> hardware_precision("fp8").short(), hardware_precision("bf16").gradient.rounding
        ('fp8_e4m3/fp8_e5m2', 'nearest')
    """
    if name == "fp8":
        return Precision(FloatFormat("fp8_e4m3"), FloatFormat("fp8_e4m3"), FloatFormat("fp8_e5m2"))
    if name in _LOWP:
        f = FloatFormat(name)
        return Precision(f, f, f)
    if name == "int8":
        return Precision.cpt(8, 8)
    if name == "fp32":
        return Precision.fp32()
    raise ValueError(f"unknown hardware precision {name!r}; known: ['fp8', 'bf16', 'fp16', 'int8', 'fp32']")


def route_for(prec: Precision, module: nn.Module, kernels_ok: Iterable[str], codes: str | None = None,
              conv_codes: str | None = None) -> Route:
    """The route of one layer at precision ``prec`` when the kernels ``kernels_ok`` run on its device.

    ``codes``/``conv_codes``: the code kernel Linear layers / convolutions multiply integer codes with
    (:data:`~adaprec.quant.intcodes.CODE_KERNELS`; ``None``: ``"int_mm"`` for Linear layers when the
    ``int8`` kernel runs, no code route for convolutions). The backend passes what it chose at attach.

    Example:
        >>> lin = torch.nn.Linear(4, 4)
        >>> route_for(hardware_precision("fp8"), lin, set()).kernel  # no _scaled_mm: emulated FP8
        False
        >>> [route_for(Precision.cpt(b, 8), lin, {"int8"}).kind for b in (8, 3, 12)]
        ['int8', 'int8', 'sim']
        >>> route_for(Precision.cpt(4, 8), torch.nn.Conv2d(2, 2, 3), {"bf16"}, conv_codes="bf16").via
        'bf16'
    """
    ok = set(kernels_ok)
    is_linear = isinstance(module, nn.Linear)
    is_conv = isinstance(module, nn.modules.conv._ConvNd)
    if not (is_linear or is_conv):
        return _SIM
    w, a, g = prec.weight, prec.activation, prec.gradient
    # Each format says which dtype a real kernel multiplies it in; the route follows from the three.
    wd, ad, gd = w.hardware_dtype, a.hardware_dtype, g.hardware_dtype
    forward_nearest = not w.stochastic and not a.stochastic
    if wd in _LOWP_DTYPES and wd == ad == gd and forward_nearest:
        name = "bf16" if wd is torch.bfloat16 else "fp16"
        if name not in ok:
            return _SIM
        return Route("lowp", wd, grad_quant=g.stochastic or wd is torch.float16)
    if wd is torch.float8_e4m3fn and ad is wd and gd in _FP8_DTYPES and forward_nearest:
        kernel = is_linear and "fp8" in ok
        return Route("fp8", wd, gd, grad_quant=g.stochastic, kernel=kernel)
    # Integer codes carry the format's own rounding (nearest or stochastic, e.g. MuPPET's fixed point).
    if wd is torch.int8 and ad is torch.int8 and not a.per_channel:
        if is_linear:
            via = codes if codes is not None else ("int_mm" if "int8" in ok else None)
        else:
            via = conv_codes if conv_codes != "int_mm" and conv_ok(module) else None
        if via is not None and _codes_runnable(via, ok):
            return Route("int8", via=via)
    return _SIM


def _codes_runnable(via: str, ok: set[str]) -> bool:
    return ("int8" if via == "int_mm" else "bf16") in ok


# --- kernel probes ---------------------------------------------------------------------------------

_PROBED: dict[str, frozenset[str]] = {}


def probe_kernels(device: torch.device | str) -> frozenset[str]:
    """Which of :data:`KERNELS` run on ``device`` (each is tried once on tiny inputs; cached).

    Example:
        >>> "bf16" in probe_kernels("cpu")
        True
    """
    device = torch.device(device)
    key = str(device)
    if key in _PROBED:
        return _PROBED[key]
    found = set()
    for name, dt in _LOWP.items():
        try:
            a = torch.ones(16, 16, dtype=dt, device=device)
            F.linear(a, a)
            found.add(name)
        except Exception:  # noqa: BLE001 - any failure means "not on this device"
            pass
    try:
        one = torch.ones((), device=device)
        a = torch.ones(16, 16, device=device)
        b = a.to(torch.float8_e4m3fn).t()
        torch._scaled_mm(a.to(torch.float8_e4m3fn), b, scale_a=one, scale_b=one, out_dtype=torch.float32)
        torch._scaled_mm(a.to(torch.float8_e5m2), b, scale_a=one, scale_b=one, out_dtype=torch.float32)
        found.add("fp8")
    except Exception:  # noqa: BLE001
        pass
    try:
        a = torch.ones(32, 32, dtype=torch.int8, device=device)
        torch._int_mm(a, a.t())
        found.add("int8")
    except Exception:  # noqa: BLE001
        pass
    _PROBED[key] = frozenset(found)
    return _PROBED[key]


def _no_create_graph(route: str) -> None:
    """The FP8/INT8 products keep only low-precision codes for their backward, which is therefore
    not differentiable again: refuse ``create_graph=True`` instead of returning silent zeros."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"adaprec's hardware {route!r} route does not support higher-order gradients "
            "(backward with create_graph=True, e.g. a gradient penalty): its backward works on "
            f"{route} codes. Use backend='simulated' for this run, or a precision the layer runs on "
            "the 'sim' or 'lowp' route")


# --- FP8 -------------------------------------------------------------------------------------------

def _fp8_params(dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(parse_format(dtype).params(), device=device)


def _scaled_cast(x: Tensor, dtype: torch.dtype, sr_p: Tensor | None = None, rng: int = 0
                 ) -> tuple[Tensor, Tensor]:
    """``x`` as FP8 codes with one dynamic dequantization scale ``amax / max_finite`` (a 0-d tensor): the
    scaled FP8 format's own arithmetic (:func:`adaprec.formats.floating.scaled_codes`), then a lossless
    cast. ``sr_p``: the gradient format's parameters when it rounds stochastically."""
    p = _fp8_params(dtype, x.device) if sr_p is None else sr_p
    c, scale = scaled_codes(x, p, sr_p is not None, rng)
    return c.to(dtype), scale


def _mm8(a: Tensor, sa: Tensor, b: Tensor, sb: Tensor, kernel: bool) -> Tensor:
    """``(a * sa) @ (b * sb)`` for FP8 codes; ``b`` column-major, as ``_scaled_mm`` wants it."""
    if kernel:
        return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.float32)
    return (a.float() @ b.float()) * (sa * sb)


def _fp8_shape_ok(m: int, k: int, n: int) -> bool:
    return m % 16 == 0 and k % 16 == 0 and n % 16 == 0


class _FP8Linear(torch.autograd.Function):
    """``y = x w^T + b`` with scaled E4M3 operands; the error is cast to the gradient format."""

    @staticmethod
    def forward(ctx, x, w, b, dtype, grad_dtype, grad_p, kernel, rng):  # noqa: D102
        x8, sx = _scaled_cast(x, dtype)
        w8, sw = _scaled_cast(w, dtype)
        y = _mm8(x8, sx, w8.t(), sw, kernel)
        if b is not None:
            y = y + b
        # A copy of the gradient format's numbers: the backward must use the format of its own forward
        # even if the controller refills ``p`` in place before ``loss.backward()``.
        ctx.save_for_backward(x8, sx, w8, sw, None if grad_p is None else grad_p.clone())
        ctx.grad_dtype, ctx.kernel, ctx.has_bias = grad_dtype, kernel, b is not None
        ctx.grad_sr, ctx.rng = grad_p is not None, rng
        return y

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        _no_create_graph("fp8")
        x8, sx, w8, sw, grad_p = ctx.saved_tensors
        g8, sg = _scaled_cast(g.contiguous(), ctx.grad_dtype, grad_p if ctx.grad_sr else None, ctx.rng)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _mm8(g8, sg, w8.t().contiguous().t(), sw, ctx.kernel)
        if ctx.needs_input_grad[1]:
            gw = _mm8(g8.t().contiguous(), sg, x8.t().contiguous().t(), sx, ctx.kernel)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = (g8.float().sum(0) * sg)
        return gx, gw, gb, None, None, None, None, None


class _FakeScaledFP8(torch.autograd.Function):
    """Scaled FP8 round trip of ``x`` in the forward, straight-through gradient (emulated convs)."""

    @staticmethod
    def forward(ctx, x, dtype):  # noqa: D102
        x8, s = _scaled_cast(x, dtype)
        return x8.float() * s

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        return g, None


class _ScaledFP8Grad(torch.autograd.Function):
    """Identity in the forward; the error goes through a scaled FP8 round trip in the backward."""

    @staticmethod
    def forward(ctx, y, dtype, grad_p, rng):  # noqa: D102
        ctx.dtype, ctx.rng = dtype, rng
        ctx.save_for_backward(grad_p.clone())  # see _FP8Linear: the forward's format, not a later one
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        (p,) = ctx.saved_tensors
        g8, s = _scaled_cast(g, ctx.dtype, p if p.numel() else None, ctx.rng)
        q = g8.float() * s
        if torch.is_grad_enabled():  # create_graph=True: straight through, like the simulated error
            return g + (q - g).detach(), None, None, None
        return q, None, None, None


# --- the instance forwards -------------------------------------------------------------------------

class _HwLayer:
    """One layer's hardware state: its site, its two routes, and how its forwards ran."""

    __slots__ = ("site", "module", "train", "eval", "strict", "calls", "input_grad")

    def __init__(self, site: LayerSite, module: nn.Module, strict: bool, input_grad: str) -> None:
        self.site, self.module, self.strict, self.input_grad = site, module, strict, input_grad
        self.train = self.eval = _SIM
        self.calls: dict[str, int] = {}

    def set_routes(self, train: Route, eval: Route) -> None:
        self.train, self.eval = train, eval
        # The hooks of adaprec.quant.attach leave native calls alone (they still count the MACs).
        self.site.native = [eval.kind != "sim", train.kind != "sim"]

    def tally(self, what: str) -> None:
        # Plain Python bookkeeping: skipped while torch.compile traces, so it adds no guards.
        if not torch.compiler.is_compiling():
            self.calls[what] = self.calls.get(what, 0) + 1

    def forward(self, x: Tensor) -> Tensor:
        module = self.module
        training = module.training
        route = self.train if training else self.eval
        roles = self.site.roles(training)
        if isinstance(module, nn.Linear):
            return self._linear(route, roles, x, training)
        return self._conv(route, roles, x, training)

    def _grad(self, roles, y: Tensor, route: Route) -> Tensor:
        return roles.gradient.grad(y) if route.grad_quant and roles.gradient.active else y

    def _lowp(self, route: Route, roles, fn, x: Tensor) -> Tensor:
        dt = route.dtype
        m = self.module
        b = None if m.bias is None else m.bias.to(dt)
        y = fn(x.to(dt), m.weight.to(dt), b).float()
        return self._grad(roles, y, route)

    def _linear(self, route: Route, roles, x: Tensor, training: bool) -> Tensor:
        m = self.module
        if route.kind == "lowp":
            self.tally("lowp")
            return self._lowp(route, roles, F.linear, x)
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k)
        n = m.out_features
        if route.kind == "fp8":
            kernel = route.kernel and (not self.strict or _fp8_shape_ok(x2.shape[0], k, n))
            self.tally("fp8" if kernel else "fp8-emulated")
            gp = roles.gradient.p if route.grad_quant else None
            y = _FP8Linear.apply(x2, m.weight, m.bias, route.dtype, route.grad_dtype, gp, kernel,
                                 roles.gradient.rng)
        else:  # int8
            emulated = route.via == "int_mm" and self.strict and not _int_ok(x2.shape[0], k, n)
            self.tally("int8-emulated" if emulated else "int8")
            lo, hi = self._act_range(roles, x2, training)
            y = CodesLinear.apply(x2, m.weight, m.bias, lo, hi, roles.activation, roles.weight,
                                  roles.gradient, route.via, self.strict, self.input_grad)
        return y.reshape(*lead, n)

    def _act_range(self, roles, x: Tensor, training: bool) -> tuple[Tensor | None, Tensor | None]:
        if roles.activation.ranged:  # running range (EMA) in eval, folded in from training batches
            return roles.activation._range(x, training, not self.site.recomputing)
        return None, None

    def _conv(self, route: Route, roles, x: Tensor, training: bool) -> Tensor:
        m = self.module
        if route.kind == "lowp":
            self.tally("lowp")
            return self._lowp(route, roles, m._conv_forward, x)
        if route.kind == "int8":
            self.tally("int8")
            lo, hi = self._act_range(roles, x, training)
            geo = (list(m.stride), list(m.padding), list(m.dilation))
            return CodesConv.apply(x, m.weight, m.bias, lo, hi, roles.activation, roles.weight,
                                   roles.gradient, route.via, geo, self.input_grad)
        # fp8 on a convolution: scaled FP8 numbers, product in float32.
        self.tally("fp8-emulated")
        xq = _FakeScaledFP8.apply(x, route.dtype)
        wq = _FakeScaledFP8.apply(m.weight, route.dtype)
        y = m._conv_forward(xq, wq, m.bias)
        if not y.requires_grad:
            return y
        gp = roles.gradient.p if route.grad_quant else _EMPTY.to(y.device)
        return _ScaledFP8Grad.apply(y, route.grad_dtype, gp, roles.gradient.rng)


_EMPTY = torch.empty(0)


def _int_ok(m: int, k: int, n: int) -> bool:
    """CUDA's ``_int_mm`` shape rules."""
    return m > 16 and k % 8 == 0 and n % 8 == 0


def _hw_forward(self: nn.Module, *args: Tensor, **kwargs: Tensor) -> Tensor:
    """The class-level forward of a hardware-routed Linear/conv (see :mod:`adaprec.quant.attach`)."""
    site = self.__dict__[SITE]
    hw: _HwLayer = site.backend
    if site.native[self.training]:
        return hw.forward(args[0] if args else kwargs["input"])
    hw.tally("sim")  # the hooks quantize around the layer's own forward, as on the simulated backend
    return type(self)._adaprec_base.forward(self, *args, **kwargs)


def _stock_forward(module: nn.Module) -> bool:
    """A Linear/conv computing with torch's own forward (the routes re-implement exactly that)."""
    if "forward" in module.__dict__:  # an instance forward set by another library: run it, simulated
        return False
    if isinstance(module, nn.Linear):
        return type(module).forward is nn.Linear.forward
    if isinstance(module, nn.modules.conv._ConvNd):
        return type(module).forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)
    return False


class HardwareBackend(SimulatedBackend):
    """Real low-precision kernels where the decision and the device allow, simulation elsewhere.

    Args:
        kernels: which kernel families to use, a subset of :data:`KERNELS`; ``None`` uses every one that
            runs on the model's device. Naming one that does not run there is an error at attach.
        strict_shapes: apply the CUDA shape rules of ``_scaled_mm`` / ``_int_mm`` per call
            (falling back to the same numbers in float32); ``None``: only on CUDA devices.
        codes: the code kernel of the ``int8`` route (:data:`~adaprec.quant.intcodes.CODE_KERNELS`):
            ``"auto"`` (default) takes ``"int_mm"`` for Linear layers wherever the int8 kernel runs
            (measured on a CPU with AMX: ``_int_mm`` 2.3x faster than the ``"bf16"`` code kernel,
            ``benchmarks/results/speed.md``), and ``"bf16"`` for convolutions where bf16 products with
            float32 results run (the CPU; torch has no integer training convolution); ``"int_mm"``,
            ``"bf16"`` or ``"bf16-out"`` choose one (convolutions take ``"bf16"`` with ``"int_mm"``).
        input_grad: how the ``int8`` route computes the input gradient: ``"codes"`` (default; exact for
            per-tensor weight scales, the documented variant for per-channel ones) or ``"float32"``
            (dequantized tensors multiplied in float32, the simulated backend's numbers).

    See the module docstring for the routing table. ``routes()`` shows each layer's current
    (training, evaluation) routes; ``calls()`` counts, per layer, how forwards actually ran. Inside a
    :class:`~adaprec.Controller`, ``ctl.report()["route_time"]`` gives the step times per route.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16))
        >>> be = HardwareBackend(kernels=["bf16"])
        >>> be.attach(model, [("0", model[0])])
        ['0']
        >>> be.apply({"0": hardware_precision("bf16")})
        >>> _ = model(torch.randn(2, 16)); be.calls()
        {'0': {'lowp': 1}}
        >>> be.detach()
    """

    name = "hardware"

    def __init__(self, kernels: Iterable[str] | None = None, strict_shapes: bool | None = None,
                 codes: str = "auto", input_grad: str = "codes") -> None:
        super().__init__()
        if kernels is not None:
            if isinstance(kernels, str):
                kernels = [kernels]
            kernels = list(kernels)
            bad = [k for k in kernels if k not in KERNELS]
            if bad:
                raise ValueError(f"unknown kernel families {bad}; allowed: {list(KERNELS)}")
        if strict_shapes is not None and not isinstance(strict_shapes, bool):
            raise TypeError(f"strict_shapes must be True, False or None, got {strict_shapes!r}")
        if codes != "auto" and codes not in CODE_KERNELS:
            raise ValueError(f"codes must be 'auto' or one of {list(CODE_KERNELS)}, got {codes!r}")
        if input_grad not in ("codes", "float32"):
            raise ValueError(f"input_grad must be 'codes' or 'float32', got {input_grad!r}")
        self.requested = None if kernels is None else frozenset(kernels)
        self.strict_shapes = strict_shapes
        self.codes_requested = codes
        self.input_grad = input_grad
        self.kernels: frozenset[str] = frozenset()
        self.codes: str | None = None
        self.conv_codes: str | None = None
        self._hw: dict[str, _HwLayer] = {}
        self._strict = False
        self._bf16_units_lead = False
        self._signature = "sim"
        self._timer: _RouteTimer | None = None

    def attach(self, model: nn.Module, layers: list[tuple[str, nn.Module]]) -> list[str]:
        device = next(model.parameters()).device
        found = probe_kernels(device)
        if self.requested is not None and not self.requested <= found:
            raise RuntimeError(f"kernels {sorted(self.requested - found)} do not run on {device}; "
                               f"available there: {sorted(found)}")
        self.kernels = found if self.requested is None else self.requested
        self.codes, self.conv_codes = _choose_codes(self.codes_requested, self.kernels, device)
        self._bf16_units_lead = device.type == "cpu" and _amx()
        self._strict = device.type == "cuda" if self.strict_shapes is None else self.strict_shapes
        names = super().attach(model, layers)
        for name, site in self.sites.items():
            if site.backend is not None:
                self._hw[name] = site.backend
        return names

    def _forward_for(self, module: nn.Module, site: LayerSite):
        # Only layers that run torch's own Linear/conv forward get routes; any other forward (a
        # subclass's, another library's instance forward) is simulated around it by the hooks.
        if not _stock_forward(module):
            return super()._forward_for(module, site)  # LSTM/GRU/RNN: the layer table's quantized forward
        site.backend = _HwLayer(site, module, self._strict, self.input_grad)
        return _hw_forward

    def route_for(self, prec: Precision, module: nn.Module) -> Route:
        """The route ``module`` takes at ``prec`` with this backend's kernels (after attach)."""
        return route_for(prec, module, self.kernels, self.codes, self.conv_codes)

    def apply(self, train: dict[str, Precision], eval: dict[str, Precision] | None = None) -> None:
        super().apply(train, eval)
        for name, prec in train.items():
            hw = self._hw.get(name)
            if hw is None:
                continue
            ev = prec if eval is None else eval.get(name, prec)
            hw.set_routes(self.route_for(prec, hw.module), self.route_for(ev, hw.module))
        self._signature = _signature(self.routes(), {n: p.is_fp32 for n, p in train.items()})

    def detach(self) -> None:
        self._hw.clear()
        super().detach()

    def routes(self) -> dict[str, tuple[Route, Route]]:
        """``{layer: (training route, evaluation route)}``; layers the backend only simulates show
        ``Route("sim")``."""
        return {n: (self._hw[n].train, self._hw[n].eval) if n in self._hw else (_SIM, _SIM)
                for n in self.sites}

    def route_signature(self) -> str:
        """The training routes in force, e.g. ``"int8:bf16+sim"`` (what ``route_time`` groups steps by)."""
        return self._signature

    def calls(self) -> dict[str, dict[str, int]]:
        """How each layer's eager forwards ran so far: ``{"fp8": 12, "fp8-emulated": 1, ...}``."""
        return {n: dict(h.calls) for n, h in self._hw.items() if h.calls}

    # --- with a Controller ------------------------------------------------------------------------
    @property
    def muppet_levels(self) -> tuple:
        """The ladder :class:`~adaprec.policies.muppet.MuPPET` climbs on this backend by default, every
        level on a real kernel (docs/methods.md#hardware-ladder): fixed point ``fx8`` on the integer-code
        route, bf16 (autocast-style, errors rounded to nearest), FP32. ``fx8`` only leads where its codes
        run on ``_int_mm`` and integer products beat plain bf16 ones (GPUs, CPUs without AMX). On CPUs
        with AMX a plain bf16 product (the ``lowp`` route) is faster than ``_int_mm`` and needs no
        quantization passes, so ``fx8`` would be both slower and coarser than bf16 (measured:
        ``benchmarks/results/speed.md``), and the ladder starts at bf16."""
        bf16 = hardware_precision("bf16")
        fx8_leads = self.codes == "int_mm" and not self._bf16_units_lead
        return ("fx8", bf16, "fp32") if fx8_leads else (bf16, "fp32")

    def bind(self, ctl) -> None:
        """Called by the :class:`~adaprec.Controller` once attached: time its steps per route."""
        from ..events import Event

        self._timer = timer = _RouteTimer()
        ctl.on(Event.ITERATION_COMPLETED, lambda _ctl, **_: timer.step(self.route_signature()))
        ctl.add_report_section("route_time", lambda: {"route_time": timer.report()})


def _choose_codes(requested: str, kernels: frozenset[str], device: torch.device
                  ) -> tuple[str | None, str | None]:
    """The code kernels of Linear layers and of convolutions (``None``: that layer type simulates)."""
    bf16 = "bf16" in kernels
    acc = bf16 and bf16_accumulate_ok(device)
    if requested == "auto":
        # _int_mm wherever it runs: even on AMX, where plain bf16 products are the fastest, the bf16
        # *code* kernel (float32 code tensors in oneDNN's bf16 mode) measured 2.3x slower than _int_mm.
        linear = "int_mm" if "int8" in kernels else "bf16" if acc else None
        return linear, "bf16" if acc else None
    if requested == "int_mm":
        if "int8" not in kernels:
            raise RuntimeError(f"codes='int_mm' needs the int8 kernel, which does not run on {device}")
        return "int_mm", "bf16" if acc else None
    if not bf16:
        raise RuntimeError(f"codes={requested!r} needs bf16 kernels, which do not run on {device}")
    return requested, requested


def _amx() -> bool:
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(check()) if check is not None else False
    except Exception:  # noqa: BLE001
        return False


def _route_name(r: Route, fp32: bool) -> str:
    if r.kind == "sim":
        return "fp32" if fp32 else "sim"
    return f"int8:{r.via}" if r.kind == "int8" else r.kind if r.kernel else f"{r.kind}-emulated"


def _signature(routes: dict[str, tuple[Route, Route]], fp32: dict[str, bool]) -> str:
    """The training routes in force, e.g. ``"int8:bf16+sim"`` (distinct names, sorted; layers left in
    FP32 count as ``"fp32"``)."""
    return "+".join(sorted({_route_name(tr, fp32.get(n, False)) for n, (tr, _) in routes.items()})) or "sim"


class _RouteTimer:
    """Wall-clock and process CPU seconds of each training step, grouped by the routes it ran."""

    def __init__(self) -> None:
        import time

        self._clock, self._cpu = time.perf_counter, time.process_time
        self.last = (self._clock(), self._cpu())
        self.times: dict[str, list[tuple[float, float]]] = {}

    def step(self, signature: str) -> None:
        now = (self._clock(), self._cpu())
        self.times.setdefault(signature, []).append((now[0] - self.last[0], now[1] - self.last[1]))
        self.last = now

    def report(self) -> dict[str, dict[str, float]]:
        import statistics

        out = {}
        for sig, ts in self.times.items():
            wall, cpu = [t[0] for t in ts], [t[1] for t in ts]
            out[sig] = {"steps": len(ts), "total_s": sum(wall), "median_s": statistics.median(wall),
                        "median_cpu_s": statistics.median(cpu)}
        return out
