"""The chosen candidate written out: its artifacts, `recipe.yaml` (the configuration, loadable by
`compress --recipe`), and the report with the whole candidate table and its Pareto fronts."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelpress.auto.space import family
from modelpress.auto.table import artifact_name, pareto
from modelpress.auto.trial import Setting, Trial, build, recipe_key
from modelpress.core.atomic import atomic_dir
from modelpress.core.environment import cpu_info, environment
from modelpress.core.report import Report
from modelpress.recipes.recipe import Recipe

if TYPE_CHECKING:  # search.py calls write_winner: at run time this module needs only the object's fields
    from modelpress.auto.search import AutoSearch

REPORT_FILES = ("report.json", "report.md", "report.html", "recipe.yaml", ".modelpress")


def write_winner(
    setting: Setting, trial: Trial, kind: str, rows: list[dict[str, Any]], search: AutoSearch, out_dir: Path
) -> Report:
    from modelpress.pipeline import record_data

    rec, entry = trial.cand.recipe, setting.loaded.entry
    assert entry is not None
    forms = tuple(trial.measured)
    folder = files_of(setting, trial, forms)
    report = build_report(setting, trial, folder)
    recipe = Recipe(rec.name, rec.description, rec.passes, (*forms, *trial.cand.targets), rec.order, rec.lowering)
    report.recipe = {"name": rec.name, **recipe.to_dict()}
    report.baseline = setting.baseline
    report.artifacts, skip = [], set(REPORT_FILES)
    for form, stats in trial.measured.items():
        name = artifact_name(form)
        gate = stats.speed_gate or {}
        if gate.get("status") != "ok" and not setting.options.keep_slower:
            skip.add(name)
            stats.artifact, gate["written"] = None, False
            report.warn(f"{gate.get('message', name + ': flagged by the speed gate')} - not written")
        else:
            stats.artifact = str(out_dir / name)
        report.artifacts.append(stats)
    report.compressed = trial.measured[kind]
    if setting.note:
        report.warn(f"auto: {setting.note}")
    if kind == "genai" and trial.report.get("genai"):
        written = trial.report["genai"]
        report.warn(f"genai/: {len(written['matmul_nbits'])} layers as MatMulNBits (accuracy_level "
                    f"{written['accuracy_level']}), float: {', '.join(written['float']) or 'none'}")  # fmt: skip
    for use in ("evaluation", "validation"):
        record_data(report, entry, use, data=setting.options.eval_data)
    largest = max(setting.options.batch_sizes)
    clean = [_finite(r) for r in rows]
    higher = setting.baseline.quality.higher_is_better if setting.baseline and setting.baseline.quality else True
    report.auto = {
        "max_drop": search.max_drop,
        "objective": search.objective,
        "strategy": search.strategy,
        "time_budget_s": search.time_budget_s,
        "elapsed_s": round(setting.clock.elapsed(), 1),
        "batch_size": 1 if search.objective == "decode" else largest,
        "family": family(setting.loaded),
        "cpu": {k: cpu_info().get(k) for k in ("model", "int8", "bf16")},
        "screening": {"calls": 3, "subset": setting.subset, "full_repeats": setting.repeats},
        "cache": {"folder": str(setting.cache.folder), "hits": setting.cache.hits, "enabled": setting.cache.enabled},
        "candidates": clean,
        "measured": len({r["recipe"] for r in clean if r["stage"] == "measured"}),
        "pareto": {"latency": pareto(clean, "p50_ms", higher), "size": pareto(clean, "size_mb", higher)},
        "runoff": setting.runoff,
        "chosen": f"{rec.name}: {report.compressed.name}",
        "recipe_file": "recipe.yaml",
    }
    with atomic_dir(out_dir) as tmp:
        copy_folder(folder, tmp, skip)
        (tmp / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
        report.write(tmp)
    if folder != trial.folder:  # already a kept copy
        return report
    (folder / "report.json").write_text(report.to_json() + "\n", encoding="utf-8")
    setting.cache.keep_files(recipe_key(rec), folder)
    return report


def files_of(setting: Setting, trial: Trial, forms: tuple[str, ...]) -> Path:
    """A folder holding the winner's artifacts: built in this run, kept by an earlier one, or built now."""
    key = recipe_key(trial.cand.recipe)
    need = [artifact_name(f) for f in forms] + [t if t == "genai" else f"model.{t}" for t in trial.cand.targets]
    if all((trial.folder / n).exists() for n in need):
        return trial.folder
    kept = setting.cache.files(key)
    if kept is not None and all((kept / n).exists() for n in need):
        return kept
    missing = tuple(f for f in (*forms, *trial.cand.targets) if not (trial.folder / _file(f)).exists())
    build(setting, trial, missing)
    return trial.folder


def _file(form: str) -> str:
    return "genai" if form == "genai" else f"model.{form}"


def build_report(setting: Setting, trial: Trial, folder: Path) -> Report:
    """The winner's build report (passes, warnings, parity): from this run, or kept with its files."""
    built = trial.report.get("report")
    if built is None and (folder / "report.json").is_file():
        import json

        built = Report.from_dict(json.loads((folder / "report.json").read_text(encoding="utf-8")))
        built.auto = None
    if built is None:
        built = Report(model=setting.loaded.name, environment=environment(setting.options.threads))
    if trial.report.get("parity"):
        built.parity = trial.report["parity"]
    return built


def copy_folder(source: Path, target: Path, skip: set[str]) -> None:
    """Copy the files and folders of `source` into `target`, less the names in `skip`."""
    for item in source.iterdir():
        if item.name not in skip:
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, target / item.name)


def _finite(row: dict[str, Any]) -> dict[str, Any]:
    """A row with infinities (no timing) as None: report.json stays strict JSON."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
