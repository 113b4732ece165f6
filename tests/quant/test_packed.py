"""Packed safetensors of quantized models: low-bit codes take bits/8 bytes each and load back exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.core.errors import ModelLoadError
from modelpress.measure.size import artifact_size_bytes
from modelpress.quant import QLinear, WeightOnlyConfig, quantize
from modelpress.quant.packed import load_packed, save_packed

pytestmark = pytest.mark.usefixtures("one_thread")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10)).eval()


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_round_to_nearest_group_weights_shrink_with_bits(tmp_path, bits, group_size):
    model = _model()
    q = quantize(model, WeightOnlyConfig(bits=bits, symmetric=False, granularity="group", group_size=group_size))
    x = torch.randn(4, 256)
    with torch.no_grad():
        cos = torch.cosine_similarity(q(x), model(x), dim=-1).mean()
    assert float(cos) > {8: 0.9999, 4: 0.99, 3: 0.95, 2: 0.7}[bits]
    path = save_packed(q, tmp_path / "q.safetensors")
    fp32 = artifact_size_bytes(model)
    weights = sum(m.weight.numel() for m in model if isinstance(m, nn.Linear))
    # codes at bits/8 bytes, plus one fp32 scale and one zero point per group, plus biases and the header
    expected = weights * bits / 8 + weights / group_size * (4 + 4)
    assert path.stat().st_size < expected * 1.05 + 10_000
    assert path.stat().st_size < fp32 * (bits / 32 + 8 / group_size / 4) * 1.05 + 10_000
    loaded = load_packed(_model(), path)
    assert all(isinstance(loaded[i], QLinear) for i in (0, 2, 4))
    for i in (0, 2, 4):
        assert torch.equal(loaded[i].weight_q, q[i].weight_q)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), q(x))


def test_tied_tensors_are_stored_once_and_mismatches_are_refused(tmp_path):
    model = nn.Sequential(nn.Embedding(1000, 64), nn.Linear(64, 1000, bias=False))
    model[1].weight = model[0].weight  # tied, as a language model's head and embeddings
    path = save_packed(model, tmp_path / "tied.safetensors")
    assert path.stat().st_size < 1000 * 64 * 4 * 1.1
    fresh = nn.Sequential(nn.Embedding(1000, 64), nn.Linear(64, 1000, bias=False))
    fresh[1].weight = fresh[0].weight
    load_packed(fresh, path)
    assert torch.equal(fresh[0].weight, model[0].weight)
    q = quantize(_model(), WeightOnlyConfig(bits=4, granularity="group", group_size=32))
    save_packed(q, tmp_path / "q.safetensors")
    with pytest.raises(ModelLoadError, match="does not fit the model|is a Embedding"):
        load_packed(nn.Sequential(nn.Embedding(4, 256)), tmp_path / "q.safetensors")
