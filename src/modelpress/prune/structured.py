"""Structured pruning: remove whole channels, attention heads and FFN neurons; the model gets smaller.

    >>> model = prune(model, StructuredPruneConfig(channel_ratio=0.5), data=batches)   # CNN channels
    >>> model = prune(encoder, StructuredPruneConfig(heads_ratio=1/3, ffn_ratio=0.5))   # BERT / Llama blocks

`channel_ratio` cuts every group of coupled channels found by tracing (`prune.graph`): a conv's
output channels with the BatchNorm after it and the input channels of every layer reading them,
across residual additions, concatenations and flattens. A model `torch.fx` cannot trace whole (Hugging
Face models: data-dependent checks, mask construction) is traced sub-module by sub-module
(`graph.submodules`): the channels inside each part that traces are cut, and the FFN neurons of its
recognized transformer blocks (an FFN's intermediate width is its channel group). `heads_ratio` and
`ffn_ratio` cut recognized transformer blocks (`prune.blocks`), which need no tracing; with
`importance: activation` they are scored on the calibration data (what each unit writes into the residual
stream). Every layer keeps at least one channel, head and neuron; `exclude` (regexes on module names)
keeps modules whole. The tensors are cut physically, so parameters, FLOPs and latency drop; a Llama-style
model's config follows (`num_attention_heads`, `num_key_value_heads`, `intermediate_size`), so it saves
and reloads at its new size; `finetune_epochs` runs the context's training loop to recover.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from modelpress.core.config import MAX_EPOCHS, Config, check_at_most, check_regex, check_seed
from modelpress.core.context import Context
from modelpress.core.errors import BadInputError, ConfigError, DataError, ModelpressError
from modelpress.core.modules import first_batch
from modelpress.core.registry import register
from modelpress.primitives.masks import channel_keep
from modelpress.primitives.width import sync_config
from modelpress.prune.blocks import (
    activation_plans,
    find_ffns,
    head_blocks,
    n_prune,
    no_blocks_error,
    plan,
    untraced_ffns,
)
from modelpress.prune.gradients import collect_gradients
from modelpress.prune.graph.handlers import channel_tensors, cut_in, cut_out
from modelpress.prune.graph.parts import build_graph_by_parts
from modelpress.prune.graph.trace import DependencyGraph, build_graph
from modelpress.prune.importance import NEEDS_GRADIENT, channel_scores
from modelpress.prune.layers import check_patterns
from modelpress.prune.masking import make_permanent
from modelpress.prune.recovery import finetune
from modelpress.prune.stats import eval_mode, model_summary
from modelpress.prune.unstructured import check_importance

# Reasons that are part of a model's contract, not a limitation worth a warning.
_EXPECTED = ("reaches the model output", "excluded module")


@dataclass(frozen=True)
class StructuredPruneConfig(Config):
    """Remove a fraction of channels (`channel_ratio`), attention heads and FFN neurons from every layer."""

    stage = "prune"

    channel_ratio: float = 0.0  # of each group of coupled channels (traced graph)
    heads_ratio: float = 0.0  # of each attention layer's heads (K/V head groups for grouped-query attention)
    ffn_ratio: float = 0.0  # of each FFN's intermediate neurons
    # activation: heads and FFN neurons scored on calibration data (|W| x ||x|| of the output projection's columns)
    importance: Literal["magnitude", "gradient", "taylor", "random", "activation"] = "magnitude"
    norm: Literal["l1", "l2"] = "l2"
    exclude: tuple[str, ...] = ()  # regexes on module names: kept whole
    round_to: int = 1  # kept channels / neurons rounded up to a multiple (e.g. 8 for SIMD-friendly widths)
    importance_batches: int = 8
    finetune_epochs: int = 0
    seed: int = 0

    def validate(self) -> None:
        for field in ("channel_ratio", "heads_ratio", "ffn_ratio"):
            value = getattr(self, field)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{field} must be in [0, 1), got {value} (1 would remove a whole layer)")
        if not (self.channel_ratio or self.heads_ratio or self.ffn_ratio):
            raise ConfigError("set channel_ratio, heads_ratio or ffn_ratio above 0: nothing would be pruned")
        check_importance(self.importance, ("magnitude", "gradient", "taylor", "random", "activation"))
        if self.importance == "activation" and self.channel_ratio:
            raise ConfigError(
                "importance 'activation' scores attention heads and FFN neurons (heads_ratio, ffn_ratio); "
                "channel_ratio groups take magnitude, gradient, taylor or random"
            )
        if self.norm not in ("l1", "l2"):
            raise ConfigError(f"norm must be 'l1' or 'l2', got {self.norm!r}")
        for pattern in self.exclude:
            check_regex(pattern, "exclude")
        if self.round_to < 1:
            raise ConfigError(f"round_to must be >= 1, got {self.round_to}")
        if self.importance_batches < 1:
            raise ConfigError(f"importance_batches must be >= 1, got {self.importance_batches}")
        if self.finetune_epochs < 0:
            raise ConfigError(f"finetune_epochs must be >= 0, got {self.finetune_epochs}")
        check_at_most(self, "finetune_epochs", MAX_EPOCHS, "training epochs")
        check_seed(self)


class _Scorer:
    """Group scores with the config's importance; gradients looked up by tensor identity."""

    def __init__(self, cfg: StructuredPruneConfig, grads: dict[int, torch.Tensor]) -> None:
        self.cfg, self.grads, self.calls = cfg, grads, 0

    def grad(self, w: torch.Tensor, dim: int = 0, offset: int = 0, length: int | None = None) -> torch.Tensor | None:
        g = self.grads.get(id(w))
        return g.narrow(dim, offset, length) if g is not None and length is not None else g

    def __call__(self, members: list[tuple[Any, ...]]) -> torch.Tensor:
        """Scores of members `(weight, dim, index map[, gradient])`."""
        self.calls += 1
        triples = [(m[0], m[3] if len(m) > 3 else self.grads.get(id(m[0])), m[1]) for m in members]
        maps = [m[2] for m in members]
        return channel_scores(self.cfg.importance, triples, self.cfg.norm, self.cfg.seed + self.calls, maps)


