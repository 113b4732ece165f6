"""Sequential calibration: quantize a transformer one block at a time, each block seeing the outputs of
the blocks before it *as quantized*.

The inputs of the first block are captured by running the model until that block is called (a
pre-hook records the call and stops the forward). Then, block after block: the block runs on its
recorded inputs so a quantizer can observe its Linear layers (Hessians for GPTQ, activation statistics
for AWQ) and replace them, and the quantized block's outputs become the next block's inputs. Peak
memory is the model plus one block's calibration activations.

The block list is found generically: the largest `nn.ModuleList` of same-typed modules holding Linear
layers (`model.layers` of Llama-style decoders, `encoder.layer` of BERT, `transformer.h` of GPT-2).
Models without one are calibrated as a whole; selected Linear layers outside the blocks (a head) are
calibrated afterwards on the partly quantized model. GPT-2 style `Conv1D` layers (a Linear with its
weight stored transposed) are turned into `nn.Linear` first.

    >>> def quantize_block(scope: Scope) -> None:   # observe scope.layers while scope.forward() runs
    ...     ...
    >>> run_sequential(model, batches, selected, quantize_block, ctx, "GPTQ")
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from modelpress.core.context import Context
from modelpress.core.errors import BadInputError, DataError
from modelpress.core.layer_filter import LayerFilter
from modelpress.core.modules import custom_forward, run_batch, set_submodule, take_batches

# The layers a calibrated pass changes by default: every Linear but a causal LM's output head.
DEFAULT_LAYERS = LayerFilter(exclude=(r"(^|\.)lm_head$",))
# Selected layer types a calibrated pass leaves as they are: warned about once per type.
_UNCHANGED = (
    nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.LSTM, nn.GRU, nn.RNN, nn.Embedding,
)  # fmt: skip

# Keywords under which decoders hand their blocks a KV cache (transformers 5 names it `cache`). A recorded
# call keeps none: a block runs several times on the same call (observe, quantize, feed forward), and a live
# cache would make every later run attend to the keys of the earlier ones. `cache_position` is kept: it is
# a tensor of positions, inert without a cache.
_CACHE_KEYS = frozenset({"past_key_values", "past_key_value", "layer_past", "cache"})


def _is_cache(value: Any) -> bool:
    """A KV cache object: a transformers `Cache`, or anything that looks like one (`update`, `get_seq_length`)."""
    if value is None or isinstance(value, torch.Tensor):
        return False
    cache_utils = sys.modules.get("transformers.cache_utils")  # a transformers cache implies it is imported
    cache_type = getattr(cache_utils, "Cache", None)
    if isinstance(cache_type, type) and isinstance(value, cache_type):
        return True
    return callable(getattr(value, "update", None)) and callable(getattr(value, "get_seq_length", None))


def _without_cache(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A block call that runs without a KV cache: cache keywords and cache objects dropped, `use_cache=False`."""
    args = tuple(None if _is_cache(a) else a for a in args)  # GPT-2 passes its cache positionally
    kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KEYS and not _is_cache(v)}
    if "use_cache" in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


class _Stop(Exception):
    """Raised by the capture hook: the forward has reached the first block, nothing further is needed."""


@dataclass
class BlockCall:
    """One recorded call of a block: `args[0]` is the hidden states, the rest is passed along unchanged."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclass
class Scope:
    """What a quantizer works on: a block (or the whole model), its selected layers, a way to run it."""

    name: str  # the block's qualified name; "" for the whole model
    module: nn.Module
    layers: dict[str, nn.Linear]  # qualified name -> selected Linear inside `module`
    forward: Callable[[], list[torch.Tensor]]  # runs `module` on every calibration input; first outputs


BlockQuantizer = Callable[[Scope], None]


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D`: y = x @ W + b with W stored (in, out)."""
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and weight is not None and weight.dim() == 2


