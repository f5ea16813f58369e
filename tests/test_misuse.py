"""Silent misuses a new user hits, each caught with a clear warning or error (issue 18), and the
newcomer-facing details around them: the report's conventions, lazy imports, plots that leave a
notebook's matplotlib backend alone, Optuna metric names, Python 3.10's TOML parser."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import adaprec
from adaprec.cli import main
from adaprec.policies import CPT

REPO = Path(__file__).resolve().parents[1]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer | None, steps: int = 3) -> None:
    for _ in range(steps):
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        loss = F.cross_entropy(model(x), y)
        if opt is not None:
            opt.zero_grad()
        loss.backward()
        if opt is not None:
            opt.step()


# --- 1. training without entering the with block ------------------------------------------------------
def test_report_of_a_controller_never_entered_says_so() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = adaprec.Controller(model, policy="fixed", optimizer=opt)
    _train(model, opt)  # runs in plain FP32: the controller is not active
    with pytest.raises(RuntimeError,
                       match=r"never entered.*with adaprec\.Controller\(model, \.\.\.\) as ctl"):
        ctl.report()
    # Entered, it measures; after leaving, the report stays readable.
    with adaprec.Controller(model, policy="fixed", optimizer=opt) as ctl:
        _train(model, opt)
    assert ctl.report()["steps"] == 3 and ctl.report()["gbitops"] > 0


# --- 2. no optimizer and no ctl.step() -------------------------------------------------------------------
def test_training_forwards_without_iterations_warn_at_exit() -> None:
    model = _model()
    with pytest.warns(UserWarning, match=r"no iteration was counted .*no optimizer= was given and "
                                         r"ctl\.step\(\) was never called.*call ctl\.step\(\)"):
        with adaprec.Controller(model, policy="fixed") as ctl:
            _train(model, None)
    assert ctl.report()["steps"] == 0


def test_optimizer_given_but_never_stepped_warns_too() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"its step\(\) was never called"):
        with adaprec.Controller(model, policy="fixed", optimizer=opt):
            _train(model, None)


def test_no_warning_for_correct_loops_or_evaluation_only() -> None:
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with adaprec.Controller(model, policy="fixed") as ctl:
            _train(model, None, steps=1)
            ctl.step()
        model.eval()
        with adaprec.Controller(model, policy="fixed"), torch.no_grad():
            model(torch.randn(2, 4))  # evaluation only: no training forward, nothing to count
        model.train()
        with adaprec.Controller(model, policy="fixed"):
            pass  # an empty block is not a misuse


# --- 3. CPT cycles too short to reach B_max --------------------------------------------------------------
@pytest.mark.parametrize(("total", "cycles", "peak", "most"),
                         [(140, 32, 7, 28), (45, 32, 3, 9), (100, 32, 7, 20)])
def test_cpt_warns_when_cycles_never_reach_b_max(total: int, cycles: int, peak: int, most: int) -> None:
    with pytest.warns(UserWarning, match=rf"{cycles} cycles over {total} iterations .* reach the forward "
                                         rf"B_max of 8 bits \(it peaks at {peak}\); use cycles <= {most}"):
        with adaprec.Controller(_model(), policy=CPT(cycles=cycles), total_steps=total) as ctl:
            pass
    # The advice is right: that many cycles does reach B_max.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with adaprec.Controller(_model(), policy=CPT(cycles=most), total_steps=total) as ctl:
            for _ in range(total):
                ctl.step()
    assert max(h.layers["0"].weight.bits for h in ctl.history) == 8


def test_cpt_warns_for_cycled_backward_bits_and_stays_quiet_when_reached() -> None:
    with pytest.warns(UserWarning, match="backward B_max of 10 bits"):
        with adaprec.Controller(_model(), policy=CPT(bits=(8, 8), grad_bits=(2, 10), cycles=10),
                                total_steps=40):
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with adaprec.Controller(_model(), policy=CPT(cycles=32), total_steps=450):  # adaprec train's
            pass


def test_cpt_warns_when_a_profile_never_rounds_up_to_b_max() -> None:
    # exp stops 1.8 % of the span short of B_max: with a 30-bit span that rounds down, at any period.
    with pytest.warns(UserWarning, match=r"exp ramp from 2 to 32 forward bits never rounds up to its B_max "
                                         r"of 32 \(it peaks at 31\), whatever the number of cycles"):
        with adaprec.Controller(_model(), policy=CPT(bits=(2, 32), profile="exp"), total_steps=64_000):
            pass


def test_cpt_with_range_test_checks_the_cycles_left_after_the_test() -> None:
    model = _model()
    pol = CPT(bits=("auto", 8), cycles=16, prt_start_bits=4, prt_steps_per_bits=2, prt_window=1,
              prt_threshold=-1.0)  # any change passes: B_min = 4 after 2 test iterations
    with pytest.warns(UserWarning, match=r"16 cycles over 38 iterations last 2 iteration.*peaks at 6"):
        with adaprec.Controller(model, policy=pol, total_steps=40) as ctl:
            for _ in range(3):
                ctl.observe(loss=1.0)
                ctl.step()
    assert pol.bounds == (4, 8)


def test_cli_prints_the_short_cycle_warning_as_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--epochs", "1", "--no-logs", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "adaprec train: warning: CPT: 32 cycles over 45 iterations" in err
    assert "UserWarning" not in err  # not Python's source-location format


# --- the report ------------------------------------------------------------------------------------------
def test_report_holds_observed_metrics_and_fractions_shown_as_percentages() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with adaprec.Controller(model, policy="fixed", optimizer=opt) as ctl:
        _train(model, opt)
        ctl.observe(loss=torch.tensor(0.5), val_acc=0.875)
    r = ctl.report()
    assert r["observed"] == {"loss": 0.5, "val_acc": 0.875}
    assert 0 < r["savings_vs_fp32"] < 1 and abs(sum(r["time_at_precision"].values()) - 1) < 1e-12
    text = str(r)
    pct = 100 * r["savings_vs_fp32"]
    assert re.search(rf"savings_vs_fp32 +{r['savings_vs_fp32']:.6g} \({pct:.1f} %\)", text)
    # Every key the report can hold is documented in one place.
    doc = adaprec.Report.__doc__
    missing = [k for k in r if f"``{k}``" not in doc]
    assert not missing, missing


# --- the command line ------------------------------------------------------------------------------------
def test_cli_names_flags_not_python_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    for task in ("cifar10", "imagefolder"):
        assert main(["train", "--task", task, "--no-logs"]) == 2
        err = capsys.readouterr().err
        assert f"task '{task}' needs --data PATH" in err and "path=" not in err
    assert main(["prt", "--task", "cifar10"]) == 2
    assert "needs --data PATH" in capsys.readouterr().err


def test_cli_overwrite_replaces_only_an_earlier_run(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    args = ["train", "--epochs", "1", "--quiet", "--logdir", str(tmp_path), "--name", "a",
            "--param", "cycles=4"]
    assert main(args) == 0
    first = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert main(args) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    second = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert len(second) == 1 and second != first  # the old event file is gone, a new one written
    (tmp_path / "a" / "notes.txt").write_text("mine")
    assert main([*args, "--overwrite"]) == 2
    assert "files that adaprec did not write (notes.txt)" in capsys.readouterr().err
    assert (tmp_path / "a" / "notes.txt").exists()
    assert main(["train", "--overwrite", "--no-logs"]) == 2
    assert "--overwrite needs --name" in capsys.readouterr().err


def test_cli_threads(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    seen: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    args = ["train", "--epochs", "1", "--no-logs", "--quiet", "--param", "cycles=4"]
    assert main(args) == 0
    assert main([*args, "--threads", "2"]) == 0
    # The digits task's default, then the flag; each time the caller's count is put back at the end.
    assert seen == [1, before, 2, before]
    assert main(["prt", "--threads", "x"]) == 2
    assert "--threads must be a positive integer" in capsys.readouterr().err


def test_cli_explains_mixed_precisions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--epochs", "1", "--no-logs", "--quiet", "--param", "cycles=4"]) == 0
    out = capsys.readouterr().out
    assert "mixed(int3/int8, int7/int8): int3/int8 on conv1, conv2; int7/int8 on fc" in out
    assert "classifier floor keeps layer 'fc' at >= 7 bits" in out


# --- imports, plots, Optuna, Python 3.10 -------------------------------------------------------------
def _fresh_python(code: str, **env: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_import_adaprec_loads_no_optional_package_and_reaches_optim_lazily() -> None:
    out = _fresh_python(
        "import sys, adaprec\n"
        "heavy = ['optuna', 'tensorboard', 'matplotlib', 'sklearn', 'torchvision', 'adaprec.tasks', "
        "'adaprec.tune', 'adaprec.optim', 'lightning', 'pytorch_lightning', 'transformers', 'accelerate', "
        "'adaprec.integrations']\n"
        "print([m for m in heavy if m in sys.modules])\n"
        "print(adaprec.optim.KahanSGD.__module__, 'optim' in dir(adaprec))\n"
        "import adaprec.tune.cli\n"
        "print('optuna' in sys.modules)")
    assert out.splitlines() == ["[]", "adaprec.optim.kahan True", "False"]
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        adaprec.nope  # noqa: B018


def test_plots_leave_the_global_matplotlib_backend_alone(tmp_path: Path) -> None:
    code = (
        "import matplotlib; matplotlib.use('svg')\n"
        "import os, sys, optuna\n"
        "from torch.utils.tensorboard import SummaryWriter\n"
        "from adaprec.plots import plot_runs\n"
        "from adaprec import tune\n"
        f"d = {str(tmp_path)!r}\n"
        "for name, tag, v in [('a', 'stats/val_acc', 0.9), ('b', 'stats/val_loss', 1.1)]:\n"
        "    with SummaryWriter(os.path.join(d, name)) as w:\n"
        "        w.add_scalar(tag, v, 9); w.add_scalar('cost/gbitops', 2.0, 9)\n"
        "plot_runs([d], os.path.join(d, 'c.png'))\n"
        "optuna.logging.set_verbosity(optuna.logging.WARNING)\n"
        "st = tune.tune(lambda p, r: {'val_loss': p.config()['bits'] / 10}, 'fixed', n_trials=2, "
        "metrics=('val_loss',), progress=False, storage=optuna.storages.InMemoryStorage())\n"
        "tune.plot_pareto(st, os.path.join(d, 'p.png'))\n"
        "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    assert _fresh_python(code) == "svg False"
    assert (tmp_path / "c.png").stat().st_size > 0 and (tmp_path / "p.png").stat().st_size > 0


def test_compare_panels_never_mix_metrics(tmp_path: Path) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from adaprec.plots import compare_figure, find_runs

    for name, tag, v in [("digits-a", "stats/val_acc", 0.97), ("digits-b", "stats/val_acc", 0.98),
                         ("charlm", "stats/val_loss", 2.3)]:
        with SummaryWriter(str(tmp_path / name)) as w:
            w.add_scalar(tag, v, 9)
            w.add_scalar("cost/gbitops", 5.0, 9)
    fig = compare_figure(find_runs([tmp_path]))
    panels = {a.get_title(): a for a in fig.axes if a.get_visible()}
    assert panels["val_acc vs cost (2 runs)"].get_ylabel() == "val_acc"
    assert panels["val_loss vs cost (1 run)"].get_ylabel() == "val_loss"
    acc = panels["val_acc vs cost (2 runs)"]
    ys = sorted(float(y) for c in acc.collections for y in c.get_offsets()[:, 1])
    assert ys == pytest.approx([0.97, 0.98])  # the language model's loss is not on the accuracy axis


def test_studies_name_their_metrics_for_dashboards() -> None:
    import optuna

    from adaprec import tune

    st = tune.create_study("m", storage=optuna.storages.InMemoryStorage(), policy="fixed",
                           metrics=("accuracy", "gbitops"))
    assert st.metric_names == ["accuracy", "gbitops"]


def test_toml_readers_fall_back_to_tomli_on_python_310() -> None:
    # Python 3.10 has no tomllib; the "tomli" package is the same parser. Simulate that interpreter.
    code = (
        "import sys, tomllib\n"
        "sys.modules['tomli'] = tomllib; sys.modules['tomllib'] = None  # import tomllib now fails\n"
        "import adaprec.cli, adaprec.policies.registry as r\n"
        "print(adaprec.cli._param('bits=[3, 8]'), r.tomllib.__name__)")
    assert _fresh_python(code) == "('bits', [3, 8]) tomllib"
