"""`modelpress demo`: the main job on the built-in default model, MiniLM.

Compresses all-MiniLM-L6-v2 with the best built-in recipe (`distill-l3-int8`: distilled to three
layers on unlabelled sentences, then SmoothQuant + static int8 with 4-bit embedding tables; the
trained student is kept in the cache dir, so later runs skip the training), exports the deployable artifacts
(`model.onnx` for ONNX Runtime, `model.pt2` for AOTInductor) and prints the original and every
artifact side by side: size, latency at batch 1 and 32, throughput on real sentences, and the
STS-B score (embedding fidelity when STS-B is absent). The report folder holds the artifacts,
report.json, report.md, report.html and the recipe.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from modelpress.core.report import Report

DEFAULT_MODEL = "minilm"
# the smallest and fastest built-in recipe within the STS-B target of 81.0 (see BENCHMARKS.md)
DEFAULT_RECIPE = "distill-l3-int8"


def run_demo(
    data: Path | None = None,
    threads: int | None = None,
    out_dir: Path = Path("modelpress-out/demo"),
    progress: bool = True,
    console: Console | None = None,
    recipe: str = DEFAULT_RECIPE,
) -> Report:
    """Compress the default model with `recipe`, measure it against the original, write `out_dir`."""
    from modelpress.pipeline import compress

    console = console or Console()
    _, report = compress(
        DEFAULT_MODEL,
        recipe,
        out_dir=out_dir,
        threads=threads,
        eval_data=data,
        progress=progress,
        console=console,
        overwrite=True,  # the demo's folder is its own: each run replaces the last
    )
    if progress:
        base, best = report.baseline, report.compressed
        if base and best:
            for bs in ("1", "32"):
                if bs in base.latency_ms and bs in best.latency_ms:
                    ratio = base.latency_ms[bs].p50 / best.latency_ms[bs].p50
                    console.print(f"batch {bs}: {best.name} is {ratio:.2f}x the original's speed")
            if base.size_bytes and best.size_bytes:
                console.print(f"size: {best.size_bytes / base.size_bytes:.0%} of the original")
            if base.quality and best.quality:
                console.print(f"quality: {base.quality.name} {base.quality.value:.4f} -> {best.quality.value:.4f}")
        console.print(f"report written to {out_dir}/ (report.json/md/html, model.onnx, model.pt2, recipe.yaml)")
    return report
