"""Checks on paths given from outside, made before anything is opened."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from modelpress.core.errors import BadInputError, ModelLoadError

_SPECIAL = (
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def check_not_special(path: Path, what: str, error: type[BadInputError] = ModelLoadError) -> None:
    """Refuse `path` if it is a FIFO, socket or device: opening or reading it would block or never end.

    A missing path passes (the caller says what is missing); `what` names the role, e.g. "--data".
    """
    try:
        mode = os.stat(path).st_mode  # stat never opens the file: a FIFO does not block here
    except OSError:
        return
    for test, name in _SPECIAL:
        if test(mode):
            raise error(f"{what} {path} is {name}, not a regular file or folder; give a file")
