"""`modelpress demo`: the main job on the built-in default model, MiniLM.

Until the compression passes land, the demo measures and evaluates the baseline: size,
parameters, latency at batch 1 and 32, throughput on real sentences, peak memory and the
STS-B score (embedding fidelity when STS-B is absent), and writes a report folder.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from modelpress.core.atomic import atomic_dir
from modelpress.core.report import Report

DEFAULT_MODEL = "minilm"


def run_demo(
    data: Path | None = None,
    threads: int | None = None,
    out_dir: Path = Path("modelpress-out/demo"),
    progress: bool = True,
    console: Console | None = None,
) -> Report:
    """Benchmark and evaluate the default model; write report.json and report.md into `out_dir`."""
    from modelpress.core.environment import environment
    from modelpress.measure import bench, stats_table

    console = console or Console()
    (stats,) = bench([DEFAULT_MODEL], batch_sizes=(1, 32), threads=threads, eval_data=data, progress=progress)
    report = Report(model=DEFAULT_MODEL, baseline=stats, environment=environment(threads))
    report.warn("compression passes are not available yet: the demo reports the baseline only")
    with atomic_dir(out_dir) as tmp:
        report.write(tmp)
    if progress:
        console.print(stats_table([stats]))
        if stats.quality is not None:
            console.print(f"quality: {stats.quality.name} = {stats.quality.value:.4f}")
        console.print(f"report written to {out_dir}/report.json and report.md")
    return report
