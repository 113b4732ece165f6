"""int8 MiniLM as an AOTInductor package: ours against torch.compile bf16 and PT2E int8, one run, fixed threads.

    HF_HUB_OFFLINE=1 python benchmarks/quant_pt2.py --threads 2 [--rounds 12] [--only ours-sq-tok]

Rows, all measured in this process and interleaved round by round (so all see the same machine load,
rounds disturbed by other processes are repeated, see quant_onnx.LoadGate):
- `torch-fp32`: the eager fp32 model, the baseline of every ratio;
- `anchor-compile-bf16`: torch.compile (Inductor, freezing) of the model cast to bf16 (AMX);
- `anchor-pt2e-int8`: torchao's PT2E X86InductorQuantizer (static per-tensor activations, per-channel
  weights, HistogramObserver) + torch.compile int8-mixed-bf16 (skipped when torchao is absent);
- ours: QLinear layers (int8 per-channel symmetric weights) built here, packaged by
  `modelpress.export.inductor.compile_package` (bf16 for the float ops, dynamic batch and sequence)
  and run from the loaded `.pt2` (`AotiModel`):
  - `ours-bf16`: no QLinear, the packaging alone (float ops in bf16);
  - `ours-static`: every Linear static per-tensor (min/max over 128 STS-B train sentences);
  - `ours-sq-dyn`: SmoothQuant-style per-channel input scaling (alpha 0.5, powers of two) before the
    Q/K/V, attention-output and FFN1 quantizers, static per-tensor; FFN2 (input: GELU output, whose
    range varies with the sentence) dynamic per-tensor asymmetric;
  - `ours-sq-mixed`: as ours-sq-dyn, but FFN2 of layers 3-5 static per-tensor with the range of
    least expected squared error (`quant.observers`, kind "mse"): only layers 0-2 need dynamic ranges;
  - `ours-sq-tok`: as ours-sq-dyn with FFN2 dynamic per-token asymmetric;
  - `ours-sq-bf16ffn2`: as ours-sq-dyn with FFN2 kept in bf16.
  - `recipe-int8-smooth`: the built-in `int8-smooth` recipe applied by its passes, as `compress`
    does (SmoothQuant folded into the LayerNorms, static MSE ranges, FFN2 of layers 0-2 per token).
  - `recipe-distill-l4-int8`, `recipe-distill-l3-int8`: the built-in recipes that distil MiniLM to 4 /
    3 layers first (the student is trained once and reused, see quant_onnx.build_recipe).
  `-at` suffix (`--autotune`, for ours-static and ours-sq-mixed): the same packaged with
  `autotune=True` (Inductor's C++ int8 GEMM templates where they beat oneDNN).
Per row: p50 latency at batch 1 and 32 (seq 128) as a ratio to torch fp32, size, build time (compile),
STS-B test Spearman x100, mean cosine to fp32 embeddings on 256 sentences, parity with the eager model.

Smoothing here is an explicit `x / s` ahead of the quantizer (Inductor fuses it into the LayerNorm
or transpose kernel that already quantizes), not folded into the LayerNorm: in a post-LN encoder the
LayerNorm output is also the residual. The PTQ pass that does this properly lives in
`modelpress.quant`; this script builds its models by hand so that it measures the runtime path alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from quant_onnx import LoadGate, build_recipe, interleaved_latency, record_batch  # noqa: E402

BATCHES = (1, 32)
CALIBRATION_SENTENCES = 128
OURS = (
    "ours-bf16", "ours-static", "ours-sq-mixed", "ours-sq-dyn", "ours-sq-tok", "ours-sq-bf16ffn2", "recipe-int8-smooth",
    "recipe-distill-l4-int8", "recipe-distill-l3-int8",
)  # fmt: skip
SENSITIVE_FFN2 = ("layer.0.", "layer.1.", "layer.2.")  # FFN2 inputs that static ranges cannot hold


# ---------------------------------------------------------------- building our quantized models


def input_stats(model: nn.Module, batches: list[Any]) -> dict[str, Any]:
    """Per-channel (min, max) of every Linear's input over the calibration batches; for FFN2 inputs
    also the per-tensor range of least expected squared error (key `name + ":mse"`)."""
    from modelpress.primitives.affine import QuantScheme
    from modelpress.quant.observers import ObserverConfig, make_observer

    stats: dict[str, Any] = {}
    observers = {}
    hooks = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if _kind(name) == "ffn2":
            observers[name] = make_observer(ObserverConfig(kind="mse"))

        def hook(m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            x = args[0].detach().flatten(0, -2)  # (tokens, in_features)
            lo, hi = x.amin(0), x.amax(0)
            if name in stats:
                lo, hi = torch.minimum(stats[name][0], lo), torch.maximum(stats[name][1], hi)
            stats[name] = (lo, hi)
            if name in observers:
                observers[name].observe(x)

        hooks.append(module.register_forward_pre_hook(hook))
    with torch.inference_mode():
        for batch in batches:
            model(*batch)
    for h in hooks:
        h.remove()
    for name, obs in observers.items():
        lo, hi = obs.range(QuantScheme(bits=8, symmetric=False))
        stats[name + ":mse"] = (float(lo), float(hi))
    return stats


class SmoothedInput(nn.Module):
    """`linear(x / s)` for a linear whose weight columns were multiplied by s (SmoothQuant migration)."""

    def __init__(self, inv_scale: torch.Tensor, linear: nn.Module) -> None:
        super().__init__()
        self.register_buffer("inv_scale", inv_scale)  # powers of two: exact in bf16 too
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.inv_scale.to(x.dtype))


def _kind(name: str) -> str:
    if ".attention.self." in name:
        return "qkv"
    if ".attention.output." in name:
        return "out"
    return "ffn1" if ".intermediate." in name else "ffn2"


def _smoothing(model: nn.Module, stats: dict[str, Any], alpha: float) -> dict[str, torch.Tensor]:
    """s per Linear input channel: max|x|^alpha / max|w|^(1-alpha), shared by Q/K/V, rounded to 2^k."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    groups: dict[str, list[str]] = {}
    for name in linears:  # Q, K and V read one input: one s for the three
        groups.setdefault(name.rsplit(".", 1)[0] if _kind(name) == "qkv" else name, []).append(name)
    scales = {}
    for members in groups.values():
        lo, hi = stats[members[0]]
        a = torch.maximum(-lo, hi).clamp(min=1e-5)
        w = torch.cat([linears[n].weight.detach().abs() for n in members]).amax(0).clamp(min=1e-5)
        s = torch.exp2(torch.round(torch.log2(a.pow(alpha) / w.pow(1 - alpha))))
        scales.update(dict.fromkeys(members, s))
    return scales


