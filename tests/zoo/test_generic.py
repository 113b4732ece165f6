from __future__ import annotations

import pytest
import torch

from modelpress.core import BadInputError, NotAvailableError
from modelpress.zoo.generic import SYMBOLIC_DIM, ShapeEntry


def test_shape_text_parsing_and_batch_replacement():
    entry = ShapeEntry.from_shape_text(["1,3,8,8", "1,5"])
    a, b = entry.example_inputs(4)
    assert a.shape == (4, 3, 8, 8) and b.shape == (4, 5) and a.dtype == torch.float32
    torch.testing.assert_close(entry.example_inputs(4)[0], a)  # deterministic


@pytest.mark.parametrize("text", ["", "1,x", "1,0,3", "-1"])
def test_bad_shape_text(text):
    with pytest.raises(BadInputError, match="--input-shape must be comma-separated positive integers"):
        ShapeEntry.from_shape_text(text)


def test_onnx_specs_fill_symbolic_dims_and_types():
    entry = ShapeEntry.from_onnx(
        [
            ("input_ids", ["batch", "seq"], "tensor(int64)"),
            ("attention_mask", ["batch", "seq"], "tensor(int64)"),
        ]
    )
    ids, mask = entry.example_inputs(3)
    assert ids.shape == mask.shape == (3, SYMBOLIC_DIM) and ids.dtype == torch.int64
    assert bool((mask == 1).all()) and int(ids.max()) < 100
    with pytest.raises(BadInputError, match="has type tensor\\(string\\)"):
        ShapeEntry.from_onnx([("text", [1], "tensor(string)")])


def test_no_metric_and_no_calibration():
    entry = ShapeEntry.from_shape_text("1,4")
    assert entry.has_quality is False
    with pytest.raises(NotAvailableError, match="--like"):
        entry.evaluate(lambda x: x)
    with pytest.raises(NotAvailableError):
        entry.calibration_data()
