"""The ``adaprec`` command line: ``train``, ``prt``, ``policies``, ``report`` (and subcommands that other
modules register, such as ``tune``).

Every subcommand has ``--help``. A bad argument, path or name prints one line on stderr and exits with
status 2; set ``ADAPREC_DEBUG=1`` to get the full traceback instead.

Adding a subcommand: write ``add_arguments(parser)`` and ``run(args) -> int | None`` and call
:func:`register_command` when your module is imported; list the module in ``EXTENSION_MODULES`` (or
import it before calling :func:`main`) so that the CLI loads it. A module that already builds its own
sub-parser (``add_parser(subparsers) -> parser``, as :mod:`adaprec.tune.cli` does) registers it with
``register_command(name, run, add_parser=add_parser)``::

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
    >>> import contextlib, io
    >>> from adaprec.cli import main
    >>> out = io.StringIO()
    >>> with contextlib.redirect_stdout(out):
    ...     code = main(["policies"])
    >>> code, "fixed" in out.getvalue()
    (0, True)
    >>> main(["train", "--epochs", "0"])  # prints a one-line error on stderr
    2
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import importlib
import math
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser ships as the "tomli" package
    import tomli as tomllib

__all__ = ["main", "register_command", "build_parser", "CLIError", "Progress", "EXTENSION_MODULES",
           "default_run_name"]

#: Modules imported when the parser is built, so that the subcommands they register appear. A missing
#: module is skipped (the feature is not installed); one that fails to import is reported on stderr.
EXTENSION_MODULES: list[str] = []

PROG = "adaprec"


class CLIError(Exception):
    """A user error: printed as one line ``adaprec <command>: error: <message>``, exit status 2."""


@dataclass
class _Command:
    name: str
    run: Callable[[argparse.Namespace], int | None]
    help: str | None
    add_arguments: Callable[[argparse.ArgumentParser], None] | None
    description: str | None
    add_parser: Callable[[Any], argparse.ArgumentParser] | None = None


_COMMANDS: dict[str, _Command] = {}


def register_command(name: str, run: Callable[[argparse.Namespace], int | None], *, help: str | None = None,
                     add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                     add_parser: Callable[[Any], argparse.ArgumentParser] | None = None,
                     description: str | None = None, overwrite: bool = False) -> None:
    """Add ``adaprec <name>``: ``add_arguments(parser)`` declares its options, ``run(args)`` does the work
    and returns the exit status (``None`` means 0). Raise :class:`CLIError` (or ``ValueError``,
    ``FileNotFoundError``…) for user errors: the CLI prints them as one line and exits with status 2.

    Instead of ``help``/``add_arguments`` a module that builds its own sub-parser passes
    ``add_parser(subparsers) -> parser``; it must add the parser under ``name``.

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
    if add_parser is not None:
        if not callable(add_parser):
            raise TypeError(f"add_parser for command {name!r} must be callable(subparsers) -> parser")
        if add_arguments is not None or help is not None:
            raise ValueError(f"command {name!r}: give either add_parser or help/add_arguments, not both")
    elif not help:
        raise ValueError(f"command {name!r} needs help= (one line for 'adaprec --help')")
    if name in _COMMANDS and not overwrite:
        raise ValueError(f"command {name!r} is already registered (pass overwrite=True to replace it)")
    _COMMANDS[name] = _Command(name, run, help, add_arguments, description, add_parser)


