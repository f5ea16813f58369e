"""The README's main job, measured: ``adaprec train`` with no options, as a user runs it.

Runs the command line in fresh processes, exactly as typed (plus ``--logdir``/``--name``/``--json`` to
collect its output), from this checkout:

1. ``adaprec train`` (CPT 3-8/8 on the digits CNN, 10 epochs, seed 0, one thread — the digits task's
   default) ``--repeats`` times: its report, the wall time of the whole command (interpreter start,
   imports, data, training, evaluation, logs) and the training loop's own time, and that every repeat
   gives the same accuracy and cost (the run is deterministic on one thread);
2. the same with ``--policy fp32`` and ``--policy fixed`` (static 8/8), the baselines the README quotes;
3. once with torch's default thread count (``--threads <torch's default>``), to show what threads cost
   on a small model when the cores are shared;
4. ``adaprec report`` of the first CPT run, written to ``docs/inspect.png`` (the README's figure).

Writes ``benchmarks/results/main_job.{json,md}``; the README's main-job figures are read from there by
``benchmarks/readme_figures.py``. Run: ``python benchmarks/main_job.py`` (about a minute).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import command_line, median, write_results  # noqa: E402

__all__ = ["run_train", "main"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def run_train(extra: list[str], out: Path, name: str) -> dict[str, Any]:
    """``adaprec train --quiet --logdir out --name name --json ... <extra>`` in a fresh process."""
    js = out / f"{name}.json"
    cmd = [sys.executable, "-m", "adaprec.cli", "train", "--quiet", "--logdir", str(out), "--name", name,
           "--json", str(js), *extra]
    t = time.perf_counter()
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, cwd=out, env=_env(), capture_output=True, text=True)
    wall = time.perf_counter() - t
    ru2 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru2.ru_utime - ru.ru_utime) + (ru2.ru_stime - ru.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(js.read_text())
    result["command_wall_s"] = wall
    result["command_cpu_s"] = cpu  # user + system CPU of the process: what it costs, whatever the load
    result["stderr"] = proc.stderr.strip()
    return result


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    rep = r["report"]
    return {"accuracy": r["metrics"]["accuracy"], "steps": r["steps"], "gbitops": rep["gbitops"],
            "gbitops_fp32": rep["gbitops_fp32"], "gbitops_reference": rep["gbitops_reference"],
            "savings_vs_fp32": rep["savings_vs_fp32"], "savings_vs_reference": rep["savings_vs_reference"],
            "training_s": r["wall_time_s"], "command_wall_s": r["command_wall_s"],
            "command_cpu_s": r["command_cpu_s"],
            "time_at_precision": rep["time_at_precision"]}


def _default_threads() -> int:
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                         capture_output=True, text=True, env=_env())
    return int(out.stdout.strip())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--figure", type=Path, default=ROOT / "docs" / "inspect.png",
                    help="where the CPT run's report PNG goes")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        cpt = [run_train([], out, "digits-cpt" if i == 0 else f"digits-cpt-{i}") for i in range(args.repeats)]
        fp32 = run_train(["--policy", "fp32"], out, "digits-fp32")
        fixed = run_train(["--policy", "fixed"], out, "digits-fixed")
        threads = _default_threads()
        many = run_train(["--threads", str(threads)], out, "digits-cpt-threads")
        report = subprocess.run([sys.executable, "-m", "adaprec.cli", "report", str(out / "digits-cpt"),
                                 "-o", str(out / "inspect.png")], cwd=out, env=_env(), capture_output=True,
                                text=True)
        if report.returncode != 0:
            raise RuntimeError(report.stderr)
        shutil.copyfile(out / "inspect.png", args.figure)
    runs = [_summary(r) for r in cpt]
    keys = ("accuracy", "gbitops", "savings_vs_fp32", "savings_vs_reference", "steps")
    deterministic = all(all(r[k] == runs[0][k] for k in keys) for r in runs)
    if not deterministic:
        accs = [r["accuracy"] for r in runs]
        raise SystemExit(f"adaprec train is not deterministic across repeats: accuracies {accs}")
    data: dict[str, Any] = {
        "command": "adaprec train",
        "repeats": args.repeats,
        "deterministic": deterministic,
        "cpt": {**runs[0], "command_wall_s": median([r["command_wall_s"] for r in runs]),
                "command_cpu_s": median([r["command_cpu_s"] for r in runs]),
                "training_s": median([r["training_s"] for r in runs]),
                "command_wall_s_all": [r["command_wall_s"] for r in runs],
                "training_s_all": [r["training_s"] for r in runs],
                "config": cpt[0]["config"], "policy": cpt[0]["policy"], "warnings": cpt[0]["stderr"]},
        "fp32": _summary(fp32),
        "fixed8": _summary(fixed),
        "default_threads": {"threads": threads, **_summary(many)},
        "figure": str(args.figure.resolve().relative_to(ROOT)) if args.figure.resolve().is_relative_to(ROOT)
        else str(args.figure),
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "wall_time_s": time.perf_counter() - start,
    }
    c = data["cpt"]
    c["startup_s"] = c["command_wall_s"] - c["training_s"]
    c["cpu_outside_training_s"] = c["command_cpu_s"] - c["training_s"]
    md = [
        "`adaprec train` with no options: CPT 3-8/8 on the digits CNN, 10 epochs, seed 0, one torch thread "
        f"(the digits task's default); {args.repeats} fresh processes, identical results: "
        f"{'yes' if deterministic else 'NO'}.",
        "",
        "| run | test accuracy | GBitOPs | savings vs FP32 | savings vs static 8/8 | training loop (s) | "
        "whole command, wall (s) | whole command, CPU (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in (("CPT 3-8/8 (default)", c), ("FP32", data["fp32"]), ("static 8/8 (`--policy fixed`)",
                                                                          data["fixed8"]),
                     (f"CPT 3-8/8, {threads} threads (torch's default)", data["default_threads"])):
        md.append(f"| {label} | {r['accuracy']:.4f} | {r['gbitops']:.1f} | {r['savings_vs_fp32']:.1%} | "
                  f"{r['savings_vs_reference']:.1%} | {r['training_s']:.2f} | {r['command_wall_s']:.2f} | "
                  f"{r['command_cpu_s']:.2f} |")
    md += ["", f"Median over the repeats for the default run. The whole command includes the interpreter, "
           f"the imports (torch, scikit-learn), loading the data and writing the logs: "
           f"{c['startup_s']:.2f} s besides the training loop. Load average before/after: "
           f"{load_before} / {data['load_average_after']} (shared machine).",
           "", f"Figure: `{data['figure']}` (`adaprec report` of the first run)."]
    text = "\n".join(md)
    print(text)
    write_results("main_job", data, text, command_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
