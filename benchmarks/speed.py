"""Real speed on the CPU: adaptive precision on real low-precision kernels vs FP32 and BF16 autocast
(issue 12 benchmark).

Two models, five plans, four parts.

Models: the GPT character LM of the ``gptlm`` task at its ``speed`` preset (d_model 512, 4 blocks,
sequence 128, batch 16) on the English text bundled with CPython, and the CIFAR-shaped ResNet-20
(batch 128): synthetic 3x32x32 images for step times, scikit-learn's digits (upsampled to 32x32, one
channel) for accuracy.

Plans: ``fp32`` (plain PyTorch), ``autocast`` (``torch.autocast("cpu", torch.bfloat16)``, plain
PyTorch), ``int8`` (static CPT 8/8 on ``backend="hardware"``), ``cpt`` (CPT 3-8/8 on
``backend="hardware"``), ``muppet`` (MuPPET on ``backend="hardware"`` with the backend's ladder,
``HardwareBackend.muppet_levels``). The controller's defaults apply (classifier floor included).

Parts:

1. ``kernels``: what the kernels give on this CPU, one thread, process CPU time, alternating medians:
   a 1024^3 matmul in float32, bf16, ``torch._int_mm`` and the ``"bf16"`` code kernel (bf16 products,
   float32 results); a ResNet-20 stage-1 convolution in float32 (NCHW, the default layout), bf16
   (channels-last) and the code kernel.
2. ``timing``: per model, thread count and mode (eager, ``torch.compile``), every plan in one process,
   steps in alternating order round after round (process CPU time; wall time recorded too); the median
   step time per *route* (the precisions in force: CPT's widths all take the integer-code route, each
   MuPPET level its own), and per plan the step-weighted median.
3. ``accuracy``: per model and seed (eager, one thread), every plan trained for a fixed number of
   steps from the same initial weights and batches (learning rate: 10% linear warm-up, then cosine
   to zero); the final validation loss (evaluated after the
   controller has left, in FP32), the end-to-end process CPU time of the training steps, and the route
   times of ``ctl.report()["route_time"]``.
4. ``profile``: why a plan is as fast as it is. Per model (eager, one thread), one step of every plan
   under ``torch.profiler`` after a warm-up, its self CPU time split into the *products* (matmul,
   ``_int_mm`` and convolution kernels, forward and backward), attention, and everything else (the
   model's elementwise work plus, for adaprec's plans, the quantization passes: ranges, rounding,
   noise, casts, offset terms). The profiler's own cost inflates small operations, so these are shares
   and differences, not step times.

Goals (issue 12): GPT, one thread, eager and compiled: CPT >= 2.0x faster per step than FP32 and >= 1.2x
faster than autocast; MuPPET >= 1.5x faster than FP32 end to end; every plan's validation loss within 2%
of FP32's (3 seeds). ResNet-20: CPT >= 1.5x faster per step than FP32, the same loss rule on digits.

Usage::

    python benchmarks/speed.py                      # everything (about 40 minutes on a quiet machine)
    python benchmarks/speed.py --quick              # a smoke run of every part (writes nothing)
    python benchmarks/speed.py --parts timing --models gpt --threads 1 --modes eager
    python benchmarks/speed.py --merge --parts profile   # add a part to the results file

With ``--merge`` the results file is read again at every save and only what this run measured is
replaced, so several runs (e.g. one per model) can go side by side.

Results: ``benchmarks/results/speed.{json,md}`` (CPU model and flags, load averages, versions).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere

from common import PRODUCT_OPS, command_line, median, profile_step, write_results  # noqa: E402
from common import RESULTS_DIR as RESULTS  # noqa: E402

import adaprec  # noqa: E402
from adaprec.decision import Decision  # noqa: E402
from adaprec.policies import Policy, make_policy  # noqa: E402
from adaprec.policies.muppet import MuPPET, level_precision  # noqa: E402
from adaprec.quant.hardware import HardwareBackend  # noqa: E402
from adaprec.quant.intcodes import codes_conv, codes_matmul  # noqa: E402
from adaprec.tasks.run import make_lr_schedule  # noqa: E402

PLANS = ("fp32", "autocast", "int8", "cpt", "muppet")
PARTS = ("kernels", "timing", "accuracy", "profile")
MODELS = ("gpt", "resnet")
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_bf16", "amx_int8", "amx_tile")
NO_GPU = "not measured (no GPU)"


# --- machine -----------------------------------------------------------------------------------------

def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in FLAGS if f in have]
    except OSError:
        pass
    return []


def load() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _alternate(fns: dict[str, Any], rounds: int, warmup: int = 2) -> dict[str, dict[str, float]]:
    for f in fns.values():
        for _ in range(warmup):
            f()
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    wall: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            c0, w0 = time.process_time(), time.perf_counter()
            f()
            cpu[k].append(time.process_time() - c0)
            wall[k].append(time.perf_counter() - w0)
    return {k: {"cpu_ms": 1e3 * median(cpu[k]), "wall_ms": 1e3 * median(wall[k])} for k in fns}


def kernels(rounds: int) -> dict[str, Any]:
    """Part 1: single-thread kernel figures on this CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
        ab, bb = a.bfloat16(), b.bfloat16()
        qa = torch.randint(-127, 128, (1024, 1024)).float()
        qb = torch.randint(-127, 128, (1024, 1024)).float()
        ia, ib = qa.to(torch.int8), qb.to(torch.int8)
        mm = _alternate({"fp32": lambda: a @ b, "bf16": lambda: ab @ bb,
                         "int_mm": lambda: torch._int_mm(ia, ib),
                         "codes_bf16": lambda: codes_matmul(qa, qb, "bf16")}, rounds)
        x, w = torch.randn(128, 16, 32, 32), torch.randn(16, 16, 3, 3)
        cl = torch.channels_last
        xb, wb = x.to(torch.bfloat16).contiguous(memory_format=cl), w.to(torch.bfloat16)
        qx = torch.randint(-127, 128, x.shape).float().contiguous(memory_format=cl)
        qw = torch.randint(-127, 128, w.shape).float()
        xc = x.contiguous(memory_format=cl)
        conv = _alternate({"fp32": lambda: F.conv2d(x, w, padding=1),
                           "fp32_channels_last": lambda: F.conv2d(xc, w, padding=1),
                           "bf16_channels_last": lambda: F.conv2d(xb, wb, padding=1),
                           "codes_bf16": lambda: codes_conv(qx, qw, ([1, 1], [1, 1], [1, 1]), "bf16")},
                          rounds)
        packed = _onednn_int8(ia, ib, rounds)
    finally:
        torch.set_num_threads(n)
    return {"matmul_1024": mm, "conv_128x16x32x32_3x3": conv, "int8_prepacked_1024": packed,
            "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _onednn_int8(ia: torch.Tensor, ib: torch.Tensor, rounds: int) -> dict[str, Any] | None:
    """oneDNN's int8 linear, the inference path of torch's x86 quantization (AMX int8 where the CPU has
    it), on the same 1024³ product: the product with the weight packed ahead, and the packing itself.
    Training changes the weights every step, so a training step would pay both. ``None`` where torch
    has no such op."""
    ops = torch.ops.onednn
    if not (hasattr(ops, "qlinear_prepack") and hasattr(ops, "qlinear_pointwise")):
        return None
    try:
        au = (ia.to(torch.int16) + 128).to(torch.uint8)  # its activations are uint8 with a zero point
        wt = ib.t().contiguous()
        packed = ops.qlinear_prepack(wt, None)
        n = wt.shape[0]
        ws, wz = torch.ones(n), torch.zeros(n, dtype=torch.int64)

        def run() -> torch.Tensor:
            return ops.qlinear_pointwise(au, 1.0, 128, packed, ws, wz, None, 1.0, 0, torch.float32, "none",
                                         [], "")

        exact = torch.equal(run(), ia.float() @ ib.float())  # sums below 2^24: float32 holds them exactly
        out = _alternate({"product_prepacked": run, "prepack_weight": lambda: ops.qlinear_prepack(wt, None)},
                         rounds)
        return {**out, "exact": exact}
    except Exception as exc:  # noqa: BLE001 - an op whose signature moved: report, do not fail the run
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


# --- models and data ---------------------------------------------------------------------------------

class Setup:
    """One model's data, loss and evaluation."""

    def __init__(self, name: str, quick: bool) -> None:
        self.name = name
        if name == "gpt":
            from adaprec.tasks.gptlm import GPTLMTask

            kw = {"n_layers": 1, "d_model": 128} if quick else {}
            self.task = GPTLMTask(preset="speed", max_eval_chars=4096 if quick else 32768,
                                  eval_batch_size=32, **kw)
            self.batch = 4 if quick else self.task.defaults["batch_size"]
            self.lr = 1e-3
        else:
            from adaprec.tasks.digits import load_digits_split

            xtr, ytr, xte, yte = load_digits_split(0)
            up = (lambda t: F.interpolate(t, scale_factor=4, mode="nearest"))
            self.train_x, self.train_y = up(xtr), ytr
            self.test_x, self.test_y = up(xte), yte
            self.batch = 32 if quick else 128
            self.lr = 0.05

    def build(self, seed: int, timing: bool = False) -> nn.Module:
        torch.manual_seed(seed)
        if self.name == "gpt":
            return self.task.build_model(seed=seed)
        from adaprec.tasks.cifar import ResNetCifar

        return ResNetCifar(20, 10, in_channels=3 if timing else 1)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        if self.name == "gpt":
            return torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=0.0)
        return torch.optim.SGD(model.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)

    def timing_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        if self.name == "gpt":
            return next(iter(self.task.train_batches(self.batch, seed=0)))
        x = torch.randn(self.batch, 3, 32, 32, generator=g)
        return x, torch.randint(0, 10, (self.batch,), generator=g)

    def batches(self, steps: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if self.name == "gpt":
            from adaprec.tasks.text import RandomWindows

            return list(RandomWindows(self.task.train_data, self.batch, self.task.seq_len, steps, seed))
        g = torch.Generator().manual_seed(seed)
        out = []
        while len(out) < steps:
            perm = torch.randperm(len(self.train_y), generator=g)
            for i in range(0, len(perm) - self.batch + 1, self.batch):
                idx = perm[i:i + self.batch]
                out.append((self.train_x[idx], self.train_y[idx]))
        return out[:steps]

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        model.eval()
        try:
            if self.name == "gpt":
                m = self.task.evaluate(model)
                return {"val_loss": m["val_loss"], "accuracy": m["accuracy"]}
            logits = torch.cat([model(self.test_x[i:i + 256]) for i in range(0, len(self.test_y), 256)])
            return {"val_loss": F.cross_entropy(logits, self.test_y).item(),
                    "accuracy": (logits.argmax(1) == self.test_y).float().mean().item()}
        finally:
            model.train()


# --- plans -------------------------------------------------------------------------------------------

class LevelCycle(Policy):
    """Timing only: a different level of a MuPPET ladder every step, so every level is timed (and, when
    compiled, compiled during the warm-up)."""

    name = "level_cycle"

    def __init__(self, levels: tuple) -> None:
        self.levels = [level_precision(lv) for lv in levels]

    def decide(self, ctl: Any) -> Decision:
        return Decision.uniform(self.levels[ctl.step_count % len(self.levels)])


def hardware_ladder() -> tuple:
    """The default MuPPET ladder of the hardware backend on this machine."""
    be = HardwareBackend()
    lin = nn.Linear(2, 2)
    be.attach(lin, [("l", lin)])
    try:
        return be.muppet_levels
    finally:
        be.detach()


def make_plan(plan: str, model: nn.Module, opt: torch.optim.Optimizer, total: int, timing: bool,
              epoch_steps: int) -> contextlib.AbstractContextManager | None:
    if plan in ("fp32", "autocast"):
        return None
    if plan == "int8":
        policy: Policy = make_policy("fixed", bits=8, grad_bits=8)
    elif plan == "cpt":
        period = 8 if timing else max(4, total // 4)
        policy = make_policy("cpt", bits=(3, 8), grad_bits=8, cycles=max(1, total // period))
    elif timing:
        policy = LevelCycle(hardware_ladder())
    else:
        # The diversity rule decides; a level lasts at most 40% of the run's epochs (short runs).
        epochs = max(1, total // epoch_steps)
        policy = MuPPET(max_epochs_per_level=max(1, (2 * epochs) // 5))
    return adaprec.Controller(model, policy=policy, optimizer=opt, backend="hardware", total_steps=total)


def _route(plan: str, ctl: Any) -> str:
    return plan if ctl is None else ctl.backend.route_signature()


class Runner:
    """One plan on one model copy: its optimizer, controller and (maybe compiled) forward."""

    def __init__(self, plan: str, setup: Setup, model: nn.Module, mode: str, stack: contextlib.ExitStack,
                 total: int, timing: bool, epoch_steps: int = 5) -> None:
        self.plan, self.setup = plan, setup
        self.model = model
        self.opt = setup.optimizer(model)
        self.ctl = make_plan(plan, model, self.opt, total, timing, epoch_steps)
        if self.ctl is not None:
            stack.enter_context(self.ctl)
        self.fn = torch.compile(model) if mode == "compiled" else model
        self.times: dict[str, list[tuple[float, float]]] = {}
        # Accuracy runs: a short linear warm-up, then cosine decay to zero over the run. Without it the
        # short runs end at full learning rate and their validation loss is mostly noise (ResNet-20 at
        # a constant 0.05: FP32 itself 0.94 +- 0.17 over 3 seeds, the other plans up to +- 2.6).
        self.sched = None if timing else make_lr_schedule("warmup_cosine", self.opt, total)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        route = _route(self.plan, self.ctl)
        c0, w0 = time.process_time(), time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.plan == "autocast"):
            logits = self.fn(x)
        loss = self.setup.loss(logits, y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.sched is not None:
            self.sched.step()
        self.times.setdefault(route, []).append((time.process_time() - c0, time.perf_counter() - w0))
        return loss.detach()


# --- part 2: timing ----------------------------------------------------------------------------------

def timing(setup: Setup, plans: list[str], threads: int, mode: str, rounds: int, warmup: int) -> dict:
    torch.set_num_threads(threads)
    x, y = setup.timing_batch()
    base = setup.build(0, timing=True)
    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        runners = [Runner(p, setup, copy.deepcopy(base), mode, stack, warmup + rounds, True) for p in plans]
        for r in runners:
            t0 = time.perf_counter()
            for _ in range(warmup):
                r.step(x, y)
            r.times.clear()
            print(f"  [{setup.name} {mode} {threads}t] {r.plan}: warm-up {time.perf_counter() - t0:.1f}s",
                  flush=True)
        for i in range(rounds):
            for r in runners[i % len(runners):] + runners[:i % len(runners)]:
                r.step(x, y)
    for r in runners:
        per_route = {k: {"steps": len(v), "cpu_ms": 1e3 * median([t[0] for t in v]),
                         "wall_ms": 1e3 * median([t[1] for t in v])} for k, v in r.times.items()}
        allt = [t for v in r.times.values() for t in v]
        out[r.plan] = {"routes": per_route, "cpu_ms": 1e3 * median([t[0] for t in allt]),
                       "wall_ms": 1e3 * median([t[1] for t in allt])}
    fp = out.get("fp32", {}).get("cpu_ms")
    ac = out.get("autocast", {}).get("cpu_ms")
    for plan, r in out.items():
        r["speedup_vs_fp32"] = fp / r["cpu_ms"] if fp else None
        r["speedup_vs_autocast"] = ac / r["cpu_ms"] if ac else None
        print(f"  [{setup.name} {mode} {threads}t] {plan:8s} {r['cpu_ms']:8.1f} ms  "
              f"x{(r['speedup_vs_fp32'] or math.nan):.2f} vs fp32  "
              f"{ {k: round(v['cpu_ms'], 1) for k, v in r['routes'].items()} }", flush=True)
    return out


# --- part 4: profile ---------------------------------------------------------------------------------

def _category(name: str) -> str:
    if "scaled_dot_product" in name:
        return "attention"
    if name in PRODUCT_OPS:
        return "products"
    return "other"


def profile_part(setup: Setup, plans: list[str], warmup: int) -> dict:
    torch.set_num_threads(1)
    x, y = setup.timing_batch()
    base = setup.build(0, timing=True)
    out: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        runners = [Runner(p, setup, copy.deepcopy(base), "eager", stack, warmup + 2, True) for p in plans]
        for r in runners:
            for _ in range(warmup):
                r.step(x, y)
            v = out[r.plan] = profile_step(lambda r=r: r.step(x, y), _category,
                                           ("products", "attention", "other"))
            print(f"  [{setup.name} profile] {r.plan:8s} total {v['total_ms']:7.0f} ms  products "
                  f"{v['products_ms']:6.0f}  attention {v['attention_ms']:5.0f}  other {v['other_ms']:6.0f}",
                  flush=True)
    return out


# --- part 3: accuracy --------------------------------------------------------------------------------

def train_run(setup: Setup, plan: str, seed: int, steps: int, epoch_steps: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    model = setup.build(seed)
    batches = setup.batches(steps, seed)
    losses = []
    with contextlib.ExitStack() as stack:
        r = Runner(plan, setup, model, "eager", stack, steps, False, epoch_steps)
        c0, w0 = time.process_time(), time.perf_counter()
        if r.ctl is not None:
            for e in range(0, steps, epoch_steps):
                for x, y in r.ctl.epoch(batches[e:e + epoch_steps]):
                    losses.append(r.step(x, y))
        else:
            for x, y in batches:
                losses.append(r.step(x, y))
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        report = r.ctl.report() if r.ctl is not None else None
    metrics = setup.evaluate(model)  # after the controller left: the plain FP32 model
    out = {"plan": plan, "seed": seed, "steps": steps, "cpu_s": cpu, "wall_s": wall, **metrics,
           "train_loss_last": float(torch.stack(losses[-max(1, steps // 10):]).mean()),
           "routes": {k: {"steps": len(v), "cpu_ms": 1e3 * median([t[0] for t in v])}
                      for k, v in r.times.items()}}
    if report is not None:
        out["savings_vs_fp32"] = report.get("savings_vs_fp32")
        if plan == "muppet":
            out["switches"] = [(s["step"], s["to"]) for s in r.ctl.policy.switches]
    print(f"  [{setup.name} seed {seed}] {plan:8s} val_loss {metrics['val_loss']:.4f} acc "
          f"{metrics['accuracy']:.3f}  cpu {cpu:.1f}s  routes "
          f"{ {k: (v['steps'], round(v['cpu_ms'])) for k, v in out['routes'].items()} }", flush=True)
    return out


def accuracy(setup: Setup, plans: list[str], seeds: int, steps: int, epoch_steps: int) -> dict:
    runs = [train_run(setup, p, s, steps, epoch_steps) for s in range(seeds) for p in plans]
    summary: dict[str, Any] = {}
    for p in plans:
        rs = [r for r in runs if r["plan"] == p]
        vl = [r["val_loss"] for r in rs]
        summary[p] = {"val_loss_mean": statistics.mean(vl), "val_loss_sd": statistics.pstdev(vl),
                      "accuracy_mean": statistics.mean(r["accuracy"] for r in rs),
                      "cpu_s_median": median([r["cpu_s"] for r in rs])}
    fp = summary.get("fp32")
    for s in summary.values():
        if fp:
            s["val_loss_vs_fp32"] = s["val_loss_mean"] / fp["val_loss_mean"] - 1
            s["end_to_end_speedup_vs_fp32"] = fp["cpu_s_median"] / s["cpu_s_median"]
    return {"steps": steps, "epoch_steps": epoch_steps, "seeds": seeds, "runs": runs, "summary": summary}


# --- goals and report --------------------------------------------------------------------------------

def goals(res: dict) -> list[dict[str, Any]]:
    out = []
    t = res.get("timing", {})

    def add(name, value, target, op, note=""):
        ok = None if value is None else (value >= target if op == ">=" else value <= target)
        out.append({"goal": name, "value": value, "target": f"{op} {target}", "met": ok, "note": note})

    for mode in ("eager", "compiled"):
        g = t.get(f"gpt/{mode}/1")
        if g:
            cpt = g.get("cpt", {})
            add(f"GPT {mode} 1t: CPT vs FP32 per step", cpt.get("speedup_vs_fp32"), 2.0, ">=")
            add(f"GPT {mode} 1t: CPT vs autocast per step", cpt.get("speedup_vs_autocast"), 1.2, ">=")
        r = t.get(f"resnet/{mode}/1")
        if r:
            add(f"ResNet-20 {mode} 1t: CPT vs FP32 per step", r.get("cpt", {}).get("speedup_vs_fp32"), 1.5,
                ">=")
    for model in ("gpt", "resnet"):
        a = res.get("accuracy", {}).get(model)
        if not a:
            continue
        s = a["summary"]
        if model == "gpt" and "muppet" in s:
            add("GPT: MuPPET vs FP32 end to end", s["muppet"].get("end_to_end_speedup_vs_fp32"), 1.5, ">=")
        for p, v in s.items():
            if p != "fp32" and "val_loss_vs_fp32" in v:
                add(f"{model}: {p} validation loss vs FP32", v["val_loss_vs_fp32"], 0.02, "<=",
                    f"{v['val_loss_mean']:.4f} ± {v['val_loss_sd']:.4f} vs {s['fp32']['val_loss_mean']:.4f}")
    return out


def not_measured(res: dict) -> list[str]:
    """The parts of a full run (every model, mode and thread count) the results do not hold."""
    out = [] if res.get("kernels", {}).get("matmul_1024") else ["kernels"]
    out += [f"timing {m}/{mode}/{th}" for m in MODELS for mode in ("eager", "compiled") for th in (1, 2)
            if f"{m}/{mode}/{th}" not in res.get("timing", {})]
    out += [f"{part} {m}" for part in ("accuracy", "profile") for m in MODELS if m not in res.get(part, {})]
    return out


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "—" if v is None else format(v, spec)


def _row(d: dict) -> str:
    return " | ".join(f"{v['cpu_ms']:.1f}" for v in d.values()) + " |"


def table(res: dict) -> str:
    flags = ", ".join(res["machine"]["flags"]) or "unknown"
    missing = res.get("not_measured", [])
    lines = ([f"**Partial results.** Not measured: {', '.join(missing)}.", ""] if missing else
             ["**Partial run** (stopped before every part had run)", ""] if res.get("partial") else []) + [
             f"CPU flags: {flags}; AMX: {res.get('kernels', {}).get('amx')}; "
             f"load average at start {res['machine']['load_start']}, at end {res['machine']['load_end']} "
             f"(a shared machine: process CPU time, alternating runs, medians). GPU: {NO_GPU}.", ""]
    k = res.get("kernels", {})
    if k.get("matmul_1024"):
        lines += ["**Kernels** (1 thread, median ms, process CPU time):", "",
                  "| product | " + " | ".join(k["matmul_1024"]) + " |",
                  "|---|" + "---:|" * len(k["matmul_1024"]),
                  "| matmul 1024³ | " + _row(k["matmul_1024"]),
                  "", "| convolution 128×16×32×32, 3×3 | " + " | ".join(k["conv_128x16x32x32_3x3"]) + " |",
                  "|---|" + "---:|" * len(k["conv_128x16x32x32_3x3"]),
                  "| forward | " + _row(k["conv_128x16x32x32_3x3"]), ""]
        q = k.get("int8_prepacked_1024") or {}
        if "product_prepacked" in q:
            lines += [f"oneDNN's int8 linear (torch's x86 inference path) on the same product: "
                      f"{q['product_prepacked']['cpu_ms']:.1f} ms with the weight packed ahead, but packing "
                      f"it takes {q['prepack_weight']['cpu_ms']:.1f} ms, and training changes the weights "
                      f"every step (exact: {q['exact']}).", ""]
    if res.get("timing"):
        lines += ["**Step times** (median ms per step, process CPU time; ×: speed-up over FP32; routes: "
                  "median per route in force):", "",
                  "| model | mode | threads | plan | step (ms) | × FP32 | × autocast | per route (ms) |",
                  "|---|---|---:|---|---:|---:|---:|---|"]
        for key, plans in res["timing"].items():
            model, mode, th = key.split("/")
            for plan, r in plans.items():
                routes = ", ".join(f"`{n}` {v['cpu_ms']:.0f}" for n, v in r["routes"].items())
                lines.append(f"| {model} | {mode} | {th} | {plan} | {r['cpu_ms']:.1f} | "
                             f"{_fmt(r['speedup_vs_fp32'])} | {_fmt(r['speedup_vs_autocast'])} | {routes} |")
        lines.append("")
    for model, a in res.get("accuracy", {}).items():
        lines += [f"**Accuracy, {model}** ({a['steps']} steps, {a['seeds']} seeds, eager, 1 thread; "
                  "validation after training, in FP32):", "",
                  "| plan | validation loss (mean ± sd) | vs FP32 | accuracy | end-to-end CPU (s, median) | "
                  "× FP32 end to end |", "|---|---:|---:|---:|---:|---:|"]
        for p, s in a["summary"].items():
            lines.append(f"| {p} | {s['val_loss_mean']:.4f} ± {s['val_loss_sd']:.4f} | "
                         f"{_fmt(100 * s.get('val_loss_vs_fp32', 0), '+.1f')}% | {s['accuracy_mean']:.3f} | "
                         f"{s['cpu_s_median']:.1f} | {_fmt(s.get('end_to_end_speedup_vs_fp32'))} |")
        lines.append("")
    for model, prof in res.get("profile", {}).items():
        fp = prof.get("fp32", {})
        lines += [f"**Profile, {model}** (one eager step per plan, 1 thread, self CPU time under "
                  "`torch.profiler`, ms; *other* is everything but the product kernels and attention: the "
                  "model's elementwise work and, for adaprec's plans, the quantization passes):", "",
                  "| plan | total | products | attention | other | other − FP32's other | top operators |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for p, v in prof.items():
            extra = v["other_ms"] - fp["other_ms"] if fp else None
            tops = ", ".join(f"`{t['op']}` {t['self_ms']:.0f}" for t in v["top"][:5])
            lines.append(f"| {p} | {v['total_ms']:.0f} | {v['products_ms']:.0f} | {v['attention_ms']:.0f} | "
                         f"{v['other_ms']:.0f} | {_fmt(extra, '+.0f')} | {tops} |")
        lines.append("")
    if res.get("goals"):
        lines += ["**Goals:**", "", "| goal | value | target | met | note |", "|---|---:|---|:---:|---|"]
        for g in res["goals"]:
            met = "—" if g["met"] is None else ("yes" if g["met"] else "**no**")
            lines.append(f"| {g['goal']} | {_fmt(g['value'], '.3f')} | {g['target']} | {met} | {g['note']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--plans", nargs="+", default=list(PLANS), choices=PLANS)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    ap.add_argument("--rounds", type=int, default=6, help="timed steps per plan (timing)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--gpt-steps", type=int, default=40, help="training steps per GPT accuracy run")
    ap.add_argument("--resnet-steps", type=int, default=44, help="training steps per ResNet accuracy run")
    ap.add_argument("--epoch-steps", type=int, default=4, help="steps per epoch (MuPPET's checks)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one seed, few steps; writes nothing")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--merge", action="store_true",
                    help="keep what benchmarks/results/speed.json holds and add/replace what this run "
                         "measures (e.g. a later run of --parts timing --threads 2 on a quieter machine)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup, args.seeds, args.gpt_steps, args.resnet_steps = 2, 2, 1, 8, 8
        args.epoch_steps, args.no_write = 2, True
    plans = ["fp32"] + [p for p in args.plans if p != "fp32"]
    threads0 = torch.get_num_threads()
    res: dict[str, Any] = {"machine": {"flags": cpu_flags(), "load_start": load()},
                           "config": {k: v for k, v in vars(args).items()}, "gpu": NO_GPU}
    measured: dict[str, set] = {"timing": set(), "accuracy": set(), "profile": set()}
    last: list[dict] = [res]

    def save(final: bool) -> None:
        # After every part, so that a long run that stops keeps what it measured (marked partial).
        res["machine"]["load_end"] = load()
        out = res
        if args.merge and (RESULTS / "speed.json").is_file():
            # Read the file again now: another run may have saved since this one started. Only what this
            # run measured replaces what is there; each run's settings and load averages stay with it.
            previous = json.loads((RESULTS / "speed.json").read_text())["data"]
            out = {**res, "runs": previous.get("runs", [{"config": previous["config"],
                                                          "machine": previous["machine"]}])}
            out["runs"] = [r for r in out["runs"] if r.get("config") != res["config"]] + \
                [{"config": res["config"], "machine": res["machine"]}]
            if "kernels" not in args.parts and "kernels" in previous:
                out["kernels"] = previous["kernels"]
            for part in measured:
                merged = dict(previous.get(part, {}))
                merged.update({k: v for k, v in res.get(part, {}).items() if k in measured[part]})
                if merged:
                    out[part] = merged
        out["not_measured"] = not_measured(out)
        out["partial"] = not final or bool(out["not_measured"])
        out["goals"] = goals(out)
        if not args.no_write:
            write_results("speed", out, table(out), command_line())
        last[0] = out

    try:
        if "kernels" in args.parts:
            res["kernels"] = kernels(3 if args.quick else 9)
        res.setdefault("kernels", {})
        save(False)
        setups = {m: Setup(m, args.quick) for m in args.models}
        if "timing" in args.parts:
            res["timing"] = dict(res.get("timing", {}))
            for m in args.models:
                for mode in args.modes:
                    for th in args.threads:
                        key = f"{m}/{mode}/{th}"
                        res["timing"][key] = timing(setups[m], plans, th, mode, args.rounds, args.warmup)
                        measured["timing"].add(key)
                        save(False)
        if "accuracy" in args.parts:
            res["accuracy"] = dict(res.get("accuracy", {}))
            for m in args.models:
                steps = args.gpt_steps if m == "gpt" else args.resnet_steps
                res["accuracy"][m] = accuracy(setups[m], plans, args.seeds, steps, args.epoch_steps)
                measured["accuracy"].add(m)
                save(False)
        if "profile" in args.parts:
            res["profile"] = dict(res.get("profile", {}))
            for m in args.models:
                res["profile"][m] = profile_part(setups[m], plans, args.warmup)
                measured["profile"].add(m)
                save(False)
    finally:
        torch.set_num_threads(threads0)
    save(True)
    print(table(last[0]))
    return last[0]


if __name__ == "__main__":
    main()
