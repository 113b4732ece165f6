"""What the int8 ONNX graph is exported from and checked against: float stand-ins of quantized layers.

`swap_in_float` replaces each quantized layer by a float module whose weight is the layer's dequantized
weight (`x @ W_hat + b` for a QLinear), so the exported float graph carries initializers that
`onnx_int8.quantize_graph` recognises and rewrites with the layer's own integers. `as_lowered` is the
eager model the rewritten graph computes (the export's own choices applied), the parity gate's reference.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from modelpress.core.modules import set_submodule
from modelpress.quant.modules import ActSpec, QConv, QEmbedding, QLinear

MIN_EMBEDDING_SIZE = 1 << 16  # Gather tables with fewer values stay float (token-type embeddings, ...)


def as_lowered(model: nn.Module, embeddings: str, conv: str) -> nn.Module:
    """The eager model the graph is meant to compute: as `model`, with the export's own choices applied
    (float-compute convolutions without their activation quantizer, float tables quantized by the export)."""
    changes = [
        name
        for name, m in model.named_modules()
        if (conv == "float" and isinstance(m, QConv) and m.act.mode != "none")
        or (embeddings == "int8" and isinstance(m, nn.Embedding) and m.weight.numel() >= MIN_EMBEDDING_SIZE)
    ]
    if not changes:
        return model
    lowered = copy.deepcopy(model)
    for name in changes:
        m = lowered.get_submodule(name)
        if isinstance(m, QConv):
            m.act = ActSpec()
        else:
            set_submodule(lowered, name, QEmbedding(m))
    return lowered


class _DequantLinear(nn.Module):
    """`x @ W_hat + b`, exported as MatMul + Add with `W_hat` (in, out) as the MatMul's initializer."""

    def __init__(self, q: Any) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(q.dequantized_weight().t().contiguous(), requires_grad=False)
        self.bias = None if q.bias is None else nn.Parameter(q.bias.clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t.to(x.dtype))
        return y if self.bias is None else y + self.bias.to(x.dtype)


def _dequant_conv(q: Any) -> nn.Module:
    conv_type = nn.Conv1d if q.dims == 1 else nn.Conv2d
    w = q.dequantized_weight()
    conv = conv_type(q.in_channels, q.out_channels, tuple(w.shape[2:]), q.stride, q.padding, q.dilation, q.groups,
                     bias=q.bias is not None)  # fmt: skip
    with torch.no_grad():
        conv.weight.copy_(w)
        if q.bias is not None and conv.bias is not None:
            conv.bias.copy_(q.bias)
    return conv


def swap_in_float(model: Any) -> None:
    """Replace quantized layers by float stand-ins; mark attentions whose Q/K/V cannot become one QAttention."""
    for module in model.modules():
        projections = [getattr(module, n, None) for n in ("query", "key", "value")]
        quantized = [isinstance(p, QLinear) for p in projections]
        if any(quantized) and not (all(quantized) and _qattention_ready(projections)):  # type: ignore[arg-type]
            module.no_fuse = True  # read by export.onnx_float._fusable_attention
    for name, module in list(model.named_modules()):
        if isinstance(module, (QLinear, QConv, QEmbedding)):
            if isinstance(module, QEmbedding):
                stand_in: nn.Module = nn.Embedding.from_pretrained(
                    module.dequantized_weight(), padding_idx=module.padding_idx
                )
            else:
                stand_in = _DequantLinear(module) if isinstance(module, QLinear) else _dequant_conv(module)
            set_submodule(model, name, stand_in)


def _qattention_ready(layers: list[QLinear]) -> bool:
    """Q, K, V with one input quantization that QAttention takes (8-bit per tensor), or all weight-only."""
    act = layers[0].act
    same = all(q.act == act and qparams(q) == qparams(layers[0]) for q in layers)
    per_tensor = act.granularity == "tensor" and act.bits == 8 and not (act.mode == "dynamic" and act.symmetric)
    channels = all(q.weight_scheme.granularity != "group" and q.weight_scheme.bits <= 8 for q in layers)
    return same and channels and (act.mode == "none" or per_tensor)


def qparams(q: Any) -> tuple[float, int] | None:
    return None if q.act_scale is None else (float(q.act_scale), int(q.act_zero_point))
