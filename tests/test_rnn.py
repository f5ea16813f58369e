"""Quantized LSTM/GRU/RNN (adaprec/quant/rnn.py): with FP32 formats the written-out recurrence computes
what torch's kernels compute (outputs and every gradient), with low-precision formats it computes what
a plain autograd implementation with the same quantizers computes, and it is billed for what ran."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import adaprec
from adaprec.formats import FP32, IntFormat, Precision
from adaprec.policies import Fixed
from adaprec.quant import rnn
from adaprec.quant.simulated import SimulatedBackend
from adaprec.quant.site import quantize_grad, ste

T, B, IN, H = 5, 3, 4, 6
LENGTHS = torch.tensor([5, 2, 4])


def _make(kind: str, **kw) -> nn.RNNBase:
    torch.manual_seed(0)
    if kind == "rnn-relu":
        return nn.RNN(IN, H, nonlinearity="relu", **kw)
    return {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind](IN, H, **kw)


def _inputs(m: nn.RNNBase, packed: bool, unbatched: bool, with_state: bool, dtype=torch.float64):
    """Leaves (input, initial state) and a function building the call's arguments from them."""
    torch.manual_seed(1)
    x = torch.randn((B, T, IN) if m.batch_first else (T, B, IN), dtype=dtype)
    if unbatched:
        x = x[0] if m.batch_first else x[:, 0]
    leaves = [x.requires_grad_()]
    hx = None
    if with_state:
        d = m.num_layers * (2 if m.bidirectional else 1)
        out = m.proj_size or H
        shape = (d, out) if unbatched else (d, B, out)
        h0 = torch.randn(shape, dtype=dtype, requires_grad=True)
        leaves.append(h0)
        hx = h0
        if isinstance(m, nn.LSTM):
            c0 = torch.randn(shape[:-1] + (H,), dtype=dtype, requires_grad=True)
            leaves.append(c0)
            hx = (h0, c0)

    def args():
        if packed:
            return pack_padded_sequence(x, LENGTHS, batch_first=m.batch_first, enforce_sorted=False), hx
        return x, hx

    return leaves, args


def _loss(out) -> torch.Tensor:
    y, h = out
    y = y.data if isinstance(y, PackedSequence) else y
    states = h if isinstance(h, tuple) else (h,)
    return y.pow(2).sum() + sum((s * (k + 2)).sum() for k, s in enumerate(states))


def _grads(m, leaves, loss) -> list[torch.Tensor]:
    for t in (*leaves, *m.parameters()):
        t.grad = None
    loss.backward()
    return [t.grad.clone() for t in (*leaves, *m.parameters())]


CONFIGS = [
    ("lstm", {}, False, False, False),
    ("lstm", {"num_layers": 2, "bidirectional": True, "batch_first": True}, True, False, True),
    ("lstm", {"proj_size": 3, "num_layers": 2}, False, False, True),
    ("lstm", {"proj_size": 3, "bidirectional": True, "bias": False}, True, False, False),
    ("lstm", {"batch_first": True}, False, True, True),
    ("gru", {"num_layers": 2, "bidirectional": True}, True, False, True),
    ("gru", {"batch_first": True, "bias": False}, False, True, False),
    ("rnn", {"bidirectional": True}, True, False, True),
    ("rnn-relu", {"num_layers": 2, "batch_first": True}, False, False, False),
]
IDS = ["lstm", "lstm-2l-bi-bf-packed-hx", "lstm-proj-2l-hx", "lstm-proj-bi-nobias-packed",
       "lstm-unbatched-hx", "gru-2l-bi-packed-hx", "gru-bf-nobias-unbatched", "rnn-bi-packed-hx",
       "rnn-relu-2l-bf"]


@pytest.mark.parametrize(("kind", "kw", "packed", "unbatched", "with_state"), CONFIGS, ids=IDS)
def test_fp32_formats_compute_what_torch_computes(kind, kw, packed, unbatched, with_state) -> None:
    m = _make(kind, **kw).double()
    leaves, args = _inputs(m, packed, unbatched, with_state)
    ref_out = m(*args())
    ref = _grads(m, leaves, _loss(ref_out))
    be = SimulatedBackend()
    be.attach(m, [("m", m)])
    try:
        be.apply({"m": Precision.fp32()})
        site = be.sites["m"]
        out = rnn._quantized_forward(m, site, site.train, *args())  # the written-out recurrence
        got = _grads(m, leaves, _loss(out))
    finally:
        be.detach()
    flat = [ref_out[0], *(ref_out[1] if isinstance(ref_out[1], tuple) else (ref_out[1],))]
    mine = [out[0], *(out[1] if isinstance(out[1], tuple) else (out[1],))]
    for a, b in zip(flat, mine):
        a, b = (t.data if isinstance(t, PackedSequence) else t for t in (a, b))
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-12)
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        assert torch.allclose(a, b, atol=1e-10)


