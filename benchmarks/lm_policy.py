"""A policy that keeps its savings on language models? GuardedCPT against the baselines (issue 13).

Three tasks, one set of training constraints per task for every policy (same seeds, epochs, optimizer,
warm-up + cosine learning rate, the controller's default classifier floor):

* ``digits`` — the digits CNN, 60 short epochs of 8 random minibatches of 32 (480 iterations), SGD;
* ``charlm`` — the character LSTM (hidden 128) on 32-character windows, 60 epochs of 10 batches of 32
  (600 iterations), Adam;
* ``gptlm`` — the GPT character model (``tiny``: d_model 64, 2 blocks, 4 heads, 64-character context),
  60 epochs of 10 batches of 32 (600 iterations), AdamW at 1e-2.

Epochs are short so that MuPPET, whose levels last at least 9 epochs, can climb its ladder in the same
runs. Policies: FP32, static 8/8 (the reference of every saving), static 6/6, CPT 3-8/8, CPT 5-8/8,
MuPPET, an Optuna-tuned CPT and ``GuardedCPT`` with its defaults (the same knobs on every task).

Savings are ``1 - GBitOPs(policy) / GBitOPs(static 8/8)``, both read from the cost meter of real runs
with the same constraints (means over the seeds). The goal, per task: savings >= 30% and the quality
metric no worse than static 8/8's mean by more than static 8/8's standard deviation over the 3 seeds.

The tuned CPT: a multi-objective ``adaprec.tune`` study (metric, GBitOPs; CPT's search space, the
paper's 3-8/8 enqueued first) on a separate tuning seed; the chosen trial is the best-metric one among
those saving >= 30% against static 8/8 on the tuning seed (the best-metric trial if none does); it is
then evaluated on the 3 evaluation seeds like every other policy.

Usage::

    python benchmarks/lm_policy.py                    # everything: about an hour on 2 cores
    python benchmarks/lm_policy.py --tasks charlm --seeds 0 1 --trials 6   # a smaller run
    python benchmarks/lm_policy.py --cache /tmp/lm_policy.jsonl           # reuse finished runs

Writes ``benchmarks/results/lm_policy.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shlex
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from common import write_results  # noqa: E402

#: The tasks and their training constraints (shared by every policy; also used by muppet_ablation.py).
TASKS: dict[str, dict[str, Any]] = {
    "digits": {"build": {"batches_per_epoch": 8},
               "train": {"epochs": 60, "batch_size": 32, "lr": 0.05, "optimizer": "sgd",
                         "lr_schedule": "warmup_cosine"},
               "metric": "accuracy", "direction": "maximize"},
    "charlm": {"build": {"seq_len": 32, "hidden_size": 128, "batches_per_epoch": 10,
                         "max_eval_chars": 20_000},
               "train": {"epochs": 60, "batch_size": 32, "lr": 0.004, "optimizer": "adam",
                         "lr_schedule": "warmup_cosine"},
               "metric": "bpc", "direction": "minimize"},
    "gptlm": {"build": {"batches_per_epoch": 10, "max_eval_chars": 20_000},
              "train": {"epochs": 60, "batch_size": 32, "lr": 0.01, "optimizer": "adamw",
                        "lr_schedule": "warmup_cosine"},
              "metric": "bpc", "direction": "minimize"},
}

#: label -> (policy kind, constructor arguments). "CPT tuned" is filled in by the study.
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "FP32": ("fp32", {}),
    "static 8/8": ("fixed", {"bits": 8, "grad_bits": 8}),
    "static 6/6": ("fixed", {"bits": 6, "grad_bits": 6}),
    "CPT 3-8/8": ("cpt", {"bits": [3, 8], "grad_bits": 8, "cycles": 8}),
    "CPT 5-8/8": ("cpt", {"bits": [5, 8], "grad_bits": 8, "cycles": 8}),
    "MuPPET": ("muppet", {}),
    "CPT tuned": ("cpt", {}),
    "GuardedCPT": ("guarded_cpt", {}),
}
EVAL_SEEDS = (0, 1, 2)
TUNE_SEED = 100
SAVINGS_GOAL = 0.30


def build_task(name: str) -> Any:
    """The benchmark's task object for ``name`` (digits with short epochs of random minibatches)."""
    from adaprec.tasks import get_task

    spec = TASKS[name]
    if name == "digits":
        from muppet import SmallEpochDigits

        return SmallEpochDigits(**spec["build"])
    return get_task(name, **spec["build"])


def make_policy(kind: str, args: dict[str, Any]) -> Any:
    from adaprec.policies import make_policy as registry_make

    if kind == "fp32":
        return "fp32"
    args = {k: tuple(v) if isinstance(v, list) and k == "bits" else v for k, v in args.items()}
    return registry_make(kind, **args)


