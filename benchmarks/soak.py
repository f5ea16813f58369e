"""Soak test: a long CPT run must not grow in memory (DESIGN.md, issue 9 "long runs").

Trains a small MLP on the bundled digits (scikit-learn, 1,437 training images of 8x8 pixels) for
20,000 iterations under ``CPT(bits=(3, 8), grad_bits=8, cycles=32)`` with the divergence guard on, a
TensorBoard logger attached and ``ctl.observe(loss=...)`` every step — everything a real run keeps
alive. Every 1,000 iterations it samples the process's resident memory (``VmRSS`` from
``/proc/self/status``), the number of live Python objects after a garbage collection, the length of
``ctl.history`` and the pickled size of ``ctl.state_dict()``.

Memory must depend on the number of precision *changes* (CPT: at most ``B_max - B_min + 1`` per
cycle), never on the number of steps: the check is that RSS after the warm-up (from the second sample
on) grows by less than ``--rss-bound-mib`` (default 8 MiB) and that the Python object count stays
within a few hundred of its value at the second sample, plus 10 per precision change recorded since
(a history entry is a handful of objects). Writes ``benchmarks/results/soak.{json,md,png}``.

Run: ``python benchmarks/soak.py`` (a few minutes on two busy CPU cores);
``python benchmarks/soak.py --quick`` for 2,000 steps that write nothing.

Example:
    >>> rss_mib() > 0
    True
"""

from __future__ import annotations

import argparse
import gc
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import adaprec  # noqa: E402
from adaprec.policies import CPT  # noqa: E402
from adaprec.tasks.digits import load_digits_split  # noqa: E402
from benchmarks.common import RESULTS_DIR, command_line, write_results  # noqa: E402

__all__ = ["rss_mib", "soak", "main"]


