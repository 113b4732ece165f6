"""compress(model, recipe) -> (model, Report): passes in order, export, and measurement side by side.

    >>> model, report = compress("minilm", "int8-dynamic", out_dir="out/minilm-int8")

The baseline and every exported artifact are measured in the same run with the same threads
(size on disk, latency per batch size, quality through the zoo entry's metric). The output
folder is written atomically: a failed run leaves no half-written artifact behind.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from torch import nn

from modelpress.artifacts import export_artifacts, parity_of, recipe_lowering, sparse_checkpoint
from modelpress.calibration import check_calibration_size, check_finite
from modelpress.core.atomic import atomic_dir
from modelpress.core.context import Context
from modelpress.core.environment import environment
from modelpress.core.errors import BadInputError, NotAvailableError
from modelpress.core.options import RunOptions, check_data_path
from modelpress.core.outputs import check_output, claim_output, estimate_bytes
from modelpress.core.registry import apply
from modelpress.core.report import ModelStats, Report
from modelpress.loading import LoadedModel, resolve
from modelpress.measure.gate import gate_message, stopped_stats
from modelpress.recipes.recipe import Recipe, load_recipe
from modelpress.zoo.base import ZooEntry


def compress(
    model: str | Path | nn.Module | LoadedModel,
    recipe: str | Path | Recipe,
    data: Any | None = None,
    *,
    out_dir: str | Path | None = None,
    options: RunOptions | None = None,
    overwrite: bool = False,
    trust_code: bool = False,
) -> tuple[nn.Module, Report]:
    """Apply `recipe` to `model`, export its artifacts into `out_dir` and measure everything.

    `data`: calibration / training batches, or a file or folder to read them from (`load_calibration`);
    default: the zoo entry's calibration set. `options`: threads, batch sizes, evaluation data, ... for the
    whole run (`RunOptions`; its `cache_dir` is where the model's loader and the passes keep their files).
    An existing, non-empty `out_dir` is refused before any work unless `overwrite` (it is then replaced
    atomically). An artifact the speed gate finds slower than the original (or stops) is not written unless
    `options.keep_slower`; its row and the reason stay in the report. `trust_code` allows a model spec that
    runs code when loaded (see `modelpress.trust`).
    """
    opts = options if options is not None else RunOptions()
    if out_dir is not None:  # a bad --out fails before the model loads
        check_output(
            out_dir, kind="folder", overwrite=overwrite, inputs=input_paths(model, opts.eval_data, _path(data))
        )
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if "pt2" in rec.export:  # an explicit lowering this CPU cannot run is refused before the model loads
        recipe_lowering(rec)
    loaded = load_for_run(model, opts, trust_code)
    batches = calibration_for(loaded, data, [rec])
    with claim_out_dir(out_dir, overwrite, loaded, opts.eval_data):
        return compress_loaded(loaded, rec, batches, out_dir, opts)


def _path(data: Any) -> Path | None:
    return Path(data) if isinstance(data, (str, Path)) else None


def load_for_run(model: str | Path | nn.Module | LoadedModel, options: RunOptions, trust_code: bool) -> LoadedModel:
    """`model` resolved (`loading.resolve`) with the run's cache folder; a `LoadedModel` is kept as it is."""
    if isinstance(model, LoadedModel):
        return model
    return resolve(model, trust_code=trust_code, cache_dir=options.cache_dir)


def calibration_for(loaded: LoadedModel, data: Any | None, recipes: list[Recipe]) -> Any | None:
    """`data` as batches (read from a file or folder for `loaded`'s inputs), checked before any work: too
    few samples for a calibrating pass of `recipes`, or non-finite values, are refused."""
    if data is None:
        return None
    source = data
    if isinstance(data, (str, Path)):
        from modelpress.calibration import load_calibration

        source = check_data_path(data, "data")
        data = load_calibration(source, loaded.entry)
    for rec in recipes:
        check_calibration_size(data, rec, source if isinstance(source, Path) else "data")
    check_finite(data, source if isinstance(source, Path) else "data")
    return data


def compress_loaded(
    loaded: LoadedModel,
    rec: Recipe,
    data: Any | None,
    out_dir: str | Path | None,
    options: RunOptions,
    baseline: ModelStats | None = None,
) -> tuple[Any, Report]:
    """`compress` once the model is loaded and the data checked (the output folder is the caller's to hold).

    `baseline`: the original's figures, measured earlier in this run (auto mode measures it once).
    """
    lowering = recipe_lowering(rec) if "pt2" in rec.export else None
    if out_dir is not None and rec.export and loaded.entry is None:  # nothing could be exported or timed
        raise BadInputError(
            f"the inputs of {loaded.spec} are unknown, so no artifact can be exported or timed: give its input "
            "shape (CLI: --input-shape 1,3,224,224; API: loading.with_input_shape), or a recipe with export: []"
        )
    if loaded.kind == "onnx":
        return _compress_onnx(loaded, rec, data, out_dir, options)
    if not isinstance(loaded.model, nn.Module):
        raise BadInputError(
            f"{loaded.spec}: a {loaded.kind} artifact cannot be compressed; give a PyTorch or ONNX model"
        )
    compressed, report, ctx = apply_recipe(loaded, rec, data, options)
    if out_dir is None:
        return compressed, report
    entry = loaded.entry
    entry_for_eval = entry if entry is not None and entry.has_quality else None
    threads, eval_data = options.threads, options.eval_data
    example = entry.example_inputs(2) if entry is not None else None
    with atomic_dir(out_dir) as tmp:
        axes = entry.batch_axes if entry is not None else None
        artifacts = export_artifacts(compressed, example, rec, tmp, ctx, axes, lowering)
        sparse_checkpoint(compressed, artifacts, tmp, ctx)
        report.parity = parity_of(loaded.model, compressed, artifacts, example, threads) if artifacts else None
        (tmp / "recipe.yaml").write_text(rec.to_yaml(), encoding="utf-8")
        _measure(loaded, compressed, artifacts, report, options, out_dir, baseline)
        if entry_for_eval is not None:
            record_data(report, entry_for_eval, "evaluation", data=eval_data)
            if options.validation:
                record_data(report, entry_for_eval, "validation", data=eval_data)
        report.write(tmp)
    if options.progress:
        from modelpress.measure import stats_table

        rows = [s for s in (report.baseline, *report.artifacts) if s is not None]
        (options.console or Console()).print(stats_table(rows))
    return compressed, report


def apply_recipe(
    loaded: LoadedModel, rec: Recipe, data: Any | None, options: RunOptions
) -> tuple[nn.Module, Report, Context]:
    """The passes of `rec` on a copy of `loaded.model` (a PyTorch model): the compressed model, the report that
    records them and the context they ran in (for the exports that follow). `data`: calibration batches, or
    None for the zoo entry's own set (named in the report)."""
    entry = loaded.entry
    entry_for_eval = entry if entry is not None and entry.has_quality else None
    report = Report(
        model=loaded.name, recipe={"name": rec.name, **rec.to_dict()}, environment=environment(options.threads)
    )
    if data is None and entry is not None:
        try:
            data = entry.calibration_data(128, 8)
        except NotAvailableError:  # an entry with synthetic inputs only: the passes ask for --data if they need it
            data = None
        else:
            record_data(report, entry, "calibration", count=sum(len(batch[0]) for batch in data))
    ctx = Context(
        data=data,
        options=options,
        report=report,
        train_fn=_train_fn(entry, report) if entry is not None else None,
        metric=choice_metric(entry_for_eval, options.eval_data, report) if entry_for_eval is not None else None,
        training_data=entry.training_set if entry is not None else None,
    )
    compressed = copy.deepcopy(loaded.model).eval()
    with ctx.threads_scope():
        for cfg in rec.passes:
            compressed = apply(compressed, cfg, ctx)
    _warn_inexact_int8(compressed, report)
    return compressed, report, ctx


def _warn_inexact_int8(model: nn.Module, report: Report) -> None:
    """Say so where int8-activation layers compute in float because this CPU's int8 GEMM would saturate."""
    from modelpress.core.environment import int8_gemm_exact
    from modelpress.quant.modules import QLinear

    if int8_gemm_exact():
        return
    if any(isinstance(m, QLinear) and m.act.mode != "none" for m in model.modules()):
        report.warn(
            f"this CPU's int8 unit is {report.environment.get('cpu', {}).get('int8')} (no VNNI or AMX): oneDNN's int8 "
            "GEMM would saturate, so layers with int8 activations compute in float on their int8-stored weights "
            "in the eager model and the .pt2 (the .onnx runs ONNX Runtime's own kernels)"
        )


def choice_metric(
    entry: ZooEntry, eval_data: Path | None = None, report: Report | None = None
) -> Callable[[nn.Module], float]:
    """The metric passes choose by: the entry's validation split, or (where it has none) its reported one."""

    def metric(model: nn.Module) -> float:
        quality = entry.validation_quality(model, eval_data)
        if quality is not None and report is not None:
            record_data(report, entry, "validation", data=eval_data)
        if quality is None:
            if report is not None:
                report.warn(
                    f"{entry.name} has no validation split: choices during compression used the reported metric"
                )
            quality = entry.evaluate(model, eval_data)
        return quality.value

    return metric


def record_data(report: Report, entry: ZooEntry, use: str, **kw: Any) -> None:
    """Name in the report the data `use` ran on, where the entry says (see `ZooEntry.data_record`)."""
    if use not in report.data and (record := entry.data_record(use, **kw)) is not None:
        report.data[use] = record


def _train_fn(entry: ZooEntry, report: Report) -> Callable[..., nn.Module]:
    """The entry's `finetune`, its training data named in the report."""

    def train(model: nn.Module, **kw: Any) -> nn.Module:
        record_data(report, entry, "training")
        return entry.finetune(model, **kw)

    return train


def input_paths(model: Any, *more: Path | None) -> tuple[Any, ...]:
    """The input paths an output may not overwrite: a model given as a path, data files."""
    spec = model.path if isinstance(model, LoadedModel) else model if isinstance(model, (str, Path)) else None
    return (spec, *more)


def claim_out_dir(
    out_dir: str | Path | None, overwrite: bool, loaded: LoadedModel, eval_data: Path | None
) -> contextlib.AbstractContextManager[Any]:
    """Hold `out_dir` for the run (see `core.outputs`); nothing to hold when nothing is written."""
    if out_dir is None:
        return contextlib.nullcontext()
    if loaded.kind == "onnx" and loaded.path is not None:
        need = 2 * loaded.path.stat().st_size + 32 * 2**20
    else:
        need = estimate_bytes(loaded.model)
    return claim_output(
        out_dir, kind="folder", overwrite=overwrite, inputs=input_paths(loaded, eval_data), need_bytes=need
    )


def _compress_onnx(
    loaded: LoadedModel, rec: Recipe, data: Any | None, out_dir: str | Path | None, options: RunOptions
) -> tuple[Any, Report]:
    """An ONNX graph from any framework: quantized by ONNX Runtime's tools, driven by the recipe's one pass (a
    recipe without passes: the graph as it is, measured against the original)."""
    from modelpress.export.runtime import OnnxModel
    from modelpress.measure import bench

    if out_dir is None:
        raise BadInputError("compressing an ONNX model writes a new graph: give out_dir (CLI: --out)")
    threads = options.threads
    with atomic_dir(out_dir) as tmp:
        report = build_onnx(loaded, rec, data, tmp / "model.onnx", options)
        (tmp / "recipe.yaml").write_text(rec.to_yaml(), encoding="utf-8")
        common = _bench_options(options, memory=False)
        original = (f"{loaded.name} (original)", loaded.model, loaded.entry, loaded.path)
        base = bench([original], **common)[0]
        (row,) = gated_bench([], {"onnx": tmp / "model.onnx"}, loaded.entry, base, common)
        row.artifact = str(Path(out_dir) / "model.onnx")
        report_gate(report, [row], {})  # the one graph asked for is written even when flagged
        rows = [base, row]
        report.baseline, report.artifacts, report.compressed = base, [row], row
        report.write(tmp)
    if options.progress:
        from modelpress.measure import stats_table

        (options.console or Console()).print(stats_table(rows))
    return OnnxModel(Path(out_dir) / "model.onnx", threads=threads), report


def build_onnx(loaded: LoadedModel, rec: Recipe, data: Any | None, dst: Path, options: RunOptions) -> Report:
    """The ONNX graph of `loaded` through the recipe's one pass (ONNX Runtime's quantizers, `quant.onnx_ptq`)
    into `dst`; a recipe without passes copies the graph as it is. `data`: calibration batches, or None for the
    entry's own set where it has one (a model borrowing a zoo entry's). Returns the report recording the pass."""
    from modelpress.quant.onnx_ptq import copy_onnx, quantize_onnx

    if len(rec.passes) > 1:
        raise BadInputError(
            f"an ONNX model takes a recipe with one quantization pass; {rec.name} has {len(rec.passes)}"
        )
    report = Report(
        model=loaded.name, recipe={"name": rec.name, **rec.to_dict()}, environment=environment(options.threads)
    )
    if data is None and rec.passes and loaded.entry is not None:
        with contextlib.suppress(NotAvailableError):  # synthetic inputs only: a pass that needs data says so
            data = loaded.entry.calibration_data(128, 8)
            record_data(report, loaded.entry, "calibration", count=sum(len(batch[0]) for batch in data))
    ctx, src = Context(data=data, options=options, report=report), loaded.path
    assert src is not None  # an ONNX model is loaded from its file
    with ctx.threads_scope():
        stats = quantize_onnx(src, dst, rec.passes[0], data, ctx) if rec.passes else copy_onnx(src, dst)
    report.parity = {"onnx": {"mean_cosine_to_original": stats.get("fidelity")}}
    return report


def _measure(
    loaded: LoadedModel,
    compressed: nn.Module,
    artifacts: dict[str, Path],
    report: Report,
    options: RunOptions,
    final_dir: str | Path,
    baseline: ModelStats | None = None,
) -> None:
    """The original first, then every form through the speed gate; flagged artifacts are deleted unless kept."""
    from modelpress.measure import bench
    from modelpress.measure.size import count_params

    entry = loaded.entry
    if entry is None:
        return
    common = _bench_options(options, memory=False, eval_data=options.eval_data, validation=options.validation)
    if baseline is None:
        baseline = bench([(f"{loaded.name} (original)", loaded.model, entry, loaded.path)], **common)[0]
    label = report.recipe["name"] if report.recipe else "compressed"
    rows = gated_bench([(f"{loaded.name} ({label}, eager)", compressed, entry)], artifacts, entry, baseline, common)
    params = count_params(compressed)
    for s in rows[1:]:
        s.params, s.nonzero_params = params
        s.artifact = str(Path(final_dir) / Path(s.artifact).name) if s.artifact else None
    report_gate(report, rows, {} if options.keep_slower else {path.name: path for path in artifacts.values()})
    report.baseline = baseline
    report.artifacts = rows
    deployable = [s for s in rows if s.artifact] or rows
    passed = [s for s in deployable if (s.speed_gate or {}).get("status") == "ok"]
    if not passed:
        report.warn("no artifact is faster than the original on this CPU: the fastest measured form is reported")
    report.compressed = min(passed or [s for s in deployable if s.latency_ms] or rows,
                            key=lambda s: _p50(s, max(options.batch_sizes)))  # fmt: skip


def _bench_options(options: RunOptions, **extra: Any) -> dict[str, Any]:
    """`measure.bench`'s keyword arguments for the run's options."""
    return dict(
        batch_sizes=options.batch_sizes, threads=options.threads, repeats=options.repeats, progress=options.progress,
        **extra,
    )  # fmt: skip


RUNTIME_NAMES = {"onnx": "model.onnx (ONNX Runtime)", "pt2": "model.pt2 (AOTInductor)"}


def gated_bench(
    in_process: list[Any],
    artifacts: dict[str, Path],
    entry: ZooEntry | None,
    baseline: ModelStats,
    common: dict[str, Any],
) -> list[ModelStats]:
    """The in-process forms, then each artifact, measured against `baseline` through the speed gate: an
    artifact is probed in a child process first, and one the probe stopped is never loaded here."""
    from modelpress.export.runtime import AotiModel, OnnxModel
    from modelpress.measure import bench

    threads = common["threads"]
    specs, stopped = list(in_process), []
    for kind, path in artifacts.items():
        name = RUNTIME_NAMES[kind]
        result = _probe(kind, path, entry, common["batch_sizes"], baseline, threads) if entry is not None else None
        if result is not None and result.stopped is not None:
            stopped.append(stopped_stats(name, path, result, baseline))
            continue
        specs.append((name, OnnxModel(path, threads=threads) if kind == "onnx" else AotiModel(path), entry, path))
    return [*bench(specs, **common, reference=baseline), *stopped]


def report_gate(report: Report, rows: list[ModelStats], deletable: dict[str, Path]) -> None:
    """Warn of every form the speed gate flagged; delete the flagged files named in `deletable` (by file name)."""
    for row in rows:
        message, gate = gate_message(row), row.speed_gate
        if message is None or gate is None:
            continue
        name = Path(row.artifact).name if row.artifact else None
        if name in deletable:
            deletable[name].unlink(missing_ok=True)
            gate["written"], row.artifact = False, None
            message = gate["message"] = message + " - not written (keep_slower / --keep-slower keeps it)"
        report.warn(message)


def _probe(
    kind: str,
    path: Path,
    entry: ZooEntry,
    batch_sizes: tuple[int, ...],
    baseline: ModelStats,
    threads: int | None,
) -> Any:
    """The speed gate's out-of-process run of one artifact (None when the original has no timings)."""
    from modelpress.measure.gate import call_limits, probe

    limits = call_limits(baseline)
    if not all(str(bs) in limits for bs in batch_sizes):
        return None
    inputs = {str(bs): tuple(entry.example_inputs(bs)) for bs in batch_sizes}
    return probe(kind, path, inputs, limits, threads)


def _p50(stats: ModelStats, batch_size: int) -> float:
    lat = stats.latency_ms.get(str(batch_size))
    return lat.p50 if lat is not None else float("inf")
