"""Offline teacher outputs: reuse, invalidation by a changed teacher or data, corruption, text (ragged) outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modelpress.core.context import Context
from modelpress.core.errors import DataError
from modelpress.core.options import RunOptions
from modelpress.distill import DistillConfig, TensorSamples, distill, teacher_cache
from modelpress.distill.outputs import model_outputs

from ._models import blobs, mlp, tiny_bert, token_samples

CFG = DistillConfig(mode="offline", epochs=1, batch_size=16, lr=1e-2)


class Counter:
    """Counts forward calls of a module."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(lambda *_: setattr(self, "calls", self.calls + 1))


def _run(teacher: torch.nn.Module, data: tuple, path: Path) -> None:
    distill(teacher, mlp(8, seed=1), data, CFG, ctx=Context(options=RunOptions(progress=False)), cache_path=path)


def test_cache_is_reused_and_invalidated_by_a_changed_teacher(tmp_path: Path) -> None:
    teacher, data, path = mlp(32), blobs(96), tmp_path / "teacher.safetensors"
    count = Counter(teacher)
    _run(teacher, data, path)
    first = count.calls
    assert path.is_file() and first > 1  # probe + teacher pass over the data
    _run(teacher, data, path)
    assert count.calls == first + 1  # only the probe batch: the outputs came from the cache

    with torch.no_grad():
        teacher.head.bias.add_(1.0)
    _run(teacher, data, path)
    assert count.calls > first + 2  # fingerprint mismatch: recomputed
    cache = teacher_cache(path, teacher, TensorSamples(*data[:1], labels=data[1]), CFG, write=False)
    batch = TensorSamples(data[0], labels=data[1]).collate([TensorSamples(data[0], labels=data[1])[i] for i in (5, 0)])
    with torch.no_grad():
        torch.testing.assert_close(cache.lookup(batch)["logits"], teacher(data[0][[5, 0]]))


def test_changed_data_or_settings_change_the_fingerprint(tmp_path: Path) -> None:
    teacher, (x, y) = mlp(32), blobs(64)
    path = tmp_path / "c.safetensors"
    teacher_cache(path, teacher, TensorSamples(x, labels=y), CFG)
    teacher_cache(path, teacher, TensorSamples(x, labels=y), CFG, write=False)  # valid: no error
    with pytest.raises(DataError, match="another teacher, data or settings"):
        teacher_cache(path, teacher, TensorSamples(x + 1, labels=y), CFG, write=False)
    with pytest.raises(DataError, match="another teacher, data or settings"):
        f16 = DistillConfig(mode="offline", cache_dtype="float16")
        teacher_cache(path, teacher, TensorSamples(x, labels=y), f16, write=False)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_cache_warns_and_recomputes(tmp_path: Path, damage: str) -> None:
    teacher, (x, y) = mlp(32), blobs(64)
    path = tmp_path / "c.safetensors"
    teacher_cache(path, teacher, TensorSamples(x, labels=y), CFG)
    raw = path.read_bytes()
    path.write_bytes(b"\x00garbage" * 10 if damage == "garbage" else raw[: len(raw) // 2])
    with pytest.raises(DataError, match="cannot be used"):
        teacher_cache(path, teacher, TensorSamples(x, labels=y), CFG, write=False)
    with pytest.warns(UserWarning, match="corrupt"):
        cache = teacher_cache(path, teacher, TensorSamples(x, labels=y), CFG)
    assert cache.samples == 64 and path.read_bytes() != b""
    assert not list(tmp_path.glob("*.partial"))  # nothing half-written left behind


def test_text_cache_matches_online_outputs_at_real_tokens(tmp_path: Path) -> None:
    teacher, samples = tiny_bert(layers=4), token_samples(20)
    cfg = DistillConfig(mode="offline", hidden_weight=1.0)
    cache = teacher_cache(tmp_path / "t.safetensors", teacher, samples, cfg, layers=[1, 3])
    assert cache.ragged == {"hidden.1", "hidden.3"}
    batch = samples.collate([samples[i] for i in (7, 2, 11)])
    cached = cache.lookup(batch)
    with torch.no_grad():
        online = model_outputs(teacher, batch, [1, 3])
    mask = batch.attention_mask.bool()
    for key in ("hidden.1", "hidden.3"):
        assert cached[key].shape == online[key].shape
        torch.testing.assert_close(cached[key][mask], online[key][mask], rtol=1e-5, atol=1e-5)
        assert float(cached[key][~mask].abs().sum()) == 0.0
    torch.testing.assert_close(cached["embedding"], online["embedding"], rtol=1e-5, atol=1e-5)
