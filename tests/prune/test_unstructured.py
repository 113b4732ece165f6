"""Unstructured and N:M sparsity: exact rates, masks that survive training, schedules, sparse files."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modelpress.core import ConfigError, Context, DataError, RunOptions
from modelpress.measure.size import artifact_size_bytes
from modelpress.primitives.masks import is_nm_sparse
from modelpress.prune import (
    NMPruneConfig,
    PolynomialSchedule,
    UnstructuredPruneConfig,
    load_sparse,
    make_permanent,
    prune,
    save_sparse,
)
from modelpress.prune.masking import get_mask
from modelpress.quant import LayerFilter


def small_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 32),
        nn.ReLU(), nn.Linear(32, 10),
    ).eval()  # fmt: skip


def batches(n: int = 3, seed: int = 0) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(8, 1, 8, 8, generator=g),) for _ in range(n)]


def layer_zeros(model: nn.Module) -> dict[str, float]:
    layers = ((n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    return {n: float((m.weight == 0).float().mean()) for n, m in layers}


@pytest.mark.parametrize("importance", ["magnitude", "gradient", "taylor", "random"])
def test_one_shot_layer_sparsity_is_exact(importance):
    model = small_net()
    ctx = Context(options=RunOptions(progress=False))
    out = prune(model, UnstructuredPruneConfig(sparsity=0.7, importance=importance), data=batches(), ctx=ctx)
    for name, m in out.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert int((m.weight == 0).sum()) == round(0.7 * m.weight.numel()), name
            assert get_mask(m) is None  # permanent: plain weights
    assert all(float((m.weight == 0).float().mean()) < 0.01 for m in model.modules() if isinstance(m, nn.Linear))
    stats = ctx.report.passes[-1].stats
    assert stats["sparsity"] == pytest.approx(0.7, abs=1e-3)
    assert stats["nonzero_params"] < stats["nonzero_before"]
    assert stats["layer_flops_nonzero"] < 0.4 * stats["layer_flops_dense"]


def test_magnitude_prunes_the_smallest_weights():
    model = small_net()
    w = model[4].weight.detach().clone()
    out = prune(model, UnstructuredPruneConfig(sparsity=0.5))
    kept = out[4].weight != 0
    assert float(w[~kept].abs().max()) <= float(w[kept].abs().min())


def test_global_scope_ranks_all_layers_together():
    model = small_net()
    with torch.no_grad():
        model[6].weight.mul_(100.0)  # the last layer's weights dwarf the others
    out = prune(model, UnstructuredPruneConfig(sparsity=0.5, scope="global"))
    zeros = layer_zeros(out)
    assert zeros["6"] == 0.0 and zeros["4"] > 0.5
    total = sum(m.weight.numel() for m in out.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    pruned = sum(int((m.weight == 0).sum()) for m in out.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert pruned == round(0.5 * total)


def test_threshold_selection():
    model = small_net()
    out = prune(model, UnstructuredPruneConfig(threshold=0.02, layers=LayerFilter(include=("^4$",))))
    w = model[4].weight
    assert torch.equal(out[4].weight == 0, w.abs() <= 0.02)
    assert torch.equal(out[0].weight, model[0].weight)  # not selected


def test_masks_survive_training_steps():
    model = small_net()
    ctx = Context(options=RunOptions(progress=False))
    out = prune(model, UnstructuredPruneConfig(sparsity=0.6, permanent=False), ctx=ctx)
    stats = ctx.report.passes[-1].stats
    assert stats["nonzero_params"] == stats["nonzero_before"] - sum(
        round(0.6 * m.weight.numel()) for m in (out[0], out[4], out[6])
    )
    masks = {n: get_mask(m).clone() for n, m in out.named_modules() if get_mask(m) is not None}
    assert len(masks) == 3
    opt = torch.optim.AdamW(out.parameters(), lr=0.1, weight_decay=0.1)
    out.train()
    for (x,) in batches(4):
        opt.zero_grad()
        out(x).pow(2).mean().backward()
        opt.step()
    for name, mask in masks.items():
        w = out.get_submodule(name).weight
        assert bool((w[~mask] == 0).all()), name
        assert bool((w[mask] != 0).any())
    assert make_permanent(out) == 3
    for name, mask in masks.items():
        w = out.get_submodule(name).weight
        assert get_mask(out.get_submodule(name)) is None and torch.equal(w == 0, ~mask | (w == 0))
        assert int((w == 0).sum()) >= round(0.6 * w.numel())


def _train_fn(steps: int):
    def train(model: nn.Module) -> nn.Module:
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        model.train()
        data = batches(steps, seed=1)
        for (x,) in data:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long)).backward()
            opt.step()
        return model.eval()

    return train


@pytest.mark.parametrize("importance", ["magnitude", "movement", "taylor"])
def test_gradual_schedule_reaches_final_sparsity_while_training(importance):
    ctx = Context(train_fn=_train_fn(30), options=RunOptions(progress=False))
    cfg = UnstructuredPruneConfig(
        sparsity=0.8, importance=importance, schedule=PolynomialSchedule(steps=20, frequency=5)
    )
    out = prune(small_net(), cfg, data=batches(), ctx=ctx)
    stats = ctx.report.passes[-1].stats
    updates = [s for _, s in stats["schedule"]["updates"]]
    assert stats["schedule"]["steps_run"] == 30
    assert updates == sorted(updates) and updates[-1] == pytest.approx(0.8) and len(updates) >= 3
    for name, m in out.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert int((m.weight == 0).sum()) == round(0.8 * m.weight.numel()), name
    assert not ctx.report.warnings


def test_short_training_is_finished_at_the_final_sparsity_with_a_warning():
    ctx = Context(train_fn=_train_fn(5), options=RunOptions(progress=False))
    cfg = UnstructuredPruneConfig(sparsity=0.5, schedule=PolynomialSchedule(steps=50, frequency=5))
    out = prune(small_net(), cfg, ctx=ctx)
    assert all(z == pytest.approx(0.5, abs=1e-2) for z in layer_zeros(out).values())
    assert any("schedule needs 50" in w for w in ctx.report.warnings)


def test_nm_pattern_and_skipped_layers():
    ctx = Context(options=RunOptions(progress=False))
    out = prune(small_net(), NMPruneConfig(n=2, m=4), ctx=ctx)
    assert is_nm_sparse(out[4].weight, 2, 4) and is_nm_sparse(out[6].weight, 2, 4)
    assert float((out[4].weight == 0).float().mean()) == 0.5
    assert float((out[0].weight == 0).float().mean()) == 0.0  # 1 * 3 * 3 inputs: not a multiple of 4
    assert any("skipped 0: input width 9" in w for w in ctx.report.warnings)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sparsity": 1.2}, r"sparsity must be in \[0, 1\), got 1.2"),
        ({"sparsity": -0.1}, r"sparsity must be in \[0, 1\), got -0.1"),
        ({"importance": "psychic"}, "importance must be one of magnitude, gradient, taylor, movement, random"),
        ({"importance": "movement"}, "movement importance .* needs a schedule"),
        ({"sparsity": 0.3, "schedule": PolynomialSchedule(initial_sparsity=0.5)}, "above the final sparsity"),
    ],
)
def test_config_errors_name_the_value(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        UnstructuredPruneConfig(**kwargs)


def test_from_dict_and_unknown_layer_names():
    data = {"sparsity": 0.5, "schedule": {"steps": 10}, "layers": {"exclude": ["^0$"]}}
    cfg = UnstructuredPruneConfig.from_dict(data)
    assert cfg.schedule == PolynomialSchedule(steps=10)
    with pytest.raises(ConfigError, match="exclude pattern 'encoder' matches no module of Sequential"):
        prune(small_net(), UnstructuredPruneConfig(layers=LayerFilter(exclude=("encoder",))))
    with pytest.raises(ConfigError, match=r"NM.*|N:M sparsity needs 0 < n < m, got n=4, m=4"):
        NMPruneConfig(n=4, m=4)


def test_gradient_importance_needs_data_and_schedule_needs_training():
    with pytest.raises(DataError, match="real input batches"):
        prune(small_net(), UnstructuredPruneConfig(importance="taylor"))
    with pytest.raises(DataError, match="training loop"):
        prune(small_net(), UnstructuredPruneConfig(schedule=PolynomialSchedule()))


def test_sparse_file_round_trips_exactly_and_shrinks(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    dense_bytes = artifact_size_bytes(model)
    out = prune(model, UnstructuredPruneConfig(sparsity=0.8))
    path = save_sparse(out, tmp_path / "model.sparse.safetensors")
    assert artifact_size_bytes(path) <= 0.30 * dense_bytes  # 80%: 1 bit + 20% of 4 bytes per weight
    fresh = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))
    state = load_sparse(path, fresh)
    for k, v in out.state_dict().items():
        assert torch.equal(state[k], v), k
    x = torch.randn(3, 256)
    torch.testing.assert_close(fresh(x), out(x), rtol=0, atol=0)


def test_sparse_file_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    from modelpress.core import BadInputError

    with pytest.raises(BadInputError, match="is not a modelpress-bitmask-v1 file"):
        load_sparse(tmp_path / "plain.safetensors")


class TiedLM(nn.Module):
    """A language model's shape in miniature: a token table, a block, an output head sharing the table."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        self.block = nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, 50, bias=False)
        self.lm_head.weight = self.embed.weight
        with torch.no_grad():
            self.block.weight.mul_(0.01)  # a global magnitude ranking would cut the block before the table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.block(self.embed(ids)))


@pytest.mark.parametrize("config", [UnstructuredPruneConfig(sparsity=0.8, scope="global"), NMPruneConfig()])
def test_a_head_tied_to_the_embedding_table_is_kept_dense_unless_named(config):
    model = TiedLM()
    table = model.embed.weight.detach().clone()
    ctx = Context(options=RunOptions(progress=False))
    out = prune(model, config, ctx=ctx)
    assert torch.equal(out.embed.weight, table) and out.lm_head.weight is out.embed.weight
    assert float((out.block.weight == 0).float().mean()) >= 0.5
    assert any("kept lm_head dense: its weight is the embedding table (tied)" in w for w in ctx.report.warnings)
    named = prune(model, type(config).from_dict({**config.to_dict(), "layers": {"include": [r"lm_head$"]}}))
    assert float((named.embed.weight == 0).float().mean()) >= 0.5  # asked for: the table is cut with it
