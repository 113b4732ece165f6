"""GPTQ weight-only quantization (int2–int8, group-wise), calibrated one transformer block at a time.

Each selected Linear layer's input Hessian is accumulated while its block runs on calibration data;
`primitives.gptq.gptq_quantize` then chooses the integer codes, and the layer becomes a `QLinear`
holding exactly those codes (float activations). Blocks are processed in order, each on the outputs
of the already quantized blocks before it (`primitives.sequential`).

    >>> qmodel = quantize(model, GPTQConfig(bits=4, group_size=128), data=entry.calibration_data(128))
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modelpress.core.config import Config
from modelpress.core.context import Context
from modelpress.core.errors import ConfigError
from modelpress.core.modules import set_submodule
from modelpress.core.registry import register
from modelpress.primitives.affine import QuantScheme
from modelpress.primitives.gptq import gptq_quantize, hessian_update
from modelpress.primitives.sequential import (
    DEFAULT_LAYERS,
    Scope,
    calibration_batches,
    convert_conv1d,
    observe_inputs,
    run_sequential,
    selected_linears,
)
from modelpress.quant.modules import ActSpec, QEmbedding, QLinear
from modelpress.quant.ptq import (
    MIN_EMBEDDING_VALUES,
    LayerFilter,
    bits_for,
    check_bits,
    check_embedding_bits,
    check_layer_bits,
    quantize_embeddings,
)

# A language model's output head is commonly kept in float: it is small next to the blocks and sensitive.


@dataclass(frozen=True)
class GPTQConfig(Config):
    """GPTQ weight-only quantization; `group_size=0` gives one scale per output channel."""

    stage = "quantize"

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    damp: float = 0.01  # fraction of the Hessian's mean diagonal added to its diagonal
    block_size: int = 128  # columns updated together (lazy batch updates)
    act_order: bool = True  # process input columns by decreasing Hessian diagonal
    calibration_batches: int = 32
    layers: LayerFilter = DEFAULT_LAYERS
    # the embedding table as integers too (symmetric, per group of a row), and a head tied to it with the same codes
    embedding_bits: int | None = None
    embedding_group_size: int | None = None
    # the output head (`lm_head`) calibrated too, at these bits (symmetric, in groups of `embedding_group_size`,
    # else `group_size`). A head tied to the embedding table keeps it tied: the table takes the head's codes,
    # unless `embedding_bits` is given (then the table is quantized on its own and the two are untied)
    head_bits: int | None = None

    # bits of single layers: regular expression on the layer name -> bits (the first that matches wins),
    # e.g. {"lm_head$": 8}; mixed precision promotes its sensitive layers here
    layer_bits: dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        check_layer_bits(self.layer_bits)
        validate_weight_settings(self.bits, self.group_size, self.calibration_batches)
        if self.head_bits is not None and not 2 <= self.head_bits <= 8:
            raise ConfigError(f"head_bits must be in [2, 8] (or null: the head stays as `layers` says), "
                              f"got {self.head_bits}")  # fmt: skip
        # a table taking a calibrated head's codes has the head's groups: embedding_group_size without embedding_bits
        check_embedding_bits(self.embedding_bits or self.head_bits, self.embedding_group_size)
        if not 0 < self.damp <= 1:
            raise ConfigError(f"damp must be in (0, 1], got {self.damp}")
        if self.block_size < 1:
            raise ConfigError(f"block_size must be >= 1, got {self.block_size}")

    def weight_scheme(self, bits: int | None = None) -> QuantScheme:
        return weight_scheme(self.bits if bits is None else bits, self.symmetric, self.group_size)


def embedded_tables(model: nn.Module, cfg: Any, ctx: Context) -> list[str]:
    """The config's `embedding_bits` applied after the pass (`ptq.quantize_embeddings`); the layers replaced."""
    if cfg.embedding_bits is None:
        return []
    return quantize_embeddings(model, cfg.embedding_bits, cfg.embedding_group_size, ctx)


HEAD = r"(^|\.)lm_head$"  # the output head of a transformers causal LM


def output_heads(model: nn.Module, ctx: Context) -> dict[str, tuple[nn.Linear, str | None]]:
    """The float Linear output heads (`lm_head`), each with the name of the embedding table it is tied to."""
    tables = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    heads = {n: (m, tables.get(id(m.weight))) for n, m in model.named_modules()
             if type(m) is nn.Linear and re.search(HEAD, n)}  # fmt: skip
    if not heads:
        ctx.warn("head_bits: the model has no float Linear lm_head; nothing more is quantized")
    return heads


def share_head_codes(model: nn.Module, heads: dict[str, tuple[nn.Linear, str | None]], ctx: Context) -> list[str]:
    """Each table tied to a quantized head takes the head's codes (`QEmbedding.from_head`); returns their names."""
    shared = []
    for head_name, (_, table_name) in heads.items():
        head = model.get_submodule(head_name)
        if table_name is None or not isinstance(head, QLinear):
            continue
        table = model.get_submodule(table_name)
        if table.weight.numel() < MIN_EMBEDDING_VALUES:  # as `quantize_embeddings`: a small table stays float
            ctx.warn(f"{table_name} kept float, untied from {head_name}: {table.weight.numel()} values, fewer than "
                     f"{MIN_EMBEDDING_VALUES} (small tables stay float)")  # fmt: skip
            continue
        try:
            set_submodule(model, table_name, QEmbedding.from_head(table, head))
        except ConfigError as err:
            ctx.warn(f"{table_name} kept float, untied from {head_name}: {err}")
            continue
        shared.append(table_name)
    return shared