def _group_members(model: nn.Module, group: Any, score: _Scorer) -> list[tuple[Any, ...]]:
    members: list[tuple[Any, ...]] = []
    for name in (*group.producers, *group.norms):
        for t, dim in channel_tensors(model.get_submodule(name), "out"):
            members.append((t, dim, None, score.grad(t)))
    for name, offset, idx in group.consumers:
        for t, dim in channel_tensors(model.get_submodule(name), "in"):
            n = idx.numel()
            members.append((t.narrow(dim, offset, n), dim, idx, score.grad(t, dim, offset, n)))
    return members


def _cut_graph(model: nn.Module, graph: DependencyGraph, keeps: dict[int, torch.Tensor]) -> None:
    for group in graph.groups:
        if group.space not in keeps:
            continue
        for name in (*group.producers, *group.norms):
            cut_out(model.get_submodule(name), keeps[group.space])
    for name, cmap in graph.consumer_maps.items():
        parts, changed = [], False
        for seg in cmap.segments:
            if seg.space in keeps:
                keep = keeps[seg.space]
                parts.append(seg.offset + (keep[:, None] * seg.repeat + torch.arange(seg.repeat)).reshape(-1))
                changed = True
            else:
                parts.append(seg.offset + torch.arange(seg.size * seg.repeat))
        if changed:
            cut_in(model.get_submodule(name), torch.cat(parts))


def _touches(group: Any, names: set[str]) -> bool:
    return any(n in names for n in (*group.producers, *group.norms, *(c[0] for c in group.consumers)))


