"""The report: what compression gained and what it cost, measured in one run.

`Report.to_dict()` is the report.json contract of docs/DESIGN.md:
`model`, `recipe`, `baseline` / `compressed` (each `size_bytes`, `params`, `nonzero_params`,
`latency_ms` per batch size with `p50`/`p90`, `quality` with `name`/`value`), `passes`,
`parity`, `environment`, plus `warnings` (skipped layers and the like) and `data`: what each step
ran on (`training`, `calibration`, `validation`, `evaluation`: each `source`, `split`, `count`).
Each model's figures (`ModelStats`, `Latency`, `Quality`) and their table live in `core.model_stats`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modelpress.core.environment import environment
from modelpress.core.model_stats import Latency, ModelStats, Quality, speed_cell, stats_table_markdown

__all__ = ["Report", "PassRecord", "ModelStats", "Latency", "Quality", "stats_table_markdown", "speed_cell"]


@dataclass
class PassRecord:
    name: str
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    """Collects everything a run measured; written as report.json / report.md."""

    model: str
    recipe: dict[str, Any] | None = None
    baseline: ModelStats | None = None
    compressed: ModelStats | None = None
    passes: list[PassRecord] = field(default_factory=list)
    parity: dict[str, Any] | None = None
    environment: dict[str, Any] = field(default_factory=environment)
    warnings: list[str] = field(default_factory=list)
    artifacts: list[ModelStats] = field(default_factory=list)  # every measured form; `compressed` is the fastest
    auto: dict[str, Any] | None = None  # auto mode: budget, objective, every candidate measured, the choice
    data: dict[str, dict[str, Any]] = field(default_factory=dict)  # per use: source, split, count

    def add_pass(self, name: str, seconds: float, **stats: Any) -> None:
        self.passes.append(PassRecord(name, float(seconds), dict(stats)))

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "recipe": self.recipe,
            "baseline": self.baseline.to_dict() if self.baseline else None,
            "compressed": self.compressed.to_dict() if self.compressed else None,
            "passes": [asdict(p) for p in self.passes],
            "parity": self.parity,
            "environment": self.environment,
            "warnings": list(self.warnings),
            "artifacts": [a.to_dict() for a in self.artifacts],
            "data": self.data,
            **({"auto": self.auto} if self.auto is not None else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        return cls(
            model=d["model"],
            recipe=d.get("recipe"),
            baseline=ModelStats.from_dict(d["baseline"]) if d.get("baseline") else None,
            compressed=ModelStats.from_dict(d["compressed"]) if d.get("compressed") else None,
            passes=[PassRecord(**p) for p in d.get("passes", [])],
            parity=d.get("parity"),
            environment=d.get("environment", {}),
            warnings=list(d.get("warnings", [])),
            artifacts=[ModelStats.from_dict(a) for a in d.get("artifacts", [])],
            auto=d.get("auto"),
            data=dict(d.get("data") or {}),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def to_markdown(self) -> str:
        rows = [s for s in (self.baseline, *(self.artifacts or [self.compressed])) if s is not None]
        lines = [f"# modelpress report: {self.model}", ""]
        if rows:
            lines += stats_table_markdown(rows)
        greedy = [(r.name, r.quality.details) for r in rows if r.quality and "greedy" in (r.quality.details or {})]
        if greedy:  # a causal LM's sanity check: what each form writes after the same prompt
            lines += ["", f"## Greedy continuation of {greedy[0][1].get('prompt', 'the prompt')!r}", ""]
            lines += ["| model | continuation |", "|---|---|"]
            lines += [f"| {name} | {_cell(str(d['greedy']))} |" for name, d in greedy]
        speeds = [(r.name, (r.throughput or {}).get("generation")) for r in rows]
        speeds = [(name, g) for name, g in speeds if g]
        speeds += [("genai/ (ONNX Runtime)", p.stats["generation"]) for p in self.passes if "generation" in p.stats]
        if speeds:  # causal LMs in eager form and the GenAI decoder (the KV cache): prompt and generated tokens/s
            lines += ["", f"## Generation ({speeds[0][1]['prompt_tokens']}-token prompt, greedy, KV cache)", ""]
            lines += ["| model | prefill tok/s bs1 | decode tok/s bs1 | prefill tok/s bs8 | decode tok/s bs8 |"]
            lines += ["|---|---:|---:|---:|---:|"]
            for name, g in speeds:
                keys = ("prefill_tokens_per_s", "decode_tokens_per_s")
                cells = [f"{g[b][k]:,.0f}" if b in g else "-" for b in ("bs1", "bs8") for k in keys]
                lines.append(f"| {name} | {' | '.join(cells)} |")
        if self.data:
            lines += ["", "## Data", "", "| step | source | split | count |", "|---|---|---|---:|"]
            for use, d in self.data.items():
                count = f"{d['count']} {d.get('unit', '')}".strip() if d.get("count") is not None else "-"
                lines.append(f"| {use} | {d.get('source', '-')} | {d.get('split', '-')} | {count} |")
        if self.passes:
            lines += ["", "## Passes", "", "| pass | seconds |", "|---|---:|"]
            lines += [f"| {p.name} | {p.seconds:.2f} |" for p in self.passes]
        if self.auto:
            lines += auto_markdown(self.auto)
        if self.warnings:
            lines += ["", "## Warnings", ""] + [f"- {w}" for w in self.warnings]
        env = self.environment
        cpu = env.get("cpu", {})
        lines += [
            "",
            "## Environment",
            "",
            f"- CPU: {cpu.get('model')} {cpu.get('family', '')} ({', '.join(cpu.get('features', []))}); "
            f"int8 unit {cpu.get('int8', '?')}, bf16 unit {cpu.get('bf16', '?')}"
            + (f", capped at ONEDNN_MAX_CPU_ISA={cpu['onednn_max_isa']}" if cpu.get("onednn_max_isa") else ""),
            f"- threads: {env.get('threads')}",
            f"- versions: {', '.join(f'{k} {v}' for k, v in env.get('versions', {}).items())}",
        ]
        return "\n".join(lines) + "\n"

    def write(self, folder: str | Path) -> list[Path]:
        """Write report.json, report.md and report.html (plots embedded) into `folder` atomically."""
        from modelpress.core.atomic import atomic_write_text
        from modelpress.core.report_html import render_html

        folder = Path(folder)
        paths = [folder / "report.json", folder / "report.md", folder / "report.html"]
        atomic_write_text(paths[0], self.to_json() + "\n")
        atomic_write_text(paths[1], self.to_markdown())
        atomic_write_text(paths[2], render_html(self))
        return paths


def auto_markdown(auto: dict[str, Any]) -> list[str]:
    """Auto mode's section: the budgets, every candidate (screened or measured, and why each was dropped)."""
    budget = f", time budget {auto['time_budget_s']:.0f} s" if auto.get("time_budget_s") else ""
    lines = ["", f"## Auto mode: {auto['objective']} within a quality drop of {auto['max_drop']}{budget}", ""]
    if auto.get("elapsed_s") is not None:
        n = len({c["recipe"] for c in auto["candidates"]})
        hits = (auto.get("cache") or {}).get("hits", 0)
        head = f"{auto.get('strategy', 'search')} over {n} candidates ({auto.get('family', '?')})"
        lines += [
            f"{head} in {auto['elapsed_s']:.0f} s; measured in full: {auto.get('measured', '?')}; cache hits: {hits}"
        ]
        lines.append("")
    speed = "ms/token (decode bs1)" if auto.get("objective") == "decode" else "p50 ms"
    lines += [
        f"| candidate | artifact | stage | validation | drop (split) | test quality | {speed} | size MB | status |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]

    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    for c in auto["candidates"]:
        if "error" in c:  # reports written before the search kept refusals this way
            lines.append(f"| {c['recipe']} | - | - | | | | | | refused: {_cell(c['error'])} |")
            continue
        drop = "-" if c.get("drop") is None else f"{c['drop']:.4f} ({c.get('drop_split', 'test')})"
        why = f": {_cell(c['why'])}" if c.get("why") else ""
        val, test = num(c.get("validation_quality"), ".4f"), num(c.get("quality"), ".4f")
        ms, mb = num(c.get("p50_ms"), ".2f"), num(c.get("size_mb"), ".2f")
        status = c.get("status", "within budget" if c.get("within_budget") else "over budget")
        stage = c.get("stage", "measured")
        lines.append(
            f"| {c['recipe']} | {c['artifact']} | {stage} | {val} | {drop} | {test} | {ms} | {mb} | {status}{why} |"
        )
    lines += [
        "",
        f"Chosen: {auto['chosen']}" + (f" (its recipe: `{auto['recipe_file']}`)" if auto.get("recipe_file") else ""),
    ]
    runoff = auto.get("runoff") or {}
    if runoff.get("median_ms"):
        unit = runoff.get("unit", "ms")
        timed = ", ".join(f"{name} {ms:.2f} {unit}" for name, ms in runoff["median_ms"].items())
        lines += ["", f"Runoff (forms within 15% of each other, timed again together at batch {runoff['batch_size']}, "
                  f"median of {runoff['rounds']} rounds): {timed}"]  # fmt: skip
    return lines


def _cell(text: str) -> str:
    """`text` as one Markdown table cell: no pipes or line breaks."""
    return text.replace("|", "\\|").replace("\n", " ").strip() or "(empty)"
