"""Quantization of ONNX graphs from any framework (Keras, TensorFlow, PyTorch exports): ONNX Runtime's
quantization tools underneath, driven by our configs, our calibration data and our sensitivity analysis.

- `DynamicQuantConfig` -> `quantize_dynamic` (int8 weights per channel, activations scaled at run time);
- `StaticQuantConfig` -> `quantize_static` in QDQ form with a calibration reader over the given batches
  (observer minmax / moving_average / percentile / kl map onto ORT's calibrators);
- `WeightOnlyConfig(bits=4, granularity="group")` -> ORT's 4-bit `MatMulNBits` quantizer;
- `MixedPrecisionConfig(base=static or dynamic)` -> per-node sensitivity (each MatMul / Gemm / Conv
  quantized alone, fidelity drop of the graph's first output), then the most sensitive nodes stay float,
  as few as meet `max_drop` (binary search). Calibration runs once and is reused for every trial.

    >>> stats = quantize_onnx("keras.onnx", "keras-int8.onnx", StaticQuantConfig(), batches)
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from modelpress.core.atomic import atomic_path
from modelpress.core.config import Config
from modelpress.core.context import Context
from modelpress.core.errors import BadInputError, DataError
from modelpress.core.runtime import OnnxModel
from modelpress.primitives.tokens import real_positions
from modelpress.quant.ptq import DynamicQuantConfig, LayerFilter, StaticQuantConfig, WeightOnlyConfig
from modelpress.quant.sensitivity import MixedPrecisionConfig

QUANTIZABLE_OPS = ("MatMul", "Gemm", "Conv")
DYNAMIC_OPS = ("MatMul", "Gemm", "Attention")  # ORT's fused Attention becomes QAttention
# ORT has no MSE calibrator: "mse" runs as its entropy (KL) calibrator, the other histogram-distortion search,
# and the report says so.
_CALIBRATORS = {
    "minmax": "MinMax", "moving_average": "MinMax", "percentile": "Percentile", "kl": "Entropy", "mse": "Entropy",
}  # fmt: skip


def graph_inputs(proto: Any) -> list[str]:
    """Names of the graph's real inputs (initializers listed as inputs by old exporters excluded)."""
    inits = {t.name for t in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in inits]


def weighted_nodes(proto: Any, layers: LayerFilter) -> list[str]:
    """MatMul / Gemm / Conv nodes with a constant weight that `layers` selects (by node name)."""
    inits = {t.name for t in proto.graph.initializer}
    out = []
    for node in proto.graph.node:
        weighted = node.op_type in (*QUANTIZABLE_OPS, "Attention") and any(i in inits for i in node.input[1:2])
        if weighted and layers.selects(node.name, node.op_type):
            out.append(node.name)
    return out


class _Reader:
    """ORT CalibrationDataReader over our batches (tuples of tensors in graph-input order)."""

    def __init__(self, names: list[str], batches: Sequence[Sequence[torch.Tensor]]) -> None:
        self.feeds = [_feed(names, b) for b in batches]
        self._it: Iterator[dict[str, np.ndarray]] = iter(self.feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds)

    def __len__(self) -> int:
        return len(self.feeds)


def _feed(names: list[str], batch: Sequence[torch.Tensor] | torch.Tensor) -> dict[str, np.ndarray]:
    tensors = [batch] if isinstance(batch, torch.Tensor) else list(batch)
    if len(tensors) != len(names):
        raise DataError(f"a calibration batch has {len(tensors)} tensor(s); the ONNX graph takes {len(names)}: {names}")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors, strict=True)}


