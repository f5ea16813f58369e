"""Shared helpers of the benchmark scripts: what machine a figure was measured on, and where it goes.

Every benchmark writes two files to ``benchmarks/results/``: ``<name>.json`` (the numbers, the machine
and the command that produced them, for tools) and ``<name>.md`` (a small Markdown report for people).

Example:
    >>> info = machine_info()
    >>> sorted(k for k in ("python", "torch", "cpu_count") if k in info)
    ['cpu_count', 'python', 'torch']
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["RESULTS_DIR", "PRODUCT_OPS", "machine_info", "write_results", "median", "mean_std",
           "command_line", "profile_step"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


#: Operators that are a model's products (matmuls, convolutions, their gradients): the "products"
#: category of the benchmarks' profiles.
PRODUCT_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_int_mm", "aten::mv",
               "aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution",
               "aten::mkldnn_linear")


def profile_step(step: Any, categorize: Any, categories: tuple[str, ...], top: int = 12) -> dict[str, Any]:
    """Run ``step()`` once under ``torch.profiler`` (CPU) and sum each operator's self time (ms) into
    ``categorize(name)``'s category: ``{"<category>_ms": ..., "total_ms": ..., "top": [...]}`` with the
    ``top`` operators by self time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    cats = dict.fromkeys(categories, 0.0)
    ops = []
    for e in prof.key_averages():
        ms = e.self_cpu_time_total / 1e3
        cats[categorize(e.key)] += ms
        ops.append((ms, e.key, e.count))
    ops.sort(reverse=True)
    return {**{f"{k}_ms": v for k, v in cats.items()}, "total_ms": sum(cats.values()),
            "top": [{"op": k, "self_ms": ms, "calls": c} for ms, k, c in ops[:top]]}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS_DIR.parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def machine_info() -> dict[str, Any]:
    """The facts a timing depends on: CPU/GPU, thread count, Python, torch and adaprec versions."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_commit": _git_commit(),
    }
    try:
        import adaprec

        info["adaprec"] = adaprec.__version__
    except Exception:  # the benchmark may run against a broken checkout; the info must still come back
        info["adaprec"] = None
    return info


def command_line() -> str:
    """How this script was started, to put next to its results."""
    return " ".join(["python", *sys.argv])


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the non-NaN values (std 0 for one value, NaN for none).

    Example:
        >>> mean_std([1.0, 3.0, float("nan")])
        (2.0, 1.4142135623730951)
    """
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def write_results(name: str, data: dict, table_md: str, command: str) -> None:
    """Write ``benchmarks/results/<name>.json`` and ``<name>.md``.

    ``data`` are the benchmark's numbers (JSON-serialisable), ``table_md`` a Markdown table (or any
    Markdown body) for the report, ``command`` the command line that reproduces the result.
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"result name must be a plain file stem, got {name!r}")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    payload = {"name": name, "command": command, "machine": machine, "data": data}
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    env = ", ".join(f"{k} {machine[k]}" for k in ("cpu", "cpu_count", "torch_threads", "torch", "python")
                    if machine.get(k) is not None)
    md = [f"# {name}", "", f"Command: `{command}`", "", f"Machine: {env}; "
          f"date {machine['date']}; commit {machine.get('git_commit') or 'unknown'}.", "",
          table_md.rstrip(), ""]
    (RESULTS_DIR / f"{name}.md").write_text("\n".join(md))
