"""CPT on the two real tasks: accuracy / perplexity against training cost, as in the paper's figures.

For the digits CNN (test accuracy) and the character LSTM on ``pydoc_data.topics`` (validation
perplexity), trains FP32, static 8/8, static 6/6, CPT 3-8/8, CPT 3-6/6 and CPT with range-test
bounds (``CPT(bits="auto")``: the test runs on the first iterations of the same run and watches the
training loss), each with the same seeds, epochs, optimizer and learning-rate schedule. Writes
``benchmarks/results/cpt.{json,md,png}`` and ``cpt.schedule.png`` (the precision schedules).

The goal it checks (from the paper): CPT 3-8/8 at about -36.7% BitOPs with accuracy no worse than
static 8/8, read as "the CPT mean is within one standard deviation of the static 8/8 mean, or better"
(std over seeds, of the static runs). The char LM also runs CPT 5-8/8, the paper's setting for its LSTM.

Run: ``python benchmarks/cpt.py`` (about 5-10 minutes on two busy CPU cores);
``python benchmarks/cpt.py --quick`` for a one-seed smoke run that writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from benchmarks.common import RESULTS_DIR, command_line, mean_std, write_results  # noqa: E402

CYCLES = 8  # per run; the paper's 32 cycles would leave periods of ~10 iterations in runs this short

#: Per task: how it is built, trained and scored. Same settings for every policy of a task.
TASKS: dict[str, dict[str, Any]] = {
    "digits": {
        "build": {},
        "train": {"epochs": 8, "batch_size": 32, "lr": 0.05, "optimizer": "sgd", "lr_schedule": "cosine"},
        "metric": "accuracy", "direction": "maximize", "extra": [],
    },
    "charlm": {
        # ~300 KB of text, a 96-unit LSTM over 32-character windows, 250 iterations.
        "build": {"max_chars": 300_000, "seq_len": 32, "hidden_size": 96, "batches_per_epoch": 50,
                  "max_eval_chars": 20_000},
        "train": {"epochs": 5, "batch_size": 32, "lr": 0.004, "optimizer": "adam", "lr_schedule": "cosine"},
        "metric": "perplexity", "direction": "minimize",
        "extra": ["CPT 5-8/8"],  # the paper's choice for its LSTM (PTB)
    },
}

#: label -> (policy kind, arguments); built inside each worker (policies hold per-run state).
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "FP32": ("fp32", {}),
    "static 8/8": ("fixed", {"bits": 8, "grad_bits": 8}),
    "static 6/6": ("fixed", {"bits": 6, "grad_bits": 6}),
    "CPT 3-8/8": ("cpt", {"bits": (3, 8), "grad_bits": 8, "cycles": CYCLES}),
    "CPT 3-6/6": ("cpt", {"bits": (3, 6), "grad_bits": 6, "cycles": CYCLES}),
    "CPT PRT-8/8": ("cpt", {"bits": "auto", "grad_bits": 8, "cycles": CYCLES}),
    "CPT 5-8/8": ("cpt", {"bits": (5, 8), "grad_bits": 8, "cycles": CYCLES}),
}
#: the configurations every task runs (a task's "extra" adds more)
COMMON = ["FP32", "static 8/8", "static 6/6", "CPT 3-8/8", "CPT 3-6/6", "CPT PRT-8/8"]
#: which static run each configuration's savings are measured against
BASELINE = {"FP32": "FP32", "static 8/8": "FP32", "static 6/6": "FP32", "CPT 3-8/8": "static 8/8",
            "CPT 3-6/6": "static 6/6", "CPT PRT-8/8": "static 8/8", "CPT 5-8/8": "static 8/8"}


def _make_policy(kind: str, args: dict[str, Any]) -> Any:
    from adaprec.policies import CPT, Fixed

    if kind == "fp32":
        return "fp32"
    if kind == "fixed":
        return Fixed(**args)
    return CPT(**args)


def _changes(history: list[Any], steps: int) -> list[list[int]]:
    """``[step, forward bits, backward bits]`` at every change of the first quantized layer.

    Only what was in force for a trained iteration: the last entry of a step wins (a range test that
    ends after the next iteration was decided re-decides it), and the decision made for the iteration
    after the last one is left out.
    """
    out: list[list[int]] = []
    for h in history:
        if h.step >= steps:
            continue
        p = next(iter(h.layers.values()))
        row = [h.step, p.weight.bits, p.gradient.bits]
        if out and out[-1][0] == row[0]:
            out.pop()
        if not out or out[-1][1:] != row[1:]:
            out.append(row)
    return out


def run_one(task_name: str, label: str, seed: int, quick: bool = False) -> dict[str, Any]:
    """Train one (task, policy, seed); return the figures (plain Python, so it crosses processes)."""
    torch.set_num_threads(1)  # comparable runs; two-core machine shared with other jobs
    from adaprec.tasks import get_task, train

    spec = TASKS[task_name]
    kwargs = dict(spec["train"])
    if quick:
        kwargs["epochs"] = max(2, kwargs["epochs"] // 3)
    task = get_task(task_name, **spec["build"])
    kind, args = CONFIGS[label]
    if quick and args.get("bits") == "auto":  # the full-length range test does not fit a smoke run
        args = {**args, "prt_steps_per_bits": 6, "prt_window": 2}
    policy = _make_policy(kind, args)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. a range test without a passing level
        # Every quantized layer follows the policy, as in the paper's cost figures: no classifier floor.
        result = train(task, policy, seed=seed, controller_kwargs={"classifier_floor": False}, **kwargs)
    out = {
        "task": task_name, "config": label, "seed": seed, "metrics": dict(result.metrics),
        "primary": result.metrics[spec["metric"]], "gbitops": result.report["gbitops"],
        "gbitops_fp32": result.report["gbitops_fp32"], "steps": result.steps,
        "schedule": _changes(result.history, result.steps), "time_s": time.perf_counter() - t0,
    }
    if kind == "cpt":
        lo, hi = policy.bounds
        out["bounds"] = [lo, hi]
        res = policy.prt_result()
        if res is not None:
            out["prt"] = {"b_min": res.b_min, "found": res.found, "steps": res.steps,
                          "levels": [[lv.bits, round(lv.progress, 4)] for lv in res.levels]}
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean/std per (task, config), savings against the matching static run, and the goal check."""
    summary: dict[str, Any] = {}
    for task_name, spec in TASKS.items():
        rows: dict[str, Any] = {}
        for label in COMMON + spec["extra"]:
            rs = [r for r in runs if r["task"] == task_name and r["config"] == label]
            if not rs:
                continue
            m, s = mean_std([r["primary"] for r in rs])
            g, gs = mean_std([r["gbitops"] for r in rs])
            row = {"metric_mean": m, "metric_std": s, "gbitops_mean": g, "gbitops_std": gs,
                   "savings_vs_fp32": 1 - g / statistics.fmean(r["gbitops_fp32"] for r in rs),
                   "seeds": [r["seed"] for r in rs], "values": [r["primary"] for r in rs]}
            if task_name == "charlm":
                row["bpc_mean"], row["bpc_std"] = mean_std([r["metrics"]["bpc"] for r in rs])
            if "bounds" in rs[0]:
                row["bounds"] = [r["bounds"] for r in rs]
            rows[label] = row
        for label, row in rows.items():
            base = rows.get(BASELINE[label])
            if base is not None:
                row["baseline"] = BASELINE[label]
                row["savings_vs_baseline"] = 1 - row["gbitops_mean"] / base["gbitops_mean"]
        goal = None
        if "CPT 3-8/8" in rows and "static 8/8" in rows:
            c, b = rows["CPT 3-8/8"], rows["static 8/8"]
            sign = 1 if spec["direction"] == "maximize" else -1
            gap = sign * (c["metric_mean"] - b["metric_mean"])  # > 0: CPT better
            goal = {"cpt_minus_static": c["metric_mean"] - b["metric_mean"], "static_std": b["metric_std"],
                    "holds": gap >= -b["metric_std"], "savings": c["savings_vs_baseline"]}
        summary[task_name] = {"metric": spec["metric"], "direction": spec["direction"], "rows": rows,
                              "goal": goal}
    return summary


