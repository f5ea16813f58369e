"""Real memory of low-precision training: peak resident memory, measured bytes, and accuracy.

Part 1, memory (issue 17). The GPT character LM at its ``memory`` preset (about 57 M parameters) trains
three AdamW steps (batch 4 x 256 characters) in a fresh Python process per configuration. Each process
reports the bytes of the parameters, Kahan compensation, optimizer state and gradients measured from
their storages (:func:`adaprec.optim.optimizer_memory`; ``ctl.report()["bytes_per_param"]`` in the
adaprec runs) and its peak resident set (``VmHWM`` of ``/proc/self/status``: the most physical memory it
held) over the steps after the first — the steady-state training peak, once the optimizer state exists
(and torchao has compiled its step); the peak is reset after the first step by writing ``5`` to
``/proc/self/clear_refs``. Configurations:

* ``FP32 + AdamW`` — plain PyTorch;
* ``AMP bf16 + AdamW`` — plain PyTorch under ``torch.autocast("cpu", torch.bfloat16)``, FP32 weights
  and state;
* ``FP32 + 8-bit AdamW (adaprec)`` — FP32 weights, AdamW's moments in adaprec's block-wise dynamic
  8-bit state (``Compensated(AdamW, "fp32", update="nearest", state_format="8bit")``);
* ``FP32 + torchao AdamW8bit`` — the same idea from torchao, when it is installed;
* ``bf16 + bf16 Kahan + 8-bit AdamW`` — weights stored in bf16 with a bf16 compensation, no FP32
  master (``weight_storage=True``, policy bf16 weights / FP32 activations and errors), dynamic 8-bit
  moments; ``... + FP8-state AdamW`` the same with block-wise FP8 moments (``state_format="fp8"``);
* ``bf16 stochastic + 8-bit AdamW`` — bf16 weights written back with stochastic rounding, no
  compensation;
* ``fx8 + fx8 Kahan + 8-bit AdamW`` — the quantized layers' weights in 8-bit fixed point (the classifier
  floor keeps the vocabulary head at 10 bits) with an 8-bit compensation, every other parameter
  (embeddings, norms, biases) in bf16 with a bf16 compensation.

No weight decay anywhere. The processes run one after another with one thread each and
``MALLOC_MMAP_THRESHOLD_=65536`` (large blocks come from and go back to the OS at once, so the peak
reflects what was live rather than the allocator's fragmentation; the same for every configuration).

Part 2, accuracy. Three seeds each of the digits classifier (SGD with momentum 0.9), the character
LSTM (Adam) and the GPT character LM at its ``tiny`` size (AdamW at lr 1e-3, cosine schedule) against FP32
master weights with the same optimizer; the low-precision configurations as above, plus FP32 master weights
with each 8-bit state (adaprec's dynamic and FP8, torchao's AdamW8bit) to see what the state alone
costs. On digits the state is SGD's momentum (``KahanSGD(..., state_format=...)``; torchao has no 8-bit
SGD). Goals: validation loss at most 1 % above FP32 master on the two language models, test accuracy at
most 0.3 points below on digits.

Writes ``benchmarks/results/memory.{json,md}``. Run: ``python benchmarks/memory.py`` (about 40
minutes on two busy cores); ``--quick`` measures two steps of a 2-block GPT and runs one epoch of one
seed of the accuracy part, and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402

from benchmarks.common import command_line, write_results  # noqa: E402

#: Peak-memory configurations: label -> how the run is built (plain dicts: they go to a subprocess).
PEAK_CONFIGS: dict[str, dict[str, Any]] = {
    "FP32 + AdamW": {"kind": "plain"},
    "AMP bf16 + AdamW": {"kind": "amp"},
    "FP32 + 8-bit AdamW (adaprec)": {"kind": "adaprec", "weight": "fp32", "update": "nearest",
                                     "state": "8bit"},
    "FP32 + torchao AdamW8bit": {"kind": "torchao"},
    "bf16 + bf16 Kahan + 8-bit AdamW": {"kind": "adaprec", "weight": "bf16", "update": "kahan",
                                        "state": "8bit"},
    "bf16 + bf16 Kahan + FP8-state AdamW": {"kind": "adaprec", "weight": "bf16", "update": "kahan",
                                            "state": "fp8"},
    "bf16 stochastic + 8-bit AdamW": {"kind": "adaprec", "weight": "bf16", "update": "stochastic",
                                      "state": "8bit"},
    "fx8 + fx8 Kahan + 8-bit AdamW": {"kind": "adaprec", "weight": "fx8", "others": "bf16",
                                      "update": "kahan", "state": "8bit"},
}

#: Accuracy tasks: how each is built and trained (the same for every configuration of the task).
TASKS: dict[str, dict[str, Any]] = {
    "digits": {"build": {}, "train": {"epochs": 4, "batch_size": 32, "lr": 0.05},
               "optimizer": "sgd", "metrics": ["accuracy", "val_loss"]},
    "charlm": {"build": {"max_chars": 120_000, "seq_len": 32, "hidden_size": 64, "batches_per_epoch": 40,
                         "max_eval_chars": 8_000},
               "train": {"epochs": 4, "batch_size": 16, "lr": 0.004},
               "optimizer": "adam", "metrics": ["val_loss", "bpc"]},
    # lr 1e-3, not the task's default 3e-3: at 3e-3 FP32 itself is unstable at this size and length (one
    # seed of three stalled at a loss of 3.1 against 2.5), which would swamp a 1 % comparison.
    "gptlm": {"build": {"preset": "tiny", "max_chars": 120_000, "max_eval_chars": 8_000},
              "train": {"epochs": 5, "batch_size": 32, "lr": 0.001, "lr_schedule": "cosine"},
              "optimizer": "adamw", "metrics": ["val_loss", "bpc"]},
}

ACC_CONFIGS: dict[str, dict[str, Any]] = {
    "FP32 master": {"kind": "plain"},
    "FP32 master + 8-bit state": {"kind": "adaprec", "weight": "fp32", "update": "nearest", "state": "8bit",
                                  "storage": False},
    "FP32 master + FP8 state": {"kind": "adaprec", "weight": "fp32", "update": "nearest", "state": "fp8",
                                "storage": False},
    "FP32 master + torchao AdamW8bit": {"kind": "torchao"},
    "bf16 + bf16 Kahan + 8-bit state": {"kind": "adaprec", "weight": "bf16", "update": "kahan",
                                        "state": "8bit"},
    "bf16 + bf16 Kahan + FP8 state": {"kind": "adaprec", "weight": "bf16", "update": "kahan",
                                      "state": "fp8"},
    "bf16 stochastic + 8-bit state": {"kind": "adaprec", "weight": "bf16", "update": "stochastic",
                                      "state": "8bit"},
    "fx8 + fx8 Kahan + 8-bit state": {"kind": "adaprec", "weight": "fx8", "others": "bf16",
                                      "update": "kahan", "state": "8bit"},
}


def torchao_available() -> bool:
    try:
        import torchao.optim  # noqa: F401
    except Exception:  # not installed, or it fails to import against this torch
        return False
    return True


# ---------------------------------------------------------------------------------------------- builders
def _weight_policy(fmt: str) -> Any:
    from adaprec.formats import FixedPoint
    from adaprec.policies import Fixed

    # Round to nearest, as the stored weights are: the forward then reads the stored weights directly.
    wf = FixedPoint(int(fmt[2:]), rounding="nearest") if fmt.startswith("fx") else fmt
    return Fixed(bits=wf, act_bits="fp32", grad_bits="fp32")


def make_optimizer(cfg: dict[str, Any], inner: str, momentum: float = 0.9) -> Any:
    """A factory ``(params, lr) -> optimizer`` for a configuration (``inner``: sgd, adam or adamw)."""
    from adaprec.optim import Compensated, KahanSGD

    # No weight decay anywhere, as the tasks' FP32 baselines (torch's AdamW would default to 0.01).
    kind = cfg["kind"]
    if kind == "torchao":
        from torchao.optim import AdamW8bit

        return lambda params, lr: AdamW8bit(params, lr=lr, weight_decay=0.0)
    store = {"weight_format": cfg.get("others", cfg["weight"]) if cfg.get("storage", True) else cfg["weight"],
             "update": cfg["update"], "state_format": cfg["state"]}
    if inner == "sgd":
        return lambda params, lr: KahanSGD(params, lr=lr, momentum=momentum, **store)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[inner]
    return lambda params, lr: Compensated(cls(params, lr=lr, weight_decay=0.0), **store)


def controller_setup(cfg: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``(policy, controller keyword arguments)`` of a configuration."""
    if cfg["kind"] == "adaprec" and cfg.get("storage", True) and cfg["weight"] != "fp32":
        return _weight_policy(cfg["weight"]), {"weight_storage": True}
    return "fp32", {}


