"""The candidate table of auto mode: one row per candidate and form, screened or measured, with why it was
dropped; its Markdown for report.md and the Pareto front of quality against latency and size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from modelpress.auto.trial import Setting, Trial, drop_of
from modelpress.core.model_stats import ModelStats

FORM_NAMES = {"onnx": "model.onnx (ONNX Runtime)", "pt2": "model.pt2 (AOTInductor)",
              "genai": "genai/ (ONNX Runtime GenAI)"}  # fmt: skip


def measured_row(setting: Setting, trial: Trial, kind: str, stats: ModelStats) -> dict[str, Any]:
    """A fully measured form: validation drop (the budget's split), test drop (reported), p50, size, gate."""
    base = setting.baseline
    assert base is not None and base.quality is not None
    largest = str(max(setting.options.batch_sizes))
    gate = stats.speed_gate or {}
    row = _common(trial, kind)
    row.update(stage="measured", status="measured", cached=trial.cached)
    if gate.get("status") == "stopped" or stats.quality is None:
        row.update(status="stopped", why=gate.get("message", "stopped by the speed gate"), within_budget=False,
                   slower_than_original=True, p50_ms=float("inf"), size_mb=(stats.size_bytes or 0) / 1e6)  # fmt: skip
        return row
    val, base_val = stats.validation_quality, base.validation_quality
    held_out = val is not None and base_val is not None
    reference, value = (base_val.value, val.value) if held_out else (base.quality.value, stats.quality.value)  # type: ignore[union-attr]
    drop, within = drop_of(reference, value, base.quality.higher_is_better, setting.budget)
    test_drop, _ = drop_of(base.quality.value, stats.quality.value, base.quality.higher_is_better, setting.budget)
    lat = stats.latency_ms.get(largest)
    p50 = lat.p50 if lat else float("inf")
    if setting.objective == "decode":  # ms per decoded token at batch 1
        from modelpress.auto.decode import ms_per_token

        p50 = ms_per_token((stats.throughput or {}).get("generation"))
    row.update(
        quality=stats.quality.value, validation_quality=val.value if held_out else None, drop=drop,  # type: ignore[union-attr]
        drop_split="validation" if held_out else "test", test_drop=test_drop, within_budget=within,
        relative_drop=drop / abs(reference) if reference else None,
        p50_ms=p50, size_mb=(stats.size_bytes or 0) / 1e6,
        slower_than_original=gate.get("status") != "ok",
    )  # fmt: skip
    if row["slower_than_original"]:
        row["why"] = gate.get("message", "flagged by the speed gate")
    return row


def screened_rows(setting: Setting, trial: Trial) -> list[dict[str, Any]]:
    """A candidate that was only screened: one row per form it has figures for (or one for the candidate)."""
    largest = setting.key
    rows = []
    for kind, form in trial.forms.items():
        if kind in trial.measured:
            continue
        row = _common(trial, kind)
        ms = form.get("ms", {}).get(largest)
        status = trial.status if form.get("status") in ("ok", "built", None) else form["status"]
        if status == "measured":  # another form of the candidate was: this one was left behind
            status = "dropped"
        row.update(
            stage="screened", status=status, why=form.get("why") or trial.why or "not measured in full",
            p50_ms=ms if ms is not None else float("inf"),
            size_mb=form["size_bytes"] / 1e6 if form.get("size_bytes") else None,
            validation_quality=trial.screen_quality,
            drop=trial.screen_drop, drop_split="validation subset" if setting.subset else "validation",
            within_budget=trial.screen_within,
            slower_than_original=form.get("status") in ("slower", "stopped"), cached=trial.cached, quality=None,
        )  # fmt: skip
        rows.append(row)
    if not trial.forms:
        row = _common(trial, "-")
        row.update(stage="screened", status=trial.status, why=trial.why, within_budget=False, cached=trial.cached,
                   slower_than_original=False, p50_ms=float("inf"), size_mb=0.0, drop=None, quality=None)  # fmt: skip
        rows.append(row)
    return rows


def _common(trial: Trial, kind: str) -> dict[str, Any]:
    row = {"recipe": trial.cand.name, "artifact": FORM_NAMES.get(kind, kind), "params": trial.cand.params,
           "why": "", "build_s": round(trial.build_s, 2)}  # fmt: skip
    if trial.student is not None:
        row["student"] = trial.student
    return row


def pareto(rows: list[dict[str, Any]], cost: str, higher_is_better: bool) -> list[int]:
    """Indices of the rows no other row beats on both `cost` (lower) and validation quality."""
    from modelpress.core.report_html import pareto_front

    usable = [i for i, r in enumerate(rows) if r.get("validation_quality") is not None and r.get(cost) not in
              (None, float("inf"))]  # fmt: skip
    points = [(rows[i][cost], rows[i]["validation_quality"]) for i in usable]
    return [usable[j] for j in pareto_front(points, higher_is_better)]


def summary(rows: list[dict[str, Any]]) -> str:
    """The table as one line per row, for an error that says why nothing was chosen."""
    parts = []
    for r in rows:
        drop = f"drop {r['drop']:.4g}" if r.get("drop") is not None else ""
        parts.append(f"{r['recipe']} {r['artifact']}: {r['status']} {drop} {r.get('why') or ''}".strip())
    return "; ".join(parts)


def artifact_name(kind: str) -> str:
    return Path(FORM_NAMES.get(kind, kind).split()[0]).name
