"""Every built-in recipe on every zoo model: apply it, export `.onnx` and `.pt2`, record the parity gate.

    HF_HUB_OFFLINE=1 python benchmarks/export_matrix.py [--models minilm digits-cnn silero-vad] [--recipes ...]

Per (model, recipe): pass time, each artifact's size and its parity against the compressed eager model
(max abs difference, mean cosine over real positions) or the error that refused it. No timing: this is
the deployability check; speed lives in quant_onnx.py / quant_pt2.py. Writes results/export_matrix.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def run_one(model_name: str, recipe_name: str, workdir: Path) -> dict[str, Any]:
    from modelpress.core import Context, RunOptions, apply
    from modelpress.export.artifact import export_artifact
    from modelpress.recipes.recipe import load_recipe
    from modelpress.zoo import get_entry

    entry = get_entry(model_name)
    recipe = load_recipe(recipe_name)
    model = entry.load().eval()
    ctx = Context(data=entry.calibration_data(64, 8), train_fn=entry.finetune, options=RunOptions(progress=False))
    row: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        for cfg in recipe.passes:
            model = apply(model, cfg, ctx)
    except Exception as e:  # noqa: BLE001 - recorded in the table
        return {"passes": f"{type(e).__name__}: {e}"}
    row["passes_s"] = round(time.perf_counter() - start, 2)
    row["warnings"] = list(ctx.report.warnings)
    for kind in recipe.export:
        path = workdir / f"{model_name}-{recipe_name}.{kind}"
        start = time.perf_counter()
        try:
            inputs = tuple(entry.example_inputs(2))
            parity = export_artifact(model, path, example_inputs=inputs, batch_axes=entry.batch_axes)
            row[kind] = {
                "size_mb": round(path.stat().st_size / 1e6, 3),
                "seconds": round(time.perf_counter() - start, 1),
                "max_abs": parity["max_abs"],
                "mean_cosine": parity["mean_cosine"],
            }
        except Exception as e:  # noqa: BLE001
            row[kind] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            traceback.print_exc()
    return row


def main() -> None:
    from modelpress.recipes.recipe import builtin_names

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["digits-cnn", "silero-vad", "minilm"])
    parser.add_argument("--recipes", nargs="*", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export_matrix.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipes = args.recipes or builtin_names()
    workdir = Path(tempfile.mkdtemp(prefix="export_matrix."))
    results: dict[str, dict[str, Any]] = {}
    for model_name in args.models:
        for recipe_name in recipes:
            row = run_one(model_name, recipe_name, workdir)
            results[f"{model_name} / {recipe_name}"] = row
            print(f"{model_name} / {recipe_name}: {json.dumps(row)[:400]}", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n| model / recipe | passes s | .onnx MB | .onnx cosine | .pt2 MB | .pt2 cosine |")
    print("|---|---:|---:|---:|---:|---:|")
    for key, row in results.items():
        cells = [key, str(row.get("passes_s", row.get("passes")))]
        for kind in ("onnx", "pt2"):
            r = row.get(kind, {})
            cells += (
                [f"{r['size_mb']:.2f}", f"{r['mean_cosine']:.5f}"] if "size_mb" in r else [r.get("error", "-"), "-"]
            )
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
