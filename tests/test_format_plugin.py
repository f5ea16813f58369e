"""A number format defined *outside* adaprec works everywhere a built-in one does.

The format here — a signed power-of-two ("logarithmic") grid with ``2^(b-1) - 1`` magnitudes below the
tensor's largest power of two — exists only in this file. Registered with
:func:`adaprec.formats.register_format`, it is used by CPT, MuPPET and Fixed, the constraints, the
divergence guard, the cost meter, weight storage and an Optuna study, with no change to adaprec: that
is the proof that no module outside the format package checks a format's kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import optuna
import pytest
import torch
import torch.nn.functional as F

import adaprec
from adaprec import tune
from adaprec.constraints import Clamp, Floor, Pin
from adaprec.formats import Format, Precision, parse_format, register_format
from adaprec.guard import raise_one_level
from adaprec.optim import KahanSGD
from adaprec.policies import CPT, Fixed, MuPPET


@register_format
@dataclass(frozen=True)
class Log2Format(Format):
    """``sign(x) * 2^e`` with ``e`` in the ``2^(bits-1) - 1`` exponents up to round(log2 max|x|); smaller
    magnitudes become 0."""

    bits: int
    kind: ClassVar[str] = "log2"

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"Log2Format: bits must be in 2..8, got {self.bits}")

    def short(self) -> str:
        return f"log{self.bits}"

    @classmethod
    def from_spec(cls, spec: Any, role: str) -> Format | None:
        if isinstance(spec, str) and spec.startswith("log") and spec[3:].isdigit():
            return cls(int(spec[3:]))
        return None

    def params(self) -> tuple[float, ...]:
        return (float(2 ** (self.bits - 1) - 1),)  # the number of magnitudes, a tensor: no recompiles

    def kernel_spec(self) -> tuple:
        return ()

    @staticmethod
    def kernel(x, p, spec, lo, hi, axis, rng):  # noqa: D102
        a = x.detach().abs()
        top = torch.round(torch.log2(a.amax().clamp_min(1e-30)))
        e = torch.round(torch.log2(a.clamp_min(1e-38)))
        q = torch.sign(x.detach()) * torch.exp2(e.clamp_max(top))
        return torch.where(e < top - p[0] + 1, torch.zeros_like(q), q)

    def up(self, bits: int = 1) -> Format:
        return super().up() if self.bits >= 8 else Log2Format(min(8, self.bits + bits))

    def down(self, bits: int = 1) -> Format:
        return Log2Format(max(2, self.bits - bits))

    def at_least(self, bits: int) -> Format:
        return self if self.bits >= bits else (super().up() if bits > 8 else Log2Format(bits))

    def clamp(self, min_bits: int, max_bits: int) -> Format:
        return Log2Format(max(2, min(8, max(min(self.bits, max_bits), min_bits))))

    def exact_in(self) -> dict[str, int]:
        return {"bf16": 1, "fp32": 1}  # powers of two are exact in bf16


def _is_log_grid(t: torch.Tensor) -> bool:
    a = t.detach().abs()
    nz = a[a > 0]
    return bool((torch.log2(nz) == torch.log2(nz).round()).all())


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def _run(policy, steps=8, opt_cls=torch.optim.SGD, **ctl_kw):
    model = _model()
    opt = opt_cls(model.parameters(), lr=0.05)
    data = [(torch.randn(8, 16), torch.randint(0, 10, (8,))) for _ in range(4)]
    with adaprec.Controller(model, policy=policy, optimizer=opt, total_steps=steps, **ctl_kw) as ctl:
        for i in range(steps):
            x, y = data[i % 4]
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ctl.observe(loss=loss.detach())
    return ctl, model


def test_parsing_and_quantizing():
    f = parse_format("log4")
    assert f == Log2Format(4) and Precision("log3", "log3", 8).short() == "log3/int8"
    q = f.quantize(torch.tensor([8.0, 3.0, -0.9, 0.3, 0.01]))
    assert q.tolist() == [8.0, 4.0, -1.0, 0.25, 0.0]  # 7 magnitudes: 2^3 .. 2^-3; 0.01 is below


def test_cpt_cycles_over_the_plugin_ladder():
    ctl, _ = _run(CPT(bits=("log3", "log6"), grad_bits=8, cycles=1), steps=8, classifier_floor=False)
    assert [h.layers["0"].weight.short() for h in ctl.history] == ["log3", "log4", "log5", "log6"]
    assert ctl.report()["cpt_bounds"] == "log3-log6"


def test_muppet_and_fixed_use_it():
    mu = MuPPET(levels=("log3", "log6", "fp32"))
    ctl, _ = _run(mu, steps=4, classifier_floor=False)
    assert ctl.current["0"].short() == "log3/log3" and mu.levels_short() == ["log3", "log6", "fp32"]
    ctl, model = _run(Fixed(bits="log4", grad_bits=8), steps=3)
    assert ctl.current["0"].short() == "log4/int8"
    assert ctl.current["2"].weight.short() == "log7"  # the classifier floor (C = 10 -> 7 bits): at_least


def test_constraints_and_guard_ask_the_format():
    layers = {"a": Precision("log3", "log3", "log3"), "b": Precision("log4", "log4", 8)}
    assert Floor("b", 6)(layers, None)["b"].short() == "log6/int8"
    assert Clamp(4, 5)(layers, None)["a"].short() == "log4/log4"
    assert Pin("a", Precision.fp32())(layers, None)["a"].is_fp32
    assert raise_one_level(layers["a"], bits_step=2).short() == "log5/log5"
    assert raise_one_level(Precision("log8", "log8", "log8")).is_fp32


def test_guard_raises_the_plugin_format_on_divergence():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with adaprec.Controller(model, policy=Fixed(bits="log4", grad_bits=8), optimizer=opt,
                            classifier_floor=False) as ctl:
        F.cross_entropy(model(torch.randn(4, 16)), torch.randint(0, 10, (4,))).backward()
        model[0].weight.grad[0, 0] = float("nan")
        before = model[0].weight.detach().clone()
        opt.step()  # skipped: the weights stay, the layer moves one level up its own ladder
        assert torch.equal(model[0].weight, before)
        assert ctl.current["0"].weight.short() == "log6"


def test_cost_meter_bills_the_plugin_bits():
    ctl, _ = _run(Fixed(bits="log4", grad_bits=8), steps=2, classifier_floor=False)
    r = ctl.report()
    m0, m1 = 2 * 8 * 16 * 32, 2 * 8 * 32 * 10  # two steps of batch 8
    assert r["gmacs"] * 1e9 == pytest.approx(m0 + m1)
    per = r["per_layer_gbitops"]
    # The first layer reads the data (no input gradient): its forward 4 x 4 and weight gradient 8 x 4.
    assert per["0"] * 1e9 == pytest.approx(m0 * (4 * 4 + 8 * 4))
    assert per["2"] * 1e9 == pytest.approx(m1 * (4 * 4 + 2 * 8 * 4))
    assert r["savings_vs_fp32"] == pytest.approx(1 - (m0 * 48 + m1 * 80) / (1024 * (2 * m0 + 3 * m1)))


def test_weight_storage_keeps_weights_on_the_plugin_grid():
    model = _model()
    opt = KahanSGD(model.parameters(), lr=0.05, weight_format="fp32")
    data = [(torch.randn(8, 16), torch.randint(0, 10, (8,))) for _ in range(3)]
    policy = Fixed(bits="log5", act_bits="fp32", grad_bits="fp32")
    with adaprec.Controller(model, policy=policy, optimizer=opt, weight_storage=True,
                            classifier_floor=False) as ctl:
        for x, y in data:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert ctl.weight_storage.formats == {"0": "log5", "2": "log5"}
        assert _is_log_grid(model[0].weight) and _is_log_grid(model[2].weight)
    assert ctl.report()["weight_storage"].startswith("log5")


class LogFixed(Fixed):
    """Fixed, tuned over plugin widths and a built-in one."""

    name = "log_fixed"

    @classmethod
    def search_space(cls, trial: Any) -> dict[str, Any]:
        return {"bits": trial.suggest_categorical("bits", ["log3", "log5", "int4"]), "grad_bits": 8}


def test_optuna_study_over_the_plugin_format():
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def train_fn(policy, report):
        ctl, model = _run(policy, steps=3)
        with torch.no_grad():
            val = float(F.cross_entropy(model(torch.randn(8, 16)), torch.randint(0, 10, (8,))))
        return {"val_loss": val,
                "gbitops": ctl.report()["gbitops"]}

    metrics = ("val_loss", "gbitops")
    study = tune.create_study("plugin", optuna.storages.InMemoryStorage(), policy=LogFixed, metrics=metrics)
    for b in ("log3", "log5", "int4"):  # the sampler's own choices may repeat; enqueue each once
        study.enqueue_trial({"bits": b})
    tune.optimize(study, tune.objective(train_fn, LogFixed, metrics), n_trials=3, progress=False)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert {t.params["bits"] for t in done} == {"log3", "log5", "int4"}
    log3 = next(t for t in done if t.params["bits"] == "log3")
    int4 = next(t for t in done if t.params["bits"] == "int4")
    assert log3.values[1] < int4.values[1]  # 3-bit products cost fewer BitOPs than 4-bit ones
    policy = tune.policy_from(study, trial=log3, policy=LogFixed)
    assert policy.decide(None).default.weight == Log2Format(3)


def test_no_module_outside_the_format_package_checks_a_formats_kind():
    """The static half of the proof: no ``isinstance`` against a format kind and no use of a kind's
    private tables anywhere in adaprec outside ``adaprec/formats/`` (constructing a format is fine)."""
    import ast
    from pathlib import Path

    import adaprec.formats as formats_pkg

    kinds = {"IntFormat", "FixedPoint", "FloatFormat", "BlockFormat", "FP32", "Log2Format"}
    tables = {"FLOAT_FORMATS", "ELEMENT_FORMATS", "BLOCK_FORMATS"}
    root = Path(adaprec.__file__).parent
    fmt_dir = Path(formats_pkg.__file__).parent
    found = []
    for path in root.rglob("*.py"):
        if fmt_dir in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
                classes = node.args[1].elts if isinstance(node.args[1], ast.Tuple) else [node.args[1]]
                names = {getattr(c, "id", getattr(c, "attr", None)) for c in classes}
                if names & kinds:
                    found.append(f"{path.relative_to(root)}:{node.lineno} isinstance {sorted(names & kinds)}")
            name = getattr(node, "id", getattr(node, "attr", None))
            if isinstance(node, ast.Name | ast.Attribute) and name in tables:
                found.append(f"{path.relative_to(root)}:{node.lineno} uses a format table")
    assert not found, found
