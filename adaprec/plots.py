"""PNG plots of runs logged by :class:`adaprec.tensorboard.Logger` (used by ``adaprec report``).

One run: the precision timeline of every layer (weight and gradient bits as heat maps, layers by steps),
the training loss, and the cumulative GBitOPs next to what FP32 and the static reference would have cost.
Several runs: the final metric (accuracy by default) against GBitOPs, the loss curves, the cumulative
GBitOPs and the mean weight bits over the layers. Everything is read back from the event files with
TensorBoard's own reader and drawn with matplotlib's object-oriented ``Figure`` API, which needs no
display and leaves the global backend (e.g. a notebook's) alone.

Example:
    >>> import tempfile, os
    >>> from torch.utils.tensorboard import SummaryWriter
    >>> from adaprec.plots import plot_runs
    >>> d = tempfile.mkdtemp()
    >>> with SummaryWriter(d) as w:
    ...     for s, b in [(0, 4), (9, 4), (10, 8), (19, 8)]:
    ...         w.add_scalar("bits/fc/weight", b, s); w.add_scalar("bits/fc/gradient", 8, s)
    ...     w.add_scalar("cost/gbitops", 1.5, 19); w.add_scalar("loss/mean", 0.3, 19)
    >>> out = plot_runs([d], os.path.join(d, "report.png"))
    >>> os.path.getsize(out) > 0
    True
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .tensorboard import read_scalars

__all__ = ["find_runs", "plot_run", "plot_runs", "compare_figure", "plot_prt", "final_metric", "layer_bits",
           "METRIC_CANDIDATES"]

Series = list[tuple[int, float]]

#: Scalar tags tried, in order, for the y axis of the accuracy-vs-GBitOPs chart.
METRIC_CANDIDATES = ("hparam/accuracy", "hparam/val_acc", "stats/val_acc", "stats/accuracy",
                     "hparam/val_loss", "stats/val_loss", "hparam/bpc", "stats/bpc")

_MAX_COLUMNS = 800  # heat-map resolution along the steps; long runs are sampled down to this


def _is_run(path: Path) -> bool:
    return any(p.name.startswith("events.out.tfevents") for p in path.iterdir() if p.is_file())


def find_runs(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Run directories among ``paths``: a folder holding event files is a run; a folder without any is
    searched below (so a study or ``runs/`` folder expands to all its runs).

    Example:
        >>> import tempfile
        >>> find_runs([tempfile.mkdtemp()])
        Traceback (most recent call last):
        ...
        FileNotFoundError: no TensorBoard event files under ...
    """
    if not paths:
        raise ValueError("give at least one run directory")
    runs: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"run directory {str(path)!r} does not exist")
        if not path.is_dir():
            raise NotADirectoryError(f"{str(path)!r} is not a directory; give a run directory (the "
                                     "folder that holds events.out.tfevents.* files)")
        if _is_run(path):
            found = [path]
        else:
            found = sorted({f.parent for f in path.rglob("events.out.tfevents*") if f.is_file()})
        if not found:
            raise FileNotFoundError(f"no TensorBoard event files under {str(path)!r}; is it a run "
                                    "directory written by adaprec (Controller(logdir=...) or adaprec train)?")
        runs += [f for f in found if f not in runs]
    return runs


def layer_bits(scalars: dict[str, Series], role: str = "weight") -> dict[str, Series]:
    """The ``bits/<layer>/<role>`` series of one run, by layer name, in the order the layers appear.

    Example:
        >>> layer_bits({"bits/a/weight": [(0, 4.0)], "bits/a/gradient": [(0, 8.0)], "loss/mean": []})
        {'a': [(0, 4.0)]}
    """
    suffix = f"/{role}"
    return {tag[len("bits/"):-len(suffix)]: series for tag, series in scalars.items()
            if tag.startswith("bits/") and tag.endswith(suffix)}


def final_metric(scalars: dict[str, Series], metric: str | None = None) -> tuple[str, float] | None:
    """``(tag, last value)`` of the run's final metric: ``metric`` if given (a tag, or a key looked up as
    ``hparam/<key>`` then ``stats/<key>``), else the first of :data:`METRIC_CANDIDATES` present."""
    if metric is not None:
        for tag in (metric, f"hparam/{metric}", f"stats/{metric}"):
            if scalars.get(tag):
                return tag, scalars[tag][-1][1]
        return None
    for tag in METRIC_CANDIDATES:
        if scalars.get(tag):
            return tag, scalars[tag][-1][1]
    return None


