"""Quantized LSTM, GRU and RNN layers: every product of every weight matrix at the decided widths.

torch's recurrent kernels run the whole recurrence inside one call, so hooks around the layer can only
quantize its input sequence, its weights and the error at its output sequence; the hidden-to-hidden
products would multiply FP32 hidden states and FP32 errors. This module computes the layers itself,
per layer and direction, with the formats of the layer's precision (weight ``W``, activation ``A``,
gradient ``G``; docs/methods.md#bitops):

1. *input projection*, all time steps at once: ``P = q_A(x) q_W(W_ih)^T + b_ih``; the error arriving at
   ``P`` is quantized by ``G``, each time step's rows as one tensor (as the recurrent error below; for
   LSTM and RNN cells it is the same error, quantized once);
2. *recurrence*, each step: ``R_t = q_A(h_{t-1}) q_W(W_hh)^T + b_hh``, the hidden state quantized as an
   activation by the format's own rule on that step's tensor (a min-max grid takes its own range, never
   the running range of the layer's input); the error arriving at ``R_t`` is quantized by ``G``;
3. *projection* (LSTM with ``proj_size``): ``h_t = q_A(o_t * tanh(c_t)) q_W(W_hr)^T``, the error at
   ``h_t`` quantized by ``G``.

So the forward, input-gradient and weight-gradient products of ``W_ih``, ``W_hh`` and ``W_hr`` all take
quantized operands. The gates, the cell state and the blend of GRU's update gate are elementwise and
stay float32, as torch computes them. A second layer's input is the first layer's output sequence,
quantized as an activation with its own range (after dropout, which torch applies between layers).

When the activation and gradient formats are both FP32 the recurrence is exactly what torch's kernel
computes, so torch's own forward runs (with the quantized weights): the fused kernel, at its speed.

Supported: ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` (tanh and relu) with every option torch has —
``num_layers``, ``bidirectional``, ``batch_first``, ``bias``, ``dropout``, ``proj_size``, unbatched input,
an initial state, and :class:`~torch.nn.utils.rnn.PackedSequence` input. A layer whose class overrides
``forward`` keeps its own forward: adaprec then quantizes only its input, its weights and the error at
its output, and bills its recurrence at the widths it runs (FP32; see :func:`rnn_macs`).

Example:
    >>> import torch
    >>> from adaprec.formats import Precision
    >>> from adaprec.quant.simulated import SimulatedBackend
    >>> lstm = torch.nn.LSTM(4, 8, num_layers=2, batch_first=True)
    >>> be = SimulatedBackend(); _ = be.attach(lstm, [("lstm", lstm)])
    >>> be.apply({"lstm": Precision.cpt(4, 8)})
    >>> out, (h, c) = lstm(torch.randn(3, 5, 4))
    >>> out.shape, h.shape, be.sites["lstm"].native
    (torch.Size([3, 5, 8]), torch.Size([2, 3, 8]), [True, True])
    >>> be.detach()
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from ..formats import run_kernel
from .attach import SITE

__all__ = ["rnn_forward", "rnn_macs", "rnn_weights"]


def rnn_weights(m: nn.RNNBase) -> list[str]:
    """The weight matrices of an LSTM/GRU/RNN (every layer and direction; biases are not products)."""
    return [n for n in m._flat_weights_names if n.startswith("weight")]


# --- the forward -----------------------------------------------------------------------------------

def rnn_forward(self: nn.RNNBase, input: Any, hx: Any = None) -> Any:
    """The class-level forward of a quantized LSTM/GRU/RNN (see :mod:`adaprec.quant.attach`)."""
    site = self.__dict__[SITE]
    roles = site.roles(self.training)
    token = site.begin_rounding(self.training) if site.sr_forward else None  # checkpoint replay
    try:
        if roles.activation.active or (roles.gradient.active and torch.is_grad_enabled()):
            return _quantized_forward(self, site, roles, input, hx)
        return _torch_forward(self, site, roles, input, hx)
    finally:
        site.end_rounding(token)


def _torch_forward(self: nn.RNNBase, site: Any, roles: Any, input: Any, hx: Any) -> Any:
    """FP32 activations and errors: torch's own kernel with the quantized weights (``_flat_weights``)."""
    if roles.weight.active:
        site.w = {spec.key: roles.weight(spec.raw(), channel_dim=site.kind.channel_dim)
                  for spec in site.weights}
    try:
        out = type(self)._adaprec_base.forward(self, input, hx)
    finally:
        site.w = None
    if self.training:
        x = input.data if isinstance(input, PackedSequence) else input
        n, first = _tokens(self, input)
        site.call_macs = _products(self, n, first, x.requires_grad, *_state_grads(self, hx))
    return out