def convert_conv1d(model: nn.Module) -> list[str]:
    """Replace transformers' `Conv1D` layers by the equal `nn.Linear`; returns their names."""
    names = []
    for name, module in list(model.named_modules()):
        if _is_conv1d(module):
            k, n = module.weight.shape
            linear = nn.Linear(k, n, bias=module.bias is not None, dtype=module.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            set_submodule(model, name, linear)
            names.append(name)
    return names


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(name, list) of the model's repeated blocks: the largest ModuleList of same-typed modules with Linears."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(b) for b in module}) != 1:
            continue
        if not any(isinstance(m, nn.Linear) or _is_conv1d(m) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    return None if best is None else (best[1], best[2])


def first_tensor(out: Any) -> torch.Tensor:
    """The first tensor of a block's or model's output (a tensor, a tuple/list, or a `ModelOutput`)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return first_tensor(out[0])
    if isinstance(out, dict) and out:
        return first_tensor(next(iter(out.values())))
    raise DataError(f"cannot find a tensor in the output of type {type(out).__name__}")


def capture_block_inputs(model: nn.Module, block: nn.Module, batches: Sequence[Any]) -> list[BlockCall]:
    """Run `model` on each batch until `block` is called; the recorded calls, one per batch."""
    calls: list[BlockCall] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not args:  # hidden states passed by keyword: make them positional
            kwargs = dict(kwargs)
            args = (kwargs.pop("hidden_states"),)
        calls.append(BlockCall(*_without_cache(tuple(args), kwargs)))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                before = len(calls)
                try:
                    run_batch(model, batch)
                except _Stop:
                    pass
                if len(calls) == before:
                    raise DataError("the model's forward never reached its first block; cannot calibrate sequentially")
    finally:
        handle.remove()
    return calls


def observe_inputs(scope: Scope, fold: Callable[[Any, torch.Tensor], Any]) -> dict[str, Any]:
    """Run the scope once, folding each of its layers' inputs into a statistic: {layer: fold(...(None, x1), x2)}.

    A layer that never ran keeps None."""
    acc: dict[str, Any] = dict.fromkeys(scope.layers)
    handles = []
    for name, layer in scope.layers.items():

        def hook(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            acc[name] = fold(acc[name], args[0])

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        scope.forward()
    finally:
        for h in handles:
            h.remove()
    return acc


def _block_forward(block: nn.Module, calls: list[BlockCall]) -> Callable[[], list[torch.Tensor]]:
    def forward() -> list[torch.Tensor]:
        with torch.no_grad():
            return [first_tensor(block(*c.args, **c.kwargs)) for c in calls]

    return forward


def _model_forward(model: nn.Module, batches: Sequence[Any]) -> Callable[[], list[torch.Tensor]]:
    def forward() -> list[torch.Tensor]:
        with torch.no_grad():
            return [first_tensor(run_batch(model, b)) for b in batches]

    return forward


def run_sequential(
    model: nn.Module,
    batches: Sequence[Any],
    selected: dict[str, nn.Linear],
    quantize_block: BlockQuantizer,
    ctx: Context,
    label: str,
) -> dict[str, Any]:
    """Calibrate and quantize `selected` layers block by block with `quantize_block`; returns pass stats."""
    if not batches:
        raise DataError(f"{label} needs calibration data: the calibration set is empty")
    found = find_blocks(model)
    done: set[str] = set()
    stats: dict[str, Any] = {"blocks": 0, "calibration_batches": len(batches)}
    if found is None:
        ctx.warn(f"{label}: no repeated block list found; calibrating all selected layers in one pass")
    else:
        prefix, blocks = found
        stats["block_list"] = prefix
        calls = capture_block_inputs(model, blocks[0], batches)
        for i, block in ctx.progress(list(enumerate(blocks)), f"{label} blocks", total=len(blocks)):
            name = f"{prefix}.{i}" if prefix else str(i)
            inside = {n: m for n, m in selected.items() if n.startswith(name + ".")}
            if inside:
                quantize_block(Scope(name, block, inside, _block_forward(block, calls)))
                done.update(inside)
            outputs = _block_forward(block, calls)()  # the quantized block feeds the next one
            calls = [BlockCall((out, *c.args[1:]), c.kwargs) for out, c in zip(outputs, calls, strict=True)]
            stats["blocks"] += 1
        del calls
    rest = {n: m for n, m in selected.items() if n not in done}
    if rest:
        quantize_block(Scope("", model, rest, _model_forward(model, batches)))
        stats["outside_blocks"] = sorted(rest)
    return stats


def selected_linears(
    model: nn.Module,
    layers: LayerFilter,
    ctx: Context,
    label: str,
    tables_elsewhere: bool = False,
    kept: str = "kept in float",
) -> dict[str, nn.Linear]:
    """The Linear layers a calibrated pass (GPTQ, AWQ, SparseGPT, Wanda) changes; other selected layers are
    warned about and `kept` as they are (embedding tables silently when the pass quantizes them on its own:
    `tables_elsewhere`). Raises `BadInputError` when no Linear layer is selected."""
    chosen: dict[str, nn.Linear] = {}
    unchanged: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not name or not layers.selects(name, type(module).__name__):
            continue
        if isinstance(module, nn.Linear) and (why := custom_forward(module, (nn.Linear,))) is not None:
            ctx.warn(f"skipped {name}: {why} ({kept})")
        elif isinstance(module, nn.Linear):
            chosen[name] = module  # any group size fits: a short last group has its own scale
        elif isinstance(module, nn.Embedding) and tables_elsewhere:
            continue
        elif isinstance(module, (nn.Conv1d, nn.Conv2d)):
            ctx.warn(f"skipped {name}: {label} applies to Linear layers, not {type(module).__name__} ({kept})")
        elif isinstance(module, _UNCHANGED):
            unchanged.setdefault(type(module).__name__, []).append(name)
    for kind, names in unchanged.items():
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        ctx.warn(f"skipped {len(names)} {kind} layer(s) ({shown}): {label} changes Linear layers only, {kept}")
    if not chosen:
        raise BadInputError(f"the model has no Linear layers selected by {layers} that {label} can quantize")
    return chosen


def calibration_batches(ctx: Context, n: int, label: str) -> list[Any]:
    """The first `n` batches of `ctx.data`; a `DataError` naming `label` when there are none."""
    if ctx.data is None:
        raise DataError(f"{label} needs calibration data: pass data=... (CLI: --data) or use a zoo model")
    batches = take_batches(ctx.data, n)
    if not batches:
        raise DataError(f"{label} needs calibration data: the calibration set is empty")
    return batches