def fidelity(reference: str | Path, candidate: str | Path, batches: Sequence[Any], names: list[str]) -> float:
    """Mean cosine of the candidate graph's first output to the reference graph's, over `batches`."""
    ref, cand = OnnxModel(reference), OnnxModel(candidate)
    cosines = []
    for batch in batches:
        inputs = tuple(torch.from_numpy(v) for v in _feed(names, batch).values())
        a, b = _first(ref(*inputs)).float(), _first(cand(*inputs)).float()
        mask = real_positions(inputs, a)
        if mask is not None:
            a, b = a[mask], b[mask]
        width = a.shape[-1] if a.dim() > 1 and a.shape[-1] > 1 else a.numel()  # a scalar per row: the whole column
        a, b = a.reshape(-1, width), b.reshape(-1, width)
        cosines.append(F.cosine_similarity(a.double(), b.double(), dim=-1))
    return float(torch.cat(cosines).mean())


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class _Quantizer:
    """One ORT quantization per call, with the calibration computed once (static) and reused."""

    def __init__(self, src: Path, config: Config, batches: list[Any], names: list[str], workdir: Path) -> None:
        self.src, self.config, self.batches, self.names, self.workdir = src, config, batches, names, workdir
        self.cache = workdir / "calibration.json"
        self.trials = 0

    def __call__(self, out: Path, exclude: Sequence[str] = (), only: Sequence[str] | None = None) -> Path:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_dynamic,
            quantize_static,
        )

        self.trials += 1
        cfg = self.config
        common: dict[str, Any] = {"nodes_to_exclude": list(exclude), "nodes_to_quantize": list(only or [])}
        if isinstance(cfg, DynamicQuantConfig):
            quantize_dynamic(
                self.src, out, per_channel=cfg.per_channel, weight_type=QuantType.QInt8,
                op_types_to_quantize=list(DYNAMIC_OPS), **common,
            )  # fmt: skip
        elif isinstance(cfg, StaticQuantConfig):
            method = getattr(CalibrationMethod, _CALIBRATORS[cfg.observer.kind])
            extra = {
                "CalibMovingAverage": cfg.observer.kind == "moving_average",
                "ActivationSymmetric": cfg.act_symmetric,
            }
            quantize_static(
                self.src, out, _Reader(self.names, self.batches), quant_format=QuantFormat.QDQ,
                per_channel=cfg.per_channel, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=method, extra_options=extra, calibration_cache_path=self.cache,
                op_types_to_quantize=list(QUANTIZABLE_OPS), **common,
            )  # fmt: skip
        else:
            raise AssertionError(type(cfg).__name__)
        return out


def _check(config: Config, ctx: Context) -> Config:
    base = config.base if isinstance(config, MixedPrecisionConfig) else config
    if isinstance(base, StaticQuantConfig) and base.observer.kind == "mse":
        ctx.warn("observer 'mse' has no ONNX Runtime calibrator: this ONNX graph is calibrated with its entropy one")
    if isinstance(config, MixedPrecisionConfig) and config.high_bits is not None:
        raise BadInputError("for ONNX models, mixed precision keeps the sensitive nodes in float: set high_bits: null")
    if isinstance(base, WeightOnlyConfig) and not (base.bits == 4 and base.granularity == "group"):
        raise BadInputError(
            f"weight-only {base.bits}-bit {base.granularity} quantization of ONNX graphs is not available; "
            "ONNX Runtime runs 4-bit group-wise weights (bits: 4, granularity: group)"
        )
    if not isinstance(base, (DynamicQuantConfig, StaticQuantConfig, WeightOnlyConfig)):
        raise BadInputError(
            f"{type(config).__name__} needs a PyTorch model; ONNX models take DynamicQuantConfig, "
            "StaticQuantConfig, WeightOnlyConfig (4-bit groups) or MixedPrecisionConfig over the first two"
        )
    return base


