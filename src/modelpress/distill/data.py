"""Training samples for distillation: tensors, labelled pairs, sentences, or calibration batches.

Each item carries its index, so offline teacher outputs can be looked up by sample:

    >>> samples = as_samples((X, y))                      # images + labels
    >>> samples = as_samples(["a sentence", ...], teacher)  # tokenized with the teacher's tokenizer
    >>> batch = samples.collate([samples[i] for i in range(8)])
    >>> batch.index, batch.inputs, batch.labels
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from modelpress.core.errors import DataError


@dataclass
class Batch:
    """Sample indices (B,), the model's positional inputs, and labels (B, ...) or None."""

    index: torch.Tensor
    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor | None = None

    @property
    def attention_mask(self) -> torch.Tensor | None:
        return self.inputs[1] if len(self.inputs) == 2 and self.inputs[1].dim() == 2 else None


class Samples(Dataset, ABC):
    """Base: `samples[i]` is `(i, inputs, label)`; `collate` makes a `Batch`; `fingerprint` hashes the data."""

    labels: torch.Tensor | None = None

    @abstractmethod
    def collate(self, items: list[tuple[int, tuple[torch.Tensor, ...], torch.Tensor | None]]) -> Batch: ...

    @abstractmethod
    def fingerprint(self) -> str: ...


class TensorSamples(Samples):
    """Dense inputs: each tensor has the samples along dim 0 (e.g. images (N, 1, 8, 8)), labels (N, ...)."""

    def __init__(self, *tensors: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        if not tensors:
            raise DataError("distillation data needs at least one input tensor")
        n = len(tensors[0])
        if any(len(t) != n for t in tensors) or (labels is not None and len(labels) != n):
            lengths = [len(t) for t in tensors] + ([len(labels)] if labels is not None else [])
            raise DataError(f"inputs and labels must hold the same number of samples, got {lengths}")
        self.tensors, self.labels = tensors, labels

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, i: int) -> tuple[int, tuple[torch.Tensor, ...], torch.Tensor | None]:
        return i, tuple(t[i] for t in self.tensors), None if self.labels is None else self.labels[i]

    def collate(self, items: list[tuple[int, tuple[torch.Tensor, ...], torch.Tensor | None]]) -> Batch:
        index = torch.tensor([it[0] for it in items], dtype=torch.long)
        inputs = tuple(torch.stack([it[1][k] for it in items]) for k in range(len(self.tensors)))
        labels = torch.stack([it[2] for it in items]) if self.labels is not None else None  # type: ignore[misc]
        return Batch(index, inputs, labels)

    def fingerprint(self) -> str:
        h = hashlib.sha256(b"tensors")
        for t in (*self.tensors, *(() if self.labels is None else (self.labels,))):
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.detach().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()


class TokenSamples(Samples):
    """Variable-length token ids; a batch is `(input_ids, attention_mask)` padded to its longest item."""

    def __init__(self, ids: Sequence[torch.Tensor], pad_id: int = 0, labels: torch.Tensor | None = None) -> None:
        self.ids = [torch.as_tensor(x, dtype=torch.long).reshape(-1) for x in ids]
        if any(len(x) == 0 for x in self.ids):
            raise DataError("token samples must not be empty sequences")
        self.pad_id, self.labels = pad_id, labels

    @classmethod
    def from_sentences(cls, sentences: Sequence[str], tokenizer: Any, max_length: int = 128) -> TokenSamples:
        """Tokenize `sentences` (truncated to `max_length` tokens) without padding."""
        if not sentences:
            raise DataError("distillation needs at least one sentence, got an empty list")
        enc = tokenizer(list(sentences), truncation=True, max_length=max_length, padding=False)
        return cls([torch.tensor(x) for x in enc["input_ids"]], pad_id=int(tokenizer.pad_token_id or 0))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids]

    def __getitem__(self, i: int) -> tuple[int, tuple[torch.Tensor, ...], torch.Tensor | None]:
        return i, (self.ids[i],), None if self.labels is None else self.labels[i]

    def collate(self, items: list[tuple[int, tuple[torch.Tensor, ...], torch.Tensor | None]]) -> Batch:
        seqs = [it[1][0] for it in items]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = s
            mask[row, : len(s)] = 1
        labels = torch.stack([it[2] for it in items]) if self.labels is not None else None  # type: ignore[misc]
        return Batch(torch.tensor([it[0] for it in items], dtype=torch.long), (ids, mask), labels)

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"tokens{self.pad_id}".encode())
        for x in self.ids:
            h.update(len(x).to_bytes(4, "little"))
            h.update(x.numpy().tobytes())
        if self.labels is not None:
            h.update(self.labels.contiguous().numpy().tobytes())
        return h.hexdigest()


def as_samples(data: Any, teacher: Any = None, max_length: int = 128) -> Samples:
    """Normalise user data into `Samples`.

    Accepted: `Samples`; a tensor of inputs (unlabelled); a tuple `(inputs, labels)` of two tensors;
    a list of sentences (tokenized with `teacher.tokenizer`); a list of batches (tuples of tensors, e.g.
    calibration data): text batches `(input_ids, attention_mask)` are split back into sentences.
    """
    if isinstance(data, Samples):
        out = data
    elif isinstance(data, torch.Tensor):
        out = TensorSamples(data)
    elif isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        out = TensorSamples(data[0], labels=data[1])
    elif isinstance(data, (list, tuple)) and data and all(isinstance(s, str) for s in data):
        tokenizer = getattr(teacher, "tokenizer", None)
        if tokenizer is None:
            raise DataError("sentences as distillation data need a teacher with a `tokenizer` (a text encoder)")
        out = TokenSamples.from_sentences(data, tokenizer, max_length)
    elif isinstance(data, (list, tuple)) and data and all(isinstance(b, (tuple, list, torch.Tensor)) for b in data):
        out = _from_batches([(b,) if isinstance(b, torch.Tensor) else tuple(b) for b in data], teacher)
    elif data is None or (hasattr(data, "__len__") and len(data) == 0):
        raise DataError("distillation needs training data, got an empty data set")
    else:
        raise DataError(
            f"distillation data must be a tensor, (inputs, labels), a list of sentences or a list of batches; "
            f"got {type(data).__name__}"
        )
    if len(out) == 0:
        raise DataError("distillation needs training data, got an empty data set")
    return out


def _from_batches(batches: list[tuple[Any, ...]], teacher: Any) -> Samples:
    first = batches[0]
    if not all(isinstance(t, torch.Tensor) for b in batches for t in b):
        raise DataError("every batch of distillation data must be a tuple of tensors")
    is_text = (
        hasattr(teacher, "tokenizer") and len(first) == 2 and first[1].dim() == 2 and not first[1].is_floating_point()
    )
    if is_text:
        ids = [row[m.bool()] for b in batches for row, m in zip(b[0], b[1], strict=True)]
        return TokenSamples(ids, pad_id=int(getattr(teacher.tokenizer, "pad_token_id", 0) or 0))
    if any(len(b) != len(first) for b in batches):
        raise DataError(f"all batches must hold the same number of tensors, got {sorted({len(b) for b in batches})}")
    return TensorSamples(*(torch.cat([b[k] for b in batches]) for k in range(len(first))))
