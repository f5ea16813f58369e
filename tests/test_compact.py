"""Tensors held in their storage type (adaprec.compact) and the formats' compact encodings."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaprec.compact import FormatCodec, StoredTensor, hold, release
from adaprec.formats import FixedPoint, FloatFormat
from adaprec.optim import storage_format

torch.set_num_threads(1)

#: storage format -> the dtype of its element codes and their bytes per element (block scales apart)
PACKED = {
    "bf16": (torch.bfloat16, 2.0), "fp16": (torch.float16, 2.0), "fp8_e4m3": (torch.float8_e4m3fn, 1.0),
    "fp8_e5m2": (torch.float8_e5m2, 1.0), "fx4": (torch.int8, 1.0), "fx8": (torch.int8, 1.0),
    "fx12": (torch.int16, 2.0), "fx16": (torch.int16, 2.0), "fx25": (torch.int32, 4.0),
    "mxfp8": (torch.float8_e4m3fn, 1.0), "mxfp8_e5m2": (torch.float8_e5m2, 1.0),
    "mxfp6": (torch.float8_e4m3fn, 1.0), "mxfp6_e3m2": (torch.float8_e4m3fn, 1.0),
    "mxint8": (torch.int8, 1.0),
    "mxfp4": (torch.uint8, 0.5), "nvfp4": (torch.uint8, 0.5),
}


@pytest.mark.parametrize("name", sorted(PACKED))
def test_encode_decode_is_the_stored_rounding(name: str) -> None:
    fmt = storage_format(name)
    assert fmt.packs_stored
    g = torch.Generator().manual_seed(3)
    for shape in [(7,), (40, 96), (3, 5, 3, 3), (2, 70)]:
        for scale in (1e-3, 1.0, 1e4):
            x = torch.randn(shape, generator=g) * scale
            x.view(-1)[:3] = 0.0  # zeros (and a zero block in the 2-d case below)
            if len(shape) == 2:
                x[0] = 0.0
            st = fmt.storage_state(x)
            for noise in (None, torch.rand(shape, generator=g)):
                parts = fmt.encode_stored(x, st, noise)
                assert torch.equal(fmt.decode_stored(parts, st, x.shape), fmt.round_stored(x, st, noise)), \
                    (name, shape, scale)
    dtype, per_elem = PACKED[name]
    assert parts[0].dtype == dtype
    assert parts[0].numel() * parts[0].element_size() == pytest.approx(per_elem * x.numel(), abs=1)
    assert not storage_format("fp32").packs_stored


def _models() -> list[tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return [
        (nn.Linear(8, 5), torch.randn(3, 8)),
        (nn.Conv2d(3, 4, 3), torch.randn(2, 3, 6, 6)),
        (nn.LSTM(4, 6, batch_first=True), torch.randn(2, 5, 4)),
        (nn.MultiheadAttention(8, 2, batch_first=True), torch.randn(2, 5, 8)),
        (nn.Sequential(nn.Embedding(10, 6), nn.LayerNorm(6)), torch.tensor([[1, 2, 3], [4, 5, 9]])),
    ]


def _run(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    m.zero_grad()
    out = m(x, x, x)[0] if isinstance(m, nn.MultiheadAttention) else m(x)
    out = out[0] if isinstance(out, tuple) else out
    if x.is_floating_point():
        x.grad = None
    (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), [p.grad.clone() for p in m.parameters()]


@pytest.mark.parametrize("fmt", [FloatFormat("bf16"), FixedPoint(8)])
def test_held_modules_compute_exactly_like_their_values(fmt) -> None:
    for model, x in _models():
        owners = {id(p): m for m in model.modules() for p in m._parameters.values() if p is not None}
        params = list(model.parameters())
        ids = [id(p) for p in params]
        for p in params:
            state = fmt.storage_state(p) if isinstance(fmt, FixedPoint) else None
            hold(p, FormatCodec(fmt), state, owner=owners[id(p)])
        plain = copy.deepcopy(model)  # plain float32 parameters with the stored values
        assert all(type(p) is nn.Parameter for p in plain.parameters())
        assert all(isinstance(p, StoredTensor) and isinstance(p, nn.Parameter) for p in model.parameters())
        out_h, grads_h = _run(model, x)
        out_p, grads_p = _run(plain, x)
        assert torch.equal(out_h, out_p), type(model).__name__
        assert all(torch.equal(a, b) for a, b in zip(grads_h, grads_p)), type(model).__name__
        assert all(type(g) is torch.Tensor and g.dtype == torch.float32 for g in grads_h)
        for p in params:
            release(p, owner=owners[id(p)])
        assert [id(p) for p in model.parameters()] == ids and all(type(p) is nn.Parameter for p in params)
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), plain.parameters()))
        if isinstance(model, nn.LSTM):  # the RNN's cached weight list follows the swaps
            assert all(a is b for a, b in zip(model._flat_weights, params))


def test_what_autograd_saves_stays_compact() -> None:
    lin = nn.Linear(64, 32)
    hold(lin.weight, FormatCodec(FloatFormat("bf16")), owner=lin)
    saved: list[torch.Tensor] = []
    x = torch.randn(16, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lin(x)
    weights = [t for t in saved if t.shape in ((64, 32), (32, 64))]
    assert weights and all(isinstance(t, StoredTensor) for t in weights)  # not a float32 copy
    y.sum().backward()
    assert lin.weight.grad.shape == (32, 64)


def test_writes_round_into_the_format_and_checkpoints_are_plain(tmp_path) -> None:
    lin = nn.Linear(4, 3)
    hold(lin.weight, FormatCodec(FloatFormat("bf16")), owner=lin)
    w = lin.weight
    with torch.no_grad():
        w.copy_(torch.full((3, 4), 1.0 + 2.0**-10))  # rounds to bf16
        assert torch.equal(w.plain(), torch.ones(3, 4))
        w[1].mul_(3.0)  # a write through a view
        w.add_(2.0**-12)
    assert w.plain()[1].tolist() == [3.0] * 4 and w.plain()[0].tolist() == [1.0] * 4
    sd = lin.state_dict()
    assert list(sd) == ["weight", "bias"]
    torch.save(sd, tmp_path / "sd.pt")
    loaded = torch.load(tmp_path / "sd.pt")  # weights_only=True: a plain checkpoint
    assert type(loaded["weight"]) is torch.Tensor and torch.equal(loaded["weight"], w.plain())
    twin = nn.Linear(4, 3)
    twin.load_state_dict(loaded)
    x = torch.randn(2, 4)
    assert torch.equal(twin(x), lin(x))
    buf = io.BytesIO()
    torch.save(lin, buf)  # the whole module: plain parameters come back
    buf.seek(0)
    assert type(torch.load(buf, weights_only=False).weight) is nn.Parameter
    lin.load_state_dict({"weight": torch.full((3, 4), 0.5), "bias": torch.zeros(3)})
    assert isinstance(lin.weight, StoredTensor) and torch.equal(lin.weight.plain(), torch.full((3, 4), 0.5))


def test_fixed_point_external_write_keeps_or_refits_the_scale() -> None:
    t = torch.zeros(4)
    fmt = FixedPoint(8)
    fit = lambda v: fmt.storage_state(v)  # noqa: E731
    hold(t, FormatCodec(fmt), torch.tensor(6.0), fit=fit)
    with torch.no_grad():
        t.copy_(torch.tensor([0.5, -0.25, 0.125, 1.0]))  # exact at FL 6: kept
        assert float(t.state) == 6.0 and t.plain().tolist() == [0.5, -0.25, 0.125, 1.0]
        t.copy_(torch.tensor([10.0, 3.0, -7.5, 0.0]))  # outside the FL-6 range: a coarser grid
    assert float(t.state) < 6.0 and t.plain().tolist() == [10.0, 3.0, -7.5, 0.0]


def test_a_dtype_change_inside_is_refused_clearly() -> None:
    lin = nn.Linear(4, 3)
    hold(lin.weight, FormatCodec(FloatFormat("bf16")), owner=lin)
    lin.double()
    with pytest.raises(RuntimeError, match="dtype of a stored"):
        lin(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="already stored"):
        hold(lin.weight, FormatCodec(FloatFormat("bf16")))
    with pytest.raises(TypeError, match="float32"):
        hold(torch.zeros(3, dtype=torch.float64), FormatCodec(FloatFormat("bf16")))


def test_compiled_forward_reads_stored_weights() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    for m in (model[0], model[2]):
        hold(m.weight, FormatCodec(FixedPoint(8)), torch.tensor(5.0), owner=m)
    x = torch.randn(4, 8)
    eager = model(x)
    compiled = torch.compile(model)
    assert torch.allclose(compiled(x), eager, rtol=0, atol=1e-6)
    F.cross_entropy(compiled(x), torch.tensor([0, 1, 2, 0])).backward()
    assert model[0].weight.grad.shape == (16, 8)
