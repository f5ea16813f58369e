"""Real speed from precision decisions: a GPT-style model on the hardware backend (issue 8 benchmark).

Trains the decoder-only transformer of the ``gptlm`` task (:class:`adaprec.tasks.gptlm.GPT`: pre-norm
blocks of Linear layers, causal scaled-dot-product attention) as a character-level language model on
the English text that ships with CPython (``pydoc_data.topics``) under five precision plans, each
from the same initial weights and batches:

* ``fp32``: plain float32 matmuls (TF32 off);
* ``bf16``: every Linear on bf16 kernels (autocast-style, float32 master weights);
* ``fp8``: every Linear on ``torch._scaled_mm`` (E4M3 forward, E5M2 errors, per-tensor scales);
* ``muppet``: the MuPPET rule climbing ``fp8_e4m3 -> bf16 -> fp32`` (``max_epochs_per_level`` caps
  each level, an "epoch" being ``--epoch-steps`` steps);
* ``cycle``: a CPT-style cosine cycle between FP8 (low) and BF16 (high), period ``--period`` steps.

The classifier keeps the controller's default floor (a ~100-character vocabulary needs >= 10 bits, so
its FP8 decisions run in BF16). Step times come from CUDA events; the report gives, per plan, the median
step time in each precision phase, the end-to-end time and the final smoothed loss, and checks the
issue's goals: FP8 phases <= 0.75x the BF16 step time; the adaptive plans' end-to-end time below
BF16-only at matching loss (final loss within ``--loss-tolerance`` of BF16's).

Without a CUDA GPU there is nothing to measure: the script says so, writes
``benchmarks/results/hardware.{json,md}`` marked "not measured", and exits 0 without a figure.
``--smoke`` runs every plan for a few steps of a tiny model on the CPU (emulated/CPU kernels) to check
the script end to end; it writes nothing and its times mean nothing.

Usage::

    python benchmarks/hardware.py                       # GPU: d_model 2048, 4 layers, 8 x 1024 tokens
    python benchmarks/hardware.py --steps 300 --plans bf16 fp8
    python benchmarks/hardware.py --smoke               # CPU check of the script itself
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

from common import RESULTS_DIR, command_line, write_results  # noqa: E402

import adaprec  # noqa: E402
from adaprec.decision import Decision  # noqa: E402
from adaprec.policies import Policy  # noqa: E402
from adaprec.policies.muppet import MuPPET  # noqa: E402
from adaprec.quant.hardware import hardware_precision  # noqa: E402
from adaprec.tasks.gptlm import GPT  # noqa: E402
from adaprec.tasks.text import Vocab, load_text  # noqa: E402

PLANS = ("fp32", "bf16", "fp8", "muppet", "cycle")
NOT_MEASURED = "not measured (no GPU in this task)"


class FormatCycle(Policy):
    """CPT-style cycle between two precisions: a cosine ramp from ``low`` to ``high`` each period.

    The first half of every period (where the cosine ramp is below its midpoint) runs ``low``, the
    second half ``high``, then it resets — CPT's "cosine growth" with two levels.

    Example:
        >>> from adaprec.formats import Precision
        >>> p = FormatCycle(Precision.fp32(), Precision.cpt(8, 8), period=4)
        >>> [p.level(t) for t in range(6)]
        [0, 0, 1, 1, 0, 0]
    """

    name = "format_cycle"

    def __init__(self, low: Any, high: Any, period: int) -> None:
        if period < 2:
            raise ValueError(f"period must be >= 2 steps, got {period}")
        self.low, self.high, self.period = Decision.uniform(low), Decision.uniform(high), period

    def level(self, t: int) -> int:
        # The ramp 0.5 * (1 - cos(pi * u)) passes its midpoint at u = 1/2; compare u itself, exactly.
        return int(2 * (t % self.period) >= self.period)

    def decide(self, ctl: Any) -> Decision:
        return self.high if self.level(ctl.step_count) else self.low


def make_policy(plan: str, args: argparse.Namespace) -> Any:
    if plan == "fp32":
        return "fp32"
    if plan in ("bf16", "fp8"):
        return adaprec.policies.Fixed(bits=hardware_precision(plan).weight,
                                      grad_bits=hardware_precision(plan).gradient)
    if plan == "muppet":
        return MuPPET(levels=("fp8_e4m3", "bf16", "fp32"), max_epochs_per_level=args.max_epochs_per_level)
    if plan == "cycle":
        return FormatCycle(hardware_precision("fp8"), hardware_precision("bf16"), args.period)
    raise ValueError(f"unknown plan {plan!r}; known: {list(PLANS)}")


def build_gpt(vocab: int, args: argparse.Namespace) -> GPT:
    """The ``gptlm`` task's model at the benchmark's size."""
    return GPT(vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, seq_len=args.seq)


def batches(n: int, batch: int, seq: int, device: torch.device, seed: int = 0) -> tuple[int, list]:
    text = load_text()
    vocab = Vocab.from_text(text)
    data = vocab.encode(text)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        starts = torch.randint(0, data.numel() - seq - 1, (batch, 1), generator=g)
        w = data[starts + torch.arange(seq + 1)]
        out.append((w[:, :-1].to(device), w[:, 1:].to(device)))
    return len(vocab), out


def _phase(ctl: Any) -> str:
    """The precision in force now, by the first block's MLP layer (the classifier may differ)."""
    cur = ctl.current
    name = next((n for n in cur if n.endswith("blocks.0.up")), next(iter(cur)))
    return cur[name].short()