class _UsageError(CLIError):
    """A malformed command line; the message points to ``--help``."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) that points to ``--help``."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        raise _UsageError(message)


class _Formatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` only where there is a meaningful default not already in the help text."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


def _register_tune() -> None:
    # ``adaprec tune`` lives in adaprec.tune.cli, which builds its own sub-parser.
    if "tune" in _COMMANDS:
        return
    try:
        from .tune.cli import add_tune_parser, run_tune
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.startswith("adaprec.tune"):
            return  # not part of this installation
        raise
    register_command("tune", run_tune, add_parser=add_tune_parser)


def _load_extensions() -> None:
    try:
        _register_tune()
    except Exception as exc:  # e.g. optuna missing: the other commands still work
        print(f"{PROG}: warning: 'adaprec tune' is unavailable: {type(exc).__name__}: {exc}", file=sys.stderr)
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
        if cmd.add_parser is not None:
            p = cmd.add_parser(sub)
            if not isinstance(p, argparse.ArgumentParser) or sub.choices.get(cmd.name) is not p:
                raise TypeError(f"add_parser of command {cmd.name!r} must add and return a parser named "
                                f"{cmd.name!r}")
        else:
            p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help,
                               formatter_class=_Formatter)
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
        with warnings.catch_warnings(), contextlib.ExitStack() as cleanup:
            # Warnings are for the person at the terminal: one line each, no source location.
            where = f"{PROG} {command}"
            warnings.showwarning = lambda message, category, *a, **k: print(
                f"{where}: warning: {message}", file=sys.stderr)
            args._cleanup = cleanup  # commands register what to undo when they end (thread count)
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
    return f" (see '{where} --help')" if isinstance(exc, _UsageError) else ""


# --- shared argument types ---------------------------------------------------------------------------
def _positive_int(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise _UsageError(f"{flag} must be a positive integer, got {text!r}") from None
        if v < 1:
            raise _UsageError(f"{flag} must be a positive integer, got {v}")
        return v
    return parse


def _nonneg_int(flag: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise _UsageError(f"{flag} must be a non-negative integer, got {text!r}") from None
        if v < 0:
            raise _UsageError(f"{flag} must be a non-negative integer, got {v}")
        return v
    return parse


def _positive_float(flag: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise _UsageError(f"{flag} must be a positive number, got {text!r}") from None
        if not (v > 0 and math.isfinite(v)):
            raise _UsageError(f"{flag} must be a positive number, got {text}")
        return v
    return parse


def _param(text: str) -> tuple[str, Any]:
    """``key=value`` with the value read as TOML (``4``, ``0.5``, ``true``, ``[3, 8]``, ``"fx8"``);
    anything that is not valid TOML is taken as a string (``bits=bf16``)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key.isidentifier():
        raise _UsageError(f"--param needs key=value (e.g. --param bits=4), got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key, parsed


def _add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_positive_int("--threads"), metavar="N",
                   help="torch CPU threads (default: the task's, 1 for digits and charlm, whose small "
                   "models run fastest on one thread and do not fight other jobs for cores; torch's own "
                   "default for the others)")


def _set_threads(args: argparse.Namespace, task: Any) -> int:
    """Apply ``--threads`` (or the task's default) to torch for the rest of the command; returns the
    thread count in force. :func:`main` puts the caller's count back afterwards, so calling ``main()``
    from Python (a notebook, a test) does not change the process's setting."""
    import torch

    n = args.threads if args.threads is not None else task.defaults.get("threads")
    if n is not None:
        old = torch.get_num_threads()
        cleanup = getattr(args, "_cleanup", None)
        if cleanup is not None:
            cleanup.callback(torch.set_num_threads, old)
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


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


#: What ``adaprec train`` and ``adaprec report`` write into a run folder; ``--overwrite`` deletes only these.
_RUN_FILES = ("events.out.tfevents.*", "report.png")


def _fresh_run_dir(logdir: Path, name: str | None, task: str, policy: str, overwrite: bool = False) -> Path:
    if logdir.exists() and not logdir.is_dir():
        raise CLIError(f"--logdir {str(logdir)!r} exists and is not a directory")
    if name is not None:
        if not name or "/" in name or name in (".", ".."):
            raise CLIError(f"--name must be a plain folder name, got {name!r}")
        run = logdir / name
        if run.exists() and not run.is_dir():
            raise CLIError(f"{str(run)!r} exists and is not a directory")
        if run.exists() and any(run.iterdir()):
            if not overwrite:
                raise CLIError(f"run directory {str(run)!r} already exists and is not empty; pick another "
                               "--name or pass --overwrite to replace that run (TensorBoard would mix the "
                               "two runs)")
            _clear_run_dir(run)
        return run
    base = default_run_name(task, policy)
    run, i = logdir / base, 1
    while run.exists():  # two runs started within the same second
        run, i = logdir / f"{base}-{i}", i + 1
    return run


