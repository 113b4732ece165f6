"""Post-training quantization: weight-only, dynamic and static (calibrated) integer layers.

Each flavour is a frozen config with a registered handler; `quantize()` applies one:

    >>> model = quantize(model, StaticQuantConfig(observer=ObserverConfig(kind="mse")), data=batches)
    >>> model = quantize(model, DynamicQuantConfig())                  # activations scaled at run time
    >>> model = quantize(model, WeightOnlyConfig(bits=4, granularity="group", group_size=32))

Linear and Conv1d/Conv2d layers are quantized (transformers' GPT-2 `Conv1D`, a Linear stored
transposed, as the Linear it is); Conv-BN pairs are folded first. Layers that cannot be quantized
(an unsupported type named in `include`, a convolution under a group-wise scheme, a Linear whose
owner reads its weight instead of calling it, ...) are skipped with a warning that the report
lists. Any group size fits any Linear: a width it does not divide ends in a short last group with
its own scale, and a group wider than the layer is one group per row (`primitives.affine`).
"""

from __future__ import annotations

import copy
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from modelpress.core.config import Config, check_regex
from modelpress.core.context import Context
from modelpress.core.errors import BadInputError, ConfigError, DataError
from modelpress.core.layer_filter import LayerFilter
from modelpress.core.modules import custom_forward, first_batch, run_batch, set_submodule, take_batches
from modelpress.core.registry import apply, register
from modelpress.primitives.affine import QuantScheme
from modelpress.primitives.sequential import convert_conv1d
from modelpress.quant.bias_correction import conv_input_means, correct_conv_biases
from modelpress.quant.fold import fold_conv_bn
from modelpress.quant.modules import ActSpec, QConv, QEmbedding, QLinear, changed_lookup
from modelpress.quant.observers import ObserverConfig, make_observer
from modelpress.quant.rounding import gptq_round, layer_hessians

QUANTIZABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
# Layer types users commonly expect to be quantized that have no integer form here: skipped with a warning.
_SKIPPED_TYPES = (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.LSTM, nn.GRU, nn.RNN, nn.Embedding)
MIN_EMBEDDING_VALUES = 1 << 16  # smaller tables (e.g. token types) stay float: nothing to gain


@dataclass(frozen=True)
class WeightOnlyConfig(Config):
    """Integer weights (any bit width 2–8), float activations."""

    stage = "quantize"

    bits: int = 8
    symmetric: bool = True
    granularity: Literal["tensor", "channel", "group"] = "channel"
    group_size: int = 128
    embedding_bits: int | None = None  # large embedding tables as integers too (one scale per row)
    embedding_group_size: int | None = None  # values per embedding scale along a row; None: one per row
    fold_bn: bool = True
    layers: LayerFilter = LayerFilter()

    # bits of single layers: regular expression on the layer name -> bits (the first that matches wins),
    # e.g. {"lm_head$": 8}; mixed precision promotes its sensitive layers here
    layer_bits: dict[str, int] = field(default_factory=dict)

    # the mean output error of each integer convolution's rounded weights folded into its bias (needs data)
    bias_correction: bool = True
    # how weights meet their grid: "nearest", or "gptq" (against each layer's calibration inputs, `quant.rounding`)
    weight_rounding: Literal["nearest", "gptq"] = "nearest"
    # depthwise convolutions (one filter per channel, a few weights each: their rounding error does not average
    # out, and they are the layers of MobileNet / EfficientNet most sensitive to it): "quantize", or "float"
    depthwise: Literal["quantize", "float"] = "quantize"

    def validate(self) -> None:
        check_layer_bits(self.layer_bits)
        check_bits(self.bits, 2, 8)
        check_embedding_bits(self.embedding_bits, self.embedding_group_size)
        check_rounding(self.weight_rounding, self.granularity)
        if self.depthwise not in ("quantize", "float"):
            raise ConfigError(f"depthwise must be 'quantize' or 'float', got {self.depthwise!r}")

    def weight_scheme(self) -> QuantScheme:
        return QuantScheme(self.bits, self.symmetric, self.granularity, 0, self.group_size)


