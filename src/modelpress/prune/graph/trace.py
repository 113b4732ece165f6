"""Trace a model and find its groups of coupled channels (the dependency graph).

`torch.fx.symbolic_trace` gives the data flow, `ShapeProp` the shapes on one real batch. Every
tensor's channel dim is then followed through the graph: a Conv / Linear / Embedding opens a new
*channel space* (its output channels), elementwise ops and BatchNorm / LayerNorm pass it on, an
addition (residual) or multiplication merges the spaces of its operands (they must be cut alike),
a concatenation along channels lays spaces side by side, and a flatten or reshape spreads each
channel over `repeat` consecutive features (Conv -> Flatten -> Linear). The next Conv / Linear
reads the space through its input channels.

A space is *blocked* (kept whole) when it reaches the model's output, meets a tensor whose
channels cannot be cut (a model input, a raw parameter), or passes an op whose effect on
channels is not known; the reasons are kept for the report. Excluded modules are traced as
leaves and block everything they touch.

    >>> graph = build_graph(model, example_inputs, exclude=("classifier",))
    >>> [g.size for g in graph.groups]
    [16, 32, 64]
"""

from __future__ import annotations

import importlib
import math
import operator
import re
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from modelpress.core.errors import BadInputError
from modelpress.prune.graph.groups import ChannelMap, Segment, SpaceTable
from modelpress.prune.stats import eval_mode

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.LeakyReLU,
    nn.ELU, nn.Mish, nn.Softplus, nn.PReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity,
)  # fmt: skip
_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ELEMENTWISE_FNS = {
    torch.relu, F.relu, F.relu6, F.gelu, F.silu, F.sigmoid, torch.sigmoid, torch.tanh, F.tanh, F.hardswish,
    F.leaky_relu, F.elu, F.mish, F.softplus, F.dropout, torch.abs, torch.exp, torch.neg, torch.clamp,
    torch.square, torch.sqrt, torch.rsqrt,
}  # fmt: skip
_ELEMENTWISE_METHODS = {
    "relu", "sigmoid", "tanh", "contiguous", "clone", "float", "half", "bfloat16", "to", "detach", "abs",
    "exp", "neg", "clamp", "square", "sqrt", "type_as", "relu_", "sigmoid_",
}  # fmt: skip
_SPATIAL_FNS = {F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d, F.adaptive_avg_pool1d,
                F.adaptive_avg_pool2d, F.adaptive_max_pool2d}  # fmt: skip
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div,
           torch.maximum, torch.minimum, operator.iadd, operator.imul}  # fmt: skip
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "mul_"}
_REDUCE_FNS = {torch.mean, torch.sum, torch.amax}
_REDUCE_METHODS = {"mean", "sum", "amax"}


@dataclass
class Group:
    """Channels that must be cut together: one index set applied to every member."""

    space: int
    size: int
    producers: list[str] = field(default_factory=list)  # modules whose output channels are the space
    norms: list[str] = field(default_factory=list)  # BatchNorm / LayerNorm / depthwise convs carrying it
    # (module, first input position, channel of each position from there): a Linear after a flatten
    # sees each channel `repeat` times; a layer after a concatenation sees the space at an offset.
    consumers: list[tuple[str, int, torch.Tensor]] = field(default_factory=list)


@dataclass
class DependencyGraph:
    groups: list[Group]
    blocked: dict[str, list[str]]  # producer module -> why its channels are kept
    consumer_maps: dict[str, ChannelMap]  # module -> what its input channel dim holds (spaces as group ids)

    def group_of(self, module_name: str) -> Group | None:
        for g in self.groups:
            if module_name in g.producers:
                return g
        return None


