"""Block-scaled formats (OCP MX v1.0, NVFP4): spec vectors worked out by hand, agreement with torchao's MX
reference where it is installed, tails, axes, stochastic rounding, ladders and cost, and that every
policy can use them (CPT over the MX ladder without recompiling, MuPPET climbing to FP32, Fixed)."""

from __future__ import annotations

import math

import pytest
import torch

import adaprec
from adaprec.formats import BLOCK_FORMATS, BlockFormat, FloatFormat, Precision, parse_format

# --- spec vectors (worked out from the spec by hand; see the comments) --------------------------------


def _block(values: list[float], n: int = 32) -> torch.Tensor:
    return torch.tensor(values + [0.0] * (n - len(values)))


def test_mxfp4_vectors():
    # amax 1.0: X = 2^(floor(log2 1) - emax(E2M1) = 2) = 1/4; V/X = 1.2, 3.6, 2.8, 2.2, 2.5, 4, -0.4
    # E2M1 grid {0, 0.5, 1, 1.5, 2, 3, 4, 6}: 1.2 -> 1; 3.6 -> 4; 2.8 -> 3; 2.2 -> 2; 2.5 -> 2 (tie to
    # the even mantissa: 2 = 1.0 x 2^1, 3 = 1.5 x 2^1); 4 -> 4; -0.4 -> -0.5.
    x = _block([0.3, 0.9, 0.7, 0.55, 0.625, 1.0, -0.1])
    q = BlockFormat("mxfp4").quantize(x)
    assert q[:7].tolist() == [0.25, 1.0, 0.75, 0.5, 0.5, 1.0, -0.125]
    # amax 100: X = 2^(6 - 2) = 16; 100/16 = 6.25 saturates to 6 -> 96; 3.2/16 = 0.2 -> 0.
    q = BlockFormat("mxfp4").quantize(_block([0.1, -0.7, 3.2, 100.0]))
    assert q[:4].tolist() == [0.0, 0.0, 0.0, 96.0]


def test_mxfp8_mxfp6_mxint8_vectors():
    # MXFP8 E4M3 (emax 8), amax 1: X = 2^-8; 0.3 * 256 = 76.8, in [64, 128) the E4M3 step is 8 -> 80.
    q = BlockFormat("mxfp8").quantize(_block([0.3, 1.0, -0.01]))
    assert q[:3].tolist() == [80 / 256, 1.0, -2.5 / 256]  # -2.56 in [2, 4) steps of 0.25 -> -2.5
    # MXFP6 E3M2 (emax 4), amax 10: X = 2^(3 - 4) = 1/2; 20 -> 20 (step 4 in [16, 28]); 14 -> 14 (step 2);
    # 6.6 -> 7 (step 1 in [4, 8)).
    q = BlockFormat("mxfp6_e3m2").quantize(_block([10.0, 7.0, 3.3]))
    assert q[:3].tolist() == [10.0, 7.0, 3.5]
    # MXFP6 E2M3 (emax 2), amax 10: X = 2^(3 - 2) = 2; 5 -> 5 (step 0.5 in [4, 7.5]);
    # 3.3 / 2 = 1.65 -> 1.625 (step 1/8 in [1, 2)).
    q = BlockFormat("mxfp6").quantize(_block([10.0, 3.3]))
    assert q[:2].tolist() == [10.0, 3.25]
    # MXINT8: X = 2^(floor(log2 amax) - 0); elements k/64, |k| <= 127.
    q = BlockFormat("mxint8").quantize(_block([1.0, 0.3, 1.99, -1.99]))
    assert q[:4].tolist() == [1.0, 19 / 64, 127 / 64, -127 / 64]  # 0.3 * 64 = 19.2; 1.99 * 64 saturates


def test_nvfp4_vectors():
    # Tensor amax 6: s_t = 6 / (6 * 448); block 1 amax 6: s_b = 448 (exact in E4M3), scale = 1.
    # Block 2 amax 3: s_b = 224 = 1.75 * 2^7 (exact), scale = 1/2: 1.3 / 0.5 = 2.6 -> 3 -> 1.5.
    x = torch.tensor([6.0, 0.7, -2.4, 5.1] + [0.0] * 12 + [3.0, 1.3] + [0.0] * 14)
    q = BlockFormat("nvfp4").quantize(x)
    assert q[:4].tolist() == [6.0, 0.5, -2.0, 6.0]  # 5.1 is past the midpoint 5 of 4 and 6
    assert q[16:18].tolist() == [3.0, 1.5]


