"""Weight storage mode: the controller's weight formats applied to the optimizer's stored weights."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaprec
from adaprec.compact import StoredTensor
from adaprec.decision import Decision
from adaprec.formats import FP32, FixedPoint, FloatFormat, IntFormat, Precision
from adaprec.optim import Compensated, KahanSGD
from adaprec.policies import Fixed, Policy
from adaprec.storage_mode import StorageMode, layer_weights, storage_spec


class Switchable(Policy):
    """Weights in ``self.fmt`` (activations and errors FP32); change ``fmt`` and call ``ctl.refresh()``."""

    name = "switchable"

    def __init__(self, fmt: str = "fx8") -> None:
        self.fmt = fmt

    def decide(self, ctl) -> Decision:
        return Decision.uniform(Precision(self.fmt, "fp32", "fp32"))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 4))


def _data(n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 12, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def _train(ctl, model, opt, data) -> None:
    for x, y in ctl.epoch(data):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _on_grid(w: torch.Tensor, fl: torch.Tensor, bits: int) -> bool:
    q = w * 2.0 ** float(fl)
    return bool((q == q.round()).all() and q.abs().max() <= 2 ** (bits - 1))


def test_storage_spec_mapping() -> None:
    fixed = (FixedPoint(8), FixedPoint(25), FixedPoint(32))
    assert [storage_spec(f) for f in fixed] == ["fx8", "fx25", "fp32"]
    assert storage_spec(FloatFormat("bf16")) == "bf16" and storage_spec(FP32()) == "fp32"
    assert storage_spec(IntFormat(6)) == "fx6" and storage_spec(IntFormat(1)) == "fx2"
    with pytest.raises(ValueError, match="cannot hold stored weights"):
        storage_spec(IntFormat(6), int_formats="error")
    with pytest.raises(ValueError, match="int_formats must be one of"):
        StorageMode(int_formats="round")
    shapes = [tuple(w.shape) for w in layer_weights(nn.MultiheadAttention(8, 2))]
    assert shapes == [(24, 8), (8, 8)]


def test_stored_weights_follow_the_decision_per_layer() -> None:
    model, data = _model(), _data()
    opt = KahanSGD(model.parameters(), lr=0.1, momentum=0.9, weight_format="fp32")
    with adaprec.Controller(model, policy=Switchable("fx4"), optimizer=opt, weight_storage=True) as ctl:
        _train(ctl, model, opt, data)
        # The classifier floor (C=4 -> 5 bits) holds for storage too; biases stay in the optimizer's fp32.
        assert ctl.weight_storage.formats == {"0": "fx4", "2": "fx5"}
        for name, bits in (("0", 4), ("2", 5)):
            w = model.get_submodule(name).weight
            assert opt.param_format(w) == (f"fx{bits}", None)
            assert _on_grid(w.detach(), opt.state[w]["w_fl"], bits)
            assert opt.param_format(model.get_submodule(name).bias) is None
        assert model[0].bias.detach().unique().numel() > 8  # not rounded to a 4-bit grid
        # Held in int8 codes (the biases, stored in fp32, stay plain float32 tensors).
        assert isinstance(model[0].weight, StoredTensor) and model[0].weight.parts[0].dtype == torch.int8
        assert not isinstance(model[0].bias, StoredTensor)
        r = ctl.report()
    assert type(model[0].weight) is nn.Parameter  # float32 parameters again after the block
    assert r["weight_storage"] == "fx4, fx5; others fp32"
    n = sum(p.numel() for p in model.parameters())
    # Measured: 1-byte codes for the weights, 4 bytes for the fp32 biases, a 4-byte scale per weight.
    exp_w = (12 * 16 + 16 * 4 + (16 + 4) * 4 + 2 * 4) / n
    assert r["memory_per_param"] == {"weight": round(exp_w, 3), "compensation": round(exp_w, 3),
                                     "optimizer_state": 4.0}
    assert ctl.report()["memory_per_param"] == r["memory_per_param"]  # after the block: as at its end


def test_precision_change_resplits_and_preserves_w_plus_c() -> None:
    model, data = _model(), _data()
    pol = Switchable("fx8")
    opt = KahanSGD(model.parameters(), lr=0.05, weight_format="fp32")
    with adaprec.Controller(model, policy=pol, optimizer=opt, weight_storage=True,
                            classifier_floor=False) as ctl:
        _train(ctl, model, opt, data)
        ws = [model[0].weight, model[2].weight]
        total = [(w.detach() + opt.state[w]["comp"]).clone() for w in ws]
        assert all(opt.state[w]["comp"].abs().max() > 0 for w in ws)
        for fmt, bits in (("fx12", 12), ("fx6", 6)):
            before = ctl.weight_storage.resplits
            pol.fmt = fmt
            ctl.refresh()
            assert ctl.weight_storage.resplits == before + 2
            for w, t in zip(ws, total):
                fl = opt.state[w]["w_fl"]
                assert _on_grid(w.detach(), fl, bits)
                ulp_c = opt.storage_for(w).comp_ulp(fl)
                assert (w.detach() + opt.state[w]["comp"] - t).abs().max() <= ulp_c / 2 + 1e-12, fmt
                t.copy_(w.detach() + opt.state[w]["comp"])
        pol.fmt = "bf16"
        ctl.refresh()
        w = model[0].weight
        assert torch.equal(w.detach().to(torch.bfloat16).float(), w.detach()) and "w_fl" not in opt.state[w]
        assert (w.detach() + opt.state[w]["comp"] - total[0]).abs().max() < 1e-5
        _train(ctl, model, opt, data)  # and training goes on in the new format
        assert torch.equal(w.detach().to(torch.bfloat16).float(), w.detach())


def test_compensation_format_from_the_optimizer_or_the_mode() -> None:
    model, data = _model(), _data(2)
    pol = Switchable("fx16")
    opt = KahanSGD(model.parameters(), lr=0.05, weight_format="fx16", comp_format="fx8")
    with adaprec.Controller(model, policy=pol, optimizer=opt, weight_storage=True) as ctl:
        _train(ctl, model, opt, data)
        w = model[0].weight
        assert opt.param_format(w) == ("fx16", "fx8")
        n = sum(p.numel() for p in model.parameters())  # int8 codes, and a 4-byte FL_c per tensor
        assert ctl.report()["memory_per_param"]["compensation"] == round((n + 4 * 4) / n, 3)
        pol.fmt = "bf16"  # a fixed-point compensation cannot follow a float weight: as wide as the weight
        ctl.refresh()
        assert opt.param_format(w) == ("bf16", None)
    model = _model()
    opt = KahanSGD(model.parameters(), lr=0.05, weight_format="fp32")
    with adaprec.Controller(model, policy=Switchable("fx12"), optimizer=opt,
                            weight_storage=StorageMode(comp_format="fx4")):
        assert opt.param_format(model[2].weight) == ("fx12", "fx4")


def test_unchanged_format_does_not_resplit_and_attach_inside_block() -> None:
    model, data = _model(), _data(3)
    opt = Compensated(torch.optim.Adam(model.parameters(), lr=1e-2), weight_format="fp32")
    mode = StorageMode()
    with adaprec.Controller(model, policy=Switchable("fx8"), optimizer=opt) as ctl:
        assert ctl.weight_storage is None
        mode.attach(ctl)  # attached late: catches up with the formats in force
        assert mode.formats == {"0": "fx8", "2": "fx8"}
        _train(ctl, model, opt, data)
        ctl.refresh(force=True)  # re-fires PRECISION_CHANGED with the same formats
        assert mode.resplits == 2
        assert _on_grid(model[0].weight.detach(), opt.state[model[0].weight]["w_fl"], 8)
    with pytest.raises(RuntimeError, match="already attached"):
        mode.attach(ctl)


def test_optimizer_state_dict_keeps_per_param_formats() -> None:
    model, data = _model(), _data(4)
    opt = KahanSGD(model.parameters(), lr=0.05, momentum=0.9, weight_format="bf16", update="kahan")
    with adaprec.Controller(model, policy=Switchable("fx6"), optimizer=opt, weight_storage=True) as ctl:
        _train(ctl, model, opt, data[:2])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    _train_plain(model, opt, data[2:])
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    twin = _model()
    twin.load_state_dict(saved["model"])
    opt2 = KahanSGD(twin.parameters(), lr=0.05, momentum=0.9, weight_format="bf16")
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_format(twin[0].weight) == ("fx6", None) and opt2.param_format(twin[0].bias) is None
    _train_plain(twin, opt2, data[2:])
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def _train_plain(model, opt, data) -> None:
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def test_memory_report_is_measured_for_every_optimizer() -> None:
    model = _model()
    n = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with adaprec.Controller(model, policy="fixed", optimizer=opt) as ctl:
        assert ctl.report()["bytes_per_param"] == 4.0  # no momentum buffer before the first step
        _train(ctl, model, opt, _data(1))
        r = ctl.report()
    assert (r["bytes_per_param"], r["weight_storage"], r["memory_vs_fp32"]) == (8.0, "fp32 master", 1.0)
    assert r["gradient_bytes_per_param"] == 4.0
    opt = torch.optim.Adamax(model.parameters())  # any optimizer: its state tensors are measured
    with adaprec.Controller(model, policy="fixed", optimizer=opt) as ctl:
        _train(ctl, model, opt, _data(1))
        parts = ctl.report()["memory_per_param"]
        assert parts == {"weight": 4.0, "compensation": 0.0, "optimizer_state": round(8 + 4 * 4 / n, 3)}
    opt = KahanSGD(model.parameters(), lr=0.1, momentum=0.9, weight_format="fx16", state_format="bf16")
    with adaprec.Controller(model, policy="fixed", optimizer=opt) as ctl:  # no storage mode: group format
        _train(ctl, model, opt, _data(1))
        r = ctl.report()
    # Float32 parameters holding fx16 values; an int16 compensation and a bf16 momentum.
    assert r["weight_storage"] == "fx16"
    assert r["memory_per_param"] == {"weight": 4.0, "compensation": round((2 * n + 4 * 4) / n, 3),
                                     "optimizer_state": round((2 * n + 4 * 4) / n, 3)}


def test_bad_inputs() -> None:
    model = _model()
    pol = Switchable("fx8")
    with pytest.raises(TypeError, match=r"KahanSGD or adaprec\.optim\.Compensated"):
        adaprec.Controller(model, policy=pol, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                           weight_storage=True)
    with pytest.raises(ValueError, match="needs the optimizer"):
        adaprec.Controller(model, policy=pol, weight_storage=True)
    stray = nn.Parameter(torch.zeros(3))
    opt = KahanSGD([*model.parameters(), stray], lr=0.1, weight_format="fp32")
    with pytest.raises(ValueError, match="1 of the optimizer's 5 parameters .* not parameters of the model"):
        adaprec.Controller(model, policy=pol, optimizer=opt, weight_storage=True)
    with pytest.raises(ValueError, match="wider than the FP32 master"):
        StorageMode(comp_format="fx32")
    with pytest.raises(TypeError, match=r"Compensated supports torch\.optim\.SGD"):
        Compensated(torch.optim.Adamax(model.parameters()))
    opt = KahanSGD(model.parameters(), lr=0.1, weight_format="fp32", update="nearest")
    with pytest.raises(ValueError, match="needs update='kahan'"):
        adaprec.Controller(model, policy=pol, optimizer=opt, weight_storage=StorageMode(comp_format="fx16"))
    opt = KahanSGD(model.parameters(), lr=0.1, weight_format="fp32")
    with pytest.raises(ValueError, match="cannot hold stored weights"):
        with adaprec.Controller(model, policy=Fixed(bits=4), optimizer=opt,
                                weight_storage=StorageMode(int_formats="error")):
            pass
    with pytest.raises(ValueError, match="needs a fixed-point weight format"):  # fx comp, bf16 weight
        with adaprec.Controller(model, policy=Switchable("bf16"), optimizer=opt,
                                weight_storage=StorageMode(comp_format="fx12")):
            pass
    with pytest.raises(TypeError, match="weight_storage must be True, False or"):
        adaprec.Controller(model, policy=pol, optimizer=opt, weight_storage="policy")
    with pytest.raises(ValueError, match="not parameters of this optimizer"):
        opt.set_param_format([stray], "fx8")


# ---------------------------------------------------------------------------------------------- compact
class _TextNet(nn.Module):
    """Embedding, LSTM, LayerNorm, Linear: every kind of parameter a stored model holds."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.lstm = nn.LSTM(16, 24, batch_first=True)
        self.ln = nn.LayerNorm(24)
        self.fc = nn.Linear(24, 20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.emb(x))
        return self.fc(self.ln(h))