@dataclass(frozen=True)
class DynamicQuantConfig(Config):
    """Integer weights and activations whose scale is computed from each input at run time."""

    stage = "quantize"

    bits: int = 8
    act_granularity: Literal["tensor", "token"] = "token"
    act_symmetric: bool = False
    per_channel: bool = True
    embedding_bits: int | None = 8  # large embedding tables as int8 with one scale per row; None: float
    embedding_group_size: int | None = None  # values per embedding scale along a row; None: one per row
    fold_bn: bool = True
    layers: LayerFilter = LayerFilter(exclude=())

    # bits of single layers: regular expression on the layer name -> bits (the first that matches wins),
    # e.g. {"lm_head$": 8}; mixed precision promotes its sensitive layers here
    layer_bits: dict[str, int] = field(default_factory=dict)

    # the mean output error of each integer convolution's rounded weights folded into its bias (needs data)
    bias_correction: bool = True
    # how weights meet their grid: "nearest", or "gptq" (against each layer's calibration inputs, `quant.rounding`)
    weight_rounding: Literal["nearest", "gptq"] = "nearest"

    def validate(self) -> None:
        check_layer_bits(self.layer_bits)
        check_bits(self.bits, 2, 8)
        check_embedding_bits(self.embedding_bits, self.embedding_group_size)
        check_rounding(self.weight_rounding, "channel" if self.per_channel else "tensor")

    def weight_scheme(self) -> QuantScheme:
        return QuantScheme(self.bits, True, "channel" if self.per_channel else "tensor")


@dataclass(frozen=True)
class StaticQuantConfig(Config):
    """Integer weights and activations with ranges fixed by calibration over real samples."""

    stage = "quantize"

    bits: int = 8
    act_symmetric: bool = False
    per_channel: bool = True
    observer: ObserverConfig = ObserverConfig()
    weight_observer: Literal["minmax", "mse"] = "minmax"
    calibration_batches: int = 32
    fold_bn: bool = True
    # Layers whose input stays dynamically scaled (e.g. ".*output.dense" for BERT's FFN2, whose
    # GELU-output input has outliers a static per-tensor scale cannot cover).
    dynamic_layers: tuple[str, ...] = ()
    embedding_bits: int | None = 8  # large embedding tables as int8 with one scale per row; None: float
    embedding_group_size: int | None = None  # values per embedding scale along a row; None: one per row
    layers: LayerFilter = LayerFilter()

    # bits of single layers: regular expression on the layer name -> bits (the first that matches wins),
    # e.g. {"lm_head$": 8}; mixed precision promotes its sensitive layers here
    layer_bits: dict[str, int] = field(default_factory=dict)

    # the mean output error of each integer convolution's rounded weights folded into its bias (needs data)
    bias_correction: bool = True
    # how weights meet their grid: "nearest", or "gptq" (against each layer's calibration inputs, `quant.rounding`)
    weight_rounding: Literal["nearest", "gptq"] = "nearest"

    def validate(self) -> None:
        check_layer_bits(self.layer_bits)
        check_bits(self.bits, 2, 8)
        check_embedding_bits(self.embedding_bits, self.embedding_group_size)
        if self.calibration_batches < 1:
            raise ConfigError(f"calibration_batches must be >= 1, got {self.calibration_batches}")
        for pattern in self.dynamic_layers:
            check_regex(pattern, "dynamic_layers")
        check_rounding(self.weight_rounding, "channel" if self.per_channel else "tensor")

    def weight_scheme(self) -> QuantScheme:
        return QuantScheme(self.bits, True, "channel" if self.per_channel else "tensor")


def check_embedding_bits(bits: int | None, group_size: int | None) -> None:
    if bits is not None and not 2 <= bits <= 8:
        raise ConfigError(f"embedding_bits must be None (float) or in [2, 8], got {bits}")
    if group_size is not None and (bits is None or group_size < 2):
        raise ConfigError(
            f"embedding_group_size must be >= 2 and needs embedding_bits, got {group_size} with embedding_bits {bits}"
        )


