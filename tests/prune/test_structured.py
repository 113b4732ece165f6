"""Structured channel pruning: traced groups, physical cuts, identical outputs for zero channels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from modelpress.core import BadInputError, ConfigError, Context, RunOptions
from modelpress.measure.size import count_params
from modelpress.prune import StructuredPruneConfig, prune
from modelpress.prune.graph import build_graph
from modelpress.zoo.digits import DigitsCNN


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


@torch.no_grad()
def zero_channels(producer: nn.Module, norm: nn.Module | None, consumers: list[nn.Module], idx: torch.Tensor) -> None:
    """Make channels `idx` contribute nothing (and score zero in every member of their group)."""
    producer.weight[idx] = 0
    if producer.bias is not None:
        producer.bias[idx] = 0
    if norm is not None:
        norm.weight[idx] = 0
        norm.bias[idx] = 0
    for c in consumers:
        c.weight[:, idx] = 0


def test_digits_cnn_zero_channels_are_pruned_with_identical_outputs():
    torch.manual_seed(0)
    model = randomize_bn(DigitsCNN())
    f = model.features
    zero_channels(f[0], f[1], [f[3]], torch.arange(0, 16, 2))
    zero_channels(f[3], f[4], [f[7]], torch.arange(1, 32, 2))
    zero_channels(f[7], f[8], [model.classifier], torch.arange(0, 64, 2))
    x = torch.rand(5, 1, 8, 8)
    ctx = Context(options=RunOptions(progress=False))
    out = prune(model, StructuredPruneConfig(channel_ratio=0.5), data=[(x,)], ctx=ctx)
    torch.testing.assert_close(out(x), model(x), rtol=0, atol=1e-5)
    assert [out.features[i].out_channels for i in (0, 3, 7)] == [8, 16, 32]
    assert out.features[4].num_features == 16 and out.classifier.in_features == 32
    params, _ = count_params(out)
    assert params <= 0.30 * count_params(model)[0]
    stats = ctx.report.passes[-1].stats
    assert stats["params_after"] == params and stats["flops_after"] < 0.3 * stats["flops_before"]
    assert stats["channels"] == {"features.0": "16->8", "features.3": "32->16", "features.7": "64->32"}


class Branchy(nn.Module):
    """Residual addition, concatenation and a flatten over a 2x2 map: coupled channels everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1)  # residual: a's output is added to the stem's
        self.b = nn.Conv2d(8, 6, 1)
        self.dw = nn.Conv2d(6, 6, 3, padding=1, groups=6)  # depthwise: carries b's channels
        self.mix = nn.Conv2d(14, 10, 1)  # reads cat(residual, dw)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(10 * 2 * 2, 12)
        self.ln = nn.LayerNorm(12)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.bn(self.stem(x)))
        r = s + self.a(s)
        y = torch.cat([r, self.dw(self.b(s))], dim=1)
        y = self.pool(F.relu(self.mix(y)))
        y = torch.flatten(y, 1)  # (B, 10 * 4): each mix channel covers 4 positions
        return self.head(F.gelu(self.ln(self.fc(y))))


def test_graph_groups_couple_residuals_concat_and_flatten():
    model = Branchy().eval()
    graph = build_graph(model, (torch.rand(2, 3, 8, 8),))
    groups = {tuple(sorted(g.producers)): g for g in graph.groups}
    assert ("a", "stem") in groups  # the residual couples both producers
    assert groups[("a", "stem")].norms == ["bn"]
    assert ("b",) in groups and groups[("b",)].norms == ["dw"]
    mix_group = groups[("mix",)]
    ((name, offset, idx),) = mix_group.consumers
    assert name == "fc" and offset == 0 and idx.tolist()[:8] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert ("fc",) in groups and groups[("fc",)].norms == ["ln"]
    assert graph.blocked == {"head": ["reaches the model output"]}


def test_branchy_zero_channels_are_pruned_with_identical_outputs():
    torch.manual_seed(0)
    model = randomize_bn(Branchy())
    with torch.no_grad():
        ix = torch.tensor([1, 4, 6, 7])
        for m in (model.stem, model.a):
            m.weight[ix] = 0
            m.bias[ix] = 0
        model.bn.weight[ix] = 0
        model.bn.bias[ix] = 0
        model.a.weight[:, ix] = 0
        model.b.weight[:, ix] = 0
        model.mix.weight[:, ix] = 0
        ib = torch.tensor([0, 5, 2])
        model.b.weight[ib] = 0
        model.b.bias[ib] = 0
        model.dw.weight[ib] = 0
        model.dw.bias[ib] = 0
        model.mix.weight[:, 8 + ib] = 0
        im = torch.tensor([3, 9, 0, 4, 8])
        model.mix.weight[im] = 0
        model.mix.bias[im] = 0
        model.fc.weight[:, (im[:, None] * 4 + torch.arange(4)).reshape(-1)] = 0
    x = torch.rand(3, 3, 8, 8)
    # LayerNorm statistics change when channels go, even zero ones: keep it (and so fc's outputs) whole.
    out = prune(model, StructuredPruneConfig(channel_ratio=0.5, exclude=(r"^ln$",)), data=[(x,)])
    assert (out.stem.out_channels, out.a.out_channels, out.b.out_channels, out.mix.out_channels) == (4, 4, 3, 5)
    assert out.dw.groups == 3 and out.mix.in_channels == 7 and out.fc.in_features == 20
    assert out.fc.out_features == 12 and out.ln.normalized_shape == (12,)  # excluded: kept whole
    torch.testing.assert_close(out(x), model(x), rtol=0, atol=1e-5)
    out.train()
    F.cross_entropy(out(x), torch.tensor([0, 1, 2])).backward()  # still trains
    assert out.fc.weight.grad is not None and out.fc.weight.grad.shape == (12, 20)