@register(StructuredPruneConfig)
def prune_structured(
    model: nn.Module,
    cfg: StructuredPruneConfig,
    ctx: Context,
) -> nn.Module:
    """Score, then cut heads, FFN neurons and channel groups; optionally fine-tune. Returns the model."""
    start = time.perf_counter()
    make_permanent(model)
    check_patterns(model, cfg.exclude, "exclude")
    example = ctx.example_inputs if ctx.example_inputs is not None else first_batch(ctx.data)
    before = model_summary(model, example)
    grads: dict[int, torch.Tensor] = {}
    if cfg.importance in NEEDS_GRADIENT:
        params = dict(model.named_parameters())
        collected = collect_gradients(model, params, ctx.data, ctx.loss_fn, cfg.importance_batches)
        grads = {id(params[n]): g for n, g in collected.items()}
    score = _Scorer(cfg, grads)
    stats: dict[str, Any] = {}

    head_plan: list[tuple[Any, torch.Tensor]] = []
    ffn_plan: list[tuple[Any, torch.Tensor]] = []
    heads, kept = head_blocks(model, cfg.heads_ratio, example, ctx) if cfg.heads_ratio > 0 else ([], [])
    ffns = find_ffns(model) if cfg.ffn_ratio > 0 else []
    if (cfg.heads_ratio or cfg.ffn_ratio) and not heads and not ffns and not cfg.channel_ratio:
        what = f"heads_ratio={cfg.heads_ratio}" if cfg.heads_ratio else f"ffn_ratio={cfg.ffn_ratio}"
        raise no_blocks_error(model, what, kept)
    if cfg.heads_ratio > 0 and not heads and not kept:
        ctx.warn(f"heads_ratio={cfg.heads_ratio}: no attention layer of {type(model).__name__} can be cut")
    if cfg.ffn_ratio > 0 and not ffns:
        ctx.warn(f"ffn_ratio={cfg.ffn_ratio}: {type(model).__name__} has no recognized FFN")
    if cfg.importance == "activation":
        head_plan, ffn_plan = activation_plans(
            model, (heads, cfg.heads_ratio), (ffns, cfg.ffn_ratio), ctx, cfg.importance_batches,
            (cfg.round_to, cfg.exclude),
        )  # fmt: skip
    else:
        head_plan = plan(heads, cfg.heads_ratio, 1, cfg.exclude, score)
        ffn_plan = plan(ffns, cfg.ffn_ratio, cfg.round_to, cfg.exclude, score)

    graph, keeps = None, {}
    if cfg.channel_ratio > 0:
        if example is None:
            raise DataError("channel pruning traces the model on one real batch: pass data=... (CLI: --data)")
        untraceable: BadInputError | None = None
        try:
            graph = build_graph(model, example, cfg.exclude)
        except BadInputError as e:  # traced part by part: the channels inside each part that traces
            graph, traced = build_graph_by_parts(model, example, cfg.exclude)
            untraceable, stats["traced_parts"] = e, traced
        taken = {n for b, _ in head_plan + ffn_plan for n in b.linear_names}
        for group in graph.groups:
            if _touches(group, taken):
                continue
            scores = score(_group_members(model, group, score))
            keeps[group.space] = channel_keep(
                scores, n_prune(group.size, cfg.channel_ratio), min_keep=1, round_to=cfg.round_to
            )
        channel_ffns = plan(untraced_ffns(model, graph, taken), cfg.channel_ratio, cfg.round_to, cfg.exclude, score)
        if not keeps and not channel_ffns:
            if untraceable is not None:
                raise BadInputError(
                    f"{untraceable}; traced part by part, none of the {len(stats['traced_parts'])} sub-modules that "
                    "trace holds channels that can be cut"
                ) from None
            raise BadInputError(
                f"no channel of {type(model).__name__} can be pruned: "
                + "; ".join(f"{m}: {', '.join(r)}" for m, r in list(graph.blocked.items())[:6])
            )
        ffn_plan += channel_ffns
        if untraceable is not None:
            ctx.warn(
                f"{type(model).__name__} cannot be traced whole ({str(untraceable).split(';')[0]}): cut the channels "
                f"inside the {len(stats['traced_parts'])} sub-modules that trace and {len(channel_ffns)} FFNs by their "
                "layout; the rest is kept whole"
            )
        # a part's inputs cannot be cut by construction: what meets them is no limit worth a warning either
        expected = _EXPECTED if untraceable is None else (*_EXPECTED, "with a tensor that cannot be cut")
        limits = {m: r for m, r in graph.blocked.items() if not all(any(e in x for e in expected) for x in r)}
        for m, r in limits.items():
            ctx.warn(f"kept the output channels of {m} whole: {'; '.join(r)}")
        stats["kept_whole"] = graph.blocked

    with torch.no_grad():
        for block, keep in head_plan:
            per_unit = block.q_per_unit
            stats.setdefault("heads", {})[block.name] = f"{block.units * per_unit}->{keep.numel() * per_unit}"
            block.cut(keep)
        for block, keep in ffn_plan:
            stats.setdefault("ffn", {})[block.name] = f"{block.units}->{keep.numel()}"
            block.cut(keep)
        if graph is not None:
            stats["channels"] = {
                ",".join(g.producers): f"{g.size}->{keeps[g.space].numel()}" for g in graph.groups if g.space in keeps
            }
            _cut_graph(model, graph, keeps)
        stats["config"] = sync_config(model)  # a Llama-style config follows its new widths
    _check_runs(model, example)
    if cfg.finetune_epochs > 0:
        model, stats["finetuned"] = finetune(model, ctx, cfg.finetune_epochs, "structured pruning recovery")
    after = model_summary(model, example)
    stats.update(
        importance=cfg.importance,
        params_before=before["params"],
        params_after=after["params"],
        flops_before=before["flops"],
        flops_after=after["flops"],
    )
    ctx.report.add_pass("prune/structured", time.perf_counter() - start, **stats)
    return model


def _check_runs(model: nn.Module, example: tuple[Any, ...] | None) -> None:
    """The pruned model must still run; a failure here is a bug in a handler, reported as such."""
    if example is None:
        return
    try:
        with eval_mode(model), torch.no_grad():
            model(*example)
    except Exception as e:
        raise ModelpressError(
            f"the structurally pruned {type(model).__name__} no longer runs ({type(e).__name__}: {e}); "
            "exclude the module named in the error to keep it whole"
        ) from e
