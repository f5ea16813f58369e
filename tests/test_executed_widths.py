"""The cost meter bills what runs: every matrix product actually executed (seen at the dispatcher, forward
and backward) is recorded with its MACs and the width of each operand — the width of the grid its
values lie on (an integer dtype: the span of its codes) — and compared, per pair of widths, with the
MACs the meter billed for each layer and product kind (docs/methods.md#bitops).

Products that belong to no quantized layer (attention scores and values) are not billed and are
reported separately; so are the forward products an activation-checkpoint recompute runs again.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import adaprec
from adaprec.cost import OPERANDS
from adaprec.formats import IntFormat, Precision
from adaprec.policies import Fixed
from adaprec.quant.hardware import HardwareBackend, probe_kernels
from adaprec.tasks.gptlm import Block

aten = torch.ops.aten
W_FMT, A_FMT, G_FMT = IntFormat(4, per_channel=True), IntFormat(6), IntFormat(8, rounding="stochastic")
PREC = Precision(W_FMT, A_FMT, G_FMT)  # three distinct widths: every product's roles can be told apart

_MM = {aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.baddbmm, aten._int_mm, aten._scaled_mm,
       torch.ops.adaprec.mm_bf16}  # adaprec's own: a float32 mm of integer codes on bf16 units
_CONV = {aten.convolution, torch.ops.adaprec.conv_bf16}
_CONV_BACKWARD = {aten.convolution_backward: 10, torch.ops.adaprec.conv_backward_bf16: 7}  # -> mask index
_ATTENTION = {aten._scaled_dot_product_flash_attention_for_cpu: False,
              aten._scaled_dot_product_flash_attention_for_cpu_backward: True}
_PRODUCT_WORDS = ("mm", "conv", "attention", "matmul", "rnn", "einsum", "dot", "mv", "linear", "lstm", "gru")


class Products(TorchDispatchMode):
    """Records every product the dispatcher runs: MACs, operand widths, whether it is an activation
    checkpoint's recompute (a forward inside a module's forward while autograd runs a backward)."""

    def __init__(self, formats, blocks=()):
        super().__init__()
        self.formats = sorted({f.with_rounding("nearest") for f in formats}, key=lambda f: f.cost_bits)
        self.blocks = blocks
        self.billable: Counter = Counter()   # (narrow width, wide width) -> MACs
        self.recompute: Counter = Counter()
        self.unbilled: Counter = Counter()   # op name -> MACs (no operand widths: FP32 attention)
        self.depth = 0

    # module forward depth, for recompute detection
    def __enter__(self):
        self._hooks = [nn.modules.module.register_module_forward_pre_hook(self._pre),
                       nn.modules.module.register_module_forward_hook(self._post, always_call=True)]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        return super().__exit__(*exc)

    def _pre(self, m, args):
        self.depth += 1

    def _post(self, m, args, out):
        self.depth -= 1

    def _add(self, macs: int, a: torch.Tensor, b: torch.Tensor) -> None:
        self._add_widths(macs, self.width(a), self.width(b))

    def _add_widths(self, macs: int, wa: float, wb: float) -> None:
        key = tuple(sorted((wa, wb)))
        recomputing = self.depth > 0 and torch._C._current_graph_task_id() != -1
        (self.recompute if recomputing else self.billable)[key] += macs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        if packet in _MM:
            a, b = (args[1], args[2]) if packet in (aten.addmm, aten.addmm_, aten.baddbmm) else args[:2]
            batch = a.shape[0] if a.dim() == 3 else 1
            self._add(batch * a.shape[-2] * a.shape[-1] * b.shape[-1], a, b)
        elif packet in _CONV:
            self._add(out.numel() * args[1][0].numel(),
                      args[0], args[1])
        elif packet in _CONV_BACKWARD:
            grad_out, x, w = args[0], args[1], args[2]
            mask = args[_CONV_BACKWARD[packet]]
            macs = grad_out.numel() * w[0].numel()
            if mask[0]:
                self._add(macs, grad_out, w)
            if mask[1]:
                self._add(macs, grad_out, x)
        elif packet is aten.mkldnn_rnn_layer:  # torch's fused LSTM kernel on the CPU (FP32 inside)
            x, w_ih, w_hh = args[0], args[1], args[2]
            n = x.shape[0] * x.shape[1]
            self._add(n * w_ih.numel(), x, w_ih)
            self._add_widths(n * w_hh.numel(), 32.0, self.width(w_hh))  # h_{t-1}: FP32, inside the kernel
        elif packet is aten.mkldnn_rnn_layer_backward:  # modelled: every error inside is FP32
            x, w_ih, w_hh = args[0], args[1], args[2]
            n = x.shape[0] * x.shape[1]
            wi, wh = self.width(w_ih), self.width(w_hh)
            for macs, pair in ((n * w_ih.numel(), (32.0, wi)), (n * w_hh.numel(), (32.0, wh)),
                               (n * w_ih.numel(), (32.0, self.width(x))), (n * w_hh.numel(), (32.0, 32.0))):
                self._add_widths(macs, *pair)
        elif packet in _ATTENTION:
            q, k, v = args[1:4] if _ATTENTION[packet] else args[:3]
            macs = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] * (q.shape[3] + v.shape[3])
            self.unbilled[str(packet)] += macs * (2 if _ATTENTION[packet] else 1)  # backward: nominal
        elif any(w in str(packet) for w in _PRODUCT_WORDS) and "_to_copy" not in str(packet):
            raise AssertionError(f"a product this test does not know how to observe: {func}")
        return out

    def width(self, t: torch.Tensor) -> float:
        """The bits of the narrowest grid ``t``'s values lie on, among the run's formats."""
        if not t.is_floating_point():  # integer codes: the span they use
            return float(max(1, math.ceil(math.log2(int(t.max()) - int(t.min()) + 1))))
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return 8.0
        x = t.detach().float()
        for f in self.formats:
            if self._fits(x, f):
                return f.cost_bits
        return 16.0 if t.dtype in (torch.bfloat16, torch.float16) else 32.0

    def _fits(self, x: torch.Tensor, f) -> bool:
        views = [x, x.t()] if x.dim() == 2 else [x]
        for v in views:
            if _exact(v, f):
                return True
            for b in self.blocks:  # per-time-step tensors of a recurrence, stacked
                if v.dim() == 2 and v.shape[0] > b and v.shape[0] % b == 0:
                    if all(_exact(c, f) for c in v.split(b)):
                        return True
        return False


def _exact(v: torch.Tensor, f) -> bool:
    """Re-quantizing ``v`` to ``f`` changes nothing (up to float32 rounding of the grid arithmetic)."""
    if v.numel() == 0:
        return True
    q = f.quantize(v.contiguous())
    tol = 1e-4 * float(v.abs().max()) + 1e-30
    return bool((q - v).abs().max() <= tol)


def billed(ctl) -> Counter:
    """The meter's MACs per pair of operand widths: each layer's product kinds at its precision."""
    out: Counter = Counter()
    for name, kinds in ctl.cost.product_summary().items():
        prec = ctl.current[name]
        bits = {r: getattr(prec, r).cost_bits for r in ("weight", "activation", "gradient")}
        for kind, macs in kinds.items():
            product, _, q = kind.partition("/")
            lq, rq = (True, True) if not q else (s == "q" for s in q.split(","))
            left, right = OPERANDS[product]
            key = tuple(sorted((bits[left] if lq else 32.0, bits[right] if rq else 32.0)))
            out[key] += macs
    return out


def run(model, batches, loss_fn, backend="simulated", precision=PREC, blocks=(), steps=2, inside=None):
    """Train ``steps`` iterations under a controller, recording the products; returns (ctl, recorder).
    ``inside(ctl)`` runs before the controller is left."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    policy = Fixed(precision.weight, precision.gradient, precision.activation)
    rec = Products(precision.formats(), blocks)
    with adaprec.Controller(model, policy=policy, optimizer=opt, classifier_floor=False,
                            backend=backend) as ctl:
        for step in range(steps):
            x = batches(step)
            with rec:
                loss = loss_fn(model, x)
                opt.zero_grad()
                loss.backward()
            opt.step()
        if inside is not None:
            inside(ctl)
    return ctl, rec


