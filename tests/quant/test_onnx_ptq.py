"""ONNX in: graphs from Keras and from our own export, quantized by ORT's tools under our configs and data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from modelpress.core import Context, RunOptions
from modelpress.core.errors import BadInputError, DataError
from modelpress.export.onnx import export_onnx
from modelpress.quant import (
    DynamicQuantConfig,
    MixedPrecisionConfig,
    ObserverConfig,
    QATConfig,
    StaticQuantConfig,
    WeightOnlyConfig,
)
from modelpress.quant.onnx_ptq import fidelity, graph_inputs, quantize_onnx


@pytest.fixture(scope="module")
def keras_dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The textbook network, Dense(10) on 8 inputs then Dense(1), trained briefly and exported by Keras."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip("Keras runs another backend here")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(10, activation="relu"), keras.layers.Dense(1)])
    model.compile("adam", "mse")
    x = np.random.default_rng(0).random((256, 8), dtype=np.float32)
    model.fit(x, (x * np.arange(8)).sum(1, keepdims=True), epochs=3, verbose=0)
    path = tmp_path_factory.mktemp("keras") / "dense.onnx"
    model.export(str(path), format="onnx", verbose=False)
    return path


def batches(n: int = 8, width: int = 8) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(16, width, generator=g),) for _ in range(n)]


def ops(path: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize(
    ("config", "expected_op"),
    [
        (DynamicQuantConfig(), "DynamicQuantizeLinear"),
        (StaticQuantConfig(observer=ObserverConfig(kind="mse")), "QuantizeLinear"),
    ],
)
def test_keras_graph_quantized_with_our_data(keras_dense: Path, tmp_path: Path, config, expected_op: str) -> None:
    out = tmp_path / "q.onnx"
    ctx = Context(options=RunOptions(progress=False))
    stats = quantize_onnx(keras_dense, out, config, batches(), ctx)
    assert expected_op in ops(out) and stats["nodes"] == 2
    assert stats["fidelity"] > 0.999  # first output against the float graph over the calibration batches
    assert fidelity(keras_dense, out, batches(4), graph_inputs(onnx.load(str(out)))) > 0.999
    assert any("entropy" in w for w in ctx.report.warnings) == isinstance(config, StaticQuantConfig)  # mse -> KL


def test_sensitive_nodes_stay_float_to_meet_the_budget(keras_dense: Path, tmp_path: Path) -> None:
    out = tmp_path / "mixed.onnx"
    cfg = MixedPrecisionConfig(base=StaticQuantConfig(), high_bits=None, max_drop=1e-9)  # nothing may be lost
    stats = quantize_onnx(keras_dense, out, cfg, batches(), Context(options=RunOptions(progress=False)))
    assert set(stats["sensitivity"]) == {"/MatMul", "/MatMul_1"} or len(stats["sensitivity"]) == 2
    assert len(stats["float_nodes"]) == 2 and stats["fidelity"] == pytest.approx(1.0, abs=1e-9)
    loose = quantize_onnx(keras_dense, out, cfg.__class__(base=StaticQuantConfig(), high_bits=None, max_drop=0.01),
                          batches(), Context(options=RunOptions(progress=False)))  # fmt: skip
    assert "float_nodes" not in loose  # already within budget: everything quantized, no search


def test_cli_compresses_an_onnx_graph(keras_dense: Path, tmp_path: Path) -> None:
    from modelpress.cli import main

    data = tmp_path / "calib.npy"
    np.save(data, np.random.default_rng(2).random((64, 8), dtype=np.float32))
    argv = ["compress", str(keras_dense), "-r", "int8-static", "--data", str(data), "-o", str(tmp_path / "out")]
    assert main([*argv, "-b", "1", "--json"]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["parity"]["onnx"]["mean_cosine_to_original"] > 0.999
    assert report["compressed"]["params"] == report["baseline"]["params"] == 10 * 8 + 10 + 10  # (1-value bias skipped)
    assert "QuantizeLinear" in ops(tmp_path / "out" / "model.onnx")


def test_our_text_encoder_export_goes_through(tmp_path: Path) -> None:
    from transformers import BertConfig, BertModel

    from modelpress.zoo.text import TextEncoder

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    encoder = TextEncoder(BertModel(cfg, add_pooling_layer=False).eval(), tokenizer=None)
    ids = torch.randint(1, 100, (2, 12))
    fp32 = export_onnx(encoder, (ids, torch.ones_like(ids)), tmp_path / "bert.onnx")
    data = [(torch.randint(1, 100, (4, 12)), torch.ones(4, 12, dtype=torch.int64)) for _ in range(4)]
    stats = quantize_onnx(
        fp32, tmp_path / "int8.onnx", DynamicQuantConfig(), data, Context(options=RunOptions(progress=False))
    )
    assert stats["nodes"] == 8 and stats["fidelity"] > 0.99  # per layer: fused attention, its output, FFN1, FFN2
    assert {"QAttention", "MatMulInteger"} <= set(ops(tmp_path / "int8.onnx"))
    assert (tmp_path / "int8.onnx").stat().st_size < fp32.stat().st_size


def test_bad_input(keras_dense: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.onnx"
    with pytest.raises(DataError, match="needs calibration batches"):
        quantize_onnx(keras_dense, out, StaticQuantConfig(), None)
    with pytest.raises(DataError, match="the ONNX graph takes 1"):
        quantize_onnx(keras_dense, out, StaticQuantConfig(), [(torch.rand(2, 8), torch.rand(2, 8))])
    with pytest.raises(BadInputError, match="needs a PyTorch model"):
        quantize_onnx(keras_dense, out, QATConfig(), batches())
    with pytest.raises(BadInputError, match="ONNX Runtime runs 4-bit group-wise weights"):
        quantize_onnx(keras_dense, out, WeightOnlyConfig(bits=8), batches())
    no_weights = tmp_path / "relu.onnx"
    export_onnx(nn.ReLU(), torch.randn(2, 8), no_weights)
    with pytest.raises(BadInputError, match="no MatMul, Gemm or Conv"):
        quantize_onnx(no_weights, out, DynamicQuantConfig(), batches())
    assert not out.exists() and not list(tmp_path.glob(".x*"))


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (DynamicQuantConfig(bits=4), "DynamicQuantConfig.bits = 4"),
        (DynamicQuantConfig(act_symmetric=True), "DynamicQuantConfig.act_symmetric = True"),
        (StaticQuantConfig(dynamic_layers=("fc",)), "StaticQuantConfig.dynamic_layers"),
        (StaticQuantConfig(weight_observer="mse"), "StaticQuantConfig.weight_observer = 'mse'"),
        (StaticQuantConfig(layer_bits={"0": 6}), "StaticQuantConfig.layer_bits"),
        (WeightOnlyConfig(bits=4, granularity="group", group_size=32, embedding_bits=8), "embedding_bits = 8"),
        (MixedPrecisionConfig(base=StaticQuantConfig(), high_bits=None, metric="task"), "metric = 'task'"),
    ],
)
def test_a_field_onnx_runtime_cannot_honour_is_refused(tmp_path: Path, config, field: str) -> None:
    graph = tmp_path / "mlp.onnx"
    export_onnx(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval(), (torch.randn(2, 8),), graph)
    out = tmp_path / "q.onnx"
    with pytest.raises(BadInputError, match=f"{field}.*cannot be honoured for an ONNX model"):
        quantize_onnx(graph, out, config, batches(), Context(options=RunOptions(progress=False)))
    assert not out.exists()


def test_defaults_onnx_runtime_does_not_follow_are_named_in_the_report(tmp_path: Path) -> None:
    graph = tmp_path / "mlp.onnx"
    export_onnx(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval(), (torch.randn(2, 8),), graph)
    ctx = Context(options=RunOptions(progress=False))
    with pytest.warns(UserWarning, match="per tensor"):
        quantize_onnx(graph, tmp_path / "q.onnx", DynamicQuantConfig(), batches(), ctx)
    assert any("not per token" in w for w in ctx.report.warnings)
    assert any("embedding tables stay float" in w for w in ctx.report.warnings)
