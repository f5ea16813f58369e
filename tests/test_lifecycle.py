"""Issue 14 (items 1, 2, 5): the public lifecycle, wrapped optimizers, GradScaler-skipped iterations,
the divergence guard with closures, and the layer-type extension point."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaprec
from adaprec.events import Event
from adaprec.formats import IntFormat, Precision
from adaprec.policies import CPT, Fixed
from adaprec.policies.cpt import cpt_bits
from adaprec.quant import layer_kind, register_layer, unregister_layer


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _data(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 6, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(n)]


def _step(model, opt, batch) -> None:
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def _events(ctl) -> list[tuple[str, dict]]:
    log: list[tuple[str, dict]] = []
    for ev in (Event.FIT_STARTED, Event.EPOCH_STARTED, Event.ITERATION_COMPLETED, Event.EPOCH_COMPLETED,
               Event.FIT_COMPLETED, Event.EXCEPTION_RAISED):
        ctl.on(ev, lambda c, _e=ev, **d: log.append((_e.value, {k: v for k, v in d.items()
                                                                 if k != "exception"})))
    return log


# --- 1. the lifecycle ----------------------------------------------------------------------------------

def test_start_close_and_explicit_epochs_equal_the_with_block() -> None:
    runs = []
    for style in ("with", "explicit"):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ctl = adaprec.Controller(model, policy=CPT(bits=(3, 8), cycles=2), optimizer=opt, total_steps=12)
        if style == "with":
            with ctl:
                log = _events(ctl)
                for _ in range(3):
                    for batch in ctl.epoch(_data()):
                        _step(model, opt, batch)
        else:
            ctl.start()
            log = _events(ctl)
            for _ in range(3):
                ctl.begin_epoch()
                for batch in _data():
                    _step(model, opt, batch)
                ctl.end_epoch()
            ctl.close()
            ctl.close()  # closing twice is harmless (a trainer's on_fit_end and on_exception)
        runs.append((ctl.history, [p.detach().clone() for p in model.parameters()], ctl.report(), log))
    (h1, w1, r1, l1), (h2, w2, r2, l2) = runs
    assert h1 == h2 and r1 == r2 and l1 == l2
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))
    assert [e for e, _ in l1].count("epoch_completed") == 3 and l1[-1][0] == "fit_completed"


def test_callback_style_driving() -> None:
    # What a trainer callback does: restore state before fit starts, start at the trainer's counters,
    # end epochs itself, close on an exception.
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with adaprec.Controller(model, policy=CPT(bits=(3, 8), cycles=2), optimizer=opt, total_steps=16) as ctl:
        for batch in _data(6):
            _step(model, opt, batch)
        saved = copy.deepcopy(ctl.state_dict())

    model2 = _mlp()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    ctl2 = adaprec.Controller(model2, policy=CPT(bits=(3, 8), cycles=2), optimizer=opt2, total_steps=16)
    fresh = ctl2.state_dict()  # usable before the start
    assert fresh["step"] == 0 and fresh["backend"] == {} and fresh["cost"] is None
    ctl2.load_state_dict(saved)  # checked now, applied at start
    assert ctl2.step_count == 0
    ctl2.start()
    assert ctl2.step_count == 6 and ctl2.current["0"].weight.bits == cpt_bits(6, 16, 2, 3, 8)
    log = _events(ctl2)
    ctl2.begin_epoch(epoch=2)  # the trainer's current_epoch
    assert ctl2.epoch_index == 2
    ctl2.step_count = 10  # the trainer's global_step: the current iteration is decided again
    assert ctl2.current["0"].weight.bits == cpt_bits(10, 16, 2, 3, 8)
    with pytest.raises(ValueError, match="step_count must be a non-negative integer"):
        ctl2.step_count = -1
    _step(model2, opt2, _data()[0])
    ctl2.end_epoch()
    assert log[-1] == ("epoch_completed", {"epoch": 2, "batches": 1}) and ctl2.epoch_index == 3
    with pytest.raises(RuntimeError, match="no epoch is open"):
        ctl2.end_epoch()
    ctl2.close(RuntimeError("the trainer failed"))
    assert log[-1][0] == "exception_raised"
    assert type(model2[0]) is nn.Linear and not model2[0]._forward_hooks
    with pytest.raises(RuntimeError, match="entered once"):
        ctl2.start()

    ctl3 = adaprec.Controller(_mlp(), policy="fixed")
    ctl3.start(step=40, epoch=3)
    assert (ctl3.step_count, ctl3.epoch_index, ctl3.history[0].step) == (40, 3, 40)
    ctl3.close()


def test_close_ends_an_open_epoch() -> None:
    model = _mlp()
    ctl = adaprec.Controller(model, policy="fixed")
    ctl.start()
    log = _events(ctl)
    ctl.begin_epoch()
    model(torch.randn(2, 6)).sum().backward()
    ctl.step()
    ctl.close()
    assert [e for e, _ in log] == ["epoch_started", "iteration_completed", "epoch_completed", "fit_completed"]


# --- 1. wrapped optimizers -----------------------------------------------------------------------------

def test_lightning_optimizer_is_unwrapped() -> None:
    lo = pytest.importorskip("lightning.pytorch.core.optimizer")
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = lo.LightningOptimizer(opt)
    with adaprec.Controller(model, policy="fixed", optimizer=wrapped) as ctl:
        assert ctl.optimizer is opt
        for batch in _data(3):
            _step(model, opt, batch)
    assert ctl.step_count == 3 and not opt._optimizer_step_post_hooks and "step" not in vars(opt)


def test_accelerate_prepared_optimizer() -> None:
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    acc = accelerate.Accelerator(cpu=True)
    try:
        model = _mlp()
        model, opt = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        with adaprec.Controller(model, policy=Fixed(bits=4), optimizer=opt) as ctl:  # 0.1: AttributeError
            for x, y in _data(3):
                loss = F.cross_entropy(model(x), y)
                acc.backward(loss)
                opt.step()
                opt.zero_grad()
        assert ctl.step_count == 3 and ctl.optimizer is opt.optimizer
    finally:
        AcceleratorState._reset_state(True)


# --- 1. GradScaler-skipped iterations ------------------------------------------------------------------

@pytest.mark.parametrize("guard", [True, False])
def test_gradscaler_skipped_iterations_count_as_iterations(guard: bool) -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    skipped = {2, 5}
    bits = []
    with adaprec.Controller(model, policy=CPT(bits=(3, 8), cycles=2), optimizer=opt, total_steps=10,
                            scaler=scaler, guard=guard, classifier_floor=False) as ctl:
        for i in range(10):
            bits.append(ctl.current["0"].weight.bits)
            x, y = _data(10)[i]
            loss = F.cross_entropy(model(x), y) * (math.inf if i in skipped else 1.0)
            opt.zero_grad()
            scaler.scale(loss).backward()
            before = [p.detach().clone() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
            changed = any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
            assert changed == (i not in skipped)  # the scaler really skipped those updates
    assert ctl.step_count == 10  # adaprec 0.1: 8 (skipped iterations were not counted)
    assert bits == [cpt_bits(t, 10, 2, 3, 8) for t in range(10)]  # the schedule did not drift
    assert "step" not in vars(scaler) and "step" not in vars(opt)
    if guard:
        assert ctl.guard.skipped == 0  # an overflow the scaler handles is not a divergence


# --- 2. the guard with closures ------------------------------------------------------------------------

def test_guard_checks_the_gradients_the_closure_computes() -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = []
    with adaprec.Controller(model, policy=Fixed(bits=6, grad_bits=8), optimizer=opt,
                            classifier_floor=False) as ctl:
        for i, (x, y) in enumerate(_data(8)):
            def closure(i=i, x=x, y=y):
                calls.append(i)
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                if i == 5:
                    loss = loss * math.nan
                loss.backward()
                return loss

            before = [p.detach().clone() for p in model.parameters()]
            loss = opt.step(closure)  # Lightning's default path
            assert loss is not None
            if i == 5:  # skipped: this step's NaN gradients were checked, the weights left alone
                assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
            assert all(torch.isfinite(p).all() for p in model.parameters())
    assert calls == list(range(8))  # the closure ran exactly once per step, skipped or not
    assert ctl.guard.skipped == 1 and ctl.step_count == 8


def test_guard_with_lbfgs() -> None:
    model = _mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    x, y = _data(1)[0]
    evals = []

    def closure():
        evals.append(1)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with adaprec.Controller(model, policy=Fixed(bits=8), optimizer=opt, classifier_floor=False) as ctl:
        first = float(opt.step(closure).detach())
        second = float(opt.step(closure).detach())
    assert ctl.step_count == 2 and second < first and len(evals) > 2  # LBFGS re-evaluated


# --- 5. layer types ------------------------------------------------------------------------------------

class Affine(nn.Module):
    """A layer type torch does not have: y = x @ A + b with A stored (in, out)."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(n_in, n_out) / n_in**0.5)
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return x @ self.A + self.b


