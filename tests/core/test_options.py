"""RunOptions: one frozen object for a run's settings, every value checked when it is made."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from modelpress.core import BadInputError, Context, RunOptions
from modelpress.core.options import MAX_BATCH_SIZE, MAX_REPEATS


def test_defaults_and_a_checked_copy(tmp_path: Path) -> None:
    opts = RunOptions()
    assert opts.batch_sizes == (1, 32) and opts.repeats == 20 and opts.progress and opts.eval_data is None
    quiet = opts.replace(progress=False, batch_sizes=[1, 8], cache_dir=str(tmp_path))
    assert quiet.batch_sizes == (1, 8) and quiet.cache_dir == tmp_path and not quiet.progress and opts.progress
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.threads = 2  # type: ignore[misc]
    with pytest.raises(BadInputError, match="repeats"):
        opts.replace(repeats=0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("batch_sizes", (), "batch_sizes must be positive integers"),
        ("batch_sizes", (1, 0), "got \\(1, 0\\)"),
        ("batch_sizes", (MAX_BATCH_SIZE + 1,), f"at most {MAX_BATCH_SIZE}"),
        ("batch_sizes", (True,), "batch_sizes"),
        ("repeats", 0, f"\\[1, {MAX_REPEATS}\\]"),
        ("repeats", MAX_REPEATS + 1, "repeats"),
        ("repeats", 2.5, "repeats"),
        ("threads", 0, "threads must be a positive integer"),
        ("eval_data", Path("/no/such/folder"), "eval_data /no/such/folder: no such file or folder"),
    ],
)
def test_bad_values_are_refused_naming_them(field: str, value: object, message: str) -> None:
    with pytest.raises(BadInputError, match=message):
        RunOptions(**{field: value})


def test_a_fifo_as_eval_data_is_refused_without_opening_it(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(BadInputError, match="named pipe"):
        RunOptions(eval_data=fifo)


def test_the_context_reads_its_settings_from_the_options(tmp_path: Path) -> None:
    ctx = Context(options=RunOptions(threads=1, progress=False, cache_dir=tmp_path))
    assert ctx.threads == 1 and not ctx.show_progress and ctx.cache_dir == tmp_path
    trial = ctx.quiet()
    assert trial.options.threads == 1 and trial.report is not ctx.report and trial.data is ctx.data
