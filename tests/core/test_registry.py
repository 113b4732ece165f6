from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from modelpress.core import Config, Context, Registry, RunOptions, UnknownConfigError


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
    ctx = Context(options=RunOptions(progress=False))
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


def test_the_pass_registry_holds_handlers_to_their_contract() -> None:
    from dataclasses import dataclass

    from modelpress.core.registry import PASSES

    @dataclass(frozen=True)
    class StagelessConfig(Config):
        factor: float = 1.0

    @dataclass(frozen=True)
    class StagedConfig(Config):
        stage = "quantize"

    with pytest.raises(TypeError, match="must declare its stage"):
        PASSES.register(StagelessConfig)
    with pytest.raises(TypeError, match=r"takes \(model, cfg, ctx, overrides\); a handler takes exactly"):
        PASSES.register(StagedConfig)(lambda model, cfg, ctx, overrides=None: model)
    with pytest.raises(TypeError, match="stage must be one of prune, distill, quantize"):

        @dataclass(frozen=True)
        class BadStageConfig(Config):
            stage = "compile"

    assert StagedConfig not in PASSES


def test_every_registered_pass_obeys_the_contract() -> None:
    import inspect

    import modelpress.distill  # noqa: F401 - registers its pass
    import modelpress.prune  # noqa: F401
    import modelpress.quant  # noqa: F401
    from modelpress.core.registry import PASSES

    assert len(PASSES.registered()) >= 14
    for cls in PASSES.registered():
        assert cls.stage in ("prune", "distill", "quantize"), cls
        handler = PASSES.handler_for(object.__new__(cls))  # the type is what counts, not valid field values
        assert list(inspect.signature(handler).parameters) == ["model", "cfg", "ctx"], cls