def test_pruned_digits_cnn_exports_to_onnx(tmp_path):
    from modelpress.export.onnx import check_parity, export_onnx

    torch.manual_seed(0)
    model = randomize_bn(DigitsCNN())
    x = torch.rand(4, 1, 8, 8)
    out = prune(model, StructuredPruneConfig(channel_ratio=0.5, importance="taylor"), data=[(x,)])
    path = export_onnx(out, (x,), tmp_path / "digits.onnx")
    assert check_parity(out, path, (torch.rand(7, 1, 8, 8),))["max_abs"] < 1e-4


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.gate = Gate()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gate(self.conv(x)).mean(dim=(2, 3)))


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return x
        return -x


def test_untraceable_op_is_named_with_a_hint_and_exclusion_works():
    model = Untraceable().eval()
    x = torch.rand(2, 1, 6, 6)
    with pytest.raises(BadInputError, match=r"'gate' \(Gate\) broke tracing at .*if x.sum\(\) > 0.*exclude it"):
        prune(model, StructuredPruneConfig(channel_ratio=0.5), data=[(x,)])
    ctx = Context(options=RunOptions(progress=False))
    with pytest.raises(BadInputError, match="no channel of Untraceable can be pruned"):
        prune(model, StructuredPruneConfig(channel_ratio=0.5, exclude=("gate",)), data=[(x,)], ctx=ctx)


class WidthReader(nn.Module):
    """Attention written out the way users do: the head width comes from the residual's `x.shape`, not a -1."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Linear(6, dim)
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(dim, 32), nn.Linear(32, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        b, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        a = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        x = x + self.fc2(F.relu(self.fc1(x)))
        return self.head(x.mean(dim=1))


def test_a_width_read_as_a_number_keeps_its_channels_whole():
    """`b, t, d = x.shape` then a view to `d // heads`: cutting x's channels would break the view, so they stay
    whole (with the reason) and the FFN's inner channels, whose width nothing reads, are cut."""
    torch.manual_seed(0)
    model = WidthReader().eval()
    x = torch.randn(2, 5, 6)
    ctx = Context(options=RunOptions(progress=False))
    out = prune(model, StructuredPruneConfig(channel_ratio=0.5), data=[(x,)], ctx=ctx)
    assert out(x).shape == (2, 3)
    assert out.embed.out_features == 16 and out.fc1.out_features == 16 and out.fc2.in_features == 16
    assert any(
        "kept the output channels of embed whole: its width is read as a number" in w for w in ctx.report.warnings
    )
    graph = build_graph(WidthReader().eval(), (x,))
    assert [g.producers for g in graph.groups] == [["fc1"]]
    # sizes of other dims read no channel: a CNN's `x.view(x.size(0), -1)` or `x.shape[2:]` still prunes
    cnn = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    graph = build_graph(_SizeReadingCNN(cnn).eval(), (torch.rand(2, 1, 8, 8),))
    assert sorted(p for g in graph.groups for p in g.producers) == ["cnn.0", "cnn.2"], graph.blocked


class _SizeReadingCNN(nn.Module):
    def __init__(self, cnn: nn.Sequential) -> None:
        super().__init__()
        self.cnn = cnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.cnn[2](self.cnn[1](self.cnn[0](x)))
        h = h + torch.zeros(h.shape[2:])  # reads the spatial dims only
        return self.cnn[4](h.view(h.size(0), -1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"channel_ratio": 1.0}, r"channel_ratio must be in \[0, 1\), got 1.0 \(1 would remove a whole layer\)"),
        ({"heads_ratio": -0.5}, r"heads_ratio must be in \[0, 1\), got -0.5"),
        ({}, "nothing would be pruned"),
        ({"channel_ratio": 0.5, "importance": "movement"}, "importance must be one of magnitude, gradient"),
        ({"channel_ratio": 0.5, "exclude": ("[",)}, "bad exclude pattern"),
    ],
)
def test_structured_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        StructuredPruneConfig(**kwargs)


def test_unknown_exclude_name_and_missing_blocks():
    model = DigitsCNN().eval()
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ConfigError, match="exclude pattern 'featurez' matches no module of DigitsCNN"):
        prune(model, StructuredPruneConfig(channel_ratio=0.5, exclude=("featurez",)), data=[(x,)])
    with pytest.raises(BadInputError, match="no recognized attention layer"):
        prune(model, StructuredPruneConfig(heads_ratio=0.5), data=[(x,)])


def test_every_layer_keeps_a_channel():
    model = DigitsCNN(widths=(2, 2, 2)).eval()
    out = prune(model, StructuredPruneConfig(channel_ratio=0.99), data=[(torch.rand(2, 1, 8, 8),)])
    assert [out.features[i].out_channels for i in (0, 3, 7)] == [1, 1, 1]


def test_digits_cnn_recovers_after_half_its_channels_are_removed(cache_dir):
    from modelpress.zoo import get_entry

    entry = get_entry("digits-cnn")
    model = entry.load(cache_dir=cache_dir)
    base = entry.evaluate(model).value
    ctx = Context(train_fn=entry.finetune, options=RunOptions(progress=False))
    cfg = StructuredPruneConfig(channel_ratio=0.5, finetune_epochs=20)
    out = prune(model, cfg, data=entry.calibration_data(64, 32), ctx=ctx)
    assert count_params(out)[0] <= 0.30 * count_params(model)[0]
    assert ctx.report.passes[-1].stats["finetuned"] is True
    assert entry.evaluate(out).value >= base - 0.01
