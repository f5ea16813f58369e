"""The Controller's loop protocol, history, constraints, report and cost meter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaprec
from adaprec.constraints import Clamp, Floor, Pin
from adaprec.cost import bitops_factor
from adaprec.decision import Decision
from adaprec.events import Event
from adaprec.formats import Precision
from adaprec.policies import Fixed, Policy


class _StepSchedule(Policy):
    """4 bits for the first two iterations, 6 bits after that."""

    name = "step-schedule"

    def decide(self, ctl):
        return Decision.uniform(Precision.cpt(4 if ctl.step_count < 2 else 6, 8))


def _data(n: int = 3):
    return [(torch.randn(2, 1, 8, 8), torch.randint(0, 3, (2,))) for _ in range(n)]


def _train(model, opt, loader, ctl) -> None:
    for x, y in ctl.epoch(loader):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ctl.observe(loss=loss.item())


def test_loop_with_optimizer(tiny_cnn: nn.Module) -> None:
    opt = torch.optim.SGD(tiny_cnn.parameters(), lr=0.05)
    with adaprec.Controller(tiny_cnn, policy="fixed", optimizer=opt) as ctl:
        for _ in range(2):
            _train(tiny_cnn, opt, _data(), ctl)
        assert ctl.current["0"] == Precision.cpt(8, 8)
    assert (ctl.step_count, ctl.epoch_index, ctl.layer_names) == (6, 2, ["0", "3"])
    assert isinstance(ctl.stats["loss"], float)
    assert len(ctl.history) == 1 and ctl.history[0].step == 0
    r = ctl.report()
    assert r["steps"] == 6 and r["layers"] == 2 and r["time_at_precision"] == {"int8/int8": 1.0}
    assert r["savings_vs_fp32"] == pytest.approx(1 - 192 / 3072)
    assert r["savings_vs_reference"] == pytest.approx(0.0)
    text = str(r)
    assert "gbitops" in text and "int8/int8: 1" in text


def test_loop_without_optimizer_and_misuse(tiny_cnn: nn.Module) -> None:
    ctl = adaprec.Controller(tiny_cnn, policy=_StepSchedule(), classifier_floor=False)
    with pytest.raises(RuntimeError, match="only available inside"):
        ctl.step()
    with ctl:
        for _ in range(3):
            tiny_cnn(torch.randn(2, 1, 8, 8)).sum().backward()
            ctl.step()
        with pytest.raises(ValueError, match="at least one keyword"):
            ctl.observe()
        with pytest.raises(ValueError, match="yielded no batches"):
            list(ctl.epoch([]))
        with pytest.raises(RuntimeError, match="already active on this model"):
            adaprec.Controller(tiny_cnn).__enter__()
    with pytest.raises(RuntimeError, match="entered once"):
        ctl.__enter__()
    with pytest.raises(RuntimeError, match="only available inside"):
        ctl.observe(loss=1.0)
    assert [(h.step, h.summary()) for h in ctl.history] == [(0, "int4/int8"), (2, "int6/int8")]
    assert ctl.report()["time_at_precision"] == {"int4/int8": pytest.approx(2 / 3),
                                                  "int6/int8": pytest.approx(1 / 3)}


def test_step_with_optimizer_given_is_an_error(tiny_cnn: nn.Module) -> None:
    opt = torch.optim.SGD(tiny_cnn.parameters(), lr=0.1)
    with adaprec.Controller(tiny_cnn, policy="fp32", optimizer=opt) as ctl:
        with pytest.raises(RuntimeError, match="do not call ctl.step"):
            ctl.step()


def test_precision_changed_event(tiny_cnn: nn.Module) -> None:
    seen = []
    ctl = adaprec.Controller(tiny_cnn, policy=_StepSchedule(), classifier_floor=False)
    ctl.on(Event.PRECISION_CHANGED, lambda c, old, new, step: seen.append(
        (None if old is None else old["0"].weight.bits, new["0"].weight.bits, step)))
    with ctl:
        for _ in range(4):
            ctl.step()
    assert seen == [(None, 4, 0), (4, 6, 2)]


def test_constraints_shape_the_decision(tiny_cnn: nn.Module) -> None:
    pol = Fixed(bits=3, grad_bits=6)
    kw = {"policy": pol, "classifier_floor": False}
    with adaprec.Controller(tiny_cnn, constraints=[Floor("first", 8)], **kw) as ctl:
        assert ctl.current["0"].short() == "int8/int8" and ctl.current["3"].short() == "int3/int6"
    with adaprec.Controller(tiny_cnn, constraints=Pin("last", Precision.fp32()), **kw) as ctl:
        assert ctl.current["3"].is_fp32 and ctl.current["0"].weight.bits == 3
    with adaprec.Controller(tiny_cnn, constraints=[Clamp(4, 5), Floor("3", 7, ("gradient",))], **kw) as ctl:
        assert ctl.current["0"].short() == "int4/int5" and ctl.current["3"].short() == "int4/int7"
    # The default classifier floor (3 classes: ceil(log2 3) + 1 + 2 = 5 bits) runs before the user's own.
    with adaprec.Controller(tiny_cnn, policy=pol) as ctl:
        assert ctl.current["3"].short() == "int5/int6" and ctl.current["0"].short() == "int3/int6"


def test_constraint_returning_garbage_is_reported(tiny_cnn: nn.Module) -> None:
    def drops_a_layer(layers, ctl):
        return {"0": layers["0"]}

    ctl = adaprec.Controller(tiny_cnn, policy="fixed", constraints=[drops_a_layer])
    with pytest.raises(TypeError, match="must return a dict mapping every quantized layer"), ctl:
        pass
    assert all("forward" not in m.__dict__ for m in tiny_cnn.modules())


def test_state_dict_round_trip(tiny_cnn: nn.Module) -> None:
    with adaprec.Controller(tiny_cnn, policy=_StepSchedule()) as ctl:
        for _ in range(3):
            tiny_cnn(torch.randn(2, 1, 8, 8)).sum().backward()
            ctl.step()
        sd = ctl.state_dict()
        before = ctl.report()
    with adaprec.Controller(tiny_cnn, policy=_StepSchedule()) as ctl2:
        ctl2.load_state_dict(sd)
        assert (ctl2.step_count, ctl2.current) == (3, ctl.current)
        assert [h.step for h in ctl2.history] == [0, 2]
        assert ctl2.report()["gbitops"] == before["gbitops"]
        with pytest.raises(ValueError, match="not an adaprec Controller state_dict"):
            ctl2.load_state_dict({"step": 1})


# --- cost meter against hand-computed MACs ---------------------------------------------------------

def _one_step_cost(model: nn.Module, inputs: tuple, prec: Precision, **kw) -> adaprec.Report:
    kw.setdefault("classifier_floor", False)
    with adaprec.Controller(model, policy=Fixed(prec.weight, prec.gradient, prec.activation), **kw) as ctl:
        out = model(*inputs)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
        model.eval()
        model(*inputs)  # evaluation forwards are not training cost
        model.train()
        ctl.step()
    return ctl.report()


# Per layer: the forward MACs, and the MACs of the two backward products when the input requires grad
# (and when it does not: a first layer fed with data has no input gradient to compute).
_MACS_CASES = [
    (nn.Linear(6, 4), (torch.randn(5, 6),), 5 * 4 * 6, None),
    # 2 images x 8 channels x 6x6 outputs, each 3 input channels x 3x3 taps.
    (nn.Conv2d(3, 8, 3, padding=1), (torch.randn(2, 3, 6, 6),), 2 * 8 * 36 * 3 * 9, None),
    # grouped and strided: 8 x 3x3 outputs, each reading 4/2 channels x 3x3.
    (nn.Conv2d(4, 8, 3, stride=2, groups=2), (torch.randn(1, 4, 7, 7),), 8 * 9 * 2 * 9, None),
    (nn.Conv1d(2, 3, 4), (torch.randn(2, 2, 10),), 2 * 3 * 7 * 2 * 4, None),
    # 2-layer LSTM, 7 x 3 tokens: layer 0 4H(I + H) = 20 * 9, layer 1 4H(H + H) = 20 * 10. The input
    # gradient of the recurrent product skips each direction's first step (its h_0 needs no gradient):
    # 18 of the 21 tokens; the second layer's input gradient always runs.
    (nn.LSTM(4, 5, num_layers=2), (torch.randn(7, 3, 4),), 21 * (20 * 9 + 20 * 10),
     (21 * 80, 18 * 100 + 21 * 100 + 18 * 100)),
    # GRU 3 gates, bidirectional: both directions read every token, each skipping its first step.
    (nn.GRU(4, 5, bidirectional=True), (torch.randn(6, 2, 4),), 12 * 2 * (15 * 4 + 15 * 5),
     (2 * 12 * 60, 2 * 10 * 75)),
]


@pytest.mark.parametrize("input_grad", [True, False], ids=["input-grad", "data-input"])
@pytest.mark.parametrize(("model", "inputs", "macs", "backward"), _MACS_CASES,
                         ids=["linear", "conv2d", "conv2d-grouped", "conv1d", "lstm", "gru-bi"])
def test_bitops_from_hand_computed_macs(model, inputs, macs, backward, input_grad: bool) -> None:
    inputs = tuple(t.clone().requires_grad_(input_grad) for t in inputs)
    r = _one_step_cost(model, inputs, Precision.cpt(4, 8))
    assert r["gmacs"] * 1e9 == pytest.approx(macs)
    # docs/methods.md#bitops: forward W x A at 4 x 4 bits, the backward products at 8 x 4 bits; the
    # input gradient only when the input requires grad.
    x_part, rest = backward or (macs, 0)
    input_grad_macs = rest + (x_part if input_grad else 0)
    assert r["gbitops"] * 1e9 == pytest.approx(16 * macs + 32 * input_grad_macs + 32 * macs)
    assert r["gbitops_fp32"] * 1e9 == pytest.approx(1024 * (2 * macs + input_grad_macs))
    if backward is None and input_grad:  # all three products: M * (b_fw^2 + 2 b_fw b_bw) = M * 80
        assert r["gbitops"] * 1e9 == pytest.approx(macs * 80)
        assert r["savings_vs_reference"] == pytest.approx(1 - 80 / 192)


def test_attention_bills_its_fp32_operands_at_32_bits() -> None:
    # Cross-attention, E = 8: q/k/v projections of 6 query and 10 key/value tokens, out-projection of 6.
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    q, kv = torch.randn(2, 3, 8, requires_grad=True), torch.randn(2, 5, 8, requires_grad=True)
    r = _one_step_cost(mha, (q, kv, kv), Precision.cpt(4, 8))
    proj, out = (6 + 10 + 10) * 64, 6 * 64
    assert r["gmacs"] * 1e9 == pytest.approx(proj + out)
    # The attention output (the out-projection's input) and the errors at the projections' outputs are
    # FP32: forward q x q and q x fp32; input gradient fp32 x q (projections) and q x q (out-projection);
    # weight gradient fp32 x q (projections) and q x fp32 (out-projection).
    want = proj * 4 * 4 + out * 4 * 32 + proj * 32 * 4 + out * 8 * 4 + proj * 32 * 4 + out * 8 * 32
    assert r["gbitops"] * 1e9 == pytest.approx(want)
    assert r["gbitops_fp32"] * 1e9 == pytest.approx(3 * 1024 * (proj + out))


def test_bitops_mixed_layers_and_fp32_layers() -> None:
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 2))
    r = _one_step_cost(model, (torch.randn(3, 6),), Precision.cpt(3, 8),
                       constraints=[Pin("last", Precision.fp32())])
    m0, m1 = 3 * 4 * 6, 3 * 2 * 4
    # Layer 0 reads the data: no input gradient, so its forward (3 x 3) and weight gradient (8 x 3).
    assert r["per_layer_gbitops"]["0"] * 1e9 == pytest.approx(m0 * (9 + 3 * 8))
    assert r["per_layer_gbitops"]["1"] * 1e9 == pytest.approx(m1 * 3 * 32 * 32)
    assert bitops_factor(Precision.cpt(3, 8)) == 57.0
    # CPT's check value (docs/methods.md#bitops): relative cost 3/8 vs 8/8.
    assert 1 - bitops_factor(Precision.cpt(3, 8)) / bitops_factor(Precision.cpt(8, 8)) == pytest.approx(
        1 - 57 / 192)


def test_cost_accumulates_over_steps_and_precision_changes(tiny_cnn: nn.Module) -> None:
    with adaprec.Controller(tiny_cnn, policy=_StepSchedule(), classifier_floor=False) as ctl:
        for _ in range(3):
            tiny_cnn(torch.randn(2, 1, 8, 8)).sum().backward()
            ctl.step()
    conv, lin = 2 * 4 * 36 * 9, 2 * 3 * 144  # per forward of batch 2
    # The conv reads the data (no input gradient): its forward and weight gradient only.
    want = sum(conv * (b * b + 8 * b) + lin * bitops_factor(Precision.cpt(b, 8)) for b in (4, 4, 6))
    assert ctl.report()["gbitops"] * 1e9 == pytest.approx(want)
