"""`prune()`: apply one pruning config to a model, like `quantize()` does for quantization.

>>> small = prune(model, StructuredPruneConfig(channel_ratio=0.5, finetune_epochs=5),
...               data=entry.calibration_data(64), train_fn=entry.finetune)
>>> sparse = prune(model, UnstructuredPruneConfig(sparsity=0.8))
>>> ctx.report.passes[-1].stats["layer_sparsity"]
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from modelpress.core.config import Config
from modelpress.core.context import Context
from modelpress.core.errors import BadInputError
from modelpress.core.registry import apply
from modelpress.prune.gradients import LossFn
from modelpress.prune.llm import SparseGPTConfig, WandaConfig
from modelpress.prune.structured import StructuredPruneConfig
from modelpress.prune.unstructured import NMPruneConfig, UnstructuredPruneConfig

PruneConfig = UnstructuredPruneConfig | NMPruneConfig | StructuredPruneConfig | SparseGPTConfig | WandaConfig


def prune(
    model: nn.Module,
    config: PruneConfig,
    data: Iterable[Any] | None = None,
    ctx: Context | None = None,
    *,
    inplace: bool = False,
    train_fn: Callable[..., Any] | None = None,
    loss_fn: LossFn | None = None,
    example_inputs: tuple[Any, ...] | None = None,
) -> nn.Module:
    """Prune `model` with `config`; returns a new model (the input is untouched unless `inplace`).

    `data`: input batches (tuples of positional args) for gradient-based importance, tracing and
    FLOPs. `train_fn(model[, epochs=...])` fine-tunes for recovery and drives schedules.
    `loss_fn(model, batch)` replaces the label-free default loss of gradient importance.
    Statistics go to `ctx.report` (pass a `Context` to read them).
    """
    if not isinstance(model, nn.Module):
        raise BadInputError(f"prune() needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, Config):
        raise BadInputError(f"prune() needs a pruning config, got {type(config).__name__}")
    given = {"data": data, "train_fn": train_fn, "loss_fn": loss_fn, "example_inputs": example_inputs}
    changes = {k: tuple(v) if k == "example_inputs" else v for k, v in given.items() if v is not None}
    ctx = dataclasses.replace(ctx or Context(), **changes)  # the caller's report still receives the statistics
    model = model if inplace else copy.deepcopy(model)
    with ctx.threads_scope():
        return apply(model, config, ctx)
