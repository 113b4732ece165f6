"""report.html: one self-contained page (plots embedded as PNG data) of what compression gained and cost.

Plots: quality against latency (at each measured batch size) and against size, with the Pareto front
of the measured models; per-layer sensitivity and per-layer bit width / sparsity when a pass recorded
them. Rendered with matplotlib's Agg backend; no network, no scripts.

    >>> Path("report.html").write_text(render_html(report))
"""

from __future__ import annotations

import base64
import html
import io
from typing import TYPE_CHECKING, Any

from modelpress.core.model_stats import ModelStats, stats_table_markdown

if TYPE_CHECKING:  # the report calls render_html: at run time this module needs only its figures
    from modelpress.core.report import Report


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the points (cost, quality) no other point beats on both: lower cost, better quality."""
    sign = 1.0 if higher_is_better else -1.0
    scored = [(cost, sign * quality) for cost, quality in points]
    front = [
        i
        for i, (cost, q) in enumerate(scored)
        if not any(c <= cost and qq >= q and (c < cost or qq > q) for c, qq in scored)
    ]
    return sorted(front, key=lambda i: points[i][0])


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _tradeoff(rows: list[ModelStats], cost: str, batch: str | None = None) -> str | None:
    """Quality against latency (ms at `batch`) or size (MB), Pareto front drawn through the best points."""
    import matplotlib.pyplot as plt

    pts, names = [], []
    for r in rows:
        if r.quality is None:
            continue
        if cost == "latency" and batch in r.latency_ms:
            pts.append((r.latency_ms[batch].p50, r.quality.value))
        elif cost == "size" and r.size_bytes:
            pts.append((r.size_bytes / 1e6, r.quality.value))
        else:
            continue
        names.append(r.name)
    if len(pts) < 2:
        return None
    higher = next(r.quality.higher_is_better for r in rows if r.quality is not None)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue", zorder=3)
    for (x, y), name in zip(pts, names, strict=True):
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    front = pareto_front(pts, higher)
    ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], "--", color="tab:orange", label="Pareto front")
    quality = next(r.quality.name for r in rows if r.quality is not None)
    xs = [p[0] for p in pts]
    if max(xs) > 20 * min(xs):  # e.g. eager int8 next to a compiled artifact
        ax.set_xscale("log")
    ax.set_xlabel(f"p50 latency at batch {batch} (ms)" if cost == "latency" else "size on disk (MB)")
    ax.set_ylabel(quality)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _png(fig)


def _candidates(auto: dict[str, Any], cost: str, higher: bool) -> str | None:
    """Auto mode: every candidate with figures, validation quality against `cost` ("p50_ms" or "size_mb"):
    measured forms filled, screened ones hollow, the Pareto front of the measured ones, the choice in bold."""
    import matplotlib.pyplot as plt

    rows = [
        r for r in auto.get("candidates", []) if r.get(cost) is not None and r.get("validation_quality") is not None
    ]
    if len(rows) < 2:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for stage, style in (
        ("measured", {"color": "tab:blue"}),
        ("screened", {"facecolors": "none", "edgecolors": "gray"}),
    ):
        pts = [(r[cost], r["validation_quality"]) for r in rows if r.get("stage", "measured") == stage]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=stage, zorder=3, **style)
    measured = [r for r in rows if r.get("stage", "measured") == "measured"]
    points = [(r[cost], r["validation_quality"]) for r in measured]
    front = pareto_front(points, higher) if len(points) > 1 else []
    if front:
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="tab:orange",
                label="Pareto front (measured)")  # fmt: skip
    for r in rows:
        chosen = r.get("status") == "chosen"
        label = f"{r['recipe']} {str(r['artifact']).split()[0]}" + (" (chosen)" if chosen else "")
        ax.annotate(label, (r[cost], r["validation_quality"]), textcoords="offset points", xytext=(5, 4), fontsize=7,
                    weight="bold" if chosen else "normal")  # fmt: skip
    xs = [r[cost] for r in rows]
    if min(xs) > 0 and max(xs) > 20 * min(xs):
        ax.set_xscale("log")
    ax.set_xlabel(f"p50 latency at batch {auto.get('batch_size')} (ms)" if cost == "p50_ms" else "size on disk (MB)")
    ax.set_ylabel("validation quality")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _png(fig)


def _per_layer(values: dict[str, float], title: str, xlabel: str) -> str:
    import matplotlib.pyplot as plt

    names = list(values)[:60]  # a readable chart; the JSON holds every layer
    fig, ax = plt.subplots(figsize=(6.4, max(2.0, 0.22 * len(names) + 1)))
    ax.barh(range(len(names)), [values[n] for n in names], color="tab:green")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _layer_charts(report: Report) -> list[tuple[str, str]]:
    """(title, png) per per-layer table the passes recorded: sensitivity, bit width, sparsity."""
    charts = []
    for p in report.passes:
        stats = p.stats
        rows = stats.get("sensitivity")
        if isinstance(rows, list) and rows and isinstance(rows[0], dict) and "drop" in rows[0]:
            values = {r["layer"]: float(r["drop"]) for r in rows if "layer" in r}
            charts.append((f"{p.name}: quality drop with one layer quantized", _per_layer(values, p.name, "drop")))
        elif isinstance(rows, dict) and rows:
            values = {k: float(v) for k, v in rows.items()}
            charts.append((f"{p.name}: per-node sensitivity", _per_layer(values, p.name, "fidelity drop")))
        bits = stats.get("bits")
        if isinstance(bits, dict) and len(set(bits.values())) > 1:
            charts.append((f"{p.name}: bit width per layer", _per_layer(bits, p.name, "weight bits")))
        sparsity = stats.get("sparsity")
        if isinstance(sparsity, dict) and sparsity:
            values = {k: float(v) for k, v in sparsity.items() if isinstance(v, (int, float))}
            if values:
                charts.append((f"{p.name}: sparsity per layer", _per_layer(values, p.name, "sparsity")))
    return charts


def render_html(report: Report) -> str:
    """The report as one HTML page with embedded plots."""
    import matplotlib

    matplotlib.use("Agg")
    rows = [s for s in (report.baseline, *(report.artifacts or [report.compressed])) if s is not None]
    figures: list[tuple[str, str]] = []
    for batch in sorted({b for r in rows for b in r.latency_ms}, key=int):
        if (png := _tradeoff(rows, "latency", batch)) is not None:
            figures.append((f"Quality against latency, batch {batch}", png))
    if (png := _tradeoff(rows, "size")) is not None:
        figures.append(("Quality against size", png))
    base_quality = report.baseline.quality if report.baseline is not None else None
    higher = base_quality.higher_is_better if base_quality is not None else True
    for cost, what in (("p50_ms", "latency"), ("size_mb", "size")):
        if report.auto and (png := _candidates(report.auto, cost, higher)) is not None:
            figures.append((f"Auto mode: every candidate's validation quality against {what}", png))
    figures += _layer_charts(report)
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>modelpress report: {esc(report.model)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}</style></head><body>",
        f"<h1>modelpress report: {esc(report.model)}</h1>",
    ]
    if report.recipe:
        name, description = report.recipe.get("name"), report.recipe.get("description") or ""
        parts.append(f"<p>recipe <b>{esc(str(name))}</b>: {esc(str(description))}</p>")
    if rows:
        parts.append(_table(stats_table_markdown(rows)))
    if report.auto:
        lines = report.to_markdown().splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("## Auto mode"))
        table = [line for line in lines[start + 1 :] if line.startswith("|")]
        parts.append(f"<h2>{esc(lines[start][3:])}</h2>" + _table(table))
        parts.append(f"<p>chosen: <b>{esc(str(report.auto.get('chosen')))}</b></p>")
    for title, png in figures:
        img = f'<img alt="{esc(title)}" src="data:image/png;base64,{png}">'
        parts.append(f"<figure>{img}<figcaption>{esc(title)}</figcaption></figure>")
    if report.parity:
        parts.append("<h2>Export parity</h2><pre>" + esc(_json(report.parity)) + "</pre>")
    if report.warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{esc(w)}</li>" for w in report.warnings) + "</ul>")
    env = report.environment or {}
    cpu = env.get("cpu", {})
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())
    parts.append(
        f"<h2>Environment</h2><p>{esc(str(cpu.get('model')))}, {env.get('threads')} threads; {esc(versions)}</p>"
    )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _table(markdown: list[str]) -> str:
    head, _, *body = markdown
    cells = [c.strip() for c in head.strip("|").split("|")]
    out = ["<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cells) + "</tr>"]
    for line in body:
        out.append("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in line.strip("|").split("|")) + "</tr>")
    return "\n".join(out) + "</table>"


def _json(value: Any) -> str:
    import json

    return json.dumps(value, indent=2, default=str)
