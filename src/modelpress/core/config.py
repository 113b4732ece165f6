"""Frozen config dataclasses: configs are data, handlers are functions.

Every pass is configured by a frozen dataclass deriving from `Config`. Configs round-trip
through plain dicts (for YAML recipes and report.json), and unknown keys or wrong types are
rejected with a message that names the key and what is allowed.

Whatever a class checks in `validate`, every config refuses NaN and infinities in its float
fields (no field gives them a meaning: a NaN threshold compares false with everything and would
slip past range checks) and integers outside the 64-bit range that torch and numpy work in.

    >>> @dataclass(frozen=True)
    ... class ScaleConfig(Config):
    ...     factor: float = 2.0
    >>> ScaleConfig.from_dict({"factor": 3}).to_dict()
    {'type': 'ScaleConfig', 'factor': 3.0}
"""

from __future__ import annotations

import dataclasses
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from modelpress.core.errors import ConfigError, UnknownConfigError

C = TypeVar("C", bound="Config")

_CONFIG_TYPES: dict[str, type[Config]] = {}

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # integers reach torch and numpy as 64-bit values
# Caps on counts where a larger value is certainly a mistake and would run for days.
MAX_EPOCHS = 10_000  # training epochs of any pass (recovery fine-tuning, distillation)
MAX_SEED = 2**32 - 1  # seeds are offset per layer or epoch and handed to torch, numpy and `random`
# The stages a pass belongs to, in the order a recipe runs them: a quantized layer can be neither pruned
# nor distilled, and pruning and distillation may come in either order.
STAGES = ("prune", "distill", "quantize")


@dataclass(frozen=True)
class Config:
    """Base of all pass configs. Subclasses are frozen dataclasses and register by class name,
    which must be unique (`register_config_type`)."""

    type_name: ClassVar[str] = "Config"
    # A pass's config declares the stage of the pass (one of STAGES); None: not a pass, a part of another
    # config (a quantization scheme, a layer filter, a schedule).
    stage: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.stage is not None and cls.stage not in STAGES:
            raise TypeError(f"{cls.__name__}.stage must be one of {', '.join(STAGES)} or None, got {cls.stage!r}")
        register_config_type(cls)
        cls.type_name = cls.__name__

    def __post_init__(self) -> None:
        _check_numbers(self)
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
            raise ConfigError(f"a config must be a mapping, got {type(data).__name__}: {show_value(data)}")
        data = dict(data)
        type_name = data.pop("type", None)
        if type_name is not None and not isinstance(type_name, str):
            raise ConfigError(f"'type' must name a config class, got {show_value(type_name)}")
        target: type[Config] = cls
        if type_name is not None and type_name != cls.type_name:
            if cls is not Config:
                raise ConfigError(f"config type {type_name!r} does not match {cls.type_name!r}")
            target = config_type(type_name)
        elif cls is Config:
            raise ConfigError("a config dict needs a 'type' key naming the config class")
        hints = typing.get_type_hints(target)
        fields = {f.name: f for f in dataclasses.fields(target) if f.init}
        unknown = sorted(set(data) - set(fields), key=str)
        if unknown:
            raise ConfigError(
                f"unknown key {show_value(unknown[0])} for {target.type_name}; "
                f"allowed keys: {', '.join(sorted(fields))}"
            )
        kwargs = {k: _coerce(v, hints[k], f"{target.type_name}.{k}") for k, v in data.items()}
        return typing.cast(C, target(**kwargs))


def check_at_most(cfg: Config, field: str, cap: int, why: str) -> None:
    """Refuse a count above `cap` where more is certainly a mistake; `why` says what the count is."""
    value = getattr(cfg, field)
    if value > cap:
        raise ConfigError(f"{type(cfg).__name__}.{field} must be at most {cap} ({why}), got {show_value(value)}")


def check_seed(cfg: Config, field: str = "seed") -> None:
    """A seed in [0, MAX_SEED]: torch, numpy and `random` all take it, offsets included."""
    value = getattr(cfg, field)
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(f"{type(cfg).__name__}.{field} must be in [0, {MAX_SEED}], got {show_value(value)}")


