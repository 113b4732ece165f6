from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.core import set_submodule


def _model() -> nn.Module:
    model = nn.Module()
    model.head = nn.Linear(4, 2)
    model.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(2)])
    return model


def test_set_submodule_swaps_by_dotted_name():
    model = _model()
    kept = model.blocks[0][0]
    set_submodule(model, "blocks.1.0", nn.Identity())  # inside a ModuleList and a Sequential
    set_submodule(model, "head", nn.Linear(4, 3))  # a direct child
    assert isinstance(model.get_submodule("blocks.1.0"), nn.Identity)
    assert model.get_submodule("blocks.0.0") is kept  # nothing else moves
    assert model.head.out_features == 3
    assert "blocks.1.0" in dict(model.named_modules())
    assert model.blocks[1](torch.ones(1, 4)).equal(torch.ones(1, 4))  # the Sequential runs the new module


def test_set_submodule_refuses_a_missing_parent():
    with pytest.raises(AttributeError):
        set_submodule(_model(), "nowhere.0", nn.Identity())
