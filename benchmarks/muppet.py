"""MuPPET benchmark: FP32 vs MuPPET (global, per layer) vs static 8-bit fixed point, digits CNN and char LM.

For each task and seed it trains four runs with :func:`adaprec.tasks.train` and records the final
accuracy / perplexity, MuPPET's switch epochs and epochs per level, GBitOPs, and the modelled speedup on
a T4 and an H100 (:mod:`adaprec.timemodel`). It writes ``benchmarks/results/muppet.json``, ``muppet.md``
and ``muppet.png`` (diversity, threshold and level over epochs for seed 0).

Scale. MuPPET keeps a level for at least 9 epochs (``resolution=3, patience=2``), so it needs many
epochs; the runs use the paper's constants unchanged and make the *epochs* small instead: a digits
epoch is 8 random minibatches of 32 images (about a fifth of the training set), a char-LM epoch 5
minibatches of 32 windows of 32 characters. Learning rates are constant (the paper keeps the rate
constant in fixed point). Evaluation runs at the precision in force (fixed point with stochastic
rounding during MuPPET's fixed-point levels).

Usage::

    python benchmarks/muppet.py                 # full: 2 tasks x 4 policies x 3 seeds
    python benchmarks/muppet.py --quick         # 1 seed, fewer epochs (a smoke test, not a result)
    python benchmarks/muppet.py --jobs 4        # runs in parallel processes (1 torch thread each)

Example:
    >>> levels_by_epoch([{"epoch": 2, "unit": "*"}], 5)
    [0, 0, 0, 1, 1]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS_DIR, command_line, write_results  # noqa: E402

import adaprec  # noqa: E402
from adaprec.formats import Precision  # noqa: E402
from adaprec.policies import Fixed, MuPPET  # noqa: E402
from adaprec.tasks import CharLMTask, DigitsTask, train  # noqa: E402
from adaprec.timemodel import attach_time_model, relative_speed  # noqa: E402

POLICIES = ("fp32", "fx8", "muppet", "muppet_layer")
LABELS = {"fp32": "FP32", "fx8": "static fx8", "muppet": "MuPPET", "muppet_layer": "MuPPET per layer"}


class SampledBatches:
    """``k`` minibatches drawn with replacement per pass: a small "epoch" of a larger training set.

    Example:
        >>> b = SampledBatches((torch.arange(10.0),), batch_size=4, batches=3, seed=0)
        >>> len(b), [t[0].shape[0] for t in b]
        (3, [4, 4, 4])
    """

    def __init__(self, tensors: tuple[torch.Tensor, ...], batch_size: int, batches: int, seed: int) -> None:
        self.tensors, self.batch_size, self.batches = tensors, batch_size, batches
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        n = self.tensors[0].shape[0]
        for _ in range(self.batches):
            idx = torch.randint(0, n, (self.batch_size,), generator=self.generator)
            yield tuple(t[idx] for t in self.tensors)


class SmallEpochDigits(DigitsTask):
    """The digits task with short epochs of ``batches_per_epoch`` random minibatches."""

    def __init__(self, batches_per_epoch: int = 8, **kw: Any) -> None:
        super().__init__(**kw)
        self.batches_per_epoch = batches_per_epoch

    def train_batches(self, batch_size: int, seed: int = 0) -> SampledBatches:
        return SampledBatches((self.x_train, self.y_train), batch_size, self.batches_per_epoch, seed)


def task_setup(name: str, quick: bool) -> tuple[Any, dict[str, Any]]:
    """The task object and the ``train`` arguments of one benchmark task."""
    if name == "digits":
        return SmallEpochDigits(batches_per_epoch=8), dict(
            epochs=30 if quick else 60, batch_size=32, lr=0.05, optimizer="sgd", lr_schedule="constant")
    if name == "charlm":
        task = CharLMTask(max_chars=200_000, seq_len=32, batches_per_epoch=5, max_eval_chars=4_000,
                          hidden_size=64)
        return task, dict(epochs=30 if quick else 60, batch_size=32, lr=3e-3, optimizer="adam",
                          lr_schedule="constant")
    raise ValueError(f"unknown benchmark task {name!r}; use 'digits' or 'charlm'")


def make(policy: str) -> Any:
    if policy == "fp32":
        return "fp32"
    if policy == "fx8":
        return Fixed(bits="fx8")
    if policy == "muppet":
        return MuPPET()
    if policy == "muppet_layer":
        return MuPPET(per_layer=True)
    raise ValueError(f"unknown benchmark policy {policy!r}; use one of {POLICIES}")


def levels_by_epoch(switches: list[dict[str, Any]], epochs: int, unit: str = "*") -> list[int]:
    """The ladder level in force during each epoch (a switch at the end of epoch j applies from j+1)."""
    ends = sorted(s["epoch"] for s in switches if s["unit"] == unit)
    return [sum(1 for j in ends if j < e) for e in range(epochs)]


def run_one(task_name: str, policy: str, seed: int, quick: bool) -> dict[str, Any]:
    """One training run; returns JSON-able numbers (also in a worker process)."""
    torch.set_num_threads(1)
    task, kw = task_setup(task_name, quick)
    pol = make(policy)
    t0 = time.perf_counter()
    res = train(task, pol, seed=seed, on_start=lambda ctl: attach_time_model(ctl), **kw)
    wall = time.perf_counter() - t0
    rep = res.report
    out: dict[str, Any] = {
        "task": task_name, "policy": policy, "seed": seed, "epochs": kw["epochs"],
        "metric": res.primary_metric, "final": res.primary, "metrics": dict(res.metrics),
        "gbitops": rep["gbitops"], "gbitops_fp32": rep["gbitops_fp32"],
        "savings_vs_fp32": rep["savings_vs_fp32"],
        "speedup_t4": rep["modelled_speedup_vs_fp32"]["t4"],
        "speedup_h100": rep["modelled_speedup_vs_fp32"]["h100"],
        "time_at_precision": dict(rep["time_at_precision"]), "wall_s": wall,
        "curve": [m[res.primary_metric] for m in res.epoch_metrics],
    }
    if task_name == "charlm":
        out["perplexity"] = res.metrics["perplexity"]
    if isinstance(pol, MuPPET):
        names = pol.levels_short()
        out["levels"] = names
        out["switches"] = pol.switches
        out["trace"] = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in t.items()}
                        for t in pol.trace]
        units = list(pol.ladders)
        by_unit = {u: levels_by_epoch(pol.switches, kw["epochs"], u) for u in units}
        out["levels_by_epoch"] = by_unit
        out["switch_epochs"] = {u: pol.switch_epochs(u) for u in units}
        # Epochs at each level; per layer: layer-epochs (one layer for one epoch) at each level.
        counts = {n: 0 for n in names}
        for lv in by_unit.values():
            for x in lv:
                counts[names[x]] += 1
        out["epochs_per_level"] = {k: v / len(units) for k, v in counts.items()}
        fixed = sum(v for k, v in counts.items() if k.startswith("fx")) / len(units)
        out["fixed_point_epoch_share"] = fixed / kw["epochs"]
    return out


def tail_speedup(speedup: float, epochs: int, extra: int | None = None) -> float:
    """The modelled speedup had the run gone on at FP32 for ``extra`` (default: ``epochs``) more epochs.

    Every epoch has the same MACs in this benchmark, so a run's modelled time is ``epochs / speedup``
    FP32-epochs; MuPPET's published schedules spend a long final phase at FP32, which this estimates.

    Example:
        >>> tail_speedup(4.0, 60)
        1.6
    """
    extra = epochs if extra is None else extra
    return (epochs + extra) / (epochs / speedup + extra)


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean/std over seeds per task and policy, and the goal checks of the issue."""
    out: dict[str, Any] = {}
    for task in sorted({r["task"] for r in runs}):
        t: dict[str, Any] = {}
        for pol in POLICIES:
            rs = [r for r in runs if r["task"] == task and r["policy"] == pol]
            if not rs:
                continue
            key = "perplexity" if task == "charlm" else "final"
            vals = [r[key] for r in rs]
            s: dict[str, Any] = {
                "n": len(rs), "metric": "perplexity" if task == "charlm" else rs[0]["metric"],
                "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "gbitops": statistics.fmean(r["gbitops"] for r in rs),
                "speedup_t4": statistics.fmean(r["speedup_t4"] for r in rs),
                "speedup_h100": statistics.fmean(r["speedup_h100"] for r in rs),
                "wall_s": statistics.fmean(r["wall_s"] for r in rs),
            }
            if "switch_epochs" in rs[0]:
                s["switch_epochs"] = [r["switch_epochs"] for r in rs]
                s["speedup_t4_fp32_tail"] = statistics.fmean(tail_speedup(r["speedup_t4"], r["epochs"])
                                                             for r in rs)
                s["speedup_h100_fp32_tail"] = statistics.fmean(tail_speedup(r["speedup_h100"], r["epochs"])
                                                               for r in rs)
                s["fixed_point_epoch_share"] = statistics.fmean(r["fixed_point_epoch_share"] for r in rs)
                lv = rs[0]["levels"]
                s["epochs_per_level"] = {n: statistics.fmean(r["epochs_per_level"][n] for r in rs)
                                         for n in lv}
            t[pol] = s
        fp = t.get("fp32")
        for pol in ("muppet", "muppet_layer"):
            if fp is None or pol not in t:
                continue
            m = t[pol]
            if task == "charlm":
                gap = m["mean"] / fp["mean"] - 1.0
                m["goal_quality"] = {"perplexity_gap_rel": gap, "met": gap <= 0.02}
            else:
                gap = (fp["mean"] - m["mean"]) * 100
                m["goal_quality"] = {"accuracy_gap_points": gap, "met": gap <= 0.5}
            m["goal_fixed_point_majority"] = m["fixed_point_epoch_share"] > 0.5
            m["goal_t4_speedup"] = m["speedup_t4"] >= 1.5
        out[task] = t
    return out


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in runs})
    fig, axes = plt.subplots(len(tasks), 2, figsize=(12, 3.6 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        seed = min(r["seed"] for r in runs if r["task"] == task)
        pick = {r["policy"]: r for r in runs if r["task"] == task and r["seed"] == seed}
        glob, lay = pick.get("muppet"), pick.get("muppet_layer")
        ax = axes[row][0]
        if glob is not None:
            tr = [t for t in glob["trace"] if t["diversity"] is not None]
            ax.plot([t["epoch"] for t in tr], [t["diversity"] for t in tr], "o-", label="diversity Δ_j")
            ratio = [t["ratio"] if t["ratio"] is not None else float("nan") for t in tr]
            ax.plot([t["epoch"] for t in tr], ratio, "s--", label="ratio maxGD/Δ_j")
            ax.plot([t["epoch"] for t in tr], [t["threshold"] for t in tr], "k:", label="threshold T(j)")
            for s in glob["switches"]:
                ax.axvline(s["epoch"] + 0.5, color="grey", lw=0.8)
            ax2 = ax.twinx()
            ax2.step(range(glob["epochs"]), glob["levels_by_epoch"]["*"], where="post", color="tab:red",
                     label="level (right axis)")
            viol = [t for t in tr if t["violation"]]
            ax.plot([t["epoch"] for t in viol], [t["ratio"] for t in viol], "rx", ms=9, label="violation")
            ax2.legend(loc="lower right", fontsize=8)
            ax2.set_yticks(range(len(glob["levels"])))
            ax2.set_yticklabels(glob["levels"])
            ax.legend(loc="upper left", fontsize=8)
        ax.set_title(f"{task}: MuPPET (global), seed {seed}")
        ax.set_xlabel("epoch")
        ax = axes[row][1]
        if lay is not None:
            for i, (unit, lv) in enumerate(lay["levels_by_epoch"].items()):
                # A small offset per layer keeps coinciding steps apart.
                ax.step(range(lay["epochs"]), [x + 0.04 * i for x in lv], where="post", label=f"layer {unit}")
            ax.set_yticks(range(len(lay["levels"])))
            ax.set_yticklabels(lay["levels"])
            ax.legend(fontsize=8)
        ax.set_title(f"{task}: MuPPET per layer, seed {seed}: level by layer")
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def notes(summary: dict[str, Any]) -> list[str]:
    """What the numbers do and do not show (computed from the summary where they are numbers)."""
    out = ["## Reading these numbers", ""]
    for task, t in summary.items():
        if "fp32" not in t or "fx8" not in t:
            continue
        fp, fx = t["fp32"], t["fx8"]
        if task == "charlm":
            gap = f"{100 * (fx['mean'] / fp['mean'] - 1):+.2f}% perplexity"
        else:
            gap = f"{100 * (fx['mean'] - fp['mean']):+.2f} accuracy points"
        line = f"- {task}: static fx8 is {gap} vs FP32"
        if "muppet" in t:
            m = t["muppet"]
            line += (f"; MuPPET spends {m['gbitops'] / fx['gbitops']:.1f}× the GBitOPs of static fx8. Had "
                     f"the MuPPET runs continued at FP32 for as many epochs again (the paper's schedules end "
                     f"with a long FP32 phase), the modelled speedup would be "
                     f"{m['speedup_t4_fp32_tail']:.2f}× on a T4 and {m['speedup_h100_fp32_tail']:.2f}× on "
                     "an H100 (paper: 1.58× mean, up to 1.84×, Turing)")
        out.append(line + ".")
    missed = [f"{LABELS[p]} on {task}" for task, t in summary.items() for p, m in t.items()
              if "goal_quality" in m and not m["goal_quality"]["met"]]
    met = "the quality goal (mean over seeds) is met by both MuPPET variants" if not missed else \
        "the quality goal is missed by " + ", ".join(missed)
    # Lengths of the levels that started after epoch 30, over all global runs.
    late = [b - a for m in summary.values() if "muppet" in m for seeds in m["muppet"]["switch_epochs"]
            for a, b in zip(seeds["*"], seeds["*"][1:]) if a >= 30]
    span = f"{min(late)}–{max(late)} epochs" if late else "n/a (no two switches after epoch 30)"
    out += [
        "- Static 8-bit fixed point is about as good as FP32 on these small models, so the benchmark cannot "
        f"show an accuracy benefit of climbing the ladder; {met}.",
        "- The runs stop shortly after MuPPET reaches FP32 (about 60 small epochs), so the speedups above "
        "mostly measure the share of fixed-point epochs; the FP32-tail figures are the fairer comparison "
        "with the paper.",
        "- Δ_j over 3 gradients is noisy and T(j) falls to α = 1 after about 30 epochs, so from then on "
        "almost any decrease of Δ_j counts as a violation: levels begun after epoch 30 lasted "
        f"{span} (minimum 9). Switch epochs vary by seed for the same reason.",
        "- Evaluation runs at the precision in force (stochastic-rounding fixed point during fixed-point "
        "levels); per-layer rows count layer-epochs for the fixed-point share and epochs per level.",
        "",
    ]
    return out


def markdown(summary: dict[str, Any], runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "MuPPET (resolution 3, patience 2, α 1, β 1.5, λ 0.1; ladder fx8 → fx12 → fx14 → fx16 → FP32) "
        "against FP32 and static 8-bit dynamic fixed point. Small epochs (digits: 8 minibatches of 32; "
        "char LM: 5 minibatches of 32 × 32 characters), constant learning rate, "
        f"{len({r['seed'] for r in runs})} seed(s). Speedups are *modelled* (adaprec.timemodel: quantized "
        "products at vendor peak on the fastest exact hardware path; nothing else timed). Modelled speed of "
        "one step vs FP32: " + ", ".join(
            f"{n} {relative_speed(Precision.fixed_point(b), 't4'):.1f}× T4 / "
            f"{relative_speed(Precision.fixed_point(b), 'h100'):.1f}× H100"
            for n, b in (("fx8", 8), ("fx12", 12), ("fx16", 16))) + ".",
        "",
    ]
    for task, t in summary.items():
        metric = next(iter(t.values()))["metric"]
        better = "lower is better" if task == "charlm" else "higher is better"
        lines += [f"## {task}", "",
                  f"| policy | {metric} (mean ± std, {better}) | GBitOPs | T4 speedup | H100 speedup | "
                  "fixed-point epochs | switch epochs (per seed) | wall s |",
                  "|---|---|---|---|---|---|---|---|"]
        for pol, s in t.items():
            scale = 100 if metric == "accuracy" else 1
            unit = " %" if metric == "accuracy" else ""
            sw = ""
            share = ""
            if "switch_epochs" in s:
                share = f"{100 * s['fixed_point_epoch_share']:.0f}%"
                if pol == "muppet":
                    sw = "; ".join(",".join(map(str, x["*"])) or "none" for x in s["switch_epochs"])
                else:
                    sw = "; ".join(" ".join(f"{u}:{','.join(map(str, e)) or '-'}" for u, e in x.items())
                                   for x in s["switch_epochs"])
            elif pol == "fx8":
                share = "100%"
            else:
                share = "0%"
            lines.append(f"| {LABELS[pol]} | {s['mean'] * scale:.2f} ± {s['std'] * scale:.2f}{unit} | "
                         f"{s['gbitops']:.1f} | {s['speedup_t4']:.2f}× | {s['speedup_h100']:.2f}× | "
                         f"{share} | {sw} | {s['wall_s']:.0f} |")
        lines.append("")
        for pol in ("muppet", "muppet_layer"):
            if pol not in t or "goal_quality" not in t[pol]:
                continue
            s = t[pol]
            g = s["goal_quality"]
            q = (f"perplexity {100 * g['perplexity_gap_rel']:+.2f}% vs FP32 (goal ≤ +2%)" if task == "charlm"
                 else f"accuracy {0.0 - g['accuracy_gap_points']:+.2f} points vs FP32 (goal ≥ −0.5)")
            lv = ", ".join(f"{k} {v:.1f}" for k, v in s["epochs_per_level"].items())
            lines.append(f"- {LABELS[pol]}: {q}: **{'met' if g['met'] else 'missed'}**; fixed point "
                         f"{100 * s['fixed_point_epoch_share']:.0f}% of epochs "
                         f"({'met' if s['goal_fixed_point_majority'] else 'missed'}); T4 speedup "
                         f"{s['speedup_t4']:.2f}× (goal ≥ 1.5×: "
                         f"{'met' if s['goal_t4_speedup'] else 'missed'}). "
                         f"Mean epochs per level: {lv}.")
        lines.append("")
    lines += notes(summary)
    lines += [f"![diversity, threshold and level over epochs]({args.out}.png)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["digits", "charlm"], choices=["digits", "charlm"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--quick", action="store_true", help="1 seed, 30 epochs: a smoke test")
    ap.add_argument("--jobs", type=int, default=1, help="parallel worker processes (1 torch thread each)")
    ap.add_argument("--out", default="muppet", help="result file stem in benchmarks/results/")
    ap.add_argument("--rerender", action="store_true",
                    help="rebuild the summary, Markdown and plot from the runs in <out>.json (no training)")
    args = ap.parse_args(argv)
    if args.rerender:
        return rerender(args)
    if args.quick:
        args.seeds = args.seeds[:1]
    torch.set_num_threads(1)
    jobs = [(t, p, s, args.quick) for t in args.tasks for s in args.seeds for p in POLICIES]
    start = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as ex:
            runs = list(ex.map(run_one, *zip(*jobs)))
    else:
        runs = []
        for j in jobs:
            runs.append(run_one(*j))
            r = runs[-1]
            print(f"{r['task']:7s} {r['policy']:13s} seed {r['seed']}: {r['metric']} {r['final']:.4f} "
                  f"T4 {r['speedup_t4']:.2f}x switches {r.get('switch_epochs', '')} ({r['wall_s']:.0f}s)",
                  flush=True)
    total = time.perf_counter() - start
    summary = summarise(runs)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    plot(runs, RESULTS_DIR / f"{args.out}.png")
    data = {"summary": summary, "runs": runs, "total_wall_s": total, "jobs": args.jobs,
            "adaprec": adaprec.__version__}
    write_results(args.out, data, markdown(summary, runs, args) + f"\nTotal wall time {total:.0f} s "
                  f"({args.jobs} process(es), 1 torch thread each).\n", command_line())
    print(f"wrote {RESULTS_DIR / args.out}.json/.md/.png in {total:.0f} s")
    return 0


def rerender(args: argparse.Namespace) -> int:
    """Recompute the summary and rewrite .md/.png from stored runs (keeps their command and wall time)."""
    import json

    path = RESULTS_DIR / f"{args.out}.json"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist; run the benchmark first")
    payload = json.loads(path.read_text())
    data = payload["data"]
    runs = data["runs"]
    args.jobs = data.get("jobs", 1)
    summary = summarise(runs)
    plot(runs, RESULTS_DIR / f"{args.out}.png")
    data["summary"] = summary
    write_results(args.out, data, markdown(summary, runs, args) + f"\nTotal wall time "
                  f"{data['total_wall_s']:.0f} s ({args.jobs} process(es), 1 torch thread each).\n",
                  payload["command"])
    print(f"rewrote {path.with_suffix('')}.md/.png from {len(runs)} stored runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
