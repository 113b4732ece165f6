"""The files `compress` writes for a compressed model: ONNX, `.pt2`, GGUF and GenAI artifacts, each checked
against the model it came from (the parity gate), and a sparse checkpoint for a pruned model.

    >>> artifacts = export_artifacts(model, example, recipe, folder, ctx, batch_axes, recipe_lowering(recipe))
    >>> parity = parity_of(original, model, artifacts, example, threads)
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from modelpress.core.atomic import atomic_path
from modelpress.core.context import Context
from modelpress.core.errors import BadInputError
from modelpress.core.numerics import exactly
from modelpress.recipes.recipe import Recipe

# Below this share of non-zero weights, a pruned model's weights are written sparse too (the runtimes store
# them dense).
SPARSE_CHECKPOINT_BELOW = 0.9


def sparse_checkpoint(model: nn.Module, artifacts: dict[str, Path], folder: Path, ctx: Context) -> None:
    """Write `model.sparse.safetensors` (bitmask encoding, `prune.load_sparse`) for a model pruned without
    shrinking its tensors, and say in the report that the runtime artifacts store those zeros dense."""
    from modelpress.measure.size import artifact_size_bytes
    from modelpress.prune.sparse_format import save_sparse

    floats = [t for t in model.state_dict().values() if t.is_floating_point() and t.numel() >= 64]
    params = sum(t.numel() for t in floats)  # integer codes of quantized layers are not pruned weights
    nonzero = sum(int(t.count_nonzero()) for t in floats)
    if not params or nonzero >= SPARSE_CHECKPOINT_BELOW * params:
        return
    start = time.perf_counter()
    path = save_sparse(model, folder / "model.sparse.safetensors")
    sizes = {name: artifact_size_bytes(p) for name, p in artifacts.items()}
    ctx.report.add_pass(
        "export/sparse", time.perf_counter() - start, file=path.name, size_bytes=artifact_size_bytes(path),
        zero_share=round(1 - nonzero / params, 4), runtime_artifact_bytes=sizes,
    )  # fmt: skip
    if artifacts:
        shown = ", ".join(f"{p.name} {sizes[n] / 1e6:.2f} MB" for n, p in artifacts.items())
        ctx.warn(
            f"{1 - nonzero / params:.0%} of the weights are zero, but {shown} store them dense (ONNX Runtime and "
            f"AOTInductor run dense kernels): {path.name} holds the sparse weights in "
            f"{artifact_size_bytes(path) / 1e6:.2f} MB for PyTorch (modelpress.prune.load_sparse)"
        )


@exactly
def export_artifacts(
    model: nn.Module,
    example: tuple | None,
    rec: Recipe,
    folder: Path,
    ctx: Context,
    batch_axes: tuple[int, ...] | None = None,
    lowering: dict[str, Any] | None = None,
) -> dict[str, Path]:
    from modelpress.export.onnx import ExportWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExportWarning)
        out = _export_each(model, example, rec, folder, ctx, batch_axes, lowering)
    for w in caught:
        if issubclass(w.category, ExportWarning):
            ctx.report.warn(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out


def _export_each(
    model: nn.Module,
    example: tuple | None,
    rec: Recipe,
    folder: Path,
    ctx: Context,
    batch_axes: tuple[int, ...] | None,
    lowering: dict[str, Any] | None,
) -> dict[str, Path]:
    if example is None:
        if rec.export:
            ctx.warn("no example inputs are known for this model: artifacts were not exported")
        return {}
    from modelpress.export.onnx import ExportError

    out: dict[str, Path] = {}
    refused: dict[str, str] = {}
    if "onnx" in rec.export:
        from modelpress.export.onnx import export_onnx

        start = time.perf_counter()
        try:
            out["onnx"] = export_onnx(model, example, folder / "model.onnx", batch_axes=batch_axes)
        except ExportError as e:  # its parity gate refused it: the other artifacts are still written
            refused["onnx"] = str(e)
        stats = {"refused": refused["onnx"]} if "onnx" in refused else {}
        ctx.report.add_pass("export/onnx", time.perf_counter() - start, **stats)
    if "pt2" in rec.export:
        try:
            out |= _export_pt2(model, example, folder, ctx, batch_axes, lowering or recipe_lowering(rec))
        except ExportError as e:
            refused["pt2"] = str(e)
    if "gguf" in rec.export:
        _export_gguf(model, example, folder, ctx)
    if "genai" in rec.export:
        from modelpress.export.genai import export_to_report

        export_to_report(model, example, folder / "genai", ctx)
    for kind, why in refused.items():
        ctx.report.warn(f"model.{kind} not written: {why}")
    if refused and not out:
        from modelpress.export.onnx import ArtifactsRefused

        raise ArtifactsRefused("; ".join(f"model.{kind}: {why}" for kind, why in refused.items()))
    return out


GGUF_MIN_COSINE = 0.999  # the GGUF's weights (fp16 block scales) against the compressed model's


def _export_gguf(model: nn.Module, example: tuple, folder: Path, ctx: Context) -> None:
    """`model.gguf` for llama.cpp where the model is a causal LM it runs, checked by reading it back.

    The file is read back by transformers (dequantized) and its logits compared with the compressed
    model's on the example inputs: the GGUF holds the same weights up to fp16 block scales. Its speed
    is not measured here (llama.cpp is not a dependency; `benchmarks/` runs it). A model llama.cpp
    cannot take, or a file that fails the check, is reported and not written.
    """
    from modelpress.export.onnx import is_causal_lm

    if not is_causal_lm(model):
        ctx.report.warn(
            f"model.gguf not written: GGUF is written for transformers causal language models only (a "
            f"causal-LM folder, a .gguf file, smollm2-135m), not {type(model).__name__}"
        )
        return
    from modelpress.export.gguf import export_gguf

    start = time.perf_counter()
    path = folder / "model.gguf"
    source = getattr(model, "source", "")
    try:
        written = export_gguf(
            model, path, tokenizer=None if source.endswith(".gguf") else model.tokenizer,
            source_gguf=source if source.endswith(".gguf") else None,
        )  # fmt: skip
        cosine = _gguf_readback(model, path, example)
    except BadInputError as e:
        path.unlink(missing_ok=True)
        ctx.report.warn(f"model.gguf not written: {e}")
        return
    stats = {k: written[k] for k in ("file_type", "quantized", "max_rel_diff", "max_step_diff", "tokenizer")}
    stats |= {"not_quantized": len(written["not_quantized"]), "readback_mean_cosine": cosine}
    if cosine < GGUF_MIN_COSINE:
        path.unlink()
        ctx.report.warn(f"model.gguf not written: read back, its logits drift (mean cosine {cosine:.5f})")
        stats["refused"] = f"mean cosine {cosine:.5f} < {GGUF_MIN_COSINE}"
    else:
        ctx.report.warn(
            f"model.gguf ({written['file_type']}, {written['quantized']} tensors in integer blocks) is for llama.cpp: "
            f"its weights, read back, give the compressed model's logits (mean cosine {cosine:.6f}); its speed is "
            "not measured here"
        )
    ctx.report.add_pass("export/gguf", time.perf_counter() - start, **stats)


def _gguf_readback(model: nn.Module, path: Path, example: tuple) -> float:
    """Mean cosine between the logits of the GGUF (as transformers dequantizes it) and of `model`."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    try:
        lm = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    except Exception as e:
        raise BadInputError(f"transformers cannot read it back: {type(e).__name__}: {e}") from None
    with torch.no_grad():
        expected = model(*example).float()
        actual = lm(input_ids=example[0], attention_mask=example[1], use_cache=False).logits.float()
    return float(F.cosine_similarity(expected.flatten(0, -2), actual.flatten(0, -2), dim=-1).mean())


