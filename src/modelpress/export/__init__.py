"""Export and runtimes."""

from modelpress.export.runtime import AotiModel, OnnxModel

__all__ = ["OnnxModel", "AotiModel"]
