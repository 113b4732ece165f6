"""Meet a per-frame latency budget at batch 1: the MTCNN face-detection cascade and digits-cnn, compressed.

    python examples/vision-realtime/run.py [--out DIR] [--threads N] [--repeats N] [--overwrite]

Applies the built-in `vision-realtime` recipe to the three MTCNN nets (facenet-pytorch's weights) and
to `digits-cnn`, exports every net to ONNX and to an AOTInductor `.pt2`, and measures the float model
and each compressed form side by side: the whole cascade's latency per 512 x 512 frame, its detections
against the fp32 cascade's, face / non-face accuracy, digit accuracy, latency of one digit, and sizes.
Writes the artifacts, `recipe.yaml`, `results.json` and `results.md` into the output folder, atomically.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from modelpress.core.atomic import atomic_dir, atomic_path
from modelpress.core.context import Context
from modelpress.core.environment import environment
from modelpress.core.options import RunOptions
from modelpress.core.registry import apply
from modelpress.core.report import Report
from modelpress.export.artifact import PT2_MIN_COSINE, package_checked
from modelpress.export.onnx import ExportError, ExportWarning, compare_outputs, export_onnx
from modelpress.export.runtime import AotiModel, OnnxModel
from modelpress.measure.latency import measure_latency, threads_scope
from modelpress.measure.size import artifact_size_bytes
from modelpress.recipes.recipe import Recipe, load_recipe
from modelpress.zoo.base import get_entry
from modelpress.zoo.mtcnn import detect_faces, frames, match_detections, normalize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import base_parser, check_out, exit_code, parse, positive_int

RECIPE = "vision-realtime"
DEFAULT_OUT = Path("modelpress-out/vision-realtime")
MARKER = "vision-realtime"  # results.json "example": a folder holding it is this script's own, replaced freely
# The stated budgets (batch 1, one thread) and quality tolerances.
CASCADE_BUDGET_MS = 33.0  # the whole MTCNN cascade on one 512 x 512 frame: 30 frames per second
DIGITS_BUDGET_MS = 0.05  # one 8 x 8 digit
FACE_ACC_TOL = 0.01  # face / non-face accuracy of each net may drop by at most this much
DETECTION_MIN = 0.94  # recall and precision against the fp32 cascade's boxes (IoU >= 0.5): at most 1 in 18
DIGITS_ACC_TOL = 0.005
TIMED_FRAMES = ("astronaut", "camera", "faces-grid")  # the 512 x 512 frames the budget applies to
NETS = ("pnet", "rnet", "onet")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = base_parser(__doc__, DEFAULT_OUT)
    parser.add_argument("--repeats", type=positive_int, default=20, help="timed runs per frame (default 20)")
    return parse(parser, argv)


# ---------------------------------------------------------------- compression and export


def compress(name: str, model: nn.Module, recipe: Recipe, threads: int) -> tuple[nn.Module, Report]:
    """`recipe`'s passes on a copy of zoo model `name`, calibrated on its calibration split."""
    entry = get_entry(name)
    report = Report(model=name, recipe={"name": recipe.name, **recipe.to_dict()})
    ctx = Context(
        data=entry.calibration_data(128, 8),
        options=RunOptions(threads=threads, progress=False),
        report=report,
        metric=lambda m: entry.validation_quality(m).value,  # choices, if any, on the validation split
    )
    compressed = copy.deepcopy(model)
    with ctx.threads_scope():
        for cfg in recipe.passes:
            compressed = apply(compressed, cfg, ctx)
    return compressed.eval(), report


def _pnet_example() -> torch.Tensor:
    """A real 96 x 96 pyramid level (scikit-image's coffee, not a test frame) to trace P-Net with."""
    import skimage.data

    image = torch.from_numpy(skimage.data.coffee()).permute(2, 0, 1)[None].float()
    return normalize(F.interpolate(image, size=(96, 96), mode="area"))


