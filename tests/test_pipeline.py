"""compress(): passes, both artifacts, parity and warnings in the report, measured side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modelpress.core.options import RunOptions
from modelpress.pipeline import compress
from modelpress.recipes.recipe import load_recipe


@pytest.fixture(scope="module")
def digits_int8(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("compress") / "digits"
    # keep_slower: both artifacts are checked here even where the tiny CNN's eager model is faster
    _, report = compress(
        "digits-cnn",
        "int8-static",
        out_dir=out,
        options=RunOptions(threads=2, batch_sizes=(1, 8), repeats=3, keep_slower=True),
    )
    return out, json.loads((out / "report.json").read_text())


def test_both_artifacts_match_the_compressed_model(digits_int8: tuple[Path, dict]) -> None:
    out, report = digits_int8
    assert {p.name for p in out.iterdir()} >= {"model.onnx", "model.pt2", "report.json", "report.md", "recipe.yaml"}
    bf16 = next(p for p in report["passes"] if p["name"] == "export/pt2")["stats"]["float_ops"] == "bf16"
    for kind in ("onnx", "pt2"):
        # a .pt2 whose float ops run in bf16 (where the CPU has bf16 dot products) rounds every conv's output
        bar = 0.9995 if kind == "pt2" and bf16 else 0.9999
        assert report["parity"][kind]["mean_cosine"] > bar, report["parity"]
        assert report["parity"][kind]["mean_cosine_to_original"] > 0.999
    assert load_recipe(out / "recipe.yaml").passes == load_recipe("int8-static").passes


def test_report_lists_export_warnings_and_keeps_quality(digits_int8: tuple[Path, dict]) -> None:
    _, report = digits_int8
    # ONNX Runtime's ConvInteger is slower than its float Conv: the export says so, per layer
    assert sum("float compute in ONNX" in w for w in report["warnings"]) == 3
    base = report["baseline"]["quality"]["value"]
    for artifact in report["artifacts"]:
        assert artifact["quality"]["value"] >= base - 0.003, artifact["name"]
        assert set(artifact["latency_ms"]) == {"1", "8"}
    assert report["compressed"]["size_bytes"] < report["baseline"]["size_bytes"]


def test_existing_output_folder_is_refused_unless_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from modelpress.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    argv = ["compress", "digits-cnn", "--recipe", "w8", "--out", str(out), "-b", "1", "--json"]
    assert main(argv) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"  # refused before any work: nothing touched
    assert main([*argv, "--overwrite"]) == 2  # a folder modelpress did not write is never replaced
    assert "not written by modelpress" in capsys.readouterr().err.replace("\n", " ")
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    assert main(argv) == 0  # an empty folder takes the output
    first = (out / "report.json").read_text()
    assert main([*argv, "--overwrite"]) == 0  # a folder modelpress wrote is replaced
    assert (out / ".modelpress").is_file() and (out / "report.json").read_text() != first


def test_the_speed_gate_stops_what_runs_past_its_limit(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import modelpress.measure.gate as gate
    import modelpress.measure.runner as runner

    def tiny(reference, factor=gate.SPEED_LIMIT_FACTOR):  # noqa: ANN001, ANN202 - every call overruns
        return {bs: 1e-6 for bs in reference.latency_ms}

    monkeypatch.setattr(gate, "call_limits", tiny)
    monkeypatch.setattr(runner, "call_limits", tiny)
    out = tmp_path / "gated"
    _, report = compress(
        "digits-cnn", "w8", out_dir=out, options=RunOptions(threads=2, batch_sizes=(1, 8), repeats=3, progress=False)
    )
    saved = json.loads((out / "report.json").read_text())
    assert saved["baseline"]["speed_gate"] is None and set(saved["baseline"]["latency_ms"]) == {"1", "8"}
    names = [a["name"] for a in saved["artifacts"]]
    assert names == ["digits-cnn (w8, eager)", "model.onnx (ONNX Runtime)", "model.pt2 (AOTInductor)"]
    for a in saved["artifacts"]:
        assert a["speed_gate"]["status"] == "stopped", a["name"]
        assert a["latency_ms"] == {} and a["quality"] is None  # nothing more was run on it
    assert saved["artifacts"][1]["size_bytes"] > 0  # the stopped file is still described...
    assert not (out / "model.onnx").exists() and not (out / "model.pt2").exists()  # ...but not written
    assert saved["artifacts"][2]["speed_gate"]["written"] is False and saved["artifacts"][2]["artifact"] is None
    stops = [w for w in saved["warnings"] if "stopped" in w]
    assert len(stops) == 3 and "limit (the original takes" in stops[1] and stops[1].endswith("--keep-slower keeps it)")
    assert any("no artifact is faster than the original" in w for w in saved["warnings"])
    assert "STOPPED (bs1" in (out / "report.md").read_text()

    kept = tmp_path / "kept"
    compress(
        "digits-cnn",
        "w8",
        out_dir=kept,
        options=RunOptions(threads=2, batch_sizes=(1,), repeats=2, progress=False, keep_slower=True),
    )
    assert (kept / "model.onnx").exists() and (kept / "model.pt2").exists()


def test_an_artifact_its_parity_gate_refuses_leaves_the_others(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import modelpress.export.onnx as onnx_export

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise onnx_export.ExportError("the int8 graph does not compute what the quantized model computes: test")

    monkeypatch.setattr(onnx_export, "export_onnx", refuse)
    out = tmp_path / "one"
    _, report = compress(
        "digits-cnn",
        "w8",
        out_dir=out,
        options=RunOptions(threads=2, batch_sizes=(1,), repeats=2, progress=False, keep_slower=True),
    )
    assert (out / "model.pt2").exists() and not (out / "model.onnx").exists()
    assert "model.onnx not written: the int8 graph does not compute" in " ".join(report.warnings)
    assert [a.name for a in report.artifacts] == ["digits-cnn (w8, eager)", "model.pt2 (AOTInductor)"]
    monkeypatch.setattr(onnx_export, "export_onnx", refuse)
    with pytest.raises(onnx_export.ArtifactsRefused, match="model.onnx: the int8 graph"):
        compress(
            "digits-cnn", load_recipe_with_export("onnx"), out_dir=tmp_path / "none", options=RunOptions(progress=False)
        )
    assert not (tmp_path / "none").exists()
    from modelpress.core.errors import BadInputError

    assert issubclass(onnx_export.ArtifactsRefused, BadInputError)  # the CLI's refusal: exit 2, nothing written


def load_recipe_with_export(*kinds: str):  # noqa: ANN201 - the w8 recipe exporting only `kinds`
    import dataclasses

    return dataclasses.replace(load_recipe("w8"), export=kinds)


def test_the_report_says_where_int8_activations_compute_in_float(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from modelpress.core import environment
    from modelpress.core.report import Report
    from modelpress.pipeline import _warn_inexact_int8
    from modelpress.primitives.affine import QuantScheme
    from modelpress.quant.modules import ActSpec, QLinear

    scheme = QuantScheme(8, True, "channel")
    static = torch.nn.Sequential(QLinear.from_float(torch.nn.Linear(8, 4), scheme, ActSpec("static"), (-1.0, 1.0)))
    weight_only = torch.nn.Sequential(QLinear.from_float(torch.nn.Linear(8, 4), scheme, ActSpec("none")))
    avx2 = {**environment.cpu_info(), "int8": "avx2"}
    monkeypatch.setattr(environment, "cpu_info", lambda: avx2)
    report = Report(model="m", environment={"cpu": avx2})
    _warn_inexact_int8(weight_only, report)
    assert report.warnings == []  # weight-only int8 does not use the saturating GEMM
    _warn_inexact_int8(static, report)
    assert len(report.warnings) == 1 and "int8 unit is avx2 (no VNNI or AMX)" in report.warnings[0]


def test_one_cache_dir_reaches_the_loader_and_the_passes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from modelpress import pipeline

    default = tmp_path / "default-cache"
    monkeypatch.setenv("MODELPRESS_CACHE", str(default))
    seen = []

    class Stop(Exception):
        pass

    def first_pass(model, cfg, ctx):  # noqa: ANN001, ANN202
        seen.append(ctx.cache_dir)
        raise Stop

    monkeypatch.setattr(pipeline, "apply", first_pass)
    with pytest.raises(Stop):
        compress(
            "breast-cancer", "int8-dynamic", options=RunOptions(cache_dir=tmp_path / "given", threads=1, progress=False)
        )
    assert seen == [tmp_path / "given"]
    assert len(list((tmp_path / "given" / "breast-cancer").glob("*.safetensors"))) == 1
    assert not default.exists()


def test_a_pruned_model_is_also_written_sparse_and_the_report_says_the_runtimes_store_it_dense(tmp_path):
    from modelpress.prune.sparse_format import load_sparse

    out = tmp_path / "sparse"
    options = RunOptions(threads=2, batch_sizes=(1,), repeats=2, progress=False, keep_slower=True)
    model, report = compress("digits-cnn", "prune-sparse-80", out_dir=out, options=options)
    sparse = out / "model.sparse.safetensors"
    assert sparse.exists() and sparse.stat().st_size < 0.4 * (out / "model.onnx").stat().st_size
    state = load_sparse(sparse)
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name  # a bit-exact round trip
    record = next(p for p in report.passes if p.name == "export/sparse")
    assert record.stats["zero_share"] > 0.75
    assert any("store them dense" in w and "model.sparse.safetensors" in w for w in report.warnings)
    dense_out = tmp_path / "dense"
    compress("digits-cnn", "w8", out_dir=dense_out, options=options)
    assert not (dense_out / "model.sparse.safetensors").exists()  # integer codes are no pruned weights
