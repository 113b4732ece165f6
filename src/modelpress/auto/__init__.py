"""Auto mode: a search for the fastest (or smallest) deployable model within a quality and a time budget.

    >>> stats, report = auto_compress("minilm", AutoSearch(max_drop=0.5, time_budget="5m"), out_dir="out/a")
    >>> stats, report = auto_compress("smollm2-135m", AutoSearch(max_drop="5%", time_budget="15m"),
    ...                               out_dir="out/smollm2-auto", options=RunOptions(threads=2))

`auto.space` generates the candidates, `auto.trial` screens and measures one, `auto.search` runs the
search, `auto.cache` keeps what was measured, `auto.write` writes the choice (see docs/DESIGN.md).
"""

from modelpress.auto.budget import check_max_drop, parse_duration, parse_max_drop
from modelpress.auto.search import AutoSearch, auto_compress
from modelpress.auto.space import Candidate, candidates

__all__ = ["AutoSearch", "auto_compress", "Candidate", "candidates", "check_max_drop", "parse_duration",
           "parse_max_drop"]  # fmt: skip
