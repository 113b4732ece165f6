"""The `modelpress` command: a thin typer app over the public API.

Exit codes: 0 success, 2 bad input (the message names the bad value and what is allowed),
1 internal error (set MODELPRESS_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from modelpress.cli_options import (
    AutoFlags,
    DataOpt,
    InputShapeOpt,
    JsonOpt,
    LikeOpt,
    OverwriteOpt,
    ThreadsOpt,
    TrustCodeOpt,
    TrustPickleOpt,
    WeightsOpt,
    check_data,
    parse_batch_sizes,
)
from modelpress.core.errors import BadInputError, ModelpressError, NotAvailableError
from modelpress.signals import signal_exit_code, unwind_on_signals

app = typer.Typer(
    name="modelpress",
    help="Make trained neural networks smaller and faster with a measured, bounded loss of quality.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
out = Console()
err = Console(stderr=True)
if not out.is_terminal:
    out.width = max(out.width, 160)  # side-by-side tables stay readable in logs and pipes


def _trust(trust_code: bool, trust_pickle: bool) -> bool:
    if trust_pickle:
        err.print("[yellow]--trust-pickle is deprecated; use --trust-code[/yellow]")
    return trust_code or trust_pickle


@app.command()
def bench(
    models: Annotated[
        list[str], typer.Argument(help="Model specs: zoo names, folders, .onnx/.pt2 files, pkg.mod:factory.")
    ],
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", "-b", help="Comma-separated batch sizes.")] = "1,32",
    threads: ThreadsOpt = None,
    repeats: Annotated[
        int, typer.Option(help="Timed runs per batch size (a slow model: 20 s, 3 at least).", min=1)
    ] = 30,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up runs per batch size.", min=0)] = 5,
    data: DataOpt = None,
    quality: Annotated[bool, typer.Option("--quality/--no-quality", help="Evaluate each model's task metric.")] = True,
    output: Annotated[Path | None, typer.Option("--out", "-o", help="Also write the results as JSON here.")] = None,
    overwrite: OverwriteOpt = False,
    like: LikeOpt = None,
    input_shape: Annotated[
        list[str] | None,
        typer.Option(
            "--input-shape",
            help="Input shape for a model with no known inputs, batch first "
            "(e.g. 1,3,32,32); repeat for several inputs.",
        ),
    ] = None,
    weights: WeightsOpt = None,
    trust_code: TrustCodeOpt = False,
    trust_pickle: TrustPickleOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Measure models side by side: size, params, latency per batch size, throughput, memory, quality.

    --weights goes into the one package.module:factory model among MODELS.

    Example: [bold]modelpress bench minilm digits-cnn --batch-sizes 1,32 --threads 2[/bold]

    Example: [bold]modelpress bench minilm out/model.onnx --like minilm[/bold]
    """
    from modelpress.core.environment import environment
    from modelpress.loading import resolve
    from modelpress.measure import bench as run_bench
    from modelpress.measure import stats_table, write_json
    from modelpress.measure.latency import check_runs

    sizes = parse_batch_sizes(batch_sizes)
    check_runs(repeats, warmup)  # before any model loads
    _quiet_transformers()
    check_data(data, "--data")
    trusted = _trust(trust_code, trust_pickle)
    from modelpress.loading import is_factory_spec

    factories = {m for m in models if is_factory_spec(m)}
    if weights is not None and len(factories) != 1:
        raise BadInputError(
            f"--weights goes into one package.module:factory model; {len(factories)} of the models given are "
            "factories (bench the others without --weights, or compare weights with one factory per run)"
        )

    from modelpress.zoo import get_entry
    from modelpress.zoo.generic import ShapeEntry

    like_entry = get_entry(like) if like else None
    shape_entry = ShapeEntry.from_shape_text(input_shape) if input_shape else None

    def _resolve(spec: str):  # noqa: ANN202
        loaded = resolve(spec, weights=weights if spec in factories else None, trust_code=trusted)
        entry = loaded.entry
        if like_entry is not None and (entry is None or not entry.has_quality):
            entry = like_entry
        elif shape_entry is not None and entry is None:
            entry = shape_entry
        elif entry is None:
            err.print(
                f"[yellow]{spec}: inputs unknown, only size is measured; "
                "pass --input-shape or --like ZOO_NAME[/yellow]",
                soft_wrap=True,
            )
        return loaded.name, loaded.model, entry, loaded.path

    if output is not None:  # a bad --out fails before minutes of measuring
        from modelpress.core.outputs import check_output

        check_output(output, kind="file", overwrite=overwrite, inputs=models, suffixes=(".json",))
    # Resolve every spec up front so a bad one fails before minutes of measuring.
    resolved = [_resolve(m) for m in models]
    stats = run_bench(
        resolved,
        batch_sizes=sizes,
        threads=threads,
        repeats=repeats,
        warmup=warmup,
        quality=quality,
        eval_data=data,
        progress=not as_json,
    )
    env = environment(threads)
    if output is not None:
        from modelpress.core.outputs import claim_output

        with claim_output(output, kind="file", overwrite=overwrite, inputs=models, suffixes=(".json",)):
            write_json(stats, output, env)
    if as_json:
        out.print_json(json.dumps({"environment": env, "models": [s.to_dict() for s in stats]}))
    else:
        out.print(stats_table(stats))
        cpu = env["cpu"]
        out.print(f"[dim]{cpu['model']} · {env['threads']} threads · torch {env['versions'].get('torch')}[/dim]")


