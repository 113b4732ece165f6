"""For the small zoo classifiers trained locally: deterministic training, its fingerprint, logits from any callable."""

from __future__ import annotations

import hashlib
import json
from abc import abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from modelpress.core.context import Context
from modelpress.core.options import RunOptions
from modelpress.zoo.base import ZooEntry

OPTIMIZER = "AdamW+OneCycle"


def as_logits(out: Any) -> torch.Tensor:
    """Logits from whatever a model callable returns: a tensor, a tuple/list, or numpy."""
    if isinstance(out, tuple | list):
        out = out[0]
    return torch.as_tensor(np.asarray(out)) if not isinstance(out, torch.Tensor) else out


def train_classifier(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    seed: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
    label: str,
    params: Iterable[nn.Parameter] | None = None,
    progress: bool = False,
    threads: int | None = 1,
) -> nn.Module:
    """Train `model` in place on (`X`, `y`) with AdamW and a one-cycle schedule; returns it in eval mode.

    Deterministic for a given `seed` (it orders the batches). `params` are the parameters trained
    (default all of the model's); `label` names the progress bar ("training <label>"). `threads`
    torch threads run the loop (restored after; None keeps the current count).
    """
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = -(-len(y) // batch_size)
    opt = torch.optim.AdamW(model.parameters() if params is None else params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    ctx = Context(options=RunOptions(threads=threads, progress=progress))
    model.train()
    with ctx.threads_scope():
        for _ in ctx.progress(range(epochs), f"training {label}"):
            order = torch.randperm(len(y), generator=gen)
            for i in range(0, len(y), batch_size):
                idx = order[i : i + batch_size]
                opt.zero_grad(set_to_none=True)
                loss_fn(model(X[idx]), y[idx]).backward()
                opt.step()
                sched.step()
    return model.eval()


def recipe_fingerprint(
    version: int,
    arch: nn.Module,
    split: dict[str, Any],
    *,
    epochs: int,
    seed: int,
    lr: float,
    batch_size: int,
    weight_decay: float,
) -> str:
    """Hash of everything that determines weights trained by `train_classifier`; part of the cache file name."""
    recipe = {
        "version": version,
        "arch": repr(arch),
        "split": split,
        "train": {
            "epochs": epochs,
            "seed": seed,
            "lr": lr,
            "batch_size": batch_size,
            "weight_decay": weight_decay,
            "optimizer": OPTIMIZER,
        },
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


class SplitEntry(ZooEntry):
    """A zoo entry whose data are fixed train / val / test tensors: inputs, calibration and batches from them.

    Subclasses give `split(name) -> (X, y)` and the metric (`evaluate`, `validation_quality`).
    """

    @abstractmethod
    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) of the "train", "val" or "test" split."""

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        X, _ = self.split("test")
        reps = -(-batch_size // len(X))
        return (X.repeat(reps, *[1] * (X.dim() - 1))[:batch_size],)  # (batch_size, ...)

    def calibration_data(self, n: int = 64, batch_size: int = 8) -> list[tuple[torch.Tensor, ...]]:
        X = self.split("train")[0][:n]
        return [(X[i : i + batch_size],) for i in range(0, len(X), batch_size)]

    def real_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        X, _ = self.split("test")
        for i in range(0, len(X), batch_size):
            yield (X[i : i + batch_size],)
