"""Auto mode's two budgets: the quality drop allowed (`max_drop`) and the wall time the search may take.

>>> parse_max_drop("5%"), parse_max_drop(0.5)
((0.05, True), (0.5, False))
>>> parse_duration("90s"), parse_duration("5m"), parse_duration("1h")
(90.0, 300.0, 3600.0)
>>> clock = Clock(300.0); clock.remaining()          # seconds left of the budget
"""

from __future__ import annotations

import math
import re
import time

from modelpress.core.errors import ConfigError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*([smh]?)\s*$")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
DURATION_FORMS = "a number of seconds, minutes or hours such as 90s, 5m, 1.5h (a bare number is seconds)"


def parse_duration(value: float | str | None) -> float | None:
    """A time budget in seconds: `90s`, `5m`, `1h`, `1.5m`, or a number of seconds; None: no budget.
    Anything else, zero or a negative value is refused (`ConfigError`, naming the value and the forms)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"time_budget (--time-budget) must be {DURATION_FORMS}, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value).lower())
        if match is None:
            raise ConfigError(f"time_budget (--time-budget) must be {DURATION_FORMS}, got {value!r}")
        seconds = float(match.group(1)) * _UNIT_S[match.group(2)]
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"time_budget (--time-budget) must be {DURATION_FORMS}, greater than zero, got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """`seconds` as a short text: 42 s, 3.5 min, 1.2 h."""
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def parse_max_drop(max_drop: float | str) -> tuple[float, bool]:
    """The budget as (amount, relative): `0.5` is 0.5 in the metric's units; `"5%"` is a 5% change of the
    original's value (a perplexity may rise 5%). Refuses anything else (`ConfigError`)."""
    if not isinstance(max_drop, str):
        check_max_drop(max_drop)
        return float(max_drop), False
    text = max_drop.strip()
    try:
        amount = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ConfigError(
            f"max_drop must be a number in the metric's units (0.5) or a percentage of the original's value "
            f"(5%), got {max_drop!r}"
        ) from None
    check_max_drop(amount)
    return amount, text.endswith("%")


def check_max_drop(max_drop: float | str) -> None:
    """Refuse a quality budget that is not a finite number >= 0 (NaN would compare false with every drop)."""
    if isinstance(max_drop, str):
        parse_max_drop(max_drop)
        return
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not math.isfinite(max_drop):
        raise ConfigError(
            f"max_drop must be a finite number >= 0 (the allowed quality drop in the metric's units), got {max_drop}"
        )
    if max_drop < 0:
        raise ConfigError(f"max_drop must be >= 0, got {max_drop}")


class Clock:
    """The search's wall time against its budget (None: unbounded). `time_fn` is replaceable in tests."""

    def __init__(self, budget_s: float | None, time_fn: object = time.monotonic) -> None:
        self.budget_s = budget_s
        self._now = time_fn
        self.start = self.now()

    def now(self) -> float:
        return float(self._now())  # type: ignore[operator]

    def elapsed(self) -> float:
        return self.now() - self.start

    def remaining(self) -> float:
        return math.inf if self.budget_s is None else self.budget_s - self.elapsed()

    def affords(self, seconds: float) -> bool:
        """Whether `seconds` more of work still fits the budget."""
        return seconds <= self.remaining()
