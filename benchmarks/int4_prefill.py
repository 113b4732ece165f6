"""aten's int4 GEMM against the reference path (dequantize, then the fp32 GEMM) on SmolLM2's layer shapes.

    python benchmarks/int4_prefill.py [--threads 2]

For rows 1 and 8 (decode steps) and 128 and 512 (a prefill): the int4 GEMM with fp32 activations and scales, the
same with bf16 ones (what `quant.kernels` runs on decode steps), the reference path of a group-wise layer, and the
dense fp32 GEMM of the dequantized weight; each the median of 20 calls after 3 warm-up calls, and the int4 GEMMs'
relative error against the dense product. Random codes in groups of 32. The figures depend on the CPU: print
`lscpu` beside them.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

GROUP = 32
SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))  # (out, in): q/o, k/v, gate/up, down


def median_ms(fn: Callable[[], torch.Tensor], calls: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[calls // 2] * 1e3


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


def layer(out: int, width: int, rows: int) -> dict[str, float]:
    codes = torch.randint(0, 16, (out, width), dtype=torch.int32)
    scale = torch.rand(out, width // GROUP) * 0.01 + 0.001
    zero = torch.randn(out, width // GROUP) * 0.01
    scales_zeros = torch.stack([scale, zero], -1).transpose(0, 1).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    stored = codes.to(torch.int8)

    def dequantized() -> torch.Tensor:
        grouped = (stored.float() - 8).reshape(out, width // GROUP, GROUP)
        return (grouped * scale[..., None] + zero[..., None]).reshape(out, width)

    weight = dequantized()
    x = torch.randn(rows, width)
    xb, szb = x.bfloat16(), scales_zeros.bfloat16()
    ref = F.linear(x, weight)
    int4_fp32 = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales_zeros)  # noqa: E731
    int4_bf16 = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, GROUP, szb).float()  # noqa: E731
    return {
        "int4_fp32_ms": median_ms(int4_fp32), "int4_fp32_err": rel_err(int4_fp32(), ref),
        "int4_bf16_ms": median_ms(int4_bf16), "int4_bf16_err": rel_err(int4_bf16(), ref),
        "reference_ms": median_ms(lambda: F.linear(x, dequantized())),
        "dense_ms": median_ms(lambda: F.linear(x, weight)),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("out x in, rows: int4 fp32 ms (err) | int4 bf16 ms (err) | reference ms | dense fp32 ms")
    for out, width in SHAPES:
        for rows in (1, 8, 128, 512):
            r = layer(out, width, rows)
            print(f"{out}x{width}, {rows}: {r['int4_fp32_ms']:.3f} ({r['int4_fp32_err']:.1e}) | "
                  f"{r['int4_bf16_ms']:.3f} ({r['int4_bf16_err']:.1e}) | {r['reference_ms']:.3f} | "
                  f"{r['dense_ms']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
