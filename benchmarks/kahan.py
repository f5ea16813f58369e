"""Low-precision weight storage with Kahan-compensated updates, and the classifier bit-width floor.

Part 1 (docs/methods.md#kahan-update). For the digits CNN (test accuracy; SGD, momentum 0.9) and the character
LSTM on ``pydoc_data.topics`` (validation bits per character and perplexity; Adam), every weight is *stored*
at 8-, 12- or 16-bit fixed point or bf16 — no FP32 master copy — through the controller's storage mode
(``adaprec.Controller(..., weight_storage=True)`` with a policy whose weight format is the storage
format, activations and errors FP32). Each format is written back three ways: plain rounding
(``nearest``), stochastic rounding, and Kahan compensation (compensation as wide as the weight). The
reference is FP32 training (FP32 master weights, plain optimizer); also FP32 master weights with the
forward fake-quantized to fx8, the usual quantization-aware setting. One lean
variant keeps 16-bit weights with an 8-bit compensation. Bytes per parameter are measured from the
storages holding the weights, compensation and optimizer state at the end of the run
(``ctl.report()["bytes_per_param"]``; weights held in their storage types, optimizer state in FP32; the
small models' biases, kept in FP32, and per-tensor scales weigh in). ``benchmarks/memory.py`` measures
low-precision optimizer state and peak memory. The classifier floor is off in part 1, so that every
weight really is stored at the stated width.

Part 2 (docs/methods.md#classifier-floor). A run that violates the floor: 8-bit CPT precision everywhere, but
the classifier's output error (the gradient at the logits) at 4 bits with round-to-nearest, classifier floor
off vs on (on raises that layer alone to ``ceil(log2 C) + 3`` bits: 7 for the 10 digits, 10 for the
100-character vocabulary). On digits the same with stochastic rounding, which keeps small errors in
expectation.

Goal (issue 5): Kahan with 16-bit (or bf16) storage within 0.3 points of FP32-master accuracy at less
than half its weight + optimizer memory. Writes ``benchmarks/results/kahan.{json,md}``.

Run: ``python benchmarks/kahan.py`` (3 seeds, 2 worker processes; about 6-10 minutes on two busy CPU
cores); ``python benchmarks/kahan.py --quick`` is a one-seed smoke run that writes nothing.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from benchmarks.common import command_line, write_results  # noqa: E402

FORMATS = ("fx8", "fx12", "fx16", "bf16")
UPDATES = ("nearest", "stochastic", "kahan")

#: Per task: how it is built and trained (the same for every configuration of the task).
TASKS: dict[str, dict[str, Any]] = {
    "digits": {
        "build": {},
        "train": {"epochs": 4, "batch_size": 32, "lr": 0.05},
        "optimizer": "sgd", "head": "fc", "metrics": ["accuracy"],
    },
    "charlm": {
        # 120k characters, a 64-unit LSTM over 32-character windows, 160 iterations of 16 windows.
        "build": {"max_chars": 120_000, "seq_len": 32, "hidden_size": 64, "batches_per_epoch": 40,
                  "max_eval_chars": 8_000},
        "train": {"epochs": 4, "batch_size": 16, "lr": 0.004},
        "optimizer": "adam", "head": "head", "metrics": ["bpc", "perplexity"],
    },
}


def storage_configs(task: str) -> list[dict[str, Any]]:
    """The part-1 configurations of a task, as plain dicts (they cross process boundaries)."""
    out = [{"label": "FP32 master", "kind": "master", "fmt": None}]
    out.append({"label": "FP32 master, fx8 forward", "kind": "master", "fmt": "fx8"})
    for fmt in FORMATS:
        for upd in UPDATES:
            out.append({"label": f"{fmt} {upd}", "kind": "stored", "fmt": fmt, "update": upd})
    out.append({"label": "fx16 kahan, fx8 comp", "kind": "stored", "fmt": "fx16", "update": "kahan",
                "comp": "fx8"})
    return out


def floor_configs(task: str) -> list[dict[str, Any]]:
    roundings = ("nearest", "stochastic") if task == "digits" else ("nearest",)
    return [{"label": f"classifier error 4-bit {r}, floor {'on' if on else 'off'}", "kind": "floor",
             "rounding": r, "floor": on} for r in roundings for on in (False, True)]


def _weight_format(fmt: str) -> Any:
    from adaprec.formats import FixedPoint

    # Round-to-nearest in the fake-quantized forward, like the stored weights (which it leaves as they
    # are: a stored fx-b weight already lies on the backend's b-bit grid).
    return FixedPoint(int(fmt[2:]), rounding="nearest") if fmt.startswith("fx") else fmt


def _head_policy(head: str, rounding: str) -> Any:
    from adaprec.decision import Decision
    from adaprec.formats import IntFormat, Precision
    from adaprec.policies import Policy

    class HeadError4(Policy):
        """8/8 everywhere, the classifier's output error at 4 bits (the floor's test case)."""

        name = "head-error-4"

        def __init__(self) -> None:
            low = Precision(8, 8, IntFormat(4, rounding=rounding))
            self._d = Decision.uniform(Precision.cpt(8, 8)).with_override(head, low)

        def decide(self, ctl: Any) -> Decision:
            return self._d

    return HeadError4()


def run_one(task_name: str, cfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train one configuration with one seed; returns its metrics, memory and time."""
    torch.set_num_threads(1)
    from adaprec.optim import Compensated, KahanSGD
    from adaprec.policies import Fixed
    from adaprec.tasks.charlm import CharLMTask
    from adaprec.tasks.digits import DigitsTask
    from adaprec.tasks.run import train

    spec = TASKS[task_name]
    task = DigitsTask(**spec["build"]) if task_name == "digits" else CharLMTask(**spec["build"])
    sgd = spec["optimizer"] == "sgd"
    ckw: dict[str, Any] = {"classifier_floor": False}
    if cfg["kind"] == "master":
        optimizer: Any = spec["optimizer"]
        policy: Any = "fp32" if cfg["fmt"] is None else \
            Fixed(bits=_weight_format(cfg["fmt"]), act_bits="fp32", grad_bits="fp32")
    elif cfg["kind"] == "stored":
        store = {"weight_format": cfg["fmt"], "update": cfg["update"], "comp_format": cfg.get("comp")}
        if sgd:
            optimizer = functools.partial(KahanSGD, momentum=0.9, **store)
        else:
            def optimizer(params: Any, lr: float) -> Any:
                return Compensated(torch.optim.Adam(params, lr=lr), **store)
        policy = Fixed(bits=_weight_format(cfg["fmt"]), act_bits="fp32", grad_bits="fp32")
        ckw["weight_storage"] = True
    else:  # the classifier-floor runs: FP32 master weights, 8-bit CPT formats
        optimizer = spec["optimizer"]
        policy = _head_policy(spec["head"], cfg["rounding"])
        ckw["classifier_floor"] = cfg["floor"]
    t0 = time.perf_counter()
    r = train(task, policy, seed=seed, optimizer=optimizer, controller_kwargs=ckw, **spec["train"])
    out = {"task": task_name, "label": cfg["label"], "seed": seed, "time_s": time.perf_counter() - t0,
           "bytes_per_param": r.report["bytes_per_param"], "memory_per_param": r.report["memory_per_param"],
           "weight_storage": r.report["weight_storage"]}
    for m in spec["metrics"]:
        out[m] = float(r.metrics[m])
    if cfg["kind"] == "floor":
        last = r.history[-1].layers[spec["head"]] if r.history else None
        out["head_precision"] = None if last is None else last.short()
    return out


