"""`distill()` end to end, the recipe pass, and bad input."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from modelpress.core.config import Config
from modelpress.core.context import Context
from modelpress.core.errors import BadInputError, DataError
from modelpress.core.options import RunOptions
from modelpress.core.registry import apply
from modelpress.core.report import Report
from modelpress.distill import DistillConfig, StudentConfig, distill, narrower_cnn
from modelpress.distill.outputs import hf_model
from modelpress.zoo.digits import accuracy, load_digits_split, train_digits_cnn

from ._models import blobs, mlp, tiny_bert, token_samples

QUIET = Context(options=RunOptions(progress=False))


def test_digits_distillation_on_unlabelled_images_beats_labels_only(digits_teacher: torch.nn.Module) -> None:
    """50 labelled images + the rest unlabelled: the teacher's soft targets carry what the labels lack."""
    X, y = load_digits_split("train")
    Xv, yv = load_digits_split("val")
    n = 50
    student = narrower_cnn(digits_teacher, 0.48)  # <= 1/4 of the teacher's parameters
    labels_only = train_digits_cnn(copy.deepcopy(student), epochs=3 * 20, seed=0, train_set=(X[:n], y[:n]))
    partial = y.clone()
    partial[n:] = -100  # unlabelled
    cfg = DistillConfig(epochs=3, lr=3e-3, temperature=4.0, alpha=0.9, batch_size=64)
    distilled = distill(digits_teacher, student, (X, partial), cfg, ctx=QUIET).student
    acc_labels, acc_kd = accuracy(labels_only, Xv, yv), accuracy(distilled, Xv, yv)
    assert acc_kd >= acc_labels + 0.03, (acc_kd, acc_labels)


def test_recipe_pass_builds_the_student_from_the_teacher(digits_teacher: torch.nn.Module, tmp_path: Path) -> None:
    cfg = Config.from_dict(
        {"type": "DistillConfig", "epochs": 4, "lr": 3e-3, "temperature": 3.0, "alpha": 0.7, "batch_size": 64,
         "student": {"width_ratio": 0.48}}
    )  # fmt: skip
    report = Report(model="digits-cnn")
    ctx = Context(report=report, options=RunOptions(progress=False, cache_dir=tmp_path))
    student = apply(digits_teacher, cfg, ctx)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(student) <= n(digits_teacher) / 4
    Xt, yt = load_digits_split("test")
    assert accuracy(student, Xt, yt) >= 0.95 * accuracy(digits_teacher, Xt, yt)
    record = report.passes[-1]
    assert record.name == "distill" and record.stats["student_params"] == n(student)

    # the same recipe again reuses the trained student; a damaged file is trained again, with a warning
    saved = Path(record.stats["saved_student"])
    again = apply(digits_teacher, cfg, ctx)
    assert report.passes[-1].stats["reused_student"] == str(saved)
    pairs = zip(again.state_dict().values(), student.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    saved.write_bytes(b"not safetensors")
    with pytest.warns(UserWarning, match="could not be read"):
        apply(digits_teacher, cfg, ctx)
    assert "steps" in report.passes[-1].stats and saved.stat().st_size > 1000
    other = Config.from_dict({**cfg.to_dict(), "epochs": 3})
    apply(digits_teacher, other, ctx)
    assert "reused_student" not in report.passes[-1].stats


def test_text_encoder_online_with_hidden_and_attention_losses() -> None:
    teacher, samples = tiny_bert(layers=4), token_samples(32)
    cfg = DistillConfig(epochs=4, batch_size=8, lr=3e-3, hidden_weight=1.0, attention_weight=1.0, warmup=0.0)
    losses: list[float] = []
    res = distill(teacher, None, samples, cfg, ctx=QUIET, on_step=lambda _s, v: losses.append(v))
    assert len(hf_model(res.student).encoder.layer) == 2  # every other layer by default
    assert hf_model(teacher).config._attn_implementation == "sdpa"  # restored after training
    assert sum(losses[-4:]) < sum(losses[:4])


def test_text_encoder_offline_with_hidden_states(tmp_path: Path) -> None:
    teacher, samples = tiny_bert(layers=4), token_samples(32)
    cfg = DistillConfig(
        mode="offline", epochs=3, batch_size=8, lr=3e-3, hidden_weight=1.0, student=StudentConfig(layers=(0, 2))
    )
    res = distill(teacher, None, samples, cfg, ctx=QUIET, cache_path=tmp_path / "c.safetensors")
    assert res.cache_path is not None and res.history[-1]["loss"] < res.history[0]["loss"]


def test_frozen_embeddings_keep_the_teachers_tables(tmp_path: Path) -> None:
    teacher, samples = tiny_bert(layers=4), token_samples(32)
    cfg = DistillConfig(mode="offline", epochs=2, batch_size=8, lr=3e-3, freeze_embeddings=True)
    res = distill(teacher, None, samples, cfg, ctx=QUIET, cache_path=tmp_path / "c.safetensors")
    t_emb, s_emb = hf_model(teacher).embeddings, hf_model(res.student).embeddings
    assert torch.equal(s_emb.word_embeddings.weight, t_emb.word_embeddings.weight)
    assert not torch.equal(hf_model(res.student).encoder.layer[1].output.dense.weight,
                           hf_model(teacher).encoder.layer[2].output.dense.weight)  # fmt: skip
    assert s_emb.word_embeddings.weight.requires_grad  # trainable again afterwards


def test_empty_data_is_refused() -> None:
    with pytest.raises(DataError, match="empty data set"):
        distill(mlp(32), mlp(8), torch.zeros(0, 8), DistillConfig(), ctx=QUIET)
    with pytest.raises(DataError, match="needs training data"):
        distill(mlp(32), mlp(8), None, DistillConfig(), ctx=QUIET)
    with pytest.raises(DataError, match="empty data set"):
        distill(tiny_bert(), None, [], DistillConfig(), ctx=QUIET)


def test_incompatible_outputs_name_both_shapes(tmp_path: Path) -> None:
    class FiveWay(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(8, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    with pytest.raises(BadInputError, match=r"student logits \(4, 5\) vs teacher \(4, 4\)"):
        distill(mlp(32), FiveWay(), blobs(16), DistillConfig(mode="offline"), ctx=QUIET, cache_path=tmp_path / "c")
    assert not (tmp_path / "c").exists()  # nothing written


def test_unknown_feature_module_is_named() -> None:
    with pytest.raises(BadInputError, match="module 'body.9' not found"):
        distill(mlp(32), mlp(8), blobs(16), DistillConfig(hidden_weight=1.0, features={"body.9": "body.1"}), ctx=QUIET)
