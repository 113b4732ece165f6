"""The built-in pruning recipes parse into typed configs and run on digits-cnn."""

from __future__ import annotations

import pytest
import torch

import modelpress.prune  # noqa: F401  (registers the pruning config types)
from modelpress.core import Context, RunOptions
from modelpress.core.registry import apply
from modelpress.prune import NMPruneConfig, StructuredPruneConfig, UnstructuredPruneConfig
from modelpress.recipes.recipe import load_recipe

RECIPES = {
    "prune-channels-50": StructuredPruneConfig,
    "prune-transformer": StructuredPruneConfig,
    "prune-sparse-80": UnstructuredPruneConfig,
    "prune-2of4": NMPruneConfig,
}


@pytest.mark.parametrize("name, config_type", RECIPES.items())
def test_builtin_prune_recipes_parse(name, config_type):
    recipe = load_recipe(name)
    assert len(recipe.passes) == 1 and isinstance(recipe.passes[0], config_type)
    assert recipe.description


def test_transformer_recipe_removes_a_third_of_twelve_heads():
    cfg = load_recipe("prune-transformer").passes[0]
    assert round(cfg.heads_ratio * 12) == 4 and cfg.ffn_ratio == 0.5


@pytest.mark.slow
def test_sparse_recipe_runs_through_the_registry(cache_dir):
    from modelpress.zoo import get_entry

    entry = get_entry("digits-cnn")
    model = entry.load(cache_dir=cache_dir)
    cfg = load_recipe("prune-sparse-80").passes[0]
    ctx = Context(data=entry.calibration_data(64, 32), train_fn=entry.finetune, options=RunOptions(progress=False))
    out = apply(model, cfg, ctx)
    weights = [m.weight for m in out.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.8, abs=1e-3)
    assert entry.evaluate(out).value >= entry.evaluate(entry.load(cache_dir=cache_dir)).value - 0.02
