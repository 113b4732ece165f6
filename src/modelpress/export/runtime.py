"""Runtimes that execute an artifact: ONNX Runtime sessions and AOTInductor packages (`core.runtime`).

They live in `modelpress.core.runtime`, below every layer that runs an artifact (loading, measuring,
the export gates, ONNX quantization); this module keeps their names importable from `export`.

    >>> onnx_model = OnnxModel("out/model.onnx", threads=2)
    >>> token_states = onnx_model(input_ids, attention_mask)
"""

from modelpress.core.runtime import SESSION_CONFIG_KEY, AotiModel, OnnxModel

__all__ = ["OnnxModel", "AotiModel", "SESSION_CONFIG_KEY"]