def check_rounding(rounding: str, granularity: str) -> None:
    if rounding not in ("nearest", "gptq"):
        raise ConfigError(f"weight_rounding must be 'nearest' or 'gptq', got {rounding!r}")
    if rounding == "gptq" and granularity == "tensor":
        raise ConfigError(
            "weight_rounding 'gptq' needs a scale per output channel or per group (per_channel: true, or "
            "granularity channel / group), got one scale per tensor"
        )


def check_layer_bits(layer_bits: dict[str, int]) -> None:
    """Every pattern of a config's `layer_bits` compiles and gives bits in [2, 8]."""
    for pattern, bits in layer_bits.items():
        check_regex(pattern, "layer_bits")
        if not 2 <= bits <= 8:
            raise ConfigError(f"layer_bits[{pattern!r}] must be in [2, 8], got {bits}")


def bits_for(cfg: Any, name: str) -> int:
    """The bits `cfg` gives the layer called `name`: its first `layer_bits` pattern that matches, else `bits`."""
    for pattern, bits in getattr(cfg, "layer_bits", {}).items():
        if re.search(pattern, name):
            return bits
    return cfg.bits


def check_bits(bits: int, lo: int, hi: int) -> None:
    if not lo <= bits <= hi:
        raise ConfigError(f"bits must be in [{lo}, {hi}], got {bits}")


@dataclass
class LayerPlan:
    """One layer to quantize and the settings it gets (`layer_bits` may give it other `bits`)."""

    name: str
    module: nn.Module
    weight: QuantScheme
    act: ActSpec
    skipped: str | None = None
    act_range: tuple[float, float] | None = None
    stats: dict[str, Any] = field(default_factory=dict)


def select_layers(
    model: nn.Module,
    layer_filter: LayerFilter,
    ctx: Context | None = None,
    embeddings: bool = False,
    tables_elsewhere: bool = False,
    why_skipped: str = "no integer form in this pass, kept in float",
) -> list[tuple[str, nn.Module]]:
    """(name, module) of the layers `layer_filter` selects; unsupported selected types are warned about.

    transformers' GPT-2 style `Conv1D` layers (a Linear with its weight stored transposed) are turned into the
    equal `nn.Linear` first, in place, as GPTQ / AWQ / SparseGPT do. With `embeddings`, embedding tables of at
    least `MIN_EMBEDDING_VALUES` values are selected too; `tables_elsewhere` (the pass quantizes them on its
    own, e.g. GPTQ's `embedding_bits`) leaves them out without a warning.
    """
    convert_conv1d(model)
    chosen, skipped = [], {}
    read_directly = _weights_read_directly(model)
    for name, module in model.named_modules():
        if not name or not layer_filter.selects(name, type(module).__name__):
            continue
        if name in read_directly:
            if ctx is not None:
                ctx.warn(f"skipped {name}: {read_directly[name]}, so an integer layer would never run (kept in float)")
            continue
        if isinstance(module, nn.Embedding) and (embeddings or tables_elsewhere):
            if module.weight.numel() >= MIN_EMBEDDING_VALUES and not tables_elsewhere:
                why = changed_lookup(module)
                if why is None:
                    chosen.append((name, module))
                elif ctx is not None:
                    ctx.warn(f"{name} kept float: {why}")
        elif isinstance(module, QUANTIZABLE):
            chosen.append((name, module))
        elif isinstance(module, _SKIPPED_TYPES):
            skipped.setdefault(type(module).__name__, []).append(name)
    if ctx is not None:
        for kind, names in skipped.items():
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            ctx.warn(f"skipped {len(names)} {kind} layer(s) ({shown}): {why_skipped}")
    return chosen


