"""Options and argument checks shared by the `modelpress` commands (see cli.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from modelpress.core.errors import BadInputError


def check_threads_option(value: int | None) -> int | None:
    """--threads: at most the CPUs this process may use, checked as the command line is read."""
    from modelpress.core.environment import check_threads

    return check_threads(value)


ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        "-t",
        help="Torch / ONNX Runtime threads, at most the CPUs this process may use (default: all cores).",
        min=1,
        callback=check_threads_option,
    ),
]
DataOpt = Annotated[
    Path | None,
    typer.Option("--data", help="Evaluation data, e.g. the STS-B folder for minilm (default: found automatically)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists (else refused).")]
TrustCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-code",
        help="Load files that run code when loaded (pickles, .pt2 programs and packages, TorchScript, "
        "folders with custom code); only from a source you trust.",
    ),
]
TrustPickleOpt = Annotated[bool, typer.Option("--trust-pickle", hidden=True, help="Deprecated: --trust-code.")]
InputShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--input-shape",
        help="Inputs of a model that does not know its own (a package.module:factory), batch first "
        "(e.g. 1,3,224,224); repeat per input.",
    ),
]
LikeOpt = Annotated[
    str | None,
    typer.Option(
        "--like",
        help="Zoo entry whose inputs and metric apply to models that have none "
        "(e.g. an exported MiniLM: --like minilm).",
    ),
]
WeightsOpt = Annotated[
    Path | None,
    typer.Option("--weights", help="Weights for a package.module:factory model (.safetensors or weights-only .pt)."),
]


def check_data(path: Path | None, option: str) -> None:
    """A data path given on the command line exists and is a file or folder (a FIFO or device would block)."""
    from modelpress.trust import check_not_special

    if path is None:
        return
    check_not_special(path, option, BadInputError)
    if not path.exists():
        raise BadInputError(f"{option} {path}: no such file or folder")


def parse_batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise BadInputError(f"--batch-sizes must be comma-separated positive integers, got {text!r}") from None
    if not sizes or any(s < 1 for s in sizes):
        raise BadInputError(f"--batch-sizes must be comma-separated positive integers, got {text!r}")
    from modelpress.measure.latency import MAX_BATCH_SIZE

    if max(sizes) > MAX_BATCH_SIZE:
        raise BadInputError(f"--batch-sizes must each be at most {MAX_BATCH_SIZE}, got {max(sizes)}")
    return sizes


@dataclass(frozen=True)
class AutoFlags:
    """`compress`'s auto-mode flags as given on the command line."""

    auto: bool
    max_drop: str | None
    objective: str
    candidates: str | None
    time_budget: str | None
    exhaustive: bool
    no_cache: bool

    def search(self) -> Any:
        """The `AutoSearch` the flags ask for (None without --auto); a flag that needs --auto, or a bad value, is
        refused here, before the model loads."""
        from modelpress.auto import AutoSearch

        if self.auto and self.max_drop is None:
            raise BadInputError("--auto needs --max-drop, the allowed quality drop (e.g. 0.5 STS-B points)")
        given = (("--candidates", self.candidates), ("--time-budget", self.time_budget),
                 ("--exhaustive", self.exhaustive), ("--no-cache", self.no_cache))  # fmt: skip
        for flag, value in given:
            if value and not self.auto:
                raise BadInputError(f"{flag} goes with --auto")
        if not self.auto:
            return None
        tried = None if self.candidates is None else tuple(c.strip() for c in self.candidates.split(",") if c.strip())
        if tried == ():
            raise BadInputError(f"--candidates {self.candidates!r} names no recipe")
        return AutoSearch(
            max_drop=self.max_drop,  # type: ignore[arg-type]
            objective=self.objective,  # type: ignore[arg-type]
            candidates=tried,
            time_budget=self.time_budget,
            strategy="exhaustive" if self.exhaustive else "search",
            cache=not self.no_cache,
        )