def recipe_lowering(rec: Recipe) -> dict[str, Any]:
    """The .pt2 lowering for this CPU and the recipe's `lowering` options (`choose_lowering`)."""
    from modelpress.export.inductor import choose_lowering

    return choose_lowering(rec.lowering_option("pt2_float"), rec.lowering_option("int8_sources"))


def _export_pt2(
    model: nn.Module,
    example: tuple,
    folder: Path,
    ctx: Context,
    batch_axes: tuple[int, ...] | None,
    lowering: dict[str, Any],
) -> dict[str, Path]:
    """The AOTInductor package, lowered as `lowering` says; the choice is reported."""
    from modelpress.export.artifact import package_checked

    start = time.perf_counter()
    with atomic_path(folder / "model.pt2") as tmp:  # a package its gate refuses leaves no file behind
        parity = package_checked(
            model, example, tmp, batch_axes=batch_axes, bf16=lowering["bf16"], signed_int8=lowering["signed_int8"],
        )  # fmt: skip
    ctx.report.add_pass(
        "export/pt2", time.perf_counter() - start, float_ops="bf16" if parity.get("bf16") else "fp32",
        int8_sources="signed" if lowering["signed_int8"] else "unsigned", chosen_for=lowering["why"],
    )  # fmt: skip
    return {"pt2": folder / "model.pt2"}


@exactly
def parity_of(
    original: nn.Module, compressed: nn.Module, artifacts: dict[str, Path], example: tuple, threads: int | None
) -> dict[str, Any]:
    """Each artifact's first output against the compressed eager model (the export check) and the original."""
    import torch

    from modelpress.export.artifact import PT2_MIN_COSINE
    from modelpress.export.onnx import compare_outputs, real_positions
    from modelpress.export.onnx_quant import MIN_COSINE, noise_floor
    from modelpress.export.runtime import AotiModel, OnnxModel

    def first(fn: Any) -> torch.Tensor:
        with torch.inference_mode():
            out = fn(*example)
        return (out[0] if isinstance(out, (tuple, list)) else out).float()

    reference, expected = first(original), first(compressed)
    positions = real_positions(example, expected)
    out: dict[str, Any] = {}
    for kind, path in artifacts.items():
        actual = first(OnnxModel(path, threads=threads) if kind == "onnx" else AotiModel(path))
        check = compare_outputs(expected, actual, positions)
        to_original = compare_outputs(reference, actual, positions)["mean_cosine"]
        out[kind] = {**check, "mean_cosine_to_original": to_original}
        if check["mean_cosine"] < (MIN_COSINE if kind == "onnx" else PT2_MIN_COSINE):  # within the model's spread
            out[kind]["noise_floor"] = noise_floor(compressed, example)
    out["eager_mean_cosine_to_original"] = compare_outputs(reference, expected, positions)["mean_cosine"]
    return out