# ---------------------------------------------------------------------------------------------- part 1
def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def peak_child(label: str, steps: int, batch: int, quick: bool) -> dict[str, Any]:
    """One configuration in this (fresh) process: train ``steps`` steps, report memory."""
    torch.set_num_threads(1)
    import adaprec
    from adaprec.optim import optimizer_memory
    from adaprec.tasks.gptlm import GPTLMTask

    cfg = PEAK_CONFIGS[label]
    rss_import = _status_kb("VmRSS") * 1024
    kw = {"preset": "memory", "max_chars": 200_000, "max_eval_chars": 2_000}
    if quick:
        kw.update(n_layers=2)
    task = GPTLMTask(**kw)
    model = task.build_model(0)
    model.train()
    n = sum(p.numel() for p in model.parameters())
    batches = list(task.train_batches(batch, 0))[:steps]
    opt = make_optimizer(cfg, "adamw")(model.parameters(), lr=3e-4) if cfg["kind"] in ("adaprec", "torchao") \
        else torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
    rss_model = _status_kb("VmRSS") * 1024
    policy, ckw = controller_setup(cfg)
    times: list[float] = []
    report: dict[str, Any] = {}

    peaks: dict[str, int] = {}

    def run() -> None:
        for i, (x, y) in enumerate(batches):
            if i == 1:
                # After the first step (lazily created optimizer state; torchao compiles its step then):
                # the steady-state training peak starts here. Writing 5 to clear_refs resets VmHWM.
                peaks["first_step"] = _status_kb("VmHWM") * 1024
                Path("/proc/self/clear_refs").write_text("5")
            t0 = time.perf_counter()
            if cfg["kind"] == "amp":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = task.loss(model, (x, y))
            else:
                loss = task.loss(model, (x, y))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)

    if cfg["kind"] == "adaprec":
        with adaprec.Controller(model, policy=policy, optimizer=opt, **ckw) as ctl:
            run()
            mem = optimizer_memory(opt)
            report = {k: ctl.report()[k] for k in ("bytes_per_param", "memory_per_param",
                                                   "gradient_bytes_per_param", "weight_storage")}
    else:
        run()
        mem = optimizer_memory(opt)
    return {"label": label, "params": n, "steps": steps, "batch": batch,
            "peak_rss": _status_kb("VmHWM") * 1024, "peak_rss_first_step": peaks.get("first_step"),
            "rss_after_import": rss_import,
            "rss_after_model": rss_model, "step_s": statistics.median(times[1:] or times),
            "bytes": {"weight": mem.weight, "compensation": mem.compensation,
                      "optimizer_state": mem.optimizer_state, "gradients": mem.gradients,
                      "total": mem.total, "fp32_total": mem.fp32_total},
            "bytes_per_param": mem.total / n, "report": report}