def _weights_read_directly(model: nn.Module) -> dict[str, str]:
    """Linear layers whose owner reads their `weight` instead of calling them -> why. An integer form of such a
    layer would never run (and has no float `weight` to read): `nn.MultiheadAttention` passes `out_proj.weight`
    to its functional form, and `nn.TransformerEncoderLayer`'s fused inference path (eval mode, batch first)
    reads `linear1` / `linear2` (and the attention's weights) as tensors."""
    out = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.MultiheadAttention):
            out[f"{prefix}out_proj"] = f"{type(module).__name__} reads out_proj.weight directly instead of calling it"
        elif isinstance(module, nn.TransformerEncoderLayer):
            for child in ("linear1", "linear2"):
                why = f"{type(module).__name__}'s fused inference path reads {child}.weight directly"
                out[f"{prefix}{child}"] = why
    return out


def is_depthwise(module: nn.Module) -> bool:
    """A convolution with one filter per input channel (`groups == in_channels > 1`)."""
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return isinstance(module, convs) and module.groups > 1 and module.groups == module.in_channels


def why_not_quantizable(module: nn.Module, scheme: QuantScheme) -> str | None:
    """Why `scheme` cannot quantize `module`'s weight, or None when it can."""
    if (why := custom_forward(module, QUANTIZABLE)) is not None:
        return why
    if scheme.granularity == "group" and not isinstance(module, nn.Linear):
        return "group-wise quantization applies to Linear layers"
    return None


def plan_layers(model: nn.Module, cfg: Any, act: ActSpec, ctx: Context) -> list[LayerPlan]:
    plans = []
    embedding_bits = getattr(cfg, "embedding_bits", None)
    for name, module in select_layers(model, cfg.layers, ctx, embeddings=embedding_bits is not None):
        if isinstance(module, nn.Embedding):
            group = getattr(cfg, "embedding_group_size", None)
            scheme = QuantScheme(embedding_bits, True, "group", 0, group or module.embedding_dim)
            plans.append(LayerPlan(name, module, scheme, ActSpec()))
            continue
        bits = bits_for(cfg, name)
        layer_act = act
        if not isinstance(module, nn.Linear) and act.granularity == "token":  # a conv input has no tokens
            layer_act = ActSpec(act.mode, act.bits, act.symmetric, "tensor")
        scheme = cfg.weight_scheme()
        scheme = QuantScheme(bits, scheme.symmetric, scheme.granularity, scheme.axis, scheme.group_size)
        plan = LayerPlan(name, module, scheme, layer_act, skipped=why_not_quantizable(module, scheme))
        if plan.skipped:
            ctx.warn(f"skipped {name}: {plan.skipped} (kept in float)")
        else:
            plans.append(plan)
    if not any(not isinstance(p.module, nn.Embedding) for p in plans):
        raise BadInputError(
            f"the model has no quantizable layers selected by {cfg.layers}: "
            f"supported types are {', '.join(t.__name__ for t in QUANTIZABLE)}"
        )
    return plans


def _swap_corrected(
    model: nn.Module, plans: Sequence[LayerPlan], cfg: Any, data: Any, batches: int, notes: list[str]
) -> list[str]:
    """`_swap` (GPTQ's codes where `cfg.weight_rounding` asks, its notes added to `notes`), then bias correction of
    the integer convolutions (`cfg.bias_correction`, with data); returns the names of the layers whose bias was
    corrected."""
    convs = {p.name: p.module for p in plans if isinstance(p.module, (nn.Conv1d, nn.Conv2d))}
    hessians: dict[str, torch.Tensor] = {}
    if cfg.weight_rounding == "gptq":
        if data is None:
            raise DataError("weight_rounding 'gptq' needs calibration data: pass data=... (CLI: --data)")
        layers = {p.name: p.module for p in plans if not isinstance(p.module, nn.Embedding)}
        hessians = dict(layer_hessians(model, layers, data, batches))
    if not (cfg.bias_correction and convs and data is not None):
        _swap(model, plans, hessians, notes)
        return []
    means = conv_input_means(model, list(convs), data, batches)
    _swap(model, plans, hessians, notes)
    return correct_conv_biases(model, convs, means)


