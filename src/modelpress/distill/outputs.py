"""What a teacher or student produces for the losses: logits, embeddings, hidden states, attention maps.

Three model kinds are recognised:
- text encoders (`TextEncoder`: `.backbone` + `.pool`): `embedding` (pooled), token states;
- Hugging Face models (or a wrapper holding one as `.lm`, e.g. `tiny-lm`): `logits`;
- any other module: `logits` = the first output of `model(*inputs)`.

Hidden states are read with forward hooks on the transformer blocks (`hidden.{i}`, i = block
index) or on named modules (`feature.{name}`), so no model needs a special forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from modelpress.core.errors import BadInputError
from modelpress.distill.data import Batch

Outputs = dict[str, torch.Tensor]
_BLOCK_PATHS = (
    "encoder.layer", "model.layers", "model.decoder.layers", "layers", "transformer.h", "h", "decoder.layers",
    "transformer.layer",  # DistilBERT
)  # fmt: skip


def is_text_encoder(model: nn.Module) -> bool:
    return isinstance(getattr(model, "backbone", None), nn.Module) and callable(getattr(model, "pool", None))


def hf_model(model: nn.Module) -> nn.Module | None:
    """The Hugging Face `PreTrainedModel` inside `model` (itself, `.backbone` or `.lm`), or None."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is optional
        return None
    for candidate in (model, getattr(model, "backbone", None), getattr(model, "lm", None)):
        if isinstance(candidate, PreTrainedModel):
            return candidate
    return None


def transformer_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The list of transformer blocks (BERT `encoder.layer`, Llama `model.layers`, ...), or None."""
    root = hf_model(model) or model
    for path in _BLOCK_PATHS:
        obj: Any = root
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    return None


@contextlib.contextmanager
def _capture(modules: dict[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the (first) output of each module under its key while the block runs."""
    seen: dict[str, torch.Tensor] = {}

    def hook(key: str) -> Any:
        def fn(_m: nn.Module, _args: Any, out: Any) -> None:
            seen[key] = out[0] if isinstance(out, (tuple, list)) else out

        return fn

    handles = [m.register_forward_hook(hook(k)) for k, m in modules.items()]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def hook_targets(model: nn.Module, layers: Sequence[int] = (), features: Sequence[str] = ()) -> dict[str, nn.Module]:
    """`hidden.{i}` → block i and `feature.{name}` → module `name`; clear errors for unknown ones."""
    out: dict[str, nn.Module] = {}
    if layers:
        blocks = transformer_blocks(model)
        if blocks is None:
            raise BadInputError(
                f"{type(model).__name__} has no transformer blocks to match hidden states; name modules in `features`"
            )
        for i in layers:
            if not 0 <= i < len(blocks):
                raise BadInputError(f"layer {i} is out of range: {type(model).__name__} has {len(blocks)} blocks")
            out[f"hidden.{i}"] = blocks[i]
    named = dict(model.named_modules())
    for name in features:
        if name not in named:
            some = ", ".join(n for n in list(named)[1:12] if n)
            raise BadInputError(f"module {name!r} not found in {type(model).__name__}; modules include: {some}")
        out[f"feature.{name}"] = named[name]
    return out


def model_outputs(
    model: nn.Module,
    batch: Batch,
    layers: Sequence[int] = (),
    features: Sequence[str] = (),
    attentions: bool = False,
) -> Outputs:
    """Run `model` on `batch` and collect `logits` or `embedding`, plus `hidden.*`, `feature.*`, `attentions.*`."""
    out: Outputs = {}
    with _capture(hook_targets(model, layers, features)) as seen:
        if is_text_encoder(model):
            ids, mask = batch.inputs
            res = model.backbone(input_ids=ids, attention_mask=mask, output_attentions=attentions, return_dict=True)
            states = res.last_hidden_state  # (B, T, H)
            out["embedding"] = model.pool(states, mask)  # type: ignore[operator]
            att = res.attentions
        elif attentions and (hf := hf_model(model)) is not None:
            kwargs: dict[str, Any] = {"input_ids": batch.inputs[0], "output_attentions": True, "return_dict": True}
            if batch.attention_mask is not None:
                kwargs["attention_mask"] = batch.attention_mask
            res = hf(**kwargs)
            out["logits"], att = res.logits, res.attentions
        else:
            res = model(*batch.inputs)
            out["logits"] = res[0] if isinstance(res, (tuple, list)) else res
            att = None
    out.update(seen)
    if attentions:
        if not att:
            raise BadInputError(
                f"{type(model).__name__} returned no attention maps; attention transfer needs a Hugging Face model"
            )
        for i, a in enumerate(att):
            out[f"attentions.{i}"] = a  # (B, heads, T, T)
    return out


@contextlib.contextmanager
def eager_attention(*models: nn.Module) -> Iterator[None]:
    """Switch Hugging Face models to eager attention (which returns attention maps), restoring after."""
    saved = []
    for m in models:
        hf = hf_model(m)
        if hf is not None:
            saved.append((hf, hf.config._attn_implementation))
            hf.set_attn_implementation("eager")
    try:
        yield
    finally:
        for hf, impl in saved:
            hf.set_attn_implementation(impl)
