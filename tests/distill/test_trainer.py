"""The training loop: schedule, checkpoint resume, early stopping, projections."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from modelpress.core.context import Context
from modelpress.core.errors import ConfigError
from modelpress.core.options import RunOptions
from modelpress.distill import DistillConfig, Projection, distill
from modelpress.distill.trainer import lr_lambda
from modelpress.primitives.kd import hidden_mse

from ._models import blobs, mlp

QUIET = Context(options=RunOptions(progress=False))


def test_warmup_then_cosine_and_linear_decay() -> None:
    cos = lr_lambda(DistillConfig(warmup=0.1, decay="cosine"), 100)
    assert [cos(0), cos(4), cos(9)] == pytest.approx([0.1, 0.5, 1.0])
    assert cos(10) == pytest.approx(1.0) and cos(55) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0)
    lin = lr_lambda(DistillConfig(warmup=0.0, decay="linear"), 10)
    assert [lin(0), lin(5), lin(10)] == pytest.approx([1.0, 0.5, 0.0])
    assert lr_lambda(DistillConfig(warmup=0.0, decay="constant"), 10)(7) == 1.0


def test_projection_learns_a_width_change() -> None:
    torch.manual_seed(0)
    x = torch.randn(256, 4)  # student features, width 4
    target = x @ torch.randn(4, 12) + 0.5  # teacher features, width 12: a linear function of the student's
    proj = Projection(4, 12)
    opt = torch.optim.Adam(proj.parameters(), lr=0.05)
    with torch.no_grad():
        first = float(hidden_mse(proj(x), target))
    for _ in range(300):
        opt.zero_grad()
        loss = hidden_mse(proj(x), target)
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 1e-3 * first


def test_projection_on_conv_maps_uses_the_channel_axis() -> None:
    proj = Projection(3, 5, channel_dim=1)
    assert proj(torch.randn(2, 3, 4, 4)).shape == (2, 5, 4, 4)


def _cfg(**kw) -> DistillConfig:  # noqa: ANN003
    base = {
        "epochs": 3,
        "batch_size": 16,
        "lr": 5e-3,
        "checkpoint_every": 4,
        "hidden_weight": 1.0 if "features" in kw else 0.0,
    }
    return DistillConfig(**{**base, **kw})


def _features() -> dict[str, str]:
    return {"body.1": "body.1"}  # student hidden 8 -> teacher hidden 32 through a projection


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    teacher, data = mlp(32), blobs(90)  # 90 samples: a short last batch
    cfg = _cfg(features=_features())
    metric = lambda m: -float(m(data[0]).pow(2).mean())  # noqa: E731
    ref = distill(teacher, mlp(8, seed=1, dropout=0.2), data, cfg, ctx=QUIET, metric=metric).student

    class Interrupt(Exception):
        pass

    def stop_at_9(step: int, _loss: float) -> None:
        if step == 9:
            raise Interrupt

    with pytest.raises(Interrupt):
        distill(teacher, mlp(8, seed=1, dropout=0.2), data, cfg, ctx=QUIET, metric=metric,
                checkpoint_dir=tmp_path, on_step=stop_at_9)  # fmt: skip
    assert (tmp_path / "checkpoint.pt").is_file()
    resumed = distill(
        teacher, mlp(8, seed=1, dropout=0.2), data, cfg, ctx=QUIET, metric=metric, checkpoint_dir=tmp_path
    )
    assert resumed.steps == 3 * math.ceil(90 / 16)
    for (name, a), (_, b) in zip(ref.state_dict().items(), resumed.student.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert not list(tmp_path.glob("*.partial"))


def test_resume_with_another_config_is_refused(tmp_path: Path) -> None:
    teacher, data = mlp(32), blobs(32)
    distill(teacher, mlp(8), data, _cfg(epochs=1), ctx=QUIET, checkpoint_dir=tmp_path)
    with pytest.raises(ConfigError, match="another config"):
        distill(teacher, mlp(8), data, _cfg(epochs=1, lr=1e-3), ctx=QUIET, checkpoint_dir=tmp_path)
    distill(teacher, mlp(8), data, _cfg(epochs=1, lr=1e-3), ctx=QUIET, checkpoint_dir=tmp_path, resume=False)


def test_early_stopping_restores_the_best_epoch() -> None:
    teacher, data = mlp(32), blobs(64)
    scores = iter([0.5, 0.9, 0.7, 0.6, 0.95, 0.99])
    snapshots = []

    def metric(m: torch.nn.Module) -> float:
        snapshots.append({k: v.clone() for k, v in m.state_dict().items()})
        return next(scores)

    res = distill(teacher, mlp(8), data, _cfg(epochs=6, patience=2), ctx=QUIET, metric=metric)
    assert res.stopped_early and [h["metric"] for h in res.history] == [0.5, 0.9, 0.7, 0.6]
    assert res.best_metric == 0.9
    for k, v in res.student.state_dict().items():
        torch.testing.assert_close(v, snapshots[1][k])


def test_distillation_lowers_the_loss_and_trains_the_projection() -> None:
    teacher, data = mlp(32), blobs(128)
    student = mlp(8, seed=3)
    losses: list[float] = []
    res = distill(teacher, student, data, _cfg(epochs=8, alpha=1.0, features=_features()), ctx=QUIET,
                  on_step=lambda _s, loss: losses.append(loss))  # fmt: skip
    assert sum(losses[-8:]) / 8 < 0.5 * sum(losses[:8]) / 8
    assert res.history[-1]["loss"] < res.history[0]["loss"]


def test_length_buckets_keep_every_item_and_group_similar_lengths() -> None:
    from modelpress.distill.trainer import bucketed

    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 100, (1000,), generator=gen).tolist()
    order = torch.randperm(1000, generator=gen).tolist()
    out = bucketed(order, lengths, 16, seed=3)
    assert sorted(out) == list(range(1000)) and out == bucketed(order, lengths, 16, seed=3)

    def spread(o: list[int]) -> int:
        batches = [[lengths[i] for i in o[k : k + 16]] for k in range(0, 1000, 16)]
        return sum(max(b) - min(b) for b in batches)

    assert spread(out) < 0.2 * spread(order)


def test_distillation_leaves_the_global_rngs_as_it_found_them_and_repeats_for_a_seed() -> None:
    teacher, data = mlp(32), blobs(48)
    cfg = _cfg(epochs=2, features=_features(), seed=5)  # a projection (8 -> 32) and dropout in the student

    def run() -> dict[str, torch.Tensor]:
        return distill(teacher, mlp(8, seed=1, dropout=0.2), data, cfg, ctx=QUIET).student.state_dict()

    torch_before, python_before = torch.get_rng_state(), random.getstate()
    first = run()
    assert torch.equal(torch.get_rng_state(), torch_before)
    assert random.getstate() == python_before
    with torch.random.fork_rng(devices=[]):  # another global state: the same student
        torch.manual_seed(1234)
        random.seed(1234)
        second = run()
    for (name, a), (_, b) in zip(first.items(), second.items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    other = distill(teacher, mlp(8, seed=1, dropout=0.2), data, _cfg(epochs=2, features=_features(), seed=6), ctx=QUIET)
    assert not all(torch.equal(a, b) for a, b in zip(first.values(), other.student.state_dict().values(), strict=True))


def test_a_projection_from_a_generator_starts_as_a_seeded_linear_layer() -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        reference = Projection(8, 32)
    drawn = Projection(8, 32, generator=torch.Generator().manual_seed(3))
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(drawn.state_dict()[name], value, rtol=0, atol=0, msg=name)
