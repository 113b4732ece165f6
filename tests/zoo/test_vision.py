"""Hugging Face image models: a ViT / ResNet / ConvNeXt / MobileNetV2 / Swin folder loads as "hf-vision", takes
`pixel_values` of its processor's size, is scored by top-1 agreement on held-out photographs (or accuracy on a
CLASS/IMAGE folder), and compresses end to end."""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from modelpress.core.errors import DataError, ModelLoadError, UntrustedCodeError
from modelpress.loading import resolve
from modelpress.zoo.images import PHOTO_SPLITS, photo_crops
from modelpress.zoo.vision import VisionFolderEntry, VisionModel, is_vision_folder

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = {0: "tabby, tabby cat", 1: "golden retriever", 2: "coffee mug", 3: "space shuttle", 4: "astronaut"}


def _vit_config(**kw: Any) -> Any:
    return transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8,
        **kw,
    )  # fmt: skip


def _families() -> dict[str, tuple[Any, Any]]:
    """(model, processor) of each family: random weights, 32 x 32 inputs, 5 labels."""
    t = transformers
    head = {"id2label": LABELS, "label2id": {v: k for k, v in LABELS.items()}}
    return {
        "vit": (
            t.ViTForImageClassification(_vit_config(**head)),
            t.ViTImageProcessor(size={"height": 32, "width": 32}),
        ),
        "resnet": (
            t.ResNetForImageClassification(
                t.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", **head)
            ),
            t.ConvNextImageProcessor(size={"shortest_edge": 32}),
        ),
        "convnext": (
            t.ConvNextForImageClassification(
                t.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, **head)
            ),
            t.ConvNextImageProcessor(size={"shortest_edge": 32}),
        ),
        "mobilenet_v2": (
            t.MobileNetV2ForImageClassification(t.MobileNetV2Config(depth_multiplier=0.25, image_size=32, **head)),
            t.MobileNetV2ImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}),
        ),
        "swin": (
            t.SwinForImageClassification(
                t.SwinConfig(
                    image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4, **head
                )
            ),
            t.ViTImageProcessor(size={"height": 32, "width": 32}),
        ),
        "vit-backbone": (t.ViTModel(_vit_config()), t.ViTImageProcessor(size={"height": 32, "width": 32})),
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vision")
    torch.manual_seed(0)
    folders = {}
    for name, (model, processor) in _families().items():
        folder = root / name
        model.save_pretrained(folder)
        processor.save_pretrained(folder)
        folders[name] = folder
    return folders


def _copy(models: dict[str, Path], name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(models[name], tmp_path / name))


def _edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))


# ---------------------------------------------------------------- loading


@pytest.mark.parametrize("name", ["vit", "resnet", "convnext", "mobilenet_v2", "swin"])
def test_image_classifier_folders_load_as_hf_vision(models: dict[str, Path], name: str) -> None:
    loaded = resolve(models[name])
    assert loaded.kind == "hf-vision"
    model, entry = loaded.model, loaded.entry
    assert isinstance(model, VisionModel) and isinstance(entry, VisionFolderEntry)
    assert model.head and entry.task == "image-classification" and entry.input_names == ("pixel_values",)
    assert model.settings.size == (32, 32) and model.settings.channels == 3
    (x,) = entry.example_inputs(3)
    assert x.shape == (3, 3, 32, 32) and torch.equal(x, entry.example_inputs(3)[0])  # seeded
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (3, 5)
    batches = entry.calibration_data(20, 8)
    assert [b[0].shape[0] for b in batches] == [8, 8, 4] and batches[0][0].shape[1:] == (3, 32, 32)
    quality = entry.evaluate(model)
    assert quality.name == "top1_agreement" and quality.value == 1.0
    assert quality.details["images"] == entry.test_images and quality.details["split"] == "test"


def test_processor_settings_give_the_input_size(models: dict[str, Path], tmp_path: Path) -> None:
    mobilenet = resolve(models["mobilenet_v2"]).model
    assert mobilenet.settings.size == (32, 32)  # the center crop, not the 36-pixel resize
    assert mobilenet.settings.source == "preprocessor_config.json" and mobilenet.settings.mean == (0.5, 0.5, 0.5)
    bare = _copy(models, "vit", tmp_path)
    (bare / "preprocessor_config.json").unlink()  # no processor: ImageNet's normalization at config.image_size
    settings = resolve(bare).model.settings
    assert settings.size == (32, 32) and settings.source == "ImageNet defaults"
    assert settings.mean == (0.485, 0.456, 0.406)