def _text_run(fmt: str, compact: bool, make, steps: int = 4, fail_at: int | None = None):
    torch.manual_seed(0)
    model = _TextNet()
    opt = make(model.parameters())
    wf = FixedPoint(int(fmt[2:]), rounding="nearest") if fmt.startswith("fx") else fmt
    policy = Fixed(bits=wf, act_bits="fp32", grad_bits="fp32")
    g = torch.Generator().manual_seed(1)
    data = [(torch.randint(0, 20, (4, 7), generator=g), torch.randint(0, 20, (4, 7), generator=g))
            for _ in range(steps)]
    kinds = set()
    with adaprec.Controller(model, policy=policy, optimizer=opt, classifier_floor=False,
                            weight_storage=StorageMode(compact=compact)) as ctl:
        for i, (x, y) in enumerate(data):
            if i == fail_at:
                raise KeyboardInterrupt("stopped by the user")
            opt.zero_grad()
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
            opt.step()
        kinds = {type(p).__name__ for p in model.parameters()}
        report = ctl.report()
    return model, kinds, report


OPTIMIZERS = {
    "kahan_sgd": lambda ps: KahanSGD(ps, lr=0.05, momentum=0.9, weight_format="bf16"),
    "adam_8bit": lambda ps: Compensated(torch.optim.Adam(ps, lr=3e-3), weight_format="bf16",
                                        state_format="8bit"),
    "sgd_sr_bf16_state": lambda ps: KahanSGD(ps, lr=0.05, momentum=0.9, weight_format="bf16",
                                             update="stochastic", state_format="bf16_stochastic"),
}