def _clear_run_dir(run: Path) -> None:
    """Delete an earlier run's files, but only if the folder holds nothing else (never a user's data)."""
    files = list(run.iterdir())
    foreign = [f.name for f in files if not f.is_file() or not any(f.match(p) for p in _RUN_FILES)]
    if foreign:
        shown = ", ".join(sorted(foreign)[:5]) + (", ..." if len(foreign) > 5 else "")
        raise CLIError(f"--overwrite: {str(run)!r} holds files that adaprec did not write ({shown}); "
                       "remove them yourself or pick another --name")
    for f in files:
        f.unlink()


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

        self.bar = tqdm(total=self.total_steps, unit="step", file=self.file or sys.stderr,
                        disable=self.disable, dynamic_ncols=True, leave=True)
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
            if hasattr(loss, "detach"):
                loss = loss.detach()
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
                   help="training task: digits, charlm, gptlm, cifar10, imagefolder (see adaprec.tasks)")
    p.add_argument("--data", metavar="PATH", help="data folder for cifar10 (holding cifar-10-batches-py) "
                   "or imagefolder (train/ and val/); adaprec never downloads data")
    p.add_argument("--model", metavar="NAME", help="torchvision model name for cifar10/imagefolder "
                   "(e.g. resnet18, mobilenet_v2; cifar10 default: resnet20)")
    p.add_argument("--policy", default="cpt", metavar="NAME|RECIPE.toml",
                   help="precision policy: a registered name (see 'adaprec policies') or a recipe file")
    p.add_argument("--param", action="append", default=[], type=_param, metavar="KEY=VALUE",
                   help="policy constructor argument, repeatable (e.g. --param bits=4 --param grad_bits=8)")
    p.add_argument("--epochs", type=_positive_int("--epochs"), help="epochs (default: the task's)")
    p.add_argument("--batch-size", type=_positive_int("--batch-size"),
                   help="batch size (default: the task's)")
    p.add_argument("--lr", type=_positive_float("--lr"), help="learning rate (default: the task's)")
    p.add_argument("--seed", type=_nonneg_int("--seed"), default=0, help="random seed")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... or auto (cuda if available)")
    _add_threads_argument(p)
    p.add_argument("--logdir", default="runs", metavar="DIR",
                   help="TensorBoard parent folder; the run goes to DIR/<name>")
    p.add_argument("--name", help="run folder name (default: <task>-<policy>-<timestamp>)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier run of the same --name (its event files and report.png)")
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
        unused = [_TASK_FLAGS[k].split()[0] for k in kwargs if f"'{k}'" in str(exc)]
        if unused:
            raise CLIError(f"{' and '.join(unused)} is not used by task {args.task!r} (only by tasks that "
                           "read data from a path: cifar10, imagefolder)") from None
        raise CLIError(_flag_names(str(exc))) from None
    except ValueError as exc:  # e.g. "needs path=": say it with the command line's words
        raise CLIError(_flag_names(str(exc))) from None


#: Task constructor arguments and the command-line flags that set them.
_TASK_FLAGS = {"path": "--data PATH", "model": "--model NAME"}


def _flag_names(message: str) -> str:
    """A task's error message with its keyword arguments (``path=``) named as the flags that set them.

    Example:
        >>> _flag_names("task 'cifar10' needs path= (the folder)")
        "task 'cifar10' needs --data PATH (the folder)"
    """
    import re

    for kw, flag in _TASK_FLAGS.items():
        message = re.sub(rf"\b{kw}=(?=[\s),;:]|$)", flag, message)
    return message


