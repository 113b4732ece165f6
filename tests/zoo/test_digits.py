"""digits-cnn: deterministic training, accuracy, the weights cache and its corruption handling."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from modelpress.core.errors import BadInputError, DataError
from modelpress.zoo import digits
from modelpress.zoo.base import get_entry
from modelpress.zoo.digits import DigitsCNN, accuracy, load_digits_split, train_digits_cnn


def _seeded_model(seed: int) -> DigitsCNN:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitsCNN()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """One trained entry model and the cache dir holding its weights."""
    cache = tmp_path_factory.mktemp("digits-cache")
    return cache, get_entry("digits-cnn").load(cache_dir=cache)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _cache_file(cache: Path) -> Path:
    (path,) = (cache / "digits-cnn").glob("*.safetensors")
    return path


def test_splits_are_stratified_70_15_15() -> None:
    sizes = {s: len(load_digits_split(s)[1]) for s in ("train", "val", "test")}
    assert sizes == {"train": 1257, "val": 270, "test": 270}
    X, y = load_digits_split("test")
    assert X.shape == (270, 1, 8, 8) and X.dtype == torch.float32
    assert 0.0 <= float(X.min()) and float(X.max()) <= 1.0
    assert torch.bincount(y, minlength=10).min() >= 25  # every class present in proportion
    with pytest.raises(BadInputError, match="split must be one of"):
        load_digits_split("dev")


def test_training_is_deterministic() -> None:
    a, b, c = _seeded_model(0), _seeded_model(0), _seeded_model(0)
    train_digits_cnn(a, epochs=2, seed=0)
    train_digits_cnn(b, epochs=2, seed=0)
    train_digits_cnn(c, epochs=2, seed=1)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)


def test_entry_accuracy(trained: tuple[Path, torch.nn.Module]) -> None:
    _, model = trained
    quality = get_entry("digits-cnn").evaluate(model)
    assert quality.name == "accuracy" and quality.details["n"] == 270
    assert quality.value >= 0.97
    assert not model.training


def test_cache_is_reused(trained: tuple[Path, torch.nn.Module], monkeypatch: pytest.MonkeyPatch) -> None:
    cache, model = trained

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("retrained although a valid cache exists")

    monkeypatch.setattr(digits, "train_digits_cnn", no_training)
    again = get_entry("digits-cnn").load(cache_dir=cache)
    assert _same_weights(model, again)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_cache_is_retrained(
    trained: tuple[Path, torch.nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(trained[0], cache)
    path = _cache_file(cache)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:  # a flipped byte in the tensor data, past the header: only the checksum sees it
        data[-10] ^= 0xFF
    path.write_bytes(bytes(data))

    calls = []

    def quick_train(model: torch.nn.Module, *args: object, **kwargs: object) -> torch.nn.Module:
        calls.append(model)
        return model.eval()

    monkeypatch.setattr(digits, "train_digits_cnn", quick_train)
    with pytest.warns(UserWarning, match="corrupt digits-cnn cache"):
        get_entry("digits-cnn").load(cache_dir=cache)
    assert len(calls) == 1
    get_entry("digits-cnn").load(cache_dir=cache)  # the rewritten file is valid again
    assert len(calls) == 1
    assert not list((cache / "digits-cnn").glob("*.partial*"))


def test_fingerprint_follows_the_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    before = digits._fingerprint()
    monkeypatch.setattr(digits, "EPOCHS", digits.EPOCHS + 1)
    assert digits._fingerprint() != before


def test_evaluate_accepts_numpy_and_tuple_outputs(trained: tuple[Path, torch.nn.Module]) -> None:
    _, model = trained
    entry = get_entry("digits-cnn")
    reference = entry.evaluate(model).value
    assert entry.evaluate(lambda x: model(x).detach().numpy()).value == reference
    assert entry.evaluate(lambda x: (model(x), None)).value == reference
    X, y = load_digits_split("test")
    assert accuracy(lambda x: torch.zeros(len(x), 10), X, y) == pytest.approx(float((y == 0).float().mean()))
    with pytest.raises(DataError):
        entry.evaluate(model, data=Path("somewhere"))


def test_inputs_and_batches() -> None:
    entry = get_entry("digits-cnn")
    (x,) = entry.example_inputs(300)  # more than the 270 test images: repeated
    X_test, _ = load_digits_split("test")
    assert x.shape == (300, 1, 8, 8)
    assert torch.equal(x[270:], X_test[:30])
    batches = entry.calibration_data(n=20, batch_size=8)
    assert [b[0].shape[0] for b in batches] == [8, 8, 4]
    assert torch.equal(torch.cat([b[0] for b in batches]), load_digits_split("train")[0][:20])
    real = list(entry.real_batches(100))
    assert torch.equal(torch.cat([b[0] for b in real]), X_test)
