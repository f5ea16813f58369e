"""TensorBoard logging of an adaptive-precision run: bits per layer, policy signals, loss, cost.

``Controller(logdir=...)`` attaches a :class:`Logger` for you; pass your own
``torch.utils.tensorboard.SummaryWriter`` to ``Logger(writer).attach(ctl)`` to share a writer with the rest
of your logging. The global step of every scalar is ``ctl.step_count`` (the 0-based iteration index).

Tag names (stable; the CLI's ``adaprec report`` and the tests rely on them):

==================================  ==========================================================================
``bits/<layer>/weight``             bit width of a layer's weights (``activation``, ``gradient`` likewise);
                                    written where the precision changes, at the step before a change and at
                                    the last step, so the values are a step function (FP32 counts as 32)
``loss/mean`` ``loss/std``          statistics of the observed ``loss`` over the steps since the last write
``loss/min`` ``loss/max``           (every ``log_every`` steps and at each epoch end)
``loss/epoch_mean``                 mean observed loss of an epoch, at its last step
``stats/<key>``                     every other numeric entry of ``ctl.stats`` (``val_acc``, observers'
                                    statistics such as gradient diversity), when it changes
``policy/<key>``                    the numbers returned by the policy's ``signals()`` method, if it has one
``lr/group<i>``                     learning rate of each optimizer parameter group
``cost/gbitops``                    cumulative training GBitOPs (the products that ran, at the widths they
                                    ran; docs/methods.md#bitops); every ``log_every`` steps and at each epoch
                                    end (reading them syncs), with the savings (fractions of 1) against:
``cost/savings_vs_fp32``            FP32: the same products at 32 bits;
``cost/savings_vs_reference``       a static run at the reference precision (default int8/int8) *with the
                                    same constraints* (the classifier floor included): a run you can do;
``cost/savings_vs_reference_ideal`` the reference formula's ideal, every layer at the reference precision
                                    (constraints ignored): for comparison with papers, not a run
``report/<key>[/<sub>]``            other numeric entries of ``ctl.report()``, dicts one level deep (FP32
                                    and reference GBitOPs, per-layer GBitOPs, time at each precision,
                                    modelled time per hardware...), at epoch ends and at the end
``epoch``                           the epoch index, at each epoch's last step
``hparam/<metric>``                 final metrics, shown with the run's hyperparameters in the HPARAMS tab
``weights/<layer>/<param>``         histograms (only with ``histograms_every=N``), and ``grads/...``
``prt/...``                         a precision range test's curve, see :func:`log_prt`
==================================  ==========================================================================

A custom-scalars layout (CUSTOM SCALARS tab) puts all layers' weight, activation and gradient bits in one
chart each. Events are flushed at every epoch end and on leaving the ``with`` block, also by an exception.

Example:
    >>> import tempfile, torch, adaprec
    >>> import torch.nn.functional as F
    >>> from adaprec.tensorboard import Logger, read_scalars
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> logdir = tempfile.mkdtemp()
    >>> with adaprec.Controller(model, policy="fixed", optimizer=opt, logdir=logdir) as ctl:
    ...     for x, y in ctl.epoch([(torch.randn(3, 4), torch.tensor([0, 1, 0]))] * 4):
    ...         loss = F.cross_entropy(model(x), y)
    ...         opt.zero_grad(); loss.backward(); opt.step()
    ...         ctl.observe(loss=loss)
    >>> scalars = read_scalars(logdir)
    >>> scalars["bits/0/weight"]
    [(0, 8.0), (3, 8.0)]
    >>> len(scalars["loss/mean"]), "cost/gbitops" in scalars
    (1, True)
"""

from __future__ import annotations

import math
import numbers
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .events import Event

if TYPE_CHECKING:  # pragma: no cover
    from .controller import Controller

__all__ = ["Logger", "trial_logdir", "read_scalars", "log_prt", "bits_tag", "ROLES", "COST_TAGS"]

#: The three roles of a layer's precision, in tag order.
ROLES = ("weight", "activation", "gradient")
#: the ``cost/...`` tags: cumulative GBitOPs and the savings against FP32, the static reference run with the
#: same constraints, and the reference formula's ideal
COST_TAGS = ("gbitops", "savings_vs_fp32", "savings_vs_reference", "savings_vs_reference_ideal")