def build_ours(entry: Any, variant: str, stats: dict[str, Any], alpha: float = 0.5) -> nn.Module:
    """MiniLM with QLinear layers (int8 per-channel symmetric weights) per `variant` (see the docstring)."""
    from modelpress.primitives.affine import QuantScheme
    from modelpress.quant.modules import ActSpec, QLinear

    model = entry.load().eval()
    if variant == "ours-bf16":
        return model
    smooth = variant.startswith("ours-sq")
    scales = _smoothing(model, stats, alpha) if smooth else {}
    weights = QuantScheme(bits=8, symmetric=True, granularity="channel")
    for name, linear in [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]:
        kind = _kind(name)
        if kind == "ffn2" and variant == "ours-sq-bf16ffn2":
            continue
        module: nn.Module
        if kind == "ffn2" and variant == "ours-sq-mixed" and not any(k in name for k in SENSITIVE_FFN2):
            module = QLinear.from_float(linear, weights, ActSpec(mode="static"), stats[name + ":mse"])
        elif kind == "ffn2" and smooth:  # GELU output: asymmetric, its range varies with the input
            granularity = "token" if variant == "ours-sq-tok" else "tensor"
            module = QLinear.from_float(linear, weights, ActSpec(mode="dynamic", granularity=granularity))
        else:
            lo, hi = stats[name]
            s = scales.get(name, torch.ones_like(lo))
            smoothed = nn.Linear(linear.in_features, linear.out_features)
            smoothed.weight.data, smoothed.bias.data = linear.weight.data * s, linear.bias.data.clone()
            act_range = (float((lo / s).min()), float((hi / s).max()))
            module = QLinear.from_float(smoothed, weights, ActSpec(mode="static"), act_range)
            if name in scales:
                module = SmoothedInput(1.0 / s, module)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
    return model


