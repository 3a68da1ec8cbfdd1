"""Tests for fedkd.registry."""

from __future__ import annotations

import pytest

from fedkd.registry import Registry


def _registry() -> Registry:
    reg: Registry = Registry("widget")

    @reg.register("b")
    def b():
        return "b"

    @reg.register("a")
    def a():
        return "a"

    return reg


def test_register_and_get():
    reg = _registry()
    assert reg.get("a")() == "a"
    assert reg.get("b")() == "b"
    assert reg.names() == ["a", "b"]
    assert list(reg) == ["a", "b"]
    assert "a" in reg and "c" not in reg


def test_register_returns_the_item_unchanged():
    reg: Registry = Registry("widget")

    def f():
        return 1

    assert reg.register("f")(f) is f


def test_duplicate_registration_raises():
    reg = _registry()
    original = reg.get("a")
    with pytest.raises(ValueError, match="widget 'a' is already registered.*force=True"):
        reg.register("a")(lambda: "other")
    assert reg.get("a") is original  # the first entry survives


def test_force_replaces():
    reg = _registry()

    def replacement():
        return "new"

    reg.register("a", force=True)(replacement)
    assert reg.get("a") is replacement
    assert reg.names() == ["a", "b"]


def test_unknown_name_lists_names():
    reg = _registry()
    with pytest.raises(ValueError) as err:
        reg.get("zzz")
    assert str(err.value) == "unknown widget 'zzz'; choose one of: a, b"


def test_registries_are_independent():
    one, two = _registry(), Registry("gadget")
    two.register("a")(lambda: 2)
    assert one.get("a")() == "a"
    assert two.names() == ["a"]


@pytest.mark.parametrize(
    "module, attr, kind",
    [("fedkd.models", "MODELS", "model"), ("fedkd.fusion", "FUSION_METHODS", "fusion method"),
     ("fedkd.shielding", "SENSITIVITY_SCORERS", "sensitivity scorer")],
)
def test_library_registries_refuse_silent_overwrite(module, attr, kind):
    import importlib

    reg = getattr(importlib.import_module(module), attr)
    name = reg.names()[0]
    with pytest.raises(ValueError, match=f"{kind} '{name}' is already registered"):
        reg.register(name)(object())
    with pytest.raises(ValueError, match=f"unknown {kind} 'no-such'"):
        reg.get("no-such")