def bits_tag(layer: str, role: str) -> str:
    """The scalar tag of one layer's bit width for ``role`` (``weight``, ``activation`` or ``gradient``).

    Example:
        >>> bits_tag("features.0", "gradient")
        'bits/features.0/gradient'
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    return f"bits/{layer}/{role}"


def trial_logdir(study_dir: str | os.PathLike[str], trial: Any) -> Path:
    """The run directory of one Optuna trial inside a study's directory: ``<study_dir>/trial_<nnnn>``.

    ``trial`` is a trial number or an object with a ``.number`` (an ``optuna.Trial``). Pointing TensorBoard
    at ``study_dir`` then shows every trial as its own run.

    Example:
        >>> trial_logdir("runs/study", 7).as_posix()
        'runs/study/trial_0007'
    """
    number = getattr(trial, "number", trial)
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        raise ValueError(f"trial must be a non-negative trial number or an optuna Trial, got {trial!r}")
    return Path(study_dir) / f"trial_{number:04d}"


def log_prt(logdir_or_writer: Any, result: Any) -> None:
    """Write a precision range test's curve (:class:`adaprec.prt.PRTResult`) to TensorBoard.

    Tags: ``prt/metric`` and ``prt/bits`` per test iteration (step = iteration); ``prt/progress`` and
    ``prt/passed`` per level with the level's forward bits as the step; ``prt/threshold``, ``prt/b_min`` and
    ``prt/b_max`` once (step 0). A CPT run with ``bits="auto"`` can log its own test the same way
    (``log_prt(writer, ctl.policy.prt_result())``).

    Example:
        >>> import tempfile
        >>> from adaprec.prt import RangeTest
        >>> rt = RangeTest(start_bits=2, max_bits=3, steps_per_bits=2, window=1, threshold=0.1)
        >>> for acc in [0.1, 0.1, 0.1, 0.5]:
        ...     _ = rt.record(acc)
        >>> d = tempfile.mkdtemp(); log_prt(d, rt.result("acc"))
        >>> read_scalars(d)["prt/progress"], read_scalars(d)["prt/b_min"]
        ([(2, 0.0), (3, 0.4000000059604645)], [(0, 3.0)])
    """
    for attr in ("levels", "values", "b_min", "b_max", "threshold"):
        if not hasattr(result, attr):
            raise TypeError(f"log_prt needs an adaprec.prt.PRTResult, got {type(result).__name__}")
    own = isinstance(logdir_or_writer, str | os.PathLike)
    if own:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(logdir_or_writer))
    else:
        writer = logdir_or_writer
    try:
        for i, (bits, value) in enumerate(result.values):
            writer.add_scalar("prt/metric", float(value), i)
            writer.add_scalar("prt/bits", float(bits), i)
        for level in result.levels:
            writer.add_scalar("prt/progress", float(level.progress), level.bits)
            writer.add_scalar("prt/passed", float(level.passed), level.bits)
        writer.add_scalar("prt/threshold", float(result.threshold), 0)
        writer.add_scalar("prt/b_min", float(result.b_min), 0)
        writer.add_scalar("prt/b_max", float(result.b_max), 0)
        writer.flush()
    finally:
        if own:
            writer.close()


def read_scalars(logdir: str | os.PathLike[str]) -> dict[str, list[tuple[int, float]]]:
    """All scalar series of one run directory as ``{tag: [(step, value), ...]}``, read with TensorBoard's
    own ``EventAccumulator`` (every event kept, no sampling).

    Example:
        >>> import tempfile
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> d = tempfile.mkdtemp()
        >>> with SummaryWriter(d) as w:
        ...     w.add_scalar("a", 1.5, 3)
        >>> read_scalars(d)
        {'a': [(3, 1.5)]}
    """
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    path = Path(logdir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {str(path)!r} does not exist")
    acc = EventAccumulator(str(path), size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, float(e.value)) for e in acc.Scalars(tag)] for tag in acc.Tags()[SCALARS]}


def _number(v: Any) -> float | torch.Tensor | None:
    """``v`` as something loggable: a float, a one-element tensor (read later), or None if not numeric."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, numbers.Real):
        return float(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1 and not v.is_complex():
        return v.detach()
    return None


class _Window:
    """Running sum, sum of squares, min and max of a scalar series, kept on the value's device so that
    accumulating a loss tensor every step needs no host sync; :meth:`read` syncs once."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.acc: torch.Tensor | None = None  # [sum, sum_sq, min, max] in float64
        self.count = 0

    def add(self, v: float | torch.Tensor) -> None:
        if isinstance(v, torch.Tensor):
            t = v.double().reshape(())
        else:
            t = torch.tensor(float(v), dtype=torch.float64)
        row = torch.stack([t, t * t, t, t])
        if self.acc is None:
            self.acc = row
        else:
            self.acc = torch.stack([self.acc[0] + t, self.acc[1] + t * t, torch.minimum(self.acc[2], t),
                                    torch.maximum(self.acc[3], t)])
        self.count += 1

    def read(self) -> dict[str, float] | None:
        if self.acc is None or self.count == 0:
            return None
        s, sq, lo, hi = self.acc.tolist()
        n = self.count
        mean = s / n
        # Population std of the window; clamp tiny negative round-off of sq/n - mean^2.
        std = math.sqrt(max(sq / n - mean * mean, 0.0))
        return {"mean": mean, "std": std, "min": lo, "max": hi}


class Logger:
    """Writes a run's precision decisions, policy signals, loss, learning rate and cost to TensorBoard.

    Args:
        logdir_or_writer: a run directory (created if missing) or an existing ``SummaryWriter``; a writer
            you pass is flushed but not closed at the end, a directory's writer is closed. Under
            ``torch.distributed`` only rank 0 writes; on the other ranks the logger does nothing.
        log_every: write loss statistics, policy signals, learning rate and cost every this many steps
            (and at each epoch end). Reading the cost meter syncs with the device, so keep it > 1 on GPU.
        histograms_every: write histograms of the quantized layers' weights and gradients every this many
            steps; ``None`` (default) writes none.
        hparams: extra hyperparameters for the HPARAMS tab (task, batch size, ...), merged with what the
            logger reads from the controller (policy and its configuration, optimizer, total steps).
        flush_secs: passed to the ``SummaryWriter`` the logger creates.

    See the module docstring for the tag names.

    Example:
        >>> import tempfile, torch, adaprec
        >>> from adaprec.tensorboard import Logger, read_scalars
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> logdir = tempfile.mkdtemp()
        >>> with adaprec.Controller(model, policy=adaprec.policies.Fixed(bits=6)) as ctl:
        ...     logger = Logger(logdir, log_every=1).attach(ctl)
        ...     model(torch.randn(2, 4)).sum().backward(); ctl.step()
        >>> read_scalars(logdir)["bits/0/gradient"]
        [(0, 6.0)]
    """

    def __init__(self, logdir_or_writer: Any, *, log_every: int = 10, histograms_every: int | None = None,
                 hparams: Mapping[str, Any] | None = None, flush_secs: int = 30) -> None:
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
            raise ValueError(f"log_every must be a positive integer, got {log_every!r}")
        h = histograms_every
        if h is not None and (isinstance(h, bool) or not isinstance(h, int) or h < 1):
            raise ValueError(f"histograms_every must be a positive integer or None, got {histograms_every!r}")
        if hparams is not None and not isinstance(hparams, Mapping):
            raise TypeError(f"hparams must be a dict of name -> value, got {type(hparams).__name__}")
        # Under torch.distributed every rank takes the same decisions; only rank 0 writes, so that the
        # ranks do not write duplicate event files into the same run directory.
        self.enabled = _rank() == 0
        if not self.enabled:
            self.writer = None
            self._own_writer = False
        elif isinstance(logdir_or_writer, str | os.PathLike):
            from torch.utils.tensorboard import SummaryWriter

            path = Path(logdir_or_writer)
            if path.exists() and not path.is_dir():
                raise NotADirectoryError(f"logdir {str(path)!r} exists and is not a directory")
            self.writer = SummaryWriter(log_dir=str(path), flush_secs=flush_secs)
            self._own_writer = True
        elif all(hasattr(logdir_or_writer, m) for m in ("add_scalar", "flush")):
            self.writer = logdir_or_writer
            self._own_writer = False
        else:
            raise TypeError("Logger needs a log directory (str or Path) or a SummaryWriter, got "
                            f"{type(logdir_or_writer).__name__}")
        self.log_every = log_every
        self.histograms_every = histograms_every
        self.hparams: dict[str, Any] = dict(hparams or {})
        self.ctl: Controller | None = None
        self._handles: list[Any] = []
        self._loss = _Window()
        self._epoch_loss = _Window()
        self._seen_stats: dict[str, Any] = {}   # stats key -> the object last written (identity check)
        self._bits_step: dict[str, int] = {}    # layer -> last step its bits were written
        self._last_flush_step = -1
        self._last_report_step = -1
        self._reference = "reference"  # the reference precision's name, for chart titles
        self._closed = False

    @property
    def logdir(self) -> str | None:
        """The directory the events go to (``None`` on ranks other than 0)."""
        if self.writer is None:
            return None
        return self.writer.get_logdir() if hasattr(self.writer, "get_logdir") else str(self.writer.log_dir)

    # --- wiring ---------------------------------------------------------------------------------
    def attach(self, ctl: Controller) -> Logger:
        """Subscribe to ``ctl``'s events; returns ``self``. Also works after the ``with`` block started."""
        if self.ctl is not None:
            raise RuntimeError("this Logger is already attached to a Controller; create one per run")
        if self._closed:
            raise RuntimeError("this Logger was closed; create a new one")
        self.ctl = ctl
        if not self.enabled:
            return self
        on = ctl.on
        self._handles = [
            on(Event.PRECISION_CHANGED, self._on_precision_changed),
            on(Event.METRICS_OBSERVED, self._on_metrics),
            on(Event.ITERATION_COMPLETED, self._on_iteration),
            on(Event.EPOCH_COMPLETED, self._on_epoch),
            on(Event.FIT_COMPLETED, self._on_fit_completed),
            on(Event.EXCEPTION_RAISED, self._on_exception),
        ]
        ctl.components.setdefault("tensorboard", self)
        self._reference = ctl.cost.reference.short() if ctl.cost is not None else "reference"
        self._write_layout(ctl.layer_names)
        if ctl.current:  # attached inside the block: record what is in force now
            self._write_bits(ctl.current, ctl.step_count)
        return self

    def detach(self) -> None:
        """Unsubscribe from the controller (the writer stays open until :meth:`close`)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def close(self) -> None:
        """Flush, and close the writer if the logger created it."""
        if self._closed or self.writer is None:
            return
        self.writer.flush()
        if self._own_writer:
            self.writer.close()
        self._closed = True

    # --- handlers -------------------------------------------------------------------------------
    def _on_precision_changed(self, ctl: Controller, *, old: Any, new: dict, step: int, **_: Any) -> None:
        old = old or {}
        changed = {n: p for n, p in new.items() if old.get(n) != p}
        # Close each changed layer's previous segment at the step before the change, so that the series
        # is a step function (TensorBoard draws straight lines between points).
        before = {n: old[n] for n in changed if n in old and self._bits_step.get(n, -1) < step - 1}
        if before and step > 0:
            self._write_bits(before, step - 1)
        self._write_bits(changed, step)

    def _write_bits(self, layers: Mapping[str, Any], step: int) -> None:
        for name, prec in layers.items():
            for role in ROLES:
                self.writer.add_scalar(bits_tag(name, role), float(getattr(prec, role).bits), step)
            self._bits_step[name] = step

    def _on_metrics(self, ctl: Controller, *, stats: Mapping[str, Any], **_: Any) -> None:
        step = max(ctl.step_count - 1, 0)
        for key, value in stats.items():
            v = _number(value)
            if v is None:
                continue
            if key == "loss":
                self._loss.add(v)
                self._epoch_loss.add(v)
            elif isinstance(v, float):
                # Host numbers (validation accuracy, ...) cost nothing to write now, at their own step.
                self.writer.add_scalar(f"stats/{key}", v, step)
                self._seen_stats[key] = value

    def _on_iteration(self, ctl: Controller, *, step: int, **_: Any) -> None:
        if (step + 1) % self.log_every == 0:
            self._write_periodic(ctl, step)
        if self.histograms_every is not None and (step + 1) % self.histograms_every == 0:
            self._write_histograms(ctl, step)

    def _on_epoch(self, ctl: Controller, *, epoch: int, **_: Any) -> None:
        step = max(ctl.step_count - 1, 0)
        if self._last_flush_step != step:
            self._write_periodic(ctl, step)
        ep = self._epoch_loss.read()
        if ep is not None:
            self.writer.add_scalar("loss/epoch_mean", ep["mean"], step)
        self._epoch_loss.reset()
        self.writer.add_scalar("epoch", float(epoch), step)
        self._write_report(ctl, step)
        self.writer.flush()

    def _on_fit_completed(self, ctl: Controller, **_: Any) -> None:
        self._finish(ctl, failed=None)

    def _on_exception(self, ctl: Controller, *, exception: BaseException | None = None, **_: Any) -> None:
        # The user's exception is what matters: a logging failure here must not replace it.
        try:
            self._finish(ctl, failed=exception)
        except Exception as exc:  # pragma: no cover - depends on the filesystem failing
            warnings.warn(f"adaprec.tensorboard: could not finish the log in {self.logdir}: {exc}",
                          stacklevel=2)

    # --- writers --------------------------------------------------------------------------------
    def _write_periodic(self, ctl: Controller, step: int) -> None:
        self._last_flush_step = step
        w = self._loss.read()
        if w is not None:
            for k, v in w.items():
                self.writer.add_scalar(f"loss/{k}", v, step)
        self._loss.reset()
        for key, value in ctl.stats.items():
            if key == "loss" or self._seen_stats.get(key) is value:
                continue
            v = _number(value)
            if v is not None:
                self.writer.add_scalar(f"stats/{key}", float(v), step)
                self._seen_stats[key] = value
        signals = getattr(ctl.policy, "signals", None)
        if callable(signals):
            for key, value in (signals() or {}).items():
                v = _number(value)
                if v is not None:
                    self.writer.add_scalar(f"policy/{key}", float(v), step)
        if ctl.optimizer is not None:
            for i, group in enumerate(ctl.optimizer.param_groups):
                lr = _number(group.get("lr"))
                if lr is not None:
                    self.writer.add_scalar(f"lr/group{i}", float(lr), step)
        if ctl.cost is not None and ctl.cost.steps:
            s = ctl.cost.summary()
            for key in COST_TAGS:
                self.writer.add_scalar(f"cost/{key}", float(s[key]), step)

    def _write_report(self, ctl: Controller, step: int) -> dict[str, Any]:
        report = ctl.report()
        if step != self._last_report_step:
            self._last_report_step = step
            for key, value in report.items():
                if key in _REPORT_SKIP:
                    continue
                # One level of dicts: modelled time per hardware, GBitOPs per layer, time at precision.
                items = value.items() if isinstance(value, Mapping) else [(None, value)]
                for sub, v in items:
                    if isinstance(v, numbers.Real) and not isinstance(v, bool):
                        tag = f"report/{key}" if sub is None else f"report/{key}/{sub}"
                        self.writer.add_scalar(tag, float(v), step)
        return report

    def _write_histograms(self, ctl: Controller, step: int) -> None:
        for name in ctl.layer_names:
            module = ctl.model.get_submodule(name)
            for pname, p in module.named_parameters(recurse=False):
                self.writer.add_histogram(f"weights/{name}/{pname}", p.detach(), step)
                if p.grad is not None:
                    self.writer.add_histogram(f"grads/{name}/{pname}", p.grad.detach(), step)

    def _write_layout(self, names: list[str]) -> None:
        if not hasattr(self.writer, "add_custom_scalars"):
            return
        # Multiline charts take regular expressions: one chart per role holds every layer's series.
        charts = {f"{role} bits (all layers)": ["Multiline", [rf"^bits/.*/{role}$"]] for role in ROLES}
        self.writer.add_custom_scalars({
            "adaprec precision": charts,
            "adaprec training": {
                "loss (mean, min, max)": ["Margin", ["loss/mean", "loss/min", "loss/max"]],
                "cumulative GBitOPs": ["Multiline", ["^cost/gbitops$"]],
                "savings vs FP32": ["Multiline", ["^cost/savings_vs_fp32$"]],
                f"savings vs static {self._reference} (same constraints)":
                    ["Multiline", ["^cost/savings_vs_reference$"]],
                f"savings vs ideal {self._reference} formula (constraints ignored)":
                    ["Multiline", ["^cost/savings_vs_reference_ideal$"]],
            },
        })

    def _finish(self, ctl: Controller, failed: BaseException | None) -> None:
        if self._closed:
            return
        step = max(ctl.step_count - 1, 0)
        try:
            if ctl.step_count > 0:
                if self._last_flush_step != step:
                    self._write_periodic(ctl, step)
                # Extend every layer's bit series to the last step so charts show the whole run.
                last = {n: p for n, p in ctl.current.items() if self._bits_step.get(n, -1) < step}
                if last:
                    self._write_bits(last, step)
            report = self._write_report(ctl, step)
            if hasattr(self.writer, "add_text"):
                self.writer.add_text("report", _report_markdown(report, failed), step)
            self._write_hparams(ctl, report, step, failed)
        finally:
            # Whatever failed above, what was written so far reaches the disk.
            self.detach()
            self.close()

    def _write_hparams(self, ctl: Controller, report: Mapping[str, Any], step: int,
                       failed: BaseException | None) -> None:
        file_writer = getattr(self.writer, "_get_file_writer", None)
        if file_writer is None:  # not torch's SummaryWriter: no hparams tab
            return
        from torch.utils.tensorboard.summary import hparams as hparams_summary

        hp = _run_hparams(ctl)
        hp.update(self.hparams)
        hp = {k: _hparam_value(v) for k, v in hp.items()}
        metrics: dict[str, float] = {}
        for key in COST_TAGS:
            if isinstance(report.get(key), numbers.Real):
                metrics[f"hparam/{key}"] = float(report[key])
        for key, value in ctl.stats.items():
            v = _number(value)
            if v is not None:
                metrics[f"hparam/{key}"] = float(v)
        exp, ssi, sei = hparams_summary(hp, metrics)
        if failed is not None:
            sei = _session_end_failed()
        fw = file_writer()
        for summary in (exp, ssi, sei):
            fw.add_summary(summary, step)
        for k, v in metrics.items():
            if math.isfinite(v):
                self.writer.add_scalar(k, v, step)


# Report entries that other tags already carry (cost/..., stats/... for "observed") or that are plain
# counters.
_REPORT_SKIP = frozenset({"steps", "epochs", "layers", "observed", *COST_TAGS})


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _run_hparams(ctl: Controller) -> dict[str, Any]:
    hp: dict[str, Any] = {"policy": getattr(ctl.policy, "name", type(ctl.policy).__name__)}
    try:
        config = ctl.policy.config()
    except Exception:  # a third-party policy without a usable config() still gets logged
        config = {}
    for k, v in config.items():
        hp[f"policy.{k}"] = v
    if ctl.optimizer is not None:
        hp["optimizer"] = type(ctl.optimizer).__name__
        group = ctl.optimizer.param_groups[0]
        for k in ("lr", "momentum", "weight_decay"):
            if isinstance(group.get(k), numbers.Real):
                hp[f"optimizer.{k}"] = float(group[k])
    if ctl.total_steps is not None:
        hp["total_steps"] = ctl.total_steps
    hp["layers"] = len(ctl.layer_names)
    return hp


def _hparam_value(v: Any) -> Any:
    """TensorBoard's hparams accept bool, int, float and str; anything else is written as its text."""
    if isinstance(v, bool | str):
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    return str(v)


def _session_end_failed() -> Any:
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams.api_pb2 import Status
    from tensorboard.plugins.hparams.metadata import PLUGIN_DATA_VERSION, PLUGIN_NAME, SESSION_END_INFO_TAG
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData, SessionEndInfo

    content = HParamsPluginData(session_end_info=SessionEndInfo(status=Status.Value("STATUS_FAILURE")),
                                version=PLUGIN_DATA_VERSION)
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME,
                                                                  content=content.SerializeToString()))
    return Summary(value=[Summary.Value(tag=SESSION_END_INFO_TAG, metadata=meta)])


_MD_ESCAPE = re.compile(r"([|\\`*_])")


def _md(v: Any) -> str:
    # Table cells: escape the characters Markdown would read as table or emphasis syntax.
    return _MD_ESCAPE.sub(r"\\\1", str(v))


def _report_markdown(report: Mapping[str, Any], failed: BaseException | None) -> str:
    rows = ["| key | value |", "|---|---|"]
    for k, v in report.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}: {b:.4g}" if isinstance(b, float) else f"{a}: {b}" for a, b in v.items())
        elif isinstance(v, float):
            v = f"{v:.6g}"
        rows.append(f"| {_md(k)} | {_md(v)} |")
    if failed is not None:
        rows.insert(0, f"**run ended by {type(failed).__name__}: {failed}**\n")
    return "\n".join(rows)
