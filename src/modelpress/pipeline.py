"""compress(model, recipe) -> (model, Report): passes in order, export, and measurement side by side.

    >>> model, report = compress("minilm", "int8-dynamic", out_dir="out/minilm-int8")

The baseline and every exported artifact are measured in the same run with the same threads
(size on disk, latency per batch size, quality through the zoo entry's metric). The output
folder is written atomically: a failed run leaves no half-written artifact behind.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from torch import nn

from modelpress.core.atomic import atomic_dir
from modelpress.core.context import Context
from modelpress.core.environment import environment
from modelpress.core.errors import BadInputError, NotAvailableError
from modelpress.core.registry import apply
from modelpress.core.report import ModelStats, Report
from modelpress.loading import LoadedModel, resolve
from modelpress.recipes.recipe import Recipe, load_recipe
from modelpress.zoo.base import ZooEntry


def compress(
    model: str | Path | nn.Module | LoadedModel,
    recipe: str | Path | Recipe,
    data: Any | None = None,
    *,
    out_dir: str | Path | None = None,
    threads: int | None = None,
    eval_data: Path | None = None,
    batch_sizes: tuple[int, ...] = (1, 32),
    repeats: int = 20,
    progress: bool = True,
    console: Console | None = None,
    overwrite: bool = False,
    validation: bool = False,
    baseline: ModelStats | None = None,
) -> tuple[nn.Module, Report]:
    """Apply `recipe` to `model`, export its artifacts into `out_dir` and measure everything.

    `data` (calibration / training batches) defaults to the zoo entry's calibration set. An existing,
    non-empty `out_dir` is refused before any work unless `overwrite` (it is then replaced atomically).
    `validation` also scores every measured form on the model's validation split (auto mode's budget);
    `baseline`: the original's figures measured earlier in this run (auto mode measures it once).
    """
    check_out_dir(out_dir, overwrite)
    loaded = model if isinstance(model, LoadedModel) else resolve(model)
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if loaded.kind == "onnx":
        return _compress_onnx(loaded, rec, data, out_dir, threads, batch_sizes, repeats, progress, console)
    if not isinstance(loaded.model, nn.Module):
        raise BadInputError(
            f"{loaded.spec}: a {loaded.kind} artifact cannot be compressed; give a PyTorch or ONNX model"
        )
    entry = loaded.entry
    entry_for_eval = entry if entry is not None and entry.has_quality else None
    if data is None and entry is not None:
        try:
            data = entry.calibration_data(128, 8)
        except NotAvailableError:  # an entry with synthetic inputs only: the passes ask for --data if they need it
            data = None
    report = Report(model=loaded.name, recipe={"name": rec.name, **rec.to_dict()}, environment=environment(threads))
    ctx = Context(
        data=data,
        eval_data=eval_data,
        threads=threads,
        show_progress=progress,
        report=report,
        train_fn=(lambda m, **kw: entry.finetune(m, **kw)) if entry is not None else None,
        metric=choice_metric(entry_for_eval, eval_data, report) if entry_for_eval is not None else None,
    )
    compressed = copy.deepcopy(loaded.model).eval()
    with ctx.threads_scope():
        for cfg in rec.passes:
            compressed = apply(compressed, cfg, ctx)

    if out_dir is None:
        return compressed, report
    example = entry.example_inputs(2) if entry is not None else None
    with atomic_dir(out_dir) as tmp:
        artifacts = _export(compressed, example, rec, tmp, ctx, entry.batch_axes if entry is not None else None)
        report.parity = _parity(loaded.model, compressed, artifacts, example, threads) if artifacts else None
        (tmp / "recipe.yaml").write_text(rec.to_yaml(), encoding="utf-8")
        _measure(
            loaded, compressed, artifacts, report, threads, eval_data, batch_sizes, repeats, progress, out_dir,
            validation, baseline,
        )  # fmt: skip
        report.write(tmp)
    if progress:
        from modelpress.measure import stats_table

        rows = [s for s in (report.baseline, *report.artifacts) if s is not None]
        (console or Console()).print(stats_table(rows))
    return compressed, report


def choice_metric(
    entry: ZooEntry, eval_data: Path | None = None, report: Report | None = None
) -> Callable[[nn.Module], float]:
    """The metric passes choose by: the entry's validation split, or (where it has none) its reported one."""

    def metric(model: nn.Module) -> float:
        quality = entry.validation_quality(model, eval_data)
        if quality is None:
            if report is not None:
                report.warn(
                    f"{entry.name} has no validation split: choices during compression used the reported metric"
                )
            quality = entry.evaluate(model, eval_data)
        return quality.value

    return metric


