"""Bad input (DESIGN.md contract 5): a clear message, and the model *and* the optimizer left as they were.

Where each case of the contract is pinned (``here`` = this file):

* unknown policy name, listing the known ones: test_contracts.py (``BAD_INPUTS``), and here with an optimizer;
* impossible bit-widths: test_contracts.py (a recipe asking 0 bits), test_formats.py,
  test_registry.py::test_bad_recipes (``bits = 99``);
* CPT without total_steps: test_cpt.py::test_missing_total_steps_and_too_many_cycles, and here;
* model with no quantizable layers: test_contracts.py::test_no_quantizable_layers;
* already-compiled model: test_contracts.py::test_already_compiled_model_is_refused;
* second controller on the same model: test_contracts.py::test_second_controller_on_the_same_model;
* NaN/Inf in low precision: test_guard.py (skip, raise, log; ``DivergenceError`` if it persists);
* non-Module model: here (and a lambda in test_contracts.py::test_no_quantizable_layers);
* empty loader: here;
* optimizer whose parameters are not the model's: test_contracts.py (none of them), here (some of
  them), test_storage_mode.py::test_bad_inputs (storage mode refuses foreign parameters);
* total_steps smaller than the steps run: test_cpt.py::test_past_total_steps_keeps_cycling_and_warns_once
  (the schedule), here in a real optimizer loop;
* recipe with unknown keys: test_registry.py::test_bad_recipes; with wrong types: here;
* NaN in the input batch: here.

Decision for ``total_steps`` smaller than the steps actually run: CPT warns once and keeps cycling with
the same period (a run planned a little short still trains sensibly); other policies ignore it.
"""

from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaprec
from adaprec.guard import DivergenceError
from adaprec.policies import CPT, Fixed
from adaprec.policies.cpt import cpt_bits


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(18, 3))


def _batch(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 1, 5, 5), torch.randint(0, 3, (n,))