def test_a_backbone_gives_pooled_features(models: dict[str, Path]) -> None:
    loaded = resolve(models["vit-backbone"])
    model, entry = loaded.model, loaded.entry
    assert loaded.kind == "hf-vision" and not model.head and entry.task == "image-features"
    (x,) = entry.example_inputs(2)
    with torch.no_grad():
        out = model(x)
        pooled = model.net(pixel_values=x).pooler_output
    assert torch.equal(out, pooled)
    quality = entry.evaluate(model)
    assert quality.name == "fidelity_cosine" and quality.value == pytest.approx(1.0)


def test_a_backbone_saved_without_its_pooler_gives_the_cls_token(tmp_path: Path) -> None:
    folder = tmp_path / "vit-no-pooler"
    torch.manual_seed(0)
    transformers.ViTModel(_vit_config(), add_pooling_layer=False).save_pretrained(folder)
    model = resolve(folder).model  # no processor file either
    assert model.net.pooler is None  # its random pooler is dropped
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model.net(pixel_values=x).last_hidden_state[:, 0])


def test_without_architectures_the_weights_decide_head_or_backbone(models: dict[str, Path], tmp_path: Path) -> None:
    classifier, backbone = _copy(models, "vit", tmp_path), _copy(models, "vit-backbone", tmp_path)
    for folder in (classifier, backbone):
        _edit_json(folder / "config.json", architectures=None)
    assert resolve(classifier).model.head
    assert not resolve(backbone).model.head


def test_a_classifier_config_over_backbone_weights_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(models, "vit-backbone", tmp_path)
    _edit_json(folder / "config.json", architectures=["ViTForImageClassification"])
    with pytest.raises(ModelLoadError, match="no classification head"):
        resolve(folder)


def test_a_processor_size_the_model_cannot_take_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(models, "vit", tmp_path)
    transformers.ViTImageProcessor(size={"height": 48, "width": 48}).save_pretrained(folder)
    with pytest.raises(ModelLoadError, match=r"does not run on pixel_values \[1, 3, 48, 48\]"):
        resolve(folder)


def test_custom_code_is_refused_unless_trusted(models: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(models, "vit", tmp_path)
    auto_map = {"AutoImageProcessor": "image_processing_evil.EvilProcessor"}
    _edit_json(folder / "preprocessor_config.json", auto_map=auto_map)
    with pytest.raises(UntrustedCodeError, match=r"preprocessor_config.json .*image_processing_evil.py"):
        resolve(folder)
    _edit_json(folder / "preprocessor_config.json", auto_map=None)
    _edit_json(folder / "config.json", auto_map={"AutoModelForImageClassification": "modeling_evil.Evil"})
    with pytest.raises(UntrustedCodeError, match=r"config.json .*modeling_evil.py"):
        resolve(folder)


def test_which_folders_are_image_models(tmp_path: Path) -> None:
    def folder(name: str, config: dict[str, Any], **files: Any) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / "config.json").write_text(json.dumps(config))
        for file, content in files.items():
            (path / file.replace("__", ".")).write_text(json.dumps(content))
        return path

    assert is_vision_folder(folder("head", {"architectures": ["DeiTForImageClassificationWithTeacher"]}))
    assert is_vision_folder(folder("type", {"model_type": "convnext"}))
    processor = {"image_processor_type": "BitImageProcessor"}
    assert is_vision_folder(folder("processor", {"model_type": "new-one"}, preprocessor_config__json=processor))
    assert not is_vision_folder(folder("bert", {"model_type": "bert", "architectures": ["BertModel"]}))
    # CLIP is an image-classification type, but a folder with a tokenizer is a text or multimodal model
    assert not is_vision_folder(folder("clip", {"model_type": "clip"}, tokenizer__json={}))


# ---------------------------------------------------------------- metrics


def test_agreement_falls_for_a_different_model(models: dict[str, Path]) -> None:
    loaded = resolve(models["vit"])
    entry = loaded.entry
    assert entry.evaluate(lambda x: -loaded.model(x)).value < 0.5
    validation = entry.validation_quality(loaded.model)
    assert validation is not None and validation.value == 1.0 and validation.details["split"] == "validation"
    assert set(validation.details["photographs"]).isdisjoint(PHOTO_SPLITS["test"])
    assert entry.data_record("evaluation")["metric"] == "top1_agreement"
    assert entry.data_record("calibration", count=128)["split"] == "train"


