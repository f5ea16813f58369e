"""Block-scaled formats on the bundled tasks: static MXFP8, MXFP4 and NVFP4, and adaptive MX ladders,
against BF16 and FP32 — accuracy (or validation loss) and effective BitOPs, 3 seeds.

Tasks: the digits CNN (test accuracy), the character LSTM and the GPT character LM on
``pydoc_data.topics`` (validation loss). Plans, each with the same seeds, epochs, optimizer and
learning-rate schedule per task:

* ``FP32``; ``BF16`` (weights, activations and errors in bf16, errors rounded stochastically);
* ``MXFP8``: MXFP8 (E4M3) for all three roles;
* ``MXFP4 fwd``: MXFP4 weights and activations, MXFP8 errors (FP4 errors diverge on these tasks' LMs;
  recipes that train in FP4 keep the backward wider too);
* ``NVFP4 fwd``: NVFP4 weights and activations, MXFP8 errors;
* ``CPT MX``: CPT cycling the forward over mxfp4 -> mxfp6 -> mxfp8 (8 cycles), MXFP8 errors;
* ``MuPPET MX``: MuPPET climbing mxfp4 -> mxfp8 -> bf16 -> fp32 on gradient diversity (windowed check
  every ``len(loader) // 2`` iterations, since these runs have few epochs).

The controller's defaults stay on (classifier floor: the classifier keeps at least 7 bits, so an FP4
decision leaves it at MXFP8), so every figure is what a user running the same line gets. GBitOPs count
effective bits (element bits + 8 scale bits per block: MXFP4 4.25, NVFP4 4.5, MXFP8 8.25).

Run: ``python benchmarks/formats.py`` (about 30-40 minutes on two busy cores);
``python benchmarks/formats.py --quick`` for a one-seed smoke run that writes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
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

TASKS: dict[str, dict[str, Any]] = {
    "digits": {
        "build": {},
        "train": {"epochs": 8, "batch_size": 32, "lr": 0.05, "optimizer": "sgd", "lr_schedule": "cosine"},
        "metric": "accuracy", "direction": "maximize",
    },
    "charlm": {
        "build": {"max_chars": 300_000, "seq_len": 32, "hidden_size": 96, "batches_per_epoch": 50,
                  "max_eval_chars": 20_000},
        "train": {"epochs": 5, "batch_size": 32, "lr": 0.004, "optimizer": "adam", "lr_schedule": "cosine"},
        "metric": "val_loss", "direction": "minimize",
    },
    "gptlm": {
        "build": {"max_chars": 300_000, "batches_per_epoch": 50, "max_eval_chars": 20_000},
        "train": {"epochs": 5, "lr": 0.003, "optimizer": "adamw", "lr_schedule": "cosine"},
        "metric": "val_loss", "direction": "minimize",
    },
}

#: label -> (policy kind, arguments); built in each worker.
PLANS: dict[str, tuple[str, dict[str, Any]]] = {
    "FP32": ("fp32", {}),
    "BF16": ("fixed", {"bits": "bf16"}),
    "MXFP8": ("fixed", {"bits": "mxfp8"}),
    "MXFP4 fwd": ("fixed", {"bits": "mxfp4", "grad_bits": "mxfp8"}),
    "NVFP4 fwd": ("fixed", {"bits": "nvfp4", "grad_bits": "mxfp8"}),
    "CPT MX": ("cpt", {"bits": ("mxfp4", "mxfp8"), "grad_bits": "mxfp8", "cycles": 8}),
    "MuPPET MX": ("muppet", {"levels": ("mxfp4", "mxfp8", "bf16", "fp32")}),
}


def _make_policy(kind: str, args: dict[str, Any], task: Any, batch_size: int) -> Any:
    from adaprec.policies import CPT, Fixed, MuPPET

    if kind == "fp32":
        return "fp32"
    if kind == "fixed":
        return Fixed(**args)
    if kind == "cpt":
        return CPT(**args)
    try:
        per_epoch = len(task.train_batches(batch_size, seed=0))
    except TypeError:  # a task whose batches are a generator
        per_epoch = 50
    return MuPPET(**args, check_every=max(1, per_epoch // 2))


def run_one(task_name: str, label: str, seed: int, quick: bool = False) -> dict[str, Any]:
    torch.set_num_threads(1)
    from adaprec.tasks import get_task, train

    spec = TASKS[task_name]
    kwargs = dict(spec["train"])
    if quick:
        kwargs["epochs"] = 2
    task = get_task(task_name, **spec["build"])
    kind, args = PLANS[label]
    batch = kwargs.get("batch_size", getattr(task, "batch_size", 32))
    policy = _make_policy(kind, args, task, batch)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = train(task, policy, seed=seed, **kwargs)
    forward = [[h.step, next(iter(h.layers.values())).weight.short()] for h in result.history
               if h.step < result.steps]
    return {
        "task": task_name, "plan": label, "seed": seed, "metrics": dict(result.metrics),
        "primary": result.metrics[spec["metric"]], "gbitops": result.report["gbitops"],
        "gbitops_fp32": result.report["gbitops_fp32"], "steps": result.steps,
        "time_at_precision": result.report.get("time_at_precision", {}),
        "first_layer_formats": forward[:64], "time_s": time.perf_counter() - t0,
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task_name, spec in TASKS.items():
        rows: dict[str, Any] = {}
        for label in PLANS:
            rs = [r for r in runs if r["task"] == task_name and r["plan"] == label]
            if not rs:
                continue
            m, s = mean_std([r["primary"] for r in rs])
            g, gs = mean_std([r["gbitops"] for r in rs])
            rows[label] = {"metric_mean": m, "metric_std": s, "gbitops_mean": g, "gbitops_std": gs,
                           "values": [r["primary"] for r in rs], "seeds": [r["seed"] for r in rs],
                           "savings_vs_fp32": 1 - g / statistics.fmean(r["gbitops_fp32"] for r in rs)}
        bf16 = rows.get("BF16")
        fp32 = rows.get("FP32")
        sign = 1 if spec["direction"] == "maximize" else -1
        for row in rows.values():
            if bf16:
                row["savings_vs_bf16"] = 1 - row["gbitops_mean"] / bf16["gbitops_mean"]
            if fp32:
                gap = sign * (row["metric_mean"] - fp32["metric_mean"])
                row["vs_fp32"] = row["metric_mean"] - fp32["metric_mean"]
                row["within_fp32_std"] = gap >= -max(fp32["metric_std"], row["metric_std"])
        if rows:
            out[task_name] = {"metric": spec["metric"], "direction": spec["direction"], "rows": rows}
    return out


def _markdown(summary: dict[str, Any], seeds: int, wall: float, jobs: int) -> str:
    lines = [
        f"Runs on CPU in {jobs} worker processes, one torch thread each. Each row: mean ± std over {seeds} "
        "seeds; same epochs, optimizer and cosine learning-rate schedule for every plan of a task. "
        "GBitOPs from adaprec's cost meter with effective bits (docs/methods.md, block-scaled formats); "
        "the controller's classifier floor is on (the default), so FP4 plans keep the classifier at "
        "MXFP8. `within FP32` = the plan's mean is no worse than FP32's by more than the larger of the "
        "two standard deviations.", "",
    ]
    for task_name, t in summary.items():
        spec = TASKS[task_name]
        cfg = ", ".join(f"{k}={v}" for k, v in {**spec["build"], **spec["train"]}.items())
        better = "higher" if t["direction"] == "maximize" else "lower"
        lines += [f"## {task_name} ({t['metric']}, {better} is better)", "", f"Settings: {cfg}.", "",
                  f"| plan | {t['metric']} | vs FP32 | within FP32 | GBitOPs | savings vs FP32 | "
                  "savings vs BF16 |", "|---|---|---|---|---|---|---|"]
        fmt = "{:.4f}"
        for label, r in t["rows"].items():
            lines.append(
                f"| {label} | {fmt.format(r['metric_mean'])} ± {fmt.format(r['metric_std'])} | "
                f"{r.get('vs_fp32', math.nan):+.4f} | {'yes' if r.get('within_fp32_std') else 'no'} | "
                f"{r['gbitops_mean']:.2f} | {100 * r['savings_vs_fp32']:.1f}% | "
                f"{100 * r.get('savings_vs_bf16', math.nan):.1f}% |")
        lines.append("")
    lines.append(f"Wall time of the whole benchmark: {wall:.0f} s.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=2, help="parallel worker processes, one thread each")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--plans", nargs="+", default=list(PLANS), choices=list(PLANS))
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, no files written")
    args = ap.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1:
        ap.error("--seeds and --jobs must be >= 1")
    seeds = 1 if args.quick else args.seeds
    jobs = [(t, p, s, args.quick) for t in args.tasks for s in range(seeds) for p in args.plans]
    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for r in pool.map(run_one, *zip(*jobs)):
            runs.append(r)
            print(f"{r['task']:7s} {r['plan']:10s} seed {r['seed']}: {TASKS[r['task']]['metric']} "
                  f"{r['primary']:.4f}  GBitOPs {r['gbitops']:.2f}  {r['time_s']:.0f}s", flush=True)
    wall = time.perf_counter() - start
    if not args.quick and set(args.tasks) != set(TASKS):
        # A run over some tasks keeps the other tasks' runs of the last full result file.
        old = RESULTS_DIR / "formats.json"
        if old.exists():
            prev = json.loads(old.read_text())["data"]  # the payload of write_results
            runs = [r for r in prev.get("runs", []) if r["task"] not in args.tasks] + runs
            wall += prev.get("wall_time_s", 0.0)
    summary = summarise(runs)
    md = _markdown(summary, seeds, wall, args.jobs)
    if not args.quick and set(args.tasks) != set(TASKS):
        md += f"\n\nThis file merges runs of separate invocations (the last one ran {', '.join(args.tasks)})."
    print(md)
    if args.quick:
        return 0
    data = {"summary": summary, "runs": runs, "tasks": TASKS,
            "plans": {k: [v[0], {a: list(b) if isinstance(b, tuple) else b for a, b in v[1].items()}]
                      for k, v in PLANS.items()},
            "seeds": seeds, "wall_time_s": wall, "worker_threads": 1, "jobs": args.jobs}
    write_results("formats", data, md, command_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
