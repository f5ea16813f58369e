"""Overhead of the controller and of simulated quantization on one training step (issue 2 benchmark).

One SGD step (forward, backward, update) of a CIFAR-shaped ResNet-20, batch 128 of synthetic 3x32x32
images, in each configuration of :data:`CONFIGS`, eager and under ``torch.compile``. All
configurations live in one process and are timed in alternating order, round after round, so that a
change in machine load hits them alike; the figure is the median step time and its ratio to plain
PyTorch in the same mode. Ratios use process CPU time by default (``--clock wall`` for wall-clock):
on a shared machine other jobs inflate wall-clock times unevenly, much less the CPU time of this
single-threaded process. Both are recorded.

Targets (issue 2): ``Controller("fp32")`` <= 1.03x plain; fixed 8-bit simulation <= 1.5x plain eager and
<= 1.25x plain compiled.

Usage::

    python benchmarks/overhead.py                   # eager and compiled, 1 thread, writes results/
    python benchmarks/overhead.py --modes eager --rounds 5 --no-write   # a quick look

To add a configuration, append a :class:`Config` to :data:`CONFIGS` (a name, a function that builds the
controller for a model and its optimizer — or ``None`` for plain PyTorch — and the target ratio, if any).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

from common import PRODUCT_OPS, median, profile_step, write_results  # noqa: E402

import adaprec  # noqa: E402

try:
    from adaprec.tasks.cifar import resnet20
except ImportError:  # pragma: no cover - the tasks package is optional for this benchmark
    resnet20 = None

BATCH = 128


@dataclass(frozen=True)
class Config:
    """One way of running the training step.

    ``make(model, optimizer)`` returns the context manager to enter (an ``adaprec.Controller``) or
    ``None`` for plain PyTorch; ``target`` maps a mode (``"eager"``/``"compiled"``) to the largest
    acceptable ratio to plain PyTorch in that mode.
    """

    name: str
    make: Callable[[nn.Module, torch.optim.Optimizer], contextlib.AbstractContextManager | None]
    target: dict[str, float]
    note: str = ""
    modes: tuple[str, ...] = ("eager", "compiled")


CONFIGS: list[Config] = [
    Config("plain", lambda m, o: None, {}, "plain PyTorch, no controller"),
    Config("fp32", lambda m, o: adaprec.Controller(m, policy="fp32", optimizer=o),
           {"eager": 1.03, "compiled": 1.03}, 'Controller(policy="fp32"): observers and cost meter only'),
    Config("fixed8", lambda m, o: adaprec.Controller(m, policy=adaprec.policies.Fixed(bits=8, grad_bits=8),
                                                     optimizer=o),
           {"eager": 1.5, "compiled": 1.25}, "Fixed 8/8/8 on all convs and the FC (default settings)"),
    Config("fixed8-noguard",
           lambda m, o: adaprec.Controller(m, policy=adaprec.policies.Fixed(bits=8, grad_bits=8),
                                           optimizer=o, guard=False),
           {}, "as fixed8 without the divergence guard (its per-step gradient check)"),
]

# --- issue 8: CPT 3-8/8 and the reference quantizer of the CPT authors -------------------------------
# A short schedule (period 8 steps) so the timed steps cover every bit-width 3..8 several times. No
# classifier floor, so the FC cycles too, exactly like the reference.
from reference_quantizer import ReferenceCPT  # noqa: E402

_CPT = {"bits": (3, 8), "grad_bits": 8, "cycles": 8}
CONFIGS += [
    Config("cpt", lambda m, o: adaprec.Controller(m, policy=adaprec.policies.make_policy("cpt", **_CPT),
                                                  optimizer=o, total_steps=64, classifier_floor=False),
           {"eager": 1.3, "compiled": 1.15}, "CPT 3-8/8 on all convs and the FC (issue 8 targets)"),
    Config("cpt-reference", lambda m, o: ReferenceCPT(m, o, total_steps=64, **_CPT), {},
           "the same CPT 3-8/8 with a straightforward reimplementation of the CPT authors' quantizer "
           "(benchmarks/reference_quantizer.py), eager only: its Python-int bits recompile at every new "
           "width, and compiled beside the others (all copies share one forward) those recompiles made "
           "even the plain compiled model run 2-3x slower",
           modes=("eager",)),
]


# --- the model -------------------------------------------------------------------------------------

class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = cout - cin  # option-A shortcut: subsample and zero-pad channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x if self.pad == 0 else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad // 2, self.pad // 2))
        return F.relu(out + sc)


def _fallback_resnet20() -> nn.Module:
    """ResNet-20 (He et al. 2016, CIFAR variant), used only when adaprec.tasks.cifar is missing."""
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
            layers.append(_Block(cin, cout, stride if i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


def build_model() -> nn.Module:
    return resnet20() if resnet20 is not None else _fallback_resnet20()


# --- timing ----------------------------------------------------------------------------------------

class _Runner:
    """A model, its optimizer and (entered) controller, and the callable the step goes through."""

    def __init__(self, cfg: Config, base: nn.Module, mode: str, stack: contextlib.ExitStack) -> None:
        self.cfg = cfg
        self.model = copy.deepcopy(base)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        ctl = cfg.make(self.model, self.opt)
        if ctl is not None:
            stack.enter_context(ctl)
        # Compile inside the controller, as the docs ask users to.
        self.fn = torch.compile(self.model) if mode == "compiled" else self.model

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """One training step; returns its (wall-clock, process CPU) seconds."""
        t0, c0 = time.perf_counter(), time.process_time()
        loss = F.cross_entropy(self.fn(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return time.perf_counter() - t0, time.process_time() - c0


def measure(mode: str, configs: list[Config], rounds: int, warmup: int, clock: str,
            profile: bool = False) -> dict[str, dict]:
    """Median step times of ``configs`` in ``mode``; ratios to plain use ``clock`` ("cpu" or "wall").
    ``profile``: afterwards, one more step per configuration under ``torch.profiler`` (:func:`_profile`)."""
    torch.manual_seed(0)
    base = build_model()
    x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))
    configs = [c for c in configs if mode in c.modes]
    times: dict[str, list[tuple[float, float]]] = {c.name: [] for c in configs}
    with contextlib.ExitStack() as stack:
        runners = [_Runner(c, base, mode, stack) for c in configs]
        for r in runners:
            t0 = time.perf_counter()
            for _ in range(warmup):
                r.step(x, y)
            print(f"[{mode}] {r.cfg.name}: warm-up {time.perf_counter() - t0:.1f}s", flush=True)
        for i in range(rounds):
            # Rotate the order every round so that no configuration always runs first or last.
            for r in runners[i % len(runners):] + runners[:i % len(runners)]:
                times[r.cfg.name].append(r.step(x, y))
        profiles = {r.cfg.name: _profile(r, x, y) for r in runners} if profile else {}
    k = 1 if clock == "cpu" else 0
    plain = median([t[k] for t in times["plain"]])
    plain_other = median([t[1 - k] for t in times["plain"]])
    out = {}
    for c in configs:
        med = median([t[k] for t in times[c.name]])
        other = median([t[1 - k] for t in times[c.name]])
        ratio = med / plain
        target = c.target.get(mode)
        out[c.name] = {"clock": clock, "median_s": med, "ratio": ratio, "target": target,
                       "meets_target": None if target is None else ratio <= target,
                       f"median_{'wall' if k else 'cpu'}_s": other,
                       f"ratio_{'wall' if k else 'cpu'}": other / plain_other,
                       "wall_s": [t[0] for t in times[c.name]], "cpu_s": [t[1] for t in times[c.name]],
                       "note": c.note}
        if c.name in profiles:
            out[c.name]["profile"] = profiles[c.name]
        print(f"[{mode}] {c.name:16s} median {med * 1e3:8.1f} ms ({clock})  x{ratio:.3f}"
              f"  [{'wall' if k else 'cpu'}: x{other / plain_other:.3f}]"
              + ("" if target is None else f"  (target <= {target}: {'ok' if ratio <= target else 'MISS'})"),
              flush=True)
    return out


#: Profile categories (self CPU time): the products, the stochastic-rounding noise draws, Inductor's
#: generated code (it runs inside the compiled graph's call, so that call's self time is its loops),
#: and everything else (eager elementwise work, batch norm, the optimizer).
_PROFILE_CATEGORIES = ("products", "noise", "compiled_loops", "other")


def _profile_category(name: str) -> str:
    if name in PRODUCT_OPS:
        return "products"
    if name == "aten::random_":
        return "noise"
    if name.startswith("## Call CompiledFxGraph"):
        return "compiled_loops"
    return "other"


def _profile(runner: _Runner, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Self CPU time (ms) of one profiled step, by :data:`_PROFILE_CATEGORIES`, and its top operators."""
    return profile_step(lambda: runner.step(x, y), _profile_category, _PROFILE_CATEGORIES, top=6)