def test_register_layer_with_a_type_defined_here() -> None:
    kind = register_layer(Affine, weights=["A"], channel_dim=1,
                          macs=lambda m, inputs, out: out.numel() * m.A.shape[0])
    try:
        model = nn.Sequential(Affine(6, 8), nn.ReLU(), nn.Linear(8, 3))
        assert layer_kind(model[0]) is kind
        x = torch.randn(5, 6)
        with adaprec.Controller(model, policy=Fixed(bits=3, grad_bits=8), classifier_floor=False) as ctl:
            assert ctl.layer_names == ["0", "2"]
            y = model[0](x)
            aq = IntFormat(3, per_channel=True).quantize(model[0].A.detach().t()).t()  # per output column
            assert torch.equal(y, IntFormat(3).quantize(x) @ aq + model[0].b)
            model(x).sum().backward()
            ctl.step()
        assert ctl.report()["per_layer_gbitops"]["0"] > 0
        assert ctl.cost.layer_macs[0].item() == 2 * 5 * 8 * 6  # two training forwards
        assert type(model[0]) is Affine and "A" not in vars(model[0])
        with pytest.raises(ValueError, match="already registered"):
            register_layer(Affine, weights=["A"], macs=lambda m, i, o: 0)
    finally:
        unregister_layer(Affine)
    assert layer_kind(Affine(2, 2)) is None
    for bad, exc, match in [(dict(weights="A"), TypeError, "list of parameter names"),
                            (dict(weights=[]), ValueError, "at least one parameter"),
                            (dict(weights=["A"], macs=3), TypeError, "macs must be a callable"),
                            (dict(weights=["A"], inputs=-1), ValueError, "inputs must be an integer")]:
        with pytest.raises(exc, match=match):
            register_layer(Affine, **{"macs": lambda m, i, o: 0, **bad})


