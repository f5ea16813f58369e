"""How long ``import adaprec`` and the CLI's cheapest commands take, and how much of it is adaprec's own.

Every measurement runs in a fresh Python process (an import is only slow the first time in a process):

* ``import torch`` alone — the floor nothing in adaprec can lower;
* ``import adaprec`` — what a script pays;
* ``import torch; import adaprec`` under ``python -X importtime`` — adaprec's *own* share: the
  cumulative time of the ``adaprec`` package once torch is already loaded (its modules plus the
  third-party packages it pulls in that torch does not);
* ``adaprec --help`` and ``adaprec policies`` (as ``python -m adaprec.cli ...``) — wall time of a command
  that does no training;
* the first ``adaprec.Controller(...)`` of a process, right after the import (what else it imports);
* which optional heavy packages (optuna, tensorboard, matplotlib, scikit-learn, …) ``import adaprec``
  loads, and whether ``adaprec.optim`` is reachable right after it.

``--before REF`` also measures the tree of the git revision ``REF`` (exported to a temporary folder), side
by side and alternating with the working tree, so that the two are compared under the same load.
Medians over ``--rounds`` runs of each; wall-clock times, since import time is mostly file reads and
module execution in one thread.

Run: ``python benchmarks/import_time.py --before 5503a6f`` (about a minute); writes
``benchmarks/results/import_time.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import command_line, median, write_results  # noqa: E402

__all__ = ["measure_tree", "importtime_share", "main"]

#: Packages adaprec uses only for some features; ``import adaprec`` should not load them.
OPTIONAL = ("optuna", "tensorboard", "torch.utils.tensorboard", "matplotlib", "sklearn", "scipy",
            "torchvision", "adaprec.tune", "adaprec.tasks", "adaprec.tensorboard", "adaprec.plots")

_PROBE = """
import sys, time, json
t = time.perf_counter()
import adaprec
dt = time.perf_counter() - t
loaded = [m for m in {optional!r} if m in sys.modules]
try:
    ok = hasattr(adaprec.optim, "KahanSGD")
except AttributeError:
    ok = False
import torch
t = time.perf_counter()
adaprec.Controller(torch.nn.Linear(2, 2))  # the first controller of a process (not entered)
ctl_s = time.perf_counter() - t
print(json.dumps({{"import_s": dt, "loaded": loaded, "optim_reachable": ok, "controller_s": ctl_s}}))
"""


def _env(tree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    env["OMP_NUM_THREADS"] = "1"
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def _wall(cmd: list[str], tree: Path) -> float:
    t = time.perf_counter()
    out = subprocess.run(cmd, cwd=tree, env=_env(tree), capture_output=True, text=True)
    dt = time.perf_counter() - t
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed in {tree}: {out.stderr.strip()[-500:]}")
    return dt


def importtime_share(tree: Path) -> dict[str, float]:
    """``-X importtime`` of ``import torch; import adaprec``: adaprec's cumulative microseconds, and the
    self time of adaprec's own modules (``adaprec`` and ``adaprec.*``), in seconds."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import torch; import adaprec"],
                         cwd=tree, env=_env(tree), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-500:])
    cumulative, own = 0.0, 0.0
    for line in out.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        try:
            self_us, cum_us, name = (x.strip() for x in line[len("import time:"):].split("|"))
            self_v, cum_v = float(self_us), float(cum_us)
        except ValueError:
            continue  # the header line
        if name == "adaprec":
            cumulative = cum_v / 1e6
        if name == "adaprec" or name.startswith("adaprec."):
            own += self_v / 1e6
    return {"adaprec_cumulative_s": cumulative, "adaprec_modules_self_s": own}