def bool_store_check(rounds: int = 9) -> dict[str, float]:
    """Inductor's generated CPU code storing a bool tensor (``x <= 0``, as a ReLU's mask is saved for its
    backward) against eager PyTorch, on an activation-sized tensor; ``relu_aminmax`` (a float result and
    a reduction, no bool) for scale. Quantized activations make torch.compile's partitioner save ReLU
    masks as bool tensors where plain training saves nothing extra, so this is a cost of the
    compiled quantized step that plain compiled training does not pay."""
    x = torch.randn(BATCH, 16, 32, 32)
    fns = {"eager_mask": lambda t: t <= 0, "compiled_mask": torch.compile(lambda t: t <= 0),
           "compiled_relu_aminmax": torch.compile(lambda t: (torch.relu(t), torch.aminmax(t)))}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():  # compile and warm up
        f(x), f(x)
    for _ in range(rounds):
        for k, f in fns.items():
            c0 = time.process_time()
            f(x)
            cpu[k].append(time.process_time() - c0)
    return {"elements": x.numel(), **{f"{k}_ms": 1e3 * median(v) for k, v in cpu.items()}}


def _table(results: dict[str, dict[str, dict]], clock: str, bool_store: dict | None = None) -> str:
    other = "wall" if clock == "cpu" else "cpu"
    rows = [f"| mode | configuration | median step, {clock} (ms) | ratio to plain | target | met "
            f"| ratio by {other} time |", "|---|---|---:|---:|---:|:---:|---:|"]
    for mode, res in results.items():
        for name, r in res.items():
            tgt = "" if r["target"] is None else f"<= {r['target']}"
            met = "" if r["meets_target"] is None else ("yes" if r["meets_target"] else "**no**")
            rows.append(f"| {mode} | {name} | {r['median_s'] * 1e3:.1f} | {r['ratio']:.3f} | {tgt} | {met} "
                        f"| {r[f'ratio_{other}']:.3f} |")
    measured = {name for res in results.values() for name in res}
    notes = [f"- `{c.name}`: {c.note}" for c in CONFIGS if c.name in measured]
    why = (f"Ratios use the median {clock} time per step. Process CPU time is the default because the "
           "benchmark machine may be shared: other jobs inflate wall-clock times unevenly, but hardly "
           "the CPU time this single-threaded process spends.")
    prof = [f"| {mode} | {name} | {p['total_ms']:.0f} | "
            + " | ".join(f"{p[f'{k}_ms']:.0f}" for k in _PROFILE_CATEGORIES) + " |"
            for mode, res in results.items() for name, r in res.items() if (p := r.get("profile"))]
    if prof:
        prof = ["", "**Profile** (one step per configuration after the timed rounds, self CPU time under "
                "`torch.profiler`, ms; *compiled loops*: Inductor's generated code, which runs inside the "
                "compiled graph's call; *noise*: the stochastic-rounding draws, `aten::random_`):", "",
                "| mode | configuration | total | products | noise | compiled loops | other |",
                "|---|---|---:|---:|---:|---:|---:|"] + prof
    return "\n".join(rows + prof + [""] + notes + ["", why] + _bool_lines(bool_store))


