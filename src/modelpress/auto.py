"""Auto mode: the fastest (or smallest) deployable model within a quality budget, measured on this machine.

Every candidate recipe is applied, exported (`.onnx` and `.pt2`) and measured by `compress` in this
run; each artifact whose task metric stays within `max_drop` of the original's, and which the
speed gate did not flag as slower than the original, is eligible; the best one by `objective`
wins. The candidate table goes into the report.

    >>> stats, report = auto_compress("minilm", 0.5, out_dir="out/minilm-auto")
    >>> stats, report = auto_compress("smollm2-135m", AutoSearch(max_drop="5%", candidates=("w4-gptq", "w8")),
    ...                               out_dir="out/smollm2-auto", options=RunOptions(threads=2))
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rich.console import Console

from modelpress.core.atomic import atomic_dir
from modelpress.core.errors import BadInputError, ConfigError
from modelpress.core.options import RunOptions
from modelpress.core.outputs import check_output
from modelpress.core.report import ModelStats, Report
from modelpress.loading import LoadedModel
from modelpress.recipes.recipe import Recipe, load_recipe

# The float model compiled as it is (bf16 ops in the .pt2 where the CPU has bf16 dot products) is a
# candidate too: on AMX CPUs it is the strongest anchor, and int8 must beat it to be chosen.
FLOAT = Recipe(name="float", description="the model as it is, exported", passes=(), export=("onnx", "pt2"))
# precision x granularity x backend x depth: float (bf16 in the .pt2 where native), int8 per-tensor static / per-token
# dynamic / SmoothQuant, weight-only int8 and int4 (per group), and distilled students (transformer encoders
# of 6 layers; other models refuse them and the table says why). Every candidate is exported to ONNX
# Runtime and AOTInductor.
DEFAULT_CANDIDATES = (
    "float", "int8-smooth", "int8-dynamic", "int8-static", "w8", "w4", "distill-l4-int8", "distill-l3-int8",
)  # fmt: skip
Objective = Literal["latency", "size"]


def parse_max_drop(max_drop: float | str) -> tuple[float, bool]:
    """The budget as (amount, relative): `0.5` is 0.5 in the metric's units; `"5%"` is a 5% change of the
    original's value (a perplexity may rise 5%). Refuses anything else (`ConfigError`)."""
    if not isinstance(max_drop, str):
        check_max_drop(max_drop)
        return float(max_drop), False
    text = max_drop.strip()
    try:
        amount = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ConfigError(
            f"max_drop must be a number in the metric's units (0.5) or a percentage of the original's value "
            f"(5%), got {max_drop!r}"
        ) from None
    check_max_drop(amount)
    return amount, text.endswith("%")


def check_max_drop(max_drop: float | str) -> None:
    """Refuse a quality budget that is not a finite number >= 0 (NaN would compare false with every drop)."""
    if isinstance(max_drop, str):
        parse_max_drop(max_drop)
        return
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not math.isfinite(max_drop):
        raise ConfigError(
            f"max_drop must be a finite number >= 0 (the allowed quality drop in the metric's units), got {max_drop}"
        )
    if max_drop < 0:
        raise ConfigError(f"max_drop must be >= 0, got {max_drop}")


@dataclass(frozen=True)
class AutoSearch:
    """What auto mode looks for: the best artifact by `objective` within a quality drop of `max_drop`.

    `max_drop` is in the units of the model's task metric (STS-B Spearman x100: 0.5 = half a point;
    accuracy: 0.005 = half a point), or a string percentage of the original's value (`"5%"`: a
    perplexity may rise 5%). `objective` "latency" ranks by p50 at the largest batch size, "size" by
    bytes on disk. `candidates`: the recipes tried ("float" is the model as it is, exported). Every
    value is checked when the object is made (`ConfigError`).
    """

    max_drop: float | str
    objective: Objective = "latency"
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES

    def __post_init__(self) -> None:
        parse_max_drop(self.max_drop)
        if self.objective not in ("latency", "size"):
            raise ConfigError(f"objective must be latency or size, got {self.objective!r}")
        if isinstance(self.candidates, str) or not self.candidates:
            raise ConfigError(f"candidates must be a non-empty list of recipe names, got {self.candidates!r}")
        object.__setattr__(self, "candidates", tuple(self.candidates))
        self.recipes()  # an unknown recipe name fails here, before any work

    def recipes(self) -> list[Recipe]:
        return [FLOAT if name == "float" else load_recipe(name) for name in self.candidates]


