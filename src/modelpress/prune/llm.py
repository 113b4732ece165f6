"""Pruning large language models in one shot, block by block: SparseGPT and Wanda.

Magnitude pruning breaks a language model at 50% sparsity; these two keep it usable without retraining
by looking at what each layer's inputs are on calibration text (`primitives.sparsegpt`):

- `SparseGPTConfig`: the pruned weights' error is compensated on the weights kept (a second-order
  update through the inverse Hessian of the layer's inputs, as GPTQ does for rounding);
- `WandaConfig`: weights scored by `|w| * ||x||` and the lowest of each output row pruned, nothing
  updated (faster, no Hessian).

Both run sequentially (`primitives.sequential`): each block is pruned on the outputs of the blocks before
it *as pruned*, so peak memory is the model plus one block's activations. `sparsity` prunes a rate of
every row; `n`/`m` give N:M semi-structured sparsity (2:4: two kept in every four inputs). The output
head (`lm_head`, often tied to the embeddings) is kept dense by default. The result is the same model
with zeros in its Linear weights.

    >>> model = prune(model, SparseGPTConfig(sparsity=0.5), data=entry.calibration_data(64))
    >>> model = prune(model, WandaConfig(n=2, m=4), data=batches)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelpress.core.config import Config, check_at_most
from modelpress.core.context import Context
from modelpress.core.errors import ConfigError
from modelpress.core.layer_filter import LayerFilter
from modelpress.core.modules import count_params
from modelpress.core.registry import register
from modelpress.primitives.gptq import hessian_update
from modelpress.primitives.sequential import (
    DEFAULT_LAYERS,
    Scope,
    calibration_batches,
    convert_conv1d,
    observe_inputs,
    run_sequential,
    selected_linears,
)
from modelpress.primitives.sparsegpt import check_pattern, column_sq_norms, sparsegpt_prune, wanda_prune
from modelpress.prune.unstructured import sparsity_stats

MAX_CALIBRATION_BATCHES = 4096


@dataclass(frozen=True)
class SparseGPTConfig(Config):
    """SparseGPT: prune `sparsity` of every row (or `n` of every `m` inputs) and update the kept weights."""

    stage = "prune"

    sparsity: float = 0.5
    n: int = 0  # N:M pattern when n and m are given (`sparsity` is then not used)
    m: int = 0
    block_size: int = 128  # columns whose mask is chosen together
    damp: float = 0.01
    calibration_batches: int = 32
    layers: LayerFilter = DEFAULT_LAYERS

    def validate(self) -> None:
        check_pattern(self.sparsity, self.n, self.m)
        if self.block_size < 1 or (self.m and self.block_size % self.m):
            raise ConfigError(f"block_size must be >= 1 and a multiple of m, got {self.block_size}")
        if not 0 < self.damp <= 1:
            raise ConfigError(f"damp must be in (0, 1], got {self.damp}")
        check_batches(self)


@dataclass(frozen=True)
class WandaConfig(Config):
    """Wanda: prune the lowest `|w| * ||x||` of every row (or `n` of every `m` inputs); kept weights unchanged."""

    stage = "prune"

    sparsity: float = 0.5
    n: int = 0
    m: int = 0
    calibration_batches: int = 32
    layers: LayerFilter = DEFAULT_LAYERS

    def validate(self) -> None:
        check_pattern(self.sparsity, self.n, self.m)
        check_batches(self)


def check_batches(cfg: Any) -> None:
    if cfg.calibration_batches < 1:
        raise ConfigError(f"calibration_batches must be >= 1, got {cfg.calibration_batches}")
    check_at_most(cfg, "calibration_batches", MAX_CALIBRATION_BATCHES, "calibration batches")


def _fits(selected: dict[str, nn.Linear], m: int, ctx: Context, label: str) -> dict[str, nn.Linear]:
    """The layers an N:M pattern fits (input width a multiple of m); the others are warned about."""
    if not m:
        return selected
    fits = {}
    for name, layer in selected.items():
        if layer.in_features % m:
            ctx.warn(f"skipped {name}: {label} N:M needs an input width that is a multiple of m={m}, "
                     f"got {layer.in_features} (kept dense)")  # fmt: skip
        else:
            fits[name] = layer
    if not fits:
        raise ConfigError(f"no selected layer has an input width that is a multiple of m={m}")
    return fits


def _run_pass(model: nn.Module, cfg: Any, ctx: Context, label: str, kind: str, prune_scope: Callable) -> nn.Module:
    """Shared frame of both passes: calibration data, the layers, sequential pruning, statistics."""
    start = time.perf_counter()
    batches = calibration_batches(ctx, cfg.calibration_batches, label)
    converted = convert_conv1d(model)
    layers = _fits(selected_linears(model, cfg.layers, ctx, label, kept="kept dense"), cfg.m, ctx, label)
    params_before, nonzero_before = count_params(model)
    extra: dict[str, Any] = {}
    stats = run_sequential(model, batches, layers, lambda scope: prune_scope(scope, extra), ctx, label)
    target = f"{cfg.n}:{cfg.m}" if cfg.m else cfg.sparsity
    pruned_layers = {n: model.get_submodule(n) for n in layers}
    summary = sparsity_stats(model, pruned_layers, ctx, target)
    summary.update(params_before=params_before, nonzero_before=nonzero_before, conv1d_converted=converted,
                   **stats, **extra)  # fmt: skip
    ctx.report.add_pass(kind, time.perf_counter() - start, **summary)
    return model


@register(SparseGPTConfig)
def prune_sparsegpt(model: nn.Module, cfg: SparseGPTConfig, ctx: Context) -> nn.Module:
    def prune_scope(scope: Scope, extra: dict[str, Any]) -> None:
        hessians = observe_inputs(scope, lambda acc, x: hessian_update(*(acc or (None, 0)), x))
        losses = extra.setdefault("loss", {})
        for name, layer in scope.layers.items():
            if hessians[name] is None or hessians[name][1] == 0:
                ctx.warn(f"skipped {name}: it never ran on the calibration data (kept dense)")
                continue
            res = sparsegpt_prune(layer.weight, hessians[name][0], sparsity=cfg.sparsity, n=cfg.n, m=cfg.m,
                                  block_size=cfg.block_size, damp=cfg.damp)  # fmt: skip
            for note in res.notes:
                ctx.warn(f"SparseGPT {name}: {note}")
            with torch.no_grad():
                layer.weight.copy_(res.weight)
            losses[name] = res.loss

    return _run_pass(model, cfg, ctx, "SparseGPT", "prune/sparsegpt", prune_scope)


@register(WandaConfig)
def prune_wanda(model: nn.Module, cfg: WandaConfig, ctx: Context) -> nn.Module:
    def prune_scope(scope: Scope, _extra: dict[str, Any]) -> None:
        norms = observe_inputs(scope, column_sq_norms)
        for name, layer in scope.layers.items():
            if norms[name] is None:
                ctx.warn(f"skipped {name}: it never ran on the calibration data (kept dense)")
                continue
            with torch.no_grad():
                layer.weight.copy_(wanda_prune(layer.weight, norms[name], sparsity=cfg.sparsity, n=cfg.n, m=cfg.m))

    return _run_pass(model, cfg, ctx, "Wanda", "prune/wanda", prune_scope)
