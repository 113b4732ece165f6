"""`mtcnn-pnet`, `mtcnn-rnet`, `mtcnn-onet`: the MTCNN face-detection cascade with facenet-pytorch's weights.

The three networks are defined here (conv + PReLU + max-pool, the published MTCNN layout) and load
the plain state dicts that ship in the `facenet-pytorch` package (`facenet_pytorch/data/*.pt`,
read with `torch.load(weights_only=True)`); the package itself is never imported (its `__init__`
needs torchvision). Inputs are RGB crops scaled as `(pixel - 127.5) / 128`.

Each net's task metric is face / non-face accuracy on scikit-image's `lfw_subset` (100 face and 100
non-face 25x25 patches, resized to the net's input: 12, 24 or 48 pixels) at the cascade's threshold
for that stage. The patches are split per class: 20 + 20 calibration, 20 + 20 validation, 60 + 60 test.
`detect_faces` runs the whole cascade (image pyramid -> P-Net -> NMS -> R-Net -> O-Net) on a photo
with any callables standing in for the nets, so an exported or compressed form is measured on frames.

    >>> entry = get_entry("mtcnn-onet")
    >>> entry.evaluate(entry.load()).value  # face / non-face test accuracy
    >>> nets = load_mtcnn()
    >>> detect_faces(frame_rgb_uint8, *nets).boxes  # (N, 4) x1, y1, x2, y2 in pixels
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from modelpress.core.errors import DataError, ModelLoadError
from modelpress.core.report import Quality
from modelpress.zoo.base import ModelFn, ZooEntry, register_entry

INSTALL = "pip install --no-deps facenet-pytorch==2.6.0"
THRESHOLDS = (0.6, 0.7, 0.7)  # face probability a candidate needs to pass P-Net, R-Net, O-Net
MIN_FACE = 20  # pixels: the smallest face the image pyramid looks for
PYRAMID_FACTOR = 0.709
# Per-class index ranges into lfw_subset's 100 faces and 100 non-faces.
_SPLITS = {"calibration": (0, 20), "val": (20, 40), "test": (40, 100)}


def _prelu_conv(cin: int, cout: int, k: int) -> tuple[nn.Conv2d, nn.PReLU]:
    return nn.Conv2d(cin, cout, k), nn.PReLU(cout)


class PNet(nn.Module):
    """Proposal net, fully convolutional: [B, 3, H, W] -> (face prob [B, 2, h, w], box offsets [B, 4, h, w]).

    One output cell per 12x12 window at stride 2.
    """

    input_size = 12

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = _prelu_conv(3, 10, 3)
        self.pool1 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv2, self.prelu2 = _prelu_conv(10, 16, 3)
        self.conv3, self.prelu3 = _prelu_conv(16, 32, 3)
        self.conv4_1 = nn.Conv2d(32, 2, 1)
        self.conv4_2 = nn.Conv2d(32, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))
        return F.softmax(self.conv4_1(x), dim=1), self.conv4_2(x)


class RNet(nn.Module):
    """Refinement net: [B, 3, 24, 24] -> (face prob [B, 2], box offsets [B, 4])."""

    input_size = 24

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = _prelu_conv(3, 28, 3)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = _prelu_conv(28, 48, 3)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = _prelu_conv(48, 64, 2)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.prelu3(self.conv3(x))  # (B, 64, 3, 3)
        x = x.permute(0, 3, 2, 1).flatten(1)  # (B, 576) in the (W, H, C) order the weights were trained in
        x = self.prelu4(self.dense4(x))
        return F.softmax(self.dense5_1(x), dim=1), self.dense5_2(x)


class ONet(nn.Module):
    """Output net: [B, 3, 48, 48] -> (face prob [B, 2], box offsets [B, 4], landmarks [B, 10])."""

    input_size = 48

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = _prelu_conv(3, 32, 3)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2, self.prelu2 = _prelu_conv(32, 64, 3)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3, self.prelu3 = _prelu_conv(64, 64, 3)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4, self.prelu4 = _prelu_conv(64, 128, 2)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))  # (B, 128, 3, 3)
        x = self.prelu5(self.dense5(x.permute(0, 3, 2, 1).flatten(1)))  # (B, 1152) -> (B, 256)
        return F.softmax(self.dense6_1(x), dim=1), self.dense6_2(x), self.dense6_3(x)


_NETS: dict[str, type[nn.Module]] = {"pnet": PNet, "rnet": RNet, "onet": ONet}


def weights_path(net: str) -> Path:
    """The state dict file of `net` ("pnet", "rnet", "onet") inside the installed facenet-pytorch."""
    spec = importlib.util.find_spec("facenet_pytorch")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"mtcnn-{net} needs the MTCNN weights of facenet-pytorch; install them with `{INSTALL}`")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / f"{net}.pt"
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing from the installed facenet-pytorch; reinstall it with `{INSTALL}`")
    return path


def load_net(net: str) -> nn.Module:
    """One MTCNN net ("pnet", "rnet", "onet") with facenet-pytorch's weights, fp32, in eval mode."""
    path = weights_path(net)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from None
    model = _NETS[net]()
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ModelLoadError(f"{path} does not hold {net} weights: {str(e).splitlines()[0]}") from None
    return model.eval()