# --- the quantized recurrence against a plain autograd reference -------------------------------------

def _ran_written_out(y: torch.Tensor) -> bool:
    """Whether ``y`` was computed by adaprec's written-out recurrence (its backward node is in the graph)."""
    seen, todo = set(), [y.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if fn.name() == "_LayerBackward":
            return True
        todo.extend(f for f, _ in fn.next_functions)
    return False


W_FMT, A_FMT, G_FMT = IntFormat(4, per_channel=True), IntFormat(4), IntFormat(6)  # nearest errors
PREC = Precision(W_FMT, A_FMT, G_FMT)


def _q(fmt, x):
    p = torch.tensor(fmt.params())
    return ste(x, type(fmt).kernel, fmt.kernel_spec(), p)


def _gq(x):
    return quantize_grad(x, type(G_FMT).kernel, G_FMT.kernel_spec(), torch.tensor(G_FMT.params()))


def _reference(m: nn.RNNBase, x: torch.Tensor, lengths: list[int] | None):
    """Time-major ``x`` (T, B, IN) or packed data: every product with quantized operands, errors at each
    product's output quantized, by autograd."""
    d = 2 if m.bidirectional else 1
    sizes = lengths or [x.shape[1]] * x.shape[0]
    layer_in = _q(A_FMT, x.reshape(-1, x.shape[-1]))
    full = sizes[0]
    outs_all = []
    for layer in range(m.num_layers):
        outs = []
        for rev in range(d):
            sfx = f"_l{layer}" + ("_reverse" if rev else "")
            w_ih, w_hh = (_q(W_FMT, getattr(m, f"weight_{n}{sfx}")) for n in ("ih", "hh"))
            b_ih, b_hh = (getattr(m, f"bias_{n}{sfx}") if m.bias else None for n in ("ih", "hh"))
            p = nn.functional.linear(layer_in, w_ih, b_ih)
            h = torch.zeros(full, H, dtype=x.dtype)
            c = torch.zeros(full, H, dtype=x.dtype)
            chunks = p.split(sizes)
            ys = [None] * len(sizes)
            for t in (range(len(sizes) - 1, -1, -1) if rev else range(len(sizes))):
                n = sizes[t]
                hp, cp = h[:n], c[:n]
                r = nn.functional.linear(_q(A_FMT, hp), w_hh, b_hh)
                if m.mode == "LSTM":
                    gates = _gq(chunks[t] + r)
                    i, f, g, o = gates.chunk(4, 1)
                    cn = f.sigmoid() * cp + i.sigmoid() * g.tanh()
                    hn = o.sigmoid() * cn.tanh()
                    c = torch.cat((cn, c[n:]))
                elif m.mode == "GRU":
                    pr, pz, pn = _gq(chunks[t]).chunk(3, 1)
                    rr, rz, rn = _gq(r).chunk(3, 1)
                    reset, update = (pr + rr).sigmoid(), (pz + rz).sigmoid()
                    new = (pn + reset * rn).tanh()
                    hn = new + update * (hp - new)
                else:
                    hn = _gq(chunks[t] + r).tanh()
                ys[t] = hn
                h = torch.cat((hn, h[n:]))
            outs.append(torch.cat(ys))
        out = torch.cat(outs, -1) if d == 2 else outs[0]
        outs_all.append(out)
        layer_in = _q(A_FMT, out)
    return outs_all[-1]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn"])
def test_quantized_recurrence_matches_plain_autograd(kind: str, packed: bool) -> None:
    m = _make(kind, num_layers=2, bidirectional=True)
    torch.manual_seed(3)
    x = torch.randn(T, B, IN)
    order = torch.argsort(LENGTHS, descending=True)
    lengths = LENGTHS[order].tolist()
    xs = x[:, order]  # sorted by length, as a packed sequence is
    x_ref = xs.clone().requires_grad_()
    if packed:
        pk = pack_padded_sequence(x_ref, lengths)
        y_ref = _reference(m, pk.data, pk.batch_sizes.tolist())
    else:
        y_ref = _reference(m, x_ref, None)
    y_ref.pow(2).sum().backward()
    want = [x_ref.grad] + [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    x_in = xs.clone().requires_grad_()
    with adaprec.Controller(m, policy=Fixed(W_FMT, G_FMT, A_FMT), classifier_floor=False):
        out, _ = m(pack_padded_sequence(x_in, lengths) if packed else x_in)
        y = out.data if packed else out.reshape(-1, out.shape[-1])
        assert _ran_written_out(y)
        y.pow(2).sum().backward()
    got = [x_in.grad] + [p.grad for p in m.parameters()]
    assert torch.allclose(y, y_ref, atol=1e-5)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    # ... and the quantization is real: FP32 would give other numbers.
    plain = m(pack_padded_sequence(xs, lengths) if packed else xs)[0]
    assert not torch.allclose(y, plain.data if packed else plain.reshape(-1, y.shape[-1]), atol=1e-3)


def test_fp32_activations_and_errors_run_torchs_kernel_with_quantized_weights() -> None:
    m = _make("lstm", batch_first=True)
    x = torch.randn(B, T, IN)
    wq = {n: W_FMT.quantize(p.detach()) if n.startswith("weight") else p.detach()
          for n, p in m.named_parameters()}
    plain = _make("lstm", batch_first=True)
    plain.load_state_dict(wq)
    with adaprec.Controller(m, policy=Fixed(W_FMT, FP32(), FP32()), classifier_floor=False):
        y, _ = m(x)
        assert not _ran_written_out(y)
    assert torch.allclose(y, plain(x)[0], atol=1e-6)


def test_higher_order_gradients_through_the_recurrence_are_refused() -> None:
    m = _make("gru")
    x = torch.randn(T, B, IN, requires_grad=True)
    with adaprec.Controller(m, policy=Fixed(4, 8), classifier_floor=False):
        y, _ = m(x)
        with pytest.raises(RuntimeError, match="does not support higher-order gradients"):
            torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)


def test_products_billed_follow_what_needs_a_gradient() -> None:
    m = _make("lstm", num_layers=2)
    x = torch.randn(T, B, IN)
    h0, c0 = torch.zeros(2, B, H, requires_grad=True), torch.zeros(2, B, H)
    with adaprec.Controller(m, policy=Fixed(4, 8), classifier_floor=False) as ctl:
        m(x, (h0, c0))[0].sum().backward()
        ctl.step()
    p = ctl.cost.product_summary()[""]
    n = T * B
    ih0, hh, ih1 = 4 * H * IN, 4 * H * H, 4 * H * H
    assert p["forward"] == n * (ih0 + hh + ih1 + hh) == p["weight_grad"]
    # Data input: no input gradient for layer 0's input projection; the initial state needs one, so
    # every step's recurrent product has its input gradient.
    assert p["input_grad"] == n * hh + n * ih1 + n * hh
    assert set(p) == {"forward", "input_grad", "weight_grad"}  # every operand in its role's format


class _OwnForwardLSTM(nn.LSTM):
    def forward(self, x, hx=None):  # a subclass that does its own thing around torch's kernel
        out, state = super().forward(x, hx)
        return out * 1.0, state


def test_a_layer_with_its_own_forward_is_billed_at_the_widths_it_runs() -> None:
    torch.manual_seed(0)
    m = _OwnForwardLSTM(IN, H, num_layers=2)
    x = torch.randn(T, B, IN)
    with adaprec.Controller(m, policy=Fixed(4, 8), classifier_floor=False) as ctl:
        assert ctl.backend.sites[""].native == [False, False]
        m(x)[0].sum().backward()
        ctl.step()
    p = ctl.cost.product_summary()[""]
    n = T * B
    # Around torch's kernel only layer 0's input is quantized: its hidden states, layer 1's input and
    # all errors inside the recurrence are FP32, and billed as FP32.
    assert p["forward"] == n * 4 * H * IN
    assert p["forward/q,fp32"] == n * (4 * H * H * 3)
    assert "input_grad" not in p and p["input_grad/fp32,q"] > 0
    r = ctl.report()
    assert r["savings_vs_fp32"] < 1 - Precision.cpt(4, 8).relative_cost() - 0.3


def test_eval_and_no_grad_forwards() -> None:
    m = _make("gru", batch_first=True)
    x = torch.randn(B, T, IN)
    with adaprec.Controller(m, policy=Fixed(4, 8), classifier_floor=False) as ctl:
        m(x)[0].sum().backward()  # a training step sets the input's running range
        ctl.step()
        m.eval()
        with torch.no_grad():
            y_eval = m(x)[0]
        m.train()
        macs = ctl.cost.macs.sum().item()
    assert macs == 0  # evaluation forwards are not billed
    assert not torch.allclose(y_eval, m(x)[0], atol=1e-4)  # evaluated quantized, unlike the plain layer
