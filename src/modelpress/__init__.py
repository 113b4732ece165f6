"""modelpress: make trained neural networks smaller and faster with a measured, bounded loss of quality.

>>> import modelpress
>>> model = modelpress.load_model("minilm")
>>> stats = modelpress.bench(["minilm", "digits-cnn"], batch_sizes=(1, 32), threads=2)
"""

from __future__ import annotations

from typing import Any

from modelpress._version import __version__ as __version__

__all__ = [
    # models
    "load_model",
    "resolve",
    # compression
    "quantize",
    "distill",
    "prune",
    "compress",
    "auto_compress",
    "AutoSearch",
    "RunOptions",
    # measurement
    "bench",
    # core
    "Config",
    "Context",
    "Report",
    "register",
    "apply",
]

_LAZY = {
    "load_model": "modelpress.loading",
    "resolve": "modelpress.loading",
    "bench": "modelpress.measure",
    "quantize": "modelpress.quant",
    "prune": "modelpress.prune",
    "compress": "modelpress.pipeline",
    "auto_compress": "modelpress.auto",
    "AutoSearch": "modelpress.auto",
    "RunOptions": "modelpress.core",
    "Config": "modelpress.core",
    "Context": "modelpress.core",
    "Report": "modelpress.core",
    "register": "modelpress.core",
    "apply": "modelpress.core",
}


def __getattr__(name: str) -> Any:
    # Lazy so that `import modelpress` stays fast and the CLI starts quickly.
    if name == "distill":  # the subpackage itself: modelpress.distill.distill(teacher, student, data, config)
        import importlib

        return importlib.import_module("modelpress.distill")
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'modelpress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
