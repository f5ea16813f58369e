"""The ``adaprec`` command line: ``train``, ``prt``, ``policies``, ``report`` (and subcommands that other
modules register, such as ``tune``).

Every subcommand has ``--help``. A bad argument, path or name prints one line on stderr and exits with
status 2; set ``ADAPREC_DEBUG=1`` to get the full traceback instead.

Adding a subcommand: write ``add_arguments(parser)`` and ``run(args) -> int | None`` and call
:func:`register_command` when your module is imported; list the module in ``EXTENSION_MODULES`` (or
import it before calling :func:`main`) so that the CLI loads it::

    from adaprec.cli import CLIError, register_command

    def _add_arguments(p):
        p.add_argument("--trials", type=int, default=20)

    def _run(args):
        if args.trials < 1:
            raise CLIError("--trials must be at least 1")
        ...
        return 0

    register_command("tune", _run, help="tune a policy with Optuna", add_arguments=_add_arguments)

Example:
    >>> from adaprec.cli import main
    >>> main(["policies"])  # doctest: +ELLIPSIS
    fixed ...
    fp32 ...
    0
    >>> main(["train", "--epochs", "0"])  # prints a one-line error on stderr
    2
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import math
import os
import sys
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["main", "register_command", "build_parser", "CLIError", "Progress", "EXTENSION_MODULES",
           "default_run_name"]

#: Modules imported when the parser is built, so that the subcommands they register appear. A missing
#: module is skipped (the feature is not installed); one that fails to import is reported on stderr.
EXTENSION_MODULES: list[str] = ["adaprec.tune"]

PROG = "adaprec"


class CLIError(Exception):
    """A user error: printed as one line ``adaprec <command>: error: <message>``, exit status 2."""


@dataclass
class _Command:
    name: str
    run: Callable[[argparse.Namespace], int | None]
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None
    description: str | None


_COMMANDS: dict[str, _Command] = {}


def register_command(name: str, run: Callable[[argparse.Namespace], int | None], *, help: str,
                     add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                     description: str | None = None, overwrite: bool = False) -> None:
    """Add ``adaprec <name>``: ``add_arguments(parser)`` declares its options, ``run(args)`` does the work
    and returns the exit status (``None`` means 0). Raise :class:`CLIError` (or ``ValueError``,
    ``FileNotFoundError``…) for user errors: the CLI prints them as one line and exits with status 2.

    Example:
        >>> register_command("hello", lambda args: print("hi", args.who), help="say hi",
        ...                  add_arguments=lambda p: p.add_argument("who"))
        >>> main(["hello", "there"])
        hi there
        0
        >>> _ = _COMMANDS.pop("hello")
    """
    if not isinstance(name, str) or not name or not name.replace("-", "").isalnum():
        raise ValueError(f"command name must be a non-empty word (letters, digits, '-'), got {name!r}")
    if not callable(run):
        raise TypeError(f"run for command {name!r} must be callable(args)")
    if add_arguments is not None and not callable(add_arguments):
        raise TypeError(f"add_arguments for command {name!r} must be callable(parser)")
    if name in _COMMANDS and not overwrite:
        raise ValueError(f"command {name!r} is already registered (pass overwrite=True to replace it)")
    _COMMANDS[name] = _Command(name, run, help, add_arguments, description)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) that points to ``--help``."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise CLIError(message)


def _load_extensions() -> None:
    for mod in EXTENSION_MODULES:
        if mod in sys.modules:
            continue
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (mod == exc.name or mod.startswith(exc.name + ".")):
                continue  # the feature is simply not there
            print(f"{PROG}: warning: could not load {mod}: {exc}", file=sys.stderr)
        except Exception as exc:  # a broken extension must not take the other commands down
            print(f"{PROG}: warning: could not load {mod}: {type(exc).__name__}: {exc}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """The full ``adaprec`` parser with every registered subcommand."""
    _load_extensions()
    parser = _Parser(prog=PROG, description="Adaptive-precision training for PyTorch: train, inspect and "
                     "compare runs.", epilog="Run 'adaprec <command> --help' for a command's options.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=_Parser)
    for cmd in _COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        if cmd.add_arguments is not None:
            cmd.add_arguments(p)
        p.set_defaults(_command=cmd.name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``adaprec`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    try:
        parser = build_parser()
        if not argv:
            parser.print_help()
            return 0
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help / --version
            return int(exc.code or 0)
        if getattr(args, "_command", None) is None:
            parser.print_help()
            return 0
        command = args._command
        code = _COMMANDS[command].run(args)
        return 0 if code is None else int(code)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("ADAPREC_DEBUG"):
            raise
        where = f"{PROG} {command}" if command in _COMMANDS else PROG
        print(f"{where}: error: {_one_line(exc)}{_help_hint(exc, where)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip() or type(exc).__name__
    if isinstance(exc, KeyError) and exc.args:
        msg = str(exc.args[0])
    if not isinstance(exc, CLIError | ValueError | TypeError | OSError | KeyError | ImportError):
        msg = f"{type(exc).__name__}: {msg}"  # unexpected: name the kind to help a bug report
    return " ".join(msg.split())


def _help_hint(exc: BaseException, where: str) -> str:
    return f" (see '{where} --help')" if isinstance(exc, CLIError) else ""


# --- shared argument types ---------------------------------------------------------------------------
def _positive_int(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise CLIError(f"{flag} must be a positive integer, got {text!r}") from None
        if v < 1:
            raise CLIError(f"{flag} must be a positive integer, got {v}")
        return v
    return parse


def _nonneg_int(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise CLIError(f"{flag} must be a non-negative integer, got {text!r}") from None
        if v < 0:
            raise CLIError(f"{flag} must be a non-negative integer, got {v}")
        return v
    return parse


def _positive_float(flag: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise CLIError(f"{flag} must be a positive number, got {text!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise CLIError(f"{flag} must be a positive number, got {text}")
        return v
    return parse


def _param(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as TOML (``4``, ``0.5``, ``true``, ``[3, 8]``, ``"fx8"``);
    anything that is not valid TOML is taken as a string (``bits=bf16``)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise CLIError(f"--param needs key=value (e.g. --param bits=4), got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key, parsed


def _device_arg(text: str) -> str:
    if text == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return text


def default_run_name(task: str, policy: str, now: _dt.datetime | None = None) -> str:
    """``<task>-<policy>-<YYYYmmdd-HHMMSS>``, the run directory name ``adaprec train`` uses by default.

    Example:
        >>> default_run_name("digits", "policies/cpt.toml", _dt.datetime(2025, 1, 2, 3, 4, 5))
        'digits-cpt-20250102-030405'
    """
    stem = Path(policy).stem if policy.endswith(".toml") else policy
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
    return f"{task}-{safe}-{(now or _dt.datetime.now()).strftime('%Y%m%d-%H%M%S')}"


def _fresh_run_dir(logdir: Path, name: str | None, task: str, policy: str) -> Path:
    if logdir.exists() and not logdir.is_dir():
        raise CLIError(f"--logdir {str(logdir)!r} exists and is not a directory")
    if name is not None:
        if not name or "/" in name or name in (".", ".."):
            raise CLIError(f"--name must be a plain folder name, got {name!r}")
        run = logdir / name
        if run.exists() and any(run.iterdir()):
            raise CLIError(f"run directory {str(run)!r} already exists and is not empty; pick another "
                           "--name (TensorBoard would mix the two runs)")
        return run
    base = default_run_name(task, policy)
    run, i = logdir / base, 1
    while run.exists():  # two runs started within the same second
        run, i = logdir / f"{base}-{i}", i + 1
    return run


# --- adaprec train -------------------------------------------------------------------------------------
class Progress:
    """A tqdm progress bar driven by a controller's events: epoch, steps, loss, current bits.

    The loss is read from the device only every ``refresh_every`` steps (reading it syncs).

    Example:
        >>> import io, torch, adaprec
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 2))
        >>> out = io.StringIO()
        >>> with adaprec.Controller(model, policy="fixed") as ctl:
        ...     bar = Progress(total_steps=2, epochs=1, file=out).attach(ctl)
        ...     for x in ctl.epoch([torch.randn(2, 4)] * 2):
        ...         loss = model(x).sum(); loss.backward(); ctl.step(); ctl.observe(loss=loss)
        >>> "2/2" in out.getvalue() and "int8/int8" in out.getvalue()
        True
    """

    def __init__(self, total_steps: int | None, epochs: int, *, refresh_every: int = 10, file: Any = None,
                 disable: bool = False) -> None:
        self.total_steps, self.epochs, self.refresh_every = total_steps, epochs, refresh_every
        self.file, self.disable = file, disable
        self.bar: Any = None

    def attach(self, ctl: Any) -> Progress:
        from tqdm.auto import tqdm

        from .events import Event

        self.bar = tqdm(total=self.total_steps, unit="step", file=self.file or sys.stderr, disable=self.disable,
                        dynamic_ncols=True, leave=True)
        ctl.on(Event.EPOCH_STARTED, self._epoch)
        ctl.on(Event.ITERATION_COMPLETED, self._step)
        ctl.on(Event.METRICS_OBSERVED, self._metrics)
        ctl.on(Event.FIT_COMPLETED, self._close)
        ctl.on(Event.EXCEPTION_RAISED, self._close)
        self._postfix: dict[str, str] = {}
        return self

    def _epoch(self, ctl: Any, *, epoch: int, **_: Any) -> None:
        self.bar.set_description(f"epoch {epoch + 1}/{self.epochs}")

    def _step(self, ctl: Any, *, step: int, **_: Any) -> None:
        self.bar.update(1)
        if step == 0 or (step + 1) % self.refresh_every == 0:
            self._refresh(ctl)

    def _metrics(self, ctl: Any, *, stats: dict[str, Any], **_: Any) -> None:
        for k, v in stats.items():
            if k != "loss" and isinstance(v, int | float) and not isinstance(v, bool):
                self._postfix[k] = f"{v:.4g}"
                self._refresh(ctl)

    def _refresh(self, ctl: Any) -> None:
        loss = ctl.stats.get("loss")
        if loss is not None:
            self._postfix["loss"] = f"{float(loss):.4f}"
        if ctl.history:
            self._postfix["bits"] = ctl.history[-1].summary()
        # Keep a stable order: loss, bits, then validation figures.
        order = sorted(self._postfix, key=lambda k: (k != "loss", k != "bits", k))
        self.bar.set_postfix({k: self._postfix[k] for k in order}, refresh=True)

    def _close(self, ctl: Any, **_: Any) -> None:
        if self.bar is not None:
            self._refresh(ctl)
            self.bar.close()


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="digits",
                   help="training task: digits, charlm, cifar10, imagefolder (see adaprec.tasks)")
    p.add_argument("--data", metavar="PATH", help="data folder for cifar10 (holding cifar-10-batches-py) "
                   "or imagefolder (train/ and val/); adaprec never downloads data")
    p.add_argument("--model", metavar="NAME", help="torchvision model name for cifar10/imagefolder "
                   "(e.g. resnet18, mobilenet_v2; cifar10 default: resnet20)")
    p.add_argument("--policy", default="cpt", metavar="NAME|RECIPE.toml",
                   help="precision policy: a registered name (see 'adaprec policies') or a recipe file")
    p.add_argument("--param", action="append", default=[], type=_param, metavar="KEY=VALUE",
                   help="policy constructor argument, repeatable (e.g. --param bits=4 --param grad_bits=8)")
    p.add_argument("--epochs", type=_positive_int("--epochs"), help="epochs (default: the task's)")
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), help="batch size (default: the task's)")
    p.add_argument("--lr", type=_positive_float("--lr"), help="learning rate (default: the task's)")
    p.add_argument("--seed", type=_nonneg_int("--seed"), default=0, help="random seed")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (cuda if available)")
    p.add_argument("--logdir", default="runs", metavar="DIR",
                   help="TensorBoard parent folder; the run goes to DIR/<name>")
    p.add_argument("--name", help="run folder name (default: <task>-<policy>-<timestamp>)")
    p.add_argument("--no-logs", action="store_true", help="write no TensorBoard logs")
    p.add_argument("--json", metavar="FILE", help="also write the result (metrics, report, history) as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _build_task(args: argparse.Namespace) -> Any:
    from .tasks import get_task, list_tasks

    known = list_tasks()
    if args.task not in known:
        raise CLIError(f"unknown task {args.task!r}; known tasks: {', '.join(known)}")
    kwargs: dict[str, Any] = {}
    if args.data is not None:
        if not Path(args.data).exists():
            raise CLIError(f"--data {args.data!r} does not exist")
        kwargs["path"] = args.data
    if args.model is not None:
        kwargs["model"] = args.model
    try:
        return get_task(args.task, **kwargs)
    except TypeError as exc:
        unused = [f"--{'data' if k == 'path' else k}" for k in kwargs if f"'{k}'" in str(exc)]
        if unused:
            raise CLIError(f"{' and '.join(unused)} is not used by task {args.task!r} (only by tasks that "
                           "read data from a path: cifar10, imagefolder)") from None
        raise


def _check_policy(spec: str, params: dict[str, Any]) -> None:
    from .policies import list_policies, make_policy

    if spec.endswith(".toml"):
        if not Path(spec).is_file():
            raise CLIError(f"--policy recipe file {spec!r} does not exist")
    elif spec not in list_policies():
        raise CLIError(f"unknown policy {spec!r}; known policies: {', '.join(list_policies())} "
                       "(or give a recipe .toml file)")
    make_policy(spec, **params)  # fail now on bad --param, before loading data and building the model


def _run_train(args: argparse.Namespace) -> int:
    from .tasks.run import train

    params = dict(args.param)
    _check_policy(args.policy, params)
    task = _build_task(args)
    policy: Any = args.policy
    if params:
        from .policies import make_policy

        policy = make_policy(args.policy, **params)
    device = _device_arg(args.device)
    run_dir = None if args.no_logs else _fresh_run_dir(Path(args.logdir), args.name, args.task, args.policy)
    if args.json is not None and not Path(args.json).resolve().parent.is_dir():
        raise CLIError(f"--json: folder {str(Path(args.json).parent)!r} does not exist")
    defaults = task.defaults
    epochs = args.epochs or defaults.get("epochs", 10)
    bar: dict[str, Progress] = {}

    def on_start(ctl: Any) -> None:
        if run_dir is not None:
            logger = ctl.components.get("tensorboard")
            if logger is not None:
                logger.hparams.update({"task": task.name, "epochs": epochs, "seed": args.seed,
                                       "batch_size": args.batch_size or defaults.get("batch_size", 32)})
        bar["p"] = Progress(ctl.total_steps, epochs, disable=args.quiet).attach(ctl)

    result = train(task, policy, epochs=epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                   device=device, logdir=None if run_dir is None else str(run_dir), on_start=on_start)
    print(format_result(result, run_dir))
    if args.json is not None:
        import json

        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"result written to {args.json}")
    return 0


def format_result(result: Any, run_dir: Path | None) -> str:
    """The summary ``adaprec train`` prints: the task metric, cost and savings, then the full report."""
    r = result.report
    ref = r.get("reference", "int8/int8")
    lines = [
        f"task {result.task} · policy {result.policy} · {result.steps} steps in {result.wall_time_s:.1f} s",
        f"  {result.primary_metric:<22} {result.primary:.4f}  (best {result.best:.4f})",
        f"  {'GBitOPs':<22} {r['gbitops']:.4g}  (FP32 {r['gbitops_fp32']:.4g}, static {ref} "
        f"{r['gbitops_reference']:.4g})",
        f"  {'savings vs FP32':<22} {100 * r['savings_vs_fp32']:.1f} %",
        f"  {'savings vs static ' + ref:<22} {100 * r['savings_vs_reference']:.1f} %",
    ]
    tap = r.get("time_at_precision") or {}
    if tap:
        top = sorted(tap.items(), key=lambda kv: -kv[1])[:4]
        more = f", +{len(tap) - 4} more" if len(tap) > 4 else ""
        lines.append(f"  {'time at precision':<22} " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in top) + more)
    if run_dir is not None:
        lines.append(f"  {'TensorBoard logs':<22} {run_dir}   (tensorboard --logdir {run_dir.parent})")
    lines.append("")
    lines.append("report:")
    lines += ["  " + line for line in str(_short_report(r)).splitlines()]
    return "\n".join(lines)


def _short_report(r: dict[str, Any]) -> Any:
    from .controller import Report

    # Per-layer figures make the table unreadable for deep models; they are in the logs and --json.
    return Report({k: v for k, v in r.items() if k != "per_layer_gbitops"})


# --- adaprec policies ----------------------------------------------------------------------------------
def _add_policies_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipes", metavar="DIR", help="also list the recipe files (*.toml) in DIR")


def _run_policies(args: argparse.Namespace) -> int:
    from .policies import list_policies, load_recipe

    pol = list_policies()
    width = max(map(len, pol), default=0)
    for name, desc in pol.items():
        print(f"{name.ljust(width)}  {desc}")
    folders = [Path(__file__).parent / "recipes"]
    if args.recipes is not None:
        if not Path(args.recipes).is_dir():
            raise CLIError(f"--recipes {args.recipes!r} is not a folder")
        folders.append(Path(args.recipes))
    recipes = sorted(f for d in folders if d.is_dir() for f in d.glob("*.toml"))
    if recipes:
        print("\nrecipes (use with --policy FILE):")
        for f in recipes:
            try:
                name, _ = load_recipe(f)
                print(f"  {f}  ({name})")
            except (ValueError, OSError) as exc:
                print(f"  {f}  (unreadable: {_one_line(exc)})")
    return 0


# --- adaprec report ------------------------------------------------------------------------------------
def _add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run folders (a folder of runs, e.g. runs/ or a study, expands to all of them)")
    p.add_argument("-o", "--out", metavar="FILE.png",
                   help="output PNG (default: RUN_DIR/report.png for one run, ./report.png for several)")
    p.add_argument("--metric", help="final metric for the runs' comparison (a tag such as stats/val_acc, or a "
                   "key such as val_acc); default: accuracy")


def _run_report(args: argparse.Namespace) -> int:
    from .plots import find_runs, final_metric, plot_runs
    from .tensorboard import read_scalars

    runs = find_runs(args.runs)
    out = Path(args.out) if args.out else (runs[0] / "report.png" if len(runs) == 1 else Path("report.png"))
    path = plot_runs(runs, out, metric=args.metric)
    for run in runs:
        s = read_scalars(run)
        m = final_metric(s, args.metric)
        g = s.get("cost/gbitops")
        sv = s.get("cost/savings_vs_fp32")
        parts = [f"{m[0].split('/', 1)[-1]} {m[1]:.4g}" if m else "no final metric",
                 f"GBitOPs {g[-1][1]:.4g}" if g else "no cost logged"]
        if sv:
            parts.append(f"savings vs FP32 {100 * sv[-1][1]:.1f} %")
        print(f"{run}: " + ", ".join(parts))
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")
    return 0


# --- adaprec prt ---------------------------------------------------------------------------------------
def _add_prt_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="digits", help="task whose model is probed (see adaprec train --help)")
    p.add_argument("--data", metavar="PATH", help="data folder for cifar10/imagefolder")
    p.add_argument("--model", metavar="NAME", help="torchvision model name for cifar10/imagefolder")
    p.add_argument("--batch-size", type=_positive_int("--batch-size"), help="batch size (default: the task's)")
    p.add_argument("--seed", type=_nonneg_int("--seed"), default=0, help="random seed")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... or auto")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the curve and the bounds to this PNG")
    p.add_argument("--logdir", metavar="DIR", help="also log the curve to TensorBoard in DIR")


def _run_prt(args: argparse.Namespace) -> int:
    try:
        prt = importlib.import_module("adaprec.prt")
    except ModuleNotFoundError as exc:
        if exc.name in ("adaprec.prt",):
            raise CLIError("the precision range test (adaprec.prt) is not available in this installation") \
                from None
        raise
    return _prt_command(prt, args)


def _prt_command(prt: Any, args: argparse.Namespace) -> int:
    raise CLIError("adaprec prt is not wired yet")


register_command("train", _run_train, add_arguments=_add_train_arguments,
                 help="train a task under a precision policy and print the report",
                 description="Train a task's model under a precision policy, print accuracy, GBitOPs and "
                 "savings vs FP32 and static 8-bit, and write TensorBoard logs. With no options: the "
                 "digits CNN under CPT.")
register_command("prt", _run_prt, add_arguments=_add_prt_arguments,
                 help="precision range test: find a model's lower and upper bit bounds",
                 description="Run the precision range test (CPT) on a task's model, print the curve and the "
                 "bounds, optionally plot it or log it to TensorBoard.")
register_command("policies", _run_policies, add_arguments=_add_policies_arguments,
                 help="list the registered precision policies (plugins included)")
register_command("report", _run_report, add_arguments=_add_report_arguments,
                 help="PNG plots of runs from their TensorBoard logs",
                 description="Plot one run (precision timeline per layer, loss, cumulative GBitOPs) or compare "
                 "several (final accuracy vs GBitOPs, loss, cost, mean bits).")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