def _prt_lines(runs: list[dict[str, Any]]) -> list[str]:
    lines = ["## Range test (CPT PRT-8/8)", "",
             "Progress per tested level (relative drop of the windowed training loss within the level; "
             "threshold 0.05):", ""]
    for r in runs:
        if "prt" in r:
            lv = ", ".join(f"{b} bits: {p:+.3f}" for b, p in r["prt"]["levels"])
            lines.append(f"- {r['task']} seed {r['seed']}: B_min = {r['prt']['b_min']} after "
                         f"{r['prt']['steps']} iterations ({lv})")
    return lines + [""]


def _markdown(summary: dict[str, Any], seeds: int, wall: float, runs: list[dict[str, Any]],
              jobs: int = 2) -> str:
    lines = [
        f"Runs on CPU in {jobs} worker processes with one torch thread each (the machine line shows the "
        "parent process).", "",
        f"Each row: mean ± std over {seeds} seeds; same epochs, optimizer and cosine learning-rate schedule "
        f"for every policy of a task; CPT with {CYCLES} cycles per run, evaluation at B_max. Savings are in "
        "BitOPs from adaprec's cost meter (docs/methods.md#bitops), against FP32 and against the static run "
        "with "
        "the same B_max (CPT 3-8/8 and PRT vs static 8/8, CPT 3-6/6 vs static 6/6). `CPT PRT-8/8` is "
        "`CPT(bits='auto')`: the precision range test runs on the first iterations of the same run "
        "(20 iterations per bit-width from 2 bits, training loss, 5% relative drop within a level). "
        "Every quantized layer follows the policy (the controller's classifier floor is switched off, "
        "as in the paper's cost accounting).",
        "",
    ]
    for task_name, t in summary.items():
        spec = TASKS[task_name]
        cfg = ", ".join(f"{k}={v}" for k, v in {**spec["build"], **spec["train"]}.items())
        lines += [f"## {task_name} ({t['metric']}, {'higher' if t['direction'] == 'maximize' else 'lower'} "
                  f"is better)", "", f"Settings: {cfg}.", ""]
        extra = " | val bpc" if task_name == "charlm" else ""
        lines += [f"| policy | {t['metric']}{extra} | GBitOPs | savings vs FP32 | savings vs baseline "
                  "| bounds |",
                  "|---|---|---|---|---|---|" + ("---|" if extra else "")]
        for label, r in t["rows"].items():
            fmt = "{:.4f}" if t["metric"] == "accuracy" else "{:.3f}"
            metric = f"{fmt.format(r['metric_mean'])} ± {fmt.format(r['metric_std'])}"
            bpc = f" | {r['bpc_mean']:.3f} ± {r['bpc_std']:.3f}" if extra else ""
            base = (f"{100 * r['savings_vs_baseline']:.2f}% vs {r['baseline']}"
                    if r.get("baseline") and r["baseline"] != "FP32" else "—")
            bounds = ", ".join(f"{lo}-{hi}" for lo, hi in r["bounds"]) if "bounds" in r else "—"
            lines.append(f"| {label} | {metric}{bpc} | {r['gbitops_mean']:.3f} | "
                         f"{100 * r['savings_vs_fp32']:.2f}% | {base} | {bounds} |")
        g = t["goal"]
        if g is not None:
            verdict = "holds" if g["holds"] else "does NOT hold"
            lines += ["", f"Goal (CPT 3-8/8 no worse than static 8/8 within one std): **{verdict}** — "
                      f"CPT minus static = {g['cpt_minus_static']:+.4f} (static std {g['static_std']:.4f}), "
                      f"at {100 * g['savings']:.2f}% fewer BitOPs."]
        lines.append("")
    lines += _prt_lines(runs)
    lines += ["Plots: `cpt.png` (metric vs GBitOPs), `cpt.schedule.png` (precision schedules, seed 0).",
              f"Wall time of the whole benchmark: {wall:.0f} s."]
    return "\n".join(lines)


