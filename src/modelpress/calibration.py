"""Calibration data from a user's file: sentences for text models, tensors for everything else.

- `.txt`: one sentence per line, tokenized by the model's tokenizer (text models only);
- `.npy` / `.safetensors` / `.pt` (weights only): input tensors, first dimension = samples.
  A `.safetensors` file with several tensors feeds them positionally, in key order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelpress.core.errors import DataError


def load_calibration(path: str | Path, entry: Any | None = None, batch_size: int = 8) -> list[tuple[torch.Tensor, ...]]:
    """Batches of real inputs read from `path` (see the module docstring for the formats)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"calibration data {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _sentences(path, entry, batch_size)
    if suffix == ".npy":
        tensors = [torch.from_numpy(np.load(path, allow_pickle=False))]
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        loaded = load_file(str(path))
        tensors = [loaded[k] for k in sorted(loaded)]
    elif suffix in (".pt", ".pth"):
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
        tensors = list(obj) if isinstance(obj, (tuple, list)) else [obj]
    else:
        raise DataError(f"calibration data {path}: unsupported suffix {suffix!r}; use .txt, .npy, .safetensors or .pt")
    if not tensors or any(not isinstance(t, torch.Tensor) for t in tensors):
        raise DataError(f"calibration data {path} must hold tensors")
    n = tensors[0].shape[0] if tensors[0].dim() else 0
    if n == 0:
        raise DataError(f"calibration data {path} is empty")
    if any(t.shape[0] != n for t in tensors):
        raise DataError(
            f"calibration data {path}: tensors disagree on the number of samples "
            f"({', '.join(str(t.shape[0]) for t in tensors)})"
        )
    return [tuple(t[i : i + batch_size] for t in tensors) for i in range(0, n, batch_size)]


def _sentences(path: Path, entry: Any | None, batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    from modelpress.zoo.text import FolderEntry, dynamic_batches

    if not isinstance(entry, FolderEntry):
        raise DataError(f"calibration data {path} is text, but the model is not a text encoder with a tokenizer")
    sentences = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not sentences:
        raise DataError(f"calibration data {path} has no sentences")
    model = entry.model
    return list(dynamic_batches(model.tokenizer, sentences, batch_size, model.max_seq_length))
