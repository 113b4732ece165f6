from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from modelpress.core import Context, DataError, RunOptions
from modelpress.quant import QATConfig, QConv, QLinear, StaticQuantConfig, quantize
from modelpress.quant.qat import FakeQuantLayer, convert_qat, fake_quant_ste, prepare_qat, round_ste
from modelpress.zoo import get_entry


def test_round_ste_rounds_forward_and_passes_gradient():
    x = torch.tensor([0.4, 1.6, -2.5], requires_grad=True)
    y = round_ste(x)
    torch.testing.assert_close(y, torch.tensor([0.0, 2.0, -2.0]))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(3))


def test_scale_gets_a_gradient():
    x = torch.linspace(-3, 3, 101)
    scale = torch.tensor(0.1, requires_grad=True)
    loss = (fake_quant_ste(x, scale, torch.tensor(0.0), -8, 7) - x).pow(2).mean()
    loss.backward()
    assert scale.grad is not None and float(scale.grad) < 0  # clipping at +-0.8: a larger scale helps


def test_converted_model_matches_fake_quant_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 5)).eval()
    data = [(torch.randn(8, 1, 8, 8),) for _ in range(3)]
    prepared = prepare_qat(model, QATConfig(bits=4, act_bits=8), data=data)
    assert sum(isinstance(m, FakeQuantLayer) for m in prepared.modules()) == 2
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        fake = prepared(x)
    converted = convert_qat(prepared)
    assert isinstance(converted[0], QConv) and isinstance(converted[4], QLinear)
    torch.testing.assert_close(converted(x), fake, atol=1e-4, rtol=1e-4)


def test_qat_recovers_low_bit_digits_cnn(cache_dir):
    entry = get_entry("digits-cnn")
    model = entry.load(cache_dir=cache_dir)
    fp32 = entry.evaluate(model).value
    calib = entry.calibration_data(256, 32)
    ptq = entry.evaluate(quantize(model, StaticQuantConfig(bits=3), data=calib)).value
    ctx = Context(data=calib, train_fn=lambda m: entry.finetune(m, epochs=5), options=RunOptions(progress=False))
    qat = quantize(model, QATConfig(bits=3, act_bits=4), ctx=ctx)
    acc = entry.evaluate(qat).value
    assert all(m.weight_bits() == 3 for m in qat.modules() if isinstance(m, (QLinear, QConv)))
    assert acc >= fp32 - 0.005  # within 0.5 points of fp32
    assert acc > ptq  # and better than post-training quantization at the same weight bits
    assert ctx.report.passes[-1].name == "quantize/qat"


def test_qat_needs_a_training_loop_and_data():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(DataError, match="needs a training loop"):
        quantize(model, QATConfig(), data=[(torch.randn(2, 4),)])
    with pytest.raises(DataError, match="needs calibration batches"):
        prepare_qat(copy.deepcopy(model), QATConfig())
