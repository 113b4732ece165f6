"""Channel pruning of models torch.fx cannot trace whole: the graph is assembled from the sub-modules that
trace, on the inputs they were called with; a part's own inputs and outputs stay whole."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.core import BadInputError, Context, RunOptions
from modelpress.prune import StructuredPruneConfig, prune
from modelpress.prune.graph.parts import build_graph_by_parts


class _Block(nn.Module):
    """conv -> BN -> ReLU -> conv with a residual: the middle width is the block's own."""

    def __init__(self, c: int = 8, mid: int = 16) -> None:
        super().__init__()
        self.a, self.bn, self.b = nn.Conv2d(c, mid, 3, padding=1), nn.BatchNorm2d(mid), nn.Conv2d(mid, c, 3, padding=1)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return x + scale * self.b(torch.relu(self.bn(self.a(x))))


class _Untraceable(nn.Module):
    """A top-level forward with a data-dependent check (like a Hugging Face model's input validation)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().sum() == 0:  # fx cannot branch on a traced value
            raise ValueError("empty image")
        x = self.stem(x)
        for block in self.blocks:
            x = block(x, scale=0.5)  # a keyword argument that is not a tensor: fixed while tracing the part
        return self.head(x.mean(dim=(2, 3)))


def _ctx() -> Context:
    return Context(options=RunOptions(progress=False))


def test_the_inner_channels_of_the_parts_that_trace_are_cut():
    torch.manual_seed(0)
    model = _Untraceable().eval()
    x = torch.randn(2, 3, 8, 8)
    graph, traced = build_graph_by_parts(model, (x,))
    assert traced == ["blocks.0", "blocks.1"]  # stem and head alone hold no group of their own
    assert sorted(g.producers[0] for g in graph.groups) == ["blocks.0.a", "blocks.1.a"]
    ctx = _ctx()
    out = prune(model, StructuredPruneConfig(channel_ratio=0.5), example_inputs=(x,), ctx=ctx)
    for block in out.blocks:
        assert (block.a.out_channels, block.bn.num_features, block.b.in_channels, block.b.out_channels) == (8, 8, 8, 8)
    assert out.stem.out_channels == 8 and out(x).shape == (2, 4)
    stats = ctx.report.passes[-1].stats
    assert stats["params_after"] < stats["params_before"] and stats["traced_parts"] == ["blocks.0", "blocks.1"]
    assert any("cannot be traced whole" in w for w in ctx.report.warnings)


def test_an_untraceable_model_with_nothing_to_cut_keeps_the_trace_error():
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(BadInputError, match=r"cannot trace Flat for channel pruning: .*broke tracing"):
        prune(Flat(), StructuredPruneConfig(channel_ratio=0.5), example_inputs=(torch.ones(2, 4),), ctx=_ctx())


def test_a_part_sharing_a_parameter_with_another_module_is_kept_whole():
    torch.manual_seed(0)
    model = _Untraceable().eval()
    model.blocks[1].a.weight = model.blocks[0].a.weight  # tied: the second user is outside the first part
    graph, _ = build_graph_by_parts(model, (torch.randn(2, 3, 8, 8),))
    assert not graph.groups
    assert "shares a parameter with another module" in graph.blocked["blocks.0.a"][0]


def test_an_op_returning_several_tensors_keeps_its_input_whole():
    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = nn.Linear(8, 32), nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            gate, up = self.up(x).chunk(2, dim=-1)
            return self.down(torch.relu(gate) * up)

    model = nn.Sequential(Gated(), nn.Linear(8, 2)).eval()
    x = torch.randn(3, 8)
    ctx = _ctx()
    out = prune(model, StructuredPruneConfig(channel_ratio=0.5), example_inputs=(x,), ctx=ctx)
    assert out[0].up.out_features == 32 and out[0].down.in_features == 16  # the chunked width is kept
    assert out[0].down.out_features == 4 and out(x).shape == (3, 2)  # what is followed is still cut
    kept = ctx.report.passes[-1].stats["kept_whole"]
    assert kept["0.up"] == ["unsupported op chunk (chunk) returns several tensors"]
