"""SparseGPT and Wanda: the solvers' patterns and errors, and the sequential passes on decoder LMs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.core import ConfigError, Context, DataError, RunOptions
from modelpress.primitives.gptq import hessian_update
from modelpress.primitives.sparsegpt import column_sq_norms, sparsegpt_prune, wanda_prune
from modelpress.prune import NMPruneConfig, SparseGPTConfig, UnstructuredPruneConfig, WandaConfig, prune
from modelpress.quant import LayerFilter
from modelpress.recipes.recipe import load_recipe
from modelpress.zoo.tinylm import SMALL_SPEC, TinyLMEntry, perplexity

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCKS = LayerFilter(exclude=(r"lm_head$",))


def _inputs(t: int = 512, k: int = 64, seed: int = 0) -> torch.Tensor:
    """Correlated inputs with very different column scales, as a transformer's activations have."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(t, k // 4, generator=g)
    mix = torch.randn(k // 4, k, generator=g)
    scales = torch.logspace(-1, 1, k)[torch.randperm(k, generator=g)]
    return (base @ mix + torch.randn(t, k, generator=g)) * scales


def _output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ (w - w_hat).t()).pow(2).mean())


def _magnitude(w: torch.Tensor) -> torch.Tensor:
    k = w.shape[1] // 2
    idx = w.abs().argsort(dim=1)[:, :k]
    return w.scatter(1, idx, 0.0)


@pytest.mark.parametrize("n, m", [(0, 0), (2, 4), (1, 4)])
def test_patterns_are_exact(n, m):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 64, generator=g)
    x = _inputs()
    h, _ = hessian_update(None, 0, x)
    sgpt = sparsegpt_prune(w, h, sparsity=0.5, n=n, m=m).weight
    for pruned in (sgpt, wanda_prune(w, column_sq_norms(None, x), sparsity=0.5, n=n, m=m)):
        zeros = pruned == 0
        if m:
            assert (zeros.view(24, -1, m).sum(-1) == m - n).all()  # exactly m - n zeros in every group
        else:
            assert (zeros.sum(1) == 32).all()  # half of every row
        assert pruned.shape == w.shape and torch.isfinite(pruned).all()


def test_sparsegpt_reconstructs_better_than_wanda_better_than_magnitude():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(32, 256, generator=g)
    x = _inputs(1024, 256)
    h, _ = hessian_update(None, 0, x)
    res = sparsegpt_prune(w, h, sparsity=0.5)
    err_sgpt = _output_error(w, res.weight, x)
    err_wanda = _output_error(w, wanda_prune(w, column_sq_norms(None, x), sparsity=0.5), x)
    err_mag = _output_error(w, _magnitude(w), x)
    assert err_sgpt < 0.6 * err_wanda and err_wanda < 0.1 * err_mag, (err_sgpt, err_wanda, err_mag)
    assert res.loss > 0 and not res.notes


def test_wanda_keeps_a_small_weight_on_a_loud_input():
    w = torch.tensor([[1.0, 0.1, 0.9, 0.8]])
    norms = torch.tensor([1.0, 1e4, 1.0, 1.0])  # input 1 is a hundred times louder (norm, squared here)
    assert (wanda_prune(w, norms, sparsity=0.5) != 0).tolist() == [[True, True, False, False]]


def test_column_sq_norms_accumulate_over_batches():
    x = _inputs(64, 8)
    total = column_sq_norms(column_sq_norms(None, x[:20]), x[20:])
    torch.testing.assert_close(total, x.pow(2).sum(0))


