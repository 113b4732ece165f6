"""Inputs for a model that is not in the zoo: from its ONNX graph, its torch.export program, or a shape.

Such a model can be timed and sized, but it has no task metric (`has_quality = False`); give
it a zoo entry's inputs and metric instead with `modelpress bench MODEL --like minilm`.

    >>> entry = ShapeEntry.from_shape_text("1,3,32,32")
    >>> entry.example_inputs(8)[0].shape
    torch.Size([8, 3, 32, 32])
"""

from __future__ import annotations

from pathlib import Path

import torch

from modelpress.core.errors import BadInputError, NotAvailableError
from modelpress.core.report import Quality
from modelpress.zoo.base import ModelFn, ZooEntry

SYMBOLIC_DIM = 128  # size of a named (dynamic) non-batch dimension, e.g. a token sequence
_ONNX_DTYPES = {
    "tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
    "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(bool)": torch.bool,
}  # fmt: skip


class ShapeEntry(ZooEntry):
    """Synthetic inputs of given shapes; the first dimension is the batch. Timing only, no metric."""

    task = "unknown"
    has_quality = False

    def __init__(self, shapes: list[tuple[int, ...]], dtypes: list[torch.dtype], names: list[str] | None = None):
        self.name = "shape"
        self.shapes = shapes
        self.dtypes = dtypes
        self.input_names = tuple(names or (f"input_{i}" for i in range(len(shapes))))

    @classmethod
    def from_shape_text(cls, texts: str | list[str]) -> ShapeEntry:
        """Parse `--input-shape 1,3,32,32` (repeat the option for several float inputs)."""
        shapes = []
        for text in [texts] if isinstance(texts, str) else texts:
            try:
                shape = tuple(int(s) for s in text.split(","))
            except ValueError:
                shape = ()
            if not shape or any(d < 1 for d in shape):
                raise BadInputError(f"--input-shape must be comma-separated positive integers, got {text!r}")
            shapes.append(shape)
        return cls(shapes, [torch.float32] * len(shapes))

    @classmethod
    def from_onnx(cls, specs: list[tuple[str, list[int | str | None], str]]) -> ShapeEntry:
        """From `OnnxModel.input_specs()`: named (dynamic) dims get `SYMBOLIC_DIM`, except the batch."""
        shapes, dtypes, names = [], [], []
        for name, shape, type_name in specs:
            if type_name not in _ONNX_DTYPES:
                raise BadInputError(f"ONNX input {name!r} has type {type_name}; supported: {', '.join(_ONNX_DTYPES)}")
            dims = [d if isinstance(d, int) and d > 0 else SYMBOLIC_DIM for d in shape]
            shapes.append(tuple([1, *dims[1:]]) if dims else ())
            dtypes.append(_ONNX_DTYPES[type_name])
            names.append(name)
        return cls(shapes, dtypes, names)

    @classmethod
    def from_tensors(cls, tensors: tuple[torch.Tensor, ...]) -> ShapeEntry:
        return cls([tuple(t.shape) for t in tensors], [t.dtype for t in tensors])

    def load(self, cache_dir: Path | None = None) -> torch.nn.Module:
        raise NotAvailableError("a shape-only entry has no model of its own")

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(0)
        out = []
        for shape, dtype, name in zip(self.shapes, self.dtypes, self.input_names, strict=True):
            shape = (batch_size, *shape[1:]) if shape else shape
            if dtype.is_floating_point:
                out.append(torch.randn(shape, generator=gen).to(dtype))
            elif "mask" in name or dtype == torch.bool:
                out.append(torch.ones(shape, dtype=dtype))
            else:  # token ids and other integer inputs: small valid indices
                out.append(torch.randint(0, 100, shape, generator=gen, dtype=dtype))
        return tuple(out)

    def calibration_data(self, n: int = 64, batch_size: int = 8) -> list[tuple[torch.Tensor, ...]]:
        raise NotAvailableError("synthetic inputs are not calibration data; pass real data with --data")

    def evaluate(self, model: ModelFn, data: Path | None = None) -> Quality:
        raise NotAvailableError("this model has no task metric; use --like ZOO_NAME to borrow one")
