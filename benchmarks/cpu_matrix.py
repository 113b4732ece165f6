"""Built-in recipes through `compress` on this CPU and on the CPU kinds it can emulate by capping the ISA.

    HF_HUB_OFFLINE=1 python benchmarks/cpu_matrix.py [--caps full avx512-bf16 avx512-vnni avx2]
        [--pairs minilm:int8-smooth digits-cnn:w8 ...] [--threads 2] [--repeats 10] [--out FILE]

Each cap runs in its own process (the caps are read once per process, before the first kernel):

| cap | ONEDNN_MAX_CPU_ISA | ATEN_CPU_CAPABILITY | emulates |
|---|---|---|---|
| `full` | - | - | this CPU as it is |
| `avx512-bf16` | AVX512_CORE_BF16 | - | AVX-512 with VNNI and BF16, no AMX (AMD Zen 4 / Zen 5) |
| `avx512-vnni` | AVX512_CORE_VNNI | - | AVX-512 with VNNI, no BF16, no AMX (Intel Cascade Lake) |
| `avx2` | AVX2 | avx2 | AVX2 only (Intel Haswell..Comet Lake, AMD Zen 1-3) |

and per (model, recipe) pair applies the recipe, exports, runs the speed and parity gates and measures
every form exactly as `modelpress compress` does (with `keep_slower`, so a flagged artifact is still
described), recording per artifact the p50 at batch 1 and 32, its ratio to the original measured in
the same process, the gate's verdict, the lowering chosen and the task metric.

Which caps take effect is checked, not assumed, in every worker: `cpu_info()` (what modelpress
picks its lowering from), `torch.backends.cpu.get_cpu_capability()` (ATen and Inductor's vector
ISA) and the oneDNN kernel that really runs an int8 GEMM (`ONEDNN_VERBOSE`). ONNX Runtime has no ISA
cap: its MLAS kernels dispatch on CPUID, so the `.onnx` rows of a capped run are this CPU's.

Results: results/<cpu>/cpu_matrix.json (one file per CPU model; a table per CPU in BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CAPS: dict[str, dict[str, str]] = {
    "full": {},
    "avx512-bf16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"},
    "avx512-vnni": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
}
# every built-in recipe on the zoo model it is written for
PAIRS = (
    "minilm:int8-smooth", "minilm:int8-dynamic", "minilm:int8-static", "minilm:w8", "minilm:w4",
    "minilm:distill-l3-int8", "minilm:distill-l4-int8",
    "digits-cnn:int8-dynamic", "digits-cnn:int8-static", "digits-cnn:int8-smooth", "digits-cnn:w8", "digits-cnn:w4",
    "digits-cnn:prune-channels-50", "digits-cnn:prune-sparse-80", "digits-cnn:prune-2of4",
    "digits-cnn:distill-cnn-quarter", "digits-cnn:vision-realtime",
    "breast-cancer:medical-mixed", "silero-vad:speech-ondevice", "tiny-lm:w4-gptq", "tiny-lm:w4-awq",
)  # fmt: skip
_PROBE_GEMM = """
import torch
from modelpress.primitives.affine import QuantScheme
from modelpress.quant import kernels
from modelpress.quant.modules import ActSpec, QLinear
layer = QLinear.from_float(torch.nn.Linear(256, 256), QuantScheme(8, True, "channel"), ActSpec("dynamic"))
with torch.inference_mode():  # oneDNN's int8 GEMM itself, whether or not modelpress uses it on this CPU
    kernels._int8_linear(layer, torch.randn(64, 256))