def _sgd(model: nn.Module, extra: list[torch.Tensor] = ()) -> torch.optim.Optimizer:
    opt = torch.optim.SGD([*model.parameters(), *extra], lr=0.1, momentum=0.9)
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    opt.step()  # momentum buffers exist: "unchanged" has something to compare
    opt.zero_grad()
    return opt


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Values and everything a controller could leave behind on the model or the optimizer."""
    return {
        "model": copy.deepcopy(model.state_dict()),
        "opt": copy.deepcopy(opt.state_dict()),
        "module_attrs": {n: sorted(vars(m)) for n, m in model.named_modules()},
        "module_hooks": {n: {k: len(v) for k, v in vars(m).items() if "hook" in k and hasattr(v, "__len__")}
                         for n, m in model.named_modules()},
        "opt_attrs": sorted(vars(opt)),
        "opt_hooks": (len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)),
    }


def _assert_unchanged(before: dict, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    after = _snapshot(model, opt)
    for key in ("module_attrs", "module_hooks", "opt_attrs", "opt_hooks"):
        assert after[key] == before[key], key
    assert after["model"].keys() == before["model"].keys()
    assert all(torch.equal(after["model"][k], v) for k, v in before["model"].items())
    a, b = after["opt"], before["opt"]
    assert a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys()
    for i, st in b["state"].items():
        assert all(torch.equal(a["state"][i][k], v) for k, v in st.items())


@pytest.mark.parametrize(
    ("model", "match"),
    [
        ({"0.weight": torch.zeros(2)}, "model must be a torch.nn.Module, got dict"),  # a state_dict
        (nn.Linear, "model must be a torch.nn.Module, got type"),  # the class, not an instance
        (None, "model must be a torch.nn.Module, got NoneType"),
    ],
    ids=["state_dict", "class", "none"],
)
def test_non_module_model(model: object, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        adaprec.Controller(model, policy="fixed")


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(policy=CPT()), ValueError, r"policy 'cpt' needs total_steps="),
        (dict(policy=CPT(cycles=32), total_steps=10), ValueError,
         r"cycles \(32\) must not exceed total_steps"),
        (dict(policy="cptt"), ValueError, r"unknown policy 'cptt'; known policies: \[.*'cpt'"),
        (dict(policy="fixed", guard=3), TypeError, "guard must be True, False or a DivergenceGuard"),
    ],
    ids=["cpt-without-total-steps", "cpt-more-cycles-than-steps", "unknown-policy", "guard-type"],
)
def test_constructor_errors_leave_model_and_optimizer_alone(kwargs: dict, exc: type, match: str) -> None:
    model = _model()
    opt = _sgd(model)
    before = _snapshot(model, opt)
    with pytest.raises(exc, match=match):
        with adaprec.Controller(model, optimizer=opt, **kwargs):
            pass
    _assert_unchanged(before, model, opt)


def test_empty_loader() -> None:
    model = _model()
    opt = _sgd(model)
    before = _snapshot(model, opt)
    completed = []
    with pytest.raises(ValueError, match=r"the loader yielded no batches in epoch 0; check the dataset and "
                                         r"batch size"):
        with adaprec.Controller(model, policy="fixed", optimizer=opt) as ctl:
            ctl.on(adaprec.Event.EPOCH_COMPLETED, lambda c, **d: completed.append(d))
            loader = torch.utils.data.DataLoader(list(zip(*_batch(3))), batch_size=4, drop_last=True)
            for _ in ctl.epoch(loader):
                raise AssertionError("no batch expected")
    assert ctl.epoch_index == 0 and ctl.step_count == 0 and not completed
    _assert_unchanged(before, model, opt)


def test_optimizer_with_parameters_outside_the_model() -> None:
    model = _model()
    # None of them: refused before anything is touched.
    opt = _sgd(_model())  # another instance of the same architecture: a classic slip
    before = _snapshot(model, opt)
    with pytest.raises(ValueError, match="none of the optimizer's parameters belong to the model"):
        adaprec.Controller(model, policy="fixed", optimizer=opt)
    _assert_unchanged(before, model, opt)
    # Some of them (a learnable temperature outside the model): accepted, and the loop trains both.
    temperature = nn.Parameter(torch.ones(()))
    opt = _sgd(model, extra=[temperature])
    with adaprec.Controller(model, policy="fixed", optimizer=opt) as ctl:
        x, y = _batch()
        F.cross_entropy(model(x) / temperature, y).backward()
        opt.step()
    assert ctl.step_count == 1 and temperature.item() != 1.0


def test_total_steps_smaller_than_the_steps_run_warns_once_and_keeps_cycling() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with adaprec.Controller(model, policy=CPT(bits=(3, 8), cycles=2), optimizer=opt, total_steps=8,
                                classifier_floor=False) as ctl:
            bits = []
            for _ in range(13):
                bits.append(ctl.current["0"].weight.bits)
                x, y = _batch()
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
    past = [str(w.message) for w in caught if "past total_steps" in str(w.message)]
    assert past == ["CPT: iteration 8 is past total_steps=8; the precision keeps cycling with the same "
                    "period (raise total_steps if the run is meant to be longer)"]
    assert bits == [cpt_bits(t % 8, 8, 2, 3, 8) for t in range(13)] and bits[8:12] == bits[:4]
    assert ctl.step_count == 13 and ctl.report()["steps"] == 13
    with warnings.catch_warnings():  # policies without a schedule ignore total_steps
        warnings.simplefilter("error")
        with adaprec.Controller(_model(), policy=Fixed(bits=4), total_steps=1) as ctl:
            ctl.step()
            ctl.step()


@pytest.mark.parametrize(
    ("text", "exc", "match"),
    [
        ('policy = "cpt"\n[params]\ncycles = "many"\n', ValueError, "cycles must be an int >= 1, got 'many'"),
        ('policy = "cpt"\n[params]\nbits = [3]\n', ValueError, r"bits must be an int or a \(B_min, B_max"),
        ('policy = "cpt"\n[params]\nbits = [3.5, 8]\n', ValueError, r"bits\[0\] \(B_min\) must be an int"),
        ('policy = "cpt"\n[params]\nprofile = "sine"\n', ValueError, "unknown profile 'sine'; allowed: cos"),
        ('policy = "fixed"\n[params]\nbits = true\n', ValueError, "cannot read True as a weight format"),
        ('policy = "fixed"\n[params.bits]\nw = 4\n', ValueError, r"cannot read \{'w': 4\} as a weight"),
        ('policy = "muppet"\n[params]\nlevels = 8\n', TypeError, "levels must be a sequence of levels"),
        ('policy = "muppet"\n[params]\npatience = "2"\n', ValueError, "patience must be an integer >= 1"),
        ('policy = 3\n', ValueError, "needs a string 'policy' key"),
        ('policy = "fixed"\ndescription = 3\n', ValueError, "'description' must be a string, got 3"),
        ('policy = "cpt"\n[params]\nbitz = [3, 8]\n', ValueError,
         r"bad parameters for policy 'cpt'.*allowed: \['bits', 'grad_bits'"),
    ],
    ids=["cycles-str", "bits-one", "bits-float", "profile", "bits-bool", "bits-table", "levels-int",
         "patience-str", "policy-int", "description-int", "unknown-param"],
)
def test_recipe_with_wrong_types(tmp_path: Path, text: str, exc: type, match: str) -> None:
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(text)
    model = _model()
    opt = _sgd(model)
    before = _snapshot(model, opt)
    with pytest.raises(exc, match=match):
        adaprec.Controller(model, policy=str(recipe), optimizer=opt, total_steps=100)
    _assert_unchanged(before, model, opt)


def test_nan_in_the_input_batch(caplog: pytest.LogCaptureFixture) -> None:
    model = _model()
    opt = _sgd(model)
    before = _snapshot(model, opt)
    x, y = _batch()
    x[1, 0, 2, 2] = float("nan")
    with adaprec.Controller(model, policy=Fixed(bits=4, grad_bits=8), optimizer=opt) as ctl:
        with caplog.at_level(logging.WARNING, logger="adaprec"):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        inside = _snapshot(model, opt)
        assert "non-finite gradients at step 0; skipped the update" in caplog.text
        assert ctl.guard.skipped == 1 and ctl.step_count == 1
    for k, v in before["model"].items():  # the bad batch changed nothing
        assert torch.equal(inside["model"][k], v)
    _assert_unchanged(before, model, opt)
    # A loader that keeps producing NaN stops the run with a message that points at the data.
    ctl = adaprec.Controller(model, policy=Fixed(bits=4, grad_bits=8), optimizer=opt)
    with pytest.raises(DivergenceError, match="check the data"), ctl:
        for _ in range(10):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert ctl.guard.skipped == ctl.guard.max_failures
    _assert_unchanged(before, model, opt)