def _tokens(self: nn.RNNBase, input: Any) -> tuple[int, tuple[int, int]]:
    """Tokens of one direction, and the rows of its first step (forward direction, reverse direction)."""
    if isinstance(input, PackedSequence):
        bs = input.batch_sizes
        return input.data.shape[0], (int(bs[0]), int(bs[-1]))
    if input.dim() == 2:
        return input.shape[0], (1, 1)
    t, b = (input.shape[1], input.shape[0]) if self.batch_first else input.shape[:2]
    return t * b, (b, b)


def _state_grads(self: nn.RNNBase, hx: Any) -> tuple[bool, bool]:
    if hx is None:
        return False, False
    if isinstance(hx, tuple | list):
        return bool(hx[0].requires_grad), bool(hx[1].requires_grad)
    return bool(hx.requires_grad), False


def _quantized_forward(self: nn.RNNBase, site: Any, roles: Any, input: Any, hx: Any) -> Any:
    name = type(self).__name__
    lstm = self.mode == "LSTM"
    directions = 2 if self.bidirectional else 1
    proj = getattr(self, "proj_size", 0)
    out_size = proj if proj > 0 else self.hidden_size
    packed = isinstance(input, PackedSequence)
    unbatched = False
    if packed:
        data, batch_sizes, sorted_indices, unsorted_indices = input
        steps: list[int] | int = batch_sizes.tolist()
        batch = steps[0]
        x = data
        checked = data
    else:
        if not isinstance(input, Tensor) or input.dim() not in (2, 3):
            got = f"{input.dim()}D" if isinstance(input, Tensor) else type(input).__name__
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {got} instead")
        batch_sizes = sorted_indices = unsorted_indices = None
        unbatched = input.dim() == 2
        batch_dim = 0 if self.batch_first else 1
        checked = input.unsqueeze(batch_dim) if unbatched else input
        x = checked.transpose(0, 1) if self.batch_first else checked  # time-major (T, B, I)
        batch = x.shape[1]
        steps = batch
    hx = _initial_state(self, hx, lstm, unbatched, batch, out_size, x)
    self.check_forward_args(checked, hx, batch_sizes)
    if sorted_indices is not None:
        hx = self.permute_hidden(hx, sorted_indices)
    h0, c0 = hx if lstm else (hx, None)

    training = self.training
    act, grad = roles.activation, roles.gradient
    flat = x.reshape(-1, x.shape[-1])
    x_rg = flat.requires_grad
    layer_in = act(flat, training, update=not site.recomputing)
    quantized = {}
    for spec in site.weights:
        raw = spec.raw()
        quantized[spec.key] = (roles.weight(raw, channel_dim=site.kind.channel_dim) if roles.weight.active
                               else raw)

    def param(pname: str) -> Tensor | None:
        if pname in quantized:
            return quantized[pname]
        return getattr(self, pname) if self.bias or not pname.startswith("bias") else None

    cell = self.mode
    h_n: list[Tensor] = []
    c_n: list[Tensor] = []
    out = layer_in
    for layer in range(self.num_layers):
        outs = []
        for d in range(directions):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            i = layer * directions + d
            y, h, c = _direction(cell, layer_in, steps, param("weight_ih" + sfx), param("weight_hh" + sfx),
                                 param("bias_ih" + sfx), param("bias_hh" + sfx),
                                 param("weight_hr" + sfx) if proj > 0 else None,
                                 h0[i], None if c0 is None else c0[i], bool(d), act, grad)
            outs.append(y)
            h_n.append(h)
            if c is not None:
                c_n.append(c)
        out = outs[0] if directions == 1 else torch.cat(outs, -1)
        if layer < self.num_layers - 1:
            if self.dropout and training:
                out = F.dropout(out, self.dropout, True)
            layer_in = act.own(out)
    hidden: Any = torch.stack(h_n)
    if lstm:
        hidden = (hidden, torch.stack(c_n))
    if training:
        n = flat.shape[0]
        first = (steps[0], steps[-1]) if packed else (batch, batch)
        site.call_macs = _products(self, n, first, x_rg, *_state_grads(self, hx))
    if packed:
        return (PackedSequence(out, batch_sizes, sorted_indices, unsorted_indices),
                self.permute_hidden(hidden, unsorted_indices))
    out = out.reshape(x.shape[0], batch, -1)
    if self.batch_first:
        out = out.transpose(0, 1)
    if unbatched:
        out = out.squeeze(1 if not self.batch_first else 0)
        hidden = (hidden[0].squeeze(1), hidden[1].squeeze(1)) if lstm else hidden.squeeze(1)
    return out, hidden