def run_peak(labels: list[str], steps: int, batch: int, quick: bool) -> list[dict[str, Any]]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = []
    for label in labels:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", label, "--steps", str(steps),
               "--batch", str(batch)] + (["--quick"] if quick else [])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{label}: the measuring process failed:\n{proc.stderr[-3000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        r["wall_s"] = time.perf_counter() - t0
        print(f"  {label}: peak {r['peak_rss'] / 2**20:.0f} MiB, {r['bytes_per_param']:.3f} B/param",
              flush=True)
        out.append(r)
    return out


# ---------------------------------------------------------------------------------------------- part 2
def acc_run(task_name: str, label: str, seed: int, quick: bool) -> dict[str, Any]:
    torch.set_num_threads(1)
    from adaprec.tasks import get_task
    from adaprec.tasks.run import train

    spec = TASKS[task_name]
    cfg = ACC_CONFIGS[label]
    build = dict(spec["build"])
    train_kw = dict(spec["train"])
    if quick:
        train_kw["epochs"] = 1
    task = get_task(task_name, **build)
    policy, ckw = controller_setup(cfg)
    optimizer = spec["optimizer"] if cfg["kind"] == "plain" else make_optimizer(cfg, spec["optimizer"])
    t0 = time.perf_counter()
    r = train(task, policy, seed=seed, optimizer=optimizer, controller_kwargs=ckw, **train_kw)
    out = {"task": task_name, "label": label, "seed": seed, "time_s": time.perf_counter() - t0,
           "bytes_per_param": r.report["bytes_per_param"], "memory_per_param": r.report["memory_per_param"],
           "weight_storage": r.report["weight_storage"]}
    for m in spec["metrics"]:
        out[m] = float(r.metrics[m])
    return out


def _stats(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(results: list[dict[str, Any]], task: str) -> list[dict[str, Any]]:
    rows = []
    for label in ACC_CONFIGS:
        rs = [r for r in results if r["task"] == task and r["label"] == label]
        if not rs:
            continue
        row: dict[str, Any] = {"label": label, "seeds": len(rs), "bytes_per_param": rs[0]["bytes_per_param"],
                               "memory_per_param": rs[0]["memory_per_param"],
                               "weight_storage": rs[0]["weight_storage"],
                               "time_s": statistics.fmean(r["time_s"] for r in rs)}
        for m in TASKS[task]["metrics"]:
            row[m], row[m + "_std"] = _stats([r[m] for r in rs])
            row[m + "_per_seed"] = [r[m] for r in rs]
        rows.append(row)
    return rows


def accuracy_goals(rows: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each low-precision configuration against FP32 master: loss within 1 % (language models),
    accuracy within 0.3 points (digits)."""
    out = []
    for task, trs in rows.items():
        by = {r["label"]: r for r in trs}
        ref = by.get("FP32 master")
        if ref is None:
            continue
        for r in trs:
            if r["label"] == "FP32 master":
                continue
            if task == "digits":
                gap = 100 * (ref["accuracy"] - r["accuracy"])
                out.append({"task": task, "label": r["label"], "metric": "accuracy points below FP32",
                            "gap": gap, "ok": gap <= 0.3})
            else:
                rel = (r["val_loss"] - ref["val_loss"]) / ref["val_loss"]
                out.append({"task": task, "label": r["label"], "metric": "val loss vs FP32 (relative)",
                            "gap": rel, "ok": rel <= 0.01})
    return out


# ---------------------------------------------------------------------------------------------- report
def markdown(data: dict[str, Any]) -> str:
    lines: list[str] = []
    if data.get("peak"):
        lines += ["## Part 1: peak memory of a few training steps", "",
                  f"GPT char LM, {data['peak'][0]['params'] / 1e6:.1f} M parameters, batch {data['batch']} "
                  f"x {data['seq_len']} characters, {data['steps']} AdamW steps, one process per row. Peak "
                  "RSS: the steady-state peak after the first step; training peak: that minus the process's "
                  "resident memory after importing torch and adaprec.", "",
                  "| configuration | peak RSS MiB | training peak MiB | vs FP32 | param + state B/param | "
                  "w / comp / state | grads B/param | step s |", "|---|---|---|---|---|---|---|---|"]
        ref = next((r for r in data["peak"] if r["label"] == "FP32 + AdamW"), None)
        for r in data["peak"]:
            b, n = r["bytes"], r["params"]
            ratio = f"{r['training_peak_mib'] / ref['training_peak_mib']:.2f}" if ref else "n/a"
            parts = f"{b['weight'] / n:.2f} / {b['compensation'] / n:.2f} / {b['optimizer_state'] / n:.2f}"
            lines.append(f"| {r['label']} | {r['peak_rss_mib']:.0f} | {r['training_peak_mib']:.0f} | "
                         f"{ratio} | {r['bytes_per_param']:.3f} | {parts} | {b['gradients'] / n:.2f} | "
                         f"{r['step_s']:.1f} |")
        if data.get("torchao_skipped"):
            lines += ["", f"torchao rows skipped: {data['torchao_skipped']}."]
        lines += ["", "### Goal: bf16 weights + bf16 compensation + 8-bit AdamW at <= 0.5x the FP32 bytes",
                  ""]
        for g in data["memory_goal"]:
            lines.append(f"- {g['label']}: {g['bytes_per_param']:.3f} of {g['fp32_bytes_per_param']:.3f} "
                         f"bytes per parameter = {g['ratio']:.4f}x ({'met' if g['ok'] else 'missed'}); "
                         f"{g['state_saved_mib']:.0f} MiB of parameters and state saved, peak RSS "
                         f"{g['peak_saved_mib']:.0f} MiB lower (training peak "
                         f"{g['training_peak_ratio']:.2f}x of FP32 + AdamW).")
        lines.append("")
    if data.get("accuracy"):
        lines += ["## Part 2: accuracy against FP32 master weights", ""]
        for task, rows in data["accuracy"].items():
            metrics = TASKS[task]["metrics"]
            head = "| configuration | " + " | ".join(metrics) + " | B/param (measured) |"
            lines += [f"### {task}", "", head, "|---|" + "---|" * len(metrics) + "---|"]
            for r in rows:
                cells = []
                for m in metrics:
                    scale = 100 if m == "accuracy" else 1
                    cells.append(f"{r[m] * scale:.3f} ± {r[m + '_std'] * scale:.3f}")
                lines.append(f"| {r['label']} | " + " | ".join(cells) + f" | {r['bytes_per_param']:.2f} |")
            lines.append("")
        lines += ["### Goals: validation loss at most 1 % above FP32 master (language models), test accuracy "
                  "at most 0.3 points below (digits); the signed gap, negative = better than FP32", "",
                  "| task | configuration | gap | goal |", "|---|---|---|---|"]
        for g in data["accuracy_goal"]:
            gap = f"{g['gap']:+.2f} points" if g["task"] == "digits" else f"{100 * g['gap']:+.2f} %"
            lines.append(f"| {g['task']} | {g['label']} | {gap} | {'met' if g['ok'] else 'missed'} |")
        lines += ["", f"Mean ± standard deviation over seeds {data['seeds']}. Bytes per parameter are "
                  "measured at the end of each run (tiny models: biases and per-tensor scales weigh more "
                  "than in the 57 M model).", ""]
    return "\n".join(lines)


def derive(data: dict[str, Any]) -> dict[str, Any]:
    """The summaries and goal checks, from the raw measurements (``peak`` rows and accuracy ``runs``)."""
    mib = 2.0**20
    for r in data.get("peak", []):
        r["peak_rss_mib"] = r["peak_rss"] / mib
        r["rss_after_import_mib"] = r["rss_after_import"] / mib
        r["training_peak_mib"] = (r["peak_rss"] - r["rss_after_import"]) / mib  # the run itself
        r["bytes_per_param_parts"] = {k: r["bytes"][k] / r["params"]
                                      for k in ("weight", "compensation", "optimizer_state", "gradients")}
    data["memory_goal"] = []
    by = {r["label"]: r for r in data.get("peak", [])}
    ref = by.get("FP32 + AdamW")
    if ref is not None:
        data["fp32_peak"] = {k: ref[k] for k in ("peak_rss_mib", "training_peak_mib")}
        fp32 = ref["bytes"]["total"] / ref["params"]
        for label in ("bf16 + bf16 Kahan + 8-bit AdamW", "bf16 + bf16 Kahan + FP8-state AdamW",
                      "fx8 + fx8 Kahan + 8-bit AdamW"):
            r = by.get(label)
            if r is None:
                continue
            saved = (ref["bytes"]["total"] - r["bytes"]["total"]) / mib
            data["memory_goal"].append({
                "label": label, "bytes_per_param": r["bytes_per_param"], "fp32_bytes_per_param": fp32,
                "ratio": r["bytes_per_param"] / fp32, "ok": r["bytes_per_param"] / fp32 <= 0.5,
                "peak_ratio": r["peak_rss"] / ref["peak_rss"],
                "training_peak_ratio": r["training_peak_mib"] / ref["training_peak_mib"],
                "peak_saved_mib": (ref["peak_rss"] - r["peak_rss"]) / mib, "state_saved_mib": saved})
    runs = data.get("runs", [])
    tasks = [t for t in TASKS if any(r["task"] == t for r in runs)]
    data["accuracy"] = {t: summarise(runs, t) for t in tasks}
    data["accuracy_goal"] = accuracy_goals(data["accuracy"])
    for g in data["accuracy_goal"]:  # the gap beside each row too: digits in points, the LMs in percent
        row = next(r for r in data["accuracy"][g["task"]] if r["label"] == g["label"])
        row["gap_vs_fp32"] = g["gap"] if g["task"] == "digits" else 100 * g["gap"]
        row["goal_met"] = g["ok"]
    return data


def _write(data: dict[str, Any], command: str, machine: dict[str, Any] | None) -> str:
    md = markdown(data)
    if machine is None:  # a fresh run: record this machine
        write_results("memory", data, md, command)
        return md
    # A rebuild from the raw measurements keeps the machine and command they were measured with.
    from benchmarks.common import RESULTS_DIR

    payload = {"name": "memory", "command": command, "machine": machine, "data": data}
    (RESULTS_DIR / "memory.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    env = ", ".join(f"{k} {machine[k]}" for k in ("cpu", "cpu_count", "torch_threads", "torch", "python")
                    if machine.get(k) is not None)
    text = ["# memory", "", f"Command: `{command}`", "", f"Machine: {env}; date {machine['date']}; commit "
            f"{machine.get('git_commit') or 'unknown'}.", "", md.rstrip(), ""]
    (RESULTS_DIR / "memory.md").write_text("\n".join(text))
    return md


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--parts", nargs="+", default=["peak", "accuracy"], choices=["peak", "accuracy"])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--quick", action="store_true", help="a small GPT, one seed, write nothing")
    ap.add_argument("--rebuild", action="store_true",
                    help="recompute the summaries and tables of benchmarks/results/memory.json from its raw "
                         "measurements (no training)")
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(peak_child(args.child, args.steps, args.batch, args.quick)))
        return {}
    if args.rebuild:
        from benchmarks.common import RESULTS_DIR

        payload = json.loads((RESULTS_DIR / "memory.json").read_text())
        data = derive(payload["data"])
        print(_write(data, payload["command"], payload["machine"]))
        return data
    has_ao = torchao_available()
    skipped = None if has_ao else "torchao is not installed (pip install adaprec[torchao])"
    data: dict[str, Any] = {"steps": args.steps, "batch": args.batch, "seq_len": 256,
                            "torchao_skipped": skipped, "peak": [], "runs": [], "seeds": []}
    t_start = time.perf_counter()
    if "peak" in args.parts:
        labels = [k for k, c in PEAK_CONFIGS.items() if has_ao or c["kind"] != "torchao"]
        print("part 1: peak memory", flush=True)
        data["peak"] = run_peak(labels, 2 if args.quick else args.steps, args.batch, args.quick)
    if "accuracy" in args.parts:
        seeds = list(range(1 if args.quick else args.seeds))
        labels = [k for k, c in ACC_CONFIGS.items() if has_ao or c["kind"] != "torchao"]
        jobs = [(t, lab, s, args.quick) for t in args.tasks for lab in labels for s in seeds
                if not (t == "digits" and ACC_CONFIGS[lab]["kind"] == "torchao")]  # no 8-bit SGD there
        jobs.sort(key=lambda j: j[0] == "digits")  # slow ones first
        print(f"part 2: {len(jobs)} accuracy runs", flush=True)
        with ProcessPoolExecutor(max_workers=args.workers) as pool:
            data["runs"] = list(pool.map(acc_run, *zip(*jobs)))
        data["seeds"] = seeds
    data["wall_time_s"] = time.perf_counter() - t_start
    derive(data)
    if args.quick:
        print(markdown(data))
    else:
        print(_write(data, command_line(), None))
    return data


if __name__ == "__main__":
    main()