def settings_key(task: str, kind: str, args: dict[str, Any], seed: int) -> str:
    """A key that changes whenever the task's constraints, the policy or the seed change (for --cache)."""
    blob = json.dumps([TASKS[task], kind, args, seed], sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def run_one(task_name: str, label: str, kind: str, args: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train one (task, policy, seed); plain-Python figures (crosses process boundaries)."""
    torch.set_num_threads(1)
    from adaprec.tasks import train

    spec = TASKS[task_name]
    task = build_task(task_name)
    policy = make_policy(kind, args)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = train(task, policy, seed=seed, **spec["train"])
    out: dict[str, Any] = {
        "task": task_name, "config": label, "kind": kind, "args": args, "seed": seed,
        "key": settings_key(task_name, kind, args, seed), "metrics": dict(result.metrics),
        "primary": result.metrics[spec["metric"]], "gbitops": result.report["gbitops"],
        "steps": result.steps, "time_s": time.perf_counter() - t0,
        "time_at_precision": dict(result.report.get("time_at_precision", {})),
    }
    if kind == "muppet":
        out["switch_epochs"] = policy.switch_epochs()
    if kind == "guarded_cpt":
        out["lower"] = policy.lower
        out["raises"] = [[t["cycle"], t["new_lower"], t["reason"]] for t in policy.trace if t["raised"]]
        out["excess"] = [None if math.isnan(t["excess"]) else round(t["excess"], 4) for t in policy.trace]
    return out


# --- the tuned CPT ------------------------------------------------------------------------------------

def tune_cpt(task_name: str, trials: int) -> dict[str, Any]:
    """A short multi-objective study over CPT on the tuning seed; returns the chosen trial and all trials."""
    torch.set_num_threads(1)
    import optuna

    from adaprec import tune

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = TASKS[task_name]
    t0 = time.perf_counter()
    ref = run_one(task_name, "static 8/8", "fixed", {"bits": 8, "grad_bits": 8}, TUNE_SEED)
    study = tune.create_study(f"cpt-{task_name}", optuna.storages.InMemoryStorage(), policy="cpt",
                              metrics=(spec["metric"], "gbitops"), seed=0)
    fn = tune.task_train_fn(build_task(task_name), seed=TUNE_SEED, **spec["train"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tune.optimize(study, tune.objective(fn, "cpt", (spec["metric"], "gbitops")), trials, progress=False)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    sign = 1 if spec["direction"] == "maximize" else -1
    rows = [{"number": t.number, "params": dict(t.params), "config": t.user_attrs.get("policy_config"),
             "metric": t.values[0], "gbitops": t.values[1], "savings": 1 - t.values[1] / ref["gbitops"]}
            for t in done]
    qualified = [r for r in rows if r["savings"] >= SAVINGS_GOAL]
    pool = qualified or rows
    chosen = max(pool, key=lambda r: sign * r["metric"])
    return {"task": task_name, "reference": {"metric": ref["primary"], "gbitops": ref["gbitops"]},
            "trials": rows, "chosen": chosen, "qualified": len(qualified), "time_s": time.perf_counter() - t0}


# --- summary ------------------------------------------------------------------------------------------

def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(runs: list[dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for task_name, spec in TASKS.items():
        rows: dict[str, Any] = {}
        base = {r["seed"]: r for r in runs if r["task"] == task_name and r["config"] == "static 8/8"}
        for label in labels:
            rs = sorted((r for r in runs if r["task"] == task_name and r["config"] == label),
                        key=lambda r: r["seed"])
            if not rs:
                continue
            m, s = _mean_std([r["primary"] for r in rs])
            row: dict[str, Any] = {"mean": m, "std": s, "values": [r["primary"] for r in rs],
                                   "seeds": [r["seed"] for r in rs],
                                   "gbitops": statistics.fmean(r["gbitops"] for r in rs),
                                   "args": rs[0]["args"]}
            if spec["metric"] == "bpc":
                row["next_char_acc"] = _mean_std([r["metrics"]["accuracy"] for r in rs])
            paired = [r["primary"] - base[r["seed"]]["primary"] for r in rs if r["seed"] in base]
            row["paired_diff"] = statistics.fmean(paired) if paired else math.nan
            for extra in ("switch_epochs", "lower", "raises"):
                if extra in rs[0]:
                    row[extra] = [r[extra] for r in rs]
            rows[label] = row
        ref = rows.get("static 8/8")
        if ref is not None:
            sign = 1 if spec["direction"] == "maximize" else -1
            for row in rows.values():
                row["savings"] = 1 - row["gbitops"] / ref["gbitops"]
                gap = sign * (row["mean"] - ref["mean"])  # > 0: better than static 8/8
                row["quality_ok"] = gap >= -ref["std"]
                row["goal"] = row["quality_ok"] and row["savings"] >= SAVINGS_GOAL
        if rows:
            out[task_name] = {"metric": spec["metric"], "direction": spec["direction"], "rows": rows}
    return out


def markdown(summary: dict[str, Any], tuned: dict[str, Any], seeds: list[int], wall: float) -> str:
    lines = [
        "Every policy of a task trains with the same constraints (seeds, epochs, optimizer, warm-up + cosine "
        "learning rate, the controller's default classifier floor: the classifier keeps ceil(log2 C) + 3 "
        "bits, i.e. 10 bits for the ~100-character vocabularies, 7 for the 10 digits). Savings are against "
        "the real static 8/8 runs (GBitOPs from the cost meter, means over seeds). Goal: savings >= 30% "
        "and the metric no worse than static 8/8's mean by more than its std over the seeds. "
        f"Seeds {', '.join(map(str, seeds))}; one torch thread per run, 2 runs in parallel.", "",
    ]
    for task_name, t in summary.items():
        spec = TASKS[task_name]
        better = "higher" if t["direction"] == "maximize" else "lower"
        cfg = ", ".join(f"{k}={v}" for k, v in {**spec["build"], **spec["train"]}.items())
        lines += [f"## {task_name} ({t['metric']}, {better} is better)", "", f"Settings: {cfg}.", ""]
        acc = t["metric"] == "bpc"
        lines += ["| policy | " + t["metric"] + (" | next-char acc" if acc else "") +
                  " | vs static 8/8 (paired) | GBitOPs | savings vs static 8/8 | goal |",
                  "|---|---|" + ("---|" if acc else "") + "---|---|---|---|"]
        fmt = "{:.4f}"
        for label, r in t["rows"].items():
            metric = f"{fmt.format(r['mean'])} ± {fmt.format(r['std'])}"
            extra = f" | {r['next_char_acc'][0]:.4f}" if acc else ""
            goal = ("**holds**" if r.get("goal") else
                    "missed: " + ", ".join(x for x, bad in (("quality", not r.get("quality_ok", True)),
                                                             ("savings", r.get("savings", 0) < SAVINGS_GOAL))
                                           if bad)) if label not in ("static 8/8", "FP32") else "—"
            lines.append(f"| {label} | {metric}{extra} | {r['paired_diff']:+.4f} | {r['gbitops']:.1f} | "
                         f"{100 * r.get('savings', math.nan):.1f}% | {goal} |")
        notes = []
        if "GuardedCPT" in t["rows"] and "lower" in t["rows"]["GuardedCPT"]:
            g = t["rows"]["GuardedCPT"]
            raises = "; ".join(", ".join(f"({c}, {b}, {w})" for c, b, w in rs) or "none"
                               for rs in g["raises"])
            notes.append("GuardedCPT final lower bound per seed: " + ", ".join(map(str, g["lower"])) +
                         "; raises (cycle, new bound, trigger): " + raises)
        if "MuPPET" in t["rows"] and "switch_epochs" in t["rows"]["MuPPET"]:
            notes.append("MuPPET switch epochs per seed: " + "; ".join(
                ",".join(map(str, s)) or "none" for s in t["rows"]["MuPPET"]["switch_epochs"]))
        if task_name in tuned:
            c = tuned[task_name]["chosen"]
            notes.append(f"CPT tuned: trial {c['number']} of {len(tuned[task_name]['trials'])} on seed "
                         f"{TUNE_SEED} ({tuned[task_name]['qualified']} saved >= 30% there): "
                         f"{json.dumps(c['config'])}")
        lines += [""] + [f"- {n}" for n in notes] + [""]
    lines.append(f"Wall time: {wall:.0f} s.")
    return "\n".join(lines)


def command_without_cache() -> str:
    """The command line minus ``--cache FILE``: the cache only skips runs whose settings are identical, so
    the results do not depend on it (and its path is machine-specific).

    Example:
        >>> import sys
        >>> argv, sys.argv = sys.argv, ["benchmarks/lm_policy.py", "--cache", "/tmp/x.jsonl", "--trials", "4"]
        >>> command_without_cache()
        'python benchmarks/lm_policy.py --trials 4'
        >>> sys.argv = argv
    """
    args, out, skip = sys.argv[1:], [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--cache":
            skip = True
        elif not a.startswith("--cache="):
            out.append(a)
    return shlex.join(["python", sys.argv[0], *out])  # quoted: labels hold spaces ("static 8/8")


def readme_table(summary: dict[str, Any]) -> str:
    """The compact table the README shows: one row per policy, one column group per task."""
    tasks = list(summary)
    labels = [lb for lb in CONFIGS if any(lb in summary[t]["rows"] for t in tasks)]
    head = "| policy | " + " | ".join(f"{t}: {summary[t]['metric']} / savings" for t in tasks) + " |"
    lines = [head, "|---|" + "---|" * len(tasks)]
    for label in labels:
        cells = []
        for t in tasks:
            r = summary[t]["rows"].get(label)
            if r is None:
                cells.append("—")
                continue
            mark = "" if label in ("FP32", "static 8/8") else (" ✓" if r.get("goal") else " ✗")
            cells.append(f"{r['mean']:.4f} ± {r['std']:.4f} / {100 * r['savings']:.0f}%{mark}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _load_cache(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None or not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            out[r.get("key", "")] = r
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--seeds", nargs="+", type=int, default=list(EVAL_SEEDS))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--trials", type=int, default=12, help="Optuna trials per task for the tuned CPT")
    ap.add_argument("--jobs", type=int, default=2, help="parallel runs (one torch thread each)")
    ap.add_argument("--cache", type=Path, default=None,
                    help="JSON-lines file of finished runs: reused when their settings match, appended to")
    ap.add_argument("--cached-only", action="store_true",
                    help="train nothing: summarise the runs of --cache that match, and list the missing ones")
    ap.add_argument("--readme", action="store_true",
                    help="print the README's table from benchmarks/results/lm_policy.json and exit")
    args = ap.parse_args(argv)
    if args.readme:
        from common import RESULTS_DIR

        print(readme_table(json.loads((RESULTS_DIR / "lm_policy.json").read_text())["data"]["summary"]))
        return 0
    start = time.perf_counter()
    cache = _load_cache(args.cache)
    tuned: dict[str, Any] = {}
    configs = {k: CONFIGS[k] for k in args.configs}
    with ProcessPoolExecutor(args.jobs) as pool:
        if "CPT tuned" in configs:
            tune_cache = {r["task"]: r for r in cache.values() if r.get("kind") == "tuning"
                          and r.get("trials_asked") == args.trials and r.get("settings") == TASKS[r["task"]]}
            need = [t for t in args.tasks if t not in tune_cache]
            for res in pool.map(tune_cpt, need, [args.trials] * len(need)):
                res.update(kind="tuning", trials_asked=args.trials, settings=TASKS[res["task"]],
                           key=f"tuning-{res['task']}-{args.trials}")
                tune_cache[res["task"]] = res
                if args.cache is not None:
                    with args.cache.open("a") as f:
                        f.write(json.dumps(res) + "\n")
                print(f"tuned CPT on {res['task']}: chosen {res['chosen']['config']}", flush=True)
            tuned = {t: tune_cache[t] for t in args.tasks}
        jobs = []
        for seed in args.seeds:
            for task_name in args.tasks:
                for label, (kind, kw) in configs.items():
                    if label == "CPT tuned":
                        kw = tuned[task_name]["chosen"]["config"]
                    jobs.append((task_name, label, kind, kw, seed))
        runs, todo = [], []
        for j in jobs:
            hit = cache.get(settings_key(j[0], j[2], j[3], j[4]))
            if hit is not None:
                runs.append({**hit, "config": j[1]})
            else:
                todo.append(j)
        missing = [{"task": j[0], "config": j[1], "seed": j[4]} for j in todo] if args.cached_only else []
        if args.cached_only:
            todo = []
        print(f"{len(runs)} runs from the cache, {len(todo)} to train, {len(missing)} missing", flush=True)
        futures = [pool.submit(run_one, *j) for j in todo]
        for fut in futures:
            r = fut.result()
            runs.append(r)
            if args.cache is not None:
                with args.cache.open("a") as f:
                    f.write(json.dumps(r) + "\n")
            print(f"{r['task']:7s} {r['config']:12s} seed {r['seed']}: {TASKS[r['task']]['metric']} "
                  f"{r['primary']:.4f}  GBitOPs {r['gbitops']:.1f}  {r['time_s']:.0f}s", flush=True)
    wall = time.perf_counter() - start
    summary = summarise(runs, list(configs))
    md = markdown(summary, tuned, args.seeds, wall)
    if args.cached_only:  # no wall time of its own: the runs came from earlier invocations
        md = md.replace(f"Wall time: {wall:.0f} s.", "Assembled from the cached runs of earlier invocations "
                        "(`--cached-only`); each run's own time is `time_s` in the JSON.")
    if missing:  # each row's mean and std are over the seeds it has (its "seeds" in the JSON)
        md += ("\n\n**Not run** (the session's time ran out; each row above is over the seeds it has): "
               + "; ".join(f"{m['task']} {m['config']} seed {m['seed']}" for m in missing) + ".")
    print(md)
    data = {"summary": summary, "runs": runs, "tuning": tuned, "tasks": {t: TASKS[t] for t in args.tasks},
            "configs": {k: list(v) for k, v in configs.items()}, "seeds": args.seeds, "tune_seed": TUNE_SEED,
            "wall_time_s": wall, "jobs": args.jobs, "worker_threads": 1, "missing": missing}
    write_results("lm_policy", data, md, command_without_cache())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
