"""Every causal-LM recipe through `modelpress compress`, as a user runs it, on a real LM: the parity matrix.

    HF_HUB_OFFLINE=1 python benchmarks/llm_recipes.py [--model smollm2-135m] [--recipes w8 w4-gptq ...]
        [--threads 2] [--work DIR] [--out FILE]

Each recipe runs in its own process: `modelpress compress MODEL --recipe R --out DIR --threads N`. A cell
ends either with exit 0, its artifacts written and each export's parity gate passed (report.json's `parity`;
a refused export is a warning naming why and is not written), or with exit 2 and one `error:` line. Anything
else (another exit code, a traceback, a half-written folder after a refusal) is a failure of the cell. Per
cell the script records the exit code, the wall time, the error line, every form's perplexity on the held-out
split and its speed-gate verdict with the ratios to the original, the parity figures, and the GGUF / GenAI
lines of the report. Results are written after every cell (results/<cpu>/llm_recipes.json), so a run cut
short keeps what it measured.

The distillation recipes (`distill-lm-depth`, `distill-lm-width`: 300 training steps, about 40 minutes each
on 2 cores) are left out of the default list; `benchmarks/llm_depth.py` measures their settings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from quant_onnx import cpu_results_dir  # noqa: E402

RECIPES = (
    "w8", "w4", "w4-gptq", "w4-awq", "int8-dynamic", "int8-smooth", "int8-static",
    "prune-sparsegpt-50", "prune-wanda-2of4", "prune-2of4", "prune-sparse-80", "prune-channels-50", "prune-transformer",
)  # fmt: skip


def run_cell(model: str, recipe: str, folder: Path, threads: int) -> dict[str, Any]:
    """One `compress` run in a child process, and what its exit code and report say."""
    cli = Path(sys.executable).parent / "modelpress"
    cmd = [str(cli), "compress", model, "--recipe", recipe, "--out", str(folder), "--threads", str(threads),
           "--overwrite"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    cell: dict[str, Any] = {"exit": proc.returncode, "wall_s": round(time.perf_counter() - start, 1)}
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith(("error:", "internal error:"))]
    cell["traceback"] = "Traceback (most recent call last)" in proc.stderr
    if proc.returncode != 0:
        cell["error"] = errors[-1] if errors else proc.stderr.strip().splitlines()[-1:]
        cell["left_behind"] = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
        cell["verdict"] = "refused" if proc.returncode == 2 and errors and not cell["traceback"] else "FAILED"
        return cell
    return {**cell, **from_report(folder)}


def from_report(folder: Path) -> dict[str, Any]:
    """What a finished cell's report.json and folder say."""
    report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    cell: dict[str, Any] = {"parity": report.get("parity")}
    cell["forms"] = {
        a["name"]: {
            "perplexity": (a.get("quality") or {}).get("value"),
            "size_mb": None if a.get("size_bytes") is None else round(a["size_bytes"] / 1e6, 1),
            "p50_ms": {bs: round(v["p50"], 1) for bs, v in (a.get("latency_ms") or {}).items()},
            "speed_gate": (a.get("speed_gate") or {}).get("status"),
            "speedup": {bs: round(v, 2) for bs, v in ((a.get("speed_gate") or {}).get("speedup") or {}).items()},
        }
        for a in report["artifacts"]
    }
    base = report["baseline"]
    cell["original"] = {"perplexity": (base.get("quality") or {}).get("value"),
                        "p50_ms": {bs: round(v["p50"], 1) for bs, v in base["latency_ms"].items()}}  # fmt: skip
    cell["exports"] = [p["name"] for p in report["passes"] if p["name"].startswith("export/")]
    cell["written"] = sorted(p.name for p in folder.iterdir())
    cell["not_written"] = [w for w in report["warnings"] if "not written" in w]
    cell["runtime_files"] = [w for w in report["warnings"] if w.startswith(("model.gguf", "genai/"))]
    cell["pass_s"] = {p["name"]: round(p["seconds"], 1) for p in report["passes"]}
    generation = {a["name"]: (a.get("throughput") or {}).get("generation") for a in [base, *report["artifacts"]]}
    for p in report["passes"]:
        if "generation" in p.get("stats", {}):
            generation["genai/ (ONNX Runtime)"] = p["stats"]["generation"]
    cell["decode_tokens_per_s_bs1"] = {k: round(g["bs1"]["decode_tokens_per_s"], 1) for k, g in generation.items() if g}
    cell["verdict"] = "ok" if "model.onnx" in cell["written"] else "FAILED"
    return cell