def _initial_state(self: nn.RNNBase, hx: Any, lstm: bool, unbatched: bool, batch: int, out_size: int,
                   x: Tensor) -> Any:
    """Zeros when none is given; an unbatched state gets its batch dimension (torch's checks)."""
    directions = 2 if self.bidirectional else 1
    if hx is None:
        h = torch.zeros(self.num_layers * directions, batch, out_size, dtype=x.dtype, device=x.device)
        if not lstm:
            return h
        return h, torch.zeros(self.num_layers * directions, batch, self.hidden_size, dtype=x.dtype,
                              device=x.device)
    want = 2 if unbatched else 3
    states = hx if lstm else (hx,)
    if lstm and not (isinstance(hx, tuple | list) and len(hx) == 2):
        raise RuntimeError(f"{type(self).__name__}: hx must be a tuple (h_0, c_0), got {type(hx).__name__}")
    if any(s.dim() != want for s in states):
        dims = ", ".join(f"{s.dim()}-D" for s in states)
        raise RuntimeError(f"For {'unbatched 2-D' if unbatched else 'batched 3-D'} input, hx should also be "
                           f"{want}-D but got ({dims}) tensors")
    if unbatched:
        states = tuple(s.unsqueeze(1) for s in states)
    return tuple(states) if lstm else states[0]


# torch.compile would unroll the time loop (seconds of tracing per step of the sequence) and gains nothing
# on a loop of small products: the recurrence runs eagerly inside a compiled model (one graph break per
# layer and direction).
@torch.compiler.disable
def _direction(cell: str, x: Tensor, steps: list[int] | int, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None,
               b_hh: Tensor | None, w_hr: Tensor | None, h: Tensor, c: Tensor | None, reverse: bool,
               act, grad) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer, one direction over a time-major sequence ``x`` (``N x I``, quantized; ``steps`` is the
    batch size, or the packed sequence's batch sizes). Returns the outputs ``N x H_out`` and the last
    state."""
    qa = _Kernel(act) if act.active else None
    qg = _Kernel(grad) if grad.active else None
    return _Layer.apply(x, w_ih, w_hh, b_ih, b_hh, w_hr, h, c, cell, steps, reverse, qa, qg)


class _Kernel:
    """A quantizer's kernel with the numbers it had at the forward (the controller may refill them in
    place before ``backward()`` runs), applied to whole tensors by the format's own rule."""

    __slots__ = ("kernel", "spec", "p", "axis", "rng")

    def __init__(self, q) -> None:
        self.kernel, self.spec, self.p, self.axis, self.rng = q.kernel, q.spec, q.p.clone(), q.axis, q.rng

    def __call__(self, x: Tensor) -> Tensor:
        return run_kernel(self.kernel, x, self.p, self.spec, None, None, self.axis, self.rng)


