"""The policy registry: names, entry-point plugins, recipe files."""

from __future__ import annotations

import sys
import types
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch

import adaprec
from adaprec.decision import Decision
from adaprec.formats import Precision
from adaprec.policies import (
    Fixed,
    FP32Policy,
    Policy,
    list_policies,
    list_recipes,
    load_recipe,
    make_policy,
    register_policy,
    registry,
    write_recipe,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def isolated_registry(monkeypatch: pytest.MonkeyPatch) -> dict:
    """A private copy of the registry, so registrations made by a test do not leak into others."""
    reg = dict(registry._REGISTRY)
    monkeypatch.setattr(registry, "_REGISTRY", reg)
    return reg


class _Half(Policy):
    """Four-bit forward, eight-bit backward, always."""

    name = "half"

    def __init__(self, bits: int = 4) -> None:
        self.bits = bits

    def decide(self, ctl) -> Decision:
        return Decision.uniform(Precision.cpt(self.bits, 8))

    def config(self) -> dict:
        return {"bits": self.bits}


def test_builtins_listed_with_descriptions() -> None:
    pols = list_policies()
    assert {"fp32", "fixed"} <= set(pols)
    assert all(isinstance(d, str) and d for d in pols.values())
    assert isinstance(make_policy("fp32"), FP32Policy)
    assert make_policy("fixed", bits=6, grad_bits=8).config() == {"bits": 6, "grad_bits": 8}


def test_register_and_use(isolated_registry: dict) -> None:
    register_policy("half", _Half)
    assert list_policies()["half"] == "Four-bit forward, eight-bit backward, always."  # docstring line
    assert make_policy("half", bits=3).bits == 3
    with pytest.raises(ValueError, match="already registered"):
        register_policy("half", _Half)
    register_policy("half", lambda: _Half(2), "two bits", overwrite=True)
    assert make_policy("half").bits == 2 and list_policies()["half"] == "two bits"
    with pytest.raises(TypeError, match="must be callable"):
        register_policy("broken", 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty string"):
        register_policy(" ", _Half)


def test_unknown_name_and_bad_parameters_are_explained() -> None:
    with pytest.raises(ValueError, match=r"unknown policy 'cpt3'.*known policies: \[.*'fixed'.*'fp32'"):
        make_policy("cpt3")
    with pytest.raises(ValueError, match=r"bad parameters for policy 'fixed'.*allowed: \['bits'"):
        make_policy("fixed", bitz=4)
    with pytest.raises(TypeError, match="a name, a Policy object or a .toml recipe path"):
        make_policy(8)
    with pytest.raises(ValueError, match="keyword overrides"):
        make_policy(Fixed(), bits=4)


def test_entry_point_plugins(monkeypatch: pytest.MonkeyPatch, isolated_registry: dict) -> None:
    plugin = types.ModuleType("fake_adaprec_plugin")
    plugin.HalfPolicy = _Half
    plugin.not_callable = 3
    monkeypatch.setitem(sys.modules, "fake_adaprec_plugin", plugin)
    eps = [
        EntryPoint("thirdparty", "fake_adaprec_plugin:HalfPolicy", registry.ENTRY_POINT_GROUP),
        EntryPoint("missing", "no_such_module_xyz:Policy", registry.ENTRY_POINT_GROUP),
        EntryPoint("notcallable", "fake_adaprec_plugin:not_callable", registry.ENTRY_POINT_GROUP),
        EntryPoint("fixed", "fake_adaprec_plugin:HalfPolicy", registry.ENTRY_POINT_GROUP),  # no override
    ]
    asked: list = []

    def fake_entry_points(*, group: str):
        asked.append(group)
        return [e for e in eps if e.group == group]

    monkeypatch.setattr(registry, "entry_points", fake_entry_points)
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    with pytest.warns(UserWarning, match="could not load policy plugin") as rec:
        names = list_policies()
    assert asked == ["adaprec.policies"]
    assert len(rec) == 2  # the missing module and the non-callable object
    assert "thirdparty" in names and "missing" not in names and "notcallable" not in names
    assert isinstance(make_policy("thirdparty", bits=5), _Half)
    assert isinstance(make_policy("fixed"), Fixed)  # a plugin cannot shadow a built-in
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    with adaprec.Controller(model, policy="thirdparty") as ctl:
        pass
    assert ctl.history[0].summary() == "int4/int8"
    list_policies()
    assert asked == ["adaprec.policies"]  # plugins are discovered once


def test_recipe_round_trip(tmp_path: Path) -> None:
    pol = Fixed(bits=6, grad_bits=8, act_bits="bf16")
    path = write_recipe(tmp_path / "mixed.toml", pol, description='six "bit" weights')
    name, params = load_recipe(path)
    assert name == "fixed" and params == {"bits": 6, "grad_bits": 8, "act_bits": "bf16"}
    again = make_policy(path)
    assert again.config() == pol.config()
    assert again.decide(None) == pol.decide(None)
    assert make_policy(str(path), bits=4).config()["bits"] == 4  # keyword overrides win


def test_controller_accepts_relative_recipe_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "x.toml").write_text('policy = "fixed"\n[params]\nbits = 5\ngrad_bits = 7\n')
    monkeypatch.chdir(tmp_path)
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    with adaprec.Controller(model, policy="policies/x.toml") as ctl:
        pass
    assert ctl.history[0].summary() == "int5/int7"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('policy = "fixed"\nschedule = 3\n', r"unknown keys \['schedule'\]; allowed"),
        ('[params]\nbits = 4\n', "needs a string 'policy' key"),
        ('policy = "fixed"\nparams = 4\n', "'params' must be a table"),
        ('policy = "fixed"\n[params]\nbitz = 4\n', r"bad parameters for policy 'fixed'.*allowed"),
        ('policy = "nope"\n', r"unknown policy 'nope'; known policies"),
        ('policy = "fixed"\n[params]\nbits = 99\n', r"1\.\.32"),
        ('policy = fixed\n', "not valid TOML"),
    ],
)
def test_bad_recipes(tmp_path: Path, text: str, match: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        make_policy(p)


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_policy(str(tmp_path / "nope.toml"))


def test_shipped_recipes_build() -> None:
    # Every recipe shipped in the package must name a registered policy with valid parameters.
    recipes = list_recipes()
    assert {"cpt-cifar", "cpt-imagenet"} <= set(recipes)
    for stem, path in recipes.items():
        assert path.parent == REPO / "adaprec" / "recipes"
        name, _ = load_recipe(path)
        assert isinstance(make_policy(path), Policy), path
        assert make_policy(stem).config() == make_policy(path).config()  # by name, as from a wheel
        assert name in list_policies(), path


def test_old_checkout_recipe_paths_still_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # adaprec 0.1 kept the recipes in <checkout>/policies/; that spelling keeps working anywhere.
    monkeypatch.chdir(tmp_path)
    assert make_policy("policies/cpt-cifar.toml").config() == make_policy("cpt-cifar").config()
    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    with adaprec.Controller(model, policy="policies/cpt-imagenet.toml", total_steps=320) as ctl:
        pass
    assert ctl.policy.config()["bits"] == [4, 8]
    # ...but only for shipped names in a folder called policies: other missing paths are an error.
    with pytest.raises(FileNotFoundError, match="shipped recipes .*cpt-cifar"):
        make_policy("recipes/cpt-cifar.toml")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_policy("policies/cpt-mnist.toml")
    with pytest.raises(ValueError, match="shipped recipes: .*cpt-cifar"):
        make_policy("cpt-cifar10")