@pytest.mark.parametrize("fmt", ["bf16", "fx8", "mxfp8"])
@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_held_compactly_trains_bit_for_bit_like_the_simulation(fmt: str, opt_name: str) -> None:
    held, kinds_h, rep_h = _text_run(fmt, True, OPTIMIZERS[opt_name])
    sim, kinds_s, rep_s = _text_run(fmt, False, OPTIMIZERS[opt_name])
    assert kinds_h == {"StoredTensor"} and kinds_s == {"Parameter"}
    assert all(torch.equal(a, b) for a, b in zip(held.parameters(), sim.parameters()))
    assert all(type(p) is nn.Parameter for p in held.parameters())  # float32 again after the block
    # The same numbers, fewer bytes: 2-byte bf16 (or 1-byte codes) instead of float32 tensors.
    assert rep_h["memory_per_param"]["weight"] < rep_s["memory_per_param"]["weight"] == 4.0
    assert rep_h["memory_per_param"]["compensation"] == rep_s["memory_per_param"]["compensation"]


def test_leaving_by_an_exception_gives_float32_parameters_back() -> None:
    torch.manual_seed(0)
    reference = _TextNet().state_dict()
    with pytest.raises(KeyboardInterrupt):
        _text_run("fx8", True, OPTIMIZERS["adam_8bit"], fail_at=2)
    model, _, _ = _text_run("fx8", True, OPTIMIZERS["adam_8bit"], steps=0)
    assert list(model.state_dict()) == list(reference)
    assert all(type(p) is nn.Parameter and p.dtype == torch.float32 for p in model.parameters())
    assert all(a is b for a, b in zip(model.lstm._flat_weights, model.lstm.parameters()))


