"""Folders of images as data: read recursively (PNG / JPEG written by Pillow from scikit-image's photographs),
resized and normalized by the model's image processor or ImageNet's defaults, refused clearly when unusable."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from modelpress.calibration import check_calibration_size, load_calibration
from modelpress.core.errors import BadInputError, DataError
from modelpress.zoo.generic import ShapeEntry
from modelpress.zoo.images import PHOTO_SPLITS, find_images, open_image, photo_crops, photos, spread

transformers = pytest.importorskip("transformers")
skimage_data = pytest.importorskip("skimage.data")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vit(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny random ViT classifier (32 x 32 inputs, mean and std 0.5) resolved from its folder."""
    from modelpress.loading import resolve

    folder = tmp_path_factory.mktemp("models") / "tiny-vit"
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8,
        num_labels=3,
    )  # fmt: skip
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return resolve(folder)


def _save(array: np.ndarray, path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Photographs of mixed sizes and modes (RGB, grey, RGBA) in nested folders, with files that are no images."""
    root = tmp_path / "images"
    _save(skimage_data.astronaut(), root / "people" / "astronaut.png")
    _save(skimage_data.chelsea(), root / "people" / "cats" / "chelsea.jpg")
    _save(skimage_data.coffee(), root / "coffee.JPEG")
    _save(skimage_data.camera(), root / "camera.png")  # greyscale
    _save(skimage_data.logo(), root / "logo.png")  # RGBA
    _save(skimage_data.moon(), root / ".hidden.png")
    (root / "notes.txt").write_text("not an image")
    return root


def test_a_folder_is_read_recursively_in_order(images: Path) -> None:
    files = find_images(images)
    names = [f.path.relative_to(images).as_posix() for f in files]
    assert names == ["camera.png", "coffee.JPEG", "logo.png", "people/astronaut.png", "people/cats/chelsea.jpg"]
    assert [f.label for f in files] == [None, None, None, "people", "people"]  # the first subfolder is the class
    assert all(open_image(f.path).mode == "RGB" for f in files)


def test_images_calibrate_through_the_models_processor(images: Path, vit: Any) -> None:
    batches = load_calibration(images, vit.entry, batch_size=2)
    assert [b[0].shape for b in batches] == [(2, 3, 32, 32), (2, 3, 32, 32), (1, 3, 32, 32)]  # mixed sizes: 32 x 32
    expected = vit.entry.preprocess([open_image(f.path) for f in find_images(images)])
    assert torch.equal(torch.cat([b[0] for b in batches]), expected)
    assert -1.0 <= float(expected.min()) and float(expected.max()) <= 1.0  # mean and std 0.5 from the processor


def test_without_a_processor_imagenet_defaults_at_the_models_input_shape(images: Path) -> None:
    (x,) = load_calibration(images, None, batch_size=8)[0]
    assert x.shape == (5, 3, 224, 224)
    camera = np.asarray(open_image(images / "camera.png").resize((224, 224), 2), dtype=np.float32) / 255.0
    expected = (torch.from_numpy(camera).permute(2, 0, 1) - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / (
        torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    )
    assert torch.allclose(x[0], expected, atol=1e-5)
    (grey,) = load_calibration(images, ShapeEntry.from_shape_text("1,1,8,8"))[0]  # e.g. an ONNX model's input
    assert grey.shape == (5, 1, 8, 8)


def test_images_for_a_model_without_image_inputs_are_refused(images: Path) -> None:
    from modelpress.zoo.text import FolderEntry

    with pytest.raises(DataError, match="folder of images, but the model is a text model"):
        load_calibration(images, FolderEntry.__new__(FolderEntry))
    with pytest.raises(DataError, match=r"does not take one image batch .*it takes \[1, 16\]"):
        load_calibration(images, ShapeEntry.from_shape_text("1,16"))


def test_a_corrupt_image_is_named(images: Path) -> None:
    good = (images / "camera.png").read_bytes()
    (images / "people" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DataError, match=r"image .*people/broken.jpg cannot be read .*expected JPEG, PNG"):
        load_calibration(images)
    (images / "people" / "broken.jpg").unlink()
    (images / "truncated.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(BadInputError, match=r"truncated.png cannot be read"):
        load_calibration(images)


def test_a_folder_without_images_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        DataError, match=r"calibration data .*empty holds no image \(it is empty\); give a folder of JPEG"
    ):
        load_calibration(empty)
    (empty / "readme.txt").write_text("images go here")
    with pytest.raises(DataError, match=r"holds no image; it holds 1 other file\(s\), e.g. readme.txt"):
        load_calibration(empty)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_pipe_named_like_an_image_is_refused_without_blocking(images: Path) -> None:
    os.mkfifo(images / "frame.png")
    with pytest.raises(DataError, match="frame.png is a named pipe"):
        load_calibration(images)


def test_a_large_folder_is_sampled_evenly(images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import modelpress.calibration as calibration

    assert spread(list(range(10)), 3) == [0, 3, 6] and spread([1, 2], 5) == [1, 2]
    monkeypatch.setattr(calibration, "MAX_CALIBRATION_IMAGES", 2)
    assert sum(len(b[0]) for b in load_calibration(images, None)) == 2


def test_bundled_photographs_splits_are_disjoint_and_fixed() -> None:
    names = [{name for name, _ in photos(split)} for split in PHOTO_SPLITS]
    assert all(a.isdisjoint(b) for i, a in enumerate(names) for b in names[i + 1 :])
    crops = photo_crops("train", 30)
    assert len(crops) == 30 and crops[0].size == photos("train")[0][1].size  # whole photographs first
    from modelpress.zoo import images as images_module

    images_module._crops.cache_clear()
    again = photo_crops("train", 30)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(crops, again, strict=True))


STATIC_LINEAR = {
    "description": "static int8 on Linear layers",
    "passes": [{"type": "StaticQuantConfig", "layers": {"types": ["Linear"]}}],
    "export": ["onnx"],
}


def _static_linear() -> Any:
    from modelpress.recipes.recipe import parse_recipe

    return parse_recipe(STATIC_LINEAR, "static-linear")


def _crop_folder(folder: Path, n: int) -> Path:
    folder.mkdir()
    for i, crop in enumerate(photo_crops("train", n)):
        crop.save(folder / f"{i:02d}.png")
    return folder


def test_an_image_folder_feeds_a_calibrating_recipe(tmp_path: Path, vit: Any) -> None:
    from modelpress.calibration import MIN_CALIBRATION_SAMPLES
    from modelpress.quant.modules import QLinear

    folder = _crop_folder(tmp_path / "calib", MIN_CALIBRATION_SAMPLES)
    recipe = _static_linear()
    batches = load_calibration(folder, vit.entry)
    check_calibration_size(batches, recipe, folder)
    (folder / "00.png").unlink()
    with pytest.raises(DataError, match=f"holds {MIN_CALIBRATION_SAMPLES - 1} samples"):
        check_calibration_size(load_calibration(folder, vit.entry), recipe, folder)

    from modelpress import pipeline

    if "options" in inspect.signature(pipeline.compress).parameters:
        from modelpress.core.options import RunOptions

        compressed, _ = pipeline.compress(vit, recipe, batches, options=RunOptions(progress=False))
    else:
        compressed, _ = pipeline.compress(vit, recipe, batches, progress=False)
    assert any(isinstance(m, QLinear) and m.act.mode != "none" for m in compressed.modules())
    with torch.no_grad():
        assert compressed(vit.entry.example_inputs(2)[0]).shape == (2, 3)


def test_compress_on_the_command_line_takes_an_image_folder(tmp_path: Path, vit: Any) -> None:
    import json

    import yaml

    from modelpress.cli import main

    recipe = tmp_path / "static-linear.yaml"
    recipe.write_text(yaml.safe_dump(STATIC_LINEAR))
    data = _crop_folder(tmp_path / "calib", 16)
    out = tmp_path / "out"
    args = ["compress", str(vit.path), "--recipe", str(recipe), "--data", str(data), "--out", str(out)]
    assert main([*args, "--batch-sizes", "1", "--threads", "1", "--json"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "model.onnx").is_file() and report["baseline"]["quality"]["name"] == "top1_agreement"
