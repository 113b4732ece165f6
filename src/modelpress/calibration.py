"""Calibration data from a user's file or folder: sentences for text models, images, tensors for everything else.

- `.txt`: one sentence per line (UTF-8), tokenized by the model's tokenizer (text models only);
- `.npy` / `.safetensors` / `.pt` (weights only): input tensors, first dimension = samples.
  A `.safetensors` file with several tensors feeds them positionally, in key order;
- a folder of images (JPEG, PNG, BMP, WebP; subfolders too): `(pixel_values,)` batches, resized and
  normalized by the model's image processor where the entry has one (`entry.preprocess`), else to the
  size of the model's image input with ImageNet's mean and std (224 x 224 RGB where it has none).
  At most `MAX_CALIBRATION_IMAGES`, spread evenly over the sorted files.

A data file is data: one that needs pickle (`np.load(allow_pickle=True)`, `torch.load(weights_only=False)`)
is refused, never trusted. Every problem is a `DataError` (exit code 2) naming the file: unreadable or
corrupt bytes, non-finite values, too few samples for the recipe (`check_calibration_size`).

    >>> batches = load_calibration("calib.npy", batch_size=8)
    >>> check_calibration_size(batches, load_recipe("int8-static"), "calib.npy")
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modelpress.core.errors import DataError
from modelpress.trust import check_not_special

# Static activation ranges, SmoothQuant scales and GPTQ/AWQ statistics from fewer samples than this
# describe the samples, not the inputs (the built-in sets hold 128).
MIN_CALIBRATION_SAMPLES = 16
MAX_CALIBRATION_IMAGES = 256  # images read from a folder: ranges and statistics settle well before this
_CALIBRATED = {
    "StaticQuantConfig": "calibrates int8 activation ranges",
    "SmoothQuantConfig": "calibrates SmoothQuant scales",
    "GPTQConfig": "calibrates GPTQ on layer inputs",
    "AWQConfig": "calibrates AWQ scales on layer inputs",
}


def load_calibration(path: str | Path, entry: Any | None = None, batch_size: int = 8) -> list[tuple[torch.Tensor, ...]]:
    """Batches of real inputs read from `path` (see the module docstring for the formats)."""
    path = Path(path)
    check_not_special(path, "calibration data", DataError)
    if path.is_dir():
        return _images(path, entry, batch_size)
    if not path.is_file():
        raise DataError(f"calibration data {path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _sentences(path, entry, batch_size)
    if suffix == ".npy":
        tensors = [_npy(path)]
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            loaded = load_file(str(path))
        except Exception as e:  # SafetensorError, OSError...: the bytes are no safetensors file
            raise DataError(f"calibration data {path} is not a valid safetensors file: {e}") from None
        tensors = [loaded[k] for k in sorted(loaded)]
    elif suffix in (".pt", ".pth"):
        obj = _torch_tensors(path)
        tensors = list(obj) if isinstance(obj, (tuple, list)) else [obj]
    else:
        raise DataError(
            f"calibration data {path}: unsupported suffix {suffix!r}; use .txt, .npy, .safetensors, .pt "
            "or a folder of images"
        )
    if not tensors or any(not isinstance(t, torch.Tensor) for t in tensors):
        raise DataError(f"calibration data {path} must hold tensors")
    if any(t.dim() == 0 for t in tensors):
        raise DataError(f"calibration data {path} holds a scalar; the first dimension must be the samples")
    n = tensors[0].shape[0]
    if n == 0:
        raise DataError(f"calibration data {path} is empty")
    if any(t.shape[0] != n for t in tensors):
        raise DataError(
            f"calibration data {path}: tensors disagree on the number of samples "
            f"({', '.join(str(t.shape[0]) for t in tensors)})"
        )
    check_finite([tuple(tensors)], path)
    return [tuple(t[i : i + batch_size] for t in tensors) for i in range(0, n, batch_size)]


def check_finite(batches: Sequence[tuple[Any, ...]], source: str | Path) -> None:
    """Refuse calibration batches holding NaN or inf (`DataError`, naming `source` and the count)."""
    bad = sum(
        int((~torch.isfinite(t)).sum())
        for batch in batches
        for t in _tensors(batch)
        if t.is_floating_point() or t.is_complex()
    )
    if bad:
        raise DataError(
            f"calibration data {source} holds {bad} non-finite values (NaN or inf); calibration needs finite inputs"
        )


def check_calibration_size(batches: Sequence[tuple[torch.Tensor, ...]], recipe: Any, source: str | Path) -> None:
    """Refuse calibration data too small for a pass of `recipe` that calibrates on it (`DataError`).

    Static int8 activations, SmoothQuant, GPTQ and AWQ need `MIN_CALIBRATION_SAMPLES` samples;
    other passes take any amount. `source` names the data in the message (e.g. the --data file).
    """
    samples = sum(_rows(batch) for batch in batches)
    if samples >= MIN_CALIBRATION_SAMPLES:
        return
    for cfg in _passes(recipe.passes):
        what = _CALIBRATED.get(type(cfg).__name__)
        if what is not None:
            raise DataError(
                f"calibration data {source} holds {samples} sample{'s' if samples != 1 else ''}; recipe "
                f"{recipe.name} {what} ({type(cfg).__name__}) and needs at least {MIN_CALIBRATION_SAMPLES}"
            )


def _tensors(batch: Any) -> list[torch.Tensor]:
    """The tensors of one batch: a tensor, a tuple / list of them, or a mapping of names to them."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    return [t for t in items if isinstance(t, torch.Tensor)]


