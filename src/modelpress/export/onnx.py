"""Export to ONNX (a copy of the model, named per the contract, dynamic axes) and the parity gate.

Text encoders (`zoo.text.TextEncoder`) take `input_ids` and `attention_mask` (int64, dynamic batch and
sequence axes) and return `token_states`; other models get `input`/`input_0..` and `output`/`output_0..`
with a dynamic batch axis. The user's model is never touched: a deep copy is exported (the TorchScript
exporter leaves a traced transformers model in a broken state).

`optimize` (measured in `benchmarks/quant_onnx.py`, MiniLM, 2 threads): a BERT-like encoder's
self-attention is exported as one ONNX Runtime `Attention` op per layer, which beats both the plain
graph and ORT's transformer optimizer (whose skip-layer-norm fusion is slow on this CPU); other models
get ORT's basic graph optimizations saved offline, kept only if the output still matches. Models
holding `QLinear` layers are exported as integer ONNX (`export.onnx_quant`). The files carry
`SESSION_HINTS` in their metadata: ORT settings they were measured with.

    >>> export_onnx(model, entry.example_inputs(1), "out/model.onnx")
    >>> check_parity(model, "out/model.onnx", entry.example_inputs(4))
    {'max_abs': 3.1e-05, 'mean_cosine': 1.0}
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.core.atomic import atomic_path
from modelpress.core.errors import BadInputError, ModelpressError
from modelpress.core.modules import set_submodule

log = logging.getLogger(__name__)

TEXT_INPUTS = ("input_ids", "attention_mask")
TEXT_OUTPUT = "token_states"
LM_OUTPUT = "logits"
# Families whose graph ORT's transformer optimizer fuses with model_type="bert" (same encoder layout).
_BERT_LIKE = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert", "mpnet"}
# fp32 parity gate: max abs difference to torch, relative to the output's scale when that exceeds 1. An
# optimized graph that drifts more than this falls back to the plain one (MiniLM fused: 5.5e-5).
PARITY_ATOL = 1e-4
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib operators (Attention, MatMulNBits, QAttention, ...)
# ORT session settings our graphs are measured with, stored in the model's metadata for runtimes to apply.
# Denormals as zero: the masked attention logits' exp() lands in denormals, which makes softmax ~6x slower.
SESSION_HINTS = {"session.set_denormal_as_zero": "1"}
SESSION_HINTS_KEY = "modelpress.ort_session_config"

DynamicAxes = dict[str, dict[int, str]]


class ExportWarning(UserWarning):
    """A layer exported in a weaker form than the eager model runs it (e.g. float compute); reports list these."""


class ExportError(ModelpressError):
    """The model cannot be exported, or the exported graph does not compute what the model computes."""


class ArtifactsRefused(ExportError, BadInputError):
    """Every artifact a recipe asks for was refused for this model (e.g. by its parity gate): the run gives
    nothing faithful to write, which the CLI reports as a refusal (exit 2) naming each reason."""


def export_onnx(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    out_path: str | Path,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: bool | DynamicAxes = True,
    opset: int = 17,
    optimize: bool = True,
    batch_axes: tuple[int, ...] | None = None,
) -> Path:
    """Export a copy of `model` to `out_path` (written atomically) and return the path.

    `dynamic_axes=True` makes the batch axis (and a text encoder's sequence axis) dynamic; a dict
    is passed to the exporter as is. `optimize`: see the module docstring. The written graph is
    checked against the model on `example_inputs` (max abs error <= `PARITY_ATOL`, 1e-4, relative to the
    output's largest magnitude where that exceeds 1; for integer models, mean cosine >= `onnx_quant.MIN_COSINE`,
    0.999, or within the model's own float-rounding spread), else `ExportError`.

        >>> export_onnx(encoder, entry.example_inputs(1), "out/model.onnx")  # input_ids, attention_mask
    """
    inputs = _as_tuple(example_inputs)
    from modelpress.export import onnx_quant

    if onnx_quant.has_quantized_layers(model):
        return onnx_quant.export_quantized_onnx(
            model,
            inputs,
            out_path,
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=dynamic_axes,
            opset=opset,
            fuse_attention=optimize,
            batch_axes=batch_axes,
        )
    import onnx

    out_path = Path(out_path)
    names = (input_names, output_names, dynamic_axes, opset)
    with atomic_path(out_path) as tmp:
        export_float(model, inputs, tmp, *names, fuse_attention=optimize, batch_axes=batch_axes)
        if optimize and _bert_backbone(model) is None:
            optimize_graph(tmp, model, inputs)
        if not _matches(model, tmp, inputs) and optimize:
            log.warning("the optimized export of %s does not match it; exporting plain", type(model).__name__)
            export_float(model, inputs, tmp, *names, fuse_attention=False, batch_axes=batch_axes)
        if not _matches(model, tmp, inputs):
            raise ExportError(f"the ONNX graph of {type(model).__name__} does not compute what the model computes")
        proto = onnx.load(str(tmp))
        add_session_hints(proto)
        onnx.save(proto, str(tmp))
    return out_path


def _matches(model: nn.Module, path: Path, inputs: tuple[torch.Tensor, ...]) -> bool:
    with torch.inference_mode():
        scale = max(1.0, float(_first(model(*inputs)).abs().max()))
    return check_parity(model, path, inputs)["max_abs"] <= PARITY_ATOL * scale


def add_session_hints(proto: Any) -> None:
    """Record `SESSION_HINTS` (JSON) in the model's metadata."""
    import json

    for prop in proto.metadata_props:
        if prop.key == SESSION_HINTS_KEY:
            prop.value = json.dumps(SESSION_HINTS)
            return
    proto.metadata_props.add(key=SESSION_HINTS_KEY, value=json.dumps(SESSION_HINTS))


def export_float(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: bool | DynamicAxes = True,
    opset: int = 17,
    prepare: Callable[[nn.Module], None] | None = None,
    fuse_attention: bool = True,
    batch_axes: tuple[int, ...] | None = None,
) -> None:
    """Export a deep copy of `model` with the TorchScript exporter; `prepare` may edit the copy first.

    `batch_axes`: each input's batch axis when it is not 0 for all (e.g. a recurrent state (2, B, H));
    the outputs' batch axes are then found by running the model at two batch sizes.
    """
    export_model = exportable_copy(model, inputs, prepare, fuse_attention)
    with torch.inference_mode():
        n_out = len(_as_tuple(export_model(*inputs)))
    in_names, out_names = contract_names(model, len(inputs), n_out, input_names, output_names)
    if dynamic_axes is True and batch_axes is not None and not takes_token_ids(model):
        axes: DynamicAxes | None = _batch_axes_by_running(export_model, inputs, batch_axes, in_names, out_names)
    else:
        axes = _dynamic_axes(model, in_names, out_names) if dynamic_axes is True else dynamic_axes or None
    fused = any(isinstance(m, _FusedSelfAttention) for m in export_model.modules())
    custom = {MS_DOMAIN: 1} if fused else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and legacy-exporter warnings, expected here
            torch.onnx.export(
                export_model,
                inputs,
                str(path),
                input_names=list(in_names),
                output_names=list(out_names),
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
                custom_opsets=custom,
                dynamo=False,
            )
    except Exception as e:
        raise ExportError(f"torch.onnx.export failed for {type(model).__name__}: {type(e).__name__}: {e}") from e


def exportable_copy(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    prepare: Callable[[nn.Module], None] | None = None,
    fuse_attention: bool = True,
) -> nn.Module:
    """A deep copy in eval mode, edited by `prepare`, with a BERT-like encoder's attention made exportable.

    With `fuse_attention`, each self-attention becomes one ONNX Runtime `Attention` op (see
    `_FusedSelfAttention`); otherwise the encoder switches to eager attention, which ORT's
    transformer optimizer can fuse (it fuses nothing on the sdpa graph), if that keeps the output.
    """
    export_model = copy.deepcopy(model).eval()
    if prepare is not None:
        prepare(export_model)
    backbone = _bert_backbone(export_model)
    if backbone is None:
        return export_model
    if fuse_attention and _fuse_self_attention(export_model):
        return export_model
    impl = getattr(backbone.config, "_attn_implementation", "eager")
    if impl == "eager":
        return export_model
    with torch.inference_mode():
        before = _first(export_model(*inputs))
        _set_attention(backbone, "eager")
        after = _first(export_model(*inputs))
    if not torch.allclose(before, after, atol=PARITY_ATOL * max(1.0, float(before.abs().max())), rtol=0):
        log.warning("eager attention changes the output of %s; exporting %s attention", type(model).__name__, impl)
        _set_attention(backbone, impl)
    return export_model


# ---------------------------------------------------------------- fused attention


class _OrtAttention(torch.autograd.Function):
    """Multi-head self-attention with packed Q/K/V weights; exported as `com.microsoft::Attention`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor, num_heads: int
    ) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = (x @ weight + bias).split(h, dim=-1)
        q, k, v = (t.reshape(b, s, num_heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, heads, S, head_dim)
        keep = mask[:, None, None, :].bool()  # (B, 1, 1, S)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return out.transpose(1, 2).reshape(b, s, h)

    @staticmethod
    def symbolic(g: Any, x: Any, weight: Any, bias: Any, mask: Any, num_heads: int) -> Any:
        out = g.op("com.microsoft::Attention", x, weight, bias, mask, num_heads_i=num_heads)
        out.setType(x.type())
        return out


class _FusedSelfAttention(nn.Module):
    """A BERT self-attention (Q/K/V projections, scaled dot product, padding mask) as one ORT op.

    The packed weight is `[W_q^T | W_k^T | W_v^T]` (hidden, 3 * hidden): ORT's own layout, which its
    quantizer and `QAttention` also use. The padding mask (batch, seq) comes from the encoder's input.
    """

    def __init__(self, attn: Any, mask_source: dict[str, torch.Tensor]) -> None:
        super().__init__()
        w, b = zip(*(_weight_and_bias(getattr(attn, n)) for n in ("query", "key", "value")), strict=True)
        self.weight = nn.Parameter(torch.cat(w, dim=1), requires_grad=False)  # (hidden, 3 * hidden)
        self.bias = nn.Parameter(torch.cat(b), requires_grad=False)
        self.num_heads = int(attn.num_attention_heads)
        self.mask_source = mask_source

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        mask = self.mask_source["attention_mask"].to(torch.int32)
        out = _OrtAttention.apply(hidden_states, self.weight, self.bias, mask, self.num_heads)
        return out, None


def _weight_and_bias(linear: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(in, out) weight and bias of an nn.Linear or a quantized layer's float stand-in (`weight_t`)."""
    w = linear.weight_t if hasattr(linear, "weight_t") else linear.weight.t()
    b = linear.bias if linear.bias is not None else torch.zeros(w.shape[1])
    return w.detach().float(), b.detach().float()


def _fuse_self_attention(model: nn.Module) -> bool:
    """Swap each fusable self-attention of a text encoder for `_FusedSelfAttention`; False if none is."""
    mask_source: dict[str, torch.Tensor] = {}
    swapped = 0
    for name, module in list(model.named_modules()):
        if not _fusable_attention(module):
            continue
        set_submodule(model, name, _FusedSelfAttention(module, mask_source))
        swapped += 1
    if swapped:

        def keep_mask(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            mask_source["attention_mask"] = args[1] if len(args) > 1 else kwargs["attention_mask"]

        model.register_forward_pre_hook(keep_mask, with_kwargs=True)
    return swapped > 0


def _fusable_attention(module: Any) -> bool:
    """A BERT-style encoder self-attention with plain scaled dot products (no relative positions)."""
    names = ("query", "key", "value")
    return (
        type(module).__name__.endswith("SelfAttention")
        and all(hasattr(module, n) and hasattr(getattr(module, n), "bias") for n in names)
        and hasattr(module, "num_attention_heads")
        and not getattr(module, "is_decoder", False)
        and getattr(module, "position_embedding_type", "absolute") == "absolute"
        and not getattr(module, "no_fuse", False)  # set by callers whose Q/K/V cannot run fused
        and abs(getattr(module, "scaling", module.attention_head_size**-0.5) - module.attention_head_size**-0.5) < 1e-9
    )


def _set_attention(backbone: Any, impl: str) -> None:
    if hasattr(backbone, "set_attn_implementation"):
        backbone.set_attn_implementation(impl)
    else:
        backbone.config._attn_implementation = impl


def is_text_encoder(model: nn.Module) -> bool:
    from modelpress.zoo.text import TextEncoder

    return isinstance(model, TextEncoder)


def is_causal_lm(model: nn.Module) -> bool:
    from modelpress.zoo.causal_lm import CausalLM

    return isinstance(model, CausalLM)


def takes_token_ids(model: nn.Module) -> bool:
    """Text encoders and causal LMs: (input_ids, attention_mask) with dynamic batch and sequence axes."""
    return is_text_encoder(model) or is_causal_lm(model)


def _bert_backbone(model: nn.Module) -> Any | None:
    backbone = getattr(model, "backbone", None) if is_text_encoder(model) else None
    config = getattr(backbone, "config", None)
    return backbone if getattr(config, "model_type", None) in _BERT_LIKE else None


def contract_names(
    model: nn.Module,
    n_in: int,
    n_out: int,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> tuple[list[str], list[str]]:
    """Graph input and output names: given ones, else the text contract (token states for an encoder,
    logits for a causal LM), else `input`/`output_i`."""
    text = takes_token_ids(model) and n_in == len(TEXT_INPUTS)
    first = LM_OUTPUT if is_causal_lm(model) else TEXT_OUTPUT
    default_in = list(TEXT_INPUTS) if text else _numbered("input", n_in)
    default_out = [first, *_numbered("output", n_out)[1:]] if text else _numbered("output", n_out)
    in_names = list(input_names) if input_names is not None else default_in
    out_names = list(output_names) if output_names is not None else default_out
    if len(in_names) != n_in:
        raise ExportError(f"{n_in} inputs need {n_in} input_names, got {in_names}")
    if len(out_names) != n_out:
        raise ExportError(f"the model returns {n_out} outputs; got output_names {out_names}")
    return in_names, out_names


def _numbered(stem: str, n: int) -> list[str]:
    return [stem] if n == 1 else [f"{stem}_{i}" for i in range(n)]


def _batch_axes_by_running(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    batch_axes: tuple[int, ...],
    in_names: list[str],
    out_names: list[str],
) -> DynamicAxes:
    grown = tuple(torch.cat([x, x.narrow(a, 0, 1)], dim=a) for x, a in zip(inputs, batch_axes, strict=True))
    with torch.inference_mode():
        small, large = _as_tuple(model(*inputs)), _as_tuple(model(*grown))
    axes: DynamicAxes = {n: {a: "batch"} for n, a in zip(in_names, batch_axes, strict=True)}
    for name, a, b in zip(out_names, small, large, strict=True):
        changed = [d for d in range(a.dim()) if a.shape[d] != b.shape[d]]
        axes[name] = {changed[0]: "batch"} if changed else {}
    return axes


def _dynamic_axes(model: nn.Module, in_names: list[str], out_names: list[str]) -> DynamicAxes:
    if takes_token_ids(model):
        axes = {0: "batch", 1: "sequence"}
        return {name: dict(axes) for name in (*in_names, out_names[0])} | {n: {0: "batch"} for n in out_names[1:]}
    return {name: {0: "batch"} for name in (*in_names, *out_names)}


# ---------------------------------------------------------------- graph optimization


def optimize_graph(path: Path, model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> str:
    """Optimize the ONNX file at `path` in place if the result still matches; returns what was applied.

    BERT-like encoders get ORT's transformer optimizer (on a graph exported with `fuse_attention=False`),
    other models ORT's basic optimizations.
    """
    backbone = _bert_backbone(model)
    candidate = path.with_name(path.name + ".opt")
    try:
        if backbone is not None:
            applied = _bert_optimize(path, candidate, backbone.config)
        else:
            applied = _ort_optimize(path, candidate)
        reference = _run_onnx(path, inputs)
        parity = compare_outputs(reference, _run_onnx(candidate, inputs))
        if parity["max_abs"] > PARITY_ATOL * max(1.0, float(reference.abs().max())):
            log.warning("ORT %s changed the output (max_abs %.2e); keeping the plain graph", applied, parity["max_abs"])
            return "none"
        os.replace(candidate, path)  # path is the caller's temporary file
        return applied
    finally:
        candidate.unlink(missing_ok=True)


def _bert_optimize(src: Path, dst: Path, config: Any) -> str:
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(str(src), "bert", config.num_attention_heads, config.hidden_size)
    fused = {k: v for k, v in opt.get_fused_operator_statistics().items() if v}
    opt.save_model_to_file(str(dst))
    return "bert optimizer (" + ", ".join(f"{k} x{v}" for k, v in fused.items()) + ")"


def _ort_optimize(src: Path, dst: Path) -> str:
    """ORT's basic optimizations (constant folding, Conv-BN and similar fusions), saved offline.

    Basic, not extended: the saved graph keeps standard ONNX ops, portable to any runtime; ORT applies
    its extended fusions again when it loads the model.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    return "ORT basic graph optimizations"


# ---------------------------------------------------------------- parity


def check_parity(
    torch_fn: Callable[..., Any],
    onnx_path: str | Path,
    inputs: Sequence[torch.Tensor] | torch.Tensor,
    threads: int | None = None,
) -> dict[str, float]:
    """How closely the ONNX model's first output matches `torch_fn`'s on `inputs`.

    `max_abs`: largest absolute difference; `mean_cosine`: mean cosine similarity of the rows along
    the last axis (per token for token states). For text encoders only the real (unpadded) token
    positions count: the states at padding positions are not used by anything downstream.
    """
    inputs = _as_tuple(inputs)
    with torch.inference_mode():
        expected = _first(torch_fn(*inputs)).float()
    return compare_outputs(expected, _run_onnx(Path(onnx_path), inputs, threads), real_positions(inputs, expected))


def real_positions(inputs: Sequence[torch.Tensor], output: torch.Tensor) -> torch.Tensor | None:
    """The attention mask (B, T) as booleans when `inputs` are (input_ids, attention_mask) of `output`'s rows."""
    if len(inputs) != 2 or inputs[1].is_floating_point() or output.dim() < 3:
        return None
    mask = inputs[1]
    if tuple(mask.shape) != tuple(output.shape[:2]) or not bool(((mask == 0) | (mask == 1)).all()):
        return None
    return mask.bool()


def _run_onnx(path: Path, inputs: tuple[torch.Tensor, ...], threads: int | None = None) -> torch.Tensor:
    from modelpress.export.runtime import OnnxModel

    return _first(OnnxModel(path, threads=threads)(*inputs)).float()


def compare_outputs(
    expected: torch.Tensor, actual: torch.Tensor, positions: torch.Tensor | None = None
) -> dict[str, float]:
    """`max_abs` difference and `mean_cosine` of the rows along the last axis of two outputs.

    `positions` (boolean, the outputs' leading dims) restricts both figures to those rows. Outputs
    with one value per row are compared as one vector.
    """
    if expected.shape != actual.shape:
        raise ExportError(f"output shape {tuple(actual.shape)} differs from torch's {tuple(expected.shape)}")
    if positions is not None:
        expected, actual = expected[positions], actual[positions]
    # One value per row (a probability, a regression output): the cosine of the whole column instead.
    rows = (-1, expected.shape[-1]) if expected.dim() and expected.shape[-1] > 1 else (1, -1)
    e, a = expected.reshape(rows).double(), actual.reshape(rows).double()
    cos = F.cosine_similarity(e, a, dim=-1)
    both_zero = (e.norm(dim=-1) < 1e-12) & (a.norm(dim=-1) < 1e-12)  # equal rows of zeros: cosine 1
    cos = torch.where(both_zero, torch.ones_like(cos), cos)
    return {"max_abs": float((expected - actual).abs().max()), "mean_cosine": float(cos.mean())}


def replace_nodes(proto: Any, nodes: list[Any], contrib_ops: bool = True) -> None:
    """Make `nodes` the graph's nodes after a rewrite: drop initializers nothing reads any more and, when
    the new nodes use ONNX Runtime's contrib operators, import their domain."""
    from onnx import helper

    graph = proto.graph
    del graph.node[:]
    graph.node.extend(nodes)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if contrib_ops and not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _as_tuple(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out
