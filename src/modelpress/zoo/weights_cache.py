"""Trained zoo weights cached as safetensors with a checksum: a corrupt file is detected and retrained.

>>> model = load_or_train(path, build, train, fingerprint, "digits-cnn")   # cached weights, else trained
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from modelpress.core.atomic import atomic_path

M = TypeVar("M", bound=nn.Module)


def checksum(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names and bytes of every tensor, in name order."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def load_cached(path: Path, model: nn.Module, label: str) -> bool:
    """Load weights from `path` into `model`; False (with a warning naming `label`) if missing or corrupt."""
    if not path.exists():
        return False
    try:
        with safe_open(path, framework="pt") as f:
            expected = (f.metadata() or {}).get("sha256")
            state = {k: f.get_tensor(k) for k in f.keys()}
        if expected != checksum(state):
            raise ValueError("checksum mismatch")
        model.load_state_dict(state, strict=True)
    except (SafetensorError, ValueError, RuntimeError, OSError) as e:
        warnings.warn(f"corrupt {label} cache {path} ({e}); retraining", stacklevel=3)
        return False
    return True


def save_cached(path: Path, model: nn.Module, fingerprint: str) -> None:
    """Write `model`'s weights to `path` atomically, with their checksum and the training fingerprint."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, tmp, metadata={"sha256": checksum(state), "fingerprint": fingerprint})


def load_or_train(path: Path, build: Callable[[], M], train: Callable[[M], object], fingerprint: str, label: str) -> M:
    """`build()`'s model with the weights cached at `path` when they are valid; else a new `build()` trained by
    `train` (in place) and cached. `build` must be deterministic (seeded), so a retrain gives the same weights."""
    model = build()
    if load_cached(path, model, label):
        return model.eval()
    model = build()  # a failed load may have left some tensors replaced
    train(model)
    save_cached(path, model, fingerprint)
    return model
