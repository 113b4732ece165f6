"""Images as model inputs: folders of JPEG / PNG files, scikit-image's bundled photographs, pixel tensors.

A folder is read recursively in sorted order; hidden entries are skipped, and so are files of other kinds
(a README, a labels file). Images in subfolders take the first subfolder's name as their class
(`CLASS/IMAGE`, as for top-1 accuracy). A folder without a readable image, or an image that cannot be
decoded, is a `DataError` naming the path and what is allowed.

The bundled photographs (`skimage.data`, offline) come in three disjoint splits of whole photographs:
"train" for calibration, "validation" for choices made while compressing, "test" for the reported metric.
Each split gives any number of seeded crops of its photographs.

    >>> files = find_images(Path("val"), "--eval-data")       # [ImageFile(path, label), ...]
    >>> pixels = to_pixel_values([open_image(f.path) for f in files], (224, 224))
    >>> crops = photo_crops("train", 128)                      # PIL images, the same each run
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelpress.core.errors import DataError
from modelpress.trust import check_not_special

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
ALLOWED = "JPEG, PNG, BMP or WebP images (.jpg, .jpeg, .png, .bmp, .webp)"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = 224

PHOTO_SOURCE = "scikit-image sample photographs (skimage.data), seeded crops"
# Whole photographs per split: a crop of a test photograph never calibrates. `stereo_motorcycle` is two
# views of one scene, both in "train".
PHOTO_SPLITS: dict[str, tuple[str, ...]] = {
    "train": (
        "stereo_motorcycle", "hubble_deep_field", "retina", "moon", "page", "text", "grass", "brick", "cell",
        "microaneurysms",
    ),
    "validation": ("rocket", "clock", "immunohistochemistry", "gravel"),
    "test": ("astronaut", "chelsea", "coffee", "camera", "coins"),
}  # fmt: skip
_SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}


@dataclass(frozen=True)
class ImageFile:
    """An image file found in a folder; `label` is its class folder (`CLASS/IMAGE`), None at the top level."""

    path: Path
    label: str | None


def find_images(folder: Path, what: str = "image data") -> list[ImageFile]:
    """Every image file under `folder`, sorted; `DataError` if there is none. `what` names the role in messages."""
    folder = Path(folder)
    check_not_special(folder, what, DataError)
    if not folder.is_dir():
        raise DataError(f"{what} {folder}: no such folder")
    found: list[ImageFile] = []
    others: list[Path] = []
    for root, dirs, files in os.walk(folder, onerror=_raise_walk_error(folder, what)):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root) / name
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                others.append(path)
                continue
            check_not_special(path, f"{what} file", DataError)
            parts = path.relative_to(folder).parts
            found.append(ImageFile(path, parts[0] if len(parts) > 1 else None))
    if not found:
        seen = f"; it holds {len(others)} other file(s), e.g. {others[0].name}" if others else " (it is empty)"
        raise DataError(f"{what} {folder} holds no image{seen}; give a folder of {ALLOWED}, in any subfolders")
    return found


def _raise_walk_error(folder: Path, what: str) -> Any:
    def fail(error: OSError) -> None:
        raise DataError(f"{what} {folder}: cannot list {error.filename}: {error.strerror}") from None

    return fail


def open_image(path: Path, channels: int = 3) -> Any:
    """A decoded PIL image in RGB (`channels=3`) or greyscale (1), upright by its EXIF orientation."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as opened:
            opened.load()  # decode every byte now: a truncated file fails here, named
            return ImageOps.exif_transpose(opened).convert("L" if channels == 1 else "RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"image {path} cannot be read ({type(e).__name__}: {e}); expected {ALLOWED}") from None


def spread(items: Sequence[Any], n: int) -> list[Any]:
    """At most `n` of `items`, evenly spaced over the whole sequence (every class of a sorted folder is seen)."""
    if len(items) <= n:
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def to_pixel_values(
    images: Sequence[Any],
    size: tuple[int, int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    channels: int = 3,
) -> torch.Tensor:
    """PIL images -> float32 [N, channels, H, W]: resized to `size` (bilinear), scaled to [0, 1], normalized."""
    from PIL import Image

    h, w = size
    arrays = []
    for image in images:
        image = image.convert("L" if channels == 1 else "RGB").resize((w, h), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(image, dtype=np.float32).reshape(h, w, -1) / 255.0)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    m = torch.tensor(list(mean)[:channels], dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(list(std)[:channels], dtype=torch.float32).view(1, -1, 1, 1)
    return (x - m) / s


# ---------------------------------------------------------------- bundled photographs


@functools.cache
def photos(split: str) -> tuple[tuple[str, Any], ...]:
    """(name, RGB PIL image) of each photograph of `split` (see `PHOTO_SPLITS`)."""
    import skimage.data
    from PIL import Image

    if split not in PHOTO_SPLITS:
        raise DataError(f"the photograph split must be one of {tuple(PHOTO_SPLITS)}, got {split!r}")
    out = []
    for name in PHOTO_SPLITS[split]:
        loaded = getattr(skimage.data, name)()
        views = loaded[:2] if isinstance(loaded, tuple) else (loaded,)  # stereo_motorcycle: left, right
        for i, array in enumerate(views):
            array = np.asarray(array)
            array = np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else array[..., :3]
            label = name if len(views) == 1 else f"{name}-{'left' if i == 0 else 'right'}"
            out.append((label, Image.fromarray(np.ascontiguousarray(array.astype(np.uint8)))))
    return tuple(out)


def photo_names(split: str) -> list[str]:
    return [name for name, _ in photos(split)]


@functools.cache
def _crops(split: str, n: int) -> tuple[Any, ...]:
    from PIL import Image

    pictures = [image for _, image in photos(split)]
    out = []
    for i in range(n):
        image = pictures[i % len(pictures)]
        if i < len(pictures):  # each whole photograph first
            out.append(image)
            continue
        rng = np.random.default_rng([_SPLIT_SEEDS[split], i])
        w, h = image.size
        area = rng.uniform(0.2, 1.0) * w * h
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = min(w, round(math.sqrt(area * ratio))), min(h, round(math.sqrt(area / ratio)))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = image.crop((left, top, left + cw, top + ch))
        out.append(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
    return tuple(out)


def photo_crops(split: str, n: int) -> list[Any]:
    """`n` crops (PIL, RGB) of the photographs of `split`: each whole photograph, then seeded random crops
    (20-100% of the area, aspect 3:4 to 4:3, half of them mirrored). The same crops every run."""
    if n < 1:
        raise DataError(f"photo_crops needs at least one crop, asked for {n}")
    return list(_crops(split, n))