def load_mtcnn() -> tuple[nn.Module, nn.Module, nn.Module]:
    """(P-Net, R-Net, O-Net), fp32 eager."""
    return load_net("pnet"), load_net("rnet"), load_net("onet")


# ---------------------------------------------------------------- data


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels in [0, 255] -> the nets' input scale, (p - 127.5) / 128."""
    return (pixels - 127.5) * 0.0078125


@lru_cache(maxsize=1)
def _lfw() -> np.ndarray:
    import skimage.data

    return skimage.data.lfw_subset().astype(np.float32)  # (200, 25, 25) grey in [0, 1]: 100 faces, 100 not


def face_patches(split: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """lfw_subset patches of `split` as net inputs [N, 3, size, size] and labels [N] (1 face, 0 not)."""
    if split not in _SPLITS:
        raise DataError(f"split must be one of {', '.join(_SPLITS)}, got {split!r}")
    lo, hi = _SPLITS[split]
    images = _lfw()
    idx = np.r_[lo:hi, 100 + lo : 100 + hi]
    x = torch.from_numpy(images[idx])[:, None] * 255.0  # (N, 1, 25, 25)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.from_numpy((idx < 100).astype(np.int64))
    return normalize(x), y


def _face_prob(out: Any) -> torch.Tensor:
    """Face probability [N] from whatever a net callable returns (tuple/list of tensors or arrays)."""
    probs = out[0] if isinstance(out, tuple | list) else out
    probs = torch.as_tensor(np.asarray(probs)) if not isinstance(probs, torch.Tensor) else probs
    return probs.reshape(len(probs), 2, -1)[:, 1].mean(dim=-1)  # P-Net at its input size: one cell


def face_accuracy(model: ModelFn, split: str, size: int, threshold: float) -> Quality:
    """Face / non-face accuracy of `model` on lfw_subset's `split`, a face being prob >= `threshold`."""
    x, y = face_patches(split, size)
    with torch.no_grad():
        prob = _face_prob(model(x)).float()
    pred = (prob >= threshold).long()
    faces, others = y == 1, y == 0
    details = {
        "n": len(y),
        "split": split,
        "threshold": threshold,
        "face_recall": float((pred[faces] == 1).float().mean()),
        "non_face_rejection": float((pred[others] == 0).float().mean()),
    }
    return Quality(name="face accuracy", value=float((pred == y).float().mean()), details=details)


def faces_grid(side: int = 512, cell: int = 125, face: int = 100) -> np.ndarray:
    """A side x side RGB frame of lfw_subset test faces (4 x 4 at the defaults) on grey: many faces at once."""
    x, y = face_patches("test", face)
    pixels = (x[y == 1] / 0.0078125 + 127.5).clamp(0, 255)  # back to [0, 255], (60, 3, face, face)
    frame = torch.full((3, side, side), 128.0)
    per_row = side // cell
    for i in range(per_row * per_row):
        top, left = (cell - face) // 2 + (i // per_row) * cell, (cell - face) // 2 + (i % per_row) * cell
        frame[:, top : top + face, left : left + face] = pixels[i]
    return frame.round().to(torch.uint8).permute(1, 2, 0).numpy()


def frames() -> dict[str, np.ndarray]:
    """Test frames (RGB uint8): scikit-image's astronaut and camera (one face each), the faces grid
    (16 faces), all 512 x 512, and three photos without a face (coffee, chelsea, rocket)."""
    import skimage.data

    def rgb(a: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a[..., :3])

    photos = {name: rgb(getattr(skimage.data, name)()) for name in ("astronaut", "camera")}
    others = {name: rgb(getattr(skimage.data, name)()) for name in ("coffee", "chelsea", "rocket")}
    return {**photos, "faces-grid": faces_grid(), **others}


# ---------------------------------------------------------------- the cascade


@dataclass
class Detections:
    """Faces found in one frame: boxes [N, 4] (x1, y1, x2, y2), scores [N], landmarks [N, 5, 2]."""

    boxes: torch.Tensor
    scores: torch.Tensor
    landmarks: torch.Tensor
    candidates: tuple[int, int, int] = (0, 0, 0)  # boxes entering R-Net, O-Net, and kept


def box_iou(a: torch.Tensor, b: torch.Tensor, mode: str = "union") -> torch.Tensor:
    """Pairwise overlap [len(a), len(b)] of x1y1x2y2 boxes: IoU, or intersection over the smaller area."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:4], b[None, :, 2:4])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area_a = (a[:, 2:4] - a[:, :2]).clamp(min=0).prod(dim=-1)
    area_b = (b[:, 2:4] - b[:, :2]).clamp(min=0).prod(dim=-1)
    if mode == "min":
        return inter / torch.minimum(area_a[:, None], area_b[None, :]).clamp(min=1e-9)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, mode: str = "union") -> torch.Tensor:
    """Greedy non-maximum suppression: indices of the kept boxes, highest score first."""
    order = scores.argsort(descending=True)
    overlap = (box_iou(boxes[order], boxes[order], mode) > threshold).numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    for i in range(len(order)):
        if not suppressed[i]:
            keep.append(i)
            suppressed |= overlap[i]
    return order[torch.as_tensor(keep, dtype=torch.long)]


def _outputs(out: Any) -> list[torch.Tensor]:
    seq = out if isinstance(out, tuple | list) else (out,)
    return [o if isinstance(o, torch.Tensor) else torch.from_numpy(np.asarray(o)) for o in seq]


def _square(boxes: torch.Tensor) -> torch.Tensor:
    """Grow each box to a square around its centre (the next net's input is square)."""
    wh = boxes[:, 2:4] - boxes[:, :2]
    side = wh.max(dim=1, keepdim=True).values
    lt = boxes[:, :2] + wh / 2 - side / 2
    return torch.cat([lt, lt + side], dim=1)


def _regress(boxes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Apply the nets' box offsets (fractions of the box size)."""
    wh = (boxes[:, 2:4] - boxes[:, :2]).repeat(1, 2)
    return boxes + offsets * wh


def _crops(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crops of `boxes` (clipped to the frame) resized to size x size, normalized: [N, 3, size, size]."""
    _, h, w = image.shape
    out = []
    for x1, y1, x2, y2 in boxes.round().long().tolist():
        x1, y1, x2, y2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
        crop = image[:, y1:y2, x1:x2] if x2 > x1 and y2 > y1 else image.new_zeros(3, 1, 1)
        out.append(_resize(crop[None], [size, size]))
    return normalize(torch.cat(out).float())


def _resize(image: torch.Tensor, size: list[int]) -> torch.Tensor:
    """uint8 [B, 3, H, W] resized as an image library does (bilinear, antialiased when shrinking).

    On uint8 this takes torch's vectorized image path: ~9x faster than `mode="area"` on float for a
    512 x 512 pyramid, which would otherwise cost as much as the nets.
    """
    return F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)


def _pyramid(h: int, w: int, min_face: int) -> list[float]:
    scale, side, scales = 12.0 / min_face, min(h, w) * 12.0 / min_face, []
    while side >= 12:
        scales.append(scale)
        scale, side = scale * PYRAMID_FACTOR, side * PYRAMID_FACTOR
    return scales


def _proposals(image: torch.Tensor, pnet: ModelFn, min_face: int, threshold: float) -> torch.Tensor:
    """P-Net over the image pyramid: candidate boxes [N, 5] (x1, y1, x2, y2, score), regressed and squared."""
    _, h, w = image.shape
    found = []
    for scale in _pyramid(h, w, min_face):
        # Even sizes: the ceil-mode pooling then needs no partial window, so one P-Net program with
        # dynamic (even) height and width serves every level (AOTInductor), and eager runs it identically.
        size = [n + n % 2 for n in (int(h * scale + 1), int(w * scale + 1))]
        prob, reg = _outputs(pnet(normalize(_resize(image[None], size).float())))[:2]  # (1, 2, h', w'), (1, 4, h', w')
        ys, xs = torch.nonzero(prob[0, 1] >= threshold, as_tuple=True)
        if len(ys) == 0:
            continue
        cells = torch.stack([xs, ys], dim=1).float()
        lt, rb = (2 * cells + 1) / scale, (2 * cells + 12) / scale  # 12x12 windows at stride 2
        boxes = torch.cat([lt, rb, prob[0, 1, ys, xs, None], reg[0, :, ys, xs].T], dim=1)  # (n, 9)
        found.append(boxes[nms(boxes[:, :4], boxes[:, 4], 0.5)])
    if not found:
        return torch.zeros(0, 5)
    boxes = torch.cat(found)
    boxes = boxes[nms(boxes[:, :4], boxes[:, 4], 0.7)]
    return torch.cat([_square(_regress(boxes[:, :4], boxes[:, 5:9])), boxes[:, 4:5]], dim=1)


def detect_faces(
    frame: np.ndarray | torch.Tensor,
    pnet: ModelFn,
    rnet: ModelFn,
    onet: ModelFn,
    min_face: int = MIN_FACE,
    thresholds: tuple[float, float, float] = THRESHOLDS,
) -> Detections:
    """Faces in one RGB frame [H, W, 3] (uint8, or float in [0, 255]) by the MTCNN cascade.

    The nets are any callables with the nets' forward signatures (eager, ONNX Runtime, `.pt2`): P-Net
    is called on every pyramid level at batch 1, R-Net and O-Net once each on all candidates.
    """
    image = torch.as_tensor(np.asarray(frame)).permute(2, 0, 1)  # (3, H, W)
    if image.dtype != torch.uint8:
        image = image.float().round().clamp(0, 255).to(torch.uint8)
    empty = Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, 5, 2))
    boxes = _proposals(image, pnet, min_face, thresholds[0])
    n_rnet = len(boxes)
    if n_rnet == 0:
        return empty
    prob, reg = _outputs(rnet(_crops(image, boxes[:, :4], 24)))[:2]
    keep = prob[:, 1] > thresholds[1]
    boxes, reg = torch.cat([boxes[keep, :4], prob[keep, 1:2]], dim=1), reg[keep]
    pick = nms(boxes[:, :4], boxes[:, 4], 0.7)
    boxes = torch.cat([_square(_regress(boxes[pick, :4], reg[pick])), boxes[pick, 4:5]], dim=1)
    n_onet = len(boxes)
    if n_onet == 0:
        return Detections(empty.boxes, empty.scores, empty.landmarks, (n_rnet, 0, 0))
    prob, reg, marks = _outputs(onet(_crops(image, boxes[:, :4], 48)))[:3]
    keep = prob[:, 1] > thresholds[2]
    boxes, reg, marks, score = boxes[keep, :4], reg[keep], marks[keep], prob[keep, 1]
    wh = boxes[:, 2:4] - boxes[:, :2]
    landmarks = torch.stack([marks[:, :5], marks[:, 5:]], dim=2) * wh[:, None] + boxes[:, None, :2]  # (n, 5, 2)
    boxes = _regress(boxes, reg)
    pick = nms(boxes, score, 0.7, mode="min")
    return Detections(boxes[pick], score[pick], landmarks[pick], (n_rnet, n_onet, len(pick)))


def match_detections(reference: torch.Tensor, found: torch.Tensor, iou: float = 0.5) -> int:
    """How many `found` boxes match a distinct `reference` box with IoU >= `iou` (greedy, best first)."""
    if len(reference) == 0 or len(found) == 0:
        return 0
    overlap = box_iou(reference, found)
    matched = 0
    while True:
        best = overlap.max()
        if best < iou:
            return matched
        r, f = divmod(int(overlap.argmax()), overlap.shape[1])
        overlap[r, :], overlap[:, f] = -1, -1
        matched += 1


# ---------------------------------------------------------------- zoo entries


class _MTCNNEntry(ZooEntry):
    net = ""
    size = 0
    threshold = 0.0
    task = "face-detection"
    input_names = ("images",)

    def load(self, cache_dir: Path | None = None) -> nn.Module:
        return load_net(self.net)

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        x, _ = face_patches("test", self.size)
        reps = -(-batch_size // len(x))
        return (x.repeat(reps, 1, 1, 1)[:batch_size],)  # (batch_size, 3, size, size)

    def calibration_data(self, n: int = 64, batch_size: int = 8) -> list[tuple[torch.Tensor, ...]]:
        x, _ = face_patches("calibration", self.size)  # faces and non-faces interleaved below
        x = torch.stack([x[: len(x) // 2], x[len(x) // 2 :]], dim=1).flatten(0, 1)
        x = torch.cat([x, x.flip(-1)])[:n]  # mirrored copies: still calibration patches only
        return [(x[i : i + batch_size],) for i in range(0, len(x), batch_size)]

    def evaluate(self, model: ModelFn, data: Path | None = None) -> Quality:
        if data is not None:
            raise DataError(f"{self.name} evaluates on scikit-image's bundled lfw_subset; got data={data}")
        return face_accuracy(model, "test", self.size, self.threshold)

    def validation_quality(self, model: ModelFn, data: Path | None = None) -> Quality:
        return face_accuracy(model, "val", self.size, self.threshold)

    def real_batches(self, batch_size: int) -> Any:
        x, _ = face_patches("test", self.size)
        for i in range(0, len(x), batch_size):
            yield (x[i : i + batch_size],)


class PNetEntry(_MTCNNEntry):
    name, net, size, threshold = "mtcnn-pnet", "pnet", 12, THRESHOLDS[0]
    description = "MTCNN proposal net (facenet-pytorch weights), face / non-face on lfw_subset at 12x12"


class RNetEntry(_MTCNNEntry):
    name, net, size, threshold = "mtcnn-rnet", "rnet", 24, THRESHOLDS[1]
    description = "MTCNN refinement net (facenet-pytorch weights), face / non-face on lfw_subset at 24x24"


class ONetEntry(_MTCNNEntry):
    name, net, size, threshold = "mtcnn-onet", "onet", 48, THRESHOLDS[2]
    description = "MTCNN output net (facenet-pytorch weights), face / non-face on lfw_subset at 48x48"


register_entry("mtcnn-pnet", PNetEntry)
register_entry("mtcnn-rnet", RNetEntry)
register_entry("mtcnn-onet", ONetEntry)
