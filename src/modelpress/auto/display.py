"""The search's progress bar (rich): what is being tried, the best so far, the time left of the budget."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from modelpress.auto.budget import Clock, format_duration
from modelpress.core.options import RunOptions


class Display:
    """One task: a step per candidate screened and per form measured; disabled without `options.progress`."""

    def __init__(self, options: RunOptions, clock: Clock, total: int) -> None:
        self.clock = clock
        self.bar = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("best: {task.fields[best]}"), TimeElapsedColumn(), TextColumn("{task.fields[budget]}"),
            console=options.console, transient=True, disable=not options.progress,
        )  # fmt: skip
        self.task = self.bar.add_task("auto", total=total, best="-", budget=self._budget())

    def _budget(self) -> str:
        left = self.clock.remaining()
        return "" if left == float("inf") else f"{format_duration(max(0.0, left))} left"

    def __enter__(self) -> Display:
        self.bar.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> Any:
        return self.bar.__exit__(kind, value, tb)

    def step(self, description: str) -> None:
        self.bar.update(self.task, description=description, budget=self._budget())

    def advance(self, best: str | None) -> None:
        self.bar.advance(self.task)
        if best is not None:
            self.best(best)

    def best(self, text: str) -> None:
        self.bar.update(self.task, best=text, budget=self._budget())

    def grow(self, more: int) -> None:
        total = self.bar.tasks[0].total or 0
        self.bar.update(self.task, total=total + more)