def check_regex(pattern: str, what: str) -> None:
    """Refuse a regular expression that does not compile (or is too large or deeply nested to)."""
    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as e:
        raise ConfigError(f"bad {what} pattern {show_value(pattern)}: {e or type(e).__name__}") from None


def show_value(value: Any) -> str:
    """`repr(value)` for an error message: shortened, and safe for huge integers and deep nesting."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        digits = int(value.bit_length() * math.log10(2)) + 1
        return f"{'-' if value < 0 else ''}an integer of about {digits} digits"
    try:
        return _SHORT.repr(value)
    except (ValueError, RecursionError):  # e.g. a huge integer inside a list
        return f"a {type(value).__name__}"


def _short_repr() -> reprlib.Repr:
    r = reprlib.Repr()
    r.maxstring = r.maxother = 120
    r.maxlevel = 3
    return r


_SHORT = _short_repr()


def _check_numbers(cfg: Config) -> None:
    """Refuse non-finite floats and integers beyond 64 bits anywhere in `cfg`'s own fields."""
    for f in dataclasses.fields(cfg):
        stack: list[tuple[str, Any]] = [(f"{type(cfg).__name__}.{f.name}", getattr(cfg, f.name))]
        while stack:
            where, value = stack.pop()
            if isinstance(value, bool) or isinstance(value, Config):  # nested configs checked themselves
                continue
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{where} must be a finite number, got {value}")
            if isinstance(value, int) and not INT64_MIN <= value <= INT64_MAX:
                raise ConfigError(f"{where} must be an integer in [-2**63, 2**63 - 1], got {show_value(value)}")
            if isinstance(value, (tuple, list)):
                stack.extend((f"{where}[{i}]", v) for i, v in enumerate(value))
            elif isinstance(value, dict):
                stack.extend((f"{where}[{show_value(k)}]", v) for k, v in value.items())


def register_config_type(cls: type[Config]) -> None:
    """Record `cls` under its bare class name, the `type` that recipes and report.json name it by.

    Every subclass of `Config` is registered when it is defined. Registering the same class again (or its
    new definition when its module is reloaded) replaces it; a different class under a name already taken
    raises `ValueError` naming both, since the second would otherwise silently replace the first for every
    recipe that names it.
    """
    taken = _CONFIG_TYPES.get(cls.__name__)
    reloaded = taken is not None and (taken.__module__, taken.__qualname__) == (cls.__module__, cls.__qualname__)
    if taken is not None and taken is not cls and not reloaded:  # a module reloaded redefines its own classes
        raise ValueError(
            f"config type name {cls.__name__!r} is already taken by {taken.__module__}.{taken.__qualname__}; "
            f"{cls.__module__}.{cls.__qualname__} needs another class name (configs are looked up by class name)"
        )
    _CONFIG_TYPES[cls.__name__] = cls


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
            except _NotFinite:  # the right type, out of range: say so rather than list the types
                raise
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {show_value(value)} is not one of {_hint_name(hint)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{where} must be one of {', '.join(map(repr, args))}, got {show_value(value)}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where} must be null, got {show_value(value)}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {show_value(value)}")
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {show_value(value)}")
        key, item = args if len(args) == 2 else (Any, Any)
        return {
            _coerce(k, key, f"{where} key"): _coerce(v, item, f"{where}[{show_value(k)}]") for k, v in value.items()
        }
    if isinstance(hint, type) and issubclass(hint, Config):
        if isinstance(value, hint):
            return value
        return hint.from_dict(value)
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer beyond the float range
                raise _NotFinite(f"{where} must be a finite number, got {show_value(value)}") from None
        raise ConfigError(f"{where} must be a number, got {show_value(value)}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be an integer, got {show_value(value)}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {show_value(value)}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where} must be a string, got {show_value(value)}")
    return value


class _NotFinite(ConfigError):
    """A number too large for a float field."""


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