def test_zero_blocks_nan_and_scale_range():
    x = torch.zeros(64)
    x[33] = float("nan")
    q = BlockFormat("mxfp8").quantize(x)
    assert (q[:32] == 0).all() and math.isnan(q[33].item())
    for name in ("mxfp8", "mxfp4", "nvfp4"):
        for mag in (1e-30, 1e-6, 1e6, 1e30):
            y = torch.randn(4, 64, generator=torch.Generator().manual_seed(1)) * mag
            q = BlockFormat(name).quantize(y)
            # Rounding to nearest may land the top element half an element step above amax; NVFP4's E4M3
            # block scale rounds to nearest too (up to 2^-4 more).
            slack = 2.0 ** -(BlockFormat(name).element.mantissa + 1) + (2**-4 if name == "nvfp4" else 0)
            assert torch.isfinite(q).all() and q.abs().max() <= y.abs().max() * (1 + slack)


# --- layout: tails, axes, shapes -----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(BLOCK_FORMATS))
def test_short_tail_is_a_block_of_its_own(name):
    fmt = BlockFormat(name)
    x = torch.randn(3, 70, generator=torch.Generator().manual_seed(0)) * 5
    q = fmt.quantize(x)
    k = fmt.block
    full = 70 // k * k
    if name != "nvfp4":  # NVFP4's tensor scale couples blocks; MX blocks are independent
        assert torch.equal(q[:, full:], fmt.quantize(x[:, full:]))
        assert torch.equal(q[:, :k], fmt.quantize(x[:, :k]))
    assert q.shape == x.shape


def test_blocks_run_along_the_given_axis():
    fmt = BlockFormat("mxfp4")
    x = torch.randn(2, 64, 3, 3, generator=torch.Generator().manual_seed(0))  # a conv activation (N, C, H, W)
    along_c = fmt.quantize(x, axis=1)
    assert torch.equal(along_c, fmt.quantize(x.movedim(1, -1)).movedim(-1, 1))
    assert not torch.equal(along_c, fmt.quantize(x))  # the last axis has 3 elements per "block"


def test_conv_layers_block_along_channels():
    model = torch.nn.Sequential(torch.nn.Conv2d(64, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 4))
    x = torch.randn(2, 64, 6, 6)
    policy = adaprec.policies.Fixed(bits="mxfp4")
    with adaprec.Controller(model, policy=policy, classifier_floor=False) as ctl:
        sites = ctl.backend.sites
        assert sites["0"].train.weight.axis == 1 and sites["2"].train.weight.axis == -1
        out = model[0](x)
    # The weight's blocks run over input channels (dim 1), the activation's over channels too.
    w = BlockFormat("mxfp4").quantize(model[0].weight.detach(), axis=1)
    xq = BlockFormat("mxfp4").quantize(x, axis=1)
    assert torch.allclose(out, torch.nn.functional.conv2d(xq, w, model[0].bias), rtol=1e-5, atol=1e-6)


# --- torchao's MX reference ------------------------------------------------------------------------

def _torchao():
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from torchao.prototype.mx_formats import mx_tensor, nvfp4_tensor
        return mx_tensor, nvfp4_tensor
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here"
        pytest.skip(f"torchao's MX reference is not importable here ({type(e).__name__}: {e}); "
                    "pip install torchao to run this comparison")


@pytest.mark.parametrize("name, elem", [("mxfp8", "float8_e4m3fn"), ("mxfp8_e5m2", "float8_e5m2"),
                                        ("mxfp6_e3m2", "fp6_e3m2"), ("mxfp6", "fp6_e2m3"),
                                        ("mxfp4", "float4_e2m1fn_x2")])
def test_mx_equals_torchao_reference(name, elem):
    mx, _ = _torchao()
    el = getattr(torch, elem, elem)
    g = torch.Generator().manual_seed(0)
    for mag in (1e-3, 1.0, 1e3):
        x = torch.randn(8, 128, generator=g) * mag * torch.exp(torch.randn(8, 128, generator=g))
        x[0, :32] = 0
        scale, data = mx.to_mx(x, el, 32)
        ref = mx.to_dtype(data, scale, el, 32, torch.float32)
        assert torch.equal(BlockFormat(name).quantize(x), ref)


def test_nvfp4_equals_torchao_reference():
    _, nv = _torchao()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 128, generator=g) * torch.exp(torch.randn(8, 128, generator=g))
    ts = nv.per_tensor_amax_to_scale(x.abs().max())
    bs, data = nv.nvfp4_quantize(x, block_size=16, per_tensor_scale=ts)
    ref = nv.NVFP4Tensor(data, bs, 16, torch.float32, per_tensor_scale=ts).dequantize(torch.float32)
    assert torch.equal(BlockFormat("nvfp4").quantize(x), ref)