def auto_compress(
    model: str | Path | LoadedModel,
    search: AutoSearch | float | str,
    *,
    out_dir: str | Path,
    data: Any | None = None,
    options: RunOptions | None = None,
    overwrite: bool = False,
    trust_code: bool = False,
) -> tuple[Any, Report]:
    """Compress `model` with every candidate recipe of `search` and keep the best artifact within its budget.

    `search`: an `AutoSearch`, or its `max_drop` alone (latency objective, every built-in candidate).
    `data`, `options`, `overwrite` and `trust_code` as for `compress`. Returns the chosen artifact's figures
    (`ModelStats`) and the report, whose `auto` section lists every candidate.
    """
    from modelpress.pipeline import calibration_for, claim_out_dir, compress_loaded, input_paths, load_for_run

    opts = options if options is not None else RunOptions()
    check_output(out_dir, kind="folder", overwrite=overwrite, inputs=input_paths(model, opts.eval_data))
    search = search if isinstance(search, AutoSearch) else AutoSearch(max_drop=search)
    budget = parse_max_drop(search.max_drop)
    recipes = search.recipes()
    loaded = load_for_run(model, opts, trust_code)
    if loaded.entry is None or not loaded.entry.has_quality:
        raise BadInputError(
            f"{loaded.spec}: auto mode needs a task metric; none is known for this model "
            "(use a zoo model, or give one with --like and its data with --eval-data)"
        )
    batches = calibration_for(loaded, data, [r for r in recipes if r.passes])
    run_opts = opts.replace(validation=True, keep_slower=True)
    batch_sizes = opts.batch_sizes
    rows: list[dict[str, Any]] = []
    baseline: ModelStats | None = None  # the original, measured with the first candidate only
    best: tuple[float, Path, str, Report] | None = None
    with (
        claim_out_dir(out_dir, overwrite, loaded, opts.eval_data),
        tempfile.TemporaryDirectory(prefix="modelpress-auto.") as work,
    ):
        for rec in recipes:
            folder = Path(work) / rec.name
            try:
                _, report = compress_loaded(loaded, rec, batches, folder, run_opts, baseline)
            except BadInputError as e:  # a recipe that does not apply to this model
                rows.append({"recipe": rec.name, "artifact": "-", "error": str(e)})
                continue
            baseline = report.baseline
            for stats in report.artifacts:
                if not stats.artifact:  # the eager model: not a deployable file
                    continue
                gate = stats.speed_gate or {}
                if gate.get("status") == "stopped":  # the speed gate stopped it: no figures to rank
                    rows.append({"recipe": rec.name, "artifact": stats.name, "error": gate["message"]})
                    continue
                row = _row(rec.name, stats, report.baseline, budget, batch_sizes)
                # an artifact slower than the original is never chosen, whatever its quality
                row["slower_than_original"] = gate.get("status") == "slower"
                rows.append(row)
                score = row["p50_ms"] if search.objective == "latency" else row["size_mb"]
                eligible = row["within_budget"] and not row["slower_than_original"]
                if eligible and (best is None or score < best[0]):
                    best = (score, folder, row["artifact"], report)
        if best is None:
            raise BadInputError(
                f"no candidate stays within a quality drop of {search.max_drop} at a speed above the original's: "
                f"{_summary(rows)}"
            )
        _, folder, artifact, report = best
        report.auto = {
            "max_drop": search.max_drop,
            "objective": search.objective,
            "batch_size": max(batch_sizes),
            "candidates": rows,
            "chosen": f"{folder.name}: {artifact}",
        }
        report.compressed = next(s for s in report.artifacts if s.name == artifact)
        with atomic_dir(out_dir) as tmp:
            flagged = {Path(s.artifact).name for s in report.artifacts if s.artifact and _flagged(s)}
            for item in folder.iterdir():  # the chosen candidate's files, less those the speed gate flagged
                if item.name not in ("report.json", "report.md", "report.html", *flagged):
                    shutil.copy2(item, tmp / item.name)
            report.write(tmp)
    if opts.progress:
        (opts.console or Console()).print(f"auto: chose {report.auto['chosen']} (of {len(rows)} measured artifacts)")
    return report.compressed, report


def _flagged(stats: ModelStats) -> bool:
    return (stats.speed_gate or {}).get("status") in ("slower", "stopped")


def _row(
    recipe: str, stats: ModelStats, base: ModelStats | None, budget: tuple[float, bool], batch_sizes: tuple[int, ...]
) -> dict[str, Any]:
    assert base is not None and base.quality is not None and stats.quality is not None
    sign = 1.0 if base.quality.higher_is_better else -1.0
    test_drop = sign * (base.quality.value - stats.quality.value)
    # The budget is checked on the validation split where the model has one; the test split is reported.
    held_out = base.validation_quality is not None and stats.validation_quality is not None
    drop = sign * (base.validation_quality.value - stats.validation_quality.value) if held_out else test_drop  # type: ignore[union-attr]
    lat = stats.latency_ms.get(str(max(batch_sizes)))
    amount, relative = budget
    reference = base.validation_quality.value if held_out else base.quality.value  # type: ignore[union-attr]
    # a relative budget compares the change with the original's value (perplexity +5%)
    scaled = drop / abs(reference) if relative and reference else drop
    return {
        "recipe": recipe,
        "artifact": stats.name,
        "quality": stats.quality.value,
        "validation_quality": stats.validation_quality.value if held_out else None,  # type: ignore[union-attr]
        "drop": drop,
        "drop_split": "validation" if held_out else "test",
        "test_drop": test_drop,
        "p50_ms": lat.p50 if lat else float("inf"),
        "size_mb": (stats.size_bytes or 0) / 1e6,
        "relative_drop": drop / abs(reference) if reference else None,
        "within_budget": scaled <= amount,
    }


def _summary(rows: list[dict[str, Any]]) -> str:
    return "; ".join(
        f"{r['recipe']} {r['artifact']}: "
        + (r["error"] if "error" in r else f"drop {r['drop']:.4f}")
        + (" (slower than the original)" if r.get("slower_than_original") else "")
        for r in rows
    )