def test_hugging_face_conv1d_is_built_in() -> None:
    pu = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    model = nn.Sequential(pu.Conv1D(12, 6), nn.GELU(), pu.Conv1D(3, 12))  # GPT-2's layers: (nf, nx)
    x = torch.randn(2, 4, 6)
    with adaprec.Controller(model, policy=Fixed(bits=4), classifier_floor=False) as ctl:
        assert ctl.layer_names == ["0", "2"]
        w = model[0].weight.detach()  # (in, out)
        wq = IntFormat(4, per_channel=True).quantize(w.t()).t()
        got = model[0](x)
        assert torch.allclose(got, IntFormat(4).quantize(x) @ wq + model[0].bias, atol=1e-6)
        model(x).sum().backward()
        ctl.step()
    assert ctl.cost.layer_macs.tolist() == [2 * (2 * 4 * 12 * 6), 2 * 4 * 3 * 12]  # layer 0 ran twice


def test_filter_fn_takes_torchaos_argument_order() -> None:
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(8, 3))
    seen = []

    def filter_fn(module: nn.Module, fqn: str) -> bool:
        seen.append((type(module).__name__, fqn))
        return isinstance(module, nn.Linear)

    ctl = adaprec.Controller(model, filter_fn=filter_fn)
    assert ctl.layer_names == ["2"] and seen == [("Conv1d", "0"), ("Linear", "2")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adaprec.Controller(model, layers=lambda n, m: m)  # a filter written for the other order
    assert [str(w.message).split(",")[0] for w in caught] == [
        "the layers= filter returned Conv1d", "the layers= filter returned Linear"]


def test_mha_out_proj_is_restored_and_copied_plain() -> None:
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 3, 8)
    with adaprec.Controller(nn.Sequential(mha), policy=Fixed(bits=4), classifier_floor=False):
        assert type(mha.out_proj).__name__ == "NonDynamicallyQuantizableLinear"
        twin = copy.deepcopy(mha)
        assert type(twin.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
        assert "_adaprec_weights" not in vars(twin.out_proj)
        inside = mha(x, x, x)[0]
    assert type(mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert not torch.equal(inside, mha(x, x, x)[0]) and torch.equal(twin(x, x, x)[0], mha(x, x, x)[0])


def test_precision_of_a_registered_layer_appears_in_decisions() -> None:
    register_layer(Affine, weights=["A"], macs=lambda m, i, o: o.numel() * m.A.shape[0])
    try:
        model = nn.Sequential(Affine(4, 4))
        with adaprec.Controller(model, policy=Fixed(bits=5), classifier_floor=False) as ctl:
            assert ctl.current == {"0": Precision.cpt(5, 5)}
    finally:
        unregister_layer(Affine)