def validate_weight_settings(bits: int, group_size: int, calibration_batches: int) -> None:
    """Shared checks of the weight-only calibrated configs (GPTQ, AWQ)."""
    check_bits(bits, 2, 8)
    if group_size < 0:
        raise ConfigError(f"group_size must be >= 1 (or 0 for one scale per output channel), got {group_size}")
    if calibration_batches < 1:
        raise ConfigError(f"calibration_batches must be >= 1, got {calibration_batches}")


def weight_scheme(bits: int, symmetric: bool, group_size: int) -> QuantScheme:
    if group_size == 0:
        return QuantScheme(bits, symmetric, "channel", 0)
    return QuantScheme(bits, symmetric, "group", 0, group_size)


def qlinear_from_codes(
    linear: nn.Linear,
    scheme: QuantScheme,
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    act: ActSpec | None = None,
) -> QLinear:
    """A `QLinear` holding the given codes and qparams (in its own layout) instead of rounding `linear`."""
    layer = QLinear(linear.weight, linear.bias, scheme, act or ActSpec())
    for name, value in (("weight_q", q), ("weight_scale", scale), ("weight_zero_point", zero_point)):
        current = getattr(layer, name)
        if value.shape != current.shape:
            raise ValueError(f"{name} of shape {tuple(value.shape)} does not fit the layer ({tuple(current.shape)})")
        setattr(layer, name, value.to(current.dtype).contiguous())
    return layer


@dataclass
class Prepared:
    """What a calibrated weight-only pass (GPTQ, AWQ) starts from."""

    batches: list[Any]
    converted: list[str]  # GPT-2 Conv1D layers turned into nn.Linear
    scheme_of: Callable[[str], QuantScheme]  # per layer: the config's scheme at its (maybe overridden) bits
    selected: dict[str, nn.Linear]


def prepare_calibrated(model: nn.Module, cfg: Any, ctx: Context, label: str) -> Prepared:
    """Calibration batches, Conv1D converted, per-layer schemes and the Linear layers the pass quantizes."""
    batches = calibration_batches(ctx, cfg.calibration_batches, label)
    converted = convert_conv1d(model)

    def scheme_of(name: str) -> QuantScheme:
        return cfg.weight_scheme(bits_for(cfg, name))

    tables = getattr(cfg, "embedding_bits", None) is not None or getattr(cfg, "head_bits", None) is not None
    selected = selected_linears(model, cfg.layers, ctx, label, tables_elsewhere=tables)
    check_group_widths(selected, getattr(cfg, "group_size", 0), ctx, label)
    return Prepared(batches, converted, scheme_of, selected)


def check_group_widths(layers: dict[str, nn.Linear], group_size: int, ctx: Context, label: str) -> None:
    """Refuse a group size wider than every layer's input (nothing would be grouped); warn where some are.

    A layer narrower than the group gets one scale per output row (one short group), as `group_size: 0` gives.
    """
    if group_size <= 0:
        return
    narrow = [n for n, m in layers.items() if m.in_features < group_size]
    if not narrow:
        return
    widest = max(m.in_features for m in layers.values())
    if len(narrow) == len(layers):
        raise ConfigError(
            f"{label}: group_size {group_size} is larger than the input width of every layer it quantizes (the "
            f"widest reads {widest} values), so no layer would be quantized in groups; give group_size <= {widest}, "
            "or 0 for one scale per output channel"
        )
    shown = ", ".join(narrow[:3]) + (f" and {len(narrow) - 3} more" if len(narrow) > 3 else "")
    ctx.warn(
        f"{label}: group_size {group_size} is larger than the input width of {len(narrow)} layer(s) ({shown}): "
        "one scale per output row there"
    )


@register(GPTQConfig)
def gptq(model: nn.Module, cfg: GPTQConfig, ctx: Context) -> nn.Module:
    start = time.perf_counter()
    prep = prepare_calibrated(model, cfg, ctx, "GPTQ")
    batches, converted, selected = prep.batches, prep.converted, prep.selected
    heads = output_heads(model, ctx) if cfg.head_bits is not None else {}
    selected.update({name: head for name, (head, _) in heads.items()})
    head_scheme = weight_scheme(cfg.head_bits or cfg.bits, True, cfg.embedding_group_size or cfg.group_size)

    def scheme_of(name: str) -> QuantScheme:
        return head_scheme if name in heads else prep.scheme_of(name)

    losses: dict[str, float] = {}

    def quantize_scope(scope: Scope) -> None:
        hessians = observe_inputs(scope, lambda acc, x: hessian_update(*(acc or (None, 0)), x))
        for name, layer in scope.layers.items():
            h, count = hessians[name] or (None, 0)
            if h is None or count == 0:
                ctx.warn(f"skipped {name}: it never ran on the calibration data (kept in float)")
                continue
            scheme = scheme_of(name)
            res = gptq_quantize(
                layer.weight, h, scheme, damp=cfg.damp, block_size=cfg.block_size, act_order=cfg.act_order
            )
            for note in res.notes:
                ctx.warn(f"GPTQ {name}: {note}")
            set_submodule(model, name, qlinear_from_codes(layer, scheme, res.q, res.scale, res.zero_point))
            losses[name] = res.loss

    stats = run_sequential(model, batches, selected, quantize_scope, ctx, "GPTQ")
    tables = [] if cfg.embedding_bits is not None else share_head_codes(model, heads, ctx)
    ctx.report.add_pass(
        "quantize/gptq",
        time.perf_counter() - start,
        layers=len(losses),
        bits={n: scheme_of(n).bits for n in losses},
        group_size=cfg.group_size,
        loss=losses,
        conv1d_converted=converted,
        embeddings=tables + embedded_tables(model, cfg, ctx),
        **stats,
    )
    return model