def _stats(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(results: list[dict[str, Any]], task: str, labels: list[str]) -> list[dict[str, Any]]:
    rows = []
    for label in labels:
        rs = [r for r in results if r["task"] == task and r["label"] == label]
        if not rs:
            continue
        row = {"label": label, "seeds": len(rs), "bytes_per_param": rs[0]["bytes_per_param"],
               "memory_per_param": rs[0]["memory_per_param"], "weight_storage": rs[0]["weight_storage"],
               "time_s": statistics.fmean(r["time_s"] for r in rs)}
        for m in TASKS[task]["metrics"]:
            row[m], row[m + "_std"] = _stats([r[m] for r in rs])
            row[m + "_per_seed"] = [r[m] for r in rs]
        if "head_precision" in rs[0]:
            row["head_precision"] = rs[0]["head_precision"]
        rows.append(row)
    return rows


def goal_check(rows: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    """Kahan with 16-bit / bf16 storage against FP32 master: the quality gap and the memory ratio.

    Digits: accuracy gap in points (goal <= 0.3). Char LM: perplexity gap (the goal names accuracy
    only, so there is no threshold)."""
    by = {r["label"]: r for r in rows}
    ref = by.get("FP32 master")
    out = []
    for label in ("fx16 kahan", "bf16 kahan", "fx16 kahan, fx8 comp"):
        r = by.get(label)
        if r is None or ref is None:
            continue
        ratio = r["bytes_per_param"] / ref["bytes_per_param"]
        g: dict[str, Any] = {"task": task, "label": label, "memory_ratio": ratio, "memory_ok": ratio < 0.5}
        if task == "digits":
            g["gap"] = 100 * (ref["accuracy"] - r["accuracy"])
            g["quality_ok"] = g["gap"] <= 0.3
        else:
            g["gap"] = r["perplexity"] - ref["perplexity"]
            g["quality_ok"] = None
        out.append(g)
    return out


def _fmt(mean: float, std: float, scale: float = 1.0, nd: int = 2) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean * scale:.{nd}f} ± {std * scale:.{nd}f}"


def markdown(data: dict[str, Any]) -> str:
    lines = ["## Part 1: weights stored at low precision (no FP32 master)", ""]
    for task, rows in data["storage"].items():
        lines.append(f"### {task}")
        lines.append("")
        if task == "digits":
            lines += ["| configuration | test accuracy % | bytes/param (w + c + state) | stored as |",
                      "|---|---|---|---|"]
        else:
            lines += ["| configuration | val bpc | val perplexity | bytes/param (w + c + state) "
                      "| stored as |", "|---|---|---|---|---|"]
        for r in rows:
            mp = r["memory_per_param"]
            mem = f"{r['bytes_per_param']:.2f} ({mp['weight']:.2f} + {mp['compensation']:.2f} + " \
                  f"{mp['optimizer_state']:.2f})"
            if task == "digits":
                lines.append(f"| {r['label']} | {_fmt(r['accuracy'], r['accuracy_std'], 100)} | {mem} | "
                             f"{r['weight_storage']} |")
            else:
                lines.append(f"| {r['label']} | {_fmt(r['bpc'], r['bpc_std'], 1, 3)} | "
                             f"{_fmt(r['perplexity'], r['perplexity_std'])} | {mem} | "
                             f"{r['weight_storage']} |")
        lines.append("")
    lines += ["### Goal: Kahan, 16-bit storage, within 0.3 points of FP32 master at < half its memory",
              "", "Gap = FP32 master minus stored (digits: accuracy points, goal <= 0.3); char LM: stored "
              "minus FP32-master perplexity (no threshold).", "",
              "| task | configuration | gap | memory vs FP32 master | quality goal | memory goal |",
              "|---|---|---|---|---|---|"]
    verdict = {True: "met", False: "missed", None: "n/a"}
    for g in data["goal"]:
        lines.append(f"| {g['task']} | {g['label']} | {g['gap']:+.2f} | {g['memory_ratio']:.2f} | "
                     f"{verdict[g['quality_ok']]} | {verdict[g['memory_ok']]} |")
    lines += ["", "## Part 2: the classifier floor", ""]
    for task, rows in data["floor"].items():
        metric = "accuracy" if task == "digits" else "perplexity"
        scale = 100 if task == "digits" else 1
        lines += [f"### {task}", "", f"| run | classifier precision | {metric} |", "|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['label']} | {r.get('head_precision')} | "
                         f"{_fmt(r[metric], r[metric + '_std'], scale)} |")
        lines.append("")
    lines.append(f"Mean ± standard deviation over seeds {data['seeds']}; total wall time "
                 f"{data['wall_time_s']:.0f} s with {data['workers']} worker processes.")
    lines += ["", "Notes:", "",
              "- Memory is measured (weights held in their storage types; fixed point in whole bytes: "
              "fx12 in int16 codes). A same-width Kahan compensation stores 2n bits per weight: at n = 16 "
              "exactly the 32 bits of the FP32 "
              "master it replaces. With an FP32 optimizer state of S bytes per parameter (SGD momentum 4, "
              "Adam 8) FP32 master costs 4 + S and 16-bit storage 2 + c + S >= (4 + S) / 2 for any "
              "compensation c >= 0: no 16-bit storage, compensated or not, gets below half of the "
              "FP32-master memory unless the optimizer state is stored in low precision too "
              "(state_format=, benchmarks/memory.py).",
              f"- The digits test set has {data.get('digits_test_size', 'n/a')} images: one image is "
              f"{100 / data['digits_test_size']:.2f} points." if data.get("digits_test_size") else
              "- (digits not run)",
              "- Part 1 runs with the classifier floor off; part 2 keeps FP32 master weights and 8-bit "
              "CPT formats elsewhere, so only the classifier's error format differs between its rows."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--quick", action="store_true", help="one seed, write nothing")
    args = ap.parse_args(argv)
    seeds = list(range(1 if args.quick else args.seeds))
    jobs = [(t, c, s) for t in args.tasks for c in storage_configs(t) + floor_configs(t) for s in seeds]
    # Slow jobs first, so that the two workers finish together.
    jobs.sort(key=lambda j: (j[0] != "charlm", j[1]["kind"] == "floor"))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        results = list(pool.map(run_one, *zip(*jobs)))
    wall = time.perf_counter() - t0
    data: dict[str, Any] = {"seeds": seeds, "workers": args.workers, "wall_time_s": wall,
                            "tasks": {t: TASKS[t] for t in args.tasks}, "storage": {}, "floor": {},
                            "runs": results}
    for t in args.tasks:
        data["storage"][t] = summarise(results, t, [c["label"] for c in storage_configs(t)])
        data["floor"][t] = summarise(results, t, [c["label"] for c in floor_configs(t)])
    data["goal"] = [g for t in args.tasks for g in goal_check(data["storage"][t], t)]
    if "digits" in args.tasks:
        from adaprec.tasks.digits import DigitsTask

        data["digits_test_size"] = len(DigitsTask(**TASKS["digits"]["build"]).y_test)
    md = markdown(data)
    print(md)
    if not args.quick:
        write_results("kahan", data, md, command_line())
    return data


if __name__ == "__main__":
    main()