def _rows(batch: Any) -> int:
    """Samples in one batch: the first dimension of its first tensor."""
    tensors = _tensors(batch)
    return int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 1


def _passes(passes: Sequence[Any]) -> list[Any]:
    """The passes, with the base pass of a mixed-precision search in place of the search."""
    return [p.base if type(p).__name__ == "MixedPrecisionConfig" else p for p in passes]


def _npy(path: Path) -> torch.Tensor:
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise DataError(
                f"calibration data {path} holds Python objects (it needs pickle); "
                "a data file never needs code: save numeric arrays with numpy.save"
            ) from None
        raise DataError(f"calibration data {path} is not a valid .npy file: {e}") from None
    except Exception as e:  # EOFError (a zero-byte file), tokenize.TokenError (a damaged header), OSError...
        raise DataError(f"calibration data {path} is not a valid .npy file: {type(e).__name__}: {e}") from None
    if not isinstance(array, np.ndarray):  # an .npz archive behind an .npy name
        raise DataError(f"calibration data {path} is not a .npy array ({type(array).__name__})")
    try:
        return torch.from_numpy(np.ascontiguousarray(array.astype(array.dtype.newbyteorder("="), copy=False)))
    except (TypeError, ValueError) as e:
        raise DataError(f"calibration data {path}: arrays of {array.dtype} cannot be model inputs ({e})") from None


def _torch_tensors(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DataError(
            f"calibration data {path} is not a weights-only file of tensors (it needs arbitrary pickle, "
            "which can run code); a data file never needs code: save the tensors as .npy or .safetensors"
        ) from None
    except Exception as e:  # RuntimeError, EOFError...: a truncated or corrupt file
        raise DataError(f"calibration data {path} is not a valid PyTorch file: {type(e).__name__}: {e}") from None


def _sentences(path: Path, entry: Any | None, batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    from modelpress.zoo.causal_lm import CausalLMEntry
    from modelpress.zoo.text import FolderEntry, dynamic_batches

    if not isinstance(entry, (FolderEntry, CausalLMEntry)):
        raise DataError(f"calibration data {path} is text, but the model is not a text model with a tokenizer")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"calibration data {path} is not UTF-8 text: {e}") from None
    if isinstance(entry, CausalLMEntry):
        return _windows(path, text, entry, batch_size)
    sentences = [line.strip() for line in text.splitlines() if line.strip()]
    if not sentences:
        raise DataError(f"calibration data {path} has no sentences")
    model = entry.model
    return list(dynamic_batches(model.tokenizer, sentences, batch_size, model.max_seq_length))


def _windows(path: Path, text: str, entry: Any, batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    """A causal LM calibrates on running text: non-overlapping windows of `entry.eval_length` tokens."""
    ids = torch.tensor(entry.model.tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    length = entry.eval_length
    if len(ids) < length:
        raise DataError(
            f"calibration data {path} holds {len(ids)} tokens, shorter than one sequence of {length}; "
            "give more text (e.g. 128 sequences' worth)"
        )
    windows = ids[: len(ids) // length * length].view(-1, length)
    return [(w, torch.ones_like(w)) for w in windows.split(batch_size)]


def _images(folder: Path, entry: Any | None, batch_size: int) -> list[tuple[torch.Tensor, ...]]:
    """A folder of images as `(pixel_values,)` batches (see the module docstring)."""
    from modelpress.zoo.causal_lm import CausalLMEntry
    from modelpress.zoo.images import DEFAULT_SIZE, find_images, open_image, spread, to_pixel_values
    from modelpress.zoo.text import FolderEntry

    if isinstance(entry, (FolderEntry, CausalLMEntry)):
        raise DataError(f"calibration data {folder} is a folder of images, but the model is a text model")
    preprocess = getattr(entry, "preprocess", None)
    shape = None if callable(preprocess) or entry is None else _image_shape(entry, folder)
    channels, size = shape if shape is not None else (3, (DEFAULT_SIZE, DEFAULT_SIZE))
    files = spread(find_images(folder, "calibration data"), MAX_CALIBRATION_IMAGES)
    images = [open_image(f.path, channels) for f in files]
    x = preprocess(images) if callable(preprocess) else to_pixel_values(images, size, channels=channels)
    check_finite([(x,)], folder)
    return [(x[i : i + batch_size],) for i in range(0, len(x), batch_size)]


def _image_shape(entry: Any, folder: Path) -> tuple[int, tuple[int, int]] | None:
    """(channels, (height, width)) of a model's one image input, from its example inputs; None if unknown."""
    try:
        inputs = entry.example_inputs(1)
    except Exception:  # an entry that cannot make inputs says nothing of their shape
        return None
    x = inputs[0] if len(inputs) == 1 else None
    if x is None or x.dim() != 4 or not x.is_floating_point() or x.shape[1] not in (1, 3):
        shapes = ", ".join(f"{list(t.shape)} {t.dtype}" for t in inputs)
        raise DataError(
            f"calibration data {folder} is a folder of images, but the model does not take one image batch "
            f"[batch, 1 or 3 channels, height, width] (it takes {shapes}); give its inputs as .npy or .safetensors"
        )
    return int(x.shape[1]), (int(x.shape[2]), int(x.shape[3]))