class _Tracer(torch.fx.Tracer):
    """fx tracer that treats `leaves` as leaf modules and remembers where tracing failed."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__(autowrap_functions=spatial_helpers())
        self.leaves = leaves
        self.stack: list[str] = []
        self.failed_in: list[str] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # transformers' activation classes are elementwise modules like torch's own (see `_Analysis.module`)
        hf_activation = type(m).__module__ == "transformers.activations"
        return qualname in self.leaves or hf_activation or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        self.stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = list(self.stack)
            raise
        finally:
            self.stack.pop()


# Library functions that pad the spatial dims by an amount computed from the input's height and width (a
# number, which fx cannot trace): recorded as one call each, which keeps the channels (dim 1) as they are.
SPATIAL_HELPERS = (
    ("transformers.models.mobilenet_v2.modeling_mobilenet_v2", "apply_tf_padding"),
    ("transformers.models.mobilenet_v1.modeling_mobilenet_v1", "apply_tf_padding"),
)


def spatial_helpers() -> tuple[Any, ...]:
    """The `SPATIAL_HELPERS` of the libraries already imported (a model of theirs is being traced)."""
    out = []
    for module, name in SPATIAL_HELPERS:
        if module.partition(".")[0] in sys.modules:
            try:
                out.append(getattr(importlib.import_module(module), name))
            except (ImportError, AttributeError):
                continue
    return tuple(out)


def _user_frame(exc: BaseException) -> str:
    """`file:line: code` of the innermost frame outside torch (the op that broke tracing)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"


def excluded_modules(model: nn.Module, exclude: tuple[str, ...]) -> set[str]:
    """Names of the outermost modules matching any `exclude` pattern (their insides are not traced)."""
    out: set[str] = set()
    for name, _ in model.named_modules():
        if name and any(re.search(p, name) for p in exclude) and not any(name.startswith(o + ".") for o in out):
            out.add(name)
    return out


def trace(model: nn.Module, leaves: set[str], concrete_args: dict[str, Any] | None = None) -> torch.fx.GraphModule:
    """fx trace of `model` (`concrete_args`: forward arguments fixed to a value); BadInputError naming the module
    and source line that broke tracing."""
    tracer = _Tracer(leaves)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as e:
        where = tracer.failed_in[-1] if tracer.failed_in else ""
        kind = type(model.get_submodule(where)).__name__ if where else type(model).__name__
        line = _user_frame(e)
        hint = (
            f"exclude it (exclude=[{where!r}]) to keep it whole and prune around it"
            if where
            else "prune transformer blocks with heads_ratio / ffn_ratio instead (they need no tracing)"
        )
        raise BadInputError(
            f"cannot trace {type(model).__name__} for channel pruning: the op in "
            f"{repr(where) if where else 'the top-level forward'} ({kind}) broke tracing"
            f"{' at ' + line if line else ''}: {type(e).__name__}: {str(e).splitlines()[0][:200]}; {hint}"
        ) from None
    return torch.fx.GraphModule(tracer.root, graph)


