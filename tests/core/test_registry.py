from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from modelpress.core import Config, Context, Registry, UnknownConfigError


@dataclass(frozen=True)
class ScaleConfig(Config):
    factor: float = 2.0


@dataclass(frozen=True)
class StrongScaleConfig(ScaleConfig):
    pass


@dataclass(frozen=True)
class OtherConfig(Config):
    pass


def _registry() -> Registry:
    reg = Registry("pass")

    @reg.register(ScaleConfig)
    def _scale(model: nn.Linear, cfg: ScaleConfig, ctx: Context) -> nn.Linear:
        with torch.no_grad():
            model.weight.mul_(cfg.factor)
        ctx.report.add_pass("scale", 0.0, factor=cfg.factor)
        return model

    return reg


def test_handler_is_found_and_applied():
    reg = _registry()
    model = nn.Linear(2, 2, bias=False)
    before = model.weight.detach().clone()
    ctx = Context(show_progress=False)
    out = reg.handler_for(ScaleConfig(factor=3.0))(model, ScaleConfig(factor=3.0), ctx)
    torch.testing.assert_close(out.weight, before * 3.0)
    assert ctx.report.passes[0].stats == {"factor": 3.0}


def test_subclass_reuses_parent_handler():
    reg = _registry()
    assert reg.handler_for(StrongScaleConfig()) is reg.handler_for(ScaleConfig())


def test_unknown_config_type_is_a_clear_error():
    reg = _registry()
    with pytest.raises(
        UnknownConfigError, match=r"no pass handler for config type 'OtherConfig'; registered: ScaleConfig"
    ):
        reg.handler_for(OtherConfig())


def test_double_registration_and_non_config_are_refused():
    reg = _registry()
    with pytest.raises(ValueError, match="already registered"):
        reg.register(ScaleConfig)(lambda m, c, x: m)
    with pytest.raises(TypeError, match="needs a Config subclass"):
        reg.register(int)  # type: ignore[arg-type]
