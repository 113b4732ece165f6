"""What every zoo entry provides: a real model that works offline, example inputs, and its evaluation.

An entry's `evaluate` takes any callable with the model's forward signature (an eager
`nn.Module`, an ONNX Runtime wrapper, a compiled package), so the same metric measures the
baseline and every compressed form.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelpress.core.errors import ModelLoadError
from modelpress.core.report import Quality

ModelFn = Callable[..., Any]


class ZooEntry(ABC):
    """A named, offline model with its inputs and its task metric."""

    name: str = ""
    description: str = ""
    task: str = ""  # "text-embedding", "image-classification", "voice-activity"
    input_names: tuple[str, ...] = ()
    has_quality: bool = True  # False for entries that only supply inputs (timing and size only)

    @abstractmethod
    def load(self, cache_dir: Path | None = None) -> nn.Module:
        """The fp32 eager model, in eval mode. `cache_dir` is where trained weights are kept."""

    @abstractmethod
    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        """Positional inputs for one forward call at `batch_size` (for latency and export)."""

    @abstractmethod
    def calibration_data(self, n: int = 64, batch_size: int = 8) -> list[tuple[torch.Tensor, ...]]:
        """Real input batches (never the test split) for calibration and fine-tuning."""

    @abstractmethod
    def evaluate(self, model: ModelFn, data: Path | None = None) -> Quality:
        """The task metric of `model`. `data` overrides the default data location where one applies."""

    def validation_quality(self, model: ModelFn, data: Path | None = None) -> Quality | None:
        """The task metric on a held-out validation split, or None where the entry has none.

        Choices made while compressing (mixed precision, auto mode) look at this split, never at the
        one `evaluate` reports: choosing on the reported split would overstate the chosen model.
        """
        return None

    def training_set(self, model: nn.Module) -> tuple[Any, dict[str, Any] | None]:
        """The training set a pass that trains `model` (distillation) uses, and the report's record of it:
        the provider the zoo registered for this kind of model (`core.registry.training_data`), else
        (None, None)."""
        from modelpress.core.registry import training_data

        return training_data(model)

    def finetune(self, model: nn.Module, epochs: int = 5, lr: float | None = None) -> nn.Module:
        """Train `model` in place on this entry's training data (QAT, recovery after pruning)."""
        from modelpress.core.errors import NotAvailableError

        raise NotAvailableError(f"zoo entry {self.name!r} has no fine-tuning loop yet")

    def data_record(self, use: str, count: int | None = None, data: Path | None = None) -> dict[str, Any] | None:
        """Where the data of `use` comes from, for the report: `source`, `split`, `count`; None where unsaid.

        `use`: "training" or "calibration" (`count`: how many samples were taken), "validation" or
        "evaluation" (`data`: the folder given for the task metric).
        """
        return None

    def real_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]] | None:
        """Batches of real inputs for throughput measurement (text: dynamic padding); None if n/a."""
        return None

    def generation_speed(
        self, model: ModelFn, new_tokens: int = 32, batches: tuple[int, ...] = (1, 8)
    ) -> dict[str, Any] | None:
        """Causal LMs: prefill and decode tokens/s of greedy generation; None for other entries."""
        return None

    def items_per_batch(self, batch: Sequence[torch.Tensor]) -> int:
        return int(batch[0].shape[0])

    # Each example input's batch axis, for exporters that make it dynamic; None: axis 0 everywhere.
    batch_axes: tuple[int, ...] | None = None


_ENTRIES: dict[str, Callable[[], ZooEntry]] = {}
# Built-in entries are imported on first use, so listing names never imports transformers.
_BUILTIN = {
    "minilm": "modelpress.zoo.minilm",
    "digits-cnn": "modelpress.zoo.digits",
    "silero-vad": "modelpress.zoo.silero",
    "tiny-lm": "modelpress.zoo.tinylm",
    "mtcnn-pnet": "modelpress.zoo.mtcnn",
    "mtcnn-rnet": "modelpress.zoo.mtcnn",
    "mtcnn-onet": "modelpress.zoo.mtcnn",
    "breast-cancer": "modelpress.zoo.breast_cancer",
    "smollm2-135m": "modelpress.zoo.smollm2",
    "efficientnet-lite0": "modelpress.zoo.efficientnet_lite",
}


def register_entry(name: str, factory: Callable[[], ZooEntry]) -> None:
    """Add a zoo entry; `factory()` builds it (cheaply: the model loads in `entry.load()`)."""
    _ENTRIES[name] = factory


def zoo_names() -> list[str]:
    return sorted(set(_ENTRIES) | set(_BUILTIN))


def get_entry(name: str) -> ZooEntry:
    """The zoo entry called `name`; a clear `ModelLoadError` for an unknown name."""
    if name not in _ENTRIES and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])  # registers itself
    try:
        return _ENTRIES[name]()
    except KeyError:
        raise ModelLoadError(f"unknown zoo model {name!r}; available: {', '.join(zoo_names())}") from None
