"""Config type -> handler. Adding a pass means registering one function for one config class.

The pass contract: a handler is `handler(model, cfg, ctx) -> model`. Its config class (a frozen `Config`)
declares the pass's `stage` and holds every per-layer choice; everything else a pass uses (data, loss,
example inputs, metric, training loop, threads, cache folder, the report) comes from the `Context`.

>>> @register(ScaleConfig)           # ScaleConfig.stage = "quantize"
... def _scale(model, cfg, ctx):
...     ...
>>> handler_for(ScaleConfig())   # -> _scale

Also the training sets models bring with them: the zoo registers one provider per kind of model it builds,
and a pass that trains (distillation) asks `training_data(teacher)`, so neither imports the other.

>>> register_training_data(lambda m: isinstance(m, DigitsCNN), lambda m: (train_split, {"split": "train"}))
>>> data, record = training_data(teacher)   # (None, None) for a model no provider knows
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from modelpress.core.config import STAGES, Config
from modelpress.core.errors import UnknownConfigError
from modelpress.core.numerics import exact

if TYPE_CHECKING:
    from modelpress.core.context import Context

# handler(model, cfg, ctx) -> the new model
Handler = Callable[[Any, Any, "Context"], Any]
H = TypeVar("H", bound=Handler)


class Registry:
    """Maps config classes to the function that applies them: `handler(model, cfg, ctx)`.

    `staged`: the config classes must declare their `stage` (the passes a recipe runs).
    """

    def __init__(self, kind: str, staged: bool = False) -> None:
        self.kind = kind
        self.staged = staged
        self._handlers: dict[type[Config], Handler] = {}

    def register(self, config_cls: type[Config]) -> Callable[[H], H]:
        if not (isinstance(config_cls, type) and issubclass(config_cls, Config)):
            raise TypeError(f"register() needs a Config subclass, got {config_cls!r}")
        if self.staged and config_cls.stage not in STAGES:
            raise TypeError(
                f"{config_cls.__name__} must declare its stage (a class attribute `stage`, one of "
                f"{', '.join(STAGES)}) to be registered as a {self.kind}"
            )

        def deco(fn: H) -> H:
            _check_contract(fn, config_cls, self.kind)
            if config_cls in self._handlers:
                raise ValueError(f"a {self.kind} handler for {config_cls.__name__} is already registered")
            self._handlers[config_cls] = fn
            return fn

        return deco

    def handler_for(self, config: Config) -> Handler:
        # Walk the MRO so a subclass of a registered config reuses its parent's handler.
        for cls in type(config).__mro__:
            if cls in self._handlers:
                return self._handlers[cls]
        known = ", ".join(sorted(c.__name__ for c in self._handlers)) or "(none registered)"
        raise UnknownConfigError(
            f"no {self.kind} handler for config type {type(config).__name__!r}; registered: {known}"
        )

    def __contains__(self, config_cls: object) -> bool:
        return config_cls in self._handlers

    def registered(self) -> list[type[Config]]:
        return list(self._handlers)


def _check_contract(fn: Callable[..., Any], config_cls: type[Config], kind: str) -> None:
    """A handler takes exactly (model, cfg, ctx): per-layer choices go in the config, the rest in the context."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check
        return
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if len(params) != 3 or any(p.kind not in positional for p in params):
        shown = ", ".join(p.name for p in params)
        raise TypeError(
            f"the {kind} handler {getattr(fn, '__name__', fn)!r} for {config_cls.__name__} takes ({shown}); "
            "a handler takes exactly (model, cfg, ctx): put per-layer choices in the config and anything else "
            "(data, loss, example inputs, metric) in the Context"
        )


PASSES = Registry("pass", staged=True)
register = PASSES.register
handler_for = PASSES.handler_for


def apply(model: Any, config: Config, ctx: Any) -> Any:
    """Run the pass registered for `config` on `model`; the handler returns the new model. Passes run with exact
    arithmetic (`numerics.exact`): what they compute does not depend on the CPU's bf16 support."""
    with exact():
        return PASSES.handler_for(config)(model, config, ctx)


# (data, the report's record of it: source, split, count, ...)
TrainingData = tuple[Any, dict[str, Any]]
_TRAINING_DATA: list[tuple[Callable[[Any], bool], Callable[[Any], TrainingData]]] = []


def register_training_data(matches: Callable[[Any], bool], provider: Callable[[Any], TrainingData]) -> None:
    """Make `training_data(model)` return `provider(model)` for the models `matches` accepts.

    Each module that defines a kind of model registers its provider when it is imported, so any model
    of that kind finds its provider. The first provider whose `matches` accepts a model answers.
    """
    _TRAINING_DATA.append((matches, provider))


def training_data(model: Any) -> tuple[Any | None, dict[str, Any] | None]:
    """The training set a registered provider gives for `model` and the report's record of it, else (None, None)."""
    for matches, provider in _TRAINING_DATA:
        if matches(model):
            return provider(model)
    return None, None