def check_out_dir(out_dir: str | Path | None, overwrite: bool) -> None:
    """Refuse to replace an existing output folder (or a file in its place) unless asked to."""
    if out_dir is None or overwrite:
        return
    path = Path(out_dir)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise BadInputError(f"--out {path} exists; pass --overwrite to replace it")


def _compress_onnx(
    loaded: LoadedModel,
    rec: Recipe,
    data: Any | None,
    out_dir: str | Path | None,
    threads: int | None,
    batch_sizes: tuple[int, ...],
    repeats: int,
    progress: bool,
    console: Console | None,
) -> tuple[Any, Report]:
    """An ONNX graph from any framework: quantized by ONNX Runtime's tools, driven by the recipe's one pass."""
    from modelpress.export.runtime import OnnxModel
    from modelpress.measure import bench
    from modelpress.quant.onnx_ptq import quantize_onnx

    if len(rec.passes) != 1:
        raise BadInputError(
            f"an ONNX model takes a recipe with one quantization pass; {rec.name} has {len(rec.passes)}"
        )
    if out_dir is None:
        raise BadInputError("compressing an ONNX model writes a new graph: give out_dir (CLI: --out)")
    report = Report(model=loaded.name, recipe={"name": rec.name, **rec.to_dict()}, environment=environment(threads))
    ctx = Context(data=data, threads=threads, show_progress=progress, report=report)
    with atomic_dir(out_dir) as tmp, ctx.threads_scope():
        stats = quantize_onnx(loaded.path, tmp / "model.onnx", rec.passes[0], data, ctx)
        report.parity = {"onnx": {"mean_cosine_to_original": stats.get("fidelity")}}
        (tmp / "recipe.yaml").write_text(rec.to_yaml(), encoding="utf-8")
        specs = [
            (f"{loaded.name} (original)", loaded.model, loaded.entry, loaded.path),
            (
                "model.onnx (ONNX Runtime)",
                OnnxModel(tmp / "model.onnx", threads=threads),
                loaded.entry,
                tmp / "model.onnx",
            ),
        ]
        rows = bench(specs, batch_sizes=batch_sizes, threads=threads, repeats=repeats, progress=progress, memory=False)
        rows[1].artifact = str(Path(out_dir) / "model.onnx")
        report.baseline, report.artifacts, report.compressed = rows[0], rows[1:], rows[1]
        report.write(tmp)
    if progress:
        from modelpress.measure import stats_table

        (console or Console()).print(stats_table(rows))
    return OnnxModel(Path(out_dir) / "model.onnx", threads=threads), report


