"""Hugging Face image models (ViT, DeiT, Swin, ConvNeXt, ResNet, MobileNet, ...): folders as `VisionModel`.

`VisionModel.forward(pixel_values)` returns one tensor: the logits of a classification head
(`...ForImageClassification`), or the pooled features of a backbone without one. Its inputs are what the
folder's image processor (`preprocessor_config.json`) makes of an image, at one fixed size; without a
processor, ImageNet's mean and std at the config's `image_size` (224 if unsaid).

The metric needs no data set: top-1 agreement of a model with the fp32 original on crops of held-out
photographs (scikit-image's bundled ones; `fidelity_cosine` of the features for a backbone), or top-1
accuracy on a `CLASS/IMAGE` folder given as evaluation data, class folders named by the model's labels.

    >>> model = load_vision_folder("vit-base-patch16-224")
    >>> entry = VisionFolderEntry(model, "vit")
    >>> entry.evaluate(model).value                  # 1.0: the original agrees with itself
    >>> entry.evaluate(model, Path("imagenet-val"))  # accuracy on imagenet-val/tabby/*.jpg, ...
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelpress import trust
from modelpress.core.errors import DataError, ModelLoadError
from modelpress.core.report import Quality
from modelpress.zoo.base import ModelFn, ZooEntry
from modelpress.zoo.images import (
    DEFAULT_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    PHOTO_SOURCE,
    find_images,
    open_image,
    photo_crops,
    photo_names,
    to_pixel_values,
)
from modelpress.zoo.training import as_logits

HEAD_SUFFIXES = ("ForImageClassification", "ForImageClassificationWithTeacher")
# Files a tokenizer is read from: a folder with one is a text or multimodal model, not an image model.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
PROCESSOR_FILE = "preprocessor_config.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")  # what a weights-only load refuses


@dataclass(frozen=True)
class ImageSettings:
    """What a model's inputs are: `channels` x `size` (height, width), normalized by `mean` and `std`."""

    size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str  # where they were read: the processor file, or the defaults


class VisionModel(nn.Module):
    """A Hugging Face image model whose forward takes `pixel_values` and returns one tensor.

    With a classification head: logits `[batch, num_labels]`; a backbone: its pooled features `[batch, hidden]`
    (the pooler's output, else the CLS token, else the mean over positions).
    """

    def __init__(self, net: nn.Module, settings: ImageSettings, processor: Any = None, head: bool = True) -> None:
        super().__init__()
        self.net = net
        self.head = head
        self.settings = settings
        self.processor = processor  # plain attribute: not a submodule, not part of the state dict
        config = getattr(net, "config", None)
        labels = getattr(config, "id2label", None) or {}
        self.id2label: dict[int, str] = {int(k): str(v) for k, v in labels.items()} if head else {}
        embeddings = getattr(net, "embeddings", None)
        self.cls_token = getattr(embeddings, "cls_token", None) is not None
        # Loaders set this to reload the fp32 original from disk (a reference after in-place compression).
        self.reload: Callable[[], VisionModel] | None = None

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.net(pixel_values=pixel_values, return_dict=True)
        if self.head:
            return out.logits
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)  # ResNet-style poolers keep [batch, channels, 1, 1]
        states = out.last_hidden_state
        if states.dim() == 4:  # [batch, channels, h, w]
            return states.flatten(2).mean(-1)
        return states[:, 0] if self.cls_token else states.mean(1)

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images -> `pixel_values` [N, C, H, W] at this model's fixed size (see `ImageSettings`)."""
        s = self.settings
        if self.processor is None:
            return to_pixel_values(images, s.size, s.mean, s.std, s.channels)
        mode = "L" if s.channels == 1 else "RGB"
        out = []
        for image in images:  # one by one: a shortest-edge resize without a crop keeps each aspect ratio
            x = self.processor(images=[image.convert(mode)], return_tensors="pt")["pixel_values"].float()
            if tuple(x.shape[-2:]) != s.size:
                x = F.interpolate(x, size=s.size, mode="bilinear", align_corners=False, antialias=True)
            out.append(x)
        return torch.cat(out)