def test_dead_inputs_and_non_finite_hessian_are_noted():
    w = torch.randn(8, 16)
    x = _inputs(128, 16)
    x[:, 3] = 0
    h, _ = hessian_update(None, 0, x)
    res = sparsegpt_prune(w, h)
    assert (res.weight[:, 3] == 0).all() and "zero on every calibration sample" in res.notes[0]
    res = sparsegpt_prune(w, torch.full((16, 16), float("nan")))
    assert "non-finite" in res.notes[0] and torch.isfinite(res.weight).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sparsity": 1.0}, r"sparsity must be in \(0, 1\), got 1.0"),
        ({"sparsity": 0.0}, r"sparsity must be in \(0, 1\)"),
        ({"n": 4, "m": 4}, "needs 0 < n < m, got n=4, m=4"),
        ({"n": 2, "m": 0}, "needs 0 < n < m"),
        ({"n": 2, "m": 128}, "m must be <= 64"),
        ({"calibration_batches": 0}, "calibration_batches must be >= 1"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    for cls in (SparseGPTConfig, WandaConfig):
        with pytest.raises(ConfigError, match=message):
            cls(**kwargs)
    with pytest.raises(ConfigError, match="block_size"):
        SparseGPTConfig(n=2, m=4, block_size=6)


def _llama(hidden: int = 32) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _ids(n: int = 4) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 64, (2, 16), generator=g),) for _ in range(n)]


@pytest.mark.parametrize("cfg", [SparseGPTConfig(), WandaConfig(n=2, m=4)])
def test_passes_prune_every_block_layer_and_keep_the_head(cfg):
    model = _llama()
    ctx = Context(options=RunOptions(progress=False))
    pruned = prune(model, cfg, data=_ids(), ctx=ctx)
    linears = {n: m for n, m in pruned.named_modules() if isinstance(m, nn.Linear)}
    assert len(linears) == 2 * 7 + 1
    for name, layer in linears.items():
        zeros = float((layer.weight == 0).float().mean())
        assert zeros == (0.0 if name == "lm_head" else 0.5), name
    (record,) = ctx.report.passes
    assert record.stats["sparsity"] == 0.5 and record.stats["blocks"] == 2
    assert record.stats["nonzero_params"] < record.stats["nonzero_before"]
    assert all((m.weight != 0).all() for m in model.modules() if isinstance(m, nn.Linear))  # input untouched


def test_n_m_skips_layers_whose_width_does_not_fit_with_a_warning():
    model = _llama(hidden=40)  # q/k/v/o/gate/up take 40 inputs; down takes 64
    ctx = Context(options=RunOptions(progress=False))
    pruned = prune(model, SparseGPTConfig(n=4, m=16), data=_ids(), ctx=ctx)
    assert any("multiple of m=16" in w for w in ctx.report.warnings)
    assert float((pruned.model.layers[0].mlp.down_proj.weight == 0).float().mean()) == 0.75
    assert (pruned.model.layers[0].self_attn.q_proj.weight != 0).all()
    with pytest.raises(ConfigError, match="no selected layer has an input width that is a multiple of m=48"):
        prune(_llama(hidden=40), WandaConfig(n=2, m=48), data=_ids(), ctx=Context(options=RunOptions(progress=False)))


def test_passes_need_calibration_data():
    with pytest.raises(DataError, match="SparseGPT needs calibration data"):
        prune(_llama(), SparseGPTConfig(), ctx=Context(options=RunOptions(progress=False)))


def test_on_tiny_lm_sparsegpt_loses_less_than_magnitude(tiny_lm):
    model, base = tiny_lm
    data = TinyLMEntry(SMALL_SPEC).calibration_data(32, 8)
    magnitude = perplexity(prune(model, UnstructuredPruneConfig(sparsity=0.5, layers=BLOCKS))) - base
    sgpt = perplexity(prune(model, SparseGPTConfig(), data=data)) - base
    assert magnitude > 0
    assert sgpt < 0.6 * magnitude, (sgpt, magnitude)
    nm_mag = perplexity(prune(model, NMPruneConfig(layers=BLOCKS))) - base
    nm_sgpt = perplexity(prune(model, SparseGPTConfig(n=2, m=4), data=data)) - base
    assert nm_sgpt < 0.6 * nm_mag, (nm_sgpt, nm_mag)


def test_recipes_name_the_passes():
    for name, cls in (("prune-sparsegpt-50", SparseGPTConfig), ("prune-wanda-2of4", WandaConfig)):
        recipe = load_recipe(name)
        assert [type(p) for p in recipe.passes] == [cls]