def export_pnet_onnx(model: nn.Module, path: Path) -> Path:
    """P-Net as ONNX with dynamic height and width (one graph for every pyramid level)."""
    hw = {0: "batch", 2: "height", 3: "width"}
    axes = {"images": hw, "face_prob": hw, "box_offsets": hw}
    names = {"input_names": ["images"], "output_names": ["face_prob", "box_offsets"]}
    return export_onnx(model, (_pnet_example(),), path, dynamic_axes=axes, **names)


def package_pnet(model: nn.Module, path: Path) -> dict[str, float]:
    """P-Net as an AOTInductor package with dynamic even height and width (the cascade's levels are even)."""
    from torch.export import Dim

    from modelpress.export.inductor import inductor_configs, prepare

    x = _pnet_example().repeat(2, 1, 1, 1)  # batch 2: export keeps an example axis of 1 static
    half_h, half_w = Dim("half_height", min=6, max=2048), Dim("half_width", min=6, max=2048)
    shapes = ({0: Dim("batch", min=1), 2: 2 * half_h, 3: 2 * half_w},)
    with torch.inference_mode():
        expected = model(x)[0]
    with atomic_path(path) as tmp, torch.no_grad():
        program = torch.export.export(prepare(model), (x,), dynamic_shapes=shapes)
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp), inductor_configs=inductor_configs())
        with torch.inference_mode():
            parity = compare_outputs(expected.movedim(1, -1), AotiModel(tmp)(x)[0].movedim(1, -1))
        if parity["mean_cosine"] < PT2_MIN_COSINE:
            raise ExportError(f"the P-Net package drifts from the model: mean cosine {parity['mean_cosine']:.4f}")
    return parity


def export_all(nets: dict[str, nn.Module], folder: Path, threads: int) -> dict[str, dict[str, Any]]:
    """ONNX and .pt2 of the three nets into `folder`; returns per runtime the callables and their files."""
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, Path]] = {"onnx": {}, "pt2": {}}
    for net, model in nets.items():
        onnx_path, pt2_path = folder / f"{net}.onnx", folder / f"{net}.pt2"
        if net == "pnet":
            export_pnet_onnx(model, onnx_path)
            package_pnet(model, pt2_path)
        else:
            example = get_entry(f"mtcnn-{net}").example_inputs(2)
            export_onnx(model, example, onnx_path)
            package_checked(model, example, pt2_path)
        files["onnx"][net], files["pt2"][net] = onnx_path, pt2_path
    return {
        "onnx": {"files": files["onnx"], "nets": {n: OnnxModel(p, threads=threads) for n, p in files["onnx"].items()}},
        "pt2": {"files": files["pt2"], "nets": {n: AotiModel(p) for n, p in files["pt2"].items()}},
    }


# ---------------------------------------------------------------- measurement


