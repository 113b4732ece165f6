"""Compress a breast-cancer classifier whose accuracy may not drop, and compare it with the original.

    python examples/medical-diagnosis/run.py [--out DIR] [--threads N] [--overwrite]

Applies the built-in `medical-mixed` recipe to the `breast-cancer` zoo model: 2-bit weights, with
the layers whose 2-bit form costs validation accuracy promoted to 8 bits until the drop is zero.
The promotion is chosen on the validation split; the figures reported are those of the test split,
which the selection never sees. Writes `model.onnx` (compressed), `model-fp32.onnx`, `recipe.yaml`,
`results.json` and `results.md` into the output folder, atomically.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from modelpress.core.atomic import atomic_dir
from modelpress.core.context import Context
from modelpress.core.options import RunOptions
from modelpress.core.registry import apply
from modelpress.core.report import Report
from modelpress.export.onnx import export_onnx
from modelpress.export.runtime import OnnxModel
from modelpress.measure.size import artifact_size_bytes
from modelpress.recipes.recipe import load_recipe
from modelpress.zoo.base import get_entry
from modelpress.zoo.breast_cancer import evaluate_split

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import base_parser, check_out, exit_code, layer_bits, parse

RECIPE = "medical-mixed"
DEFAULT_OUT = Path("modelpress-out/medical-diagnosis")
MARKER = "medical-diagnosis"  # results.json "example": a folder holding it is this script's own, replaced freely
LAYERS = (nn.Linear,)  # the float layers whose bit width the results report
METRICS = {"accuracy": "accuracy", "sensitivity": "sensitivity", "specificity": "specificity", "auc": "AUC"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return parse(base_parser(__doc__, DEFAULT_OUT), argv)


def row(label: str, model_fn: Any, size_bytes: int, artifact: str, bits: dict[str, int]) -> dict[str, Any]:
    test = evaluate_split(model_fn, "test")
    val = evaluate_split(model_fn, "val")
    return {
        "model": label,
        "test": {"accuracy": test.value, **test.details},
        "val": {"accuracy": val.value, **val.details},
        "size_bytes": size_bytes,
        "artifact": artifact,
        "bits": bits,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    layers = list(rows[0]["bits"])
    head = ["model", *METRICS.values(), "size (bytes)", "bits " + "/".join(layers)]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        cells = [r["model"], *(f"{r['test'][k]:.4f}" for k in METRICS), f"{r['size_bytes']:,}"]
        cells.append("/".join(str(r["bits"][n]) for n in layers))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def table(rows: list[dict[str, Any]], title: str) -> Table:
    layers = list(rows[0]["bits"])
    t = Table(title=title)
    for column in ("model", *METRICS.values(), "size (bytes)", "bits " + "/".join(layers)):
        t.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        cells = [f"{r['test'][k]:.4f}" for k in METRICS]
        t.add_row(r["model"], *cells, f"{r['size_bytes']:,}", "/".join(str(r["bits"][n]) for n in layers))
    return t


def run(
    out: Path, threads: int, overwrite: bool = False, console: Console | None = None
) -> tuple[dict[str, Any], nn.Module]:
    """Compress, export and measure into `out` (atomically); returns results.json's content and the model."""
    check_out(out, overwrite, MARKER)
    torch.set_num_threads(threads)
    entry = get_entry("breast-cancer")
    model = entry.load()
    recipe = load_recipe(RECIPE)
    report = Report(model=entry.name, recipe={"name": recipe.name, **recipe.to_dict()})
    ctx = Context(
        data=entry.calibration_data(128, 8),  # training split
        options=RunOptions(threads=threads, progress=False),
        report=report,
        metric=lambda m: evaluate_split(m, "val").value,  # validation split: the test split stays unseen
    )
    compressed = copy.deepcopy(model)
    with ctx.threads_scope():
        for cfg in recipe.passes:
            compressed = apply(compressed, cfg, ctx)
    selection = next(p.stats for p in report.passes if p.name == "quantize/mixed-precision")

    example = entry.example_inputs(2)
    with atomic_dir(out) as tmp:
        fp32_onnx = export_onnx(model, example, tmp / "model-fp32.onnx")
        q_onnx = export_onnx(compressed, example, tmp / "model.onnx")
        (tmp / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
        fp32_bits, q_bits = layer_bits(model, LAYERS), layer_bits(compressed, LAYERS)
        rows = [
            row("fp32 (eager)", model, artifact_size_bytes(model), "safetensors", fp32_bits),
            row(
                "fp32 (ONNX Runtime)",
                OnnxModel(fp32_onnx, threads=threads),
                artifact_size_bytes(fp32_onnx),
                "onnx",
                fp32_bits,
            ),
            row(f"{RECIPE} (eager)", compressed, artifact_size_bytes(compressed), "safetensors, packed", q_bits),
            row(
                f"{RECIPE} (ONNX Runtime)",
                OnnxModel(q_onnx, threads=threads),
                artifact_size_bytes(q_onnx),
                "onnx",
                q_bits,
            ),
        ]
        results = {
            "example": MARKER,
            "recipe": recipe.to_dict(),
            "split_sizes": {s: evaluate_split(model, s).details["n"] for s in ("train", "val", "test")},
            "selection": {
                "metric": "validation accuracy",
                "baseline": selection["baseline"],
                "quality": selection["quality"],
                "promoted": selection["promoted"],
                "sensitivity": selection["sensitivity"],
            },
            "rows": rows,
            "warnings": report.warnings,
            "threads": threads,
        }
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        (tmp / "results.md").write_text(
            "Test split (114 samples; positive class: malignant).\n\n" + markdown(rows), encoding="utf-8"
        )
    console = console or Console(width=max(Console().width, 112))  # the table's width, also when piped
    console.print(table(rows, "breast-cancer, test split (positive: malignant)"))
    drops = ", ".join(f"{r['layer']} {r['drop']:+.4f}" for r in selection["sensitivity"])
    console.print(f"validation accuracy drop with one layer at 2 bits: {drops}")
    console.print(f"promoted to 8 bits: {', '.join(selection['promoted']) or 'none'}")
    console.print(f"wrote {out}/ (model.onnx, model-fp32.onnx, recipe.yaml, results.json, results.md)")
    return results, compressed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # bad arguments: argparse prints the usage and the problem, exit 2
    return exit_code(lambda: run(args.out, args.threads, args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
