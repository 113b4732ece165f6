"""Quantization: PTQ (weight-only, dynamic, static), SmoothQuant, QAT and mixed precision from sensitivity."""

from modelpress.quant.awq import AWQConfig
from modelpress.quant.gptq import GPTQConfig
from modelpress.quant.modules import ActSpec, QConv, QLinear
from modelpress.quant.observers import ObserverConfig
from modelpress.quant.ptq import DynamicQuantConfig, LayerFilter, StaticQuantConfig, WeightOnlyConfig, quantize
from modelpress.quant.qat import QATConfig, convert_qat, prepare_qat
from modelpress.quant.sensitivity import MixedPrecisionConfig
from modelpress.quant.smoothquant import SmoothQuantConfig, smooth

__all__ = [
    "quantize",
    "WeightOnlyConfig", "DynamicQuantConfig", "StaticQuantConfig", "QATConfig", "MixedPrecisionConfig",
    "SmoothQuantConfig", "smooth", "GPTQConfig", "AWQConfig",
    "ObserverConfig", "LayerFilter",
    "QLinear", "QConv", "ActSpec",
    "prepare_qat", "convert_qat",
]  # fmt: skip
