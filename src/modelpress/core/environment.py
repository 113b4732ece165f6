"""What a measurement ran on: library versions, CPU model and features, thread count."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from functools import lru_cache
from typing import Any

_PACKAGES = ("torch", "onnx", "onnxruntime", "transformers", "numpy", "modelpress")
_CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_info() -> dict[str, Any]:
    """CPU model name, logical cores and the SIMD/matrix features that decide kernel choice."""
    name = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name") and ":" in line:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and ":" in line:
                    flags = set(line.split(":", 1)[1].split())
                if flags and name:
                    break
    except OSError:
        pass
    return {
        "model": name,
        "logical_cores": os.cpu_count(),
        "features": [f for f in _CPU_FLAGS if f in flags],
    }


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def environment(threads: int | None = None) -> dict[str, Any]:
    """The `environment` block of report.json."""
    import torch

    return {
        "versions": versions(),
        "cpu": cpu_info(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "platform": platform.platform(),
    }
