"""Low-bit weight-only quantization: RTN vs GPTQ vs AWQ on tiny-lm, and GPTQ MiniLM vs ONNX Runtime's 4-bit quantizer.

    HF_HUB_OFFLINE=1 python benchmarks/weight_quant.py --threads 2 [--only lm minilm] [--rounds 8]

Part `lm` (tiny-lm, the full config; its Linear layers in blocks, `lm_head` kept float in every row):
fp32, then round-to-nearest (`WeightOnlyConfig`, group-wise asymmetric), GPTQ and AWQ at 4 bits and 3 bits
with group size 128, calibrated on 128 windows of 128 bytes of the train text. Per row: held-out
perplexity, quantization time, and the size of the packed safetensors artifact (`quant.packed`; fp32 saved
the same way). Targets: GPTQ 4-bit perplexity increase <= half of RTN's; AWQ better than RTN; GPTQ 3-bit
within 25% of fp32.

Part `minilm` (all-MiniLM-L6-v2): GPTQ 4-bit, group 32, calibrated on 256 STS-B train sentences, exported
with every Linear as `MatMulNBits` (our codes) and the embedding tables 4-bit (`GatherBlockQuantized`),
computing in float (ORT's `accuracy_level` 0) or with int8 activations (`-acc4`, accuracy_level 4);
against ONNX Runtime's `MatMulNBitsQuantizer` (block 32, the anchor) on the plain fp32 export: MatMul
only (its default), and MatMul + Gather (also at accuracy_level 4). Per row: file size, STS-B test
Spearman x100, mean cosine of sentence embeddings to fp32 on 256 sentences, batch-1 latency (seq 128)
against torch fp32 eager, interleaved rounds with medians. Targets: <= 15 MB, cosine >= 0.985, Spearman
drop <= 0.5, >= 1x fp32 eager speed at batch 1, GPTQ <= 60 s.

Latency runs with `--threads` (2) ORT and torch threads; the quantization passes with `--quant-threads`
(1: their small sequential ops gain little from a second thread and lose much on a busy machine).

onnxruntime 1.32's quantizer module imports `onnx_ir` only to convert tensors to and from numpy; where
that package is not installed, a two-function stand-in built on `onnx.numpy_helper` takes its place.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from quant_onnx import LoadGate, OrtFn, interleaved_latency  # noqa: E402

LM_CALIBRATION = 128  # windows of 128 bytes
MINILM_CALIBRATION = 256  # STS-B train sentences
MINILM_GROUP = 32


# ---------------------------------------------------------------- tiny-lm


def run_lm(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from modelpress.core.context import Context
    from modelpress.core.options import RunOptions
    from modelpress.quant import LayerFilter, WeightOnlyConfig, quantize
    from modelpress.quant.awq import AWQConfig
    from modelpress.quant.gptq import GPTQConfig
    from modelpress.quant.packed import save_packed
    from modelpress.zoo import get_entry
    from modelpress.zoo.tinylm import perplexity

    entry = get_entry("tiny-lm")
    start = time.perf_counter()
    fp32 = entry.load()
    print(f"tiny-lm loaded in {time.perf_counter() - start:.1f}s (trained if not cached)", flush=True)
    data = entry.calibration_data(LM_CALIBRATION, 8)
    no_head = LayerFilter(exclude=(r"lm_head$",))
    rows: dict[str, Any] = {"fp32": None}
    for bits in (4, 3):
        rows[f"rtn-{bits}"] = WeightOnlyConfig(bits=bits, symmetric=False, granularity="group", group_size=128,
                                               layers=no_head)  # fmt: skip
        rows[f"gptq-{bits}"] = GPTQConfig(bits=bits, group_size=128)
        rows[f"awq-{bits}"] = AWQConfig(bits=bits, group_size=128)
    results: dict[str, Any] = {}
    ctx = Context(options=RunOptions(threads=args.quant_threads, progress=False))
    for name, cfg in rows.items():
        start = time.perf_counter()
        model = fp32 if cfg is None else quantize(fp32, cfg, data=data, ctx=ctx)
        seconds = 0.0 if cfg is None else time.perf_counter() - start
        path = save_packed(model, workdir / f"lm-{name}.safetensors")
        with ctx.threads_scope():
            ppl = perplexity(model)
        results[name] = {"perplexity": ppl, "quantize_s": seconds, "size_mb": path.stat().st_size / 1e6}
        print(f"tiny-lm {name}: perplexity {ppl:.4f}, {seconds:.1f}s, {results[name]['size_mb']:.2f} MB", flush=True)
    base = results["fp32"]["perplexity"]
    for r in results.values():
        r["increase"] = r["perplexity"] - base
    inc = {k: v["increase"] for k, v in results.items()}
    targets = {
        "gptq4_increase_le_half_rtn4": inc["gptq-4"] <= 0.5 * inc["rtn-4"],
        "awq4_better_than_rtn4": inc["awq-4"] < inc["rtn-4"],
        "awq3_better_than_rtn3": inc["awq-3"] < inc["rtn-3"],
        "gptq3_within_25pct_of_fp32": results["gptq-3"]["perplexity"] <= 1.25 * base,
    }
    return {"rows": results, "targets": targets, "params": sum(p.numel() for p in fp32.parameters())}


# ---------------------------------------------------------------- MiniLM


def _onnx_ir_stand_in() -> None:
    """Let onnxruntime's quantizer import where `onnx_ir` is missing: it only converts tensors with it."""
    try:
        import onnx_ir  # noqa: F401
    except ImportError:
        from onnx import numpy_helper

        class _Tensor:
            def __init__(self, array: Any, name: str = "") -> None:
                self.array, self.name = array, name

            def numpy(self) -> Any:
                return self.array

        module = types.ModuleType("onnx_ir")
        module.Tensor = _Tensor  # type: ignore[attr-defined]
        module.from_proto = lambda proto: _Tensor(numpy_helper.to_array(proto), proto.name)  # type: ignore[attr-defined]
        module.serde = types.SimpleNamespace(  # type: ignore[attr-defined]
            serialize_tensor=lambda t: numpy_helper.from_array(t.array, t.name)
        )
        sys.modules["onnx_ir"] = module


