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

import dataclasses
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from modelpress.core.atomic import atomic_path
from modelpress.core.config import Config, show_value
from modelpress.core.context import Context
from modelpress.core.errors import BadInputError, DataError, UnknownConfigError
from modelpress.core.registry import Registry
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
    return [node.name for node in _weighted(proto) if layers.selects(node.name, node.op_type)]


def weighted_op_types(path: str | Path) -> set[str]:
    """The op types of the graph at `path` that carry a constant weight (MatMul, Gemm, Conv, Attention): what
    ONNX Runtime's quantizers can work on (dynamic: `DYNAMIC_OPS`; static: `QUANTIZABLE_OPS`; 4-bit: MatMul)."""
    return {node.op_type for node in _weighted(onnx.load(str(path), load_external_data=False))}


def _weighted(proto: Any) -> list[Any]:
    inits = {t.name for t in proto.graph.initializer}
    return [n for n in proto.graph.node if n.op_type in (*QUANTIZABLE_OPS, "Attention") and
            any(i in inits for i in n.input[1:2])]  # fmt: skip


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


@dataclass
class OnnxJob:
    """What an ONNX pass works on: a staged copy of the graph (`src`), the file it writes (`out`), the graph's
    proto (without external data), its real input names, the weighted nodes the config selects, the
    calibration batches and a scratch folder. A handler writes `out` and adds its figures to `stats`."""

    src: Path
    out: Path
    proto: Any
    names: list[str]
    nodes: list[str]
    batches: list[Any]
    workdir: Path
    stats: dict[str, Any] = field(default_factory=dict)


# The ONNX-in backend: handler(job, cfg, ctx) -> job. Each handler honours its config's fields or refuses them.
ONNX_PASSES = Registry("ONNX pass")
_ONNX_TAKES = (
    "DynamicQuantConfig, StaticQuantConfig, WeightOnlyConfig (4-bit groups) or MixedPrecisionConfig over the first two"
)