"""


def onednn_int8_kernel(env: dict[str, str]) -> str:
    """The oneDNN implementation that runs an int8 GEMM under `env` (e.g. brg_matmul:avx512_core_vnni)."""
    out = subprocess.run(
        [sys.executable, "-c", _PROBE_GEMM], env={**os.environ, **env, "ONEDNN_VERBOSE": "1"},
        capture_output=True, text=True, timeout=300,
    ).stdout  # fmt: skip
    kernels = {ln.split(",")[6] for ln in out.splitlines() if ln.startswith("onednn_verbose,v1,primitive,exec,")}
    return ", ".join(sorted(kernels)) or "none seen"


def worker(cap: str, pairs: list[str], threads: int, repeats: int, workdir: Path) -> dict[str, Any]:
    import torch

    from modelpress.core.environment import cpu_info, environment
    from modelpress.core.options import RunOptions
    from modelpress.pipeline import compress

    torch.set_num_threads(threads)
    out: dict[str, Any] = {
        "cap": cap,
        "env": CAPS[cap],
        "cpu_info": cpu_info(),
        "aten_capability": str(torch.backends.cpu.get_cpu_capability()),
        "environment": environment(threads),
        "pairs": {},
    }
    for pair in pairs:
        model, recipe = pair.split(":")
        start = time.perf_counter()
        try:
            opts = RunOptions(threads=threads, batch_sizes=(1, 32), repeats=repeats, progress=False, keep_slower=True)
            out_dir = workdir / cap / pair.replace(":", "-")
            _, report = compress(model, recipe, out_dir=out_dir, options=opts, overwrite=True)
        except Exception as e:  # noqa: BLE001 - recorded in the table
            out["pairs"][pair] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            traceback.print_exc()
            continue
        base = report.baseline
        row: dict[str, Any] = {
            "seconds": round(time.perf_counter() - start, 1),
            "original": _figures(base),
            "artifacts": {a.name: {**_figures(a), "speed_gate": a.speed_gate} for a in report.artifacts},
            "lowering": next((p.stats for p in report.passes if p.name == "export/pt2"), None),
            "warnings": [w for w in report.warnings if "slower" in w or "stopped" in w],
        }
        out["pairs"][pair] = row
        print(f"[{cap}] {pair}: " + _line(row), flush=True)
    return out


def _figures(stats: Any) -> dict[str, Any]:
    return {
        "p50_ms": {bs: lat.p50 for bs, lat in stats.latency_ms.items()},
        "size_mb": None if stats.size_bytes is None else stats.size_bytes / 1e6,
        "quality": None if stats.quality is None else {"name": stats.quality.name, "value": stats.quality.value},
    }


def _line(row: dict[str, Any]) -> str:
    parts = []
    for name, a in row["artifacts"].items():
        gate = a.get("speed_gate") or {}
        ratios = "/".join(f"{v:.2f}x" for v in gate.get("speedup", {}).values())
        parts.append(f"{name.split(' ')[0]} {gate.get('status', '-')} {ratios}")
    return "; ".join(parts)


def table(result: dict[str, Any]) -> list[str]:
    """A Markdown table per cap: per pair, each artifact's ratio to the original at batch 1 / 32."""
    lines = []
    for cap, run in result["caps"].items():
        info = run.get("cpu_info", {})
        lines += [
            "",
            f"**{cap}** ({', '.join(f'{k}={v}' for k, v in CAPS[cap].items()) or 'no cap'}): modelpress sees int8 "
            f"{info.get('int8')}, bf16 {info.get('bf16')}; ATen {run.get('aten_capability')}; oneDNN int8 GEMM "
            f"kernel `{result['kernels'].get(cap)}`",
            "",
            "| model / recipe | original ms bs1 / bs32 | eager | .onnx | .pt2 | .pt2 lowering "
            "| quality orig -> .onnx / .pt2 |",
            "|---|---:|---|---|---|---|---|",
        ]
        for pair, row in run.get("pairs", {}).items():
            if "error" in row:
                lines.append(f"| {pair} | refused: {row['error'][:120]} | | | | | |")
                continue
            orig = row["original"]
            cells = {"eager": "-", "onnx": "-", "pt2": "-"}
            quality = {}
            for name, a in row["artifacts"].items():
                kind = "onnx" if name.startswith("model.onnx") else "pt2" if name.startswith("model.pt2") else "eager"
                gate = a.get("speed_gate") or {}
                ratios = " / ".join(f"{v:.2f}x" for v in gate.get("speedup", {}).values())
                flag = {"slower": " SLOWER", "stopped": " STOPPED"}.get(gate.get("status", ""), "")
                cells[kind] = f"{ratios}{flag}" if ratios else flag.strip() or "-"
                if a.get("quality"):
                    quality[kind] = a["quality"]["value"]
            p50 = orig["p50_ms"]
            low = row.get("lowering") or {}
            lowering = f"{low.get('float_ops', '-')} float, {low.get('int8_sources', '-')} int8" if low else "-"
            q0 = orig["quality"]["value"] if orig.get("quality") else None
            qual = "-" if q0 is None else f"{q0:.4f} -> {quality.get('onnx', float('nan')):.4f} / " \
                f"{quality.get('pt2', float('nan')):.4f}"  # fmt: skip
            lines.append(
                f"| {pair.replace(':', ' / ')} | {p50.get('1', 0):.2f} / {p50.get('32', 0):.1f} | {cells['eager']} | "
                f"{cells['onnx']} | {cells['pt2']} | {lowering} | {qual} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caps", nargs="*", default=list(CAPS), choices=list(CAPS))
    parser.add_argument("--pairs", nargs="*", default=list(PAIRS), help="MODEL:RECIPE pairs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="default: results/<cpu>/cpu_matrix.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one cap, in this process, with its environment already set
        result = worker(args.worker, args.pairs, args.threads, args.repeats, args.workdir)
        print("RESULT " + json.dumps(result), flush=True)
        return

    from modelpress.core.environment import cpu_info

    info = cpu_info()
    sys.path.insert(0, str(Path(__file__).parent))
    from quant_onnx import cpu_results_dir

    out = args.out or cpu_results_dir(info) / "cpu_matrix.json"
    result: dict[str, Any] = {"cpu": info, "caps": {}, "kernels": {}}
    with tempfile.TemporaryDirectory(prefix="cpu_matrix.") as work:
        for cap in args.caps:
            result["kernels"][cap] = onednn_int8_kernel(CAPS[cap])
            print(f"[{cap}] oneDNN int8 GEMM kernel: {result['kernels'][cap]}", flush=True)
            cmd = [sys.executable, __file__, "--worker", cap, "--threads", str(args.threads), "--repeats",
                   str(args.repeats), "--workdir", work, "--pairs", *args.pairs]  # fmt: skip
            proc = subprocess.Popen(cmd, env={**os.environ, **CAPS[cap]}, stdout=subprocess.PIPE, text=True, bufsize=1)
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("RESULT "):
                    result["caps"][cap] = json.loads(line[len("RESULT ") :])
                else:
                    print(line, end="", flush=True)
            proc.wait()
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2) + "\n")  # after every cap: a crash keeps what ran
    print("\n".join(table(result)))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
