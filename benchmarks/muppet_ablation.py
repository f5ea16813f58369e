"""Does MuPPET's gradient-diversity rule earn its keep? The rule against schedules with as many switches.

For each task of ``benchmarks/lm_policy.py`` (digits CNN, character LSTM, GPT character model; the same
training constraints) and each seed, three runs of the same ladder (fx8 -> fx12 -> fx14 -> fx16 -> FP32):

* ``rule`` — ``MuPPET()``: switch when the inter-epoch gradient diversity says so (the paper's rule);
* ``even`` — ``MuPPET(schedule=even_schedule(k, epochs))``: the same number ``k`` of switches as the
  rule made in that seed's run, evenly spaced;
* ``random`` — ``MuPPET(schedule=random_schedule(k, epochs, stay=9, seed=seed))``: ``k`` switches at
  random epochs, drawn uniformly among schedules that keep every level but the last for at least the
  rule's minimum stay (9 epochs).

The rule earns its keep on a task if it beats both controls on quality by more than the spread of the
paired differences (std over seeds), at no more than 5% extra cost; the verdict is computed, not
written by hand.

Usage::

    python benchmarks/muppet_ablation.py                       # 3 tasks x 3 seeds x 3 variants
    python benchmarks/muppet_ablation.py --cache /tmp/lm_policy.jsonl   # reuse lm_policy's MuPPET runs

Writes ``benchmarks/results/muppet_ablation.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import write_results  # noqa: E402
from lm_policy import EVAL_SEEDS, TASKS, _load_cache, command_without_cache, run_one, settings_key  # noqa: E402

from adaprec.policies.muppet import even_schedule, min_stay, random_schedule  # noqa: E402

VARIANTS = ("rule", "even", "random")
COST_SLACK = 0.05


def control_args(variant: str, switches: int, epochs: int, seed: int) -> dict[str, Any]:
    """MuPPET's arguments for a control with ``switches`` switches over ``epochs`` epochs.

    Example:
        >>> control_args("even", 3, 40, 0)
        {'schedule': [9, 19, 29]}
    """
    if variant == "even":
        return {"schedule": even_schedule(switches, epochs)}
    if variant == "random":
        return {"schedule": random_schedule(switches, epochs, stay=min_stay(), seed=seed)}
    raise ValueError(f"unknown control {variant!r}; use 'even' or 'random'")


def _run_all(jobs: list[tuple], cache: dict[str, Any], pool: ProcessPoolExecutor, cache_path: Path | None,
             ) -> list[dict[str, Any]]:
    out, todo = [], []
    for j in jobs:
        hit = cache.get(settings_key(j[0], j[2], j[3], j[4]))
        if hit is not None:
            out.append({**hit, "config": j[1]})
        else:
            todo.append(j)
    for r in pool.map(run_one, *zip(*todo)) if todo else []:
        out.append(r)
        if cache_path is not None:
            with cache_path.open("a") as f:
                f.write(json.dumps(r) + "\n")
        print(f"{r['task']:7s} {r['config']:7s} seed {r['seed']}: {TASKS[r['task']]['metric']} "
              f"{r['primary']:.4f} GBitOPs {r['gbitops']:.1f} switches {r.get('switch_epochs')} "
              f"{r['time_s']:.0f}s", flush=True)
    return out


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task, spec in TASKS.items():
        by = {v: {r["seed"]: r for r in runs if r["task"] == task and r["config"] == v} for v in VARIANTS}
        if not by["rule"]:
            continue
        sign = 1 if spec["direction"] == "maximize" else -1
        rows: dict[str, Any] = {}
        for v in VARIANTS:
            rs = [by[v][s] for s in sorted(by[v])]
            if not rs:
                continue
            vals = [r["primary"] for r in rs]
            std = statistics.stdev(vals) if len(vals) > 1 else 0.0
            rows[v] = {"mean": statistics.fmean(vals), "std": std,
                       "values": vals, "gbitops": statistics.fmean(r["gbitops"] for r in rs),
                       "switch_epochs": [r.get("switch_epochs") for r in rs]}
        verdicts = {}
        for v in ("even", "random"):
            seeds = sorted(set(by["rule"]) & set(by[v]))
            if not seeds:
                continue
            # > 0: the rule is better than the control on that seed
            diffs = [sign * (by["rule"][s]["primary"] - by[v][s]["primary"]) for s in seeds]
            d_mean = statistics.fmean(diffs)
            d_std = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
            cost = rows["rule"]["gbitops"] / rows[v]["gbitops"] - 1
            verdicts[v] = {"rule_better_by": d_mean, "diff_std": d_std, "rule_extra_cost": cost,
                           "rule_wins": d_mean > d_std and cost <= COST_SLACK}
        out[task] = {"metric": spec["metric"], "direction": spec["direction"], "rows": rows,
                     "verdicts": verdicts,
                     "rule_earns_its_keep": bool(verdicts) and all(x["rule_wins"] for x in verdicts.values())}
    return out


def markdown(summary: dict[str, Any], seeds: list[int], wall: float) -> str:
    lines = [
        "MuPPET's ladder fx8 → fx12 → fx14 → fx16 → FP32 under three switching strategies, with the "
        "training constraints of `benchmarks/lm_policy.py` (60 short epochs, warm-up + cosine learning rate, "
        "classifier floor). `even` and `random` make exactly as many switches as the rule made in the same "
        f"seed's run; `random` keeps the rule's minimum stay of {min_stay()} epochs per level. Seeds "
        f"{', '.join(map(str, seeds))}. The rule earns its keep on a task if it beats both controls on "
        "quality by more than the std of the paired differences, at most 5% more GBitOPs.", ""]
    for task, t in summary.items():
        better = "higher" if t["direction"] == "maximize" else "lower"
        lines += [f"## {task} ({t['metric']}, {better} is better)", "",
                  f"| switching | {t['metric']} | GBitOPs | switch epochs per seed |", "|---|---|---|---|"]
        for v, r in t["rows"].items():
            sw = "; ".join(",".join(map(str, s)) if s else "none" for s in r["switch_epochs"])
            lines.append(f"| {v} | {r['mean']:.4f} ± {r['std']:.4f} | {r['gbitops']:.1f} | {sw} |")
        lines.append("")
        for v, x in t["verdicts"].items():
            lines.append(f"- rule vs {v}: rule better by {x['rule_better_by']:+.4f} {t['metric']} "
                         f"(paired std {x['diff_std']:.4f}), rule costs {100 * x['rule_extra_cost']:+.1f}% "
                         f"GBitOPs: {'rule wins' if x['rule_wins'] else 'no win for the rule'}.")
        verdict = "earns" if t["rule_earns_its_keep"] else "does not earn"
        lines += [f"- **Verdict on {task}: the rule {verdict} its keep.**", ""]
    wins = [t for t, s in summary.items() if s["rule_earns_its_keep"]]
    lines.append(f"Overall: the diversity rule earns its keep on {len(wins)} of {len(summary)} tasks"
                 + (f" ({', '.join(wins)})." if wins else "."))
    lines.append(f"Wall time: {wall:.0f} s.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--seeds", nargs="+", type=int, default=list(EVAL_SEEDS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=None,
                    help="JSON-lines file of finished runs (shared with lm_policy.py): reused, appended to")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    cache = _load_cache(args.cache)
    with ProcessPoolExecutor(args.jobs) as pool:
        rule = _run_all([(t, "rule", "muppet", {}, s) for s in args.seeds for t in args.tasks], cache, pool,
                        args.cache)
        jobs = []
        for r in rule:
            epochs = TASKS[r["task"]]["train"]["epochs"]
            k = len(r["switch_epochs"])
            for v in ("even", "random"):
                jobs.append((r["task"], v, "muppet", control_args(v, k, epochs, r["seed"]), r["seed"]))
        controls = _run_all(jobs, cache, pool, args.cache)
    wall = time.perf_counter() - start
    runs = rule + controls
    summary = summarise(runs)
    md = markdown(summary, args.seeds, wall)
    print(md)
    data = {"summary": summary, "runs": runs, "tasks": {t: TASKS[t] for t in args.tasks}, "seeds": args.seeds,
            "wall_time_s": wall}
    write_results("muppet_ablation", data, md, command_without_cache())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
