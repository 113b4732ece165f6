"""Helpers on `torch.nn.Module` trees that every layer of the package may use (torch is not imported here).

>>> set_submodule(model, "encoder.layer.0.attention.self.query", QLinear.from_float(query, scheme))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
