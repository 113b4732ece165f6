"""Helpers on `torch.nn.Module` trees that every layer of the package may use (importing this does not import torch).

>>> set_submodule(model, "encoder.layer.0.attention.self.query", QLinear.from_float(query, scheme))
>>> params, nonzero = count_params(model)
>>> out = run_batch(model, (input_ids, attention_mask))
>>> batches = take_batches(ctx.data, 8)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from modelpress.core.errors import DataError

if TYPE_CHECKING:
    from torch import nn


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule of `model` called `name` (a dotted path, as `named_modules` gives) by `new`.

    The parent is looked up with `get_submodule` and the last name part set on it, so `"0"` in an
    `nn.Sequential` or an `nn.ModuleList` works as well as an attribute; a name without dots is a
    direct child of `model`. Raises `AttributeError` when the parent path does not exist.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def custom_forward(module: nn.Module, bases: tuple[type, ...]) -> str | None:
    """Why a stand-in built from `module`'s weights would not compute what `module` does: its class derives
    from one of the torch layers `bases` but overrides its `forward` (e.g. a convolution that pads on its
    own). None when `module` is one of `bases` as torch computes it."""
    for base in bases:
        if isinstance(module, base) and type(module).forward is not base.forward:
            return f"{type(module).__name__} overrides {base.__name__}.forward (a stand-in would compute a plain one)"
    return None


def count_params(model: nn.Module) -> tuple[int, int]:
    """(parameters, non-zero parameters) of `model`, each shared or tied tensor counted once.

    Tensors are deduplicated by data pointer, so tied embeddings count once even when they are
    separate `Parameter` objects over the same memory. Quantized layers keep their weights as
    integer buffers (`weight_q`) and float biases as buffers; those count as parameters too (the
    codes of the weight's own shape: the padding of a short last group is not a parameter).

        >>> count_params(nn.Linear(4, 2))
        (10, 10)
    """
    seen: set[tuple[int, int]] = set()
    params = nonzero = 0
    tensors = [(p, p) for p in model.parameters()]  # (tensor identifying the storage, values counted)
    for module in model.modules():
        if hasattr(module, "weight_q"):  # QLinear / QConv: integer weight and float bias buffers
            codes = module.weight_codes() if hasattr(module, "weight_codes") else module.weight_q
            tensors.append((module.weight_q, codes))
            if getattr(module, "bias", None) is not None:
                tensors.append((module.bias, module.bias))
    for p, values in tensors:
        key = (p.data_ptr(), p.numel())
        if p.numel() == 0 or key in seen:
            continue
        seen.add(key)
        params += values.numel()
        nonzero += int(values.detach().count_nonzero())
    return params, nonzero


def take_batches(data: Iterable[Any], n: int) -> list[Any]:
    """The first `n` batches of `data` (any iterable; a generator is consumed only that far)."""
    out: list[Any] = []
    for batch in data:
        out.append(batch)
        if len(out) >= n:
            break
    return out


def first_batch(data: Any) -> tuple[Any, ...] | None:
    """The first batch of list-like data as a tuple of positional inputs (an iterator is not consumed);
    None when `data` is not a non-empty list or tuple."""
    if isinstance(data, (list, tuple)) and data:
        b = data[0]
        return tuple(b) if isinstance(b, (tuple, list)) else (b,)
    return None


def run_hooked(model: nn.Module, handles: list[Any], batches: Iterable[Any]) -> None:
    """Run `batches` through `model` without gradients for the hooks behind `handles`, then remove the hooks
    (also when a batch fails)."""
    import torch

    try:
        with torch.no_grad():
            for batch in batches:
                run_batch(model, batch)
    finally:
        for h in handles:
            h.remove()


def run_batch(model: nn.Module, batch: Any) -> Any:
    """Call `model` on one batch: a tuple/list is positional, a dict is keyword, a tensor is the input."""
    try:
        if isinstance(batch, dict):
            return model(**batch)
        if isinstance(batch, (tuple, list)):
            return model(*batch)
        return model(batch)
    except (TypeError, RuntimeError) as e:
        shape = _describe(batch)
        raise DataError(f"a calibration batch does not fit the model ({shape}): {e}") from None


def _describe(batch: Any) -> str:
    import torch  # only on the error path, for a model that has run: torch is loaded

    if isinstance(batch, torch.Tensor):
        return f"tensor {tuple(batch.shape)}"
    if isinstance(batch, (tuple, list)):
        return ", ".join(_describe(b) for b in batch)
    if isinstance(batch, dict):
        return ", ".join(f"{k}: {_describe(v)}" for k, v in batch.items())
    return type(batch).__name__
