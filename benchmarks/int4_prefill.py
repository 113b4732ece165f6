"""The eager kernels of a group-wise 4-bit layer against the fp32 GEMM, on SmolLM2's layer shapes, by row count.

    python benchmarks/int4_prefill.py [--threads 2] [--group 32]

For each row count (1 and 8: decode steps; 16 to 64: around `quant.kernels.BF16_GEMM_MIN_ROWS`; 128 and up:
prefills of one to 32 prompts of 128 tokens): the four projections' summed time for aten's int4 GEMM
(`_int4_linear`, bf16 activations), the bf16 GEMM on the weight dequantized at each call (`_bf16_gemm_linear`),
the reference path (dequantize in fp32, fp32 GEMM) and the dense fp32 GEMM of the original weight; each the
median of 10 calls after 3 warm-up calls, with the ratio to the dense GEMM, and the bf16 paths' relative error
against the reference. A QLinear quantized from a random Linear, round to nearest, asymmetric. The figures depend
on the CPU: `lscpu` is printed beside them.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.core import environment
from modelpress.core.numerics import exact
from modelpress.primitives.affine import QuantScheme
from modelpress.quant import kernels
from modelpress.quant.modules import ActSpec, QLinear

SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))  # (out, in): q/o, k/v, gate/up, down
ROWS = (1, 8, 16, 32, 48, 64, 128, 512, 4096)


def median_ms(fn: Callable[[], torch.Tensor], calls: int = 10) -> float:
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


def runners(q: QLinear, w: torch.Tensor, x: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    return {
        "int4 GEMM": lambda: kernels._int4_linear(q, x),
        "bf16 GEMM": lambda: kernels._bf16_gemm_linear(q, x),
        "reference": lambda: F.linear(x, q.dequantized_weight()),
        "dense fp32": lambda: F.linear(x, w),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--group", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    print(*(ln for ln in cpu if ln.startswith(("Model name", "Flags"))), sep="\n")
    info = environment.cpu_info()
    print(
        f"bf16 dot products: {info['bf16']}; ATen capability {info['aten']}; ONEDNN_MAX_CPU_ISA "
        f"{info['onednn_max_isa'] or 'not set'}; the bf16 GEMM on: {kernels.bf16_dot_products()}"
    )
    layers = []
    for out, width in SHAPES:
        torch.manual_seed(0)
        dense = nn.Linear(width, out, bias=False)
        q = QLinear.from_float(dense, QuantScheme(4, False, "group", args.group), ActSpec()).eval()
        layers.append((q, q.dequantized_weight()))
    paths = ("int4 GEMM", "bf16 GEMM", "reference", "dense fp32")
    print(f"{'rows':>5} | " + " | ".join(f"{p:>20}" for p in paths) + " | err int4 / bf16")
    with torch.no_grad():
        for rows in ROWS:
            total = dict.fromkeys(paths, 0.0)
            errs = [0.0, 0.0]
            for q, w in layers:
                x = torch.randn(rows, q.in_features)
                with exact():
                    ref = q(x)
                runs = runners(q, w, x)
                for name, fn in runs.items():
                    total[name] += median_ms(fn)
                errs = [max(e, rel_err(runs[p](), ref)) for e, p in zip(errs, paths[:2], strict=True)]
            base = total["dense fp32"]
            cells = " | ".join(f"{total[p]:8.3f} ms {base / total[p]:5.2f}x" for p in paths)
            print(f"{rows:>5} | {cells} | {errs[0]:.1e} / {errs[1]:.1e}", flush=True)


if __name__ == "__main__":
    main()