def build_graph(
    model: nn.Module,
    example_inputs: tuple[Any, ...],
    exclude: tuple[str, ...] = (),
    concrete_args: dict[str, Any] | None = None,
) -> DependencyGraph:
    """Trace `model` on `example_inputs` (the leading positional arguments; `concrete_args` fixes others to a
    value) and group its coupled channels."""
    leaves = excluded_modules(model, exclude)
    gm = trace(model, leaves, concrete_args)
    with eval_mode(model), torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs, *(concrete_args or {}).values())  # fixed values are checked
    return _Analysis(gm, leaves).run()


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class _Analysis:
    """Walks the fx graph once, following channel spaces (see the module docstring)."""

    def __init__(self, gm: torch.fx.GraphModule, leaves: set[str]) -> None:
        self.gm, self.leaves = gm, leaves
        self.spaces = SpaceTable()
        self.env: dict[torch.fx.Node, ChannelMap | None] = {}
        self.producers: dict[str, int] = {}  # module -> output space
        self.norms: dict[str, int] = {}
        self.consumers: dict[str, ChannelMap] = {}

    # ------------------------------------------------------------ helpers

    def block(self, cmap: ChannelMap | None, reason: str) -> None:
        if cmap is not None:
            for seg in cmap.segments:
                self.spaces.block(seg.space, reason)

    def fixed(self, width: int, dim: int, reason: str) -> ChannelMap:
        """A channel map for `width` channels that cannot be cut (e.g. concatenated model inputs)."""
        space = self.spaces.new(width)
        self.spaces.block(space, reason)
        return ChannelMap(dim, (Segment(space, 0, width),))

    def new_space(self, module: str, size: int, dim: int) -> ChannelMap:
        if module in self.producers:  # a module called twice: both outputs are the same channels
            return ChannelMap(dim, (Segment(self.producers[module], 0, size),))
        space = self.spaces.new(size)
        self.producers[module] = space
        return ChannelMap(dim, (Segment(space, 0, size),))

    def carry(self, module: str, space: int) -> None:
        """`module` (a norm, a depthwise conv) holds per-channel tensors of `space`; a shared one couples spaces."""
        if module in self.norms:
            self.spaces.union(self.norms[module], space)
        else:
            self.norms[module] = space

    def consume(self, module: str, cmap: ChannelMap | None) -> None:
        if cmap is None:
            return
        if module in self.consumers and not self.spaces.unify(self.consumers[module], cmap):
            self.block(cmap, f"{module} is called on differently composed inputs")
            self.block(self.consumers[module], f"{module} is called on differently composed inputs")
        self.consumers.setdefault(module, cmap)

    def tensor_args(self, node: torch.fx.Node) -> list[torch.fx.Node]:
        out: list[torch.fx.Node] = []
        torch.fx.node.map_arg((node.args, node.kwargs), lambda n: out.append(n) if _shape(n) is not None else None)
        return out

    def block_all(self, node: torch.fx.Node, reason: str) -> None:
        for a in self.tensor_args(node):
            self.block(self.env.get(a), reason)

    # ------------------------------------------------------------ walk

    def run(self) -> DependencyGraph:
        for node in self.gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                self.env[node] = None
            elif node.op == "output":
                self.block_all(node, "reaches the model output")
            elif node.op == "call_module":
                self.env[node] = self.module(node, self.gm.get_submodule(node.target))
            else:
                self.env[node] = self.function(node)
        return self.result()

    def module(self, node: torch.fx.Node, m: nn.Module) -> ChannelMap | None:
        name = str(node.target)
        x = self.env.get(node.args[0]) if node.args and isinstance(node.args[0], torch.fx.Node) else None
        out_shape = _shape(node)
        if name in self.leaves:  # excluded: its inputs are kept whole, its output cannot be cut
            self.block_all(node, f"passes excluded module {name}")
            return None
        if isinstance(m, _CONV):
            if m.groups == 1:
                if x is not None and x.dim != 1:
                    self.block(x, f"{name} reads dim 1 of a tensor whose channels are in dim {x.dim}")
                else:
                    self.consume(name, x)
                return self.new_space(name, m.out_channels, 1)
            if m.groups == m.in_channels == m.out_channels and x is not None and x.dim == 1:
                if len(x.segments) > 1:
                    self.block(x, f"depthwise {name} after a concatenation")
                self.carry(name, x.segments[0].space)
                return x
            self.block(x, f"grouped conv {name} (groups={m.groups})")
            return None
        if isinstance(m, nn.Linear):
            ndim = len(out_shape) if out_shape else 2
            if x is not None and x.dim != ndim - 1:
                self.block(x, f"{name} reads the last dim, channels are in dim {x.dim}")
            else:
                self.consume(name, x)
            return self.new_space(name, m.out_features, ndim - 1)
        if isinstance(m, nn.Embedding):
            return self.new_space(name, m.embedding_dim, len(out_shape) - 1 if out_shape else 2)
        if isinstance(m, _BN) or (isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1):
            want = 1 if isinstance(m, _BN) else (len(out_shape) - 1 if out_shape else -1)
            if x is None:
                return None
            if x.dim != want or len(x.segments) != 1:
                self.block(x, f"{name} normalizes a dim that is not a single channel space")
                return x
            if m.weight is not None or isinstance(m, _BN):  # holds per-channel tensors to cut
                self.carry(name, x.segments[0].space)
            return x
        if isinstance(m, _ELEMENTWISE_MODULES) or type(m).__module__ == "transformers.activations":
            return x  # transformers' activation classes (GELUActivation, ...) are all elementwise
        if isinstance(m, _SPATIAL_MODULES):
            if x is not None and x.dim != 1:
                self.block(x, f"{name} pools over dims that hold channels")
                return None
            return x
        if isinstance(m, nn.Flatten):
            return self.flatten(node, x, m.start_dim, m.end_dim)
        if isinstance(m, nn.Softmax):
            return self.softmax(node, x, m.dim)
        self.block_all(node, f"unsupported module {name} ({type(m).__name__})")
        return None

    def function(self, node: torch.fx.Node) -> ChannelMap | None:
        target = node.target
        method = node.op == "call_method"
        args = self.tensor_args(node)
        maps = [self.env.get(a) for a in args]
        x = maps[0] if maps else None
        name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        if _shape(node) is None:  # shape arithmetic (x.size(0), x.shape[1], ...) carries no channels, but
            self.size_read(node, x)  # a channel dim's width read as a number must not change
            if not _describes(node):  # a tuple of tensors (chunk, split, unbind): where they go is not followed
                self.block_all(node, f"unsupported op {name} ({node.name}) returns several tensors")
            return None
        if (method and target in _ELEMENTWISE_METHODS) or (not method and target in _ELEMENTWISE_FNS):
            return x if len(args) == 1 else self.binary(node, args, maps, name)
        if (method and target in _BINARY_METHODS) or (not method and target in _BINARY):
            return self.binary(node, args, maps, name)
        if not method and (target in _SPATIAL_FNS or target in spatial_helpers()):
            if x is not None and x.dim != 1:
                self.block(x, f"{name} pools over dims that hold channels")
                return None
            return x
        if target in (torch.cat, torch.concat) and not method:
            return self.cat(node, args, maps)
        if target == "flatten" or target is torch.flatten:
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(node, x, int(start), int(end))
        if target in ("view", "reshape") or target is torch.reshape:
            return self.reshape(node, x, name)
        if target in ("permute", "transpose") or target in (torch.permute, torch.transpose):
            return self.permute(node, x)
        if target in (F.softmax, torch.softmax, "softmax"):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            return self.softmax(node, x, dim)
        if (method and target in _REDUCE_METHODS) or (not method and target in _REDUCE_FNS):
            return self.reduce(node, x, name)
        self.block_all(node, f"unsupported op {name} ({node.name})")
        return None

    def size_read(self, node: torch.fx.Node, x: ChannelMap | None) -> None:
        """Block `x`'s channels when `node` reads their number (`x.shape`, `x.size(d)`, `x.numel()`): the model
        computes with it (`y.view(b, t, heads, d // heads)` with `b, t, d = x.shape`), so cutting them would
        change what it computes, typically a view that no longer fits."""
        if x is None or not node.args or not isinstance(node.args[0], torch.fx.Node):
            return
        ndim = len(_shape(node.args[0]) or ())
        target, method = node.target, node.op == "call_method"
        if method and target == "size":
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            dims = _indexed_dims(node, ndim) if dim is None else {int(dim) % ndim}
        elif not method and target is getattr and node.args[1:2] == ("shape",):
            dims = _indexed_dims(node, ndim)
        elif (method and target == "numel") or target is torch.numel:
            dims = {x.dim}
        else:
            return
        if x.dim in dims:
            self.block(x, f"its width is read as a number ({node.name}) that the model computes with")

    # ------------------------------------------------------------ op rules

    def binary(self, node: torch.fx.Node, args: list[torch.fx.Node], maps: list[Any], name: str) -> ChannelMap | None:
        out_shape = _shape(node)
        assert out_shape is not None
        carried = [(a, m) for a, m in zip(args, maps, strict=True) if m is not None]
        if not carried:
            return None
        # Work with dims counted from the end (broadcasting aligns trailing dims).
        ref_arg, ref = carried[0]
        from_end = len(_shape(ref_arg) or ()) - ref.dim
        out_dim = len(out_shape) - from_end
        result = ChannelMap(out_dim, ref.segments)
        for a, m in zip(args, maps, strict=True):
            shp = _shape(a) or ()
            if m is None:
                size = shp[len(shp) - from_end] if len(shp) >= from_end else 1
                if size != 1:
                    self.block(ref, f"{name} ({node.name}) combines the channels with a tensor that cannot be cut")
                continue
            if len(shp) - m.dim != from_end or not self.spaces.unify(ref, m):
                self.block(ref, f"{name} ({node.name}) combines differently laid out channels")
                self.block(m, f"{name} ({node.name}) combines differently laid out channels")
        return result

    def cat(self, node: torch.fx.Node, args: list[torch.fx.Node], maps: list[Any]) -> ChannelMap | None:
        out_shape = _shape(node)
        assert out_shape is not None
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        dim = int(dim) % len(out_shape)
        if all(m is None for m in maps):
            return None
        if any(m is not None and m.dim != dim for m in maps):
            # concatenated along another dim: all parts must share their channels
            carried = [m for m in maps if m is not None]
            for m in carried[1:]:
                if m.dim != carried[0].dim or not self.spaces.unify(carried[0], m):
                    self.block(m, f"cat ({node.name}) of differently laid out channels")
                    self.block(carried[0], f"cat ({node.name}) of differently laid out channels")
            return carried[0]
        segments: list[Segment] = []
        offset = 0
        for a, m in zip(args, maps, strict=True):
            if m is None:
                width = (_shape(a) or ())[dim]
                m = self.fixed(width, dim, f"concatenated with a tensor that cannot be cut ({a.name})")
            for seg in m.segments:
                segments.append(Segment(seg.space, offset + seg.offset, seg.size, seg.repeat))
            offset += m.width
        return ChannelMap(dim, tuple(segments))

    def flatten(self, node: torch.fx.Node, x: ChannelMap | None, start: int, end: int) -> ChannelMap | None:
        in_shape = _shape(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None
        if x is None or in_shape is None:
            return None
        n = len(in_shape)
        start, end = start % n, end % n
        d = x.dim
        if d < start:
            return x
        if d > end:
            return ChannelMap(d - (end - start), x.segments)
        if math.prod(in_shape[start:d]) != 1:
            self.block(x, f"flatten ({node.name}) interleaves channels with leading dims {in_shape[start:d]}")
            return None
        rep = math.prod(in_shape[d + 1 : end + 1])
        return ChannelMap(start, tuple(Segment(s.space, s.offset * rep, s.size, s.repeat * rep) for s in x.segments))

    def reshape(self, node: torch.fx.Node, x: ChannelMap | None, name: str) -> ChannelMap | None:
        si = _shape(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None
        so = _shape(node)
        if x is None or si is None or so is None:
            return None
        d = x.dim
        if so[: d + 1] == si[: d + 1]:
            return ChannelMap(d, x.segments)
        if so[:d] == si[:d] and len(so) == d + 1 and so[d] == math.prod(si[d:]):
            rep = math.prod(si[d + 1 :])
            return ChannelMap(d, tuple(Segment(s.space, s.offset * rep, s.size, s.repeat * rep) for s in x.segments))
        if d == len(si) - 1 and so[-1] == si[-1]:
            return ChannelMap(len(so) - 1, x.segments)
        self.block(x, f"{name} ({node.name}) reshapes the channel dim: {list(si)} -> {list(so)}")
        return None

    def permute(self, node: torch.fx.Node, x: ChannelMap | None) -> ChannelMap | None:
        if x is None:
            return None
        si = _shape(node.args[0]) or ()
        n = len(si)
        rest = [a for a in node.args[1:]]
        if node.target in ("transpose", torch.transpose):
            a, b = (int(v) % n for v in rest[:2])
            d = b if x.dim == a else a if x.dim == b else x.dim
        else:
            perm = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
            d = [int(p) % n for p in perm].index(x.dim)
        return ChannelMap(d, x.segments)

    def softmax(self, node: torch.fx.Node, x: ChannelMap | None, dim: Any) -> ChannelMap | None:
        if x is None:
            return None
        n = len(_shape(node) or ())
        if dim is None or int(dim) % n == x.dim:
            self.block(x, f"softmax ({node.name}) over the channel dim")
            return None
        return x

    def reduce(self, node: torch.fx.Node, x: ChannelMap | None, name: str) -> ChannelMap | None:
        if x is None:
            return None
        si = _shape(node.args[0]) or ()
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = bool(node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
        if dims is None:
            self.block(x, f"{name} ({node.name}) reduces over every dim, channels included")
            return None
        dims = [int(d) % len(si) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
        if x.dim in dims:
            self.block(x, f"{name} ({node.name}) reduces over the channel dim")
            return None
        return ChannelMap(x.dim if keepdim else x.dim - sum(d < x.dim for d in dims), x.segments)

    # ------------------------------------------------------------ result

    def result(self) -> DependencyGraph:
        roots: dict[int, Group] = {}
        blocked: dict[str, list[str]] = {}
        for module, space in self.producers.items():
            root = self.spaces.find(space)
            reasons = self.spaces.reasons(root)
            if reasons:
                blocked[module] = reasons
                continue
            roots.setdefault(root, Group(root, self.spaces.size(root))).producers.append(module)
        for module, space in self.norms.items():
            root = self.spaces.find(space)
            if root in roots:
                roots[root].norms.append(module)
        for module, cmap in self.consumers.items():
            for seg in cmap.segments:
                root = self.spaces.find(seg.space)
                if root in roots:
                    roots[root].consumers.append((module, seg.offset, seg_index(seg)))
        rooted = {
            module: ChannelMap(
                cmap.dim, tuple(Segment(self.spaces.find(s.space), s.offset, s.size, s.repeat) for s in cmap.segments)
            )
            for module, cmap in self.consumers.items()
        }
        return DependencyGraph(list(roots.values()), blocked, rooted)


# What a non-tensor node may read of a tensor without moving its channels: its size, type, place.
_DESCRIBING_METHODS = {"size", "dim", "numel", "nelement", "get_device", "is_floating_point", "is_contiguous", "type"}
_DESCRIBING_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "T"}


def _describes(node: torch.fx.Node) -> bool:
    """Whether a node without tensor output only describes its input (`x.shape`, `x.dtype`, `x.size(1)`)."""
    if node.op == "call_method":
        return node.target in _DESCRIBING_METHODS
    if node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _DESCRIBING_ATTRS
    return (
        node.target in (torch.numel, len)
        or node.op != "call_function"
        or not any(isinstance(a, torch.fx.Node) and _shape(a) is not None for a in node.args)
    )


def _indexed_dims(node: torch.fx.Node, ndim: int) -> set[int]:
    """The dims of a size (`x.shape`, `x.size()`) that `node`'s users read: an int or slice index each; every
    dim when the size is used whole (passed on, compared, multiplied out)."""
    dims: set[int] = set()
    for user in node.users:
        index = user.args[1] if user.op == "call_function" and user.target is operator.getitem else None
        if isinstance(index, int):
            dims.add(index % ndim)
        elif isinstance(index, slice) and all(isinstance(v, int | None) for v in (index.start, index.stop, index.step)):
            dims.update(range(ndim)[index])
        else:
            return set(range(ndim))
    return dims


def seg_index(seg: Segment) -> torch.Tensor:
    """(positions, channel) index: input position offset + c * repeat + r belongs to channel c."""
    return torch.arange(seg.size).repeat_interleave(seg.repeat)