def _plots(summary: dict[str, Any], runs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(CONFIGS, ["black", "tab:blue", "tab:cyan", "tab:red", "tab:orange", "tab:purple",
                                 "tab:green"]))
    fig, axes = plt.subplots(1, len(summary), figsize=(6 * len(summary), 4.5))
    for ax, (task_name, t) in zip(axes, summary.items()):
        for label, r in t["rows"].items():
            ax.errorbar(r["gbitops_mean"], r["metric_mean"], xerr=r["gbitops_std"], yerr=r["metric_std"],
                        fmt="o", capsize=4, color=colours[label], label=label)
        ax.set_xscale("log")
        ax.set_xlabel("training GBitOPs (log)")
        ax.set_ylabel(t["metric"])
        ax.set_title(f"{task_name}: {t['metric']} vs training cost")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    p1 = out_dir / "cpt.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(len(summary), 1, figsize=(10, 3.2 * len(summary)), squeeze=False)
    for ax, task_name in zip(axes[:, 0], summary):
        for label in ("CPT 3-8/8", "CPT 3-6/6", "CPT PRT-8/8", "CPT 5-8/8"):
            r = next((r for r in runs if (r["task"], r["config"], r["seed"]) == (task_name, label, 0)), None)
            if r is None:
                continue
            steps = [c[0] for c in r["schedule"]] + [r["steps"]]
            bits = [c[1] for c in r["schedule"]]
            ax.step(steps, bits + bits[-1:], where="post", color=colours[label], label=label, alpha=0.85)
            if "prt" in r:
                ax.axvline(r["prt"]["steps"], color=colours[label], linestyle=":", alpha=0.7)
        ax.set_ylabel("forward bits")
        ax.set_title(f"{task_name}: CPT forward precision per iteration (seed 0; dotted: end of range test)")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("iteration")
    fig.tight_layout()
    p2 = out_dir / "cpt.schedule.png"
    fig.savefig(p2, dpi=110)
    plt.close(fig)
    return [p1, p2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="seeds per configuration (default 3)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel worker processes, one thread each")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--quick", action="store_true", help="1 seed, fewer epochs, no files written")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        ap.error("--seeds and --jobs must be >= 1")
    seeds = 1 if args.quick else args.seeds
    jobs = [(t, label, s, args.quick) for t in args.tasks for s in range(seeds)
            for label in COMMON + TASKS[t]["extra"]]
    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for r in pool.map(run_one, *zip(*jobs)):
            runs.append(r)
            print(f"{r['task']:7s} {r['config']:12s} seed {r['seed']}: {TASKS[r['task']]['metric']} "
                  f"{r['primary']:.4f}  GBitOPs {r['gbitops']:.3f}  {r['time_s']:.0f}s"
                  + (f"  bounds {r['bounds']}" if "bounds" in r else ""), flush=True)
    wall = time.perf_counter() - start
    summary = summarise(runs)
    md = _markdown(summary, seeds, wall, runs, args.jobs)
    print(md)
    if args.quick:
        return 0
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    _plots(summary, runs, RESULTS_DIR)
    data = {"summary": summary, "runs": runs, "tasks": TASKS, "cycles": CYCLES,
            "configs": {k: [v[0], {a: list(b) if isinstance(b, tuple) else b for a, b in v[1].items()}]
                        for k, v in CONFIGS.items()},
            "seeds": seeds, "wall_time_s": wall, "worker_threads": 1, "jobs": args.jobs}
    write_results("cpt", data, md, command_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