def _check_policy(spec: str, params: dict[str, Any]) -> None:
    from .policies import find_recipe, list_policies, list_recipes, make_policy

    if spec.endswith(".toml"):
        try:
            find_recipe(spec)
        except FileNotFoundError as exc:
            raise CLIError(f"--policy: {exc}") from None
    elif spec not in list_policies() and spec not in list_recipes():
        raise CLIError(f"unknown policy {spec!r}; known policies: {', '.join(list_policies())}; shipped "
                       f"recipes: {', '.join(list_recipes())} (or give a recipe .toml file)")
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
    if args.json is not None and not Path(args.json).resolve().parent.is_dir():
        raise CLIError(f"--json: folder {str(Path(args.json).parent)!r} does not exist")
    if args.overwrite and (args.name is None or args.no_logs):
        raise CLIError("--overwrite needs --name (the run to replace) and logs (not --no-logs)")
    run_dir = None if args.no_logs else _fresh_run_dir(Path(args.logdir), args.name, args.task, args.policy,
                                                       overwrite=args.overwrite)
    _set_threads(args, task)
    defaults = task.defaults
    epochs = args.epochs or defaults.get("epochs", 10)
    bar: dict[str, Progress] = {}
    floor: dict[str, Any] = {}

    def on_start(ctl: Any) -> None:
        if ctl.classifier_floor is not None:
            floor["layer"], floor["bits"] = ctl.classifier_floor.target, ctl.classifier_floor.bits
        if run_dir is not None:
            logger = ctl.components.get("tensorboard")
            if logger is not None:
                logger.hparams.update({"task": task.name, "epochs": epochs, "seed": args.seed,
                                       "batch_size": args.batch_size or defaults.get("batch_size", 32)})
        bar["p"] = Progress(ctl.total_steps, epochs, disable=args.quiet).attach(ctl)

    result = train(task, policy, epochs=epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                   device=device, logdir=None if run_dir is None else str(run_dir), on_start=on_start)
    print(format_result(result, run_dir, classifier_floor=floor or None))
    if args.json is not None:
        import json

        Path(args.json).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
        print(f"result written to {args.json}")
    return 0


def format_result(result: Any, run_dir: Path | None, classifier_floor: dict[str, Any] | None = None) -> str:
    """The summary ``adaprec train`` prints: the task metric, cost and savings, then the full report.

    Savings are printed as percentages here; in ``result.report`` (``ctl.report()``) every share is a
    fraction of 1 (see :class:`adaprec.Report`). A ``mixed(a, b)`` precision (the layers do not all
    compute at the same precision, e.g. because the classifier floor holds the last layer higher) is
    spelled out layer by layer under the summary.
    """
    r = result.report
    lines = [
        f"task {result.task} · policy {result.policy} · {result.steps} steps in {result.wall_time_s:.1f} s",
        f"  {result.primary_metric:<28} {result.primary:.4f}  (best {result.best:.4f})",
        *cost_lines(r),
    ]
    tap = r.get("time_at_precision") or {}
    if tap:
        top = sorted(tap.items(), key=lambda kv: -kv[1])[:4]
        more = f", +{len(tap) - 4} more" if len(tap) > 4 else ""
        shares = ", ".join(f"{k} {100 * v:.0f} %" for k, v in top)
        lines.append(f"  {'time at precision':<28} {shares}{more}")
        lines += _explain_mixed(tap, result.history, classifier_floor)
    if run_dir is not None:
        lines.append(f"  {'TensorBoard logs':<28} {run_dir}   (tensorboard --logdir {run_dir.parent})")
    lines.append("")
    lines.append("report:")
    lines += ["  " + line for line in str(_short_report(r)).splitlines()]
    return "\n".join(lines)


