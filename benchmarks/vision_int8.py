"""A real pretrained ImageNet CNN (EfficientNet-Lite0) to int8: ours against ONNX Runtime's own quantizer.

    python benchmarks/vision_int8.py --threads 2 --rounds 12

Rows, all measured in this process, interleaved round by round at batch 1 (and 8), 2 threads:
- `torch-fp32`: the model in PyTorch eager (the baseline of every ratio);
- `ort-fp32`: its float ONNX export (`export_onnx`) in ONNX Runtime;
- `ort-int8` (anchor): ONNX Runtime's `quantize_static` on that graph: QDQ, per-channel int8 weights,
  uint8 activations, its MinMax calibrator over the same calibration batches as ours;
- `ours-int8`: `modelpress.compress("efficientnet-lite0", "int8-static")`'s `model.onnx` (per-channel int8
  weights, static per-tensor activations calibrated by the MSE observer, Conv-BN folded, bias-corrected);
- `ours-w8-accurate`: `compress` with `benchmarks/recipes/cnn-w8-accurate.yaml`: int8 weights per channel,
  asymmetric, GPTQ-rounded, bias-corrected, the depthwise convolutions kept float, float activations (what the
  int8-static graph computes too, since its convolutions run in float on dequantized weights).

Quality: top-1 agreement with the fp32 model on 256 crops of the test photographs (scikit-image samples;
whole photographs disjoint from the calibration ones), and mean cosine of the logits. Calibration: 64
crops of the train photographs for both quantizers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from quant_onnx import LoadGate, cpu_results_dir, interleaved_latency  # noqa: E402

from modelpress.core.environment import environment  # noqa: E402
from modelpress.core.options import RunOptions  # noqa: E402
from modelpress.core.runtime import OnnxModel  # noqa: E402
from modelpress.export.onnx import export_onnx  # noqa: E402
from modelpress.pipeline import compress  # noqa: E402
from modelpress.recipes.recipe import load_recipe  # noqa: E402
from modelpress.zoo import get_entry  # noqa: E402


def ort_int8(fp32: Path, out: Path, calibration: list[tuple[torch.Tensor, ...]]) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    name = OnnxModel(fp32).input_names[0]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{name: b[0].numpy()} for b in calibration])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    quantize_static(
        str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
    return out


def quality(fn: Any, x: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    with torch.inference_mode():
        out = torch.cat([fn(x[i : i + 32]).float() for i in range(0, len(x), 32)])
    return {
        "top1_agreement": float((out.argmax(-1) == ref.argmax(-1)).float().mean()),
        "mean_cosine": float(F.cosine_similarity(out, ref, dim=-1).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-foreign", type=float, default=0.1)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    entry = get_entry("efficientnet-lite0")
    model = entry.load()
    calibration = entry.calibration_data(64, 8)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="vision-int8."))
    work.mkdir(parents=True, exist_ok=True)

    fp32_onnx = work / "fp32.onnx"
    export_onnx(model, entry.example_inputs(2), fp32_onnx, batch_axes=(0,))
    anchor = ort_int8(fp32_onnx, work / "ort-int8.onnx", calibration)
    options = RunOptions(threads=args.threads, batch_sizes=(1,), repeats=5, progress=False, keep_slower=True)
    _, report = compress("efficientnet-lite0", "int8-static", out_dir=work / "ours", options=options)
    accurate = load_recipe(Path(__file__).parent / "recipes" / "cnn-w8-accurate.yaml")
    compress("efficientnet-lite0", accurate, out_dir=work / "ours-accurate", options=options)
    forms: dict[str, Any] = {
        "torch-fp32": model,
        "ort-fp32": OnnxModel(fp32_onnx, threads=args.threads),
        "ort-int8": OnnxModel(anchor, threads=args.threads),
        "ours-int8": OnnxModel(work / "ours" / "model.onnx", threads=args.threads),
        "ours-w8-accurate": OnnxModel(work / "ours-accurate" / "model.onnx", threads=args.threads),
    }
    files = {"ort-fp32": fp32_onnx, "ort-int8": anchor, "ours-int8": work / "ours" / "model.onnx",
             "ours-w8-accurate": work / "ours-accurate" / "model.onnx"}  # fmt: skip

    x = entry._photo_inputs("test")
    with torch.inference_mode():
        ref = torch.cat([model(x[i : i + 32]) for i in range(0, len(x), 32)])
    results: dict[str, dict[str, Any]] = {
        k: {"size_mb": files[k].stat().st_size / 1e6 if k in files else None, **quality(fn, x, ref)}
        for k, fn in forms.items()
    }
    gate = LoadGate(max_foreign=args.max_foreign)
    for bs in args.batches:
        inp = x[:bs]
        calls = {k: (lambda fn=fn, inp=inp: fn(inp)) for k, fn in forms.items()}
        lat = interleaved_latency(calls, args.rounds, 5, gate)
        base = lat["torch-fp32"]["p50"]
        for k, v in lat.items():
            results[k][f"bs{bs}"] = {**v, "speedup_vs_torch_fp32": base / v["p50"]}
        print(f"batch {bs}: " + ", ".join(f"{k} {v['p50']:.2f} ms ({base / v['p50']:.2f}x)" for k, v in lat.items()))
    for k, v in results.items():
        print(k, {m: v[m] for m in ("size_mb", "top1_agreement", "mean_cosine")})
    env = environment(args.threads)
    out = cpu_results_dir(env["cpu"]) / "vision_int8.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    rounds = {"quiet": gate.quiet, "noisy": gate.noisy}
    passes = [{"name": p.name, "stats": p.stats} for p in report.passes]
    payload = {"environment": env, "rounds": rounds, "results": results, "ours_passes": passes}
    out.write_text(json.dumps(payload, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
