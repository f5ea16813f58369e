"""Task registry: build a task by name (``get_task("digits")``), list the known ones, add your own.

Example:
    >>> from adaprec.tasks.registry import get_task, list_tasks
    >>> sorted(list_tasks())
    ['charlm', 'cifar10', 'digits', 'gptlm', 'imagefolder']
    >>> get_task("charlm", max_chars=5_000, seq_len=16).primary_metric
    'bpc'
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import Task

__all__ = ["get_task", "list_tasks", "register_task", "unregister_task"]

_REGISTRY: dict[str, tuple[Callable[..., Task], str]] = {}


def register_task(name: str, factory: Callable[..., Task], description: str = "", *,
                  overwrite: bool = False) -> None:
    """Make ``get_task(name, **kw)`` call ``factory(**kw)``.

    Example:
        >>> from adaprec.tasks.digits import DigitsTask
        >>> register_task("digits-half", lambda **kw: DigitsTask(test_fraction=0.5, **kw), "digits, 50/50")
        >>> len(get_task("digits-half").y_test)
        899
        >>> unregister_task("digits-half")
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"task name must be a non-empty str, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory for task {name!r} must be callable, got {type(factory).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"task {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = (factory, description)


def unregister_task(name: str) -> None:
    """Remove a registered task (mainly for tests and plugins that re-register)."""
    if _REGISTRY.pop(name, None) is None:
        raise KeyError(f"task {name!r} is not registered; known: {', '.join(sorted(_REGISTRY))}")


def list_tasks() -> dict[str, str]:
    """Registered task names and their one-line descriptions."""
    return {name: desc for name, (_, desc) in sorted(_REGISTRY.items())}


def get_task(name: str | Task, **kwargs: Any) -> Task:
    """Build the task registered under ``name`` with ``kwargs`` (e.g. ``get_task("cifar10", path=...)``).

    A :class:`Task` object is returned unchanged, so callers can accept either.
    """
    if isinstance(name, Task):
        if kwargs:
            raise TypeError("get_task got a Task object together with keyword arguments; "
                            "pass one or the other")
        return name
    try:
        factory, _ = _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_REGISTRY))}") from None
    try:
        return factory(**kwargs)
    except TypeError as e:
        # A misspelled keyword surfaces as TypeError deep inside the constructor; name the task.
        raise TypeError(f"bad arguments for task {name!r}: {e}") from e


def _digits(**kw: Any) -> Task:
    from .digits import DigitsTask

    return DigitsTask(**kw)


def _charlm(**kw: Any) -> Task:
    from .charlm import CharLMTask

    return CharLMTask(**kw)


def _gptlm(**kw: Any) -> Task:
    from .gptlm import GPTLMTask

    return GPTLMTask(**kw)


def _cifar10(path: str | None = None, **kw: Any) -> Task:
    from .cifar import Cifar10Task

    if path is None:
        raise ValueError("task 'cifar10' needs path= (the folder containing cifar-10-batches-py); "
                         "adaprec never downloads data")
    return Cifar10Task(path, **kw)


def _imagefolder(path: str | None = None, **kw: Any) -> Task:
    from .cifar import ImageFolderTask

    if path is None:
        raise ValueError("task 'imagefolder' needs path= (a folder with train/ and val/ class sub-folders)")
    return ImageFolderTask(path, **kw)


register_task("digits", _digits, "scikit-learn 8x8 digits, small CNN; metric: test accuracy")
register_task("charlm", _charlm, "character LSTM on pydoc_data.topics text; metric: bits per character")
register_task("gptlm", _gptlm, "GPT-style character transformer on pydoc_data.topics text; metric: bits "
              "per character")
register_task("cifar10", _cifar10, "CIFAR-10 from path=, ResNet-20 (or model=<torchvision name>); accuracy")
register_task("imagefolder", _imagefolder, "ImageFolder at path= (train/, val/), torchvision model=; "
              "accuracy")