def _swap(model: nn.Module, plans: Sequence[LayerPlan], hessians: dict[str, torch.Tensor], notes: list[str]) -> None:
    for plan in plans:
        m = plan.module
        if isinstance(m, nn.Embedding):
            new: nn.Module = QEmbedding(m, plan.weight.bits, plan.weight.group_size)
        elif isinstance(m, nn.Linear):
            new = QLinear.from_float(m, plan.weight, plan.act, plan.act_range)
        else:
            new = QConv(m, plan.weight, plan.act, plan.act_range)
        if plan.name in hessians:
            notes += [f"{plan.name}: {note}" for note in gptq_round(new, m, hessians.pop(plan.name))]
        set_submodule(model, plan.name, new)


def quantize_embeddings(model: nn.Module, bits: int, group_size: int | None, ctx: Context) -> list[str]:
    """Embedding tables of at least `MIN_EMBEDDING_VALUES` values as integer codes (symmetric, per group of
    `group_size` values of a row, or per row); returns the names of the layers replaced.

    A Linear that shares a table's weight (the tied output head of a language model) becomes a `QLinear`
    with the same scheme, so it holds exactly the table's codes and scales: the two stay one table where a
    file ties them (GGUF writes `token_embd` once), instead of the head staying float beside an integer table.
    """
    tables = []
    for n, m in model.named_modules():
        if isinstance(m, nn.Embedding) and m.weight.numel() >= MIN_EMBEDDING_VALUES:
            why = changed_lookup(m)
            if why is None:
                tables.append((n, m))
            else:
                ctx.warn(f"{n} kept float: {why}")
    done = []
    for name, table in tables:
        width = table.embedding_dim
        group = group_size if group_size is not None and width % group_size == 0 else None
        if group_size is not None and group is None:
            ctx.warn(f"{name}: embedding_group_size {group_size} does not divide its width {width}; one scale per row")
        scheme = QuantScheme(bits, True, "group", 0, group or width)
        heads = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight is table.weight]
        set_submodule(model, name, QEmbedding(table, bits, group))
        done.append(name)
        for head_name, head in heads:
            set_submodule(model, head_name, QLinear.from_float(head, scheme))
            done.append(head_name)
    return done


def calibrate(
    model: nn.Module,
    plans: Sequence[LayerPlan],
    data: Iterable[Any],
    observer: ObserverConfig,
    scheme: QuantScheme,
    max_batches: int,
    ctx: Context,
) -> int:
    """Run `data` through `model`, observing each planned layer's input; sets `plan.act_range`. Returns batches."""
    observers = {p.name: make_observer(observer) for p in plans}
    handles = []
    for p in plans:

        def hook(_m: nn.Module, args: tuple[Any, ...], name: str = p.name) -> None:
            observers[name].observe(args[0].detach())

        handles.append(p.module.register_forward_pre_hook(hook))
    n = 0
    try:
        with torch.inference_mode():
            batches = take_batches(data, max_batches)
            for batch in ctx.progress(batches, "calibrating", total=len(batches)):
                run_batch(model, batch)
                n += 1
    finally:
        for h in handles:
            h.remove()
    if n == 0:
        raise DataError("the calibration set is empty: static quantization needs real input batches (--data)")
    for p in plans:
        lo, hi = observers[p.name].range(scheme)
        p.act_range = (float(lo), float(hi))
    return n


def _begin(model: nn.Module, ctx: Context | None, inplace: bool) -> tuple[nn.Module, Context]:
    ctx = ctx or Context()
    _check_finite(model)
    return (model if inplace else copy.deepcopy(model)).eval(), ctx