# ---------------------------------------------------------------- folders


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_vision_folder(folder: Path) -> bool:
    """True where `folder` holds an image model: config.json names an image-classification architecture, or
    (with no tokenizer in the folder) an image model type, or an image processor comes with it."""
    config = _read_json(folder / "config.json")
    if not isinstance(config, dict):
        return False
    archs = config.get("architectures")
    if isinstance(archs, list) and any(isinstance(a, str) and a.endswith(HEAD_SUFFIXES) for a in archs):
        return True
    if any((folder / name).is_file() for name in TOKENIZER_FILES):
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    if config.get("model_type") in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        return True
    processor = _read_json(folder / PROCESSOR_FILE)
    return isinstance(processor, dict) and "ImageProcessor" in str(processor.get("image_processor_type", ""))


def load_vision_folder(path: str | Path, *, trust_code: bool = False) -> VisionModel:
    """A Hugging Face image-model folder as a `VisionModel` (fp32, eval mode).

    Weights load through safetensors or `torch.load(weights_only=True)`; custom model or processor code
    (`auto_map`) is refused unless `trust_code=True`. The model is run once on an example input here, so a
    folder whose model does not take `pixel_values` of its processor's size fails now, with the reason.
    """
    from modelpress.zoo.text import check_hf_folder

    folder = check_hf_folder(path, trust_code)
    processor_file = folder / PROCESSOR_FILE
    code = _processor_code(processor_file)
    if code:
        trust.require_trust(processor_file, trust.HF_CUSTOM_CODE, trust_code, f"auto_map: {', '.join(code)}")
    config = _read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise ModelLoadError(f"{folder / 'config.json'} is not a JSON object")
    named = config.get("architectures")
    archs: list[Any] = named if isinstance(named, list) else []
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    if any(isinstance(a, str) and a.endswith(HEAD_SUFFIXES) for a in archs):
        net, head = _load(folder, trust_code, head=True), True
    elif not archs and config.get("model_type") in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES:
        try:  # no architectures named: a head where the weights hold one
            net, head = _load(folder, trust_code, head=True), True
        except _MissingHead:
            net, head = _load(folder, trust_code, head=False), False
    else:
        net, head = _load(folder, trust_code, head=False), False
    processor = _processor(folder, trust_code) if processor_file.is_file() else None
    settings = image_settings(net.config, processor, processor_file)
    model = VisionModel(net.eval(), settings, processor, head).eval()
    _check_runs(model, folder)
    model.reload = functools.partial(load_vision_folder, folder, trust_code=trust_code)
    return model


class _MissingHead(ModelLoadError):
    """The weights hold no classification head (only the head's weights are missing)."""


def _load(folder: Path, trust_code: bool, head: bool) -> nn.Module:
    from transformers import AutoModel, AutoModelForImageClassification

    from modelpress.zoo.text import check_loaded_keys

    auto = AutoModelForImageClassification if head else AutoModel
    try:
        # weights_only=False and remote code only when the user explicitly trusts the folder.
        net, info = auto.from_pretrained(
            folder, dtype=torch.float32, weights_only=not trust_code, trust_remote_code=trust_code,
            output_loading_info=True,
        )  # fmt: skip
    except Exception as e:
        if "weights only load failed" in str(e).lower():
            weights = next((folder / n for n in PICKLE_WEIGHTS if (folder / n).is_file()), folder)
            trust.require_trust(weights, trust.PICKLE, False)
        raise ModelLoadError(f"cannot load the image model in {folder}: {type(e).__name__}: {e}") from None
    if head:
        prefix = f"{net.base_model_prefix}."
        missing = list(info["missing_keys"])
        if missing and all(not k.startswith(prefix) for k in missing):
            raise _MissingHead(f"weights in {folder} hold no classification head; missing {sorted(missing)[:5]}")
        check_loaded_keys(net.base_model, info, folder)
    else:
        check_loaded_keys(net, info, folder)
        # A pooler whose weights were not saved is random: drop it (features come from the states instead).
        if any(k.startswith("pooler.") for k in info["missing_keys"]) and hasattr(net, "pooler"):
            net.pooler = None
    return net