TABLE_HEAD = (
    "| recipe | exit | wall s | perplexity eager / .onnx / .pt2 | parity cosine .onnx / .pt2 | .onnx vs original "
    "bs1 / bs32 | .pt2 vs original bs1 / bs32 | decode tok/s bs1: original / eager / genai/ | also written | "
    "not written |\n|---|---:|---:|---|---|---|---|---|---|---|"
)


def line(recipe: str, cell: dict[str, Any]) -> str:
    """One Markdown row of the matrix (BENCHMARKS.md's table)."""
    if cell["verdict"] != "ok":
        error = str(cell.get("error"))[:160]
        return f"| {recipe} | {cell['exit']} | {cell['wall_s']:.0f} | {cell['verdict']}: {error} | | | | | | |"
    forms = {("eager" if not n.startswith("model") else n.split(" ")[0]): f for n, f in cell["forms"].items()}

    def of(kind: str, key: str, fmt: str) -> str:
        value = (forms.get(kind) or {}).get(key)
        return "-" if value is None else format(value, fmt)

    def speed(kind: str) -> str:
        f = forms.get(kind)
        if not f:
            return "not written"
        flag = " SLOWER" if f["speed_gate"] == "slower" else ""
        return " / ".join(f"{v:.2f}x" for v in f["speedup"].values()) + flag

    parity = cell.get("parity") or {}

    def gate(kind: str) -> str:
        p = parity.get(kind)
        if not isinstance(p, dict):
            return "-"
        floor = f" (own spread {p['noise_floor']:.4f})" if p.get("noise_floor") is not None else ""
        return f"{p['mean_cosine']:.5f}{floor}"

    ppl = " / ".join(of(k, "perplexity", ".3f") for k in ("eager", "model.onnx", "model.pt2"))
    decode = cell.get("decode_tokens_per_s_bs1") or {}
    eager_name = next((n for n in decode if "(original)" not in n and not n.startswith("genai")), None)
    original = next((v for n, v in decode.items() if "(original)" in n), None)
    rates = [original, decode.get(eager_name) if eager_name else None, decode.get("genai/ (ONNX Runtime)")]
    rate = " / ".join("-" if r is None else f"{r:.0f}" for r in rates)
    extra = ", ".join(n for n in cell["written"] if n in ("model.gguf", "genai", "model.sparse.safetensors")) or "-"
    refused = "; ".join(w[:100] for w in cell["not_written"]) or "-"
    return (f"| {recipe} | 0 | {cell['wall_s']:.0f} | {ppl} | {gate('onnx')} / {gate('pt2')} | {speed('model.onnx')} "
            f"| {speed('model.pt2')} | {rate} | {extra} | {refused} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipes", nargs="*", default=list(RECIPES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/llm_recipes"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--from-reports", action="store_true", help="re-read the finished cells' folders, run nothing")
    args = ap.parse_args()
    out = args.out or cpu_results_dir() / f"llm_recipes_{args.model}.json"
    doc: dict[str, Any] = {"model": args.model, "threads": args.threads, "cells": {}}
    if out.exists():  # a run cut short goes on where it stopped
        doc = json.loads(out.read_text(encoding="utf-8"))
    for recipe in args.recipes if not args.from_reports else ():
        print(f"{args.model} / {recipe} ...", flush=True)
        load = os.getloadavg()[0]
        cell = run_cell(args.model, recipe, args.work / f"{args.model}-{recipe}", args.threads)
        cell["load_before"] = round(load, 2)
        doc["cells"][recipe] = cell
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        print(line(recipe, cell), flush=True)
    if args.from_reports:
        for recipe, cell in doc["cells"].items():
            folder = args.work / f"{args.model}-{recipe}"
            if cell.get("exit") == 0 and (folder / "report.json").is_file():
                cell.update(from_report(folder))
        out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(TABLE_HEAD)
    for recipe, cell in doc["cells"].items():
        print(line(recipe, cell))


if __name__ == "__main__":
    main()