def _check_finite(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise BadInputError(f"parameter {name} has non-finite values (NaN or inf); cannot quantize")


def _summary(plans: Sequence[LayerPlan], cfg: Any, notes: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"layers": len(plans), "bits": {p.name: p.weight.bits for p in plans}}
    out["weight_rounding"] = cfg.weight_rounding
    if notes:
        out["rounding_notes"] = notes
    return out


@register(WeightOnlyConfig)
def weight_only(model: nn.Module, cfg: WeightOnlyConfig, ctx: Context) -> nn.Module:
    start = time.perf_counter()
    folded = fold_conv_bn(model, first_batch(ctx.data)) if cfg.fold_bn else []
    plans = plan_layers(model, cfg, ActSpec(mode="none"), ctx)
    notes: list[str] = []
    kept = [p.name for p in plans if is_depthwise(p.module)] if cfg.depthwise == "float" else []
    plans = [p for p in plans if p.name not in kept]
    if not plans:
        raise BadInputError("every selected layer is a depthwise convolution kept in float (depthwise: float)")
    corrected = _swap_corrected(model, plans, cfg, ctx.data, 16, notes)
    ctx.report.add_pass(
        "quantize/weight-only", time.perf_counter() - start, folded_bn=folded, bias_corrected=corrected,
        depthwise_kept_float=kept,
        **_summary(plans, cfg, notes),
    )  # fmt: skip
    return model


@register(DynamicQuantConfig)
def dynamic(model: nn.Module, cfg: DynamicQuantConfig, ctx: Context) -> nn.Module:
    start = time.perf_counter()
    act = ActSpec(mode="dynamic", bits=8, symmetric=cfg.act_symmetric, granularity=cfg.act_granularity)
    folded = fold_conv_bn(model, first_batch(ctx.data)) if cfg.fold_bn else []
    plans = plan_layers(model, cfg, act, ctx)
    notes: list[str] = []
    corrected = _swap_corrected(model, plans, cfg, ctx.data, 16, notes)
    ctx.report.add_pass(
        "quantize/dynamic", time.perf_counter() - start, folded_bn=folded, bias_corrected=corrected,
        **_summary(plans, cfg, notes),
    )  # fmt: skip
    return model


@register(StaticQuantConfig)
def static(model: nn.Module, cfg: StaticQuantConfig, ctx: Context) -> nn.Module:
    start = time.perf_counter()
    if ctx.data is None:
        raise DataError("static quantization needs calibration data: pass data=... (CLI: --data) or use a zoo model")
    folded = fold_conv_bn(model, first_batch(ctx.data)) if cfg.fold_bn else []
    act = ActSpec(mode="static", bits=8, symmetric=cfg.act_symmetric)
    plans = plan_layers(model, cfg, act, ctx)
    dynamic_pat = [re.compile(p) for p in cfg.dynamic_layers]
    for p in plans:
        if not isinstance(p.module, nn.Embedding) and any(d.search(p.name) for d in dynamic_pat):
            p.act = ActSpec(mode="dynamic", bits=8, symmetric=cfg.act_symmetric, granularity="token")
    static_plans = [p for p in plans if p.act.mode == "static"]
    n = (
        calibrate(model, static_plans, ctx.data, cfg.observer, act.scheme, cfg.calibration_batches, ctx)
        if static_plans
        else 0
    )
    notes: list[str] = []
    corrected = _swap_corrected(model, plans, cfg, ctx.data, cfg.calibration_batches, notes)
    ctx.report.add_pass(
        "quantize/static",
        time.perf_counter() - start,
        folded_bn=folded,
        bias_corrected=corrected,
        calibration_batches=n,
        observer=cfg.observer.kind,
        **_summary(plans, cfg, notes),
    )
    return model


PTQConfig = WeightOnlyConfig | DynamicQuantConfig | StaticQuantConfig


def quantize(
    model: nn.Module,
    config: PTQConfig,
    data: Iterable[Any] | None = None,
    ctx: Context | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Quantize `model` with `config`; returns a new model (the input is untouched unless `inplace`).

    `data` is an iterable of input batches (tuple = positional args) for calibration.

        >>> qmodel = quantize(model, StaticQuantConfig(), data=entry.calibration_data(64))
    """
    if not isinstance(model, nn.Module):
        raise BadInputError(f"quantize() needs a torch.nn.Module, got {type(model).__name__}")
    model, ctx = _begin(model, ctx, inplace)
    if data is not None:
        ctx.data = data
    with ctx.threads_scope():
        return apply(model, config, ctx)
