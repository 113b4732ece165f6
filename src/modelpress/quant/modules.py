"""Quantized layers: integer weights plus an activation quantizer (none, static or dynamic).

`QLinear` and `QConv` hold the integer weights (`weight_q`, with `weight_scale` /
`weight_zero_point`) and the activation's quantization parameters. Their forward computes
what the integer kernel computes; `quant/kernels.py` runs it on real integer kernels where
the shapes allow, and export (`export/`) maps the same parameters onto ONNX Runtime's and
Inductor's int8 operators.

    >>> qlinear = QLinear.from_float(linear, QuantScheme(bits=8, granularity="channel"), ActSpec(mode="dynamic"))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.core.config import Config
from modelpress.core.errors import ConfigError
from modelpress.primitives.affine import (
    QuantScheme,
    dequantize,
    fake_quantize,
    qparams_from_range,
    quantize_tensor,
    reduce_range,
    ungroup,
)
from modelpress.primitives.packing import pack_int4_pairs, unpack_int4_pairs

ActMode = Literal["none", "static", "dynamic"]


@dataclass(frozen=True)
class ActSpec(Config):
    """How a layer's input activation is quantized.

    `static`: one scale and zero point fixed from calibration; `dynamic`: computed from each
    input at run time, per tensor or per token (one scale per row: robust to outlier tokens).
    """

    mode: ActMode = "none"
    bits: int = 8
    symmetric: bool = False
    granularity: Literal["tensor", "token"] = "tensor"

    def validate(self) -> None:
        if not 2 <= self.bits <= 16:
            raise ConfigError(f"activation bits must be in [2, 16], got {self.bits}")
        if self.mode == "static" and self.granularity != "tensor":
            raise ConfigError("static activation quantization is per tensor; use mode='dynamic' for per-token")

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(bits=self.bits, symmetric=self.symmetric, granularity=self.granularity)


class QuantBase(nn.Module):
    """Shared storage: integer weight, its qparams, float bias, activation qparams."""

    weight_q: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor
    act_scale: torch.Tensor
    act_zero_point: torch.Tensor

    def _init_quant(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        wscheme: QuantScheme,
        act: ActSpec,
        act_range: tuple[float, float] | None,
        weight_range: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        if not torch.isfinite(weight).all():
            raise ValueError("cannot quantize a layer whose weight has non-finite values")
        self.weight_scheme = wscheme
        self.act = act
        self.weight_shape = tuple(weight.shape)
        w2d = weight.detach().float().reshape(weight.shape[0], -1)  # (out, in * k...)
        lo, hi = weight_range if weight_range is not None else (None, None)
        qt = quantize_tensor(w2d, wscheme, lo, hi)
        self.register_buffer("weight_q", qt.q)
        self.register_buffer("weight_scale", qt.scale.float())
        self.register_buffer("weight_zero_point", qt.zero_point)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        if act.mode == "static":
            if act_range is None:
                raise ValueError("static activation quantization needs a calibrated range")
            scale, zp = qparams_from_range(torch.tensor(act_range[0]), torch.tensor(act_range[1]), act.scheme)
            self.register_buffer("act_scale", scale.reshape(()))
            self.register_buffer("act_zero_point", zp.reshape(()))
        else:
            self.register_buffer("act_scale", None)
            self.register_buffer("act_zero_point", None)

    def dequantized_weight(self) -> torch.Tensor:
        w = dequantize(self.weight_q, self.weight_scale, self.weight_zero_point)
        return self._unpad(w).reshape(self.weight_shape)

    def weight_codes(self) -> torch.Tensor:
        """The integer codes in the weight's shape, without the padding of a short last group."""
        return self._unpad(self.weight_q).reshape(self.weight_shape)

    def _unpad(self, grouped: torch.Tensor) -> torch.Tensor:
        # group-wise storage is (out, G, group_size), padded past in_features when group_size does not divide it
        return ungroup(grouped, (self.weight_shape[0], int(torch.Size(self.weight_shape[1:]).numel())))

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The activation as the integer kernel sees it (fake-quantized in float)."""
        if self.act.mode == "none":
            return x
        scheme = self.act.scheme
        if self.act.mode == "static":
            return fake_quantize(x, self.act_scale, self.act_zero_point, scheme)
        lo, hi = reduce_range(x, scheme)
        scale, zp = qparams_from_range(lo, hi, scheme)
        return fake_quantize(x, scale, zp, scheme)

    def weight_bits(self) -> int:
        return self.weight_scheme.bits

    def extra_repr(self) -> str:
        w = self.weight_scheme
        act = "float" if self.act.mode == "none" else f"{self.act.mode} int{self.act.bits} per-{self.act.granularity}"
        return f"weight=int{w.bits} {'sym' if w.symmetric else 'asym'} per-{w.granularity}, act={act}"


class QLinear(QuantBase):
    """A Linear layer with integer weights (any bit width) and an optional activation quantizer.

    Group-wise codes are stored (out, G, group_size) with G = ceil(in_features / group_size): a width
    the group size does not divide ends in a short group with its own scale, padded in storage with
    the zero point (dequantized to exactly 0), the layout of ONNX Runtime's `MatMulNBits`.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        wscheme: QuantScheme,
        act: ActSpec,
        act_range: tuple[float, float] | None = None,
        weight_range: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self._init_quant(weight, bias, wscheme, act, act_range, weight_range)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        wscheme: QuantScheme,
        act: ActSpec = ActSpec(),
        act_range: tuple[float, float] | None = None,
    ) -> QLinear:
        return cls(linear.weight, linear.bias, wscheme, act, act_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from modelpress.quant import kernels

        out = kernels.linear(self, x)
        if out is not None:
            return out
        return F.linear(self.quantize_input(x), self.dequantized_weight().to(x.dtype), _cast(self.bias, x))


class QConv(QuantBase):
    """A Conv1d/Conv2d with integer weights (per output channel) and an optional activation quantizer."""

    def __init__(
        self,
        conv: nn.Conv1d | nn.Conv2d,
        wscheme: QuantScheme,
        act: ActSpec,
        act_range: tuple[float, float] | None = None,
        weight_range: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if wscheme.granularity == "group":
            raise ConfigError("group-wise weight quantization applies to Linear layers, not convolutions")
        if conv.padding_mode != "zeros":
            raise ConfigError(f"padding_mode {conv.padding_mode!r} is not supported for quantized convolutions")
        self.dims = 1 if isinstance(conv, nn.Conv1d) else 2
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.padding_mode = conv.kernel_size, conv.padding_mode  # read by models (TF-style padding)
        self._init_quant(conv.weight, conv.bias, wscheme, act, act_range, weight_range)

    @property
    def weight(self) -> torch.Tensor:
        """The weight this layer computes with, dequantized: models read a conv's `weight.dtype` (ViT's patch
        embedding casts its input to it)."""
        return self.dequantized_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv1d if self.dims == 1 else F.conv2d
        w = self.dequantized_weight().to(x.dtype)
        return conv(
            self.quantize_input(x), w, _cast(self.bias, x), self.stride, self.padding, self.dilation, self.groups
        )


def _cast(bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
    return None if bias is None else bias.to(x.dtype)


class QEmbedding(nn.Module):
    """An embedding table of integer codes with symmetric scales per row (or per group of a row); only the
    looked-up rows are dequantized.

    Word and position tables are most of a small encoder's size (MiniLM: 12M of 22.7M values). A
    per-row int8 table costs no measurable quality there; at 4 bits or fewer the codes are stored two
    to a byte (`weight_packed`, offset by 8), which halves the table again.
    """

    weight_scale: torch.Tensor

    def __init__(
        self,
        embedding: nn.Embedding,
        bits: int = 8,
        group_size: int | None = None,
        codes: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """`codes`: (integer codes, scales) chosen elsewhere (`from_head`) instead of rounding the weight."""
        super().__init__()
        _check_plain_lookup(embedding)
        if embedding.max_norm is not None or embedding.scale_grad_by_freq or embedding.sparse:
            raise ConfigError("embeddings with max_norm, scale_grad_by_freq or sparse gradients are not supported")
        weight = embedding.weight.detach().float()
        if not torch.isfinite(weight).all():
            raise ValueError("cannot quantize an embedding whose weight has non-finite values")
        self.num_embeddings, self.embedding_dim = weight.shape
        if group_size is not None and (group_size < 1 or self.embedding_dim % group_size):
            raise ConfigError(
                f"embedding group_size must divide the embedding width {self.embedding_dim}, got {group_size}"
            )
        self.group_size = group_size or self.embedding_dim
        # one scale per row is a group as wide as the row
        self.weight_scheme = QuantScheme(bits, True, "group", 0, self.group_size)
        self.padding_idx = embedding.padding_idx
        if codes is None:
            qt = quantize_tensor(weight, self.weight_scheme)
            codes = (qt.q, qt.scale)
        q = codes[0].to(torch.int8).reshape(self.num_embeddings, self.embedding_dim).clone()
        self.register_buffer("weight_scale", codes[1].float().reshape(self.num_embeddings, -1).clone())  # (V, G)
        self.packed = bits <= 4 and self.embedding_dim % 2 == 0
        if self.packed:  # [-8, 7] -> [0, 15], two per byte, low nibble first: (V, D/2)
            self.register_buffer("weight_packed", pack_int4_pairs((q.to(torch.int16) + 8).to(torch.uint8)))
        else:
            self.register_buffer("weight_q", q)  # (V, D)

    @classmethod
    def from_head(cls, embedding: nn.Embedding, head: QLinear) -> QEmbedding:
        """The table of a tied head that was quantized on its own (GPTQ, `head_bits`): the head's codes and
        scales, so the lookup and the head stay one table (`holds_table_codes`). The head's scheme must be
        symmetric, per row or in groups that divide the width."""
        _check_plain_lookup(embedding)
        ws = head.weight_scheme
        width = embedding.embedding_dim
        group = width if ws.granularity == "channel" else ws.group_size
        if not ws.symmetric or ws.granularity not in ("channel", "group") or width % group or head.bias is not None:
            raise ConfigError(f"a table takes a head's codes only from symmetric groups that divide its width {width}")
        if tuple(head.weight_shape) != tuple(embedding.weight.shape):
            raise ConfigError(f"the head's weight {tuple(head.weight_shape)} is not the table's "
                              f"{tuple(embedding.weight.shape)}")  # fmt: skip
        return cls(embedding, ws.bits, group, codes=(head.weight_codes(), head.weight_scale))

    def codes(self) -> torch.Tensor:
        """The (V, D) int8 codes, unpacked."""
        if not self.packed:
            return self.weight_q
        return (unpack_int4_pairs(self.weight_packed).to(torch.int16) - 8).to(torch.int8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.weight_packed if self.packed else self.weight_q
        rows = F.embedding(ids, table)
        if self.packed:
            rows = unpack_int4_pairs(rows).to(torch.int16) - 8
        scale = F.embedding(ids, self.weight_scale)  # (..., groups)
        groups = scale.shape[-1]
        out = rows.to(scale.dtype).reshape(*rows.shape[:-1], groups, -1) * scale.unsqueeze(-1)
        return out.reshape(*rows.shape[:-1], self.embedding_dim)

    def dequantized_weight(self) -> torch.Tensor:
        codes = self.codes().float().reshape(self.num_embeddings, self.weight_scale.shape[1], -1)
        return (codes * self.weight_scale.unsqueeze(-1)).reshape(self.num_embeddings, self.embedding_dim)

    def weight_bits(self) -> int:
        return self.weight_scheme.bits

    def extra_repr(self) -> str:
        per = "per-row" if self.group_size == self.embedding_dim else f"per-group({self.group_size})"
        packed = ", two per byte" if self.packed else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, weight=int{self.weight_scheme.bits} sym {per}{packed}"


def changed_lookup(embedding: nn.Module) -> str | None:
    """Why `embedding` is not a plain table lookup `QEmbedding` may replace (a subclass with its own forward,
    e.g. Gemma's embedding scaled by sqrt(hidden)), or None."""
    if isinstance(embedding, nn.Embedding) and type(embedding).forward is not nn.Embedding.forward:
        return f"{type(embedding).__name__} changes the lookup in its own forward (e.g. a scale)"
    return None


def _check_plain_lookup(embedding: nn.Module) -> None:
    why = changed_lookup(embedding)
    if why is not None:
        raise ConfigError(f"cannot quantize the table: {why}")


def holds_table_codes(head: nn.Module, table: nn.Module) -> bool:
    """Whether `head` is a `QLinear` holding exactly the codes and scales of the `QEmbedding` `table` (a tied
    language-model head quantized with its table, `ptq.quantize_embeddings`): files that tie them store one."""
    if not isinstance(head, QLinear) or not isinstance(table, QEmbedding) or head.bias is not None:
        return False
    if tuple(head.weight_shape) != (table.num_embeddings, table.embedding_dim):
        return False
    if head.weight_scheme.bits != table.weight_scheme.bits or not head.weight_scheme.symmetric:
        return False
    scale = head.weight_scale.reshape(table.num_embeddings, -1)
    return scale.shape == table.weight_scale.shape and bool(
        torch.equal(scale.float(), table.weight_scale.float()) and torch.equal(head.weight_codes(), table.codes())
    )