def run_plan(plan: str, args: argparse.Namespace, init: dict, data: list, vocab: int,
             device: torch.device) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = build_gpt(vocab, args).to(device)
    model.load_state_dict(init)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    cuda = device.type == "cuda"
    losses, times, phases = [], [], []
    with adaprec.Controller(model, policy=make_policy(plan, args), optimizer=opt, backend="hardware") as ctl:
        t0 = time.perf_counter()
        step = 0
        while step < len(data):
            chunk = data[step:step + args.epoch_steps]
            for x, y in ctl.epoch(chunk):
                phases.append(_phase(ctl))
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                else:
                    c0 = time.perf_counter()
                loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if cuda:
                    end.record()
                    times.append((start, end))
                else:
                    times.append(time.perf_counter() - c0)
                losses.append(loss.detach())
                step += 1
        if cuda:
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
        calls = ctl.backend.calls()
    step_ms = [s.elapsed_time(e) for s, e in times] if cuda else [1e3 * t for t in times]
    losses = [float(v) for v in losses]
    skip = args.warmup_steps
    by_phase: dict[str, list[float]] = {}
    for i, (ph, ms) in enumerate(zip(phases, step_ms)):
        if i >= skip:
            by_phase.setdefault(ph, []).append(ms)
    tail = max(1, len(losses) // 10)
    return {"plan": plan, "losses": losses, "step_ms": step_ms, "phases": phases,
            "median_ms_by_phase": {k: statistics.median(v) for k, v in by_phase.items()},
            "steps_by_phase": {k: len(v) for k, v in by_phase.items()},
            "total_ms": sum(step_ms), "wall_s": total,
            "final_loss": sum(losses[-tail:]) / tail,
            "kernel_calls": {k: sum(c.get(k, 0) for c in calls.values())
                             for k in sorted({k for c in calls.values() for k in c})}}


def _goals(res: dict[str, dict], tol: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    bf16 = res.get("bf16")
    fp8 = res.get("fp8")
    if bf16 and fp8:
        b = bf16["median_ms_by_phase"].get("bf16/bf16")
        f = fp8["median_ms_by_phase"].get("fp8_e4m3/fp8_e5m2")
        if b and f:
            out["fp8_over_bf16_step"] = f / b
            out["fp8_goal_met"] = f / b <= 0.75
    if bf16:
        for plan in ("muppet", "cycle"):
            r = res.get(plan)
            if r:
                out[f"{plan}_time_over_bf16"] = r["total_ms"] / bf16["total_ms"]
                out[f"{plan}_loss_over_bf16"] = r["final_loss"] / bf16["final_loss"]
                out[f"{plan}_goal_met"] = (r["total_ms"] < bf16["total_ms"]
                                           and r["final_loss"] <= bf16["final_loss"] * (1 + tol))
    return out


def _table(res: dict[str, dict], goals: dict[str, Any]) -> str:
    rows = ["| plan | median step by phase (ms) | end-to-end (s) | final loss | kernel calls |",
            "|---|---|---:|---:|---|"]
    for plan, r in res.items():
        ph = ", ".join(f"{k}: {v:.1f}" for k, v in r["median_ms_by_phase"].items())
        kc = ", ".join(f"{k} {v}" for k, v in r["kernel_calls"].items())
        rows.append(f"| {plan} | {ph} | {r['total_ms'] / 1e3:.2f} | {r['final_loss']:.3f} | {kc} |")
    rows += ["", "Goals: " + (", ".join(f"{k} = {v:.3f}" if isinstance(v, float) else f"{k} = {v}"
                                        for k, v in goals.items()) or "none computed"), "",
             "![loss curves](hardware.png)"]
    return "\n".join(rows)


def _plot(res: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for plan, r in res.items():
        t = [sum(r["step_ms"][:i + 1]) / 1e3 for i in range(len(r["step_ms"]))]
        a.plot(r["losses"], label=plan, lw=1)
        b.plot(t, r["losses"], label=plan, lw=1)
    a.set(xlabel="step", ylabel="training loss (nats/char)", title="loss per step")
    b.set(xlabel="time on GPU (s)", ylabel="training loss", title="loss over time")
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plans", nargs="+", default=list(PLANS), choices=PLANS)
    ap.add_argument("--d-model", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--warmup-steps", type=int, default=5, help="steps left out of the phase medians")
    ap.add_argument("--epoch-steps", type=int, default=20, help="steps per 'epoch' (MuPPET's checks)")
    ap.add_argument("--max-epochs-per-level", type=int, default=4)
    ap.add_argument("--period", type=int, default=40, help="FP8<->BF16 cycle period in steps")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--loss-tolerance", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU; checks the script only")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)

    if args.smoke:
        args.d_model, args.layers, args.heads, args.seq, args.batch = 64, 2, 4, 32, 4
        args.steps, args.epoch_steps, args.max_epochs_per_level, args.period = 12, 2, 1, 4
        args.warmup_steps, args.no_write = 0, True
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print(f"benchmarks/hardware.py: no CUDA GPU here, so step times are {NOT_MEASURED}; "
              "run it on a machine with an FP8-capable GPU (compute capability >= 8.9). No figure written.")
        if not args.no_write:
            write_results("hardware", {"status": NOT_MEASURED},
                          f"Status: **{NOT_MEASURED}**. This benchmark needs a CUDA GPU (FP8 needs "
                          "compute capability >= 8.9); the numerical behaviour of the hardware backend "
                          "is tested on the CPU in tests/test_hardware.py.", command_line())
        return {"status": NOT_MEASURED}
    else:
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False  # "fp32" means float32 matmuls
        torch.backends.cudnn.allow_tf32 = False

    vocab, data = batches(args.steps, args.batch, args.seq, device, args.seed)
    torch.manual_seed(args.seed)
    init = build_gpt(vocab, args).state_dict()
    res = {}
    for plan in args.plans:
        res[plan] = run_plan(plan, args, init, data, vocab, device)
        r = res[plan]
        phases = ", ".join(f"{k}: {v:.2f} ms" for k, v in r["median_ms_by_phase"].items())
        print(f"{plan:7s} {phases} | total {r['total_ms'] / 1e3:.2f} s | final loss {r['final_loss']:.3f} "
              f"| {r['kernel_calls']}", flush=True)
    goals = _goals(res, args.loss_tolerance)
    print("goals:", goals)
    out = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (smoke)",
           "config": {k: v for k, v in vars(args).items() if k not in ("plans",)}, "results": res,
           "goals": goals}
    if not args.no_write:
        _plot(res, RESULTS_DIR / "hardware.png")
        write_results("hardware", out, _table(res, goals), command_line())
    return out


if __name__ == "__main__":
    main()
