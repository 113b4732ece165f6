"""Frozen config dataclasses: configs are data, handlers are functions.

Every pass is configured by a frozen dataclass deriving from `Config`. Configs round-trip
through plain dicts (for YAML recipes and report.json), and unknown keys or wrong types are
rejected with a message that names the key and what is allowed.

    >>> @dataclass(frozen=True)
    ... class ScaleConfig(Config):
    ...     factor: float = 2.0
    >>> ScaleConfig.from_dict({"factor": 3}).to_dict()
    {'type': 'ScaleConfig', 'factor': 3.0}
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from modelpress.core.errors import ConfigError, UnknownConfigError

C = TypeVar("C", bound="Config")

_CONFIG_TYPES: dict[str, type[Config]] = {}


@dataclass(frozen=True)
class Config:
    """Base of all pass configs. Subclasses are frozen dataclasses and register by class name."""

    type_name: ClassVar[str] = "Config"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.type_name = cls.__name__
        _CONFIG_TYPES[cls.__name__] = cls

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` for out-of-range values; subclasses override."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type_name}
        for f in dataclasses.fields(self):
            out[f.name] = _to_plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any]) -> C:
        """Build a config from a dict. On the base class, the `type` key picks the subclass."""
        if not isinstance(data, dict):
            raise ConfigError(f"a config must be a mapping, got {type(data).__name__}: {data!r}")
        data = dict(data)
        type_name = data.pop("type", None)
        target: type[Config] = cls
        if type_name is not None and type_name != cls.type_name:
            if cls is not Config:
                raise ConfigError(f"config type {type_name!r} does not match {cls.type_name!r}")
            target = config_type(type_name)
        elif cls is Config:
            raise ConfigError("a config dict needs a 'type' key naming the config class")
        hints = typing.get_type_hints(target)
        fields = {f.name: f for f in dataclasses.fields(target) if f.init}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(
                f"unknown key {unknown[0]!r} for {target.type_name}; allowed keys: {', '.join(sorted(fields))}"
            )
        kwargs = {k: _coerce(v, hints[k], f"{target.type_name}.{k}") for k, v in data.items()}
        return typing.cast(C, target(**kwargs))


def config_type(name: str) -> type[Config]:
    """The registered config class called `name`."""
    try:
        return _CONFIG_TYPES[name]
    except KeyError:
        known = ", ".join(sorted(_CONFIG_TYPES)) or "(none registered)"
        raise UnknownConfigError(f"unknown config type {name!r}; known types: {known}") from None


def _to_plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (tuple, list)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_plain(v) for k, v in value.items()}
    return value


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against a type hint, converting only where it is lossless (int -> float, list -> tuple)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        errors = []
        for arg in args:
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} is not one of {_hint_name(hint)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where} must be null, got {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if isinstance(hint, type) and issubclass(hint, Config):
        if isinstance(value, hint):
            return value
        return hint.from_dict(value)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