def check(ctl, rec) -> None:
    want = billed(ctl)
    got = {k: v for k, v in rec.billable.items() if v}
    assert got == dict(want), f"executed {got} != billed {dict(want)}"
    # The same in BitOPs, as the report states it.
    bitops = sum(m * a * b for (a, b), m in got.items())
    assert ctl.report()["gbitops"] * 1e9 == pytest.approx(bitops)


# --- the models ----------------------------------------------------------------------------------------

def _mse(model, x):
    # Against a fixed random direction: a plain mean square of a LayerNorm's output has a vanishing
    # gradient (its errors are rounding noise, a few levels of the 1e-8 minimum grid step).
    y = model(x)
    g = torch.Generator().manual_seed(7)
    return (y * torch.randn(y.shape, generator=g)).sum()


def test_mlp() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
    ctl, rec = run(model, lambda s: torch.randn(8, 12), _mse)
    check(ctl, rec)
    assert not rec.unbilled and not rec.recompute
    # The first layer reads the data: its input gradient is neither run nor billed.
    assert ctl.cost.product_summary()["0"].get("input_grad", 0) == 0


def test_cnn() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, groups=2), nn.Flatten(),
                          nn.Linear(6 * 2 * 2, 3))
    ctl, rec = run(model, lambda s: torch.randn(3, 2, 8, 8), _mse)
    check(ctl, rec)


