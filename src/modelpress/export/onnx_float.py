"""The float ONNX export: a copy of the model traced by the TorchScript exporter, named per the contract,
with dynamic axes, and a BERT-like encoder's self-attention as one ONNX Runtime `Attention` op.

Text encoders (`zoo.text.TextEncoder`) take `input_ids` and `attention_mask` and return `token_states`,
causal LMs return `logits`; other models get `input`/`input_0..` and `output`/`output_0..`. The user's
model is never touched: a deep copy is exported (the TorchScript exporter leaves a traced transformers
model in a broken state). `export.onnx.export_onnx` (float) and `export.onnx_quant` / `export.onnx_nbits`
(integer rewrites of this graph) build on `export_float`.

    >>> export_float(model, entry.example_inputs(1), tmp_path)   # no parity gate: see export.onnx
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.core.modules import set_submodule
from modelpress.export.onnx_graph import MS_DOMAIN, PARITY_ATOL, ExportError, as_tuple, first_output

log = logging.getLogger(__name__)

TEXT_INPUTS = ("input_ids", "attention_mask")
TEXT_OUTPUT = "token_states"
LM_OUTPUT = "logits"
# Families whose graph ORT's transformer optimizer fuses with model_type="bert" (same encoder layout).
_BERT_LIKE = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert", "mpnet"}

DynamicAxes = dict[str, dict[int, str]]


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
        n_out = len(as_tuple(export_model(*inputs)))
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
    backbone = bert_backbone(export_model)
    if backbone is None:
        return export_model
    if fuse_attention and _fuse_self_attention(export_model):
        return export_model
    impl = getattr(backbone.config, "_attn_implementation", "eager")
    if impl == "eager":
        return export_model
    with torch.inference_mode():
        before = first_output(export_model(*inputs))
        _set_attention(backbone, "eager")
        after = first_output(export_model(*inputs))
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


def bert_backbone(model: nn.Module) -> Any | None:
    """The transformers backbone of a BERT-like text encoder (a family ORT's fusions know), else None."""
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
        small, large = as_tuple(model(*inputs)), as_tuple(model(*grown))
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