def _export(
    model: nn.Module,
    example: tuple | None,
    rec: Recipe,
    folder: Path,
    ctx: Context,
    batch_axes: tuple[int, ...] | None = None,
) -> dict[str, Path]:
    from modelpress.export.onnx import ExportWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExportWarning)
        out = _export_all(model, example, rec, folder, ctx, batch_axes)
    for w in caught:
        if issubclass(w.category, ExportWarning):
            ctx.report.warn(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out


def _export_all(
    model: nn.Module, example: tuple | None, rec: Recipe, folder: Path, ctx: Context, batch_axes: tuple[int, ...] | None
) -> dict[str, Path]:
    if example is None:
        if rec.export:
            ctx.warn("no example inputs are known for this model: artifacts were not exported")
        return {}
    out: dict[str, Path] = {}
    if "onnx" in rec.export:
        from modelpress.export.onnx import export_onnx

        start = time.perf_counter()
        out["onnx"] = export_onnx(model, example, folder / "model.onnx", batch_axes=batch_axes)
        ctx.report.add_pass("export/onnx", time.perf_counter() - start)
    if "pt2" in rec.export:
        from modelpress.export.artifact import package_checked

        start = time.perf_counter()
        package_checked(model, example, folder / "model.pt2", batch_axes=batch_axes)
        out["pt2"] = folder / "model.pt2"
        ctx.report.add_pass("export/pt2", time.perf_counter() - start)
    return out


def _parity(
    original: nn.Module, compressed: nn.Module, artifacts: dict[str, Path], example: tuple, threads: int | None
) -> dict[str, Any]:
    """Each artifact's first output against the compressed eager model (the export check) and the original."""
    import torch

    from modelpress.export.onnx import compare_outputs, real_positions
    from modelpress.export.runtime import AotiModel, OnnxModel

    def first(fn: Any) -> torch.Tensor:
        with torch.inference_mode():
            out = fn(*example)
        return (out[0] if isinstance(out, (tuple, list)) else out).float()

    reference, expected = first(original), first(compressed)
    positions = real_positions(example, expected)
    out: dict[str, Any] = {}
    for kind, path in artifacts.items():
        actual = first(OnnxModel(path, threads=threads) if kind == "onnx" else AotiModel(path))
        check = compare_outputs(expected, actual, positions)
        to_original = compare_outputs(reference, actual, positions)["mean_cosine"]
        out[kind] = {**check, "mean_cosine_to_original": to_original}
    out["eager_mean_cosine_to_original"] = compare_outputs(reference, expected, positions)["mean_cosine"]
    return out


def _measure(
    loaded: LoadedModel,
    compressed: nn.Module,
    artifacts: dict[str, Path],
    report: Report,
    threads: int | None,
    eval_data: Path | None,
    batch_sizes: tuple[int, ...],
    repeats: int,
    progress: bool,
    final_dir: str | Path,
    validation: bool,
    baseline: ModelStats | None = None,
) -> None:
    from modelpress.export.runtime import AotiModel, OnnxModel
    from modelpress.measure import bench
    from modelpress.measure.size import count_params

    entry = loaded.entry
    if entry is None:
        return
    specs: list[Any] = [] if baseline is not None else [(f"{loaded.name} (original)", loaded.model, entry, loaded.path)]
    specs.append(
        (f"{loaded.name} ({report.recipe['name'] if report.recipe else 'compressed'}, eager)", compressed, entry)
    )
    if "onnx" in artifacts:
        specs.append(
            ("model.onnx (ONNX Runtime)", OnnxModel(artifacts["onnx"], threads=threads), entry, artifacts["onnx"])
        )
    if "pt2" in artifacts:
        specs.append(("model.pt2 (AOTInductor)", AotiModel(artifacts["pt2"]), entry, artifacts["pt2"]))
    stats = bench(
        specs,
        batch_sizes=batch_sizes,
        threads=threads,
        repeats=repeats,
        eval_data=eval_data,
        validation=validation,
        progress=progress,
        memory=False,
    )
    if baseline is not None:
        stats.insert(0, baseline)
    params = count_params(compressed)
    for s in stats[2:]:
        s.params, s.nonzero_params = params
        s.artifact = str(Path(final_dir) / Path(s.artifact).name) if s.artifact else None
    report.baseline = stats[0]
    report.artifacts = stats[1:]
    deployable = stats[2:] or stats[1:]
    report.compressed = min(deployable, key=lambda s: _p50(s, max(batch_sizes)))


def _p50(stats: ModelStats, batch_size: int) -> float:
    lat = stats.latency_ms.get(str(batch_size))
    return lat.p50 if lat is not None else float("inf")
