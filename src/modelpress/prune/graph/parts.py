"""The dependency graph of a model `torch.fx` cannot trace whole, assembled from the sub-modules that trace.

Hugging Face models break a whole-model trace (a data-dependent check of the inputs, mask construction),
but most of their sub-modules are plain data flow: a ResNet stage, a ConvNeXt block. The model runs once
on a real batch with a hook on every module recording what it was called with; then, from the top, each
child called exactly once with tensors as its positional arguments (and anything but tensors as keyword
arguments, fixed as they were: `output_hidden_states=False`) is traced and analysed on its own inputs, and
a child that does not trace is visited in turn. A part's inputs and outputs are kept whole (nothing outside
the trace is known), so only the channels inside a part are cut: a residual block's inner widths, an
inverted bottleneck's expansion. Module names and channel spaces are renumbered into one graph.

A group holding a parameter that another module also uses (tied weights) is kept whole: the other user
is outside the trace.

    >>> graph, traced = build_graph_by_parts(model, example_inputs)
    >>> traced          # the sub-modules that were traced
    ['resnet.encoder.stages.0', 'resnet.encoder.stages.1']
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch
from torch import nn

from modelpress.core.errors import BadInputError
from modelpress.prune.graph.groups import ChannelMap, Segment
from modelpress.prune.graph.trace import DependencyGraph, Group, build_graph, excluded_modules
from modelpress.prune.stats import eval_mode


def _record_calls(model: nn.Module, example: tuple[Any, ...]) -> dict[str, list[tuple[tuple, dict]]]:
    """module name -> the (args, kwargs) of each of its calls while `model` runs on `example`."""
    calls: dict[str, list[tuple[tuple, dict]]] = {}

    def hook(name: str):  # noqa: ANN202
        def record(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            calls.setdefault(name, []).append((args, kwargs))

        return record

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in model.named_modules() if n]
    try:
        with eval_mode(model), torch.no_grad():
            model(*example)
    finally:
        for h in handles:
            h.remove()
    return calls


def _traceable_call(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """The concrete arguments that fix a call's non-tensor arguments, or None if it cannot be traced as a part
    (a tensor passed by keyword, a non-tensor positional argument, a `*args` forward)."""
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        return None
    if any(isinstance(v, torch.Tensor) for v in kwargs.values()):
        return None
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params) or len(args) > len(params):
        return None
    concrete: dict[str, Any] = {}
    for p in params[len(args) :]:
        if p.name in kwargs:
            concrete[p.name] = kwargs[p.name]
        elif p.default is not p.empty:
            concrete[p.name] = p.default
        else:
            return None
    return concrete


def _prefixed(graph: DependencyGraph, prefix: str, base: int) -> tuple[DependencyGraph, int]:
    """`graph` with module names under `prefix` and channel spaces from `base` on; the next free space id."""
    spaces = [g.space for g in graph.groups]
    spaces += [s.space for cmap in graph.consumer_maps.values() for s in cmap.segments]
    top = base + (max(spaces) + 1 if spaces else 0)
    groups = [
        Group(
            base + g.space,
            g.size,
            [prefix + n for n in g.producers],
            [prefix + n for n in g.norms],
            [(prefix + n, offset, idx) for n, offset, idx in g.consumers],
        )
        for g in graph.groups
    ]
    maps = {
        prefix + n: ChannelMap(cmap.dim, tuple(Segment(base + g.space, g.offset, g.size, g.repeat) for g in cm))
        for n, cmap in graph.consumer_maps.items()
        for cm in (cmap.segments,)
    }
    blocked = {prefix + n: r for n, r in graph.blocked.items()}
    return DependencyGraph(groups, blocked, maps), top


def _tied_modules(model: nn.Module) -> set[str]:
    """Names of the modules holding a parameter that another module holds too."""
    owners: dict[int, set[str]] = {}
    for name, m in model.named_modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(name)
    return {n for names in owners.values() if len(names) > 1 for n in names}


def build_graph_by_parts(
    model: nn.Module, example_inputs: tuple[Any, ...], exclude: tuple[str, ...] = ()
) -> tuple[DependencyGraph, list[str]]:
    """The dependency graph of the sub-modules of `model` that trace (see the module docstring), and their names."""
    calls = _record_calls(model, example_inputs)
    skipped = excluded_modules(model, exclude)
    tied = _tied_modules(model)
    merged = DependencyGraph([], {}, {})
    traced: list[str] = []
    base = 0

    def visit(prefix: str, module: nn.Module) -> None:
        nonlocal base
        for child_name, child in module.named_children():
            name = prefix + child_name
            if name in skipped or not any(True for _ in child.parameters()):
                continue
            records = calls.get(name, [])
            if len(records) > 1:
                continue  # called more than once: a part's boundary would not hold
            concrete = _traceable_call(child, *records[0]) if records else None
            if concrete is None or not list(child.children()):
                visit(name + ".", child)
                continue
            inner = tuple(f"^{re.escape(n[len(name) + 1 :])}$" for n in skipped if n.startswith(name + "."))
            try:
                graph = build_graph(child, records[0][0], inner, concrete or None)
            except (BadInputError, RuntimeError, TypeError, ValueError, AttributeError, AssertionError):
                visit(name + ".", child)
                continue
            part, base = _prefixed(graph, name + ".", base)
            merged.groups.extend(part.groups)
            merged.blocked.update(part.blocked)
            merged.consumer_maps.update(part.consumer_maps)
            traced.append(name)

    visit("", model)
    for group in list(merged.groups):
        shared = [n for n in (*group.producers, *group.norms, *(c[0] for c in group.consumers)) if n in tied]
        if shared:
            merged.groups.remove(group)
            for producer in group.producers:
                merged.blocked[producer] = [f"{shared[0]} shares a parameter with another module (tied weights)"]
    return merged, traced