def cost_lines(r: Mapping[str, Any], indent: str = "  ", width: int = 28) -> list[str]:
    """The cost and the three savings of a report, each labelled with what it is measured against.

    Example:
        >>> r = {"gbitops": 1.0, "gbitops_fp32": 16.0, "reference": "int8/int8", "gbitops_reference": 1.2,
        ...      "savings_vs_fp32": 0.9375, "savings_vs_reference": 1 / 6, "gbitops_reference_ideal": 1.0,
        ...      "savings_vs_reference_ideal": 0.0}
        >>> for line in cost_lines(r):
        ...     print(line)
          GBitOPs                      1  (FP32 16, static int8/int8 1.2, ideal int8/int8 formula 1)
          savings vs FP32              93.8 %
          savings vs static int8/int8  16.7 %  (same constraints, classifier floor included: a real run)
          savings vs ideal int8/int8   0.0 %  (formula, every layer at int8/int8: not a run)
    """
    ref = r.get("reference", "int8/int8")
    out = [f"{indent}{'GBitOPs':<{width}} {r['gbitops']:.4g}  (FP32 {r['gbitops_fp32']:.4g}, static {ref} "
           f"{r['gbitops_reference']:.4g}"
           + (f", ideal {ref} formula {r['gbitops_reference_ideal']:.4g})" if "gbitops_reference_ideal" in r
              else ")"),
           f"{indent}{'savings vs FP32':<{width}} {100 * r['savings_vs_fp32']:.1f} %",
           f"{indent}{'savings vs static ' + ref:<{width}} {100 * r['savings_vs_reference']:.1f} %  "
           "(same constraints, classifier floor included: a real run)"]
    if "savings_vs_reference_ideal" in r:
        ideal = 100 * r["savings_vs_reference_ideal"]
        out.append(f"{indent}{'savings vs ideal ' + ref:<{width}} {ideal:.1f} %  "
                   f"(formula, every layer at {ref}: not a run)")
    return out


def _explain_mixed(tap: dict[str, float], history: Sequence[Any],
                   classifier_floor: dict[str, Any] | None) -> list[str]:
    """One line per ``mixed(...)`` precision: which layers computed at which precision."""
    mixed = [k for k in tap if k.startswith("mixed(")]
    if not mixed:
        return []
    out = [f"  {'':<28} mixed(...): the layers differ; per layer:"]
    for key in mixed:
        entry = next((h for h in history if h.summary() == key), None)
        if entry is None:
            continue
        groups: dict[str, list[str]] = {}
        for name, prec in entry.layers.items():
            groups.setdefault(prec.short(), []).append(name)
        parts = []
        for prec, names in groups.items():
            shown = ", ".join(names[:4]) + (f" +{len(names) - 4} more" if len(names) > 4 else "")
            parts.append(f"{prec} on {shown}")
        out.append(f"  {'':<28}   {key}: " + "; ".join(parts))
    if classifier_floor and classifier_floor.get("layer") is not None:
        out.append(f"  {'':<28}   (the classifier floor keeps layer {classifier_floor['layer']!r} at "
                   f">= {classifier_floor['bits']} bits; Controller(classifier_floor=False) turns it off)")
    return out


def _short_report(r: dict[str, Any]) -> Any:
    from .controller import Report

    # Per-layer figures make the table unreadable for deep models; they are in the logs and --json.
    return Report({k: v for k, v in r.items() if k != "per_layer_gbitops"})


# --- adaprec policies ----------------------------------------------------------------------------------
def _add_policies_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipes", metavar="DIR", help="also list the recipe files (*.toml) in DIR")


def _run_policies(args: argparse.Namespace) -> int:
    from .policies import list_policies, list_recipes, load_recipe

    pol = list_policies()
    width = max(map(len, pol), default=0)
    for name, desc in pol.items():
        print(f"{name.ljust(width)}  {desc}")
    shipped = list_recipes()
    if shipped:
        print("\nshipped recipes (use with --policy NAME):")
        w = max(map(len, shipped))
        for stem, f in shipped.items():
            print(f"  {stem.ljust(w)}  {_recipe_line(f, load_recipe)}")
    if args.recipes is not None:
        if not Path(args.recipes).is_dir():
            raise CLIError(f"--recipes {args.recipes!r} is not a folder")
        own = sorted(Path(args.recipes).glob("*.toml"))
        print(f"\nrecipes in {args.recipes} (use with --policy FILE):")
        for f in own:
            print(f"  {f}  {_recipe_line(f, load_recipe)}")
        if not own:
            print("  (none)")
    return 0