def check_fields(cfg: Config, honoured: set[str], ctx: Context, at_default: dict[str, str] | None = None) -> None:
    """Refuse every field of `cfg` outside `honoured` that differs from its default (ONNX Runtime's quantizer
    cannot do what it asks); warn of the fields in `at_default` left at a default it does not follow."""
    for f in dataclasses.fields(cfg):
        if f.name in honoured:
            continue
        value = getattr(cfg, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if value != default:
            raise BadInputError(
                f"{cfg.type_name}.{f.name} = {show_value(value)} cannot be honoured for an ONNX model (ONNX "
                f"Runtime's quantizer); leave it at {show_value(default)} or compress the PyTorch model instead"
            )
        if at_default and f.name in at_default:
            ctx.warn(f"ONNX model: {at_default[f.name]}")


_EMBEDDINGS_FLOAT = "embedding tables stay float (ONNX Runtime's quantizer leaves Gather nodes as they are)"


def _warn_bias_correction(cfg: Any, ctx: Context) -> None:
    if cfg.bias_correction:
        ctx.warn("ONNX model: ONNX Runtime's quantizer does not correct the convolutions' biases (bias_correction)")
    if cfg.weight_rounding != "nearest":
        ctx.warn(
            f"ONNX model: ONNX Runtime's quantizer rounds weights to nearest (weight_rounding {cfg.weight_rounding!r})"
        )


def _check_dynamic(cfg: DynamicQuantConfig, ctx: Context) -> None:
    _warn_bias_correction(cfg, ctx)
    check_fields(cfg, {"per_channel", "fold_bn", "layers", "bias_correction", "weight_rounding"}, ctx, {
        "act_granularity": "activations are scaled per tensor at run time (ONNX Runtime's dynamic quantization), "
        "not per token",
        "embedding_bits": _EMBEDDINGS_FLOAT,
    })  # fmt: skip


def _check_static(cfg: StaticQuantConfig, ctx: Context) -> None:
    honoured = {
        "per_channel",
        "act_symmetric",
        "observer",
        "calibration_batches",
        "fold_bn",
        "layers",
        "bias_correction",
        "weight_rounding",
    }
    _warn_bias_correction(cfg, ctx)
    check_fields(cfg, honoured, ctx, {"embedding_bits": _EMBEDDINGS_FLOAT})
    if cfg.observer.kind == "mse":
        ctx.warn("observer 'mse' has no ONNX Runtime calibrator: this ONNX graph is calibrated with its entropy one")


@ONNX_PASSES.register(DynamicQuantConfig)
def _onnx_dynamic(job: OnnxJob, cfg: DynamicQuantConfig, ctx: Context) -> OnnxJob:
    _check_dynamic(cfg, ctx)
    return _ort_quantize(job, cfg, ctx)


@ONNX_PASSES.register(StaticQuantConfig)
def _onnx_static(job: OnnxJob, cfg: StaticQuantConfig, ctx: Context) -> OnnxJob:
    _check_static(cfg, ctx)
    return _ort_quantize(job, cfg, ctx)


@ONNX_PASSES.register(WeightOnlyConfig)
def _onnx_weight_only(job: OnnxJob, cfg: WeightOnlyConfig, ctx: Context) -> OnnxJob:
    honoured = {"bits", "symmetric", "granularity", "group_size", "fold_bn", "layers", "bias_correction"}
    check_fields(cfg, honoured, ctx)
    if not (cfg.bits == 4 and cfg.granularity == "group"):
        raise BadInputError(
            f"weight-only {cfg.bits}-bit {cfg.granularity} quantization of ONNX graphs is not available; "
            "ONNX Runtime runs 4-bit group-wise weights (bits: 4, granularity: group)"
        )
    _weight_only_4bit(job.src, job.out, cfg)
    return job


@ONNX_PASSES.register(MixedPrecisionConfig)
def _onnx_mixed(job: OnnxJob, cfg: MixedPrecisionConfig, ctx: Context) -> OnnxJob:
    """Sensitivity by the graph's fidelity: the most sensitive nodes stay float, as few as meet `max_drop`."""
    if cfg.high_bits is not None:
        raise BadInputError("for ONNX models, mixed precision keeps the sensitive nodes in float: set high_bits: null")
    if isinstance(cfg.base, WeightOnlyConfig):
        raise BadInputError(f"for ONNX models, MixedPrecisionConfig's base is static or dynamic ({_ONNX_TAKES})")
    check_fields(cfg, {"base", "high_bits", "max_drop"}, ctx)
    if isinstance(cfg.base, StaticQuantConfig):
        _check_static(cfg.base, ctx)
    else:
        _check_dynamic(cfg.base, ctx)
    return _ort_quantize(job, cfg.base, ctx, max_drop=cfg.max_drop)


def _ort_quantize(job: OnnxJob, cfg: Config, ctx: Context, max_drop: float | None = None) -> OnnxJob:
    """ORT's static or dynamic quantizer over the selected nodes; with a fidelity budget `max_drop`, the most
    sensitive nodes are then kept float."""
    if isinstance(cfg, StaticQuantConfig) or max_drop is not None:
        job.batches = job.batches[: getattr(cfg, "calibration_batches", 32)]
        if not job.batches:
            raise DataError("quantizing this ONNX graph needs calibration batches (--data: .npy / .safetensors / .pt)")
    quantizer = _Quantizer(job.src, cfg, job.batches, job.names, job.workdir)
    quantizer(job.out, exclude=[n for n in _all_nodes(job.proto) if n not in job.nodes])
    if job.batches:
        job.stats["fidelity"] = fidelity(job.src, job.out, job.batches, job.names)
    if max_drop is not None and 1 - job.stats["fidelity"] > max_drop:
        job.stats |= _keep_sensitive_float(job.src, job.out, quantizer, job.nodes, max_drop, ctx)
    job.stats["trials"] = quantizer.trials
    return job


def quantize_onnx(
    src: str | Path, dst: str | Path, config: Config, data: Sequence[Any] | None, ctx: Context | None = None
) -> dict[str, Any]:
    """Quantize the ONNX graph at `src` into `dst` (written atomically) with the ONNX pass registered for
    `config` (`ONNX_PASSES`); returns the pass statistics. A config field the pass cannot honour is refused."""
    ctx = ctx or Context()
    start = time.perf_counter()
    try:
        handler = ONNX_PASSES.handler_for(config)
    except UnknownConfigError:
        raise BadInputError(f"{type(config).__name__} needs a PyTorch model; ONNX models take {_ONNX_TAKES}") from None
    base = config.base if isinstance(config, MixedPrecisionConfig) else config
    src, dst = Path(src), Path(dst)
    proto = onnx.load(str(src), load_external_data=False)
    nodes = weighted_nodes(proto, base.layers)  # type: ignore[attr-defined]
    if not nodes:
        raise BadInputError(f"{src}: no MatMul, Gemm or Conv node with constant weights to quantize")
    with tempfile.TemporaryDirectory(prefix="modelpress-onnx.") as tmp, atomic_path(dst) as out:
        work = Path(tmp)
        # ONNX Runtime's quantizer writes `NAME-inferred.onnx` beside the graph it reads: give it a copy
        staged = _staged_copy(src, proto, work / "source")
        job = OnnxJob(staged, out, proto, graph_inputs(proto), nodes, list(data or []), work, {"nodes": len(nodes)})
        job = handler(job, config, ctx)
    ctx.report.add_pass(f"quantize-onnx/{type(config).__name__}", time.perf_counter() - start, **job.stats)
    return job.stats


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
    folder.mkdir()
    _copy_external_data(src, proto, folder)
    staged = folder / src.name
    shutil.copy2(src, staged)
    return staged


def copy_onnx(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """The graph at `src` as it is, copied to `dst` (written atomically) with its external data files beside it:
    an ONNX model's float form. Returns its pass statistics (the same function: fidelity 1)."""
    src, dst = Path(src), Path(dst)
    _copy_external_data(src, onnx.load(str(src), load_external_data=False), dst.parent)
    with atomic_path(dst) as out:
        shutil.copy2(src, out)
    return {"fidelity": 1.0}


def _copy_external_data(src: Path, proto: onnx.ModelProto, folder: Path) -> None:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

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


def _weight_only_4bit(src: Path, out: Path, cfg: WeightOnlyConfig) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    proto = onnx.load(str(src))
    exclude = [n.name for n in proto.graph.node if n.op_type == "MatMul" and not cfg.layers.selects(n.name, n.op_type)]
    quantizer = MatMulNBitsQuantizer(
        proto, block_size=cfg.group_size, is_symmetric=cfg.symmetric, nodes_to_exclude=exclude
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
