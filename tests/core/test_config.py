from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Literal

import pytest

from modelpress.core import Config, ConfigError, UnknownConfigError, config_type
from modelpress.core.config import register_config_type


@dataclass(frozen=True)
class Inner(Config):
    bits: int = 8


@dataclass(frozen=True)
class Outer(Config):
    rate: float = 0.5
    mode: Literal["global", "layer"] = "layer"
    layers: tuple[str, ...] = ()
    inner: Inner = Inner()
    limit: int | None = None

    def validate(self) -> None:
        if not 0.0 <= self.rate < 1.0:
            raise ConfigError(f"rate must be in [0, 1), got {self.rate}")


def test_round_trip_through_dict():
    cfg = Outer(rate=0.25, mode="global", layers=("a", "b"), inner=Inner(bits=4), limit=3)
    d = cfg.to_dict()
    assert d == {
        "type": "Outer",
        "rate": 0.25,
        "mode": "global",
        "layers": ["a", "b"],
        "inner": {"type": "Inner", "bits": 4},
        "limit": 3,
    }
    assert Outer.from_dict(d) == cfg
    assert Config.from_dict(d) == cfg  # the base class picks the subclass by `type`


def test_frozen():
    cfg = Outer()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rate = 0.1  # type: ignore[misc]


def test_int_widens_to_float_and_list_to_tuple():
    cfg = Outer.from_dict({"rate": 0, "layers": ["x"]})
    assert isinstance(cfg.rate, float) and cfg.layers == ("x",)


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"rte": 0.1}, "unknown key 'rte' for Outer; allowed keys: inner, layers, limit, mode, rate"),
        ({"mode": "both"}, "Outer.mode must be one of 'global', 'layer', got 'both'"),
        ({"rate": "high"}, "Outer.rate must be a number, got 'high'"),
        ({"rate": True}, "Outer.rate must be a number, got True"),
        ({"rate": 1.2}, "rate must be in [0, 1), got 1.2"),
        ({"inner": {"bits": "8"}}, "Inner.bits must be an integer, got '8'"),
        ({"limit": "x"}, "Outer.limit: 'x' is not one of"),
        ({"layers": "a"}, "Outer.layers must be a list, got 'a'"),
    ],
)
def test_bad_values_are_named(data, fragment):
    with pytest.raises(ConfigError) as exc:
        Outer.from_dict(data)
    assert fragment in str(exc.value)


def test_unknown_type_lists_known_ones():
    with pytest.raises(UnknownConfigError, match=r"unknown config type 'Nope'.*Outer"):
        Config.from_dict({"type": "Nope"})
    with pytest.raises(UnknownConfigError):
        config_type("Nope")


def test_type_mismatch_and_missing_type():
    with pytest.raises(ConfigError, match="does not match"):
        Outer.from_dict({"type": "Inner"})
    with pytest.raises(ConfigError, match="needs a 'type' key"):
        Config.from_dict({"rate": 0.1})
    with pytest.raises(ConfigError, match="must be a mapping"):
        Outer.from_dict(["rate", 0.1])  # type: ignore[arg-type]


def test_a_second_class_under_a_taken_name_is_refused():
    first = re.escape(f"{Outer.__module__}.Inner")  # the module-level Inner (Outer shares its module)
    with pytest.raises(ValueError, match=rf"'Inner' is already taken by {first}; .*another class name") as e:

        @dataclass(frozen=True)
        class Inner(Config):  # same bare name as the module-level Inner, a different class
            other: int = 0

    assert "test_a_second_class_under_a_taken_name_is_refused.<locals>.Inner" in str(e.value)
    assert config_type("Inner").__module__ == Outer.__module__  # the first class stays registered
    register_config_type(Outer)  # the same class again is allowed
    assert config_type("Outer") is Outer