@app.command()
def demo(
    data: DataOpt = None,
    threads: ThreadsOpt = None,
    output: Annotated[Path, typer.Option("--out", "-o", help="Report folder.")] = Path("modelpress-out/demo"),
    as_json: JsonOpt = False,
) -> None:
    """Compress the built-in MiniLM with the best built-in recipe, compare it with the original, write a report.

    Example: [bold]modelpress demo --threads 2[/bold]
    """
    from modelpress.demo import run_demo

    _quiet_transformers()

    report = run_demo(data=data, threads=threads, out_dir=output, progress=not as_json, console=out)
    if as_json:
        out.print_json(report.to_json())


@app.command()
def compress(
    model: Annotated[str, typer.Argument(help="Model spec: zoo name, folder, .onnx or .pt2 file, pkg.mod:factory.")],
    output: Annotated[Path, typer.Option("--out", "-o", help="Output folder (written atomically).")],
    recipe: Annotated[
        str | None, typer.Option("--recipe", "-r", help="Built-in recipe name or YAML file (or --auto).")
    ] = None,
    auto: Annotated[
        bool, typer.Option("--auto", help="Search compressions; keep the best artifact within --max-drop.")
    ] = False,
    max_drop: Annotated[
        str | None,
        typer.Option(
            "--max-drop",
            help="Auto mode: allowed quality drop in the metric's units (STS-B: 0.5), or relative to the "
            "original's value (a causal LM's perplexity: 5%).",
        ),
    ] = None,
    objective: Annotated[
        str,
        typer.Option(
            help="Auto mode: latency (at the largest batch size), size, decode "
            "(a causal LM's tokens/s at batch 1, GenAI folder) or auto (decode for "
            "a causal LM, else latency)."
        ),
    ] = "auto",
    candidates: Annotated[
        str | None,
        typer.Option(
            "--candidates",
            help="Auto mode: comma-separated candidates to try (generated names, built-in recipes, recipe files; "
            "default: the space generated for the model and this CPU).",
        ),
    ] = None,
    time_budget: Annotated[
        str | None,
        typer.Option("--time-budget", help="Auto mode: wall time of the search, e.g. 90s, 5m, 1h (default: none)."),
    ] = None,
    exhaustive: Annotated[
        bool, typer.Option("--exhaustive", help="Auto mode: measure every candidate in full (no screening).")
    ] = False,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Auto mode: neither reuse nor keep measurements in the cache.")
    ] = False,
    overwrite: OverwriteOpt = False,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Calibration data: .txt sentences, or .npy/.safetensors/.pt input tensors "
            "(default: the zoo model's calibration set).",
        ),
    ] = None,
    eval_data: Annotated[
        Path | None, typer.Option("--eval-data", help="Evaluation data, e.g. the STS-B folder (default: found).")
    ] = None,
    threads: ThreadsOpt = None,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", "-b", help="Batch sizes to time.")] = "1,32",
    input_shape: InputShapeOpt = None,
    like: LikeOpt = None,
    weights: WeightsOpt = None,
    trust_code: TrustCodeOpt = False,
    trust_pickle: TrustPickleOpt = False,
    keep_slower: Annotated[
        bool, typer.Option("--keep-slower", help="Write artifacts measured slower than the original too.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Compress a model with a recipe; write model.onnx, model.pt2, report.json/md and the recipe to --out.

    Example: [bold]modelpress compress minilm --recipe int8-smooth --out out/minilm-int8[/bold]

    Example: [bold]modelpress compress digits-cnn --recipe int8-static --data calib.npy --out out/digits[/bold]

    Example: [bold]modelpress compress minilm --auto --max-drop 0.5 --time-budget 5m --out out/minilm-auto[/bold]

    Example: [bold]modelpress compress mypkg.nets:build --weights ckpt.safetensors --input-shape 1,3,224,224
    --recipe int8-static --data images/ --out out/net[/bold]
    """
    from modelpress.auto import auto_compress
    from modelpress.loading import resolve, with_entry_like
    from modelpress.pipeline import compress as run_compress
    from modelpress.recipes.recipe import load_recipe

    if auto == (recipe is not None):
        raise BadInputError("give either --recipe RECIPE or --auto --max-drop X")
    # checked before the model loads: a bad budget (quality or time), recipe, data path or --out
    search = AutoFlags(auto, max_drop, objective, candidates, time_budget, exhaustive, no_cache).search()
    options = _run_options(threads, batch_sizes, eval_data, as_json, keep_slower=keep_slower)
    rec = load_recipe(recipe) if recipe is not None else None
    check_data(data, "--data")
    if input_shape:  # a malformed shape fails before the model loads; one that does not fit, once it has
        from modelpress.zoo.generic import ShapeEntry

        ShapeEntry.from_shape_text(input_shape)
    _check_out_folder(output, overwrite, model, data, eval_data, recipe, weights)
    _quiet_transformers()
    loaded = resolve(model, weights=weights, trust_code=_trust(trust_code, trust_pickle), cache_dir=options.cache_dir)
    if input_shape:
        from modelpress.loading import with_input_shape

        loaded = with_input_shape(loaded, input_shape)
    if like:  # an ONNX or other model without a metric of its own, scored like a zoo entry
        loaded = with_entry_like(loaded, like)
    if search is not None:
        _, report = auto_compress(loaded, search, out_dir=output, data=data, options=options, overwrite=overwrite)
    else:
        _, report = run_compress(loaded, rec, data, out_dir=output, options=options, overwrite=overwrite)  # type: ignore[arg-type]
    _print_result(report, output, as_json, "model")


def _run_options(threads: int | None, batch_sizes: str, eval_data: Path | None, as_json: bool, **more: Any) -> Any:
    """The run's options from the command line (`RunOptions` checks every value; --json prints no tables)."""
    from modelpress.core.options import RunOptions

    check_data(eval_data, "--eval-data")
    return RunOptions(
        threads=threads, batch_sizes=parse_batch_sizes(batch_sizes), eval_data=eval_data, progress=not as_json,
        console=out, **more,
    )  # fmt: skip


def _print_result(report: Any, output: Path, as_json: bool, what: str) -> None:
    if as_json:
        out.print_json(report.to_json())
    elif not report.auto:  # auto mode has said what it chose
        out.print(f"wrote {output}/ ({what} artifacts, report.json, report.md, report.html, recipe.yaml)")


def _check_out_folder(output: Path, overwrite: bool, *inputs: Any) -> None:
    """Refuse a bad --out (see core.outputs) before the model loads; inputs named by path are protected."""
    from modelpress.core.outputs import check_output

    check_output(output, kind="folder", overwrite=overwrite, inputs=inputs)


@app.command()
def distill(
    teacher: Annotated[str, typer.Argument(help="Teacher model spec: zoo name, folder, pkg.mod:factory.")],
    output: Annotated[Path, typer.Option("--out", "-o", help="Output folder (written atomically).")],
    student_layers: Annotated[
        str | None, typer.Option("--student-layers", help="Teacher layers the student keeps, e.g. 0,3,5.")
    ] = None,
    width_ratio: Annotated[
        float | None, typer.Option("--width-ratio", help="CNN students: share of channels kept, in (0, 1).")
    ] = None,
    mode: Annotated[str, typer.Option(help="online (teacher every step) or offline (cached outputs).")] = "offline",
    epochs: Annotated[int, typer.Option(help="Training epochs.", min=1)] = 3,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW, warm-up then cosine decay).")] = 2e-4,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the soft targets.")] = 2.0,
    alpha: Annotated[float, typer.Option(help="Weight of the soft targets vs hard labels, in [0, 1].")] = 0.5,
    hidden_weight: Annotated[float, typer.Option(help="Weight of hidden-state matching (0: off).")] = 0.0,
    eval_data: Annotated[
        Path | None, typer.Option("--eval-data", help="Evaluation data, e.g. the STS-B folder (default: found).")
    ] = None,
    threads: ThreadsOpt = None,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", "-b", help="Batch sizes to time.")] = "1,32",
    weights: WeightsOpt = None,
    trust_code: TrustCodeOpt = False,
    trust_pickle: TrustPickleOpt = False,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Distill a teacher into a student built from it; write the student's artifacts and report to --out.

    Example: [bold]modelpress distill minilm --student-layers 0,3,5 --out out/minilm-l3[/bold]

    Example: [bold]modelpress distill digits-cnn --width-ratio 0.48 --epochs 30 --lr 5e-3 --out out/d[/bold]
    """
    from modelpress.distill import DistillConfig, StudentConfig
    from modelpress.loading import resolve
    from modelpress.pipeline import compress as run_compress
    from modelpress.recipes.recipe import Recipe

    options = _run_options(threads, batch_sizes, eval_data, as_json)
    _quiet_transformers()
    try:
        layers = tuple(int(x) for x in student_layers.split(",")) if student_layers else ()
    except ValueError:
        raise BadInputError(f"--student-layers must be comma-separated integers, got {student_layers!r}") from None
    student = StudentConfig.from_dict({"layers": list(layers), "width_ratio": width_ratio})
    cfg = DistillConfig.from_dict(
        {
            "mode": mode,
            "epochs": epochs,
            "lr": lr,
            "temperature": temperature,
            "alpha": alpha,
            "hidden_weight": hidden_weight,
            "student": student.to_dict(),
        }
    )
    rec = Recipe(
        name="distill", description="knowledge distillation into a student built from the teacher", passes=(cfg,)
    )
    _check_out_folder(output, overwrite, teacher, eval_data, weights)
    loaded = resolve(teacher, weights=weights, trust_code=_trust(trust_code, trust_pickle), cache_dir=options.cache_dir)
    _, report = run_compress(loaded, rec, out_dir=output, options=options, overwrite=overwrite)
    _print_result(report, output, as_json, "student")


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="Model spec: zoo name, folder, .pt2 program, pkg.mod:factory.")],
    output: Annotated[
        Path, typer.Option("--out", "-o", help="The artifact: a .onnx or .pt2 file (written atomically).")
    ],
    input_shape: Annotated[
        list[str] | None,
        typer.Option("--input-shape", help="Example input shape, batch first (e.g. 1,3,32,32); repeat per input."),
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset.", min=13, max=21)] = 17,
    optimize: Annotated[
        bool, typer.Option("--optimize/--no-optimize", help="Fuse attention / apply ORT's offline optimizer.")
    ] = True,
    weights: WeightsOpt = None,
    trust_code: TrustCodeOpt = False,
    trust_pickle: TrustPickleOpt = False,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Export a model to ONNX (for ONNX Runtime) or an AOTInductor .pt2, checked against the model.

    Example: [bold]modelpress export minilm --out out/minilm.onnx[/bold]

    Example: [bold]modelpress export mypkg.nets:build --input-shape 1,3,32,32 --out out/net.pt2[/bold]
    """
    from modelpress.export.artifact import export_artifact

    _quiet_transformers()
    inputs = None
    if input_shape:
        from modelpress.zoo.generic import ShapeEntry

        inputs = tuple(ShapeEntry.from_shape_text(input_shape).example_inputs(2))
    parity = export_artifact(
        model,
        output,
        example_inputs=inputs,
        weights=weights,
        trust_code=_trust(trust_code, trust_pickle),
        opset=opset,
        optimize=optimize,
        overwrite=overwrite,
    )
    if as_json:
        out.print_json(json.dumps(parity))
    else:
        out.print(
            f"wrote {output}: max abs difference {parity['max_abs']:.2e}, "
            f"mean cosine {parity['mean_cosine']:.6f} against the PyTorch model"
        )