def _bool_lines(b: dict | None) -> list[str]:
    if not b:
        return []
    return ["", f"**Bool stores under torch.compile** ({b['elements']:,} elements, median ms): "
            f"`x <= 0` eager {b['eager_mask_ms']:.1f}, compiled {b['compiled_mask_ms']:.1f}; "
            f"a compiled ReLU + min/max of the same tensor {b['compiled_relu_aminmax_ms']:.1f}."]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument("--configs", nargs="+", default=[c.name for c in CONFIGS],
                    choices=[c.name for c in CONFIGS])
    ap.add_argument("--rounds", type=int, default=15, help="timed steps per configuration and mode")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (same for all runs)")
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                    help="time the ratios use: process CPU time (robust on a shared machine) or wall clock")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one step per configuration (where the time goes; in the results)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write benchmarks/results/")
    args = ap.parse_args(argv)
    if "plain" not in args.configs:
        args.configs.insert(0, "plain")
    torch.set_num_threads(args.threads)
    configs = [c for c in CONFIGS if c.name in args.configs]
    results = {mode: measure(mode, configs, args.rounds, args.warmup, args.clock, args.profile)
               for mode in args.modes}
    data = {"batch": BATCH, "model": "resnet20 (adaprec.tasks.cifar)" if resnet20 else "resnet20 (fallback)",
            "rounds": args.rounds, "warmup": args.warmup, "threads": args.threads, "clock": args.clock,
            "results": results}
    if args.profile and "compiled" in args.modes:
        data["inductor_bool_store"] = bool_store_check()
    if not args.no_write:
        cmd = "python benchmarks/overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_results("overhead", data, _table(results, args.clock, data.get("inductor_bool_store")),
                      cmd.strip())
    return data


if __name__ == "__main__":
    main()