def _processor_code(file: Path) -> list[str]:
    """The code an image processor's `auto_map` names (empty when it needs none)."""
    settings = _read_json(file) if file.is_file() else None
    auto_map = settings.get("auto_map") if isinstance(settings, dict) else None
    return trust.auto_map_code(auto_map) if auto_map else []


def _processor(folder: Path, trust_code: bool) -> Any:
    """The folder's image processor (its PIL implementation), or None where transformers has none for it:
    the settings are then read from the file itself."""
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(folder, backend="pil", trust_remote_code=trust_code)
    except Exception:
        return None


def _pair(value: Any) -> tuple[int, int] | None:
    """(height, width) from a processor or config size: an int, [h, w], or {height, width} / {shortest_edge}."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value > 0:
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value):
        return int(value[0]), int(value[1])
    if isinstance(value, dict):
        if isinstance(value.get("height"), int) and isinstance(value.get("width"), int):
            return _pair([value["height"], value["width"]])
        for key in ("shortest_edge", "longest_edge"):
            if isinstance(value.get(key), int):
                return _pair(value[key])
    return None


def image_settings(config: Any, processor: Any, processor_file: Path | None = None) -> ImageSettings:
    """The input size, channels and normalization of a model: from its processor (or the processor file
    where transformers has no processor for it), else ImageNet's at the config's `image_size` (224)."""
    settings: dict[str, Any] = {}
    source = "ImageNet defaults"
    if processor is not None:
        settings, source = processor.to_dict(), PROCESSOR_FILE
    elif processor_file is not None and isinstance(read := _read_json(processor_file), dict):
        settings, source = read, PROCESSOR_FILE
    crop = _pair(settings.get("crop_size")) if settings.get("do_center_crop") else None
    size = crop or _pair(settings.get("size")) or _pair(getattr(config, "image_size", None))
    channels = getattr(config, "num_channels", 3)
    channels = channels if isinstance(channels, int) and channels in (1, 3) else 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    if settings:
        normalize = settings.get("do_normalize", True)
        mean = _triple(settings.get("image_mean"), IMAGENET_MEAN) if normalize else (0.0, 0.0, 0.0)
        std = _triple(settings.get("image_std"), IMAGENET_STD) if normalize else (1.0, 1.0, 1.0)
    return ImageSettings(size or (DEFAULT_SIZE, DEFAULT_SIZE), channels, mean, std, source)


def _triple(value: Any, default: tuple[float, ...]) -> tuple[float, ...]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (float(value),) * 3
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return tuple(float(v) for v in value) * (3 if len(value) == 1 else 1)
    return default


def _check_runs(model: VisionModel, folder: Path) -> None:
    s = model.settings
    x = torch.zeros(1, s.channels, *s.size)
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as e:
        raise ModelLoadError(
            f"the image model in {folder} does not run on pixel_values {list(x.shape)} (size from {s.source}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ModelLoadError(f"the image model in {folder} returns {shape}, not [batch, outputs]")


# ---------------------------------------------------------------- zoo entry


def _normalized(label: str) -> str:
    return " ".join(re.sub(r"[_\-]+", " ", label).lower().split())


class VisionFolderEntry(ZooEntry):
    """A `VisionModel` as a zoo entry: photographs as calibration data, top-1 agreement or accuracy as metric.

    Calibration takes crops of the "train" photographs; the reported metric the "test" ones, choices the
    "validation" ones (`modelpress.zoo.images.PHOTO_SPLITS`: disjoint whole photographs). Evaluation data, where
    given, is a `CLASS/IMAGE` folder scored by top-1 accuracy (a classifier only).
    """

    input_names = ("pixel_values",)
    batch_axes = (0,)
    test_images = 64
    validation_images = 32
    eval_batch = 32

    def __init__(self, model: VisionModel | None = None, name: str = "image-model") -> None:
        self._model = model
        self.name = name
        head = model is None or model.head
        self.task = "image-classification" if head else "image-features"
        self.description = "Hugging Face image " + ("classifier (logits)" if head else "backbone (pooled features)")
        self._reference: dict[str, torch.Tensor] = {}  # fp32 outputs on each photograph split
        self._inputs: dict[str, torch.Tensor] = {}

    def load(self, cache_dir: Path | None = None) -> VisionModel:
        if self._model is None:
            raise ModelLoadError(f"zoo entry {self.name!r} has no model")
        return self._model

    @property
    def model(self) -> VisionModel:
        return self.load()

    @property
    def settings(self) -> ImageSettings:
        return self.model.settings

    def preprocess(self, images: Sequence[Any]) -> torch.Tensor:
        """PIL images -> this model's `pixel_values` (its processor's resize and normalization, fixed size)."""
        return self.model.preprocess(images)

    def example_inputs(self, batch_size: int = 1) -> tuple[torch.Tensor, ...]:
        """Seeded random pixels in [0, 1], normalized like real images: `[batch_size, C, H, W]`."""
        s = self.settings
        gen = torch.Generator().manual_seed(0)
        pixels = torch.rand((batch_size, s.channels, *s.size), generator=gen)
        mean = torch.tensor(s.mean[: s.channels]).view(1, -1, 1, 1)
        std = torch.tensor(s.std[: s.channels]).view(1, -1, 1, 1)
        return ((pixels - mean) / std,)

    def calibration_data(self, n: int = 64, batch_size: int = 8) -> list[tuple[torch.Tensor, ...]]:
        """`n` crops of the "train" photographs, preprocessed, in batches of `batch_size`."""
        x = self.preprocess(photo_crops("train", n))
        return [(x[i : i + batch_size],) for i in range(0, len(x), batch_size)]

    # ------------------------------------------------------------ metrics

    def _photo_inputs(self, split: str) -> torch.Tensor:
        if split not in self._inputs:
            n = self.test_images if split == "test" else self.validation_images
            self._inputs[split] = self.preprocess(photo_crops(split, n))
        return self._inputs[split]

    def _run(self, model: ModelFn, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            outs = [as_logits(model(x[i : i + self.eval_batch])).float() for i in range(0, len(x), self.eval_batch)]
        return torch.cat(outs)

    def _reference_model(self) -> VisionModel:
        # A fresh fp32 copy from disk: the entry's model may since have been compressed in place.
        return self.model.reload() if self.model.reload is not None else self.model

    def _fidelity(self, model: ModelFn, split: str) -> Quality:
        x = self._photo_inputs(split)
        if split not in self._reference:
            self._reference[split] = self._run(self._reference_model(), x)
        ref, out = self._reference[split], self._run(model, x)
        cos = F.cosine_similarity(out, ref, dim=-1)
        details: dict[str, Any] = {
            "split": split,
            "images": len(x),
            "source": PHOTO_SOURCE,
            "photographs": photo_names(split),
            "held_out": "whole photographs disjoint from the calibration ones",
            "reference": f"{self.name} fp32",
        }
        if self.model.head:
            agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
            details["mean_cosine"] = float(cos.mean())
            return Quality(name="top1_agreement", value=agree, details=details)
        details["min_cosine"] = float(cos.min())
        return Quality(name="fidelity_cosine", value=float(cos.mean()), details=details)

    def evaluate(self, model: ModelFn, data: Path | None = None) -> Quality:
        """Top-1 agreement with the fp32 model on the test photographs (a backbone: mean cosine of the features);
        with `data`, top-1 accuracy on that `CLASS/IMAGE` folder."""
        return self._fidelity(model, "test") if data is None else self._accuracy(model, Path(data))

    def validation_quality(self, model: ModelFn, data: Path | None = None) -> Quality | None:
        """The same on the validation photographs; None with evaluation data (a folder has no validation split)."""
        return self._fidelity(model, "validation") if data is None else None

    def _labelled(self, folder: Path) -> tuple[list[Path], list[int], int]:
        if not self.model.head:
            raise DataError(
                f"evaluation data {folder}: {self.name} is a backbone without a classification head; "
                "top-1 accuracy needs a classifier (leave out the evaluation data to measure feature fidelity)"
            )
        files = find_images(folder, "evaluation data")
        loose = [f.path for f in files if f.label is None]
        if loose:
            raise DataError(
                f"evaluation data {folder} must be laid out as CLASS/IMAGE (one subfolder per class); "
                f"{len(loose)} image(s) are not in a class folder, e.g. {loose[0].name}"
            )
        index = self._label_index()
        classes = sorted({f.label for f in files if f.label is not None})
        unknown = [c for c in classes if _class_id(c, index, len(self.model.id2label)) is None]
        if unknown:
            examples = ", ".join(repr(v) for v in list(self.model.id2label.values())[:3])
            raise DataError(
                f"evaluation data {folder}: class folder(s) {', '.join(map(repr, unknown[:5]))} name no label of "
                f"{self.name} ({len(self.model.id2label)} labels, e.g. {examples}); name each class folder by a "
                "label of config.json's id2label (or one of its comma-separated names) or by the label's index"
            )
        ids = [_class_id(str(f.label), index, len(self.model.id2label)) for f in files]
        return [f.path for f in files], [i for i in ids if i is not None], len(classes)

    def _label_index(self) -> dict[str, int]:
        index: dict[str, int] = {}
        for i, label in sorted(self.model.id2label.items()):
            index.setdefault(_normalized(label), i)
        for i, label in sorted(self.model.id2label.items()):  # "tabby, tabby cat": each name on its own
            for part in label.split(","):
                index.setdefault(_normalized(part), i)
        return index

    def _accuracy(self, model: ModelFn, folder: Path) -> Quality:
        paths, labels, classes = self._labelled(folder)
        correct = 0
        channels = self.settings.channels
        for start in range(0, len(paths), self.eval_batch):
            chunk = paths[start : start + self.eval_batch]
            x = self.preprocess([open_image(p, channels) for p in chunk])
            pred = self._run(model, x).argmax(-1)
            correct += int((pred == torch.tensor(labels[start : start + len(chunk)])).sum())
        details = {"data": str(folder), "images": len(paths), "classes": classes, "metric": "top-1 accuracy"}
        return Quality(name="accuracy", value=correct / len(paths), details=details)

    def data_record(self, use: str, count: int | None = None, data: Path | None = None) -> dict[str, Any] | None:
        """Where this entry's `use` data comes from (see `ZooEntry.data_record`)."""
        if use == "calibration":
            return {"source": PHOTO_SOURCE, "split": "train", "count": count, "unit": "image crops",
                    "photographs": len(photo_names("train"))}  # fmt: skip
        if use not in ("evaluation", "validation"):
            return None
        if data is not None:
            if use == "validation":
                return None
            n = len(find_images(Path(data), "evaluation data"))
            return {"source": str(data), "split": "given", "count": n, "unit": "images", "metric": "accuracy"}
        split = "test" if use == "evaluation" else "validation"
        n = self.test_images if split == "test" else self.validation_images
        metric = "top1_agreement" if self.model.head else "fidelity_cosine"
        return {"source": PHOTO_SOURCE, "split": split, "count": n, "unit": "image crops", "metric": metric}


def _class_id(name: str, index: dict[str, int], num_labels: int) -> int | None:
    """The label index a class folder names: a label (or one of its comma-separated names), or the index itself."""
    found = index.get(_normalized(name))
    if found is not None:
        return found
    return int(name) if name.isdigit() and int(name) < num_labels else None
