"""Signals while the CLI runs: SIGINT, SIGTERM and SIGHUP unwind the run like Ctrl-C.

Each is raised as a `KeyboardInterrupt` (`Terminated`), so every `finally` cleans up what the run started
(temporary folders, locks, child processes); the exit code is 128 + the signal's number.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

_SIGNALS_RECEIVED: list[int] = []


class Terminated(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP, raised as a KeyboardInterrupt so that every `finally` cleans up the run."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminate(signum: int, frame: Any) -> None:
    if _importing(frame):
        # An exception raised while a C extension initialises (its init runs Python imports) crashes
        # the interpreter: deliver the signal again once the import is over.
        threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
        return
    _SIGNALS_RECEIVED.append(signum)  # typer turns the exception into exit code 130: keep which signal it was
    raise Terminated(signum)


def _importing(frame: Any) -> bool:
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


@contextlib.contextmanager
def unwind_on_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise `Terminated` in the block (main thread only; handlers restored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _terminate) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def signal_exit_code() -> int:
    """128 + the last signal received (Ctrl-C: 130 where none was caught here)."""
    return 128 + int(_SIGNALS_RECEIVED[-1] if _SIGNALS_RECEIVED else signal.SIGINT)