def _ident(x: Tensor) -> Tensor:
    return x


def _layout(steps: list[int] | int, n_rows: int, reverse: bool) -> tuple[list[int], list[int], list[int]]:
    """Rows per time step, the first row of each step, and the order the steps are processed in."""
    sizes = [steps] * (n_rows // steps) if isinstance(steps, int) else list(steps)
    starts = [0] * len(sizes)
    for t in range(1, len(sizes)):
        starts[t] = starts[t - 1] + sizes[t - 1]
    order = list(range(len(sizes) - 1, -1, -1)) if reverse else list(range(len(sizes)))
    return sizes, starts, order


class _Layer(torch.autograd.Function):
    """One layer and direction of a recurrent layer, with its backward written out (backpropagation
    through time): autograd recording some twenty operations per time step cost more than the products
    themselves. Every per-step tensor is written into one buffer per kind, time-major, so the weight
    gradients are one product each over all steps.

    Forward: ``P = x W_ih^T + b_ih`` for all steps (``x`` already quantized), then per step ``t``:
    ``R_t = q_A(h_{t-1}) W_hh^T + b_hh`` and the cell. Backward per step: the errors at ``R_t`` and at
    ``P_t`` are quantized by the gradient format (``qg``), each step's tensor by itself, before they meet
    ``W_hh`` and ``q_A(h_{t-1})``, ``W_ih`` and ``x``. For LSTM and RNN cells the two errors are the same
    tensor (the gates are ``P_t + R_t``) and are quantized once; GRU's differ in the new gate."""

    @staticmethod
    def forward(ctx, x, w_ih, w_hh, b_ih, b_hh, w_hr, h, c, cell, steps, reverse, qa, qg):  # noqa: D102
        qa = qa or _ident
        lstm, gru = cell == "LSTM", cell == "GRU"
        sizes, starts, order = _layout(steps, x.shape[0], reverse)
        b = b_ih
        if b_hh is not None and not gru:  # GRU's b_hn sits inside the reset gate's product
            b = b_hh if b is None else b + b_hh
        p = x @ w_ih.t() if b is None else torch.addmm(b, x, w_ih.t())  # the gates fill it in place
        n_all, hs = x.shape[0], w_hh.shape[1] if w_hr is None else c.shape[1]
        out_size = h.shape[1]
        full = h.shape[0]
        new = p.new_empty
        hq_all = new(n_all, out_size)
        y = p if cell in ("RNN_TANH", "RNN_RELU") else new(n_all, out_size)
        if lstm:
            c_all, tc_all, cp_all = new(n_all, hs), new(n_all, hs), new(n_all, hs)
            hf_all = new(n_all, hs) if w_hr is not None else None
        elif gru:
            rn_all, diff_all = new(n_all, hs), new(n_all, hs)
        w_t = w_hh.t().contiguous()  # one copy per call: the per-step products read it row by row
        w_rt = None if w_hr is None else w_hr.t().contiguous()
        for t in order:
            s, n = starts[t], sizes[t]
            e = s + n
            hp = h if n == full else h[:n]
            hq = hq_all[s:e]
            hq.copy_(qa(hp))
            pt = p[s:e]
            if lstm:
                cp = c if n == full else c[:n]
                cp_all[s:e] = cp
                pt.addmm_(hq, w_t)
                g = pt[:, 2 * hs:3 * hs].tanh()
                pt.sigmoid_()[:, 2 * hs:3 * hs] = g
                c_new = torch.mul(pt[:, hs:2 * hs], cp, out=c_all[s:e]).addcmul_(pt[:, :hs], g)
                tc = torch.tanh(c_new, out=tc_all[s:e])
                if w_rt is None:
                    h_new = torch.mul(pt[:, 3 * hs:], tc, out=y[s:e])
                else:
                    hf = hf_all[s:e]
                    hf.copy_(qa(pt[:, 3 * hs:] * tc))
                    h_new = torch.mm(hf, w_rt, out=y[s:e])
            elif gru:
                r = hq @ w_t if b_hh is None else torch.addmm(b_hh, hq, w_t)
                rz = pt[:, :2 * hs].add_(r[:, :2 * hs]).sigmoid_()
                rn = r[:, 2 * hs:]
                rn_all[s:e] = rn
                nn_ = pt[:, 2 * hs:].addcmul_(rz[:, :hs], rn).tanh_()
                diff = torch.sub(hp, nn_, out=diff_all[s:e])
                h_new = torch.addcmul(nn_, rz[:, hs:], diff, out=y[s:e])
            else:
                pt.addmm_(hq, w_t)
                h_new = pt.tanh_() if cell == "RNN_TANH" else pt.relu_()
            if n == full:
                h = h_new
                if lstm:
                    c = c_new
            else:  # a packed sequence: rows past n have ended (forward) or not started (reverse)
                h = torch.cat((h_new, h[n:]))
                if lstm:
                    c = torch.cat((c_new, c[n:]))
        ctx.cell, ctx.steps, ctx.reverse, ctx.qg, ctx.full = cell, steps, reverse, qg, full
        ctx.has_bias = b_ih is not None, b_hh is not None
        if lstm:
            cell_state = (p, cp_all, tc_all)
        elif gru:
            cell_state = (p, rn_all, diff_all)
        else:
            cell_state = (y,)
        ctx.save_for_backward(x, w_ih, w_hh, w_hr, hq_all, hf_all if lstm else None, *cell_state)
        # The final state is a view of the outputs: give it storage of its own.
        return y, h.clone(), (c.clone() if lstm else None)

    @staticmethod
    def backward(ctx, dy, dh, dc):  # noqa: D102
        if torch.is_grad_enabled():
            raise RuntimeError(
                "adaprec's quantized LSTM/GRU/RNN does not support higher-order gradients (backward with "
                "create_graph=True, e.g. a gradient penalty) through the recurrence: its backward is "
                "written out. Keep the recurrent layer at FP32 activations and gradients for this run "
                "(e.g. layers='!<name>' or a Pin constraint), or compute the penalty without it")
        cell, full = ctx.cell, ctx.full
        qg = ctx.qg or _ident
        x, w_ih, w_hh, w_hr, hq_all, hf_all, *state = ctx.saved_tensors
        need_x, need_wih, need_whh, need_bih, need_bhh, need_whr, need_h, need_c = ctx.needs_input_grad[:8]
        sizes, starts, order = _layout(ctx.steps, x.shape[0], ctx.reverse)
        lstm, gru = cell == "LSTM", cell == "GRU"
        dp = torch.empty(x.shape[0], w_hh.shape[0], dtype=dy.dtype, device=dy.device)
        dr_all = torch.empty_like(dp) if gru else dp  # GRU's recurrent error differs in the new gate
        dq_all = torch.empty_like(dy) if w_hr is not None else None
        k = _factors(cell, state)  # what does not depend on the error, all steps at once
        if dh is None:
            dh = dy.new_zeros(full, dy.shape[1])
        for j in range(len(order) - 1, -1, -1):
            t = order[j]
            s, n = starts[t], sizes[t]
            e = s + n
            part = n != full
            g = dy[s:e] + (dh[:n] if part else dh)
            if w_hr is not None:
                dq = dq_all[s:e]
                dq.copy_(qg(g))
                g = dq @ w_hr
            dgate = dp[s:e]
            base = None
            if lstm:
                k1, k2, k3, f = (v[s:e] for v in k)
                hs = k1.shape[1]
                dct = torch.addcmul(dc[:n] if part else dc, g, k1)
                torch.mul(dct.unsqueeze(1), k3, out=dgate[:, :3 * hs].view(n, 3, hs))
                torch.mul(g, k2, out=dgate[:, 3 * hs:])
                dc_prev = dct.mul_(f)
                dc = torch.cat((dc_prev, dc[n:])) if part else dc_prev
            elif gru:
                kr, kz, kn, reset, update = (v[s:e] for v in k)
                hs = kn.shape[1]
                dn = g * kn  # the error at the new gate's pre-activation
                torch.mul(dn, kr, out=dgate[:, :hs])
                torch.mul(g, kz, out=dgate[:, hs:2 * hs])
                dgate[:, 2 * hs:] = dn
                dr = dr_all[s:e]
                dr[:, :2 * hs] = dgate[:, :2 * hs]
                torch.mul(dn, reset, out=dr[:, 2 * hs:])
                dr.copy_(qg(dr))
                base = g * update  # through the blend z * h_{t-1}: FP32, like the blend itself
            else:
                torch.mul(g, k[0][s:e], out=dgate)
            dq_gate = qg(dgate)
            if dq_gate is not dgate:
                dgate.copy_(dq_gate)  # LSTM/RNN: also the recurrent product's error
            dr = dr_all[s:e]
            if j or need_h:  # j == 0: the first step processed, whose h_{t-1} is the initial state
                dh_prev = dr @ w_hh if base is None else torch.addmm(base, dr, w_hh)
            else:
                dh_prev = base if base is not None else dh[:n]
            dh = torch.cat((dh_prev, dh[n:])) if part else dh_prev
        # Weight gradients: one product over all steps each (the same MACs as one per step).
        gx = dp @ w_ih if need_x else None
        gwih = dp.t() @ x if need_wih else None
        gwhh = dr_all.t() @ hq_all if need_whh else None
        gwhr = dq_all.t() @ hf_all if need_whr else None
        gbih = dp.sum(0) if need_bih else None
        gbhh = (gbih if gbih is not None and not gru else dr_all.sum(0)) if need_bhh else None
        gh = dh if need_h else None
        gc = dc if need_c and lstm else None
        return gx, gwih, gwhh, gbih, gbhh, gwhr, gh, gc, None, None, None, None, None


def _factors(cell: str, state: list[Tensor]) -> list[Tensor]:
    """The backward's per-element factors for all steps at once: the error at the gates is then one or
    two multiplications per step."""
    if cell == "LSTM":
        a, cp, tc = state
        hs = tc.shape[1]
        i, f, g, o = a[:, :hs], a[:, hs:2 * hs], a[:, 2 * hs:3 * hs], a[:, 3 * hs:]
        k1 = o * (1 - tc * tc)                 # h = o tanh(c): dc += dh * k1
        k2 = tc * o * (1 - o)                  # the output gate's pre-activation: dh * k2
        k3 = torch.empty(a.shape[0], 3, hs, dtype=a.dtype, device=a.device)
        torch.mul(g, i * (1 - i), out=k3[:, 0])   # input gate: dc * k3[0]
        torch.mul(cp, f * (1 - f), out=k3[:, 1])  # forget gate
        torch.mul(i, 1 - g * g, out=k3[:, 2])     # cell candidate
        return [k1, k2, k3, f]
    if cell == "GRU":
        p, rn, diff = state
        hs = rn.shape[1]
        reset, update, nn_ = p[:, :hs], p[:, hs:2 * hs], p[:, 2 * hs:]
        kn = (1 - update) * (1 - nn_ * nn_)
        return [rn * reset * (1 - reset), diff * update * (1 - update), kn, reset, update]
    (h,) = state
    return [1 - h * h if cell == "RNN_TANH" else (h > 0).to(h.dtype)]


# --- the cost --------------------------------------------------------------------------------------

def _products(m: nn.RNNBase, n: int, first: tuple[int, int], x_rg: bool, h0_rg: bool, c0_rg: bool,
              quantized: bool = True) -> dict[Any, int]:
    """MACs of one call per product kind (:data:`adaprec.cost.KINDS`): what the forward above, or
    torch's kernel, computes, and what autograd's backward of it computes.

    Per layer and direction of ``n`` tokens: the forward multiplies every weight matrix once per token.
    The weight gradient does too, for the weights that require grad. The input gradient of the input
    projection runs when the layer's input requires grad (a second layer's always does, a first
    layer's only when its input does); the recurrent one for every step after the first, and for the
    first (``first`` rows) only when the initial state requires grad.

    ``quantized=False``: the layer ran its own forward around torch's kernel (a subclass overriding
    ``forward``), so only the first layer's input and the weights are quantized: the hidden states, the
    second layer's input and every error inside the recurrence are FP32, and billed as such.
    """
    f = {"forward": 0, "forward_fp32": 0, "input_grad": 0, "weight_grad": 0, "weight_grad_fp32": 0}
    directions = 2 if m.bidirectional else 1
    proj = getattr(m, "proj_size", 0) > 0
    params = dict(m.named_parameters(recurse=False))

    def rg(pname: str) -> bool:
        p = params.get(pname)
        return p is not None and p.requires_grad

    for layer in range(m.num_layers):
        out_rg = False
        for d in range(directions):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            n_ih = params["weight_ih" + sfx].numel()
            n_hh = params["weight_hh" + sfx].numel()
            n_hr = params["weight_hr" + sfx].numel() if proj else 0
            first_in = quantized or layer == 0  # the input operand in the activation format
            f["forward" if first_in else "forward_fp32"] += n * n_ih
            f["forward" if quantized else "forward_fp32"] += n * (n_hh + n_hr)
            if rg("weight_ih" + sfx):
                f["weight_grad" if first_in else "weight_grad_fp32"] += n * n_ih
            for w, size in (("weight_hh", n_hh), ("weight_hr", n_hr)):
                if size and rg(w + sfx):
                    f["weight_grad" if quantized else "weight_grad_fp32"] += n * size
            p_rg = x_rg or rg("weight_ih" + sfx) or rg("bias_ih" + sfx)
            g_rg = p_rg or rg("weight_hh" + sfx) or rg("bias_hh" + sfx) or h0_rg or c0_rg
            s_rg = g_rg or (proj and rg("weight_hr" + sfx))
            ig = n * n_ih if x_rg else 0
            ig += (n - first[d]) * n_hh if s_rg else 0
            ig += first[d] * n_hh if h0_rg else 0
            ig += n * n_hr if g_rg else 0
            f["input_grad"] += ig
            out_rg = out_rg or s_rg
        x_rg = out_rg
    if quantized:
        return {"forward": f["forward"], "input_grad": f["input_grad"], "weight_grad": f["weight_grad"]}
    # Around torch's kernel the errors inside are FP32 (quantized only where they leave the layer).
    return {"forward": f["forward"], ("forward", True, False): f["forward_fp32"],
            ("input_grad", False, True): f["input_grad"],
            ("weight_grad", False, True): f["weight_grad"],
            ("weight_grad", False, False): f["weight_grad_fp32"]}


def rnn_macs(m: nn.RNNBase, inputs: tuple[Any, ...], out: Any) -> dict[Any, int]:
    """The layer table's ``macs`` of LSTM/GRU/RNN: the products the call ran (:func:`_products`).

    The quantized forward leaves them on the site (it knows the initial state's ``requires_grad``);
    a layer running its own forward around torch's kernel is billed at the widths that kernel runs.
    """
    site = m.__dict__.get(SITE)
    if site is not None and site.call_macs is not None:
        macs, site.call_macs = site.call_macs, None
        return macs
    x = inputs[0]
    n, first = _tokens(m, x)
    data = x.data if isinstance(x, PackedSequence) else x
    return _products(m, n, first, bool(data.requires_grad), False, False, quantized=False)
