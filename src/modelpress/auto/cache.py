"""What auto mode measured, kept under `RunOptions.cache_dir` so that a second run reuses it.

A result is reused only on the same model (its weights' hash), data (calibration batches, evaluation
folder), machine (CPU model, flags and caps, torch / ONNX Runtime / modelpress versions, threads) and
batch sizes: all of these go into the key of the run's folder, `auto/<key>/`. Each candidate's
screening and full measurement is one JSON file named by the hash of its recipe and the settings it
was measured with; the chosen candidate's files are kept beside it so a second run writes them
without rebuilding. A file that cannot be read is treated as absent (and measured again).

    >>> cache = SearchCache.open(loaded, data, options)
    >>> cache.get("screen", recipe_yaml) or cache.put("screen", recipe_yaml, {...})
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from modelpress.core.atomic import atomic_dir, atomic_write_text
from modelpress.core.environment import cpu_info, environment
from modelpress.core.options import RunOptions
from modelpress.loading import LoadedModel

CACHE_VERSION = 1  # bumped when what a cached entry holds changes


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def machine_key(options: RunOptions) -> dict[str, Any]:
    """What timings depend on: CPU model, family, flags and caps, library versions, threads, batch sizes."""
    import torch

    cpu = cpu_info()
    env = environment(options.threads)
    return {
        "cpu": {k: cpu.get(k) for k in ("model", "family", "features", "onednn_max_isa", "int8", "bf16", "aten")},
        "versions": env.get("versions", {}),
        "threads": options.threads or torch.get_num_threads(),
        "batch_sizes": list(options.batch_sizes),
    }


def data_key(data: Any, eval_data: Path | None) -> str:
    """Hash of the calibration batches (None: the zoo entry's own) and of the evaluation folder's files."""
    import torch

    h = hashlib.sha256()
    if data is not None:
        for batch in data if isinstance(data, (list, tuple)) else [data]:
            for item in batch if isinstance(batch, (list, tuple)) else [batch]:
                if isinstance(item, torch.Tensor):
                    h.update(item.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
                else:
                    h.update(repr(item).encode())
    if eval_data is not None:
        files = [eval_data] if eval_data.is_file() else sorted(p for p in eval_data.rglob("*") if p.is_file())
        for p in files:
            info = p.stat()
            h.update(f"{p}:{info.st_size}:{info.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def model_key(loaded: LoadedModel) -> str:
    """Hash of the model's class and weights (a zoo model retrained differently is another model); an ONNX
    model's: its file (path, size, modification time) and the entry whose metric it borrows."""
    from modelpress.distill.cache import weights_fingerprint

    model = loaded.model
    if loaded.kind == "onnx" and loaded.path is not None:
        info = loaded.path.stat()
        entry = loaded.entry.name if loaded.entry is not None else None
        return _digest(loaded.name, loaded.kind, str(loaded.path.resolve()), info.st_size, info.st_mtime_ns, entry)
    weights = weights_fingerprint(model) if hasattr(model, "state_dict") else str(loaded.path)
    return _digest(loaded.name, loaded.kind, weights)


class SearchCache:
    """The run's folder of measured candidates; `enabled=False` reads and writes nothing."""

    def __init__(self, folder: Path, enabled: bool = True) -> None:
        self.folder = folder
        self.enabled = enabled
        self.hits = 0

    @classmethod
    def open(cls, loaded: LoadedModel, data: Any, options: RunOptions, enabled: bool = True) -> SearchCache:
        key = _digest(CACHE_VERSION, model_key(loaded), data_key(data, options.eval_data), machine_key(options))
        return cls(Path(options.cache_dir) / "auto" / key, enabled)

    def _path(self, stage: str, what: Any) -> Path:
        return self.folder / f"{stage}-{_digest(stage, what)}.json"

    def get(self, stage: str, what: Any) -> dict[str, Any] | None:
        """The entry of `stage` ("baseline", "screen", "full") for `what` (a recipe and its settings)."""
        if not self.enabled:
            return None
        try:
            value = json.loads(self._path(stage, what).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(value, dict):
            return None
        self.hits += 1
        return value

    def put(self, stage: str, what: Any, value: dict[str, Any]) -> dict[str, Any]:
        if self.enabled:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self._path(stage, what), json.dumps(value, default=str) + "\n")
            except OSError:  # a cache that cannot be written costs time on the next run, nothing else
                pass
        return value

    def files(self, what: Any) -> Path | None:
        """The kept files of the candidate `what`, where a run kept them."""
        path = self.folder / f"files-{_digest('files', what)}"
        return path if self.enabled and path.is_dir() else None

    def keep_files(self, what: Any, source: Path) -> None:
        """Keep a copy of the folder `source` (the chosen candidate's artifacts) for the next run."""
        if not self.enabled:
            return
        target = self.folder / f"files-{_digest('files', what)}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            with atomic_dir(target) as tmp:
                for item in source.iterdir():
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        except OSError:
            pass