def _recipe_line(path: Path, load_recipe: Callable[[Path], tuple[str, dict[str, Any]]]) -> str:
    try:
        name, params = load_recipe(path)
    except (ValueError, OSError) as exc:
        return f"(unreadable: {_one_line(exc)})"
    args = ", ".join(f"{k}={v}" for k, v in params.items())
    return f"{name}({args})"


# --- adaprec report ------------------------------------------------------------------------------------
def _add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run folders (a folder of runs, e.g. runs/ or a study, expands to all of them)")
    p.add_argument("-o", "--out", metavar="FILE.png",
                   help="output PNG (default: RUN_DIR/report.png for one run, ./report.png for several)")
    p.add_argument("--metric", help="final metric for the runs' comparison (a tag such as stats/val_acc, "
                   "or a key such as val_acc; default: accuracy)")


def _run_report(args: argparse.Namespace) -> int:
    from .plots import final_metric, find_runs, plot_runs
    from .tensorboard import read_scalars

    runs = find_runs(args.runs)
    out = Path(args.out) if args.out else (runs[0] / "report.png" if len(runs) == 1 else Path("report.png"))
    path = plot_runs(runs, out, metric=args.metric)
    for run in runs:
        s = read_scalars(run)
        m = final_metric(s, args.metric)
        g = s.get("cost/gbitops")
        parts = [f"{m[0].split('/', 1)[-1]} {m[1]:.4g}" if m else "no final metric",
                 f"GBitOPs {g[-1][1]:.4g}" if g else "no cost logged"]
        for tag, label in (("savings_vs_fp32", "savings vs FP32"),
                           ("savings_vs_reference", "vs static reference (same constraints)"),
                           ("savings_vs_reference_ideal", "vs ideal reference formula")):
            sv = s.get(f"cost/{tag}")
            if sv:
                parts.append(f"{label} {100 * sv[-1][1]:.1f} %")
        print(f"{run}: " + ", ".join(parts))
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")
    return 0


# --- adaprec prt ---------------------------------------------------------------------------------------
def _add_prt_arguments(p: argparse.ArgumentParser) -> None:
    from .prt import PRT_DEFAULTS

    p.add_argument("--task", default="digits", help="task whose model is probed (see 'adaprec train --help')")
    p.add_argument("--data", metavar="PATH", help="data folder for cifar10/imagefolder")
    p.add_argument("--model", metavar="NAME", help="torchvision model name for cifar10/imagefolder")
    p.add_argument("--batch-size", type=_positive_int("--batch-size"),
                   help="batch size (default: the task's)")
    p.add_argument("--lr", type=_positive_float("--lr"), help="learning rate (default: the task's)")
    p.add_argument("--metric", choices=("auto", "accuracy", "loss"), default="auto",
                   help="what the test watches: training accuracy (the paper's choice; classification "
                   "tasks) or the training loss; auto: accuracy where the task has it")
    p.add_argument("--start-bits", type=_positive_int("--start-bits"), default=PRT_DEFAULTS["start_bits"],
                   help="lowest forward precision tested")
    p.add_argument("--max-bits", type=_positive_int("--max-bits"), default=8,
                   help="highest forward precision tested; also B_max")
    p.add_argument("--grad-bits", type=_positive_int("--grad-bits"), default=8, help="backward bits")
    p.add_argument("--steps-per-bits", type=_positive_int("--steps-per-bits"),
                   default=PRT_DEFAULTS["steps_per_bits"], help="iterations per precision level")
    p.add_argument("--window", type=_positive_int("--window"), default=PRT_DEFAULTS["window"],
                   help="iterations averaged at the start and the end of a level")
    p.add_argument("--threshold", type=float, default=PRT_DEFAULTS["threshold"],
                   help="progress within a level that counts as learning")
    p.add_argument("--full-curve", action="store_true", help="measure every level up to --max-bits")
    p.add_argument("--seed", type=_nonneg_int("--seed"), default=0, help="random seed")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... or auto")
    _add_threads_argument(p)
    p.add_argument("--plot", metavar="FILE.png", help="also draw the curve and the bounds to this PNG")
    p.add_argument("--logdir", metavar="DIR", help="also log the curve to TensorBoard in DIR")