@app.command()
def sensitivity(
    model: Annotated[str, typer.Argument(help="Model spec: zoo name, folder, .pt2 program, pkg.mod:factory.")],
    recipe: Annotated[
        str, typer.Option("--recipe", "-r", help="Recipe whose quantization pass is measured layer by layer.")
    ] = "w4",
    metric: Annotated[str, typer.Option(help="fidelity (cosine to the float model) or task (the zoo metric).")] = (
        "fidelity"
    ),
    data: DataOpt = None,
    threads: ThreadsOpt = None,
    weights: WeightsOpt = None,
    trust_code: TrustCodeOpt = False,
    trust_pickle: TrustPickleOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Per-layer sensitivity: the quality drop when only that layer is quantized, most sensitive first.

    Example: [bold]modelpress sensitivity minilm --recipe int8-static[/bold]
    """
    from modelpress.core.context import Context
    from modelpress.core.options import RunOptions
    from modelpress.loading import resolve
    from modelpress.quant.sensitivity import MixedPrecisionConfig, fidelity_metric
    from modelpress.quant.sensitivity import sensitivity as measure
    from modelpress.recipes.recipe import load_recipe

    _quiet_transformers()
    if metric not in ("fidelity", "task"):
        raise BadInputError(f"--metric must be fidelity or task, got {metric!r}")
    rec = load_recipe(recipe)
    cfg = next((p for p in rec.passes if hasattr(p, "weight_scheme") or isinstance(p, MixedPrecisionConfig)), None)
    if cfg is None:
        raise BadInputError(f"recipe {recipe} has no quantization pass to measure")
    cfg = cfg.base if isinstance(cfg, MixedPrecisionConfig) else cfg
    check_data(data, "--data")
    loaded = resolve(model, weights=weights, trust_code=_trust(trust_code, trust_pickle))
    entry = loaded.entry
    if entry is None:
        raise BadInputError(f"{model}: its inputs are unknown; sensitivity needs a zoo model or a model folder")
    batches = entry.calibration_data(32, 8)
    if metric == "task":
        if not entry.has_quality:
            raise BadInputError(f"{model} has no task metric; use --metric fidelity")
        from modelpress.pipeline import choice_metric

        score = choice_metric(entry, data)  # the validation split where the model has one
    else:
        score = fidelity_metric(loaded.model, batches[:4])
    ctx = Context(data=batches, options=RunOptions(threads=threads, progress=not as_json))
    with ctx.threads_scope():
        base, rows = measure(loaded.model.eval(), cfg, score, ctx)
    if as_json:
        out.print_json(json.dumps({"baseline": base, "rows": [r.__dict__ for r in rows]}))
        return
    from rich.table import Table

    table = Table(title=f"{loaded.name}: {type(cfg).__name__} one layer at a time ({metric} {base:.4f} unquantized)")
    for column in ("layer", "params", "quality", "drop"):
        table.add_column(column, justify="left" if column == "layer" else "right")
    for r in rows:
        table.add_row(r.layer, f"{r.params:,}", f"{r.quality:.5f}", f"{r.drop:.5f}")
    out.print(table)


@app.command()
def recipes(as_json: JsonOpt = False) -> None:
    """List the built-in recipes with a one-line description each.

    Example: [bold]modelpress recipes[/bold]
    """
    from rich.table import Table

    from modelpress.recipes.recipe import builtin_names, load_recipe

    items = [load_recipe(n) for n in builtin_names()]
    if as_json:
        out.print_json(json.dumps({r.name: r.to_dict() for r in items}))
        return
    table = Table("recipe", "description")
    for r in items:
        table.add_row(r.name, r.description)
    out.print(table)


@app.command()
def zoo() -> None:
    """List the built-in models that work offline.

    Example: [bold]modelpress zoo[/bold]
    """
    from rich.table import Table

    from modelpress.zoo import get_entry, zoo_names

    table = Table("name", "task", "description")
    for name in zoo_names():
        entry = get_entry(name)
        table.add_row(name, entry.task, entry.description)
    out.print(table)


def _quiet_transformers() -> None:
    """The CLI owns the process: silence transformers' per-load weight progress bars."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def _interrupted() -> int:
    """The exit code of a run stopped by a signal (Ctrl-C: 130, SIGTERM: 143, SIGHUP: 129)."""
    err.print("interrupted: nothing was written")
    return signal_exit_code()


def main(argv: list[str] | None = None) -> int:
    """Console entry point; maps errors to exit codes 2 (bad input) and 1 (internal)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download at run time
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    with unwind_on_signals():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    try:
        # Outside standalone mode typer returns an exit code instead of raising (Ctrl-C: 130).
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and not isinstance(code, bool) and code != 0:
            return _interrupted() if code == 130 else code
    except BadInputError as e:
        err.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        return 2
    except NotAvailableError as e:
        err.print(f"[yellow]{e}[/yellow]", highlight=False, soft_wrap=True)
        return 1
    except ModelpressError as e:
        err.print(f"[bold red]error:[/bold red] {e}", highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as e:
        # typer ships its own click: recognise its exceptions by shape, not by class.
        name = type(e).__name__
        if name == "Exit":
            return int(getattr(e, "exit_code", 0))
        if name == "Abort":
            return _interrupted()
        if hasattr(e, "show") and hasattr(e, "exit_code"):  # UsageError, BadParameter, NoSuchOption...
            e.show()
            return int(e.exit_code)
        if os.environ.get("MODELPRESS_DEBUG"):
            raise
        err.print(f"[bold red]internal error:[/bold red] {type(e).__name__}: {e}", highlight=False, soft_wrap=True)
        err.print("[dim]set MODELPRESS_DEBUG=1 for the traceback[/dim]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