def rss_mib() -> float:
    """Resident set size of this process in MiB (``VmRSS`` in ``/proc/self/status``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0  # reported in kB
    raise RuntimeError("no VmRSS line in /proc/self/status (this benchmark needs Linux)")


def _state_bytes(ctl: adaprec.Controller) -> int:
    buf = io.BytesIO()
    torch.save(ctl.state_dict(), buf)
    return buf.tell()


def soak(steps: int = 20_000, sample_every: int = 1_000, batch_size: int = 32, seed: int = 0,
         logdir: str | None = None) -> dict[str, Any]:
    """Train ``steps`` iterations under CPT, sampling memory every ``sample_every``; returns the samples."""
    torch.manual_seed(seed)
    x, y, _, _ = load_digits_split(seed)
    x = x.reshape(len(x), -1)
    starts = range(0, len(x) - batch_size + 1, batch_size)
    batches = [(x[i:i + batch_size], y[i:i + batch_size]) for i in starts]
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    policy = CPT(bits=(3, 8), grad_bits=8, cycles=32)
    samples: list[dict[str, Any]] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, \
            adaprec.Controller(model, policy=policy, optimizer=opt, total_steps=steps) as ctl:
        from adaprec.tensorboard import Logger

        Logger(logdir or tmp, log_every=100).attach(ctl)
        while ctl.step_count < steps:
            for xb, yb in ctl.epoch(batches):
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                ctl.observe(loss=loss.detach())
                if ctl.step_count % sample_every == 0:
                    gc.collect()
                    samples.append({"step": ctl.step_count, "rss_mib": round(rss_mib(), 2),
                                    "objects": len(gc.get_objects()), "history": len(ctl.history),
                                    "state_bytes": _state_bytes(ctl), "loss": round(loss.item(), 4),
                                    "seconds": round(time.perf_counter() - start, 1)})
                if ctl.step_count >= steps:
                    break
    seconds = time.perf_counter() - start
    return {"steps": steps, "sample_every": sample_every, "batch_size": batch_size,
            "seconds": round(seconds, 1), "ms_per_step": round(1e3 * seconds / steps, 3), "samples": samples,
            "precision_changes": len(ctl.history), "report_gbitops": round(ctl.report()["gbitops"], 3)}


def _check(result: dict[str, Any], rss_bound: float, object_bound: int) -> dict[str, Any]:
    s = result["samples"]
    base = s[1] if len(s) > 1 else s[0]  # the first sample still includes warm-up allocations
    rss_growth = max(v["rss_mib"] for v in s[1:] or s) - base["rss_mib"]
    obj_growth = max(v["objects"] for v in s[1:] or s) - base["objects"]
    # Each history entry is a handful of objects (the entry and its two per-layer dicts): allow 10 per
    # change made since the base sample, plus a small constant.
    object_bound = object_bound + 10 * (s[-1]["history"] - base["history"])
    # CPT changes precision at most (B_max - B_min + 1) = 6 times per cycle: history is bounded by that.
    bound_changes = 6 * (32 + 1)
    return {"rss_growth_mib": round(rss_growth, 2), "rss_bound_mib": rss_bound,
            "object_growth": obj_growth, "object_bound": object_bound,
            "history_bound": bound_changes, "history_ok": result["precision_changes"] <= bound_changes,
            "ok": rss_growth < rss_bound and obj_growth < object_bound
            and result["precision_changes"] <= bound_changes}


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["samples"]
    steps = [v["step"] for v in s]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(steps, [v["rss_mib"] for v in s], marker="o")
    ax[0].set(xlabel="iteration", ylabel="resident memory (MiB)", title="RSS under CPT 3-8/8, 32 cycles")
    lo = min(v["rss_mib"] for v in s)
    ax[0].set_ylim(lo - 10, lo + 30)
    ax[1].plot(steps, [v["history"] for v in s], marker="o", label="ctl.history entries")
    bound = result["check"]["history_bound"]
    ax[1].axhline(bound, color="grey", ls="--", lw=1, label=f"bound: 6 changes x 33 cycles = {bound}")
    ax[1].plot(steps, [v["state_bytes"] / 1024 for v in s], marker="s", label="ctl.state_dict() (KiB)")
    ax[1].set(xlabel="iteration", title="controller state (one entry per change, not per step)")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20_000)
    ap.add_argument("--sample-every", type=int, default=1_000)
    ap.add_argument("--rss-bound-mib", type=float, default=8.0)
    ap.add_argument("--object-bound", type=int, default=300,
                    help="allowed growth of live Python objects besides 10 per history entry")
    ap.add_argument("--quick", action="store_true", help="2,000 steps, print only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    steps, every = (2_000, 200) if args.quick else (args.steps, args.sample_every)
    if steps < 2 * every:
        ap.error("--steps must be at least twice --sample-every (the first sample is the warm-up)")
    result = soak(steps, every)
    result["check"] = _check(result, args.rss_bound_mib, args.object_bound)
    rows = ["| step | RSS (MiB) | Python objects | history entries | state_dict (bytes) | loss |",
            "|---:|---:|---:|---:|---:|---:|"]
    rows += [f"| {v['step']} | {v['rss_mib']:.1f} | {v['objects']} | {v['history']} | {v['state_bytes']} | "
             f"{v['loss']:.3f} |" for v in result["samples"]]
    c = result["check"]
    summary = (f"{steps} iterations of a 64-32-10 MLP on digits under CPT 3-8/8 (32 cycles), guard on, "
               f"TensorBoard logger attached: {result['ms_per_step']} ms per iteration.\n\n"
               f"RSS growth after the first sample: **{c['rss_growth_mib']} MiB** "
               f"(bound {c['rss_bound_mib']} MiB); live Python objects: **{c['object_growth']:+d}** "
               f"(bound {c['object_bound']}); "
               f"`ctl.history`: {result['precision_changes']} entries, one per precision change "
               f"(bound {c['history_bound']}). Verdict: **{'bounded' if c['ok'] else 'GROWS'}**.\n\n"
               "![soak](soak.png)\n")
    print(summary)
    print("\n".join(rows))
    if not args.quick:
        _plot(result, RESULTS_DIR / "soak.png")
        write_results("soak", result, summary + "\n" + "\n".join(rows), command_line())
    return 0 if c["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
