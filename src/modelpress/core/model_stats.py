"""One model's measured figures (size, parameters, latency, quality, the speed gate) and their Markdown table.

`core.report.Report` holds these for every form a run measured; `core.report_html` draws them. Both
import them from here, so the page renderer needs nothing from the report module that calls it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Quality:
    """A task metric. `higher_is_better` tells how a drop is computed."""

    name: str
    value: float
    higher_is_better: bool = True
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Latency:
    """Latency of one batch size in milliseconds over `runs` timed repeats after warm-up."""

    p50: float
    p90: float
    mean: float
    min: float
    runs: int


@dataclass
class ModelStats:
    """One model's measured figures; every field is measured, None where not measured."""

    name: str
    size_bytes: int | None = None
    params: int | None = None
    nonzero_params: int | None = None
    latency_ms: dict[str, Latency] = field(default_factory=dict)  # key: batch size as a string
    quality: Quality | None = None
    # the same metric on a validation split, where choices were made (auto mode, mixed precision)
    validation_quality: Quality | None = None
    peak_memory_bytes: int | None = None
    throughput: dict[str, Any] | None = None
    artifact: str | None = None
    # the speed gate against the original measured in the same run (measure/gate.py): status ok / slower /
    # stopped, speedup per batch size, and the message shown wherever the row is
    speed_gate: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelStats:
        d = dict(d)
        d["latency_ms"] = {k: Latency(**v) for k, v in (d.get("latency_ms") or {}).items()}
        for key in ("quality", "validation_quality"):
            if d.get(key) is not None:
                d[key] = Quality(**d[key])
        return cls(**d)


def stats_table_markdown(rows: list[ModelStats]) -> list[str]:
    """A side-by-side Markdown table of several models' figures."""
    batches = sorted({b for r in rows for b in r.latency_ms}, key=int)
    gated = any(r.speed_gate for r in rows)
    head = ["model", "size (MB)", "params", "non-zero"] + [f"p50 ms @bs{b}" for b in batches]
    head += ["vs original"] if gated else []
    head += ["quality"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r.name,
            f"{r.size_bytes / 1e6:.2f}" if r.size_bytes is not None else "-",
            f"{r.params:,}" if r.params is not None else "-",
            f"{r.nonzero_params:,}" if r.nonzero_params is not None else "-",
        ]
        cells += [f"{r.latency_ms[b].p50:.2f}" if b in r.latency_ms else "-" for b in batches]
        cells += [speed_cell(r, batches)] if gated else []
        cells.append(f"{r.quality.name} {r.quality.value:.4f}" if r.quality else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def speed_cell(stats: ModelStats, batches: list[str]) -> str:
    """The speed gate in a table cell: speedups per batch size, "SLOWER" or "STOPPED" when flagged."""
    gate = stats.speed_gate
    if not gate:
        return "-"
    if gate.get("status") == "stopped":
        return f"STOPPED (bs{gate.get('batch_size')} > {gate.get('limit_s', 0):.1f} s)"
    speedup = gate.get("speedup", {})
    ratios = "/".join(f"{speedup[b]:.3g}x" for b in batches if b in speedup)
    if "decode" in speedup:  # a decoder folder against the original's eager decode (auto.decode)
        ratios = "/".join(filter(None, [ratios, f"{speedup['decode']:.3g}x decode"]))
    return f"SLOWER {ratios}" if gate.get("status") == "slower" else ratios