def quantize_onnx(
    src: str | Path, dst: str | Path, config: Config, data: Sequence[Any] | None, ctx: Context | None = None
) -> dict[str, Any]:
    """Quantize the ONNX graph at `src` into `dst` (written atomically); returns the pass statistics."""
    ctx = ctx or Context()
    start = time.perf_counter()
    base = _check(config, ctx)
    src, dst = Path(src), Path(dst)
    proto = onnx.load(str(src), load_external_data=False)
    names = graph_inputs(proto)
    nodes = weighted_nodes(proto, base.layers)
    if not nodes:
        raise BadInputError(f"{src}: no MatMul, Gemm or Conv node with constant weights to quantize")
    needs_data = isinstance(base, StaticQuantConfig) or isinstance(config, MixedPrecisionConfig)
    batches = list(data or [])[: getattr(base, "calibration_batches", 32)]
    if needs_data and not batches:
        raise DataError("quantizing this ONNX graph needs calibration batches (--data: .npy / .safetensors / .pt)")
    stats: dict[str, Any] = {"nodes": len(nodes)}
    with tempfile.TemporaryDirectory(prefix="modelpress-onnx.") as tmp, atomic_path(dst) as out:
        work = Path(tmp)
        # ONNX Runtime's quantizer writes `NAME-inferred.onnx` beside the graph it reads: give it a copy
        src = _staged_copy(src, proto, work / "source")
        if isinstance(base, WeightOnlyConfig):
            _weight_only_4bit(src, out, base)
        else:
            quantizer = _Quantizer(src, base, batches, names, work)
            quantizer(out, exclude=[n for n in _all_nodes(proto) if n not in nodes])
            if batches:
                stats["fidelity"] = fidelity(src, out, batches, names)
            if isinstance(config, MixedPrecisionConfig) and 1 - stats["fidelity"] > config.max_drop:
                stats |= _keep_sensitive_float(src, out, quantizer, nodes, config.max_drop, ctx)
            stats["trials"] = quantizer.trials
    ctx.report.add_pass(f"quantize-onnx/{type(config).__name__}", time.perf_counter() - start, **stats)
    return stats


def _all_nodes(proto: Any) -> list[str]:
    return [n.name for n in proto.graph.node if n.op_type in (*QUANTIZABLE_OPS, "Attention")]


def _keep_sensitive_float(
    src: Path, out: Path, quantize: _Quantizer, nodes: list[str], max_drop: float, ctx: Context
) -> dict[str, Any]:
    """Per-node sensitivity, then the fewest most-sensitive nodes left float that meet `max_drop`."""
    trial = out.parent / f".{out.stem}.trial.onnx"
    sensitivity = {}
    try:
        for node in ctx.progress(nodes, "sensitivity", total=len(nodes)):
            quantize(trial, only=[node])
            sensitivity[node] = 1 - fidelity(src, trial, quantize.batches, quantize.names)
        order = sorted(nodes, key=lambda n: -sensitivity[n])
        lo, hi = 1, len(order)  # smallest k with drop <= max_drop; k = len(order) leaves everything float
        drops = {}
        while lo < hi:
            k = (lo + hi) // 2
            quantize(trial, exclude=order[:k])
            drops[k] = 1 - fidelity(src, trial, quantize.batches, quantize.names)
            lo, hi = (lo, k) if drops[k] <= max_drop else (k + 1, hi)
        quantize(out, exclude=order[:lo])
        final = 1 - fidelity(src, out, quantize.batches, quantize.names)
    finally:
        trial.unlink(missing_ok=True)
    if final > max_drop:
        ctx.warn(f"even with {lo} node(s) kept float the fidelity drop is {final:.4f} > max_drop {max_drop}")
    return {
        "fidelity": 1 - final,
        "float_nodes": order[:lo],
        "sensitivity": {n: round(sensitivity[n], 6) for n in order},
    }


def _staged_copy(src: Path, proto: onnx.ModelProto, folder: Path) -> Path:
    """Copy the graph at `src` and its external data files into `folder`; the user's folder is never written."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    folder.mkdir()
    root = src.parent.resolve()
    for tensor in _get_all_tensors(proto):
        if not uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        data = (root / location).resolve()
        if not data.is_relative_to(root) or not data.is_file():
            raise BadInputError(
                f"{src}: tensor {tensor.name!r} names external data {location!r}, which is not a file beside the model"
            )
        target = folder / data.relative_to(root)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(data, target)
    staged = folder / src.name
    shutil.copy2(src, staged)
    return staged


def _weight_only_4bit(src: Path, out: Path, cfg: WeightOnlyConfig) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    proto = onnx.load(str(src))
    exclude = [n.name for n in proto.graph.node if n.op_type == "MatMul" and not cfg.layers.selects(n.name, n.op_type)]
    quantizer = MatMulNBitsQuantizer(
        proto, block_size=cfg.group_size, is_symmetric=cfg.symmetric, nodes_to_exclude=exclude
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
