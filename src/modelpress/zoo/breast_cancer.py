"""`breast-cancer`: an MLP diagnosing tumours from scikit-learn's bundled Wisconsin breast-cancer data.

569 real clinical measurements (30 features of cell nuclei per sample), malignant or benign. The
model takes the raw measurements: the standardization (mean and std of the training split) is a
fixed layer inside it, so exported artifacts need no preprocessing. Trained deterministically in
about a second on CPU and cached under the cache dir, keyed by a fingerprint of the architecture
and training recipe.

The positive class is *malignant* (label 0 in scikit-learn's encoding): sensitivity is the
fraction of malignant tumours found, specificity the fraction of benign ones cleared, and the
ROC AUC ranks samples by the predicted probability of malignancy.

    >>> entry = get_entry("breast-cancer")
    >>> q = entry.evaluate(entry.load())
    >>> q.value, q.details["sensitivity"], q.details["specificity"], q.details["auc"]
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modelpress.core.context import default_cache_dir
from modelpress.core.errors import BadInputError, DataError
from modelpress.core.report import Quality
from modelpress.zoo.base import ModelFn, register_entry
from modelpress.zoo.training import SplitEntry, as_logits, recipe_fingerprint, train_classifier
from modelpress.zoo.weights_cache import load_or_train

SPLIT_SEED = 0
TRAIN_SEED = 0
EPOCHS = 60
LR = 3e-3
BATCH_SIZE = 32
WEIGHT_DECAY = 1e-4
HIDDEN = (64, 32)
RECIPE_VERSION = 1  # bump when the training code changes in a way the constants above do not show
MALIGNANT = 0  # scikit-learn's label for the positive class
_SPLITS = ("train", "val", "test")


class Standardize(nn.Module):
    """(x - mean) / std with fixed buffers: the model takes raw measurements."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class BreastCancerMLP(nn.Module):
    """Standardize -> Linear-ReLU x2 -> Linear: [B, 30] raw measurements -> logits [B, 2] (0 malignant, 1 benign)."""

    def __init__(self, num_features: int = 30, hidden: tuple[int, int] = HIDDEN, num_classes: int = 2) -> None:
        super().__init__()
        h1, h2 = hidden
        self.standardize = Standardize(torch.zeros(num_features), torch.ones(num_features))
        self.fc1 = nn.Linear(num_features, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.classifier = nn.Linear(h2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(self.standardize(x)))
        h = torch.relu(self.fc2(h))
        return self.classifier(h)


@lru_cache(maxsize=1)
def _splits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    data = load_breast_cancer()
    X = data.data.astype(np.float32)  # (569, 30) raw measurements
    y = data.target.astype(np.int64)  # 0 malignant (212), 1 benign (357)
    idx = np.arange(len(y))
    # 60 / 20 / 20, stratified, fixed seed: 341 / 114 / 114 samples.
    train, rest = train_test_split(idx, test_size=0.4, stratify=y, random_state=SPLIT_SEED)
    val, test = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=SPLIT_SEED)
    return {name: (X[i], y[i]) for name, i in zip(_SPLITS, (train, val, test), strict=True)}


