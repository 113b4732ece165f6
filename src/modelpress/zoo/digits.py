"""`digits-cnn`: a small BatchNorm CNN trained on scikit-learn's bundled 8x8 digits.

Trains in a few seconds on CPU and is cached under the cache dir, keyed by a fingerprint of the
architecture and training recipe, so a changed recipe never reuses stale weights. BatchNorm after
every conv gives Conv-BN folding and channel pruning real work to do.

    >>> entry = get_entry("digits-cnn")
    >>> model = entry.load()
    >>> entry.evaluate(model).value  # test accuracy, ~0.99
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from modelpress.core.context import default_cache_dir
from modelpress.core.errors import BadInputError, DataError
from modelpress.core.registry import TrainingData, register_training_data
from modelpress.core.report import Quality
from modelpress.zoo.base import ModelFn, register_entry
from modelpress.zoo.training import SplitEntry, as_logits, recipe_fingerprint, train_classifier
from modelpress.zoo.weights_cache import load_or_train

SPLIT_SEED = 0
TRAIN_SEED = 0
EPOCHS = 30
LR = 3e-3
BATCH_SIZE = 64
WEIGHT_DECAY = 1e-4
RECIPE_VERSION = 1  # bump when the training code changes in a way the constants above do not show
_SPLITS = ("train", "val", "test")


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU x3 with global average pooling: [B, 1, 8, 8] -> logits [B, 10]."""

    def __init__(self, widths: tuple[int, int, int] = (16, 32, 64), num_classes: int = 10) -> None:
        super().__init__()
        c1, c2, c3 = widths
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, c2, 4, 4)
            nn.Conv2d(c2, c3, 3, padding=1, bias=False),
            nn.BatchNorm2d(c3),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),  # (B, c3, 1, 1)
            nn.Flatten(),  # (B, c3)
        )
        self.classifier = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@lru_cache(maxsize=1)
def _splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    X = (data.images / 16.0).astype(np.float32)[:, None]  # (1797, 1, 8, 8) in [0, 1]
    y = data.target.astype(np.int64)
    idx = np.arange(len(y))
    # 70 / 15 / 15, stratified, fixed seed.
    train, rest = train_test_split(idx, test_size=0.3, stratify=y, random_state=SPLIT_SEED)
    val, test = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=SPLIT_SEED)
    return {name: (X[i], y[i]) for name, i in zip(_SPLITS, (train, val, test), strict=True)}


def load_digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, 1, 8, 8] float32 in [0, 1] and labels [N] int64 of "train", "val" or "test"."""
    if split not in _SPLITS:
        raise BadInputError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
    X, y = _splits()[split]
    return torch.from_numpy(X.copy()), torch.from_numpy(y.copy())


def accuracy(model_fn: ModelFn, X: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of `model_fn` (any callable returning logits) on `X`, `y`."""
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            pred = as_logits(model_fn(X[i : i + batch_size])).argmax(dim=-1)
            correct += int((pred.cpu() == y[i : i + batch_size]).sum())
    return correct / len(y)


def train_digits_cnn(
    model: nn.Module,
    epochs: int = EPOCHS,
    seed: int = TRAIN_SEED,
    lr: float = LR,
    batch_size: int = BATCH_SIZE,
    weight_decay: float = WEIGHT_DECAY,
    train_set: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool = False,
    threads: int | None = 1,
) -> nn.Module:
    """Train `model` in place with AdamW and a one-cycle schedule; deterministic for a given seed.

    `train_set` defaults to the train split; pass another (X, y) to fine-tune, e.g. after pruning.
    `threads` torch threads run the loop (restored after; None keeps the current count): the ops
    are so small that one thread is as fast as two when idle and many times faster on a busy CPU.
    Returns the model in eval mode.
    """
    X, y = train_set if train_set is not None else load_digits_split("train")
    return train_classifier(
        model,
        X,
        y,
        epochs=epochs,
        seed=seed,
        lr=lr,
        batch_size=batch_size,
        weight_decay=weight_decay,
        label="digits-cnn",
        progress=progress,
        threads=threads,
    )


def _fingerprint() -> str:
    """Hash of everything that determines the trained weights; part of the cache file name."""
    return recipe_fingerprint(
        RECIPE_VERSION,
        DigitsCNN(),
        {"seed": SPLIT_SEED, "fractions": [0.7, 0.15, 0.15], "scale": 1 / 16},
        epochs=EPOCHS,
        seed=TRAIN_SEED,
        lr=LR,
        batch_size=BATCH_SIZE,
        weight_decay=WEIGHT_DECAY,
    )


def load_digits_cnn(cache_dir: Path | None = None, progress: bool = False) -> DigitsCNN:
    """The trained `DigitsCNN`, from the cache if a valid entry exists, else trained and cached."""
    path = Path(cache_dir or default_cache_dir()) / "digits-cnn" / f"{_fingerprint()}.safetensors"

    def build() -> DigitsCNN:
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
            torch.manual_seed(TRAIN_SEED)
            return DigitsCNN()

    def train(model: DigitsCNN) -> None:
        train_digits_cnn(model, EPOCHS, TRAIN_SEED, progress=progress)

    return load_or_train(path, build, train, _fingerprint(), "digits-cnn")


class DigitsEntry(SplitEntry):
    name = "digits-cnn"
    description = "small BatchNorm CNN on scikit-learn's 8x8 digits (trained locally, cached)"
    task = "image-classification"
    input_names = ("images",)

    def load(self, cache_dir: Path | None = None) -> nn.Module:
        return load_digits_cnn(cache_dir)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return load_digits_split(name)  # images (N, 1, 8, 8)

    def evaluate(self, model: ModelFn, data: Path | None = None) -> Quality:
        if data is not None:
            raise DataError(f"digits-cnn evaluates on scikit-learn's bundled digits; got data={data}")
        X, y = load_digits_split("test")
        return Quality(name="accuracy", value=accuracy(model, X, y), details={"n": len(y)})

    def validation_quality(self, model: ModelFn, data: Path | None = None) -> Quality:
        X, y = load_digits_split("val")
        return Quality(name="accuracy", value=accuracy(model, X, y), details={"n": len(y), "split": "val"})

    def finetune(self, model: nn.Module, epochs: int = 5, lr: float | None = None) -> nn.Module:
        """A short, deterministic fine-tune on the train split (after quantization or pruning)."""
        return train_digits_cnn(model, epochs=epochs, lr=LR / 3 if lr is None else lr)


def _training_data(model: nn.Module) -> TrainingData:
    """A digits-cnn teacher's training set (distillation): the train split with its labels."""
    data = load_digits_split("train")
    return data, {"source": "scikit-learn digits", "split": "train", "count": len(data[1])}


register_entry("digits-cnn", DigitsEntry)
register_training_data(lambda model: isinstance(model, DigitsCNN), _training_data)
