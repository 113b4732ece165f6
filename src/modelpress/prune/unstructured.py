"""Unstructured and N:M sparsity: zero individual weights by importance, one-shot or on a schedule.

    >>> model = prune(model, UnstructuredPruneConfig(sparsity=0.8))                      # one-shot magnitude
    >>> model = prune(model, UnstructuredPruneConfig(sparsity=0.8, scope="global",
    ...               schedule=PolynomialSchedule(steps=300, frequency=20)))             # gradual, while training
    >>> model = prune(model, NMPruneConfig(n=2, m=4))                                    # 2 of every 4 kept
    >>> save_sparse(model, "model.sparse.safetensors")                                   # bitmask + values

Masks stay applied through fine-tuning (`prune.masking`) and are made permanent at the end
(`permanent=False` keeps them as parametrizations for further training). The model keeps its
shape; the saved artifact shrinks with `save_sparse`. N:M masks run along each layer's input
dim (a conv's `in * kh * kw`); layers whose input width is not a multiple of `m` are skipped
with a warning.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from modelpress.core.config import MAX_EPOCHS, Config, check_at_most, check_regex, check_seed
from modelpress.core.context import Context
from modelpress.core.errors import ConfigError, DataError
from modelpress.core.layer_filter import LayerFilter
from modelpress.core.modules import count_params, first_batch
from modelpress.core.registry import register
from modelpress.primitives.masks import global_rate_masks, nm_mask, rate_mask, threshold_mask
from modelpress.prune.gradients import collect_gradients
from modelpress.prune.importance import IMPORTANCE_KINDS, NEEDS_GRADIENT, ImportanceKind, element_scores
from modelpress.prune.layers import weight_layers
from modelpress.prune.masking import GradualPruner, get_mask, make_permanent, set_mask
from modelpress.prune.recovery import finetune
from modelpress.prune.schedule import PolynomialSchedule, check_final
from modelpress.prune.stats import layer_flops, layer_sparsity


def check_sparsity(value: float, field: str = "sparsity") -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{field} must be in [0, 1), got {value} (1 would remove every weight)")


def check_importance(kind: str, allowed: tuple[str, ...] = IMPORTANCE_KINDS) -> None:
    if kind not in allowed:
        raise ConfigError(f"importance must be one of {', '.join(allowed)}, got {kind!r}")


@dataclass(frozen=True)
class UnstructuredPruneConfig(Config):
    """Zero the least important `sparsity` of the weights of every selected Linear / Conv layer.

    `scope="global"` ranks all layers' scores together (one rate overall, per-layer rates vary);
    `threshold` prunes scores at or below a value instead of a rate (one-shot only).
    """

    stage = "prune"

    sparsity: float = 0.5
    importance: ImportanceKind = "magnitude"
    scope: Literal["layer", "global"] = "layer"
    threshold: float | None = None
    schedule: PolynomialSchedule | None = None  # None: one-shot
    layers: LayerFilter = LayerFilter()
    importance_batches: int = 8  # batches of data for gradient / Taylor scores
    finetune_epochs: int = 0  # recovery epochs after one-shot pruning (schedules always train)
    permanent: bool = True
    seed: int = 0  # random importance
    # sparsity of single layers (one-shot, layer scope): regular expression on the layer name -> sparsity
    # (the first that matches wins); the others get `sparsity`
    layer_sparsity: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        check_sparsity(self.sparsity)
        for pattern, rate in self.layer_sparsity.items():
            check_regex(pattern, "layer_sparsity")
            check_sparsity(rate)
        if self.layer_sparsity and (self.scope != "layer" or self.schedule is not None or self.threshold is not None):
            raise ConfigError(
                "layer_sparsity sets one-shot rates per layer: it needs scope 'layer', no schedule and no threshold"
            )
        check_importance(self.importance)
        if self.scope not in ("layer", "global"):
            raise ConfigError(f"scope must be 'layer' or 'global', got {self.scope!r}")
        if self.threshold is not None and self.threshold < 0:
            raise ConfigError(f"threshold must be >= 0, got {self.threshold}")
        if self.threshold is not None and self.schedule is not None:
            raise ConfigError("threshold selection is one-shot; give a sparsity for a schedule")
        if self.importance == "movement" and self.schedule is None:
            raise ConfigError("movement importance accumulates during training: it needs a schedule")
        if self.schedule is not None:
            check_final(self.schedule.initial_sparsity, self.sparsity)
        if self.importance_batches < 1:
            raise ConfigError(f"importance_batches must be >= 1, got {self.importance_batches}")
        if self.finetune_epochs < 0:
            raise ConfigError(f"finetune_epochs must be >= 0, got {self.finetune_epochs}")
        check_at_most(self, "finetune_epochs", MAX_EPOCHS, "training epochs")
        check_seed(self)


@dataclass(frozen=True)
class NMPruneConfig(Config):
    """Semi-structured N:M sparsity: `n` weights kept in every `m` consecutive inputs (2:4 by default)."""

    stage = "prune"

    n: int = 2
    m: int = 4
    importance: Literal["magnitude", "gradient", "taylor", "random"] = "magnitude"
    layers: LayerFilter = LayerFilter()
    importance_batches: int = 8
    finetune_epochs: int = 0
    permanent: bool = True
    seed: int = 0

    def validate(self) -> None:
        if not 0 < self.n < self.m:
            raise ConfigError(f"N:M sparsity needs 0 < n < m, got n={self.n}, m={self.m}")
        if self.m > 64:
            raise ConfigError(f"m must be <= 64, got {self.m}")
        check_importance(self.importance, ("magnitude", "gradient", "taylor", "random"))
        if self.importance_batches < 1:
            raise ConfigError(f"importance_batches must be >= 1, got {self.importance_batches}")
        if self.finetune_epochs < 0:
            raise ConfigError(f"finetune_epochs must be >= 0, got {self.finetune_epochs}")
        check_at_most(self, "finetune_epochs", MAX_EPOCHS, "training epochs")
        check_seed(self)


# ---------------------------------------------------------------- scores and masks


def layer_scores(
    layers: dict[str, nn.Module],
    kind: str,
    grads: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """{layer: element scores of its (effective) weight}."""
    grads = grads or {}
    return {
        name: element_scores(kind, m.weight, grads.get(name), seed=seed + i)
        for i, (name, m) in enumerate(layers.items())
    }


def rate_masks(scores: dict[str, torch.Tensor], sparsity: float, scope: str) -> dict[str, torch.Tensor]:
    """Keep-masks at `sparsity`, per layer or with one global ranking."""
    if scope == "global":
        return global_rate_masks(scores, sparsity)
    return {name: rate_mask(s, sparsity) for name, s in scores.items()}


def _nm_layer_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    flat = scores.reshape(scores.shape[0], -1)  # (out, in * kh * kw)
    return nm_mask(flat, n, m).view(scores.shape)


def _gradients(model: nn.Module, layers: dict[str, nn.Module], cfg: Any, ctx: Context):
    if cfg.importance not in NEEDS_GRADIENT:
        return None
    from modelpress.prune.masking import original_weight

    params = {name: original_weight(m) for name, m in layers.items()}
    return collect_gradients(model, params, ctx.data, ctx.loss_fn, cfg.importance_batches)


def sparsity_for(cfg: UnstructuredPruneConfig, name: str) -> float:
    """The sparsity `cfg` gives the layer called `name`: its first `layer_sparsity` pattern that matches, else
    `sparsity`."""
    for pattern, rate in cfg.layer_sparsity.items():
        if re.search(pattern, name):
            return rate
    return cfg.sparsity


def sparsity_stats(model: nn.Module, layers: dict[str, nn.Module], ctx: Context, target: float | str) -> dict[str, Any]:
    from modelpress.prune.masking import original_weight

    params, nonzero = count_params(model)
    with torch.no_grad():
        for m in layers.values():  # masks kept: count the effective (masked) weights, not the originals
            if get_mask(m) is not None:
                nonzero -= int(original_weight(m).count_nonzero()) - int(m.weight.count_nonzero())
    per_layer = {k: v for k, v in layer_sparsity(model).items() if k in layers}
    pruned = sum(int((m.weight == 0).sum()) for m in layers.values())
    total = sum(m.weight.numel() for m in layers.values())
    stats: dict[str, Any] = {
        "target": target,
        "sparsity": round(pruned / max(total, 1), 4),
        "layer_sparsity": per_layer,
        "params": params,
        "nonzero_params": nonzero,
    }
    batch = first_batch(ctx.data)
    if batch is not None:
        per_layer_flops = layer_flops(model, batch)
        dense = sum(per_layer_flops.values())
        stats["layer_flops_dense"] = dense
        # What a sparse kernel would execute: each layer's FLOPs scaled by its density.
        stats["layer_flops_nonzero"] = int(sum(f * (1.0 - per_layer.get(n, 0.0)) for n, f in per_layer_flops.items()))
    return stats


# ---------------------------------------------------------------- handlers


@register(UnstructuredPruneConfig)
def prune_unstructured(
    model: nn.Module,
    cfg: UnstructuredPruneConfig,
    ctx: Context,
) -> nn.Module:
    """Mask weights one-shot (then optional fine-tuning) or gradually while `ctx.train_fn` trains."""
    start = time.perf_counter()
    layers = weight_layers(model, cfg.layers, ctx)

    params_before, nonzero_before = count_params(model)
    extra: dict[str, Any] = {}
    if cfg.schedule is None:
        grads = _gradients(model, layers, cfg, ctx)
        scores = layer_scores(layers, cfg.importance, grads, cfg.seed)
        if cfg.threshold is not None:
            masks = {n: threshold_mask(s, cfg.threshold) for n, s in scores.items()}
        elif cfg.layer_sparsity:
            masks = {n: rate_mask(s, sparsity_for(cfg, n)) for n, s in scores.items()}
        else:
            masks = rate_masks(scores, cfg.sparsity, cfg.scope)
        with torch.no_grad():
            for name, m in layers.items():
                set_mask(m, masks[name])
        if cfg.finetune_epochs > 0:
            model, extra["finetuned"] = finetune(model, ctx, cfg.finetune_epochs, "pruning recovery")
    else:
        if ctx.train_fn is None:
            raise DataError(
                "gradual pruning prunes while the model trains: it needs a training loop "
                "(a zoo model with training data, or Context(train_fn=...)); drop `schedule` for one-shot pruning"
            )
        grads = _gradients(model, layers, cfg, ctx) if cfg.importance in NEEDS_GRADIENT else None
        pruner = GradualPruner(
            model,
            layers,
            cfg.schedule,
            cfg.sparsity,
            cfg.importance,
            lambda s, rate: rate_masks(s, rate, cfg.scope),
            cfg.seed,
            grads,
        ).attach()
        try:
            model, _ = finetune(model, ctx, max(cfg.finetune_epochs, 1), "gradual pruning")
        finally:
            pruner.detach()
        needed = cfg.schedule.begin_step + cfg.schedule.steps
        if pruner.current < cfg.sparsity:
            ctx.warn(
                f"the training loop ran {pruner.step} steps, the schedule needs {needed}: "
                f"pruned from {pruner.current:.3f} to the final {cfg.sparsity} at the end, without recovery"
            )
            pruner.update(cfg.sparsity)
        extra["schedule"] = {"steps_run": pruner.step, "updates": pruner.history}
    if cfg.permanent:
        make_permanent(model)
    stats = sparsity_stats(model, layers, ctx, cfg.sparsity if cfg.threshold is None else f"threshold {cfg.threshold}")
    stats.update(params_before=params_before, nonzero_before=nonzero_before, importance=cfg.importance, **extra)
    ctx.report.add_pass("prune/unstructured", time.perf_counter() - start, **stats)
    return model


@register(NMPruneConfig)
def prune_nm(
    model: nn.Module,
    cfg: NMPruneConfig,
    ctx: Context,
) -> nn.Module:
    """Apply an N:M mask to every selected layer whose input width is a multiple of `m`."""
    start = time.perf_counter()
    layers = weight_layers(model, cfg.layers, ctx)
    fits = {}
    for name, m in layers.items():
        width = m.weight[0].numel()
        if width % cfg.m:
            ctx.warn(f"skipped {name}: input width {width} is not a multiple of m={cfg.m} for {cfg.n}:{cfg.m}")
        else:
            fits[name] = m
    if not fits:
        raise ConfigError(f"no selected layer has an input width that is a multiple of m={cfg.m}")
    grads = _gradients(model, fits, cfg, ctx)
    scores = layer_scores(fits, cfg.importance, grads, cfg.seed)
    with torch.no_grad():
        for name, m in fits.items():
            keep = _nm_layer_mask(scores[name], cfg.n, cfg.m)
            old = get_mask(m)
            set_mask(m, keep if old is None else keep & old)
    extra: dict[str, Any] = {}
    if cfg.finetune_epochs > 0:
        model, extra["finetuned"] = finetune(model, ctx, cfg.finetune_epochs, "N:M pruning recovery")
    if cfg.permanent:
        make_permanent(model)
    stats = sparsity_stats(model, fits, ctx, f"{cfg.n}:{cfg.m}")
    ctx.report.add_pass("prune/nm", time.perf_counter() - start, pattern=f"{cfg.n}:{cfg.m}", **stats, **extra)
    return model
