"""Low-precision parameter storage with Kahan-compensated updates (adaprec.optim,
docs/methods.md#kahan-update)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F

from adaprec.formats import FixedPoint, FloatFormat, IntFormat
from adaprec.optim import (
    Compensated,
    KahanSGD,
    Storage,
    optimizer_memory,
    resplit,
    storage_format,
)

torch.set_num_threads(1)


def _const_grad_steps(opt: torch.optim.Optimizer, params: list[torch.Tensor], grad: float, n: int) -> None:
    for _ in range(n):
        for p in params:
            p.grad = torch.full_like(p, grad)
        opt.step()


def _on_fixed_grid(w: torch.Tensor, fl: torch.Tensor, bits: int) -> bool:
    q = w * 2.0 ** float(fl)
    return bool(torch.equal(q, q.round()) and q.abs().max() <= 2 ** (bits - 1))


# ---------------------------------------------------------------------------------------------- formats
def test_storage_format_parsing() -> None:
    assert storage_format("fx8") == FixedPoint(8, rounding="nearest")
    assert storage_format(12) == FixedPoint(12, rounding="nearest")
    assert storage_format(FixedPoint(8)).rounding == "nearest"  # the update mode decides rounding
    assert storage_format("bf16") == FloatFormat("bf16")
    assert storage_format(32).kind == "fp32"
    # A min-max integer grid moves with the tensor: stored, it is fixed point of the same width.
    assert storage_format("int8") == storage_format(IntFormat(8)) == FixedPoint(8, rounding="nearest")
    for bad in ("fx", "float7", 1.5):
        with pytest.raises(ValueError):
            storage_format(bad)


def test_float_storage_rounding_matches_torch_casts() -> None:
    x = torch.randn(5000, generator=torch.Generator().manual_seed(0)) * 10.0
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16),
                        ("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)):
        got = Storage(name).quantize_weight(x)
        assert torch.equal(got, x.to(dtype).float()), name


def test_fixed_fractional_length_choice() -> None:
    s = Storage("fx8")  # headroom 1 bit
    assert float(s.fit(torch.tensor([0.9, -0.2]))) == 6  # floor(log2(127.5 / 0.9)) - 1
    assert float(s.fit(torch.zeros(5))) == 5  # zero_range = 1
    assert float(Storage("fx8", headroom_bits=0, zero_range=0.25).fit(torch.zeros(5))) == 8
    assert Storage("bf16").fit(torch.ones(3)) is None
    # An already-stored tensor keeps a grid that holds it: splitting it again is lossless.
    w = torch.randn(300, generator=torch.Generator().manual_seed(1))
    stored, _, fl = Storage("fx8", headroom_bits=0).split(w)
    again, c, fl2 = Storage("fx8", headroom_bits=3).split(stored)
    assert torch.equal(again, stored) and torch.count_nonzero(c) == 0 and float(fl2) >= float(fl) - 3


# ---------------------------------------------------------------------------------------------- swamping
def test_swamping_fixed_point_8bit() -> None:
    init = torch.linspace(-0.9, 0.9, 64)
    n, grad = 100, 1.0
    near_p = torch.nn.Parameter(init.clone())
    near = KahanSGD([near_p], lr=1.0, weight_format="fx8", update="nearest")
    kah_p = torch.nn.Parameter(init.clone())
    kah = KahanSGD([kah_p], lr=1.0, weight_format="fx8", update="kahan")
    fl = kah.state[kah_p]["w_fl"]
    assert float(fl) == 6
    step = 2.0 ** -float(fl)
    ulp_c = kah.storage_for(kah_p).comp_ulp(fl)
    assert ulp_c == 2.0 ** -13  # FL_c = FL_w + n - 1
    lr = 0.3 * step  # every step is under half a grid step
    for g in (near.param_groups[0], kah.param_groups[0]):
        g["lr"] = lr
    w0_near = near_p.detach().clone()
    hp0 = (kah_p.detach() + kah.state[kah_p]["comp"]).double()
    ref32 = torch.nn.Parameter((kah_p.detach() + kah.state[kah_p]["comp"]).clone())
    sgd = torch.optim.SGD([ref32], lr=lr)
    _const_grad_steps(near, [near_p], -grad, n)
    _const_grad_steps(kah, [kah_p], -grad, n)
    _const_grad_steps(sgd, [ref32], -grad, n)

    assert torch.equal(near_p.detach(), w0_near)  # plain rounding never moves the weight
    moved = (kah_p.detach() - w0_near).abs() / step
    assert moved.min() >= 29 and moved.max() <= 31  # 100 * 0.3 grid steps
    assert _on_fixed_grid(kah_p.detach(), fl, 8) and float(kah.state[kah_p]["w_fl"]) == 6  # grid kept
    total = kah_p.detach().double() + kah.state[kah_p]["comp"].double()
    exact = hp0 + n * lr
    assert (total - exact).abs().max() <= n * ulp_c / 2  # only Δ's rounding onto the c grid is lost
    assert (total - ref32.detach().double()).abs().max() <= n * ulp_c / 2 + 1e-5
    assert kah.state[kah_p]["comp"].abs().max() <= step / 2


def test_swamping_fixed_point_exact_when_step_on_comp_grid() -> None:
    p = torch.nn.Parameter(torch.linspace(-0.9, 0.9, 32))
    opt = KahanSGD([p], lr=0.25 * 2.0**-6 + 3 * 2.0**-13, weight_format="fx8")
    hp0 = p.detach() + opt.state[p]["comp"]
    _const_grad_steps(opt, [p], 1.0, 50)
    assert torch.equal(p.detach() + opt.state[p]["comp"], hp0 - 50 * opt.param_groups[0]["lr"])


def test_swamping_bf16() -> None:
    init = torch.cat([1.0 + torch.arange(16) * 2.0**-7, 0.5 + torch.arange(16) * 2.0**-8])  # bf16 values
    n, lr = 200, 2.0**-11  # half a bf16 step is 2**-8 in [1, 2) and 2**-9 in [0.5, 1)
    near_p, kah_p = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    near = KahanSGD([near_p], lr=lr, weight_format="bf16", update="nearest")
    kah = KahanSGD([kah_p], lr=lr, weight_format="bf16")
    _const_grad_steps(near, [near_p], 1.0, n)
    _const_grad_steps(kah, [kah_p], 1.0, n)
    assert torch.equal(near_p.detach(), init)
    assert torch.equal(kah_p.detach().to(torch.bfloat16).float(), kah_p.detach())  # stored in bf16
    assert torch.equal(kah_p.detach() + kah.state[kah_p]["comp"], init - n * lr)  # exact here
    assert (kah_p.detach() - init).abs().min() > 0.05

    # A step that is not representable: error bounded by the bf16 compensation's rounding.
    p = torch.nn.Parameter(init.clone())
    opt = KahanSGD([p], lr=1.3e-4, weight_format="bf16")
    ref = torch.nn.Parameter(init.clone())
    sgd = torch.optim.SGD([ref], lr=1.3e-4)
    _const_grad_steps(opt, [p], 1.0, n)
    _const_grad_steps(sgd, [ref], 1.0, n)
    err = (p.detach() + opt.state[p]["comp"] - ref.detach()).abs().max()
    assert err <= n * 2.0**-9 * (1.3e-4 + 2.0**-8)
    assert err < 0.05 * n * 1.3e-4  # bf16 c is coarse, yet >95% of the movement survives (nearest: 0%)


def test_compensated_adam_swamping() -> None:
    init = torch.linspace(-0.9, 0.9, 32)
    out = {}
    for update in ("nearest", "kahan"):
        p = torch.nn.Parameter(init.clone())
        opt = Compensated(torch.optim.Adam([p], lr=2e-3), weight_format="fx8", update=update)
        w0 = p.detach().clone()
        hp0 = w0 + opt.state[p]["comp"] if update == "kahan" else w0
        _const_grad_steps(opt, [p], 1.0, 100)  # Adam steps ~lr = 0.13 of a 2**-6 grid step
        hp = p.detach() + opt.state[p]["comp"] if update == "kahan" else p.detach()
        out[update] = (p.detach() - w0, hp - hp0)
    assert torch.count_nonzero(out["nearest"][0]) == 0
    moved, total = out["kahan"]
    assert moved.abs().min() >= 2.0**-6  # the stored weights did move
    # Each step (2e-3 = 16.4 units of the 2**-13 compensation grid) loses at most half a unit.
    assert (total + 0.2).abs().max() <= 100 * 2.0**-14


# ---------------------------------------------------------------------------------------------- stochastic
@pytest.mark.parametrize("fmt,w0,frac", [("fx8", 0.0, 0.3), ("bf16", 1.0, 0.125)])
def test_stochastic_rounding_is_unbiased(fmt: str, w0: float, frac: float) -> None:
    m, n = 20000, 10
    p = torch.nn.Parameter(torch.full((m,), w0))
    opt = KahanSGD([p], lr=1.0, weight_format=fmt, update="stochastic", seed=3)
    step = 2.0 ** -float(opt.state[p]["w_fl"]) if fmt == "fx8" else 2.0**-7
    opt.param_groups[0]["lr"] = frac * step
    _const_grad_steps(opt, [p], -1.0, n)
    moved = (p.detach() - w0) / step
    assert set(moved.unique().tolist()) <= set(range(n + 1))  # stays on the grid
    sigma = (n / 4 / m) ** 0.5
    assert abs(moved.mean().item() - n * frac) < 5 * sigma
    # ... while round-to-nearest loses every one of these steps
    q = torch.nn.Parameter(torch.full((m,), w0))
    near = KahanSGD([q], lr=frac * step, weight_format=fmt, update="nearest")
    _const_grad_steps(near, [q], -1.0, n)
    assert torch.equal(q.detach(), torch.full((m,), w0))


def test_stochastic_rounding_seed_reproducible() -> None:
    res = []
    for _ in range(2):
        p = torch.nn.Parameter(torch.zeros(1000))
        opt = KahanSGD([p], lr=0.01, weight_format="fx8", update="stochastic", seed=7)
        _const_grad_steps(opt, [p], 1.0, 5)
        res.append(p.detach().clone())
    assert torch.equal(res[0], res[1])


# ---------------------------------------------------------------------------------------------- resplit
def test_resplit_preserves_w_plus_c() -> None:
    hp = torch.randn(500, generator=torch.Generator().manual_seed(2)) * 0.4
    w, c, fl = Storage("fx8").split(hp)
    assert (w + c - hp).abs().max() <= Storage("fx8").comp_ulp(fl) / 2
    for new_w, new_c in (("fx12", None), ("fx4", None), ("fx8", "fx16"), ("fx6", "bf16"), ("fx8", "fp32")):
        before = (w + c).clone()
        fl = resplit(w, c, new_w, new_c)
        s = Storage(new_w, new_c)
        assert _on_fixed_grid(w, fl, s.weight.bits)
        tol = s.comp_ulp(fl) / 2 if new_c is None or new_c.startswith("fx") else 2.0**-8 * c.abs().max()
        assert (w + c - before).abs().max() <= tol + 1e-12, (new_w, new_c)
    before = (w + c).clone()
    assert resplit(w, c, "bf16") is None
    assert torch.equal(w.to(torch.bfloat16).float(), w) and torch.equal(c.to(torch.bfloat16).float(), c)
    assert ((w + c - before).abs() <= 2.0**-9 * (before - w).abs() + 1e-12).all()


def test_set_format_and_group_edit_resplit() -> None:
    p = torch.nn.Parameter(torch.randn(200, generator=torch.Generator().manual_seed(4)) * 0.3)
    opt = KahanSGD([p], lr=1e-3, weight_format="fx8")
    _const_grad_steps(opt, [p], 0.37, 20)
    total = p.detach() + opt.state[p]["comp"]
    opt.set_format("fx16")
    fl = opt.state[p]["w_fl"]
    assert _on_fixed_grid(p.detach(), fl, 16)
    assert (p.detach() + opt.state[p]["comp"] - total).abs().max() <= 2.0 ** -(float(fl) + 15) / 2
    # Editing the group directly takes effect (re-split) at the next step.
    opt.param_groups[0]["weight_format"] = FloatFormat("bf16")
    total = p.detach() + opt.state[p]["comp"]
    p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.param_groups[0]["weight_format"] == "bf16" and "w_fl" not in opt.state[p]
    assert torch.equal(p.detach().to(torch.bfloat16).float(), p.detach())
    assert (p.detach() + opt.state[p]["comp"] - total).abs().max() < 1e-5
    # Switching Kahan off folds the compensation into the weight.
    opt.set_format("fx8", update="nearest")
    assert "comp" not in opt.state[p]


def test_overflow_rescales_or_saturates() -> None:
    for overflow in ("rescale", "saturate"):
        p = torch.nn.Parameter(torch.tensor([0.5, -0.5, 0.1]))
        opt = KahanSGD([p], lr=0.05, weight_format="fx8", overflow=overflow)
        fl0 = float(opt.state[p]["w_fl"])
        _const_grad_steps(opt, [p], -1.0, 30)  # +1.5: far past the initial range of ~1.0
        fl = float(opt.state[p]["w_fl"])
        if overflow == "rescale":
            assert fl < fl0 and _on_fixed_grid(p.detach(), opt.state[p]["w_fl"], 8)
            assert torch.allclose(p.detach() + opt.state[p]["comp"], torch.tensor([2.0, 1.0, 1.6]), atol=2e-3)
        else:
            assert fl == fl0 and float(p.detach()[0]) == 127 * 2.0**-fl0


# ---------------------------------------------------------------------------------------------- parity
def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(n)]


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, batches: list) -> None:
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_fp32_nearest_is_torch_sgd_bitwise() -> None:
    kw = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    torch.manual_seed(0)
    a = torch.nn.Linear(12, 4)
    b = copy.deepcopy(a)
    _train(a, torch.optim.SGD(a.parameters(), **kw), _batches(30))
    _train(b, KahanSGD(b.parameters(), **kw, weight_format="fp32", update="nearest"), _batches(30))
    assert all(torch.equal(u, v) for u, v in zip(a.parameters(), b.parameters()))


def test_compensated_sgd_matches_kahan_sgd() -> None:
    torch.manual_seed(0)
    a = torch.nn.Linear(12, 4)
    b = copy.deepcopy(a)
    oa = KahanSGD(a.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, weight_format="fx8")
    ob = Compensated(torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3), "fx8")
    _train(a, oa, _batches(30))
    _train(b, ob, _batches(30))
    for u, v in zip(a.parameters(), b.parameters()):
        hu, hv = u.detach() + oa.state[u]["comp"], v.detach() + ob.state[v]["comp"]
        assert (hu - hv).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------- resume
MAKERS = {
    "kahan_fx8_nesterov": lambda ps: KahanSGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3,
                                              weight_format="fx8"),
    "stochastic_bf16": lambda ps: KahanSGD(ps, lr=0.05, momentum=0.5, weight_format="bf16",
                                           update="stochastic", seed=11),
    "adam_fx8": lambda ps: Compensated(torch.optim.Adam(ps, lr=1e-3), "fx8", "fx12"),
    "adamw_stochastic": lambda ps: Compensated(torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1),
                                               "fp8_e4m3", update="stochastic", seed=5),
    "adam_8bit_state": lambda ps: Compensated(torch.optim.Adam(ps, lr=1e-3), "fx8", state_format="8bit"),
    "sgd_fp8_state": lambda ps: KahanSGD(ps, lr=0.05, momentum=0.9, weight_format="bf16", state_format="fp8"),
    "sgd_bf16_stochastic_state": lambda ps: KahanSGD(ps, lr=0.05, momentum=0.9, weight_format="bf16",
                                                     state_format="bf16_stochastic", seed=3),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
@pytest.mark.parametrize("optimizer_first", [True, False])
def test_state_dict_round_trip_bitwise(name: str, optimizer_first: bool) -> None:
    make = MAKERS[name]
    batches = _batches(20)
    torch.manual_seed(0)
    model = torch.nn.Linear(12, 4)
    opt = make(model.parameters())
    _train(model, opt, batches[:10])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train(model, opt, batches[10:])

    buf.seek(0)
    ck = torch.load(buf, weights_only=True)  # plain strings, numbers and tensors only
    torch.manual_seed(123)
    other = torch.nn.Linear(12, 4)
    if optimizer_first:
        opt2 = make(other.parameters())
        other.load_state_dict(ck["model"])
    else:  # building the optimizer on already-stored weights must not change them
        other.load_state_dict(ck["model"])
        opt2 = make(other.parameters())
        assert all(torch.equal(p, ck["model"][k]) for k, p in other.named_parameters())
    opt2.load_state_dict(ck["opt"])
    _train(other, opt2, batches[10:])
    for u, v in zip(model.parameters(), other.parameters()):
        assert torch.equal(u, v)
    if isinstance(opt2, Compensated):
        assert opt2.param_groups is opt2.inner.param_groups


def test_compensated_closure_and_scheduler() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(12, 4)
    opt = Compensated(torch.optim.SGD(model.parameters(), lr=0.1), "bf16")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = _batches(1)[0]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    l0 = opt.step(closure).detach()
    sched.step()
    assert opt.inner.param_groups[0]["lr"] == 0.05
    for _ in range(5):
        opt.step(closure)
    assert closure().detach().item() < l0.item()


# ---------------------------------------------------------------------------------------------- errors
def test_bad_inputs() -> None:
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="lr"):
        KahanSGD([p], lr=-0.1)
    with pytest.raises(ValueError, match="unknown update mode"):
        KahanSGD([p], lr=0.1, update="round")
    with pytest.raises(ValueError, match="wider than the FP32 master"):
        KahanSGD([p], lr=0.1, weight_format="fx16", comp_format="fx26")
    with pytest.raises(ValueError, match="wider than the FP32 master"):
        Storage("fx28")
    Storage("fx16", "fx25")  # 24 significand bits: as fine as the master, allowed
    Storage("bf16", "fp32")
    with pytest.raises(ValueError, match="needs a fixed-point weight format"):
        Storage("bf16", "fx8")
    with pytest.raises(ValueError, match="only used with update='kahan'"):
        KahanSGD([p], lr=0.1, comp_format="bf16", update="nearest")
    assert KahanSGD([p], lr=0.1, weight_format="int8").param_groups[0]["weight_format"] == "fx8"
    with pytest.raises(ValueError, match="nesterov"):
        KahanSGD([p], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="momentum"):
        KahanSGD([p], lr=0.1, momentum=-0.9)
    with pytest.raises(ValueError, match="headroom_bits"):
        Storage("fx8", headroom_bits=-1)
    with pytest.raises(ValueError, match="overflow"):
        Storage("fx8", overflow="wrap")
    with pytest.raises(ValueError, match="zero_range"):
        Storage("fx8", zero_range=0.0)
    with pytest.raises(TypeError, match="float32"):
        KahanSGD([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))], lr=0.1)
    with pytest.raises(ValueError, match="unknown update mode"):
        Storage("fx8").add_(torch.zeros(2), torch.zeros(2), fl=torch.tensor(4.0), update="nope")
    opt = KahanSGD([p], lr=0.1)
    with pytest.raises(ValueError, match="out of range"):
        opt.set_format("fx8", groups=[3])
    opt.param_groups[0]["lr"] = -1.0
    p.grad = torch.zeros(3)
    with pytest.raises(ValueError, match="lr"):
        opt.step()


class _MySGD(torch.optim.SGD):
    pass


@pytest.mark.parametrize("inner", [
    lambda ps: torch.optim.Adamax(ps),
    lambda ps: torch.optim.LBFGS(ps),
    lambda ps: _MySGD(ps, lr=0.1),
    lambda ps: KahanSGD(ps, lr=0.1),
])
def test_unsupported_inner_optimizer(inner) -> None:
    with pytest.raises(TypeError, match=r"torch\.optim\.SGD, torch\.optim\.Adam, torch\.optim\.AdamW"):
        Compensated(inner([torch.nn.Parameter(torch.zeros(3))]))


# ---------------------------------------------------------------------------------------------- memory
def test_memory_is_measured_from_storages() -> None:
    lin = torch.nn.Linear(64, 10)
    n = 650
    r = optimizer_memory(torch.optim.Adam(lin.parameters()))
    assert (r.params, r.weight, r.compensation, r.optimizer_state, r.gradients) == (n, 4 * n, 0, 0, 0)
    assert r.fp32_total == 4 * n  # Adam's moments do not exist before the first step
    opt = torch.optim.Adam(lin.parameters())
    F.cross_entropy(lin(torch.randn(4, 64)), torch.randint(0, 10, (4,))).backward()
    opt.step()
    r = optimizer_memory(opt)
    assert r.optimizer_state == 8 * n + 2 * 4 and r.gradients == 4 * n  # two moments, two step counters
    assert r.fp32_total == r.total and r.savings_vs_fp32 == 0.0
    # fx8 weights (float32 tensors here: the simulation) with an int8 compensation and 8-bit momentum.
    opt = KahanSGD(lin.parameters(), lr=0.1, momentum=0.9, weight_format="fx8", state_format="8bit")
    F.cross_entropy(lin(torch.randn(4, 64)), torch.randint(0, 10, (4,))).backward()
    opt.step()
    r = optimizer_memory(opt)
    assert r.weight == 4 * n and r.compensation == n + 2 * 4  # codes + FL_c per tensor
    # momentum: codes (1 B), one float32 block scale and a sign flag per tensor; w_fl 4 B per tensor
    assert r.optimizer_state == n + 2 * (4 + 1) + 2 * 4
    # A view shares its base's storage: counted once.
    shared = torch.nn.Parameter(torch.zeros(100))
    r = optimizer_memory(torch.optim.SGD([{"params": [shared]}], lr=0.1))
    assert r.weight == 400


# ---------------------------------------------------------------------------------------------- state
def test_state_formats_hold_buffers_compactly_and_close_to_fp32() -> None:
    from adaprec.compact import StoredTensor
    from adaprec.optim.state import dynamic_map

    batches = _batches(15)
    torch.manual_seed(0)
    ref_model = torch.nn.Linear(12, 4)
    ref = Compensated(torch.optim.Adam(ref_model.parameters(), lr=1e-3), "fp32", update="nearest")
    _train(ref_model, ref, batches)
    for fmt, tol in (("bf16", 0.02), ("8bit", 0.1), ("fp8", 0.1)):  # of the largest moment
        torch.manual_seed(0)
        model = torch.nn.Linear(12, 4)
        opt = Compensated(torch.optim.Adam(model.parameters(), lr=1e-3), "fp32", update="nearest",
                          state_format=fmt)
        _train(model, opt, batches)
        w = model.weight
        st = opt.inner.state[w]
        assert isinstance(st["exp_avg"], StoredTensor) and isinstance(st["exp_avg_sq"], StoredTensor)
        assert type(st["step"]) is torch.Tensor  # the step counter stays as torch keeps it
        m_ref = ref.inner.state[ref_model.weight]["exp_avg"]
        assert ((st["exp_avg"].plain() - m_ref).abs() <= tol * m_ref.abs().max()).all(), fmt
        assert (w - ref_model.weight).abs().max() < 1e-3, fmt
    # The dynamic map: 255 signed values (zero once) and 256 unsigned ones, the largest exactly 1.
    for signed, n, smallest in ((True, 255, 1e-6), (False, 256, 1e-7)):
        m = dynamic_map(signed)
        assert len(m) == n and float(m[-1]) == 1.0 and bool((m[1:] > m[:-1]).all())
        assert float(m[m > 0].min()) == pytest.approx(smallest)
    with pytest.raises(ValueError, match="unknown state_format 'int8'; use one of"):
        KahanSGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, state_format="int8")
    with pytest.raises(ValueError, match="unknown state_format"):
        Compensated(torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1), state_format="bf8")


def test_stochastic_bf16_state_keeps_slow_averages_moving() -> None:
    # An EMA with decay 0.999 of a constant 1: in bf16 rounded to nearest it stalls once 0.001 (1 - m) is
    # under half a bf16 step of m; rounded stochastically it follows 1 - 0.999^t on average.
    n, t = 2000, 1500
    out = {}
    for fmt in ("bf16", "bf16_stochastic", "fp32"):
        p = torch.nn.Parameter(torch.zeros(n))
        opt = KahanSGD([p], lr=0.0, momentum=0.999, dampening=0.999, weight_format="fp32", state_format=fmt,
                       seed=0)
        _const_grad_steps(opt, [p], 0.0, 1)  # the buffer starts as the first gradient: 0
        _const_grad_steps(opt, [p], 1.0, t)
        buf = opt.state[p]["momentum_buffer"]
        out[fmt] = (buf.plain() if fmt != "fp32" else buf).mean().item()
    exact = 1 - 0.999**t
    assert abs(out["fp32"] - exact) < 1e-4
    assert abs(out["bf16_stochastic"] - exact) < 0.01
    assert out["bf16"] < exact - 0.1  # stalled


# ---------------------------------------------------------------------------------------------- training
def _digits_run(make, epochs: int = 5) -> tuple[float, float]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1400], perm[1400:]
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10)
    opt = make(model.parameters())
    for ep in range(epochs):
        order = tr[torch.randperm(len(tr), generator=torch.Generator().manual_seed(ep))]
        for i in range(0, len(order), 32):
            idx = order[i:i + 32]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        return (F.cross_entropy(model(x[tr]), y[tr]).item(),
                (model(x[te]).argmax(1) == y[te]).float().mean().item())


def test_fixed_point_storage_trains_digits_like_fp32() -> None:
    loss32, acc32 = _digits_run(lambda ps: torch.optim.SGD(ps, lr=0.05))
    loss16, acc16 = _digits_run(lambda ps: KahanSGD(ps, lr=0.05, weight_format="fx16"))
    assert acc32 > 0.85
    assert abs(loss16 - loss32) < 0.01 and abs(acc16 - acc32) <= 0.01
    # With 8-bit storage compensation is what keeps it there: plain rounding swamps.
    loss8k, acc8k = _digits_run(lambda ps: KahanSGD(ps, lr=0.05, weight_format="fx8"))
    loss8n, _ = _digits_run(lambda ps: KahanSGD(ps, lr=0.05, weight_format="fx8", update="nearest"))
    assert abs(loss8k - loss32) < 0.02 and abs(acc8k - acc32) <= 0.02
    assert loss8n > loss8k + 0.2


def test_memory_counts_a_tensor_subclass_state_by_its_parts() -> None:
    optim = pytest.importorskip("torchao.optim", reason="torchao is not installed (optional extra: "
                                                        "pip install 'adaprec[torchao]')")
    p = torch.nn.Parameter(torch.zeros(4096))
    opt = torch.optim.SGD([p], lr=0.1)
    opt.state[p]["exp_avg"] = optim.AdamW8bit._subclass_zeros(p, True, 256)  # torchao's 8-bit state
    r = optimizer_memory(opt)
    # codes (1 byte each), a float32 scale per 256 elements and the 256-entry map
    assert r.optimizer_state == 4096 + 4096 // 256 * 4 + 256 * 4 and r.fp32_total == 2 * 4 * 4096
