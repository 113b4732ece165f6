"""Decode and prefill speed of a 4-bit causal LM in eager PyTorch: `quant.kernels`' bf16 paths against the reference.

    HF_HUB_OFFLINE=1 python benchmarks/llm_eager_decode.py [--threads 2] [--rounds 3] [--group 32]

SmolLM2-135M, every Linear of its 30 blocks 4-bit (round to nearest, asymmetric, groups of `--group`), the tied
table and head float. Greedy generation with the KV cache (`generation_speed`: 128-token prompt, 32 new tokens,
batch 1 and 8) of: the fp32 original, the 4-bit model on `quant.kernels`' bf16 paths (decode steps on
`aten._weight_int4pack_mm_for_cpu`, prefills on oneDNN's bf16 GEMM of the weight dequantized per call), and the
same model inside `numerics.exact()` (each call dequantizes the weights and runs the fp32 GEMM). Rounds
interleaved; medians. Also the perplexity of the 4-bit model on both paths on the test split (what bf16
activations cost), and the greedy text.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from quant_onnx import cpu_results_dir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--bits", type=int, default=4, help="8: int8 per channel, symmetric (aten's int8 GEMM)")
    args = ap.parse_args()

    import torch

    from modelpress.core.environment import environment
    from modelpress.core.numerics import exact
    from modelpress.quant import WeightOnlyConfig, kernels, quantize
    from modelpress.zoo import get_entry

    torch.set_num_threads(args.threads)
    entry = get_entry("smollm2-135m")
    original = entry.load()
    if args.bits == 8:
        cfg = WeightOnlyConfig(bits=8, granularity="channel", symmetric=True)
    else:
        cfg = WeightOnlyConfig(bits=args.bits, granularity="group", group_size=args.group, symmetric=False)
    q4 = quantize(original, cfg, data=entry.calibration_data(8, 4))
    kernels_row, reference_row = f"{args.bits}-bit, bf16 kernels", f"{args.bits}-bit, reference"
    rows: dict[str, dict[str, list[float]]] = {"fp32 original": {}, kernels_row: {}, reference_row: {}}
    for _ in range(args.rounds):
        for name, model, on in (("fp32 original", original, True), (kernels_row, q4, True),
                                (reference_row, q4, False)):  # fmt: skip
            with contextlib.nullcontext() if on else exact():  # exact(): every layer on the reference path
                speed = entry.generation_speed(model)
            for bs in ("bs1", "bs8"):
                for k in ("prefill_tokens_per_s", "decode_tokens_per_s"):
                    rows[name].setdefault(f"{bs} {k}", []).append(speed[bs][k])
            print(name, {bs: round(speed[bs]["decode_tokens_per_s"], 1) for bs in ("bs1", "bs8")}, flush=True)
    with exact():
        reference = entry.evaluate(q4)
    medians = {n: {k: round(statistics.median(v), 1) for k, v in r.items()} for n, r in rows.items()}
    quality = entry.evaluate(q4)
    doc = {"bits": args.bits, "group": args.group, "medians": medians, "rounds": rows,
           "bf16_dot_products": kernels.bf16_dot_products(),
           "perplexity_4bit": quality.value, "perplexity_4bit_reference": reference.value,
           "perplexity_fp32": entry.evaluate(original).value, "greedy_4bit": quality.details.get("greedy"),
           "greedy_4bit_reference": reference.details.get("greedy"),
           "environment": environment(args.threads)}  # fmt: skip
    out = cpu_results_dir() / ("llm_eager_decode.json" if args.bits == 4 else f"llm_eager_decode_w{args.bits}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print("| model | prefill tok/s bs1 | prefill tok/s bs8 | decode tok/s bs1 | decode tok/s bs8 |")
    print("|---|---:|---:|---:|---:|")
    for name, m in medians.items():
        cells = [m[f"{bs} {k}_tokens_per_s"] for k in ("prefill", "decode") for bs in ("bs1", "bs8")]
        print(f"| {name} | " + " | ".join(str(c) for c in cells) + " |")
    print(f"{args.bits}-bit perplexity {quality.value:.3f} (reference path {reference.value:.3f}, fp32 "
          f"{doc['perplexity_fp32']:.3f}); greedy: {quality.details.get('greedy')!r}")  # fmt: skip


if __name__ == "__main__":
    main()