def test_bf16_weights_bf16_compensation_and_8bit_adam_take_six_bytes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = Compensated(torch.optim.AdamW(model.parameters(), lr=1e-3), weight_format="bf16",
                      state_format="8bit")
    policy = Fixed(bits="bf16", act_bits="fp32", grad_bits="fp32")
    with adaprec.Controller(model, policy=policy, optimizer=opt, weight_storage=True) as ctl:
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(torch.randn(8, 256)), torch.randint(0, 10, (8,))).backward()
            opt.step()
        inside = ctl.report()
        assert model[0].weight.parts[0].dtype == torch.bfloat16
        assert isinstance(opt.inner.state[model[0].weight]["exp_avg"], StoredTensor)
    r = ctl.report()
    assert r == inside  # after the block: what was held at its end
    m = r["memory_per_param"]
    assert m["weight"] == m["compensation"] == 2.0 and 2.0 < m["optimizer_state"] < 2.01
    assert r["memory_vs_fp32"] < 0.502 and r["gradient_bytes_per_param"] == 4.0


def test_compiled_stored_model_does_not_recompile_when_bits_change() -> None:
    class Cycling(Policy):
        name = "cycling"

        def decide(self, ctl) -> Decision:
            return Decision.uniform(Precision(FixedPoint(5 + ctl.step_count % 3, rounding="nearest"), "fp32",
                                              "fp32"))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = KahanSGD(model.parameters(), lr=0.05, weight_format="bf16")
    xs = [(torch.randn(4, 8), torch.randint(0, 3, (4,))) for _ in range(9)]
    with adaprec.Controller(model, policy=Cycling(), optimizer=opt, weight_storage=True,
                            classifier_floor=False) as ctl:
        compiled = torch.compile(model)

        def step(x, y):
            loss = F.cross_entropy(compiled(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        for x, y in xs[:3]:  # fx5, fx6, fx7: int8 codes each time, the scale in a tensor
            step(x, y)
        assert isinstance(model[0].weight, StoredTensor)
        with torch.compiler.set_stance("fail_on_recompile"):
            for x, y in xs[3:]:
                step(x, y)
    assert len({h.summary() for h in ctl.history}) == 3


def test_under_ddp_storage_warns_and_keeps_float32_tensors(tmp_path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = _model()
        ddp = nn.parallel.DistributedDataParallel(model)  # its reducer refers to the parameters
        opt = KahanSGD(model.parameters(), lr=0.1, weight_format="bf16")
        policy = Fixed(bits="bf16", act_bits="fp32", grad_bits="fp32")
        with pytest.warns(UserWarning, match="cannot hold the parameters .* float32 tensors"):
            with adaprec.Controller(model, policy=policy, optimizer=opt, weight_storage=True) as ctl:
                F.cross_entropy(ddp(torch.randn(4, 12)), torch.tensor([0, 1, 2, 3])).backward()
                opt.step()
                assert type(model[0].weight) is nn.Parameter and ctl.weight_storage.compact is False
        w = model[0].weight.detach()
        assert torch.equal(w.to(torch.bfloat16).float(), w)  # stored in bf16 all the same
    finally:
        dist.destroy_process_group()
