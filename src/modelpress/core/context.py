"""The context a pass receives: data, threads, progress, cache and the report sink.

A pass never reaches for global state; whatever it needs comes in through `Context`.

    >>> ctx = Context(threads=2, report=Report(model="digits-cnn"))
    >>> with ctx.threads_scope():
    ...     for batch in ctx.progress(batches, "calibrating"):
    ...         ...
    >>> ctx.warn("skipped conv3: unsupported groups")   # listed in the report
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from modelpress.core.environment import check_threads
from modelpress.core.report import Report

T = TypeVar("T")


def default_cache_dir() -> Path:
    """`$MODELPRESS_CACHE`, else `$XDG_CACHE_HOME/modelpress`, else `~/.cache/modelpress`."""
    if env := os.environ.get("MODELPRESS_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "modelpress"


@dataclass
class Context:
    """Everything a pass may use besides the model and its config."""

    data: Iterable[Any] | None = None  # calibration / training batches
    threads: int | None = None  # torch intra-op threads while the pass runs; None keeps the current
    show_progress: bool = True
    cache_dir: Path = field(default_factory=default_cache_dir)
    report: Report = field(default_factory=lambda: Report(model="unknown"))
    # Fine-tunes a model in place and returns it (QAT, recovery after pruning); a zoo entry's `finetune`.
    train_fn: Callable[[Any], Any] | None = None
    # The metric passes choose by (higher is better): a zoo entry's validation split where it has one.
    metric: Callable[[Any], float] | None = None

    def __post_init__(self) -> None:
        check_threads(self.threads)

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
