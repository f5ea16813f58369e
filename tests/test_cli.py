"""The ``adaprec`` command line: the console script trains and reports, every subcommand has --help,
bad input gives one clear line and a non-zero exit, ``report`` writes PNGs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import adaprec
from adaprec.cli import _COMMANDS, CLIError, default_run_name, main, register_command
from adaprec.tensorboard import read_scalars

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _console_script() -> list[str]:
    exe = shutil.which("adaprec")
    # Without `pip install -e .` the script is not on PATH; the module runs the same main().
    return [exe] if exe else [sys.executable, "-m", "adaprec.cli"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One real `adaprec train --epochs 1` on the digits task, through the console script."""
    logdir = tmp_path_factory.mktemp("runs")
    cmd = _console_script() + ["train", "--epochs", "1", "--batch-size", "64", "--param", "cycles=4",
                               "--logdir", str(logdir), "--name", "cpt-run", "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1])
    return proc, logdir / "cpt-run"


def test_train_console_script_prints_the_report(trained):
    proc, run_dir = trained
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for needle in ("task digits", "policy CPT(", "accuracy", "GBitOPs", "savings vs FP32",
                   "savings vs static int8/int8", "same constraints", "savings vs ideal int8/int8",
                   "not a run", "TensorBoard logs", "cpt_bounds"):
        assert needle in out, needle
    acc = float(out.split("accuracy", 1)[1].split()[0])
    assert 0.0 <= acc <= 1.0
    # The progress bar (stderr) shows the epoch, the loss and the current bits.
    assert "epoch 1/1" in proc.stderr and "bits=int" in proc.stderr and "loss=" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_writes_tensorboard_logs_matching_the_schedule(trained):
    proc, run_dir = trained
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = read_scalars(run_dir)
    layers = {t.split("/")[1] for t in s if t.startswith("bits/")}
    assert layers == {"conv1", "conv2", "fc"}
    # CPT with 4 cycles over 23 steps: the forward bits move between 3 and 8, backward bits stay 8.
    weights = {v for _, v in s["bits/conv1/weight"]}
    assert min(weights) == 3.0 and max(weights) <= 8.0 and len(weights) > 2
    assert {v for _, v in s["bits/conv1/gradient"]} == {8.0}
    assert s["stats/val_acc"] and s["cost/gbitops"] and s["loss/mean"]
    # 1437 training digits / 64 = 23 steps (0..22); a decision made for step 23 may be logged too.
    assert s["bits/fc/weight"][-1][0] in (22, 23)


def test_report_writes_png_for_one_and_several_runs(trained, tmp_path, capsys):
    proc, run_dir = trained
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "one.png"
    assert main(["report", str(run_dir), "-o", str(out)]) == 0
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    printed = capsys.readouterr().out
    assert "val_acc" in printed
    assert "vs static reference (same constraints)" in printed and "vs ideal reference formula" in printed
    # A second, tiny run logged by the library itself; then compare both (accuracy vs GBitOPs).
    other = run_dir.parent / "fixed-run"
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))) for _ in range(3)]
    with adaprec.Controller(model, policy="fixed", optimizer=opt, logdir=str(other)) as ctl:
        for x, y in ctl.epoch(batches):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ctl.observe(loss=loss)
        ctl.observe(val_acc=0.25)
    cmp_png = tmp_path / "cmp.png"
    assert main(["report", str(run_dir.parent), "--out", str(cmp_png)]) == 0
    assert cmp_png.read_bytes().startswith(PNG_MAGIC) and cmp_png.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "fixed-run: val_acc 0.25" in printed and "cpt-run" in printed


