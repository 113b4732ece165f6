"""int8 MiniLM without distillation on this CPU: the built-in recipes' artifacts against every anchor, one run.

    HF_HUB_OFFLINE=1 python benchmarks/int8_anywhere.py --threads 2 [--rounds 10] [--only ...]

The target (issue 14): STS-B drop <= 0.10 and mean cosine >= 0.998, best artifact >= 4.0x at batch 1 and
>= 3.0x at batch 32 against torch fp32 eager, ahead of every anchor in the same run, on any CPU kind.
Rows, all in this process, interleaved round by round (rounds disturbed by other processes repeated,
see quant_onnx.LoadGate):

- `torch-fp32`: eager fp32, the baseline of every ratio;
- anchors: `torch-bf16` (eager, model cast to bf16), `compile-bf16` (torch.compile with freezing),
  `compile-bf16-max` (the same, mode max-autotune), `torch-qdyn` (torch.ao `quantize_dynamic` int8),
  `ort-fp32` (our fp32 export), `ort-int8-dyn` (ORT `quantize_dynamic`, per tensor) and
  `ort-int8-pc` (ORT's BERT optimizer + `quantize_dynamic` per channel: its best int8);
- ours: each built-in int8 recipe applied by its passes as `compress` does, exported as `compress`
  exports (`.onnx`, and `.pt2` with the lowering `choose_lowering` picks for this CPU): rows
  `RECIPE.onnx`, `RECIPE.pt2`; `RECIPE.pt2-at` adds Inductor's autotuned C++ GEMM templates.

Per row: p50 at batch 1 and 32 (seq 128, real sentences) and its ratio to torch fp32, size, STS-B test
Spearman x100 and mean cosine to fp32 sentence embeddings on 256 held-out sentences. The CPU (model,
flags, int8 / bf16 units) and versions go with the results into results/<cpu>/int8_anywhere.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from quant_onnx import (  # noqa: E402
    LoadGate,
    OrtFn,
    build_anchor,
    build_recipe,
    cpu_results_dir,
    interleaved_latency,
    record_batch,
)

BATCHES = (1, 32)
ANCHORS = ("torch-bf16", "compile-bf16", "compile-bf16-max", "torch-qdyn", "ort-fp32", "ort-int8-dyn", "ort-int8-pc")
RECIPES = ("int8-smooth", "int8-static", "int8-dynamic")


def _float_out(fn: Callable[..., Any]) -> Callable[..., torch.Tensor]:
    def run(*inputs: torch.Tensor) -> torch.Tensor:
        out = fn(*inputs)
        return (out[0] if isinstance(out, (tuple, list)) else out).float()

    return run


def build_anchor_row(row: str, fp32: nn.Module, x1: tuple[torch.Tensor, ...], work: Path) -> tuple[Any, Path | None]:
    """(callable, file or None) of an anchor row."""
    from modelpress.export.onnx import export_float, export_onnx, optimize_graph

    if row == "torch-bf16":
        return _float_out(copy.deepcopy(fp32).to(torch.bfloat16)), None
    if row in ("compile-bf16", "compile-bf16-max"):
        mode = "max-autotune" if row.endswith("-max") else None
        with torch._inductor.config.patch(freezing=True):
            compiled = torch.compile(copy.deepcopy(fp32).to(torch.bfloat16), mode=mode)

        def run(*inputs: torch.Tensor) -> torch.Tensor:
            with torch._inductor.config.patch(freezing=True):
                return _float_out(compiled)(*inputs)

        return run, None
    if row == "torch-qdyn":
        from torch.ao.quantization import quantize_dynamic

        return _float_out(quantize_dynamic(copy.deepcopy(fp32), {nn.Linear}, dtype=torch.qint8)), None
    if row == "ort-fp32":
        path = export_onnx(fp32, x1, work / "ort-fp32.onnx")
        return path, path
    if row == "ort-int8-dyn":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        plain = work / "ort-fp32-plain.onnx"
        export_onnx(fp32, x1, plain, optimize=False)
        path = work / "ort-int8-dyn.onnx"
        quantize_dynamic(plain, path, weight_type=QuantType.QInt8)
        return path, path
    if row == "ort-int8-pc":
        bert = work / "ort-fp32-bert.onnx"
        export_float(fp32, x1, bert, fuse_attention=False)
        optimize_graph(bert, fp32, x1)
        return build_anchor(bert, work / "ort-int8-pc.onnx"), work / "ort-int8-pc.onnx"
    raise ValueError(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--only", nargs="*", default=None, help="rows to build (torch-fp32 always runs)")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--autotune", action="store_true", help="also RECIPE.pt2-at rows")
    parser.add_argument("--max-foreign", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=None, help="default: results/<cpu>/int8_anywhere.json")
    args = parser.parse_args()

    from modelpress.core.environment import cpu_info, environment
    from modelpress.export.artifact import package_checked
    from modelpress.export.inductor import choose_lowering, compile_package
    from modelpress.export.onnx import export_onnx
    from modelpress.export.runtime import AotiModel
    from modelpress.zoo import get_entry
    from modelpress.zoo.text import embed, sample_sentences

    torch.set_num_threads(args.threads)
    entry = get_entry("minilm")
    fp32 = entry.load().eval()
    x1 = entry.example_inputs(2)
    batches = entry.calibration_data(128, 32)
    work = Path(tempfile.mkdtemp(prefix="int8_anywhere."))
    lowering = choose_lowering()
    print(f"CPU {cpu_info()['model']} {cpu_info()['family']}: int8 {cpu_info()['int8']}, bf16 {cpu_info()['bf16']}; "
          f"lowering {lowering}", flush=True)  # fmt: skip

    fns: dict[str, Any] = {"torch-fp32": fp32}
    results: dict[str, dict[str, Any]] = {"torch-fp32": {}}
    eager: dict[str, nn.Module] = {}
    for row in ANCHORS:
        if args.only is not None and row not in args.only:
            continue
        start = time.perf_counter()
        fn, path = build_anchor_row(row, fp32, x1, work)
        fns[row] = OrtFn(path, args.threads) if isinstance(fn, Path) else fn
        results[row] = {"build_s": time.perf_counter() - start, "size_mb": path.stat().st_size / 1e6 if path else None}
        print(f"built {row}", flush=True)
    for recipe in args.recipes:
        kinds = ["onnx", "pt2"] + (["pt2-at"] if args.autotune else [])
        wanted = [k for k in kinds if args.only is None or f"{recipe}.{k}" in args.only]
        if not wanted:
            continue
        model, quantize_s = build_recipe(entry, recipe, batches)
        for kind in wanted:
            row, start = f"{recipe}.{kind}", time.perf_counter()
            if kind == "onnx":
                path = export_onnx(model, x1, work / f"{recipe}.onnx")
                fns[row] = OrtFn(path, args.threads)
            elif kind == "pt2":
                path = work / f"{recipe}.pt2"
                package_checked(model, x1, path, bf16=lowering["bf16"], signed_int8=lowering["signed_int8"])
                fns[row] = AotiModel(path)
            else:
                path = compile_package(model, x1, work / f"{recipe}-at.pt2", bf16=lowering["bf16"], autotune=True,
                                       signed_int8=lowering["signed_int8"])  # fmt: skip
                fns[row] = AotiModel(path)
            eager[row] = model
            results[row] = {"build_s": time.perf_counter() - start, "quantize_s": quantize_s,
                            "size_mb": path.stat().st_size / 1e6}  # fmt: skip
            print(f"built {row}", flush=True)

    with torch.inference_mode():
        for fn in fns.values():  # compile at each shape before timing
            for bs in BATCHES:
                fn(*entry.example_inputs(bs))
    rounds: dict[str, Any] = {}
    for bs in BATCHES:
        inputs = entry.example_inputs(bs)
        gate = LoadGate(max_foreign=args.max_foreign)
        lat = interleaved_latency(
            {row: (lambda fn=fn, inputs=inputs: fn(*inputs)) for row, fn in fns.items()},
            args.rounds if bs == 1 else max(3, args.rounds // 2), 5 if bs == 1 else 1, gate,
        )  # fmt: skip
        record_batch(results, rounds, bs, lat, gate)

    sentences = sample_sentences(256)

    def embeddings(fn: Any) -> torch.Tensor:
        with torch.inference_mode():
            return embed(fn, fp32.tokenizer, sentences, 32, fp32.max_seq_length, fp32.pooling, fp32.normalize)

    reference = embeddings(fp32)
    for row, fn in fns.items():
        with torch.inference_mode():
            q = entry.evaluate(fn)
        results[row]["quality"] = {"name": q.name, "value": q.value}
        results[row]["mean_cosine_to_fp32"] = float(F.cosine_similarity(embeddings(fn), reference).mean())
        print(f"quality {row}: {q.name} {q.value:.3f}, cosine {results[row]['mean_cosine_to_fp32']:.5f}", flush=True)

    env = environment(args.threads)
    info = env["cpu"]
    out = args.out or cpu_results_dir(info) / "int8_anywhere.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"results": results, "rounds": rounds, "lowering": lowering, "environment": env},
                              indent=2) + "\n")  # fmt: skip
    print()
    print("\n".join(table(results)))
    print(f"\nCPU: {info['model']} ({info['family']}; {', '.join(info['features'])}), threads {env['threads']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))
    print(f"written to {out}")


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| row | size MB | bs1 p50 ms | bs1 x | bs32 p50 ms | bs32 x | STS-B | cosine to fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row, r in results.items():
        b1, b32, q = r.get("bs1", {}), r.get("bs32", {}), r.get("quality", {})
        size = "-" if r.get("size_mb") is None else f"{r['size_mb']:.2f}"
        cos = r.get("mean_cosine_to_fp32")
        lines.append(
            f"| {row} | {size} | {b1.get('p50', float('nan')):.2f} | {b1.get('speedup_p50', float('nan')):.2f}x | "
            f"{b32.get('p50', float('nan')):.1f} | {b32.get('speedup_p50', float('nan')):.2f}x | "
            f"{q.get('value', float('nan')):.2f} | {'-' if cos is None else f'{cos:.5f}'} |"
        )
    return lines


if __name__ == "__main__":
    main()