def _probe(tree: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-c", _PROBE.format(optional=OPTIONAL)], cwd=tree,
                         env=_env(tree), capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-500:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_tree(tree: Path) -> dict[str, Any]:
    """One round of every measurement for the checkout at ``tree``."""
    py = sys.executable
    probe = _probe(tree)
    return {
        "torch_s": _wall([py, "-c", "import torch"], tree),
        "adaprec_s": _wall([py, "-c", "import adaprec"], tree),
        "help_s": _wall([py, "-m", "adaprec.cli", "--help"], tree),
        "policies_s": _wall([py, "-m", "adaprec.cli", "policies"], tree),
        **importtime_share(tree),
        "controller_s": probe["controller_s"],
        "loaded": probe["loaded"],
        "optim_reachable": probe["optim_reachable"],
    }


def _export(ref: str, dest: Path) -> Path:
    archive = subprocess.run(["git", "archive", "--format=tar", ref], cwd=ROOT, capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"git archive {ref} failed: {archive.stderr.decode().strip()}")
    tar = dest / "tree.tar"
    tar.write_bytes(archive.stdout)
    with tarfile.open(tar) as tf:
        try:
            tf.extractall(dest / "tree", filter="data")
        except TypeError:  # Python < 3.10.12 / 3.11.4: no extraction filters (our own git archive)
            tf.extractall(dest / "tree")
    return dest / "tree"


def _summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("torch_s", "adaprec_s", "help_s", "policies_s", "adaprec_cumulative_s", "adaprec_modules_self_s",
            "controller_s")
    out: dict[str, Any] = {k: median([r[k] for r in rounds]) for k in keys}
    out["adaprec_minus_torch_s"] = out["adaprec_s"] - out["torch_s"]
    out["loaded"] = rounds[-1]["loaded"]
    out["optim_reachable"] = rounds[-1]["optim_reachable"]
    out["rounds"] = rounds
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--before", metavar="REF", help="also measure this git revision, side by side")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)

    trees = {"after": ROOT}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        if args.before:
            trees = {"before": _export(args.before, Path(tmp)), **trees}
        rounds: dict[str, list[dict[str, Any]]] = {k: [] for k in trees}
        for _ in range(args.rounds):
            for name, tree in trees.items():  # alternate, so both see the same machine load
                rounds[name].append(measure_tree(tree))
    data: dict[str, Any] = {"rounds": args.rounds, "before_ref": args.before,
                            "load_average_before": list(load_before),
                            "load_average_after": list(os.getloadavg()),
                            "optional_packages": list(OPTIONAL),
                            **{k: _summary(v) for k, v in rounds.items()}}
    cols = list(trees)
    rows = [("`python -c \"import torch\"`", "torch_s"), ("`python -c \"import adaprec\"`", "adaprec_s"),
            ("adaprec's own share (`-X importtime`, torch already loaded)", "adaprec_cumulative_s"),
            ("  of which adaprec's own modules", "adaprec_modules_self_s"),
            ("`adaprec --help`", "help_s"), ("`adaprec policies`", "policies_s"),
            ("first `adaprec.Controller(...)` after `import adaprec`", "controller_s")]
    head = "| measurement (median, wall s) | " + " | ".join(cols) + " |"
    md = [head, "|---|" + "---:|" * len(cols)]
    for label, key in rows:
        md.append(f"| {label} | " + " | ".join(f"{data[c][key]:.3f}" for c in cols) + " |")
    md.append("| optional packages loaded by `import adaprec` | "
              + " | ".join(", ".join(data[c]["loaded"]) or "none" for c in cols) + " |")
    md.append("| `adaprec.optim` reachable after `import adaprec` | "
              + " | ".join("yes" if data[c]["optim_reachable"] else "no" for c in cols) + " |")
    md += ["", f"{args.rounds} fresh processes per cell, alternating between the trees; OMP_NUM_THREADS=1. "
           f"Load average before/after: {data['load_average_before']} / {data['load_average_after']} "
           "(a shared machine: absolute times scale with the load, the before/after comparison does not)."]
    text = "\n".join(md)
    print(text)
    if not args.no_write:
        write_results("import_time", data, text, command_line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