def _error_line(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_bad_arguments_exit_2_with_one_clear_line(capsys, tmp_path):
    line = _error_line(capsys, ["train", "--epochs", "0"])
    assert line.startswith("adaprec train: error: --epochs must be a positive integer, got 0")
    assert "--help" in line
    assert "invalid choice" in _error_line(capsys, ["frobnicate"])
    assert "--bogus" in _error_line(capsys, ["train", "--bogus"])
    line = _error_line(capsys, ["train", "--policy", "nope"])
    assert "unknown policy 'nope'" in line and "cpt" in line and "fixed" in line
    assert "recipe file" in _error_line(capsys, ["train", "--policy", str(tmp_path / "missing.toml")])
    line = _error_line(capsys, ["train", "--task", "mnist"])
    assert "unknown task 'mnist'" in line and "digits" in line
    assert "--data" in _error_line(capsys, ["train", "--task", "cifar10", "--data", str(tmp_path / "no")])
    line = _error_line(capsys, ["train", "--data", str(tmp_path), "--policy", "fixed", "--no-logs"])
    assert "--data is not used by task 'digits'" in line
    assert "bad parameters for policy 'fixed'" in _error_line(
        capsys, ["train", "--policy", "fixed", "--param", "colour=3"])
    assert "--param needs key=value" in _error_line(capsys, ["train", "--param", "bits"])
    assert "--lr must be a positive number" in _error_line(capsys, ["train", "--lr", "-1"])
    assert "does not exist" in _error_line(capsys, ["report", str(tmp_path / "nothing")])
    assert "no TensorBoard event files" in _error_line(capsys, ["report", str(tmp_path)])
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    line = _error_line(capsys, ["train", "--policy", "fixed", "--logdir", str(tmp_path), "--name", "taken"])
    assert "already exists" in line
    assert "--plot must name a .png" in _error_line(capsys, ["prt", "--plot", "curve.jpg"])


def test_help_everywhere(capsys):
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    for name in ("train", "prt", "policies", "report"):
        assert name in top
        assert main([name, "--help"]) == 0
        assert f"usage: adaprec {name}" in capsys.readouterr().out
    assert main([]) == 0 and "usage: adaprec" in capsys.readouterr().out
    if "tune" in _COMMANDS:  # registered from adaprec.tune.cli when that module is installed
        assert main(["tune", "--help"]) == 0 and "usage: adaprec tune" in capsys.readouterr().out


def test_policies_lists_each_policy_on_one_line(capsys):
    assert main(["policies"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [ln.split()[0] for ln in lines if ln and not ln.startswith(" ") and "recipes" not in ln]
    assert {"cpt", "fixed", "fp32"} <= set(names)
    assert set(names) >= set(adaprec.policies.list_policies())


def test_prt_prints_bounds_plots_and_logs(capsys, tmp_path):
    png, logdir = tmp_path / "prt.png", tmp_path / "prt"
    argv = ["prt", "--start-bits", "2", "--max-bits", "4", "--steps-per-bits", "4", "--window", "2",
            "--full-curve", "--batch-size", "64", "--plot", str(png), "--logdir", str(logdir)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "bounds: B_min = " in out and "B_max = 4" in out and "watching training accuracy" in out
    assert png.read_bytes().startswith(PNG_MAGIC)
    s = read_scalars(logdir)
    assert [st for st, _ in s["prt/progress"]] == [2, 3, 4] and len(s["prt/metric"]) == 12
    b_min = int(out.split("B_min = ")[1].split(",")[0])
    assert s["prt/b_min"] == [(0, float(b_min))]


def test_registered_command_and_its_errors(capsys):
    def run(args):
        if args.n < 0:
            raise CLIError("n must be >= 0")
        print("n =", args.n)
        return 3

    register_command("echo-n", run, help="print n", add_arguments=lambda p: p.add_argument("n", type=int))
    try:
        assert main(["echo-n", "4"]) == 3
        assert capsys.readouterr().out == "n = 4\n"
        assert _error_line(capsys, ["echo-n", "-5"]) == "adaprec echo-n: error: n must be >= 0"
        with pytest.raises(ValueError, match="already registered"):
            register_command("echo-n", run, help="again")
        with pytest.raises(ValueError, match="needs help"):
            register_command("other", run)
    finally:
        _COMMANDS.pop("echo-n", None)


def test_default_run_name():
    import datetime as dt

    when = dt.datetime(2025, 5, 6, 7, 8, 9)
    assert default_run_name("digits", "cpt", when) == "digits-cpt-20250506-070809"
    assert default_run_name("charlm", "my recipes/cpt fast.toml", when) == "charlm-cpt_fast-20250506-070809"