class _SeqModel(nn.Module):
    def __init__(self, rnn: nn.Module, batch: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.rnn = rnn
        width = getattr(rnn, "proj_size", 0) or rnn.hidden_size
        d = rnn.num_layers * (2 if rnn.bidirectional else 1)
        # A nonzero initial state: zeros lie on every grid, so the first step's recurrent product would
        # tell this test nothing about widths.
        self.h0 = torch.randn(d, batch, width)
        self.c0 = torch.randn(d, batch, rnn.hidden_size)
        self.head = nn.Linear(width * (2 if rnn.bidirectional else 1), 20)

    def forward(self, ids):
        hx = (self.h0, self.c0) if isinstance(self.rnn, nn.LSTM) else self.h0
        out, _ = self.rnn(self.embed(ids), hx)
        return self.head(out)


def _lm_loss(model, ids):
    logits = model(ids)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))


@pytest.mark.parametrize("rnn", ["lstm", "gru", "lstm-proj"])
def test_recurrent(rnn: str) -> None:
    torch.manual_seed(0)
    layer = {"lstm": lambda: nn.LSTM(8, 12, num_layers=2, batch_first=True),
             "gru": lambda: nn.GRU(8, 12, bidirectional=True, batch_first=True),
             "lstm-proj": lambda: nn.LSTM(8, 12, proj_size=5, batch_first=True)}[rnn]()
    batch = 4
    model = _SeqModel(layer, batch)
    ctl, rec = run(model, lambda s: torch.randint(0, 20, (batch, 6)), _lm_loss, blocks=(batch,))
    check(ctl, rec)
    kinds = ctl.cost.product_summary()["rnn"]
    assert set(kinds) == {"forward", "input_grad", "weight_grad"}  # every operand at its role's width


def test_gptlm_block() -> None:
    torch.manual_seed(0)
    model = Block(d_model=16, n_heads=2)
    ctl, rec = run(model, lambda s: torch.randn(2, 5, 16), _mse)
    check(ctl, rec)
    assert sum(rec.unbilled.values()) > 0  # the attention products: FP32, not a quantized layer's


def test_transformer_encoder_layer() -> None:
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    ctl, rec = run(model, lambda s: torch.randn(2, 5, 16), _mse)
    check(ctl, rec)
    # MultiheadAttention's out-projection multiplies the FP32 attention output: billed at 32 bits.
    assert ctl.cost.product_summary()["self_attn"]["forward/q,fp32"] > 0
    assert sum(rec.unbilled.values()) > 0


class _Checkpointed(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)
        self.reentrant = reentrant

    def forward(self, x):
        return self.head(checkpoint(self.body, x, use_reentrant=self.reentrant))


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_activation_checkpointing(reentrant: bool) -> None:
    torch.manual_seed(0)
    model = _Checkpointed(reentrant)
    ctl, rec = run(model, lambda s: torch.randn(5, 6, requires_grad=True), _mse)
    check(ctl, rec)  # the recompute's forward is not billed again; the backward is billed once
    body = ctl.cost.product_summary()
    recomputed = sum(body[n]["forward"] for n in ("body.0", "body.2"))
    assert sum(rec.recompute.values()) == recomputed  # ... and it is what the recompute ran


@pytest.mark.skipif(not {"int8", "bf16"} <= probe_kernels("cpu"), reason="needs int8 and bf16 kernels")
@pytest.mark.parametrize("route", ["int8", "lowp"])
def test_hardware_routes(route: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 16))
    prec = PREC if route == "int8" else Precision.uniform("bf16")
    be = HardwareBackend()
    kinds = set()
    ctl, rec = run(model, lambda s: torch.randn(24, 32), _mse, backend=be, precision=prec,
                   inside=lambda ctl: kinds.update(r.kind for r, _ in be.routes().values()))
    assert kinds == {route}
    check(ctl, rec)


def test_the_check_catches_a_recurrence_billed_at_widths_it_did_not_run(monkeypatch) -> None:
    """adaprec 0.1's LSTM: hooks around torch's fused kernel quantized the input sequence, the weights
    and the error at the output sequence, and billed every product at the policy's widths, while the
    hidden-to-hidden products and every error inside ran in FP32."""
    import dataclasses

    from adaprec.quant import layers

    def billed_at_policy_widths(m, inputs, out):
        return inputs[0].numel() // m.input_size * sum(getattr(m, n).numel() for n in layers.rnn_weights(m))

    old = dataclasses.replace(layers._TABLE[nn.LSTM], forward=None, macs=billed_at_policy_widths)
    monkeypatch.setitem(layers._TABLE, nn.LSTM, old)
    torch.manual_seed(0)
    model = _SeqModel(nn.LSTM(8, 12, batch_first=True), 4)
    ctl, rec = run(model, lambda s: torch.randint(0, 20, (4, 6)), _lm_loss, blocks=(4,))
    with pytest.raises(AssertionError, match="executed"):
        check(ctl, rec)
    assert rec.billable[(4.0, 32.0)] > 0  # the quantized W_hh met the FP32 hidden state