def _step_matrix(series: dict[str, Series], last_step: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample every layer's step function at (at most ``_MAX_COLUMNS``) steps ``0..last_step``."""
    steps = np.unique(np.linspace(0, max(last_step, 0), num=min(last_step + 1, _MAX_COLUMNS)).astype(int))
    rows = []
    for pts in series.values():
        s = np.array([p[0] for p in pts])
        v = np.array([p[1] for p in pts])
        idx = np.clip(np.searchsorted(s, steps, side="right") - 1, 0, len(s) - 1)
        rows.append(v[idx])
    return steps, np.vstack(rows)


def _last_step(scalars: dict[str, Series]) -> int:
    return max((pts[-1][0] for pts in scalars.values() if pts), default=0)


def _figure(rows: int, cols: int, size: tuple[float, float]):
    # matplotlib's object-oriented API: no pyplot, so the global backend (a notebook's, say) is never
    # switched and no figure is left registered anywhere; saving a PNG needs no display.
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes.ravel()


def _save(fig, out: str | os.PathLike[str]) -> Path:
    path = Path(out)
    if path.suffix.lower() != ".png":
        raise ValueError(f"the output must be a .png file, got {str(path)!r}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {str(path.parent)!r} does not exist")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    return path


def _heatmap(ax, fig, series: dict[str, Series], last: int, title: str, lo: float, hi: float) -> None:
    if not series:
        ax.text(0.5, 0.5, "no bits logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        return
    steps, mat = _step_matrix(series, last)
    im = ax.imshow(mat, aspect="auto", interpolation="nearest", cmap="viridis",
                   extent=(steps[0] - 0.5, steps[-1] + 0.5, len(series) - 0.5, -0.5),
                   vmin=lo, vmax=max(hi, lo + 1))
    names = list(series)
    # Deep models have many layers: label at most ~20 rows so the names stay readable.
    stride = max(1, len(names) // 20)
    ax.set_yticks(range(0, len(names), stride))
    ax.set_yticklabels(names[::stride], fontsize=7)
    ax.set_xlabel("step")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="bits")


def _loss(ax, scalars: dict[str, Series], label: str | None = None, band: bool = True) -> bool:
    mean = scalars.get("loss/mean")
    if not mean:
        return False
    s = [p[0] for p in mean]
    line, = ax.plot(s, [p[1] for p in mean], label=label)
    lo, hi = scalars.get("loss/min"), scalars.get("loss/max")
    if band and lo and hi and len(lo) == len(mean) == len(hi):
        ax.fill_between(s, [p[1] for p in lo], [p[1] for p in hi], alpha=0.25, color=line.get_color(),
                        label="min–max over the logging window")
    return True


def plot_run(run_dir: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """One run's report: weight- and gradient-bit timelines per layer, loss, cumulative GBitOPs.

    Returns the path of the PNG written.
    """
    run = find_runs([run_dir])
    if len(run) != 1:
        raise ValueError(f"{str(run_dir)!r} holds {len(run)} runs; use plot_runs for several")
    scalars = read_scalars(run[0])
    last = _last_step(scalars)
    fig, ax = _figure(2, 2, (11, 7))
    fig.suptitle(f"adaprec run: {run[0].name}")
    weights, grads = layer_bits(scalars, "weight"), layer_bits(scalars, "gradient")
    # One colour scale for both maps, so equal colours mean equal bits.
    values = [v for series in (*weights.values(), *grads.values()) for _, v in series]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    _heatmap(ax[0], fig, weights, last, "weight bits per layer", lo, hi)
    _heatmap(ax[1], fig, grads, last, "gradient bits per layer", lo, hi)
    if _loss(ax[2], scalars, label="loss (window mean)"):
        ax[2].legend(fontsize=8, loc="center right")
    else:
        ax[2].text(0.5, 0.5, "no loss observed", ha="center", va="center", transform=ax[2].transAxes)
    metric = final_metric(scalars)
    curve = None if metric is None else scalars.get("stats/" + metric[0].split("/", 1)[1])
    if curve:
        # The validation metric over the run, on its own axis next to the loss.
        twin = ax[2].twinx()
        twin.plot([p[0] for p in curve], [p[1] for p in curve], "o-", color="tab:green")
        twin.set_ylabel(metric[0].split("/", 1)[1], color="tab:green")
    ax[2].set_xlabel("step")
    ax[2].set_title("training loss")
    _cost(ax[3], scalars)
    return _save(fig, out)


def _cost(ax, scalars: dict[str, Series]) -> None:
    g = scalars.get("cost/gbitops")
    ax.set_title("cumulative GBitOPs")
    ax.set_xlabel("step")
    if not g:
        ax.text(0.5, 0.5, "no cost logged", ha="center", va="center", transform=ax.transAxes)
        return
    s = np.array([p[0] for p in g])
    v = np.array([p[1] for p in g])
    ax.plot(s, v, label="this run")
    # What the same MACs would have cost at FP32 / the static reference, from the logged savings.
    for tag, label, style in (("cost/savings_vs_fp32", "FP32", "--"),
                              ("cost/savings_vs_reference", "static reference", ":")):
        sv = scalars.get(tag)
        if sv and len(sv) == len(g):
            frac = 1 - np.array([p[1] for p in sv])
            ok = frac > 0
            ax.plot(s[ok], v[ok] / frac[ok], style, label=label)
    ax.set_ylabel("GBitOPs (log scale)")
    # FP32 costs ~10-30x more than low precision: on a linear axis the low-precision lines merge.
    ax.set_yscale("log")
    sv = scalars.get("cost/savings_vs_fp32")
    ref = scalars.get("cost/savings_vs_reference")
    if sv and ref:
        ax.set_title(f"cumulative GBitOPs ({-100 * sv[-1][1]:+.0f} % vs FP32, "
                     f"{-100 * ref[-1][1]:+.0f} % vs static)")
    ax.legend(fontsize=8)


def _run_labels(runs: list[Path]) -> list[str]:
    if len(runs) == 1:
        return [runs[0].name]
    common = Path(os.path.commonpath([str(r.resolve()) for r in runs]))
    return [str(r.resolve().relative_to(common)) or r.name for r in runs]


def _metric_name(tag: str) -> str:
    return tag.split("/", 1)[-1]


def plot_runs(run_dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str],
              metric: str | None = None) -> Path:
    """A report of the runs under ``run_dirs``: one run gets :func:`plot_run`'s figure; several get the
    final ``metric`` (default: each run's own, see :data:`METRIC_CANDIDATES`) against total GBitOPs, the
    loss curves, the cumulative GBitOPs and the mean weight bits over layers. Returns the PNG's path.

    Runs whose final metrics differ (say accuracy for a classifier and val_loss for a language model)
    never share an axis: each metric gets its own "<metric> vs cost" panel with only its runs.

    Example:
        >>> import tempfile, os
        >>> from torch.utils.tensorboard import SummaryWriter
        >>> d = tempfile.mkdtemp()
        >>> for name, tag, value in [("a", "stats/val_acc", 0.9), ("b", "stats/val_loss", 1.2)]:
        ...     with SummaryWriter(os.path.join(d, name)) as w:
        ...         w.add_scalar(tag, value, 9); w.add_scalar("cost/gbitops", 2.0, 9)
        >>> os.path.getsize(plot_runs([d], os.path.join(d, "compare.png"))) > 0
        True
    """
    runs = find_runs(run_dirs)
    if len(runs) == 1 and metric is None:
        return plot_run(runs[0], out)
    return _save(compare_figure(runs, metric), out)


def compare_figure(runs: Sequence[Path], metric: str | None = None) -> Any:
    """The matplotlib ``Figure`` :func:`plot_runs` saves for several runs (to draw it elsewhere)."""
    runs = list(runs)
    data = [read_scalars(r) for r in runs]
    labels = _run_labels(runs)
    # Final metric vs cost, grouped by metric so that different quantities never share an axis.
    groups: dict[str, list[tuple[str, float, float]]] = {}
    for label, scalars in zip(labels, data):
        m = final_metric(scalars, metric)
        g = scalars.get("cost/gbitops")
        if m is not None and g:
            groups.setdefault(_metric_name(m[0]), []).append((label, g[-1][1], m[1]))
    if not groups:
        want = metric or " / ".join(METRIC_CANDIDATES[:4])
        raise ValueError(f"none of the runs logged both cost/gbitops and a final metric ({want}); "
                         "observe one with ctl.observe(val_acc=...) or pick another with --metric")
    n_panels = len(groups) + 3
    rows = (n_panels + 1) // 2
    fig, ax = _figure(rows, 2, (11, 3.75 * rows))
    fig.suptitle(f"adaprec: {len(runs)} runs")
    from matplotlib.ticker import NullFormatter

    for a, (name, pts) in zip(ax, groups.items()):
        for label, x, y in pts:
            a.scatter(x, y)
            a.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        a.set_xscale("log")  # FP32 runs cost 10-30x more than low-precision ones
        a.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on a short log range
        a.set_xlabel("training GBitOPs (log scale)")
        a.set_ylabel(name)
        a.set_title(f"{name} vs cost ({len(pts)} run{'s' if len(pts) != 1 else ''})")
    loss_ax, cost_ax, bits_ax = ax[len(groups):len(groups) + 3]
    for a in ax[len(groups) + 3:]:
        a.set_visible(False)  # an odd number of panels leaves one cell empty
    for label, scalars in zip(labels, data):
        _loss(loss_ax, scalars, label=label, band=False)
        g = scalars.get("cost/gbitops")
        if g:
            cost_ax.plot([p[0] for p in g], [p[1] for p in g], label=label)
        weights = layer_bits(scalars, "weight")
        if weights:
            steps, mat = _step_matrix(weights, _last_step(scalars))
            bits_ax.step(steps, mat.mean(axis=0), where="post", label=label)
    for a, title, ylab in ((loss_ax, "training loss (window mean)", "loss"),
                           (cost_ax, "cumulative GBitOPs", "GBitOPs (log scale)"),
                           (bits_ax, "mean weight bits over layers", "bits")):
        a.set_title(title)
        a.set_xlabel("step")
        if a is cost_ax and a.get_lines():
            a.set_yscale("log")
        a.set_ylabel(ylab)
        if a.get_legend_handles_labels()[0] and len(runs) <= 12:
            a.legend(fontsize=7)
    return fig


def plot_prt(result: Any, out: str | os.PathLike[str]) -> Path:
    """Draw a precision range test (:class:`adaprec.prt.PRTResult`): the watched metric per iteration
    over the forward bits, and each level's progress against the threshold. Returns the PNG's path.

    Example:
        >>> import tempfile, os
        >>> from adaprec.prt import RangeTest
        >>> rt = RangeTest(start_bits=2, max_bits=3, steps_per_bits=2, window=1, threshold=0.1)
        >>> for acc in [0.1, 0.1, 0.1, 0.5]:
        ...     _ = rt.record(acc)
        >>> out = plot_prt(rt.result("acc"), os.path.join(tempfile.mkdtemp(), "prt.png"))
        >>> os.path.getsize(out) > 0
        True
    """
    if not hasattr(result, "levels") or not hasattr(result, "values"):
        raise TypeError(f"plot_prt needs an adaprec.prt.PRTResult, got {type(result).__name__}")
    fig, ax = _figure(1, 2, (11, 4))
    fig.suptitle(f"precision range test: B_min = {result.b_min}, B_max = {result.b_max}"
                 + ("" if result.found else " (no level passed)"))
    it = np.arange(len(result.values))
    vals = np.array([v for _, v in result.values], dtype=float)
    bits = np.array([b for b, _ in result.values], dtype=float)
    ax[0].plot(it, vals, ".-", label=result.metric)
    ax[0].set_xlabel("test iteration")
    ax[0].set_ylabel(result.metric)
    twin = ax[0].twinx()
    twin.step(it, bits, where="post", color="tab:gray", alpha=0.6)
    twin.set_ylabel("forward bits", color="tab:gray")
    ax[0].set_title(f"{result.metric} during the test")
    lv_bits = [lv.bits for lv in result.levels]
    colours = ["tab:green" if lv.passed else "tab:red" for lv in result.levels]
    ax[1].bar(lv_bits, [lv.progress for lv in result.levels], color=colours)
    ax[1].axhline(result.threshold, color="black", linestyle="--", label=f"threshold {result.threshold:g}")
    ax[1].axvline(result.b_min, color="tab:blue", linestyle=":", label=f"B_min = {result.b_min}")
    ax[1].set_xlabel("forward bits")
    ax[1].set_ylabel("progress within the level")
    ax[1].set_title("progress per level (green: passed)")
    ax[1].legend(fontsize=8)
    return _save(fig, out)
