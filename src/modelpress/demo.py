"""`modelpress demo`: the main job on the built-in default model, MiniLM.

With STS-B (`--data`, `$MODELPRESS_STSB`, or `../shared/data/stsb`), compresses all-MiniLM-L6-v2 with
the best built-in recipe, `distill-l3-int8`: distilled to three layers on unlabelled sentences (STS-B
train and the train split of Python's documentation sentences), then SmoothQuant + static int8 with
4-bit embedding tables; the trained student is kept in the cache dir, so later runs skip the training.
Quality is STS-B test Spearman.

Without STS-B (a fresh machine) it says so and uses `int8-smooth`, which needs no training: it is
calibrated on 128 sentences of the documentation's train split, and its quality is the mean cosine
to the fp32 model's embeddings (`fidelity_cosine`) on held-out sentences of the documentation's test
split, which no training or calibration step sees. A distilled student cannot be judged without STS-B,
so the demo does not train one.

Either way it exports the deployable artifacts (`model.onnx` for ONNX Runtime, `model.pt2` for
AOTInductor) and prints the original and every artifact side by side: size, latency at batch 1 and
32, throughput on real sentences, and quality. The report folder holds the artifacts, report.json,
report.md, report.html (each naming the data every step used) and the recipe.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from modelpress.core.report import Report

DEFAULT_MODEL = "minilm"
# the smallest and fastest built-in recipe within the STS-B target of 81.0 (see BENCHMARKS.md)
DEFAULT_RECIPE = "distill-l3-int8"
# without STS-B: the built-in recipe that needs no training with the highest held-out fidelity
# (int8-smooth 0.998, int8-static 0.994 on the documentation's test split)
NO_STSB_RECIPE = "int8-smooth"


def choose_recipe(data: Path | None = None) -> tuple[str, str | None]:
    """The demo's recipe, and (without STS-B) the line that says why it is not the default one."""
    from modelpress.zoo import get_entry
    from modelpress.zoo.stsb import default_stsb_dir, stsb_search_paths

    if data is not None or default_stsb_dir() is not None:
        return DEFAULT_RECIPE, None
    places = ", ".join(["$MODELPRESS_STSB (unset)", *(str(p) for p in stsb_search_paths())])
    held_out = len(get_entry(DEFAULT_MODEL).fidelity_set("test"))  # type: ignore[attr-defined]
    return NO_STSB_RECIPE, (
        f"STS-B not found at {places}: using recipe {NO_STSB_RECIPE}, which needs no training; quality is "
        f"fidelity on {held_out} held-out sentences (Python documentation, test split). Give STS-B with "
        f"--data or $MODELPRESS_STSB to run {DEFAULT_RECIPE} and score STS-B."
    )


def run_demo(
    data: Path | None = None,
    threads: int | None = None,
    out_dir: Path = Path("modelpress-out/demo"),
    progress: bool = True,
    console: Console | None = None,
    recipe: str | None = None,
) -> Report:
    """Compress the default model with `recipe` (default: `choose_recipe`), measure it against the original,
    write `out_dir`."""
    from modelpress.core.options import RunOptions
    from modelpress.pipeline import compress

    console = console or Console()
    if recipe is None:
        recipe, why = choose_recipe(data)
        if why and progress:
            console.print(why)
    options = RunOptions(threads=threads, eval_data=data, progress=progress, console=console)
    # the demo's folder is its own: each run replaces the last
    _, report = compress(DEFAULT_MODEL, recipe, out_dir=out_dir, options=options, overwrite=True)
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
                evaluation = report.data.get("evaluation")
                console.print(
                    f"quality of {best.name}: {base.quality.name} {base.quality.value:.4f} -> "
                    f"{best.quality.value:.4f}" + (f" on {_describe(evaluation)}" if evaluation else "")
                )
        for use in ("training", "calibration"):
            if use in report.data:
                console.print(f"{use}: {_describe(report.data[use])}")
        console.print(f"report written to {out_dir}/ (report.json/md/html, model.onnx, model.pt2, recipe.yaml)")
    return report


def _describe(record: dict) -> str:
    """A `Report.data` record in words: "305 sentences of SOURCE, test split"."""
    return f"{record['count']} {record.get('unit', 'sentences')} of {record['source']}, {record['split']} split"
