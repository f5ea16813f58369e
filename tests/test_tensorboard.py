"""TensorBoard logging: tags and values read back with TensorBoard's own reader, a live server, and
complete logs after an exception inside the controller's block."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import adaprec
from adaprec import Decision, Precision
from adaprec.policies import Policy
from adaprec.tensorboard import ROLES, Logger, bits_tag, read_scalars, trial_logdir


class Staircase(Policy):
    """Forward bits 3,4,5,6 for three steps each, then again; the last layer stays at 8/8 (mixed)."""

    name = "staircase"

    def decide(self, ctl):
        bits = 3 + (ctl.step_count // 3) % 4
        return Decision.uniform(Precision.cpt(bits, 8)).with_override("fc", Precision.cpt(8, 8))

    def signals(self):
        return {"phase": (self.ctl.step_count % 3) / 3, "level": torch.tensor(float(self.ctl.step_count))}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _data(n: int = 7):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(n)]


def _train(ctl, model, opt, epochs=2, fail_at=None):
    for epoch in range(epochs):
        for x, y in ctl.epoch(_data()):
            if fail_at is not None and ctl.step_count == fail_at:
                raise RuntimeError("boom")
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ctl.observe(loss=loss)
        ctl.observe(val_acc=0.5 + epoch / 10)


def _in_force(history, step):
    """The history entry in force at ``step`` (the last change at or before it)."""
    return [h for h in history if h.step <= step][-1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logdir = tmp_path_factory.mktemp("logs") / "run"
    with adaprec.Controller(model, policy=Staircase(), optimizer=opt, logdir=str(logdir)) as ctl:
        _train(ctl, model, opt)
    return ctl, logdir, read_scalars(logdir)


def test_bits_per_layer_equal_the_history(run):
    ctl, _, scalars = run
    assert ctl.step_count == 14 and len(ctl.history) >= 4
    for layer in ctl.layer_names:
        for role in ROLES:
            series = scalars[bits_tag(layer, role)]
            steps = [s for s, _ in series]
            assert steps == sorted(steps) and steps[-1] == ctl.step_count - 1
            for step, value in series:  # every point is the precision in force at that step
                want = getattr(_in_force(ctl.history, step).layers[layer], role).bits
                assert value == want, (layer, role, step)
            logged = dict(series)
            for h in ctl.history:  # every change of this layer is logged at its step
                prev = [e for e in ctl.history if e.step < h.step]
                if not prev or prev[-1].layers[layer] != h.layers[layer]:
                    assert logged[h.step] == getattr(h.layers[layer], role).bits
    # The mixed decision is visible: conv cycles, fc stays at 8 bits.
    assert {v for _, v in scalars["bits/conv/weight"]} == {3.0, 4.0, 5.0, 6.0}
    assert {v for _, v in scalars["bits/fc/weight"]} == {8.0}
    assert {v for _, v in scalars["bits/conv/gradient"]} == {8.0}


def test_loss_cost_lr_signals_and_hparams(run):
    ctl, logdir, s = run
    report = ctl.report()
    # log_every=10 and epoch ends (steps 6 and 13): windows of 7, 3 and 4 steps.
    assert [st for st, _ in s["loss/mean"]] == [6, 9, 13]
    for (_, lo), (_, mean), (_, hi) in zip(s["loss/min"], s["loss/mean"], s["loss/max"]):
        assert lo <= mean <= hi
    assert [st for st, _ in s["loss/epoch_mean"]] == [6, 13]
    assert s["epoch"] == [(6, 0.0), (13, 1.0)]
    assert s["cost/gbitops"][-1][1] == pytest.approx(report["gbitops"], rel=1e-6)
    assert s["cost/savings_vs_fp32"][-1][1] == pytest.approx(report["savings_vs_fp32"], rel=1e-6)
    assert s["cost/savings_vs_reference"][-1][1] == pytest.approx(report["savings_vs_reference"], rel=1e-5)
    assert s["cost/savings_vs_reference_ideal"][-1][1] == pytest.approx(report["savings_vs_reference_ideal"],
                                                                         rel=1e-5, abs=1e-9)
    assert not any(t.startswith("report/savings") for t in s)  # the cost/... tags carry all three
    assert all(v == pytest.approx(0.1) for _, v in s["lr/group0"])
    assert [st for st, _ in s["policy/phase"]] == [6, 9, 13] and s["policy/level"][-1][1] == 14.0
    assert s["stats/val_acc"] == [(6, 0.5), (13, pytest.approx(0.6))]
    assert "report/gbitops_fp32" in s and "report/per_layer_gbitops/conv" in s
    assert s["hparam/val_acc"] == [(13, pytest.approx(0.6))]
    assert s["hparam/gbitops"][0][1] == pytest.approx(report["gbitops"], rel=1e-6)
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    tensors = acc.Tags()["tensors"]
    # The custom-scalars layout, the hparams session and the text report are in the run.
    assert "custom_scalars__config__" in tensors and "report/text_summary" in tensors
    hp = acc.PluginTagToContent("hparams")
    assert {"_hparams_/experiment", "_hparams_/session_start_info", "_hparams_/session_end_info"} <= set(hp)
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    data = plugin_data_pb2.HParamsPluginData
    start = data.FromString(hp["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["policy"].string_value == "staircase"
    assert start.hparams["optimizer.lr"].number_value == pytest.approx(0.1)
    end = data.FromString(hp["_hparams_/session_end_info"]).session_end_info
    assert end.status == api_pb2.STATUS_SUCCESS
    assert "histograms" not in acc.Tags() or not acc.Tags()["histograms"]


def test_custom_scalars_layout_puts_all_layers_in_one_chart(run):
    from tensorboard.plugins.custom_scalar import layout_pb2

    _, logdir, _ = run
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    proto = acc.Tensors("custom_scalars__config__")[0].tensor_proto
    layout = layout_pb2.Layout.FromString(proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    import re

    weight_chart = charts["weight bits (all layers)"]
    assert all(any(re.search(p, f"bits/{n}/weight") for p in weight_chart) for n in ("conv", "fc"))
    assert not any(re.search(p, "bits/conv/gradient") for p in weight_chart)


def test_logs_complete_after_an_exception(tmp_path):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logdir = tmp_path / "failed"
    with pytest.raises(RuntimeError, match="boom"):
        with adaprec.Controller(model, policy=Staircase(), optimizer=opt, logdir=str(logdir)) as ctl:
            _train(ctl, model, opt, fail_at=11)
    s = read_scalars(logdir)
    last = ctl.step_count - 1
    assert last == 10
    # Everything up to the failure is on disk: bits to the last step, loss, cost, final hparams.
    assert s["bits/conv/weight"][-1] == (last, float(ctl.history[-1].layers["conv"].weight.bits))
    assert s["loss/mean"][-1][0] == last
    assert s["cost/gbitops"][-1][1] == pytest.approx(ctl.report()["gbitops"], rel=1e-6)
    assert "hparam/gbitops" in s
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    text = acc.Tensors("report/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "RuntimeError: boom" in text
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    end = acc.PluginTagToContent("hparams")["_hparams_/session_end_info"]
    status = plugin_data_pb2.HParamsPluginData.FromString(end).session_end_info.status
    assert status == api_pb2.STATUS_FAILURE
    # The model was restored despite the exception and the writer is closed.
    assert ctl.components["tensorboard"]._closed


def test_user_writer_is_flushed_not_closed_and_histograms_only_when_asked(tmp_path):
    writer = SummaryWriter(str(tmp_path / "own"))
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with adaprec.Controller(model, policy="fixed", optimizer=opt) as ctl:
        logger = Logger(writer, log_every=5, histograms_every=4, hparams={"task": "synthetic"}).attach(ctl)
        _train(ctl, model, opt, epochs=1)
    writer.add_scalar("mine", 1.0, 0)  # still open: the logger did not close a writer it was given
    writer.close()
    assert logger.logdir == str(tmp_path / "own")
    acc = EventAccumulator(str(tmp_path / "own"))
    acc.Reload()
    hist = acc.Tags()["histograms"]
    assert {"weights/conv/weight", "weights/fc/bias", "grads/fc/weight"} <= set(hist)
    assert [e.step for e in acc.Histograms("weights/conv/weight")] == [3]
    assert "mine" in acc.Tags()["scalars"]


def test_attach_inside_the_block_and_bad_arguments(tmp_path):
    model = Net()
    with adaprec.Controller(model, policy=adaprec.policies.Fixed(bits=5)) as ctl:
        model(torch.randn(2, 1, 8, 8)).sum().backward()
        ctl.step()
        Logger(tmp_path / "late", log_every=1).attach(ctl)
        model(torch.randn(2, 1, 8, 8)).sum().backward()
        ctl.step()
    s = read_scalars(tmp_path / "late")
    assert s["bits/conv/weight"] == [(1, 5.0)]
    with pytest.raises(ValueError, match="log_every must be a positive integer"):
        Logger(tmp_path, log_every=0)
    with pytest.raises(ValueError, match="histograms_every"):
        Logger(tmp_path, histograms_every=-1)
    with pytest.raises(TypeError, match="log directory .* or a SummaryWriter"):
        Logger(42)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        Logger(tmp_path / "file")
    with pytest.raises(ValueError, match="role must be one of"):
        bits_tag("fc", "bias")


def test_trial_logdir():
    class FakeTrial:
        number = 12

    assert trial_logdir("study", FakeTrial()) == Path("study/trial_0012")
    assert trial_logdir(Path("s"), 3).name == "trial_0003"
    with pytest.raises(ValueError, match="non-negative trial number"):
        trial_logdir("s", -1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_server_serves_the_run_tags(run, tmp_path):
    _, logdir, scalars = run
    port = _free_port()
    log = open(tmp_path / "tb.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-c", "from tensorboard.main import run_main; run_main()", "--logdir",
         str(logdir.parent), "--host", "127.0.0.1", "--port", str(port), "--load_fast", "false"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/data/plugin/scalars/tags"
        deadline = time.monotonic() + 90
        tags = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    tags = json.loads(resp.read())
                if tags.get("run"):  # the run appears once the first reload has read it
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        assert tags is not None and "run" in tags, (tags, (tmp_path / "tb.log").read_text()[-2000:])
        served = set(tags["run"])
        assert {"bits/conv/weight", "bits/fc/gradient", "loss/mean", "cost/gbitops"} <= served
        assert served == set(scalars)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    import adaprec.tensorboard as tb

    monkeypatch.setattr(tb, "_rank", lambda: 1)
    model = Net()
    with adaprec.Controller(model, policy="fixed", logdir=str(tmp_path / "rank1")) as ctl:
        model(torch.randn(2, 1, 8, 8)).sum().backward()
        ctl.step()
    assert not (tmp_path / "rank1").exists()
    assert ctl.components.get("tensorboard") is None
