from __future__ import annotations

import re

import pytest

from cpu_features import lacks
from modelpress.cli import main
from modelpress.core import ConfigError
from modelpress.quant import DynamicQuantConfig, MixedPrecisionConfig, StaticQuantConfig, WeightOnlyConfig
from modelpress.quant.smoothquant import SmoothQuantConfig
from modelpress.recipes.recipe import builtin_names, load_recipe, parse_recipe


def test_builtin_recipes_load_and_round_trip():
    names = builtin_names()
    assert {"int8-dynamic", "int8-static", "int8-smooth", "w8", "w4"} <= set(names)
    expected = {
        "int8-dynamic": DynamicQuantConfig,
        "int8-static": StaticQuantConfig,
        "w8": WeightOnlyConfig,
        "w4": MixedPrecisionConfig,
        "int8-smooth": SmoothQuantConfig,
    }
    for name, cls in expected.items():
        recipe = load_recipe(name)
        assert recipe.description and isinstance(recipe.passes[0], cls)
        assert parse_recipe(recipe.to_dict(), name) == recipe
    assert load_recipe("int8-static").passes[0].observer.kind == "mse"
    assert load_recipe("w4").passes[0].base.bits == 4
    smooth_then_static = load_recipe("int8-smooth").passes
    assert isinstance(smooth_then_static[1], StaticQuantConfig) and smooth_then_static[1].dynamic_layers


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"passes": [{"type": "StaticQuantConfig"}], "exports": []}, "unknown key 'exports'; allowed keys"),
        ({"passes": []}, "'passes' must be a non-empty list"),
        ({"passes": [{"type": "StaticQuantConfig", "bitz": 8}]}, "pass 1: unknown key 'bitz' for StaticQuantConfig"),
        ({"passes": [{"type": "WeightOnlyConfig", "bits": 12}]}, "pass 1: bits must be in [2, 8], got 12"),
        ({"passes": [{"type": "Quantum"}]}, "unknown config type 'Quantum'"),
        ({"passes": [{"type": "DynamicQuantConfig"}], "export": ["tflite"]}, "'export' must be a list of onnx, pt2"),
        (["not", "a", "mapping"], "expected a mapping"),
        (
            {"passes": [{"type": "StaticQuantConfig"}, {"type": "StructuredPruneConfig", "ffn_ratio": 0.25}]},
            "pass 2 (StructuredPruneConfig, prune) comes after pass 1 (StaticQuantConfig, quantize)",
        ),
        (
            {"passes": [{"type": "WeightOnlyConfig"}, {"type": "DistillConfig"}]},
            "add 'order: as-written' to run them as written",
        ),
        ({"passes": [{"type": "WeightOnlyConfig"}], "order": "random"}, "'order' must be one of stages, as-written"),
    ],
)
def test_bad_recipes_name_the_problem(data, fragment):
    with pytest.raises(ConfigError) as exc:
        parse_recipe(data, "mine")
    assert fragment in str(exc.value)


def test_stage_order_can_be_overridden_and_round_trips():
    data = {"passes": [{"type": "WeightOnlyConfig"}, {"type": "UnstructuredPruneConfig"}], "order": "as-written"}
    recipe = parse_recipe(data, "mine")
    assert recipe.order == "as-written" and parse_recipe(recipe.to_dict(), "mine") == recipe
    prune_distill_quant = [
        {"type": "StructuredPruneConfig", "ffn_ratio": 0.25},
        {"type": "DistillConfig"},
        {"type": "StaticQuantConfig"},
    ]
    assert parse_recipe({"passes": prune_distill_quant}, "ok").order == "stages"


def test_recipe_files(tmp_path):
    path = tmp_path / "my.yaml"
    path.write_text("passes:\n  - {type: DynamicQuantConfig, act_granularity: tensor}\nexport: [onnx]\n")
    recipe = load_recipe(path)
    assert recipe.name == "my" and recipe.export == ("onnx",)
    assert recipe.passes[0].act_granularity == "tensor"
    bad = tmp_path / "bad.yaml"
    bad.write_text("passes: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_recipe(bad)
    with pytest.raises(ConfigError, match="neither a built-in recipe"):
        load_recipe(tmp_path / "missing.yaml")


def test_cli_recipes_lists_descriptions(capsys):
    assert main(["recipes"]) == 0
    text = capsys.readouterr().out
    assert "int8-static" in text and "calibrated" in text


def test_cli_compress_bad_recipe_and_data(capsys, tmp_path):
    assert main(["compress", "digits-cnn", "--recipe", "nope", "--out", str(tmp_path / "o")]) == 2
    assert "neither a built-in recipe" in capsys.readouterr().err
    empty = tmp_path / "empty.npy"
    import numpy as np

    np.save(empty, np.zeros((0, 1, 8, 8), dtype=np.float32))
    assert (
        main(["compress", "digits-cnn", "--recipe", "int8-static", "--data", str(empty), "--out", str(tmp_path / "o")])
        == 2
    )
    assert "is empty" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_lowering_options_are_checked_and_kept(tmp_path):
    from modelpress.core.errors import ConfigError

    text = "passes: [{type: WeightOnlyConfig, bits: 8}]\nlowering: {pt2_float: fp32, int8_sources: auto}\n"
    (tmp_path / "r.yaml").write_text(text)
    rec = load_recipe(tmp_path / "r.yaml")
    assert rec.lowering_option("pt2_float") == "fp32" and rec.lowering_option("int8_sources") == "auto"
    assert rec.to_dict()["lowering"] == {"pt2_float": "fp32"}
    for bad, message in (
        ("{pt2_float: fp8}", "lowering pt2_float: 'fp8' is not allowed; choose one of auto, bf16, fp32"),
        ("{gemm: amx}", "unknown lowering key 'gemm'; allowed: pt2_float, int8_sources"),
        ("[bf16]", "'lowering' must be a mapping"),
    ):
        (tmp_path / "bad.yaml").write_text(f"passes: [{{type: WeightOnlyConfig, bits: 8}}]\nlowering: {bad}\n")
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_recipe(tmp_path / "bad.yaml")


@lacks("amx_int8")
def test_an_amx_only_lowering_is_refused_on_a_cpu_without_amx(tmp_path, capsys):
    from modelpress.cli import main

    recipe = tmp_path / "signed.yaml"
    recipe.write_text("passes: [{type: DynamicQuantConfig}]\nlowering: {int8_sources: signed}\n")
    out = tmp_path / "out"
    assert main(["compress", "digits-cnn", "--recipe", str(recipe), "--out", str(out)]) == 2
    assert "needs the CPU feature amx_int8" in capsys.readouterr().err
    assert not out.exists()


def test_a_config_that_is_not_a_pass_is_refused_in_a_recipe() -> None:
    with pytest.raises(ConfigError, match="pass 1: LayerFilter is not a pass .*passes: .*GPTQConfig"):
        parse_recipe({"passes": [{"type": "LayerFilter"}]}, "r")
