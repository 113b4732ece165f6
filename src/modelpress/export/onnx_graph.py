"""What the ONNX export modules share: names, errors, the parity check, and the tools of a graph rewrite.

The bottom of the ONNX export: `onnx_float` (the float export), `onnx_tables`, `onnx_int8` and `onnx_nbits`
(the integer rewrites), `onnx_quant` (the integer export) and `onnx` (the entry point) build on this module
and it on none of them. The onnx library is imported only where a rewrite runs, so that importing the
errors (as `export.inductor` does) stays cheap.

    >>> parity = check_parity(model, "out/model.onnx", entry.example_inputs(4))   # max_abs, mean_cosine
    >>> b = NodeBuilder(proto.graph); scale = b.const("w_scale", scales)          # a rewrite's new initializer
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from modelpress.core.errors import BadInputError, ModelpressError
from modelpress.core.numerics import exactly
from modelpress.core.runtime import OnnxModel
from modelpress.primitives.tokens import real_positions

# fp32 parity gate: max abs difference to torch, relative to the output's scale when that exceeds 1. An
# optimized graph that drifts more than this falls back to the plain one (MiniLM fused: 5.5e-5).
PARITY_ATOL = 1e-4
MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib operators (Attention, MatMulNBits, QAttention, ...)
# ORT session settings our graphs are measured with, stored in the model's metadata for runtimes to apply.
# Denormals as zero: the masked attention logits' exp() lands in denormals, which makes softmax ~6x slower.
SESSION_HINTS = {"session.set_denormal_as_zero": "1"}
SESSION_HINTS_KEY = "modelpress.ort_session_config"

__all__ = [
    "PARITY_ATOL", "MS_DOMAIN", "SESSION_HINTS", "SESSION_HINTS_KEY",
    "ExportWarning", "ExportError", "ArtifactsRefused",
    "add_session_hints", "check_parity", "compare_outputs", "real_positions", "replace_nodes",
    "NodeBuilder", "weight_key", "as_tuple", "first_output",
]  # fmt: skip


class ExportWarning(UserWarning):
    """A layer exported in a weaker form than the eager model runs it (e.g. float compute); reports list these."""


class ExportError(ModelpressError):
    """The model cannot be exported, or the exported graph does not compute what the model computes."""


class ArtifactsRefused(ExportError, BadInputError):
    """Every artifact a recipe asks for was refused for this model (e.g. by its parity gate): the run gives
    nothing faithful to write, which the CLI reports as a refusal (exit 2) naming each reason."""


def add_session_hints(proto: Any) -> None:
    """Record `SESSION_HINTS` (JSON) in the model's metadata."""
    import json

    for prop in proto.metadata_props:
        if prop.key == SESSION_HINTS_KEY:
            prop.value = json.dumps(SESSION_HINTS)
            return
    proto.metadata_props.add(key=SESSION_HINTS_KEY, value=json.dumps(SESSION_HINTS))


# ---------------------------------------------------------------- parity


@exactly
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
    inputs = as_tuple(inputs)
    with torch.inference_mode():
        expected = first_output(torch_fn(*inputs)).float()
    return compare_outputs(expected, run_onnx(Path(onnx_path), inputs, threads), real_positions(inputs, expected))


def run_onnx(path: Path, inputs: tuple[torch.Tensor, ...], threads: int | None = None) -> torch.Tensor:
    """The first output of the ONNX model at `path` on `inputs`, as float32."""
    return first_output(OnnxModel(path, threads=threads)(*inputs)).float()


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


def as_tuple(x: Any) -> tuple[Any, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def first_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


# ---------------------------------------------------------------- graph rewrite


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


class NodeBuilder:
    """Unique names, new initializers and nodes for a rewrite of `graph`."""

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        self.count = 0

    def name(self, stem: str) -> str:
        self.count += 1
        return f"q{self.count}_{stem}"

    def const(self, stem: str, value: Any) -> str:
        from onnx import numpy_helper

        name = self.name(stem)
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, domain: str = "", **attrs: Any) -> Any:
        from onnx import helper

        outs = [self.name(op.lower()) for _ in range(n_out)]
        return helper.make_node(op, inputs, outs, domain=domain or None, **attrs)


def weight_key(array: np.ndarray) -> bytes:
    """A float32 array's identity by value (and shape): how a rewrite finds a layer's weight in the graph."""
    a = np.ascontiguousarray(array, dtype=np.float32)
    return hashlib.sha1(a.tobytes()).digest() + str(a.shape).encode()
