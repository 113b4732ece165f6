"""report.html: self-contained, with the plots the report's figures call for."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from modelpress.core.report import Latency, ModelStats, Quality, Report
from modelpress.core.report_html import pareto_front, render_html


def _stats(name: str, size_mb: float, ms: float, quality: float) -> ModelStats:
    lat = {"1": Latency(ms, ms, ms, ms, 5), "32": Latency(20 * ms, 20 * ms, 20 * ms, 20 * ms, 5)}
    return ModelStats(name, int(size_mb * 1e6), 100, 100, lat, Quality("accuracy", quality))


def report() -> Report:
    r = Report(model="toy", recipe={"name": "mine", "description": "a <test> recipe"})
    r.baseline = _stats("toy (original)", 10, 4.0, 0.99)
    r.artifacts = [_stats("eager", 3, 6.0, 0.985), _stats("model.onnx", 2.5, 1.5, 0.988)]
    r.compressed = r.artifacts[1]
    rows = [{"layer": "fc1", "drop": 0.01}, {"layer": "fc2", "drop": 0.0}]
    r.add_pass("quantize/mixed-precision", 1.0, sensitivity=rows, bits={"fc1": 8, "fc2": 4})
    r.warn("skipped conv3")
    return r


def test_pareto_front() -> None:
    points = [(1.0, 0.9), (2.0, 0.95), (3.0, 0.94), (0.5, 0.5)]
    assert pareto_front(points) == [3, 0, 1]  # (3.0, 0.94) costs more than (2.0, 0.95) for less
    assert pareto_front([(1.0, 5.0), (2.0, 6.0)], higher_is_better=False) == [0]  # e.g. perplexity
    assert pareto_front([(1.0, 5.0), (2.0, 3.0)], higher_is_better=False) == [0, 1]


def test_page_embeds_every_plot_as_png() -> None:
    page = render_html(report())
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    # quality vs latency at batch 1 and 32, quality vs size, sensitivity, bit width
    assert len(images) == 5
    assert all(base64.b64decode(i).startswith(b"\x89PNG") for i in images)
    assert "a &lt;test&gt; recipe" in page and "skipped conv3" in page and "http" not in page


def test_auto_mode_candidates_are_plotted_and_tabled() -> None:
    r = report()
    row = {"drop_split": "validation", "test_drop": 0.0, "validation_quality": 0.98, "quality": 0.98}
    r.auto = {
        "max_drop": 0.01, "objective": "latency", "batch_size": 32, "chosen": "int8: model.onnx",
        "candidates": [
            {**row, "recipe": "float", "artifact": "model.onnx", "drop": 0.0, "p50_ms": 30.0, "size_mb": 10.0,
             "within_budget": True},
            {**row, "recipe": "int8", "artifact": "model.onnx", "drop": 0.004, "p50_ms": 12.0, "size_mb": 3.0,
             "within_budget": True},
            {**row, "recipe": "w2", "artifact": "model.onnx", "drop": 0.05, "p50_ms": 9.0, "size_mb": 1.0,
             "within_budget": False},
            {"recipe": "distill-l3-int8", "artifact": "-", "error": "not a transformer"},
        ],
    }  # fmt: skip
    page = render_html(r)
    # the five of the report, and the candidates' validation quality against latency and against size
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 7
    assert "Auto mode: every candidate&#x27;s validation quality against latency" in page
    assert "Auto mode: every candidate&#x27;s validation quality against size" in page
    assert "<h2>Auto mode: latency within a quality drop of 0.01</h2>" in page
    assert "refused: not a transformer" in page and "chosen: <b>int8: model.onnx</b>" in page


def test_write_puts_html_beside_json(tmp_path: Path) -> None:
    paths = report().write(tmp_path)
    assert [p.name for p in paths] == ["report.json", "report.md", "report.html"]
    assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")


# CI installs Chromium (.ci/run), so there a missing browser is a failure, not a skip.
@pytest.mark.skipif(
    shutil.which("chromium") is None and os.environ.get("CI") != "true",
    reason="headless Chromium (Debian's chromium) not installed",
)
def test_plots_render_in_headless_chromium(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(render_html(report()))
    script = "[...document.images].map(i => i.complete && i.naturalWidth > 100).join(',')"
    wrapper = tmp_path / "check.html"
    wrapper.write_text(
        f"<script>window.onload=()=>{{const f=document.getElementById('f');"
        f"f.onload=()=>{{document.title=f.contentWindow.eval(\"{script}\")}};f.src='report.html'}}</script>"
        "<iframe id='f'></iframe>"
    )
    out = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
         "--virtual-time-budget=5000", "--dump-dom", wrapper.as_uri()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    title = re.search(r"<title>(.*?)</title>", out.stdout)
    assert title is not None, out.stderr[-2000:]
    assert title.group(1).split(",") == ["true"] * 5