# ---------------------------------------------------------------- anchors


def _float_outputs(fn: Callable[..., Any]) -> Callable[..., torch.Tensor]:
    def run(*inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = fn(*inputs)
        return (out[0] if isinstance(out, (tuple, list)) else out).float()

    return run


def anchor_compile_bf16(fp32: nn.Module) -> Callable[..., torch.Tensor]:
    """torch.compile of a bf16 copy (freezing: weights prepacked for oneDNN/AMX bf16 GEMMs)."""
    import copy

    return _float_outputs(torch.compile(copy.deepcopy(fp32).to(torch.bfloat16)))


def anchor_pt2e(fp32: nn.Module, batches: list[Any], example: tuple[torch.Tensor, ...]) -> Callable[..., Any] | None:
    """torchao PT2E X86InductorQuantizer static int8 + torch.compile (int8-mixed-bf16); None without torchao."""
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError:
        print("torchao is not installed: skipping anchor-pt2e-int8", flush=True)
        return None
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=2, max=512)
    shapes = ({0: batch, 1: seq}, {0: batch, 1: seq})
    graph = torch.export.export(fp32, example, dynamic_shapes=shapes).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for b in batches:
            prepared(*b)
    compiled = torch.compile(convert_pt2e(prepared))

    def run(*inputs: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _float_outputs(compiled)(*inputs)

    return run


# ---------------------------------------------------------------- measuring


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds (batch 1 runs 5 calls a round)")
    parser.add_argument("--only", nargs="*", default=None, help="rows to build and measure (torch fp32 always runs)")
    parser.add_argument("--autotune", action="store_true", help="also build ours with max-autotune (-at rows)")
    parser.add_argument(
        "--max-foreign", type=float, default=0.1, help="CPU share of other processes that voids a round"
    )
    parser.add_argument("--no-quality", action="store_true", help="skip STS-B and cosine (timing and size only)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the packages go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quant_pt2.json")
    args = parser.parse_args()

    import tempfile

    from modelpress.core.environment import environment
    from modelpress.export.inductor import compile_package, package_kernels
    from modelpress.export.runtime import AotiModel
    from modelpress.zoo import get_entry
    from modelpress.zoo.text import embed, sample_sentences

    torch.set_num_threads(args.threads)
    torch._inductor.config.freezing = True  # for the torch.compile anchors (dynamo reads it while tracing)
    entry = get_entry("minilm")
    fp32 = entry.load().eval()
    batches = entry.calibration_data(CALIBRATION_SENTENCES, 32)
    stats = input_stats(fp32, batches)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="quant_pt2."))

    rows = ["anchor-compile-bf16", "anchor-pt2e-int8", *OURS]
    rows += [f"{r}-at" for r in OURS if args.autotune and r in ("ours-static", "ours-sq-mixed", "recipe-int8-smooth")]
    rows = [r for r in rows if args.only is None or r in args.only]
    fns: dict[str, Callable[..., Any]] = {"torch-fp32": fp32}
    eager: dict[str, nn.Module] = {}
    results: dict[str, dict[str, Any]] = {"torch-fp32": {"size_mb": _param_mb(fp32)}}
    for row in rows:
        start = time.perf_counter()
        if row == "anchor-compile-bf16":
            fn: Callable[..., Any] | None = anchor_compile_bf16(fp32)
        elif row == "anchor-pt2e-int8":
            fn = anchor_pt2e(fp32, batches, entry.example_inputs(2))
        else:
            variant = row.removesuffix("-at")
            if variant.startswith("recipe-"):
                eager[row], quantize_s = build_recipe(entry, variant.removeprefix("recipe-"), batches)
                results[row] = {"quantize_s": quantize_s}
            else:
                eager[row] = build_ours(entry, variant, stats)
            autotune = row.endswith("-at")
            path = compile_package(eager[row], entry.example_inputs(2), workdir / row / "model.pt2", autotune=autotune)
            fn = AotiModel(path)
            results[row] = {
                **results.get(row, {}),
                "size_mb": path.stat().st_size / 1e6,
                "kernels": package_kernels(path),
            }
        if fn is None:
            continue
        with torch.inference_mode():  # torch.compile rows compile on their first call at each shape
            for bs in BATCHES:
                fn(*entry.example_inputs(bs))
        fns[row] = fn
        results.setdefault(row, {})["build_s"] = time.perf_counter() - start
        print(f"built {row} in {results[row]['build_s']:.1f}s", flush=True)

    rounds: dict[str, dict[str, int]] = {}
    for bs in BATCHES:
        inputs = entry.example_inputs(bs)
        gate = LoadGate(max_foreign=args.max_foreign)
        lat = interleaved_latency(
            {row: (lambda fn=fn, inputs=inputs: fn(*inputs)) for row, fn in fns.items()},
            args.rounds,
            5 if bs == 1 else 1,
            gate,
        )
        record_batch(results, rounds, bs, lat, gate)

    if not args.no_quality:
        sentences = sample_sentences(256)

        def embeddings(fn: Any) -> torch.Tensor:
            return embed(fn, fp32.tokenizer, sentences, 32, fp32.max_seq_length, fp32.pooling, fp32.normalize)

        reference = embeddings(fp32)
        for row, fn in fns.items():
            q = entry.evaluate(fn)
            results[row]["quality"] = {"name": q.name, "value": q.value}
            results[row]["mean_cosine_to_fp32"] = float(F.cosine_similarity(embeddings(fn), reference).mean())
            if row in eager:
                results[row]["parity_cosine_vs_eager"] = _parity(eager[row], fn, entry.example_inputs(4))
            print(
                f"quality {row}: {q.name} {q.value:.3f}, cosine {results[row]['mean_cosine_to_fp32']:.5f}", flush=True
            )

    print()
    print("\n".join(table(results)))
    env = environment(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "rounds": rounds, "environment": env}, indent=2) + "\n")
    print(f"\nCPU: {env['cpu']['model']} ({', '.join(env['cpu']['features'])}), threads {env['threads']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))


def _parity(model: nn.Module, package: Callable[..., Any], inputs: tuple[torch.Tensor, ...]) -> float:
    """Minimum per-sequence cosine of the package's token states against the eager quantized model's."""
    with torch.no_grad():
        want, got = model(*inputs), package(*inputs)
    got = got[0] if isinstance(got, (tuple, list)) else got
    return float(F.cosine_similarity(want.flatten(1), got.flatten(1)).min())


def _param_mb(model: nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| row | size MB | build s | bs1 p50 ms | bs1 x | bs32 p50 ms | bs32 x | STS-B | cosine to fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row, r in results.items():
        quality, cos = r.get("quality", {}).get("value"), r.get("mean_cosine_to_fp32")
        size = "-" if "size_mb" not in r else f"{r['size_mb']:.1f}"
        cells = [row, size, "-" if "build_s" not in r else f"{r['build_s']:.0f}"]
        for bs in BATCHES:
            lat = r.get(f"bs{bs}", {})
            cells += [f"{lat.get('p50', float('nan')):.1f}", f"{lat.get('speedup_p50', float('nan')):.2f}x"]
        cells += ["-" if quality is None else f"{quality:.2f}", "-" if cos is None else f"{cos:.5f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
