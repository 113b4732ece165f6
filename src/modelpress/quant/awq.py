"""AWQ weight-only quantization: activation-aware scales folded into the model, then group-wise rounding.

Per transformer block (`primitives.sequential`): the inputs of each selected Linear are sampled while the
block runs; for every set of layers that read one op's output, a per-input-channel scale `s` is
searched (`primitives.awq.search_scale`) and folded in exactly: the layers' weight columns are
multiplied by `s` and the producing op's output divided by `s`:

- a LayerNorm / RMSNorm: its weight (and bias) divided by `s`;
- a Linear: its weight rows (and bias) divided by `s`.

This is only exact when the producer's output feeds nothing but these layers, which holds in pre-norm
decoders (Llama: input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, v -> o, up -> down;
GPT-2: ln_1 -> c_attn, ln_2 -> c_fc; Phi-3, OPT, Gemma 2/3, and Phi / Falcon, whose one norm feeds
attention and MLP in parallel; Gemma's `x * (1 + w)` norm folds into `1 + w`). In post-norm encoders
(BERT) the LayerNorm output is also the residual stream, and `output.dense` reads a GELU: only value ->
attention.output.dense is foldable, the other layers keep `s = 1` (with a warning). Every fold is checked:
the float block must compute the same output afterwards, else it is undone (and the next candidate of that
producer tried). Each layer is then rounded with the per-group clipping range that minimises its output
error (`clip=True`).

    >>> qmodel = quantize(model, AWQConfig(bits=4, group_size=128), data=entry.calibration_data(128))
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from modelpress.core.config import Config, check_at_most
from modelpress.core.context import Context
from modelpress.core.errors import ConfigError
from modelpress.core.modules import set_submodule
from modelpress.core.registry import register
from modelpress.primitives.affine import QuantScheme
from modelpress.primitives.awq import search_clip, search_scale
from modelpress.primitives.sequential import Scope, run_sequential
from modelpress.quant.gptq import (
    DEFAULT_LAYERS,
    embedded_tables,
    prepare_calibrated,
    validate_weight_settings,
    weight_scheme,
)
from modelpress.quant.modules import ActSpec, QLinear
from modelpress.quant.ptq import LayerFilter, check_embedding_bits, check_layer_bits
from modelpress.quant.smoothquant import is_output_norm, scale_norm_output

# (producer, consumers) paths inside one block whose scale can be folded. Per producer the first entry whose
# modules exist and whose fold leaves the block's output unchanged is used (parallel blocks list every reader).
FOLDABLE: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Phi, Falcon: attention and MLP read one norm in parallel
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1")),
    ("input_layernorm", ("self_attention.query_key_value", "mlp.dense_h_to_4h")),
    # Llama, Mistral, Qwen2/3, Gemma (pre-norm decoders)
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.o_proj",)),
    ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),  # Gemma 2/3
    ("mlp.up_proj", ("mlp.down_proj",)),
    # Phi-3 (fused q/k/v and gate/up), Falcon, Phi
    ("input_layernorm", ("self_attn.qkv_proj",)),
    ("post_attention_layernorm", ("mlp.gate_up_proj",)),
    ("input_layernorm", ("self_attention.query_key_value",)),
    ("post_attention_layernorm", ("mlp.dense_h_to_4h",)),
    ("ln_attn", ("self_attention.query_key_value",)),
    ("ln_mlp", ("mlp.dense_h_to_4h",)),
    ("self_attn.v_proj", ("self_attn.dense",)),
    # OPT (pre-norm where do_layer_norm_before)
    ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("self_attn.v_proj", ("self_attn.out_proj",)),
    ("final_layer_norm", ("fc1",)),
    # GPT-2 (pre-norm; Conv1D turned into Linear)
    ("ln_1", ("attn.c_attn",)),
    ("ln_2", ("mlp.c_fc",)),
    # BERT (post-norm: only value -> output projection, attention being linear in V)
    ("attention.self.value", ("attention.output.dense",)),
)
MAX_AWQ_GRID = 1000  # a finer alpha grid only multiplies the search time
FOLD_RTOL = 1e-3  # relative output change of the float block above which a fold is undone


@dataclass(frozen=True)
class AWQConfig(Config):
    """AWQ weight-only quantization; `group_size=0` gives one scale per output channel (no clipping)."""

    stage = "quantize"

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    n_grid: int = 20  # alpha in {0, 1/n_grid, ..., 1 - 1/n_grid}
    clip: bool = True
    max_shrink: float = 0.5  # clipping search shrinks each group's range by at most this fraction
    max_tokens: int = 4096  # calibration tokens kept per layer for the searches
    calibration_batches: int = 32
    layers: LayerFilter = DEFAULT_LAYERS
    # the embedding table as integers too (symmetric, per group of a row), and a head tied to it with the same codes
    embedding_bits: int | None = None
    embedding_group_size: int | None = None

    # bits of single layers: regular expression on the layer name -> bits (the first that matches wins),
    # e.g. {"lm_head$": 8}; mixed precision promotes its sensitive layers here
    layer_bits: dict[str, int] = field(default_factory=dict)

    def validate(self) -> None:
        check_layer_bits(self.layer_bits)
        validate_weight_settings(self.bits, self.group_size, self.calibration_batches)
        check_embedding_bits(self.embedding_bits, self.embedding_group_size)
        if self.n_grid < 1:
            raise ConfigError(f"n_grid must be >= 1, got {self.n_grid}")
        check_at_most(self, "n_grid", MAX_AWQ_GRID, "candidate scales searched per layer")
        if not 0 <= self.max_shrink < 1:
            raise ConfigError(f"max_shrink must be in [0, 1), got {self.max_shrink}")
        if self.max_tokens < 16:
            raise ConfigError(f"max_tokens must be >= 16, got {self.max_tokens}")

    def weight_scheme(self, bits: int | None = None) -> QuantScheme:
        return weight_scheme(self.bits if bits is None else bits, self.symmetric, self.group_size)


class _InputSampler:
    """Inputs of one layer: evenly spaced tokens of each call (at most `per_call`), and mean |x| over all."""

    def __init__(self, per_call: int) -> None:
        self.per_call = per_call
        self.rows: list[torch.Tensor] = []
        self.abs_sum: torch.Tensor | None = None
        self.count = 0

    def __call__(self, _m: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (T, K)
        self.abs_sum = x.abs().sum(0) if self.abs_sum is None else self.abs_sum + x.abs().sum(0)
        self.count += x.shape[0]
        if x.shape[0] > self.per_call:
            x = x[torch.linspace(0, x.shape[0] - 1, self.per_call).long()]
        self.rows.append(x)

    def inputs(self) -> torch.Tensor:
        return torch.cat(self.rows)

    def magnitude(self) -> torch.Tensor:
        assert self.abs_sum is not None
        return self.abs_sum / max(self.count, 1)


def _groups(scope: Scope) -> list[tuple[str, nn.Module, list[list[str]]]]:
    """(producer name, producer, candidate consumer lists in table order) of the foldable pairs in `scope`."""
    found: dict[str, tuple[str, nn.Module, list[list[str]]]] = {}
    for base, module in scope.module.named_modules():
        for producer_path, consumer_paths in FOLDABLE:
            if is_output_norm(module, producer_path):
                continue
            try:
                producer = module.get_submodule(producer_path)
                consumers = [module.get_submodule(p) for p in consumer_paths]
            except AttributeError:
                continue
            prefix = ".".join(p for p in (scope.name, base) if p)
            names = [f"{prefix}.{p}" if prefix else p for p in consumer_paths]
            if all(isinstance(c, nn.Linear) for c in consumers) and all(n in scope.layers for n in names):
                key = f"{prefix}.{producer_path}" if prefix else producer_path
                found.setdefault(key, (key, producer, []))[2].append(names)
    return list(found.values())


def _fold(producer: nn.Module, consumers: list[nn.Linear], s: torch.Tensor) -> bool:
    """Divide the producer's output by `s` and multiply the consumers' input columns by `s`; False if impossible."""
    k = s.numel()
    if isinstance(producer, nn.Linear):
        if producer.out_features != k:
            return False
        targets = [producer.weight.view(k, -1)] + ([producer.bias] if producer.bias is not None else [])
    else:  # LayerNorm / RMSNorm: an elementwise affine weight (and bias) of shape (K,)
        weight = getattr(producer, "weight", None)
        bias = getattr(producer, "bias", None)
        if not isinstance(weight, torch.Tensor) or weight.shape != (k,):
            return False
        if isinstance(bias, torch.Tensor) and bias.shape != (k,):
            return False
        targets = []
        scale_norm_output(producer, s)  # Gemma's x * (1 + w) too
    with torch.no_grad():
        for t in targets:
            t.div_(s.view(-1, *([1] * (t.dim() - 1))).to(t.dtype))
        for c in consumers:
            c.weight.mul_(s.to(c.weight.dtype))
    return True


def _same(before: list[torch.Tensor], after: list[torch.Tensor]) -> bool:
    for a, b in zip(before, after, strict=True):
        if (a - b).abs().max() > FOLD_RTOL * max(1.0, float(a.abs().max())):
            return False
    return True


def _try_fold(
    scope: Scope,
    producer: nn.Module,
    names: list[str],
    inputs: dict[str, torch.Tensor],
    samplers: dict[str, _InputSampler],
    reference: list[torch.Tensor],
    scheme_of: Any,
    n_grid: int,
) -> Any:
    """Search the scale of `names` and fold it into `producer`: the search result, or why it was undone."""
    layers = [scope.layers[n] for n in names]
    # Consumers of one producer share their input; the bits of the first decide the search.
    stacked = torch.cat([layer.weight.detach().float() for layer in layers])  # (sum N, K)
    res = search_scale(stacked, inputs[names[0]], scheme_of(names[0]), samplers[names[0]].magnitude(), n_grid)
    saved = copy.deepcopy(scope.module.state_dict())
    if not _fold(producer, layers, res.scale):
        return f"cannot fold a scale into {{producer}}; {', '.join(names)} not scaled"
    if not _same(reference, scope.forward()):
        scope.module.load_state_dict(saved)
        return f"folding into {{producer}} changes the output; {', '.join(names)} not scaled"
    return res


@register(AWQConfig)
def awq(model: nn.Module, cfg: AWQConfig, ctx: Context) -> nn.Module:
    start = time.perf_counter()
    prep = prepare_calibrated(model, cfg, ctx, "AWQ")
    batches, converted, scheme_of, selected = prep.batches, prep.converted, prep.scheme_of, prep.selected
    per_call = max(1, cfg.max_tokens // len(batches))
    alphas: dict[str, float] = {}
    gains: dict[str, float] = {}  # output MSE with the chosen scale / with s = 1
    unscaled: list[str] = []

    def quantize_scope(scope: Scope) -> None:
        samplers = {n: _InputSampler(per_call) for n in scope.layers}
        handles = [layer.register_forward_pre_hook(samplers[n]) for n, layer in scope.layers.items()]
        try:
            reference = scope.forward()
        finally:
            for h in handles:
                h.remove()
        seen = {n for n, s in samplers.items() if s.count}
        for n in sorted(set(scope.layers) - seen):
            ctx.warn(f"skipped {n}: it never ran on the calibration data (kept in float)")
        inputs = {n: samplers[n].inputs() for n in seen}
        scaled: set[str] = set()
        for producer_name, producer, candidates in _groups(scope):
            why = None
            for names in candidates:  # the first that folds exactly wins
                if not all(n in seen for n in names) or scaled.intersection(names):
                    continue
                why = _try_fold(scope, producer, names, inputs, samplers, reference, scheme_of, cfg.n_grid)
                if isinstance(why, str):
                    continue
                for n in names:
                    inputs[n] = inputs[n] / why.scale
                    alphas[n] = why.alpha
                    gains[n] = why.error / why.rtn_error if why.rtn_error > 0 else 1.0
                scaled.update(names)
                break
            if isinstance(why, str):
                ctx.warn(f"AWQ: {why.format(producer=producer_name)}")
        unscaled.extend(n for n in scope.layers if n in seen and n not in scaled)
        for n in sorted(seen):
            layer, scheme = scope.layers[n], scheme_of(n)
            weight_range = None
            if cfg.clip and scheme.granularity == "group":
                weight_range = search_clip(layer.weight, inputs[n], scheme, cfg.n_grid, cfg.max_shrink)
            q = QLinear(layer.weight, layer.bias, scheme, ActSpec(), weight_range=weight_range)
            set_submodule(model, n, q)

    stats = run_sequential(model, batches, selected, quantize_scope, ctx, "AWQ")
    if unscaled:
        shown = ", ".join(unscaled[:4]) + (f" and {len(unscaled) - 4} more" if len(unscaled) > 4 else "")
        ctx.warn(f"AWQ: no foldable op in front of {len(unscaled)} layer(s) ({shown}); rounded without scaling")
    ctx.report.add_pass(
        "quantize/awq",
        time.perf_counter() - start,
        layers=len(selected),
        bits={n: scheme_of(n).bits for n in selected},
        group_size=cfg.group_size,
        alpha=alphas,
        mse_vs_rtn=gains,
        unscaled=unscaled,
        conv1d_converted=converted,
        embeddings=embedded_tables(model, cfg, ctx),
        **stats,
    )
    return model