def cascade_row(
    label: str, nets: dict[str, Callable[..., Any]], size_bytes: int, reference: dict[str, torch.Tensor] | None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Detections against `reference` (None: this row is the reference) and face accuracy; timed later."""
    boxes = {name: detect_faces(frame, *(nets[n] for n in NETS)).boxes for name, frame in frames().items()}
    accuracy = {n: get_entry(f"mtcnn-{n}").evaluate(nets[n]).value for n in NETS}
    ref = reference if reference is not None else boxes
    matched = sum(match_detections(ref[k], boxes[k]) for k in boxes)
    n_ref, n_found = sum(len(b) for b in ref.values()), sum(len(b) for b in boxes.values())
    row = {
        "model": label,
        "face_accuracy": accuracy,
        "faces": {k: len(b) for k, b in boxes.items()},
        "recall": matched / n_ref if n_ref else 1.0,
        "precision": matched / n_found if n_found else 1.0,
        "size_bytes": size_bytes,
    }
    return row, boxes


def time_cascades(rows: list[dict[str, Any]], nets: list[dict[str, Callable[..., Any]]], repeats: int) -> None:
    """p50 latency of the whole cascade per timed frame, for every row; sets `latency_ms` and `worst_ms`.

    The rows take turns, one frame each per round, so that load from other processes on a shared
    CPU falls on all of them alike instead of on whichever row happened to run during it.
    """
    timed = {name: frames()[name] for name in TIMED_FRAMES}
    samples: dict[tuple[int, str], list[float]] = {(i, name): [] for i in range(len(rows)) for name in timed}
    with torch.inference_mode():
        for row_nets in nets:  # warm-up
            for frame in timed.values():
                detect_faces(frame, *(row_nets[n] for n in NETS))
        for _ in range(repeats):
            for i, row_nets in enumerate(nets):
                for name, frame in timed.items():
                    start = time.perf_counter()
                    detect_faces(frame, *(row_nets[n] for n in NETS))
                    samples[i, name].append((time.perf_counter() - start) * 1e3)
    for i, row in enumerate(rows):
        row["latency_ms"] = {name: statistics.median(samples[i, name]) for name in timed}
        row["worst_ms"] = max(row["latency_ms"].values())
        row["within_budget"] = row["worst_ms"] <= CASCADE_BUDGET_MS


def digits_row(label: str, fn: Callable[..., Any], size_bytes: int, repeats: int) -> dict[str, Any]:
    entry = get_entry("digits-cnn")
    lat = measure_latency(fn, entry.example_inputs(1), warmup=20, repeats=max(200, repeats * 10))
    return {
        "model": label,
        "latency_ms": lat.p50,
        "accuracy": entry.evaluate(fn).value,
        "size_bytes": size_bytes,
        "within_budget": lat.p50 <= DIGITS_BUDGET_MS,
    }


def run_mtcnn(recipe: Recipe, folder: Path, threads: int, repeats: int) -> dict[str, Any]:
    entries = {n: get_entry(f"mtcnn-{n}") for n in NETS}
    fp32 = {n: entries[n].load() for n in NETS}
    compressed = {n: compress(f"mtcnn-{n}", fp32[n], recipe, threads)[0] for n in NETS}
    fp32_art = export_all(fp32, folder / "fp32", threads)
    q_art = export_all(compressed, folder / recipe.name, threads)

    def size(files: dict[str, Path]) -> int:
        return sum(artifact_size_bytes(p) for p in files.values())

    eager_size = sum(artifact_size_bytes(m) for m in fp32.values())
    ref_row, reference = cascade_row("fp32 (eager)", fp32, eager_size, None)
    rows, nets = [ref_row], [fp32]
    specs = [
        ("fp32 (ONNX Runtime)", fp32_art["onnx"]["nets"], size(fp32_art["onnx"]["files"])),
        ("fp32 (.pt2, bf16)", fp32_art["pt2"]["nets"], size(fp32_art["pt2"]["files"])),
        (f"{recipe.name} (eager)", compressed, sum(artifact_size_bytes(m) for m in compressed.values())),
        (f"{recipe.name} (ONNX Runtime)", q_art["onnx"]["nets"], size(q_art["onnx"]["files"])),
        (f"{recipe.name} (.pt2)", q_art["pt2"]["nets"], size(q_art["pt2"]["files"])),
    ]
    for label, spec_nets, spec_size in specs:
        rows.append(cascade_row(label, spec_nets, spec_size, reference)[0])
        nets.append(spec_nets)
    with threads_scope(threads):
        time_cascades(rows, nets, repeats)
    return {"rows": rows, "reference_faces": {k: len(b) for k, b in reference.items()}}


def run_digits(recipe: Recipe, folder: Path, threads: int, repeats: int) -> dict[str, Any]:
    entry = get_entry("digits-cnn")
    model = entry.load()
    compressed, _ = compress("digits-cnn", model, recipe, threads)
    example = entry.example_inputs(2)
    folder.mkdir(parents=True, exist_ok=True)
    rows = [digits_row("fp32 (eager)", model, artifact_size_bytes(model), repeats)]
    for label, m in (("fp32", model), (recipe.name, compressed)):
        stem = folder / ("digits-fp32" if m is model else "digits")
        onnx_path = export_onnx(m, example, stem.with_suffix(".onnx"))
        package_checked(m, example, stem.with_suffix(".pt2"))
        if m is compressed:
            rows.append(digits_row(f"{label} (eager)", m, artifact_size_bytes(m), repeats))
        ort = OnnxModel(onnx_path, threads=threads)
        rows.append(digits_row(f"{label} (ONNX Runtime)", ort, artifact_size_bytes(onnx_path), repeats))
        pt2 = AotiModel(stem.with_suffix(".pt2"))
        rows.append(
            digits_row(
                f"{label} (.pt2{', bf16' if m is model else ''})",
                pt2,
                artifact_size_bytes(stem.with_suffix(".pt2")),
                repeats,
            )
        )
    return {"rows": rows}


def within_tolerance(row: dict[str, Any], fp32: dict[str, Any]) -> bool:
    """The stated quality tolerance: face accuracy and detections (MTCNN rows), or digit accuracy."""
    if "face_accuracy" in row:
        acc_ok = all(row["face_accuracy"][n] >= fp32["face_accuracy"][n] - FACE_ACC_TOL for n in NETS)
        return acc_ok and row["recall"] >= DETECTION_MIN and row["precision"] >= DETECTION_MIN
    return row["accuracy"] >= fp32["accuracy"] - DIGITS_ACC_TOL


def verdict(rows: list[dict[str, Any]], recipe_name: str) -> dict[str, Any]:
    """The fastest compressed form within the quality tolerance, and whether it meets the budget."""
    fp32 = rows[0]
    for row in rows:
        row["within_tolerance"] = within_tolerance(row, fp32)
    candidates = [r for r in rows if r["model"].startswith(recipe_name) and r["within_tolerance"]]
    key = "worst_ms" if "worst_ms" in fp32 else "latency_ms"
    best = min(candidates, key=lambda r: r[key]) if candidates else None
    return {
        "chosen": best["model"] if best else None,
        "latency_ms": best[key] if best else None,
        "fp32_eager_ms": fp32[key],
        "speedup": fp32[key] / best[key] if best else None,
        "budget_met": bool(best and best["within_budget"]),
    }


def markdown(results: dict[str, Any]) -> str:
    m, d = results["mtcnn"], results["digits"]
    frames_head = " / ".join(TIMED_FRAMES)
    lines = [
        f"MTCNN cascade, batch 1, {results['threads']} thread(s); budget {CASCADE_BUDGET_MS:g} ms per 512 x 512 frame.",
        "",
        f"| model | ms per frame ({frames_head}) | worst | face acc P/R/O | recall | precision | size (bytes) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in m["rows"]:
        lat = " / ".join(f"{r['latency_ms'][k]:.1f}" for k in TIMED_FRAMES)
        acc = "/".join(f"{r['face_accuracy'][n]:.3f}" for n in NETS)
        lines.append(
            f"| {r['model']} | {lat} | {r['worst_ms']:.1f} | {acc} | {r['recall']:.3f} | {r['precision']:.3f} "
            f"| {r['size_bytes']:,} |"
        )
    lines += [
        "",
        f"digits-cnn, batch 1, {results['threads']} thread(s); budget {DIGITS_BUDGET_MS:g} ms per digit.",
        "",
        "| model | ms per digit | accuracy | size (bytes) |",
        "|---|---:|---:|---:|",
    ]
    for r in d["rows"]:
        lines.append(f"| {r['model']} | {r['latency_ms']:.4f} | {r['accuracy']:.4f} | {r['size_bytes']:,} |")
    lines.append("")
    for name, part in (("MTCNN cascade", m), ("digits-cnn", d)):
        v = part["verdict"]
        met = "met" if v["budget_met"] else "NOT met"
        lines.append(
            f"- {name}: {v['chosen'] or 'no compressed form within tolerance'}"
            + (f", {v['latency_ms']:.4g} ms ({v['speedup']:.2f}x fp32 eager); budget {met}" if v["chosen"] else "")
        )
    return "\n".join(lines) + "\n"


def tables(results: dict[str, Any]) -> list[Table]:
    t = Table(title=f"MTCNN cascade per 512x512 frame (budget {CASCADE_BUDGET_MS:g} ms)")
    for col in ("model", "worst ms", "face acc P/R/O", "recall", "precision", "size (bytes)", "ok"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for r in results["mtcnn"]["rows"]:
        acc = "/".join(f"{r['face_accuracy'][n]:.3f}" for n in NETS)
        ok = ("budget " if r["within_budget"] else "") + ("quality" if r["within_tolerance"] else "")
        t.add_row(
            r["model"],
            f"{r['worst_ms']:.1f}",
            acc,
            f"{r['recall']:.3f}",
            f"{r['precision']:.3f}",
            f"{r['size_bytes']:,}",
            ok,
        )
    u = Table(title=f"digits-cnn per digit (budget {DIGITS_BUDGET_MS:g} ms)")
    for col in ("model", "ms", "accuracy", "size (bytes)", "ok"):
        u.add_column(col, justify="left" if col == "model" else "right")
    for r in results["digits"]["rows"]:
        ok = ("budget " if r["within_budget"] else "") + ("quality" if r["within_tolerance"] else "")
        u.add_row(r["model"], f"{r['latency_ms']:.4f}", f"{r['accuracy']:.4f}", f"{r['size_bytes']:,}", ok)
    return [t, u]


def run(
    out: Path, threads: int, repeats: int = 20, overwrite: bool = False, console: Console | None = None
) -> dict[str, Any]:
    """Compress, export and measure into `out` (atomically); returns results.json's content."""
    check_out(out, overwrite, MARKER)
    recipe = load_recipe(RECIPE)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with atomic_dir(out) as tmp:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ExportWarning)
                mtcnn = run_mtcnn(recipe, tmp / "mtcnn", threads, repeats)
                digits = run_digits(recipe, tmp / "digits", threads, repeats)
            notes = sorted({str(w.message) for w in caught if issubclass(w.category, ExportWarning)})
            for w in caught:
                if not issubclass(w.category, ExportWarning):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            mtcnn["verdict"] = verdict(mtcnn["rows"], recipe.name)
            digits["verdict"] = verdict(digits["rows"], recipe.name)
            results = {
                "example": MARKER,
                "recipe": recipe.to_dict(),
                "threads": threads,
                "budgets_ms": {"mtcnn_cascade_512": CASCADE_BUDGET_MS, "digits_cnn": DIGITS_BUDGET_MS},
                "tolerances": {
                    "face_accuracy_drop": FACE_ACC_TOL,
                    "detection_recall_precision_min": DETECTION_MIN,
                    "digits_accuracy_drop": DIGITS_ACC_TOL,
                },
                "mtcnn": mtcnn,
                "digits": digits,
                "export_notes": notes,  # layers exported in a weaker form than the eager model runs them
                "environment": environment(threads),
            }
            (tmp / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
            (tmp / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
            (tmp / "results.md").write_text(markdown(results), encoding="utf-8")
    finally:
        torch.set_num_threads(before)
    console = console or Console(width=max(Console().width, 112))  # the tables' width, also when piped
    for t in tables(results):
        console.print(t)
    console.print(markdown(results).split("\n\n")[-1].strip())
    console.print(f"wrote {out}/ (mtcnn/, digits/, recipe.yaml, results.json, results.md)")
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # bad arguments: argparse prints the usage and the problem, exit 2
    return exit_code(lambda: run(args.out, args.threads, args.repeats, args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