def build_anchor(fp32_onnx: Path, out: Path, gather: bool, accuracy_level: int | None = None) -> Path:
    """ONNX Runtime's 4-bit weight quantizer (block 32) on the plain fp32 export."""
    import onnx

    _onnx_ir_stand_in()
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per node otherwise
    ops = ("MatMul", "Gather") if gather else ("MatMul",)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32_onnx)), bits=4, block_size=32, is_symmetric=True,
                                     accuracy_level=accuracy_level, op_types_to_quantize=ops)  # fmt: skip
    quantizer.process()
    onnx.save(quantizer.model.model, str(out))
    return out


def run_minilm(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from modelpress.core.context import Context
    from modelpress.core.options import RunOptions
    from modelpress.export.onnx import export_onnx
    from modelpress.export.onnx_nbits import export_nbits_onnx
    from modelpress.quant import quantize
    from modelpress.quant.gptq import GPTQConfig
    from modelpress.zoo import get_entry
    from modelpress.zoo.text import embed, sample_sentences

    entry = get_entry("minilm")
    fp32 = entry.load()
    x1 = entry.example_inputs(1)
    batches = entry.calibration_data(MINILM_CALIBRATION, 16)
    start = time.perf_counter()
    ctx = Context(options=RunOptions(threads=args.quant_threads, progress=False))
    gq = quantize(fp32, GPTQConfig(bits=4, group_size=MINILM_GROUP, symmetric=False), data=batches, ctx=ctx)
    gptq_s = time.perf_counter() - start
    print(f"MiniLM GPTQ 4-bit g{MINILM_GROUP}: {gptq_s:.1f}s", flush=True)

    paths: dict[str, Path] = {}
    build_s: dict[str, float] = {}
    start = time.perf_counter()
    paths["ours-gptq4"] = export_nbits_onnx(gq, x1, workdir / "ours-gptq4.onnx", embeddings="int4")
    build_s["ours-gptq4"] = time.perf_counter() - start + gptq_s
    start = time.perf_counter()
    paths["ours-gptq4-acc4"] = export_nbits_onnx(gq, x1, workdir / "ours-gptq4-acc4.onnx", embeddings="int4",
                                                 accuracy_level=4)  # fmt: skip
    build_s["ours-gptq4-acc4"] = time.perf_counter() - start + gptq_s
    plain = export_onnx(fp32, x1, workdir / "fp32-plain.onnx", optimize=False)
    for name, gather, level in (("ort-nbits4", False, None), ("ort-nbits4+gather", True, None),
                                ("ort-nbits4+gather-acc4", True, 4)):  # fmt: skip
        start = time.perf_counter()
        paths[name] = build_anchor(plain, workdir / f"{name}.onnx", gather, level)
        build_s[name] = time.perf_counter() - start
    for name, p in paths.items():
        print(f"built {name} in {build_s[name]:.1f}s ({p.stat().st_size / 1e6:.2f} MB)", flush=True)

    sessions = {name: OrtFn(p, args.threads) for name, p in paths.items()}
    results: dict[str, Any] = {"torch-fp32": {"size_mb": plain.stat().st_size / 1e6}}
    results |= {n: {"size_mb": p.stat().st_size / 1e6, "build_s": build_s[n]} for n, p in paths.items()}
    results["ours-gptq4"]["quantize_s"] = gptq_s
    fns = {"torch-fp32": lambda: fp32(*x1)} | {n: (lambda s=s: s(*x1)) for n, s in sessions.items()}
    gate = LoadGate(max_foreign=args.max_foreign, tries=args.tries)
    lat = interleaved_latency(fns, args.rounds, 5, gate)
    base = lat["torch-fp32"]["p50"]
    for name, v in lat.items():
        results[name]["bs1"] = {**v, "speedup_p50": base / v["p50"]}
    print(f"batch 1 ({gate.quiet} quiet rounds, {gate.noisy} noisy): "
          + ", ".join(f"{r} {v['p50']:.1f} ms" for r, v in lat.items()), flush=True)  # fmt: skip

    sentences = sample_sentences(256)

    def embeddings(fn: Any) -> torch.Tensor:
        return embed(fn, fp32.tokenizer, sentences, 32, fp32.max_seq_length, fp32.pooling, fp32.normalize)

    reference = embeddings(fp32)
    for name, fn in {"torch-fp32": fp32, "eager-gptq4": gq, **sessions}.items():
        q = entry.evaluate(fn)
        results.setdefault(name, {})["quality"] = {"name": q.name, "value": q.value}
        results[name]["mean_cosine_to_fp32"] = float(F.cosine_similarity(embeddings(fn), reference).mean())
        print(f"quality {name}: {q.name} {q.value:.3f}, cosine {results[name]['mean_cosine_to_fp32']:.5f}", flush=True)
    ours, spearman0 = results["ours-gptq4"], results["torch-fp32"]["quality"]["value"]
    fastest = max(results["ours-gptq4"]["bs1"]["speedup_p50"], results["ours-gptq4-acc4"]["bs1"]["speedup_p50"])
    targets = {
        "size_le_15mb": ours["size_mb"] <= 15,
        "cosine_ge_0.985": ours["mean_cosine_to_fp32"] >= 0.985,
        "spearman_drop_le_0.5": spearman0 - ours["quality"]["value"] <= 0.5,
        "bs1_speed_ge_fp32_eager": fastest >= 1.0,
        "gptq_le_60s": gptq_s <= 60,
    }
    return {"rows": results, "targets": targets, "rounds": {"quiet": gate.quiet, "noisy": gate.noisy}}


# ---------------------------------------------------------------- report


def tables(out: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if "lm" in out:
        lines += ["| tiny-lm | perplexity | increase | quantize s | artifact MB |", "|---|---:|---:|---:|---:|"]
        for name, r in out["lm"]["rows"].items():
            lines.append(f"| {name} | {r['perplexity']:.4f} | {r['increase']:+.4f} | {r['quantize_s']:.1f} | "
                         f"{r['size_mb']:.2f} |")  # fmt: skip
        lines += ["", "targets: " + ", ".join(f"{k} {'✓' if v else '✗'}" for k, v in out["lm"]["targets"].items()), ""]
    if "minilm" in out:
        lines += ["| MiniLM | size MB | bs1 p50 ms | bs1 x fp32 | STS-B | cosine to fp32 |",
                  "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
        for name, r in out["minilm"]["rows"].items():
            lat = r.get("bs1", {})
            q = r.get("quality", {}).get("value")
            size = f"{r['size_mb']:.2f}" if "size_mb" in r else "-"
            cells = [name, size, f"{lat['p50']:.1f}" if lat else "-", f"{lat['speedup_p50']:.2f}x" if lat else "-",
                     "-" if q is None else f"{q:.2f}", f"{r.get('mean_cosine_to_fp32', float('nan')):.5f}"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "targets: " + ", ".join(f"{k} {'✓' if v else '✗'}" for k, v in out["minilm"]["targets"].items())]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=["lm", "minilm"], choices=["lm", "minilm"])
    parser.add_argument("--quant-threads", type=int, default=1, help="torch threads of the quantization passes")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved latency rounds (5 calls each)")
    parser.add_argument("--max-foreign", type=float, default=0.1, help="CPU share of others that voids a round")
    parser.add_argument("--tries", type=int, default=3, help="repeats of a round voided by other processes")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "weight_quant.json")
    args = parser.parse_args()

    from modelpress.core.environment import environment

    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="weight_quant."))
    out: dict[str, Any] = {}
    if args.out.is_file():  # parts not run this time are kept from the previous results
        previous = json.loads(args.out.read_text())
        out = {k: v for k, v in previous.items() if k in ("lm", "minilm") and k not in args.only}
    if "lm" in args.only:
        out["lm"] = run_lm(args, workdir)
    if "minilm" in args.only:
        out["minilm"] = run_minilm(args, workdir)
    env = environment(args.threads)
    for part in args.only:
        out[part]["environment"] = env
    print()
    print("\n".join(tables(out)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nCPU: {env['cpu']['model']}, threads {env['threads']} (latency), {args.quant_threads} (quantization)")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))


if __name__ == "__main__":
    main()
