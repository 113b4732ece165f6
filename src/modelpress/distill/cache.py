"""Offline teacher outputs: computed once, kept on disk as safetensors, read memory-mapped per batch.

The file's metadata holds a fingerprint of the teacher weights, the data and the settings that
shape the outputs, so a stale cache is never reused: a mismatch recomputes, a corrupt file is
reported with a warning and recomputed. Files are written atomically.

    >>> cache = teacher_cache(path, teacher, samples, cfg, layers=[1, 3, 5])
    >>> targets = cache.lookup(batch)        # {"embedding": (B, H), "hidden.5": (B, T, H), ...}
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from modelpress.core.atomic import atomic_path
from modelpress.core.errors import DataError
from modelpress.distill.config import DistillConfig
from modelpress.distill.data import Batch, Samples, TokenSamples
from modelpress.distill.outputs import Outputs, model_outputs

FORMAT = "1"


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of the model's class and state dict (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_fingerprint(
    teacher: nn.Module, samples: Samples, cfg: DistillConfig, layers: Sequence[int], features: Sequence[str]
) -> str:
    """What determines the cached outputs: teacher weights, data, requested outputs and storage dtype."""
    settings = {
        "format": FORMAT,
        "layers": list(layers),
        "features": list(features),
        "dtype": cfg.cache_dtype,
        "max_seq_length": cfg.max_seq_length,
    }
    h = hashlib.sha256(weights_fingerprint(teacher).encode())
    h.update(samples.fingerprint().encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h.hexdigest()


class TeacherCache:
    """An open cache file; `lookup(batch)` returns the batch's teacher outputs, padded like the batch."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = path
        self._file = safe_open(str(path), framework="pt")
        meta = self._file.metadata() or {}
        if meta.get("fingerprint") != fingerprint:
            raise _Stale(f"fingerprint {meta.get('fingerprint', '(none)')[:12]} != {fingerprint[:12]}")
        self.samples = int(meta["samples"])
        self.keys: list[str] = json.loads(meta["keys"])
        self.ragged: set[str] = set(json.loads(meta["ragged"]))
        names = set(self._file.keys())
        missing = [k for k in self.keys if k not in names or (k in self.ragged and f"{k}.offsets" not in names)]
        if missing:
            raise DataError(f"teacher cache {path} lacks tensors {missing}")
        self._offsets = {k: self._file.get_tensor(f"{k}.offsets") for k in self.ragged}

    def lookup(self, batch: Batch) -> Outputs:
        out: Outputs = {}
        mask = batch.attention_mask
        for key in self.keys:
            sl = self._file.get_slice(key)
            if key in self.ragged:
                offsets = self._offsets[key]
                rows = [sl[int(offsets[i]) : int(offsets[i + 1])] for i in batch.index.tolist()]  # each (T_i, ...)
                width = mask.shape[1] if mask is not None else max(len(r) for r in rows)
                padded = rows[0].new_zeros((len(rows), width, *rows[0].shape[1:]))  # (B, T, ...)
                for b, r in enumerate(rows):
                    padded[b, : len(r)] = r
                out[key] = padded.float()
            else:
                out[key] = torch.stack([sl[i : i + 1][0] for i in batch.index.tolist()]).float()
        return out


class _Stale(Exception):
    pass


def _compute(
    teacher: nn.Module,
    samples: Samples,
    cfg: DistillConfig,
    layers: Sequence[int],
    features: Sequence[str],
    progress: Any,
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Run the teacher over all samples in order; token-level outputs of text are stored unpadded."""
    dtype = torch.float16 if cfg.cache_dtype == "float16" else torch.float32
    chunks: dict[str, list[torch.Tensor]] = {}
    ragged: set[str] = set()
    text = isinstance(samples, TokenSamples)
    bs = max(cfg.batch_size, 64)
    was_training = teacher.training
    teacher.eval()
    with torch.no_grad():
        for start in progress(range(0, len(samples), bs), "teacher outputs"):
            batch = samples.collate([samples[i] for i in range(start, min(start + bs, len(samples)))])
            mask = batch.attention_mask
            for key, value in model_outputs(teacher, batch, layers, features).items():
                value = value.detach().to(dtype)
                if text and mask is not None and value.dim() >= 3 and value.shape[:2] == mask.shape:
                    ragged.add(key)
                    chunks.setdefault(key, []).extend(v[: int(m.sum())] for v, m in zip(value, mask, strict=True))
                else:
                    chunks.setdefault(key, []).append(value)
    teacher.train(was_training)
    tensors: dict[str, torch.Tensor] = {}
    for key, parts in chunks.items():
        tensors[key] = torch.cat(parts).contiguous()
        if key in ragged:
            lengths = torch.tensor([0] + [len(p) for p in parts])
            tensors[f"{key}.offsets"] = lengths.cumsum(0)
    return tensors, sorted(chunks), sorted(ragged)


def teacher_cache(
    path: str | Path,
    teacher: nn.Module,
    samples: Samples,
    cfg: DistillConfig,
    layers: Sequence[int] = (),
    features: Sequence[str] = (),
    *,
    write: bool = True,
    progress: Any = None,
) -> TeacherCache:
    """Open the cache at `path` when its fingerprint matches, else compute the teacher outputs and write it.

    With `write=False` (non-zero ranks of a multi-process run) the file must already be valid.
    """
    path = Path(path)
    fingerprint = cache_fingerprint(teacher, samples, cfg, layers, features)
    if path.exists():
        try:
            cache = TeacherCache(path, fingerprint)
            if cache.samples == len(samples):
                return cache
            reason = f"it holds {cache.samples} samples, the data has {len(samples)}"
        except _Stale as e:
            reason = f"it was made for another teacher, data or settings ({e})"
        except (SafetensorError, OSError, ValueError, KeyError, DataError) as e:
            reason = f"it is unreadable ({type(e).__name__}: {e})"
            if write:
                warnings.warn(f"teacher cache {path} is corrupt: {reason}; recomputing", stacklevel=2)
        if not write:
            raise DataError(f"teacher cache {path} cannot be used: {reason}")
    elif not write:
        raise DataError(f"teacher cache {path} does not exist (rank 0 writes it first)")
    tensors, keys, ragged = _compute(teacher, samples, cfg, layers, features, progress or (lambda it, _d: it))
    meta = {
        "fingerprint": fingerprint,
        "format": FORMAT,
        "samples": str(len(samples)),
        "keys": json.dumps(keys),
        "ragged": json.dumps(ragged),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return TeacherCache(path, fingerprint)
