"""The hardware backend's integer-code route (issue 12): every width <= 8 of CPT's min-max grid and of
fixed point on code kernels, product by product against the simulated backend; the fused code kernels;
no recompiles when bits change; restore, resume and the route report on the hardware backend.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaprec
from adaprec.decision import Decision
from adaprec.formats import FixedPoint, IntFormat, Precision, codes
from adaprec.formats.rounding import draw_noise
from adaprec.policies import Policy
from adaprec.policies.muppet import MuPPET
from adaprec.quant.hardware import HardwareBackend, _amx, hardware_precision, probe_kernels
from adaprec.quant.simulated import SimulatedBackend

CPU = probe_kernels("cpu")
needs_codes = pytest.mark.skipif(not {"int8", "bf16"} <= CPU, reason="int8/bf16 kernels do not run here")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run(backend, prec, module, x, seed=1):
    """Forward and backward of a copy of ``module``: y, dx, dW, db, calls."""
    m = copy.deepcopy(module)
    backend.attach(m, [("l", m)])
    try:
        backend.apply({"l": prec})
        xx = x.detach().clone().requires_grad_()
        torch.manual_seed(seed + 1000)
        y = m(xx)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
        torch.manual_seed(seed)
        y.backward(g)
        calls = backend.calls() if isinstance(backend, HardwareBackend) else None
        return (y.detach(), xx.grad, m.weight.grad, None if m.bias is None else m.bias.grad), calls
    finally:
        backend.detach()


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


# float32 summation order only (exact kernels); one bf16 rounding of a product's result or operand.
EXACT, BF16 = 2e-5, 2.0**-7

MODULES = {
    "linear": lambda: (nn.Linear(40, 24), torch.randn(2, 20, 40)),
    "conv": lambda: (nn.Conv2d(3, 8, 3, padding=1), torch.randn(4, 3, 6, 6)),
    "conv-s2": lambda: (nn.Conv2d(4, 6, 3, stride=2), torch.randn(3, 4, 7, 7)),
    "conv-dil": lambda: (nn.Conv2d(2, 4, 3, padding=2, dilation=2), torch.randn(2, 2, 6, 5)),
    "conv1d": lambda: (nn.Conv1d(3, 5, 4, padding=1), torch.randn(3, 3, 9)),
}


@needs_codes
@pytest.mark.parametrize("bits", [2, 3, 5, 8])
@pytest.mark.parametrize("family", ["cpt", "fixed"])
@pytest.mark.parametrize("kernel", ["int_mm", "bf16", "bf16-out"])
@pytest.mark.parametrize("kind", list(MODULES))
def test_code_routes_match_simulation_per_width_and_product(kind, kernel, family, bits):
    if kernel == "int_mm" and kind != "linear":
        pytest.skip("int_mm multiplies matrices only (convolutions take bf16)")
    if kind != "linear" and kind != "conv" and (bits in (3, 5) or family == "fixed" and kernel != "bf16"):
        pytest.skip("geometries: a few widths are enough")
    torch.manual_seed(0)
    module, x = MODULES[kind]()
    prec = Precision.cpt(bits, 8) if family == "cpt" else Precision.fixed_point(bits)
    (y, dx, dw, db), calls = _run(HardwareBackend(codes=kernel), prec, module, x)
    assert calls == {"l": {"int8": 1}}
    (ys, dxs, dws, dbs), _ = _run(SimulatedBackend(), prec, module, x)
    rounded = kernel == "bf16-out"  # the product's result comes back in bf16
    tol = BF16 if rounded else EXACT
    assert _rel(y, ys) <= tol, "forward"
    assert _rel(dw, dws) <= tol, "weight gradient"
    assert _rel(db, dbs) <= EXACT, "bias gradient (a sum of codes)"
    if family == "fixed":  # per-tensor weight scales: the input gradient is an integer product too
        assert _rel(dx, dxs) <= tol, "input gradient"
    elif kernel != "int_mm":  # per-channel scales: the scaled weight codes are rounded to bf16
        assert _rel(dx, dxs) <= BF16, "input gradient"


@needs_codes
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_input_grad_float32_gives_the_simulated_numbers(kind):
    torch.manual_seed(0)
    module, x = MODULES[kind]()
    for kernel in (["int_mm", "bf16"] if kind == "linear" else ["bf16"]):
        out, _ = _run(HardwareBackend(codes=kernel, input_grad="float32"), Precision.cpt(4, 8), module, x)
        ref, _ = _run(SimulatedBackend(), Precision.cpt(4, 8), module, x)
        for a, b in zip(out, ref):
            assert _rel(a, b) <= EXACT


@needs_codes
def test_int_mm_input_grad_variant_is_unbiased():
    """With per-channel weight scales on int_mm, the error is re-quantized with the scales folded in:
    not the simulated numbers, but like them an unbiased estimate of ``G @ W_q``."""
    torch.manual_seed(0)
    lin, x = nn.Linear(24, 16, bias=False), torch.randn(32, 24)
    prec = Precision.cpt(6, 6)
    g = torch.randn(32, 16, generator=torch.Generator().manual_seed(7))
    wq = IntFormat(6, per_channel=True).quantize(lin.weight.detach())
    exact = g @ wq
    outs = [_run(HardwareBackend(codes="int_mm"), prec, lin, x, seed=s)[0][1] for s in range(40)]
    sims = [_run(SimulatedBackend(), prec, lin, x, seed=s)[0][1] for s in range(40)]
    one = (outs[0] - exact).abs().mean()
    assert not torch.equal(outs[0], outs[1])
    assert (torch.stack(outs).mean(0) - exact).abs().mean() < 0.35 * one  # averaging removes the noise
    # and a single draw is about as noisy as the simulated backend's own quantized error
    assert one < 2.5 * (sims[0] - exact).abs().mean()


def test_fused_code_kernels_are_bit_identical_to_the_op_by_op_chain():
    torch.manual_seed(0)
    cases = [
        (IntFormat(4, per_channel=True), torch.randn(256, 160), torch.float32, True),
        (IntFormat(8, rounding="stochastic"),
         torch.randn(32, 16, 10, 10).contiguous(memory_format=torch.channels_last), torch.bfloat16, False),
    ]
    for fmt, x, dtype, centered in cases:
        assert x.numel() >= codes.FUSE_MIN
        p = torch.tensor(fmt.params())
        noise = draw_noise(x, 0).clone() if fmt.stochastic else None
        codes.set_fused(False)
        try:
            ref = fmt.encode(x, p, centered=centered, noise=noise, dtype=dtype)
        finally:
            codes.set_fused(True)
        out = fmt.encode(x, p, centered=centered, noise=noise, dtype=dtype)
        assert codes.fused_enabled(), "the compiled kernel failed"
        assert torch.equal(out[0], ref[0]) and out[0].stride() == ref[0].stride()
        assert torch.equal(out[1], ref[1]) and torch.equal(out[2], ref[2])
        # codes * scale + offset is the simulated format's value
        assert torch.allclose(out[0].float() * out[1] + out[2], fmt.with_rounding("nearest").quantize(x)
                              if not fmt.stochastic else out[0].float() * out[1] + out[2], atol=1e-6)


@needs_codes
@pytest.mark.parametrize("family", ["cpt", "fixed"])
def test_large_layers_on_fused_epilogues_and_integer_code_sums_match_simulation(family):
    """Above FUSE_MIN the int_mm route converts its int32 sums inside the fused epilogue and takes code
    sums as products with ones: still the simulated numbers, and the same with fusion switched off."""
    torch.manual_seed(0)
    lin, x = nn.Linear(160, 256), torch.randn(2, 128, 160)
    assert 256 * 256 >= codes.FUSE_MIN and 256 * 160 >= codes.FUSE_MIN
    prec = Precision.cpt(4, 8) if family == "cpt" else Precision.fixed_point(6)
    (y, dx, dw, db), _ = _run(HardwareBackend(codes="int_mm"), prec, lin, x)
    (ys, dxs, dws, dbs), _ = _run(SimulatedBackend(), prec, lin, x)
    assert _rel(y, ys) <= EXACT and _rel(dw, dws) <= EXACT and _rel(db, dbs) <= EXACT
    if family == "fixed":
        assert _rel(dx, dxs) <= EXACT
    codes.set_fused(False)
    try:
        (y0, dx0, dw0, db0), _ = _run(HardwareBackend(codes="int_mm"), prec, lin, x)
    finally:
        codes.set_fused(True)
    for a, b in ((y, y0), (dx, dx0), (dw, dw0), (db, db0)):
        assert _rel(a, b) <= EXACT


def test_integer_code_sums_and_int32_epilogue_are_exact():
    from adaprec.quant.intcodes import _code_sum

    torch.manual_seed(0)
    q = torch.randint(-128, 128, (300, 200), dtype=torch.int8)
    assert q.numel() >= codes.FUSE_MIN
    for dim in (0, 1):
        for keep in (False, True):
            assert torch.equal(_code_sum(q, dim, keep), q.sum(dim, keepdim=keep, dtype=torch.float32))
    acc = torch.randint(-2**20, 2**20, (300, 200), dtype=torch.int32)
    scale, add = torch.rand(1, 200), torch.rand(1, 200)
    col, colw = torch.rand(300, 1), torch.tensor(0.3)
    out = codes.scale_add_(acc, scale, add, col, colw)
    assert out.dtype == torch.float32 and acc.dtype == torch.int32
    assert torch.allclose(out, acc.float() * scale + col * colw + add, rtol=1e-6)
    w = torch.rand(1, 200)
    assert _rel(codes.weighted_row_sum(q, w), (q.float() * w).sum(1, keepdim=True)) <= EXACT
    assert codes.fused_enabled(), "a compiled kernel failed"


def test_encode_reproduces_the_simulated_format():
    torch.manual_seed(0)
    for fmt in (IntFormat(3, per_channel=True), IntFormat(7), FixedPoint(5, "nearest")):
        x = torch.randn(6, 9)
        p = torch.tensor(fmt.params())
        for centered in (False, True):
            q, s, o = fmt.encode(x, p, centered=centered)
            assert torch.allclose(q * s + o, fmt.quantize(x), atol=1e-6)
            assert q.abs().max() <= 2**fmt.bits - 1 and torch.equal(q, q.round())
            if centered and not fmt.offset_free:
                assert (o.abs() <= s / 2 + 1e-7).all()  # the range holds 0: the offset is at most half a step
    with pytest.raises(NotImplementedError, match="no integer codes"):
        hardware_precision("bf16").weight.encode(torch.ones(2), torch.zeros(3))


# --- with the Controller ---------------------------------------------------------------------------

class _Cycling(Policy):
    name = "cycling"

    def decide(self, ctl):
        return Decision.uniform(Precision.cpt(2 + ctl.step_count % 7, 8 - ctl.step_count % 3))


@needs_codes
def test_bits_change_every_step_without_recompiles_on_the_code_route():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    xs = [(torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))) for _ in range(12)]
    with adaprec.Controller(model, policy=_Cycling(), optimizer=opt, backend="hardware",
                            classifier_floor=False) as ctl:
        assert {r.kind for r, _ in ctl.backend.routes().values()} == {"int8"}
        compiled = torch.compile(model, backend="aot_eager")

        def step(x, y):
            loss = F.cross_entropy(compiled(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        for x, y in xs[:3]:
            step(x, y)
        with torch.compiler.set_stance("fail_on_recompile"):
            for x, y in xs[3:]:
                step(x, y)
            opt.zero_grad()
            opt.step()
            assert torch.allclose(compiled(xs[0][0]), model(xs[0][0]), rtol=0, atol=1e-5)
    assert len({h.summary() for h in ctl.history}) >= 7


@needs_codes
def test_inductor_compiles_the_convolution_code_route():
    # Inductor, not aot_eager: the offset terms' per-tap window sums are opaque ops (traced, they made
    # Inductor's code generation run for tens of minutes on a ResNet-20); their fake shapes must hold
    # for padded and strided convolutions, and compiled and eager agree.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    x, y = torch.randn(4, 2, 8, 8), torch.randint(0, 3, (4,))
    with adaprec.Controller(model, policy=adaprec.policies.Fixed(bits=5, grad_bits=8), backend="hardware",
                            classifier_floor=False) as ctl:
        assert {r.kind for r, _ in ctl.backend.routes().values()} == {"int8"}
        compiled = torch.compile(model)
        out = compiled(x)
        F.cross_entropy(out, y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        ref = model(x)
        F.cross_entropy(ref, y).backward()
        assert torch.allclose(out, ref, rtol=0, atol=1e-5)
        # the errors are stochastically rounded (different draws): compare directions, not values
        for g, r in zip(grads, [p.grad for p in model.parameters()]):
            assert F.cosine_similarity(g.flatten(), r.flatten(), dim=0) > 0.9


def _gpt(vocab):
    from adaprec.tasks.gptlm import GPT

    return GPT(vocab, d_model=32, n_layers=1, n_heads=2, seq_len=16)


def _batches(n, seed=0):
    from adaprec.tasks.text import Vocab, load_text

    text = load_text()[:20_000]
    vocab = Vocab.from_text(text)
    data = vocab.encode(text)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        starts = torch.randint(0, data.numel() - 17, (8, 1), generator=g)
        w = data[starts + torch.arange(17)]
        out.append((w[:, :-1], w[:, 1:]))
    return len(vocab), out


def _train(model, batches, *, stop=None, state=None, policy=None):
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    policy = policy or adaprec.policies.make_policy("cpt", bits=(3, 8), grad_bits=8, cycles=2)
    with adaprec.Controller(model, policy=policy, optimizer=opt, backend="hardware", total_steps=10) as ctl:
        if state is not None:
            opt.load_state_dict(state["opt"])
            ctl.load_state_dict(state["ctl"])
        for x, y in batches[ctl.step_count:stop]:
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        saved = {"ctl": copy.deepcopy(ctl.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
                 "model": copy.deepcopy(model.state_dict())}
        kinds = {r.kind for r, _ in ctl.backend.routes().values()}
    return ctl, saved, kinds


@needs_codes
def test_cpt_on_the_code_route_resumes_bitwise_and_restores_exactly():
    vocab, batches = _batches(10)
    torch.manual_seed(0)
    init = _gpt(vocab).state_dict()
    full = _gpt(vocab)
    full.load_state_dict(init)
    before = copy.deepcopy(full.state_dict())
    torch.manual_seed(1)
    ctl, end_full, kinds = _train(full, batches)
    assert "int8" in kinds  # the blocks' layers ran on integer codes (the head keeps its 10-bit floor)
    part = _gpt(vocab)
    part.load_state_dict(init)
    torch.manual_seed(1)
    _, mid, _ = _train(part, batches, stop=5)
    resumed = _gpt(vocab)
    resumed.load_state_dict(mid["model"])
    torch.manual_seed(123)  # the controller's state restores the rounding generator, not this seed
    ctl2, end_res, _ = _train(resumed, batches, state=mid)
    assert ctl2.step_count == 10
    for k, v in end_full["model"].items():
        assert torch.equal(v, end_res["model"][k]), k
    # The model left the block as a plain model: same keys, same classes, no adaprec attributes.
    assert list(full.state_dict()) == list(before)
    assert all(type(m).__module__.startswith("torch") for m in full.modules() if isinstance(m, nn.Linear))
    # The report gives the step times per route.
    times = ctl.report()["route_time"]
    assert sum(v["steps"] for v in times.values()) == 10
    assert any(k.startswith("int8:") for k in times) and all(v["median_s"] > 0 for v in times.values())


@needs_codes
def test_muppet_climbs_the_hardware_ladder_by_default():
    vocab, batches = _batches(6)
    torch.manual_seed(0)
    model = _gpt(vocab)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pol = MuPPET(max_epochs_per_level=1)
    with adaprec.Controller(model, policy=pol, optimizer=opt, backend="hardware") as ctl:
        ladder = pol.levels_short()
        # fx8 first only where integer codes run on int_mm and integer products beat plain bf16 ones
        # (not on CPUs with AMX), see muppet_levels
        fx8 = ctl.backend.codes == "int_mm" and not _amx()
        assert ladder == (["fx8"] if fx8 else []) + ["bf16", "fp32"]
        for e in range(2):
            for x, y in ctl.epoch(batches[3 * e:3 * e + 3]):
                F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
                opt.step()
                opt.zero_grad()
        first = ctl.backend.routes()
    assert "levels" not in pol.config()  # the default: the backend's ladder, resolved at attach
    assert MuPPET().levels_short() == ["fx8", "fx12", "fx14", "fx16", "fp32"]  # no backend: the paper's
    assert [s["to"] for s in pol.switches] == ladder[1:2]
    assert {r.kind for r, _ in first.values()} <= {"int8", "lowp", "sim"}
