"""The policy registry: names, entry-point plugins, and recipe files.

A policy spec is a registered name (``"cpt"``), a :class:`~adaprec.policies.base.Policy` object, or the
path of a TOML recipe::

    policy = "cpt"          # registered name
    description = "..."    # optional
    [params]               # constructor arguments
    bits = [3, 8]
    grad_bits = 8

Third-party packages register policies through the entry-point group ``adaprec.policies``; each entry
point names a Policy subclass (or a factory) and its entry-point name becomes the policy name.

Recipes that ship with adaprec live in the package (``adaprec/recipes/``, so an installed wheel has them)
and are used by name: ``policy="cpt-cifar"``. A path that does not exist but names a shipped recipe in a
folder called ``policies`` (``"policies/cpt-cifar.toml"``, where adaprec 0.1 kept them in a checkout) is
read from the package too; an existing file of that name always wins.

Example:
    >>> from adaprec.policies import make_policy, list_policies
    >>> "fixed" in list_policies()
    True
    >>> make_policy("fixed", bits=6).config()
    {'bits': 6}
    >>> sorted(list_recipes())
    ['cpt-cifar', 'cpt-imagenet']
    >>> make_policy("cpt-imagenet").config()["bits"]
    [4, 8]
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser ships as the "tomli" package
    import tomli as tomllib

from .base import Policy

__all__ = ["register_policy", "list_policies", "make_policy", "load_recipe", "recipe_text",
           "write_recipe", "list_recipes", "find_recipe", "ENTRY_POINT_GROUP", "RECIPES_DIR"]

ENTRY_POINT_GROUP = "adaprec.policies"

#: The recipes shipped with adaprec (package data, so they are in every wheel).
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
_OLD_RECIPE_FOLDER = "policies"  # where a 0.1 checkout kept them


@dataclass
class _Entry:
    factory: Callable[..., Policy]
    description: str


_REGISTRY: dict[str, _Entry] = {}
_plugins_loaded = False


def register_policy(name: str, factory: Callable[..., Policy], description: str = "",
                    *, overwrite: bool = False) -> None:
    """Make ``factory(**kwargs)`` available as ``policy=name``."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"policy name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise TypeError(f"policy factory for {name!r} must be callable")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"policy {name!r} is already registered (pass overwrite=True to replace it)")
    if not description:
        doc = inspect.getdoc(factory) or ""
        description = doc.splitlines()[0] if doc else ""
    _REGISTRY[name] = _Entry(factory, description)


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        try:
            register_policy(ep.name, ep.load())
        except Exception as exc:  # a broken plugin (import error, not callable) must not break the library
            import warnings

            warnings.warn(f"adaprec: could not load policy plugin {ep.name!r} ({ep.value}): {exc}",
                          stacklevel=2)


def list_policies() -> dict[str, str]:
    """Registered policy names (built-ins and plugins) with a one-line description."""
    _load_plugins()
    return {n: e.description for n, e in sorted(_REGISTRY.items())}


def make_policy(spec: Any, **overrides: Any) -> Policy:
    """Build a policy from a name, a Policy object, or a recipe path (see the module docstring)."""
    if isinstance(spec, Policy):
        if overrides:
            raise ValueError("keyword overrides only apply to a policy given by name or recipe")
        return spec
    if isinstance(spec, Path) or (isinstance(spec, str) and spec.endswith(".toml")):
        name, params = load_recipe(spec)
        return make_policy(name, **{**params, **overrides})
    if not isinstance(spec, str):
        raise TypeError(f"policy must be a name, a Policy object or a .toml recipe path, "
                        f"got {type(spec).__name__}")
    _load_plugins()
    if spec not in _REGISTRY and spec in list_recipes():  # a shipped recipe by name
        return make_policy(list_recipes()[spec], **overrides)
    if spec not in _REGISTRY:
        raise ValueError(f"unknown policy {spec!r}; known policies: {sorted(_REGISTRY)}, shipped recipes: "
                         f"{sorted(list_recipes())} (or give a Policy object or a .toml recipe path)")
    factory = _REGISTRY[spec].factory
    try:
        sig = inspect.signature(factory)
        sig.bind(**overrides)
    except TypeError as exc:
        allowed = [p for p in inspect.signature(factory).parameters if p != "self"]
        raise ValueError(f"bad parameters for policy {spec!r}: {exc}; allowed: {allowed}") from None
    except ValueError:
        pass  # builtins without a signature
    return factory(**overrides)


def list_recipes() -> dict[str, Path]:
    """The recipes shipped with adaprec, by name (the file name without ``.toml``)."""
    return {p.stem: p for p in sorted(RECIPES_DIR.glob("*.toml"))}


def find_recipe(spec: str | Path) -> Path:
    """The recipe file ``spec`` names: an existing file; a shipped recipe's name (``"cpt-cifar"``); or
    ``policies/<name>.toml`` of a shipped recipe when no such file exists (adaprec 0.1's checkout layout).

    Raises ``FileNotFoundError`` (listing the shipped recipes) when it names none of these.
    """
    p = Path(spec)
    if p.is_file():
        return p
    shipped = list_recipes()
    if p.suffix == "" and str(spec) in shipped:
        return shipped[str(spec)]
    if p.suffix == ".toml" and p.parent.name == _OLD_RECIPE_FOLDER and p.stem in shipped:
        return shipped[p.stem]
    raise FileNotFoundError(f"recipe file {str(p)!r} does not exist; shipped recipes (use them by name): "
                            f"{', '.join(shipped) or 'none'}")


def load_recipe(path: str | Path) -> tuple[str, dict[str, Any]]:
    """Read a recipe (a file, or a shipped recipe, see :func:`find_recipe`); returns ``(policy name,
    params)``. Unknown keys are an error."""
    p = find_recipe(path)
    try:
        data = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"recipe {str(p)!r} is not valid TOML: {exc}") from None
    unknown = set(data) - {"policy", "params", "description"}
    if unknown:
        raise ValueError(f"recipe {str(p)!r} has unknown keys {sorted(unknown)}; "
                         "allowed: 'policy', 'params', 'description'")
    name = data.get("policy")
    if not isinstance(name, str):
        raise ValueError(f"recipe {str(p)!r} needs a string 'policy' key naming a registered policy")
    if not isinstance(data.get("description", ""), str):
        raise ValueError(f"recipe {str(p)!r}: 'description' must be a string, got {data['description']!r}")
    params = data.get("params", {})
    if not isinstance(params, dict):
        raise ValueError(f"recipe {str(p)!r}: 'params' must be a table")
    return name, params


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} {v!r} to a recipe")


def recipe_text(name: str, params: dict[str, Any], description: str = "") -> str:
    lines = [f"policy = {_toml_value(name)}"]
    if description:
        lines.append(f"description = {_toml_value(description)}")
    lines.append("")
    lines.append("[params]")
    lines += [f"{k} = {_toml_value(v)}" for k, v in params.items()]
    return "\n".join(lines) + "\n"


def write_recipe(path: str | Path, policy: Policy, description: str = "") -> Path:
    """Write ``policy`` (name + :meth:`Policy.config`) as a recipe that :func:`make_policy` reads back."""
    p = Path(path)
    p.write_text(recipe_text(policy.name, policy.config(), description))
    return p