def _class_folder(root: Path, layout: dict[str, int]) -> Path:
    """CLASS/IMAGE folders of test-photograph crops: `layout` maps class folder names to image counts."""
    crops = iter(photo_crops("test", sum(layout.values())))
    for label, count in layout.items():
        (root / label).mkdir(parents=True)
        for i in range(count):
            next(crops).save(root / label / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def test_accuracy_on_a_class_folder(models: dict[str, Path], tmp_path: Path) -> None:
    from modelpress.zoo.images import find_images, open_image

    loaded = resolve(models["vit"])
    entry = loaded.entry
    # Labels by name (case, "_" and one of the comma-separated names are free) or by index.
    folder = _class_folder(tmp_path / "eval", {"Tabby_Cat": 3, "golden retriever": 2, "3": 2})
    quality = entry.evaluate(loaded.model, folder)
    files = find_images(folder)
    with torch.no_grad():
        pred = loaded.model(entry.preprocess([open_image(f.path) for f in files])).argmax(-1)
    expected = [{"3": 3, "Tabby_Cat": 0, "golden retriever": 1}[str(f.label)] for f in files]
    assert quality.name == "accuracy" and quality.value == pytest.approx(
        float((pred == torch.tensor(expected)).sum()) / 7
    )
    assert quality.details["images"] == 7 and quality.details["classes"] == 3
    assert entry.validation_quality(loaded.model, folder) is None  # a folder has no validation split
    assert entry.data_record("evaluation", data=folder)["count"] == 7


def test_bad_class_folders_are_refused(models: dict[str, Path], tmp_path: Path) -> None:
    loaded = resolve(models["vit"])
    unknown = _class_folder(tmp_path / "unknown", {"tabby": 1, "zebra": 1})
    with pytest.raises(DataError, match=r"class folder\(s\) 'zebra' name no label"):
        loaded.entry.evaluate(loaded.model, unknown)
    loose = _class_folder(tmp_path / "loose", {"tabby": 1})
    photo_crops("test", 1)[0].save(loose / "stray.png")
    with pytest.raises(DataError, match="CLASS/IMAGE .* e.g. stray.png"):
        loaded.entry.evaluate(loaded.model, loose)
    backbone = resolve(models["vit-backbone"])
    with pytest.raises(DataError, match="backbone without a classification head"):
        backbone.entry.evaluate(backbone.model, unknown)


# ---------------------------------------------------------------- end to end


def _compress(folder: Path, recipe: Any, out: Path) -> tuple[Any, Any]:
    """`pipeline.compress` with a short measurement (through `RunOptions` where the pipeline takes one)."""
    from modelpress import pipeline

    quick: dict[str, Any] = {"progress": False, "repeats": 2, "batch_sizes": (1,)}
    if "options" in inspect.signature(pipeline.compress).parameters:
        from modelpress.core.options import RunOptions

        return pipeline.compress(folder, recipe, out_dir=out, options=RunOptions(**quick))
    return pipeline.compress(folder, recipe, out_dir=out, **quick)


def _onnx_only(recipe: str) -> Any:
    """A built-in recipe's passes, exported to ONNX only (the AOTInductor compile is the slow part)."""
    from modelpress.recipes.recipe import load_recipe

    return dataclasses.replace(load_recipe(recipe), export=("onnx",))


def _linear_int8() -> Any:
    from modelpress.recipes.recipe import parse_recipe

    passes = [{"type": "DynamicQuantConfig", "layers": {"types": ["Linear"]}}]
    return parse_recipe(
        {"description": "int8-dynamic on Linear layers", "passes": passes, "export": ["onnx"]}, "int8-linear"
    )


def _check_written(out: Path, report: Any) -> None:
    assert (out / "model.onnx").is_file() and (out / "report.json").is_file()
    assert report.baseline.quality.name == "top1_agreement" and report.baseline.quality.value == 1.0
    onnx_row = next(a for a in report.artifacts if a.artifact and a.artifact.endswith("model.onnx"))
    assert onnx_row.quality is not None and 0.0 <= onnx_row.quality.value <= 1.0
    assert report.data["calibration"]["unit"] == "image crops"


@pytest.mark.parametrize("name", ["vit", "resnet"])
def test_compress_linear_layers_end_to_end(models: dict[str, Path], tmp_path: Path, name: str) -> None:
    _, report = _compress(models[name], _linear_int8(), tmp_path / "out")
    _check_written(tmp_path / "out", report)


@pytest.mark.parametrize("name", ["vit", "resnet"])
def test_compress_int8_dynamic_to_onnx(models: dict[str, Path], tmp_path: Path, name: str) -> None:
    _, report = _compress(models[name], _onnx_only("int8-dynamic"), tmp_path / "out")
    _check_written(tmp_path / "out", report)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["vit", "resnet", "mobilenet_v2", "convnext", "swin"],
)
def test_compress_int8_dynamic_builtin(models: dict[str, Path], tmp_path: Path, name: str) -> None:
    _, report = _compress(models[name], "int8-dynamic", tmp_path / "out")
    _check_written(tmp_path / "out", report)