def load_breast_cancer_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw measurements [N, 30] float32 and labels [N] int64 (0 malignant) of "train", "val" or "test"."""
    if split not in _SPLITS:
        raise BadInputError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
    X, y = _splits()[split]
    return torch.from_numpy(X.copy()), torch.from_numpy(y.copy())


def diagnostic_metrics(model_fn: ModelFn, X: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> dict[str, Any]:
    """Accuracy, sensitivity, specificity and ROC AUC of `model_fn` (any callable returning logits).

    Positive = malignant. AUC scores samples by the softmax probability of malignancy.
    """
    from sklearn.metrics import roc_auc_score

    chunks = []
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            chunks.append(as_logits(model_fn(X[i : i + batch_size])).detach().float().cpu())
    logits = torch.cat(chunks)  # (N, 2)
    if logits.ndim != 2 or logits.shape != (len(y), 2):
        raise DataError(f"expected logits of shape ({len(y)}, 2) from the model, got {tuple(logits.shape)}")
    p_malignant = torch.softmax(logits, dim=-1)[:, MALIGNANT].numpy()
    pred_pos = (logits.argmax(dim=-1) == MALIGNANT).numpy()
    true_pos = (y == MALIGNANT).numpy()
    tp = int((pred_pos & true_pos).sum())
    fn = int((~pred_pos & true_pos).sum())
    tn = int((~pred_pos & ~true_pos).sum())
    fp = int((pred_pos & ~true_pos).sum())
    return {
        "accuracy": (tp + tn) / len(y),
        "sensitivity": tp / (tp + fn),
        "specificity": tn / (tn + fp),
        "auc": float(roc_auc_score(true_pos, p_malignant)),
        "confusion": {"tp": tp, "fn": fn, "tn": tn, "fp": fp},
        "n": len(y),
    }


def evaluate_split(model_fn: ModelFn, split: str = "test") -> Quality:
    """`Quality` of `model_fn` on one split: value = accuracy, details = the diagnostic metrics.

    Choose among compressed candidates on "val"; report on "test" only.
    """
    X, y = load_breast_cancer_split(split)
    m = diagnostic_metrics(model_fn, X, y)
    return Quality(name="accuracy", value=m.pop("accuracy"), details={"split": split, "positive": "malignant", **m})


def train_breast_cancer_mlp(
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

    `train_set` defaults to the train split. The standardization buffers are not trained.
    Returns the model in eval mode.
    """
    X, y = train_set if train_set is not None else load_breast_cancer_split("train")
    return train_classifier(
        model,
        X,
        y,
        epochs=epochs,
        seed=seed,
        lr=lr,
        batch_size=batch_size,
        weight_decay=weight_decay,
        label="breast-cancer",
        params=[p for p in model.parameters() if p.requires_grad],
        progress=progress,
        threads=threads,
    )


def _fingerprint() -> str:
    """Hash of everything that determines the trained weights; part of the cache file name."""
    return recipe_fingerprint(
        RECIPE_VERSION,
        BreastCancerMLP(),
        {"seed": SPLIT_SEED, "fractions": [0.6, 0.2, 0.2], "standardize": "train mean/std"},
        epochs=EPOCHS,
        seed=TRAIN_SEED,
        lr=LR,
        batch_size=BATCH_SIZE,
        weight_decay=WEIGHT_DECAY,
    )


def _fresh_model() -> BreastCancerMLP:
    """A seeded, untrained model whose standardization holds the train split's statistics."""
    X, _ = load_breast_cancer_split("train")
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
        torch.manual_seed(TRAIN_SEED)
        model = BreastCancerMLP(num_features=X.shape[1])
    model.standardize = Standardize(X.mean(dim=0), X.std(dim=0))
    return model


def load_breast_cancer_mlp(cache_dir: Path | None = None, progress: bool = False) -> BreastCancerMLP:
    """The trained `BreastCancerMLP`, from the cache if a valid entry exists, else trained and cached."""
    path = Path(cache_dir or default_cache_dir()) / "breast-cancer" / f"{_fingerprint()}.safetensors"

    def train(model: BreastCancerMLP) -> None:
        train_breast_cancer_mlp(model, EPOCHS, TRAIN_SEED, progress=progress)

    return load_or_train(path, _fresh_model, train, _fingerprint(), "breast-cancer")


class BreastCancerEntry(SplitEntry):
    name = "breast-cancer"
    description = "MLP diagnosing malignant tumours from scikit-learn's breast-cancer measurements (trained locally)"
    task = "tabular-classification"
    input_names = ("measurements",)

    def load(self, cache_dir: Path | None = None) -> nn.Module:
        return load_breast_cancer_mlp(cache_dir)

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return load_breast_cancer_split(name)  # measurements (N, 30)

    def evaluate(self, model: ModelFn, data: Path | None = None) -> Quality:
        """Test-split accuracy; sensitivity, specificity and AUC (positive = malignant) in `details`."""
        if data is not None:
            raise DataError(f"breast-cancer evaluates on scikit-learn's bundled data set; got data={data}")
        return evaluate_split(model, "test")

    def validation_quality(self, model: ModelFn, data: Path | None = None) -> Quality:
        """The same metrics on the validation split: what a search among compressed candidates may look at."""
        if data is not None:
            raise DataError(f"breast-cancer evaluates on scikit-learn's bundled data set; got data={data}")
        return evaluate_split(model, "val")

    def finetune(self, model: nn.Module, epochs: int = 5, lr: float | None = None) -> nn.Module:
        """A short, deterministic fine-tune on the train split (after quantization or pruning)."""
        return train_breast_cancer_mlp(model, epochs=epochs, lr=LR / 3 if lr is None else lr)


register_entry("breast-cancer", BreastCancerEntry)
