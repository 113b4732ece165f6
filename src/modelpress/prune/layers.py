"""Which layers a pruning pass touches: supported types filtered by name patterns that must exist."""

from __future__ import annotations

import re

from torch import nn

from modelpress.core.context import Context
from modelpress.core.errors import BadInputError, ConfigError
from modelpress.core.layer_filter import LayerFilter

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Selected by name but not pruned by weight sparsity passes: skipped with a warning.
_NOT_PRUNED = (nn.Embedding, nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.LSTM, nn.GRU, nn.RNN)


def check_patterns(model: nn.Module, patterns: tuple[str, ...], field: str) -> None:
    """ConfigError for a pattern that matches no module name (a typo would otherwise prune everything)."""
    names = [n for n, _ in model.named_modules() if n]
    for pattern in patterns:
        if not any(re.search(pattern, n) for n in names):
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ConfigError(
                f"{field} pattern {pattern!r} matches no module of {type(model).__name__}; "
                f"module names look like: {shown}"
            )


def weight_layers(model: nn.Module, layer_filter: LayerFilter, ctx: Context | None = None) -> dict[str, nn.Module]:
    """{name: layer} of the Linear / Conv layers `layer_filter` selects; other selected types are warned about.

    A Linear whose weight is an embedding table (a language model's tied output head) is kept dense unless
    `include` names it: its zeros would also delete values of the token table every input reads, and a
    magnitude ranked across layers reaches it first (SmolLM2's tied head was cut to 92% at an overall 80%)."""
    check_patterns(model, layer_filter.include, "include")
    check_patterns(model, layer_filter.exclude, "exclude")
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    chosen: dict[str, nn.Module] = {}
    skipped: dict[str, list[str]] = {}
    tied: list[str] = []
    for name, m in model.named_modules():
        if not name or not layer_filter.selects(name, type(m).__name__):
            continue
        if isinstance(m, WEIGHT_LAYERS):
            if id(m.weight) in tables and not layer_filter.names(name):
                tied.append(name)
                continue
            chosen[name] = m
        elif layer_filter.include and isinstance(m, _NOT_PRUNED):
            skipped.setdefault(type(m).__name__, []).append(name)
    if ctx is not None:
        for kind, names in skipped.items():
            shown = ", ".join(names[:4])
            ctx.warn(f"skipped {len(names)} {kind} layer(s) ({shown}): weight pruning covers Linear/Conv only")
        if tied:
            ctx.warn(f"kept {', '.join(tied)} dense: its weight is the embedding table (tied), which pruning would "
                     "cut for every input token too; name it in the layers' include to prune it")  # fmt: skip
    if not chosen:
        raise BadInputError(
            f"no Linear/Conv layer of {type(model).__name__} is selected by {layer_filter}; nothing to prune"
        )
    return chosen
