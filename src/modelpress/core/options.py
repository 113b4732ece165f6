"""How a run is carried out: one frozen object for every pass, export and measurement of the run.

`compress`, `auto_compress` and the measurement take a `RunOptions` instead of a dozen loose
parameters; the passes read it through `Context.options`. Every value is checked here, once, when
the object is made: a bad value is refused (`BadInputError`, exit 2 on the CLI) before any work.

    >>> opts = RunOptions(threads=2, batch_sizes=(1, 32), repeats=20, eval_data=Path("stsb"))
    >>> quiet = opts.replace(progress=False)
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelpress.core.environment import check_threads
from modelpress.core.errors import BadInputError
from modelpress.core.files import check_not_special

# More runs than this per batch size is certainly a mistake: percentiles are stable after a few
# hundred, and a slow model would keep the machine busy for hours.
MAX_REPEATS = 10_000
MAX_BATCH_SIZE = 65_536  # inputs of a timed batch; larger ones only exhaust memory


def default_cache_dir() -> Path:
    """`$MODELPRESS_CACHE`, else `$XDG_CACHE_HOME/modelpress`, else `~/.cache/modelpress`."""
    if env := os.environ.get("MODELPRESS_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "modelpress"


@dataclass(frozen=True)
class RunOptions:
    """The settings a whole run shares.

    `threads`: torch / ONNX Runtime intra-op threads (None keeps the process's count).
    `batch_sizes`, `repeats`: what the measurement times (timed calls per batch size).
    `eval_data`: the evaluation data of the model's metric (a file or folder; None: the entry's default).
    `validation`: also score every measured form on the model's validation split (auto mode's budget).
    `keep_slower`: write artifacts the speed gate finds slower than the original too.
    `progress`: progress bars and the result table; `console`: the rich console they print on.
    `cache_dir`: where loaders and passes keep their files (`default_cache_dir()` when not given).
    """

    threads: int | None = None
    batch_sizes: tuple[int, ...] = (1, 32)
    repeats: int = 20
    eval_data: Path | None = None
    validation: bool = False
    keep_slower: bool = False
    progress: bool = True
    console: Any = None
    cache_dir: Path = field(default_factory=default_cache_dir)

    def __post_init__(self) -> None:
        check_threads(self.threads)
        sizes = self.batch_sizes
        if isinstance(sizes, int) and not isinstance(sizes, bool):
            sizes = (sizes,)
        if (
            not isinstance(sizes, (tuple, list))
            or not sizes
            or any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_BATCH_SIZE for b in sizes)
        ):
            raise BadInputError(
                f"batch_sizes must be positive integers of at most {MAX_BATCH_SIZE}, got {self.batch_sizes!r}"
            )
        object.__setattr__(self, "batch_sizes", tuple(sizes))
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) or not 1 <= self.repeats <= MAX_REPEATS:
            raise BadInputError(
                f"repeats must be an integer in [1, {MAX_REPEATS}] (timed runs per batch size), got {self.repeats!r}"
            )
        if self.eval_data is not None:
            object.__setattr__(self, "eval_data", check_data_path(self.eval_data, "eval_data"))
        object.__setattr__(self, "cache_dir", Path(self.cache_dir))

    def replace(self, **changes: Any) -> RunOptions:
        """A copy with `changes` (checked like the original)."""
        return dataclasses.replace(self, **changes)


def check_data_path(path: str | Path, what: str) -> Path:
    """`path` as a `Path` when it names an existing file or folder; a FIFO or device (which would block when
    read) or a missing path is refused, naming `what` (the option, e.g. "--data")."""
    path = Path(path)
    check_not_special(path, what, BadInputError)
    if not path.exists():
        raise BadInputError(f"{what} {path}: no such file or folder")
    return path
