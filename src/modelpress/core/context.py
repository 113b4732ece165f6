"""The context a pass receives: data, threads, progress, cache and the report sink.

A pass never reaches for global state; whatever it needs comes in through `Context`.

    >>> ctx = Context(options=RunOptions(threads=2), report=Report(model="digits-cnn"))
    >>> with ctx.threads_scope():
    ...     for batch in ctx.progress(batches, "calibrating"):
    ...         ...
    >>> ctx.warn("skipped conv3: unsupported groups")   # listed in the report
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from modelpress.core.options import RunOptions
from modelpress.core.options import default_cache_dir as default_cache_dir
from modelpress.core.report import Report

T = TypeVar("T")


@dataclass
class Context:
    """Everything a pass may use besides the model and its config."""

    data: Iterable[Any] | None = None  # calibration / training batches
    options: RunOptions = field(default_factory=RunOptions)  # threads, progress, cache dir, ...
    report: Report = field(default_factory=lambda: Report(model="unknown"))
    # Fine-tunes a model in place and returns it (QAT, recovery after pruning); a zoo entry's `finetune`.
    train_fn: Callable[[Any], Any] | None = None
    # The metric passes choose by (higher is better): a zoo entry's validation split where it has one.
    metric: Callable[[Any], float] | None = None

    # The loss a gradient-based pass differentiates, `loss_fn(model, batch) -> scalar` (default: label-free).
    loss_fn: Callable[[Any, Any], Any] | None = None
    # One batch of positional inputs that a pass traces the model with (default: the first batch of `data`).
    example_inputs: tuple[Any, ...] | None = None
    # The training set of a pass that trains (distillation) and the report's record of it, given the model;
    # resolved by the caller (a zoo entry's `training_set`); None: the pass asks `core.registry.training_data`.
    training_data: Callable[[Any], tuple[Any, dict[str, Any] | None]] | None = None

    @property
    def threads(self) -> int | None:
        """Torch intra-op threads while a pass runs; None keeps the current count."""
        return self.options.threads

    @property
    def show_progress(self) -> bool:
        return self.options.progress

    @property
    def cache_dir(self) -> Path:
        return self.options.cache_dir

    def quiet(self) -> Context:
        """A context for trial runs: the same data and options without progress bars, a throwaway report."""
        import copy

        return dataclasses.replace(
            self, options=self.options.replace(progress=False), report=copy.deepcopy(self.report)
        )

    def warn(self, message: str) -> None:
        """Record a warning the report lists (e.g. a skipped layer)."""
        import warnings

        warnings.warn(message, stacklevel=2)
        self.report.warn(message)

    @contextlib.contextmanager
    def threads_scope(self) -> Iterator[None]:
        """Run the block with `threads` torch threads, restoring the previous count after."""
        import torch

        if self.threads is None:
            yield
            return
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def progress(self, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
        """Iterate with a rich progress bar (on stderr) unless progress is switched off."""
        if not self.show_progress:
            yield from items
            return
        from rich.progress import track

        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        yield from track(items, description=description, total=total, transient=True)