# --- rounding ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mxfp4", "mxfp8", "mxint8", "nvfp4"])
def test_stochastic_rounding_is_unbiased_and_on_the_nearest_grid(name):
    fmt = BlockFormat(name, rounding="stochastic")
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    qs = torch.stack([fmt.quantize(x) for _ in range(3000)])
    near = BlockFormat(name).quantize(x)
    # Elements near a block's top can saturate at the element grid's maximum (a bias every rounding
    # has there); below half the block's amax nothing saturates and the mean must be x.
    inner = x.abs() <= 0.5 * x.abs().reshape(-1, BlockFormat(name).block).amax(1).repeat_interleave(
        BlockFormat(name).block).reshape(x.shape)
    err_sr = (qs.mean(0) - x)[inner].abs().max()
    assert err_sr < 0.1 * (near - x)[inner].abs().max() + 2e-3
    assert not torch.equal(qs[0], qs[1])  # the rounding really is random


def test_names_ladders_cost():
    assert parse_format("mxfp8_e4m3") == BlockFormat("mxfp8") and parse_format("MXFP4").short() == "mxfp4"
    assert parse_format("mxfp6", role="gradient").rounding == "stochastic"
    assert [f.short() for f in _climb("mxfp4")] == ["mxfp4", "mxfp6", "mxfp8", "bf16", "fp32"]
    assert BlockFormat("nvfp4").up().short() == "mxfp6" and BlockFormat("mxfp8").down().short() == "mxfp6"
    assert BlockFormat("mxfp4").at_least(7).short() == "mxfp8"       # the classifier floor's rule
    assert BlockFormat("mxfp4").clamp(2, 3) == BlockFormat("mxfp4")   # no free width to clamp
    assert [BlockFormat(n).cost_bits for n in ("mxfp4", "mxfp6", "mxfp8", "mxint8", "nvfp4")] == \
        [4.25, 6.25, 8.25, 8.25, 4.5]
    assert Precision.uniform("mxfp4").bitops_per_mac() == 3 * 4.25**2
    with pytest.raises(ValueError, match="known:.*mxfp4"):
        BlockFormat("mxfp5")


def _climb(name):
    out = [parse_format(name)]
    while not out[-1].is_identity:
        out.append(out[-1].up())
    return out


# --- every policy can use them ----------------------------------------------------------------------

def _train(policy, steps=12, total=None, compiled=False):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = [(torch.randn(32, 64), torch.randint(0, 10, (32,))) for _ in range(4)]
    with adaprec.Controller(model, policy=policy, optimizer=opt, total_steps=total or steps) as ctl:
        fwd = torch.compile(model) if compiled else model
        for i in range(steps):
            x, y = data[i % 4]
            loss = torch.nn.functional.cross_entropy(fwd(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return ctl


def test_cpt_cycles_over_the_mx_ladder_and_bills_effective_bits():
    ctl = _train(adaprec.policies.CPT(bits=("mxfp4", "mxfp8"), grad_bits="mxfp8", cycles=2), steps=12)
    seen = [h.layers["0"].weight.short() for h in ctl.history]
    assert seen == ["mxfp4", "mxfp6", "mxfp8", "mxfp4", "mxfp6", "mxfp8"]
    assert ctl.history[0].layers["0"].gradient.short() == "mxfp8"
    r = ctl.report()
    assert 0.9 < r["savings_vs_fp32"] < 1.0 and r["cpt_bounds"] == "mxfp4-mxfp8"


def test_cpt_over_mx_never_recompiles():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        ctl = _train(adaprec.policies.CPT(bits=("mxfp4", "mxfp8"), grad_bits="mxfp8", cycles=2), steps=12,
                     compiled=True)
    assert len({h.layers["0"].weight.short() for h in ctl.history}) == 3
    torch._dynamo.reset()


def test_muppet_climbs_an_mx_ladder_and_fixed_takes_mx():
    mu = adaprec.policies.MuPPET(levels=("mxfp4", "mxfp8", "bf16", "fp32"))
    assert mu.levels_short() == ["mxfp4", "mxfp8", "bf16", "fp32"]
    ctl = _train(mu, steps=4)
    assert ctl.current["0"].weight.short() == "mxfp4"
    ctl = _train(adaprec.policies.Fixed(bits="nvfp4", grad_bits="mxfp8"), steps=3)
    assert ctl.current["0"].short() == "nvfp4/mxfp8"
    assert ctl.current["2"].weight.short() == "mxfp8"  # classifier floor: 7 bits -> the next MX level up
    assert isinstance(ctl.current["0"].activation, BlockFormat)
    assert ctl.current["0"].weight.up().up().up() == FloatFormat("bf16")  # nvfp4 -> mxfp6 -> mxfp8 -> bf16