def _run_prt(args: argparse.Namespace) -> int:
    import torch

    from .prt import find_bounds
    from .tasks.run import seed_everything

    if args.plot is not None:
        plot = Path(args.plot)
        if plot.suffix.lower() != ".png":
            raise CLIError(f"--plot must name a .png file, got {args.plot!r}")
        if not plot.resolve().parent.is_dir():
            raise CLIError(f"--plot: folder {str(plot.parent)!r} does not exist")
    task = _build_task(args)
    _set_threads(args, task)
    device = torch.device(_device_arg(args.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {args.device!r}: CUDA is not available here")
    seed_everything(args.seed)
    model = task.build_model(args.seed).to(device)
    batches = task.train_batches(args.batch_size or task.defaults.get("batch_size", 32), args.seed)
    use_acc = args.metric == "accuracy" or (args.metric == "auto" and task.primary_metric == "accuracy")
    fn = _prt_fn(task, device, use_acc)
    with warnings.catch_warnings():
        # "no level passed" is printed below with the bounds; the Python warning would repeat it.
        warnings.filterwarnings("ignore", message="precision range test: no level")
        result = find_bounds(model, fn, batches, start_bits=args.start_bits, max_bits=args.max_bits,
                             grad_bits=args.grad_bits, steps_per_bits=args.steps_per_bits,
                             window=args.window, threshold=args.threshold, full_curve=args.full_curve,
                             lr=args.lr or task.defaults.get("lr", 0.01))
    result.metric = "accuracy" if use_acc else "loss"  # find_bounds calls a returned metric "metric"
    print(f"precision range test on {task.name}: watching training {result.metric} "
          f"({'higher' if result.mode == 'max' else 'lower'} is better), {result.steps} iterations")
    print(f"  {'bits':>4}  {'first':>9}  {'last':>9}  {'progress':>9}  passed")
    for lv in result.levels:
        print(f"  {lv.bits:>4}  {lv.first:>9.4g}  {lv.last:>9.4g}  {lv.progress:>9.4g}  "
              f"{'yes' if lv.passed else 'no'}")
    found = "" if result.found else "  (no level passed the threshold: train statically at B_max)"
    print(f"bounds: B_min = {result.b_min}, B_max = {result.b_max}{found}")
    print(f"use them: adaprec train --task {task.name} --policy cpt "
          f"--param 'bits=[{result.b_min}, {result.b_max}]'")
    if args.plot is not None:
        from .plots import plot_prt

        print(f"wrote {plot_prt(result, args.plot)}")
    if args.logdir is not None:
        from .tensorboard import log_prt

        log_prt(args.logdir, result)
        print(f"logged the curve to {args.logdir} (tensorboard --logdir {args.logdir})")
    return 0


def _prt_fn(task: Any, device: Any, use_acc: bool) -> Callable[[Any, Any], Any]:
    """``fn(model, batch)`` for :func:`adaprec.prt.find_bounds`: the task's own loss, plus the batch's
    training accuracy taken from the model's output (captured by a forward hook, so the task's loss
    code runs unchanged and the model runs once)."""
    import torch

    def fn(model: Any, batch: Any) -> Any:
        if device.type != "cpu":
            batch = tuple(t.to(device, non_blocking=True) for t in batch)
        if not use_acc:
            return task.loss(model, batch)
        seen: list[Any] = []
        handle = model.register_forward_hook(lambda m, i, o: seen.append(o))
        try:
            loss = task.loss(model, batch)
        finally:
            handle.remove()
        out, target = (seen[-1] if seen else None), batch[-1]
        if not isinstance(out, torch.Tensor) or out.shape[:-1] != target.shape:
            raise CLIError(f"task {task.name!r}: cannot read a training accuracy from the model's output; "
                           "use --metric loss")
        with torch.no_grad():
            acc = (out.argmax(-1) == target).float().mean()
        return loss, acc

    return fn


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
                 description="Plot one run (precision timeline per layer, loss, cumulative GBitOPs) or "
                 "compare several (final accuracy vs GBitOPs, loss, cost, mean bits).")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
