"""Breadth: every causal-LM recipe on a tiny random-weight model of each causal-LM family transformers ships.

Each cell runs `modelpress compress FOLDER --recipe R --data calib.txt` through the CLI and ends in one of
two outcomes, decided per cell in `REFUSED` below so that a change of behaviour fails the test:

- OK: exit 0; `model.onnx` written and its parity gate passed (as report.json says); the held-out perplexity
  of the original and of every form in the report; every export the recipe lists written, or the report
  says why not (GGUF: written for the layouts llama.cpp's llama / qwen2 take, refused with the reason for
  the others);
- refused: exit 2, one `error:` line naming the reason, no traceback, nothing in or beside `--out`.

The default run takes w4-gptq on every family (sequential calibration, GGUF); the whole matrix is
`slow`. The `.pt2` package (AOTInductor, about 20 s a model here) is left out of the matrix's recipes and
built once per family by `test_pt2_package_per_family` (slow).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from llm_families import FAMILIES, build_family
from modelpress.cli import main
from modelpress.recipes.recipe import load_recipe
from modelpress.zoo.causal_lm import split_text

pytestmark = pytest.mark.usefixtures("one_thread")

REQUIRED = ("llama", "qwen2", "mistral", "phi3", "gemma", "gemma3", "gpt2", "opt")
OPTIONAL = ("qwen3", "phi", "falcon")
RECIPES = (
    "w8", "w4", "w4-gptq", "w4-awq", "int8-dynamic", "int8-smooth", "int8-static",
    "prune-2of4", "prune-sparse-80", "prune-channels-50", "prune-transformer", "prune-wanda-2of4", "prune-sparsegpt-50",
    "distill-lm-depth", "distill-lm-width",
)  # fmt: skip
DEFAULT_RECIPES = ("w4-gptq",)  # in the default run for every required family; the rest is slow
GGUF_LAYOUTS = ("llama", "qwen2", "mistral")  # what llama.cpp's llama / qwen2 layouts take

# (family or "*", recipe) -> the reason a refusal must name; every other cell must be OK
_NOT_TRACEABLE = r"cannot trace CausalLM for channel pruning: .* broke tracing"
_NO_HEADS = r"heads_ratio=0\.3334 but CausalLM has no recognized attention layer"
_NOT_NARROWED = r"CausalLM has no attention layer \(Llama-, BERT-style\) or FFN .* that a narrower width can be cut"
REFUSED: dict[tuple[str, str], str] = {
    # torch.fx cannot trace transformers' mask construction (data-dependent control flow); the model is then
    # traced part by part, and the MLPs of these hold nothing the graph can cut (a fused gate_up_proj split by
    # chunk, GPT-2's Conv1D, Falcon's dense_h_to_4h)
    **{
        (f, "prune-channels-50"): _NOT_TRACEABLE + r".*traced part by part, none of the"
        for f in ("phi3", "gpt2", "falcon")
    },
    # head and FFN pruning know BERT's, Llama's (o_proj / out_proj / dense), OPT's and Phi's layouts; these fuse
    # their projections (qkv_proj + gate_up_proj, Conv1D c_attn + c_fc, query_key_value + dense_h_to_4h)
    **{(f, "prune-transformer"): _NO_HEADS for f in ("phi3", "gpt2", "falcon")},
    **{(f, "distill-lm-width"): _NOT_NARROWED for f in ("phi3", "gpt2", "falcon")},
}
# smallest mean cosine of the compressed eager model's logits to the original's (random weights: the
# logits are near uniform, so this is where a broken pass shows, rather than in the perplexity)
MIN_COSINE_TO_ORIGINAL = {"w8": 0.999, "int8": 0.99, "w4": 0.95, "prune-2of4": 0.7, "prune": 0.4, "distill": 0.4}


def expected_refusal(family: str, recipe: str) -> str | None:
    return REFUSED.get((family, recipe), REFUSED.get(("*", recipe)))


# cells known to fail their check, each with what was measured; strict: a cell that starts passing fails
OPEN: dict[tuple[str, str], str] = {
    ("gemma3", "prune-2of4"): "magnitude 2:4, 80 steps of recovery by distillation: logits' cosine to the original "
    "0.51 (0.39 without recovery; others >= 0.7)",
    ("gemma3", "prune-sparse-80"): "magnitude 80%, 240 steps of recovery by distillation: logits' cosine to the "
    "original 0.16 (0.06 without recovery)",
}


def _cells() -> list:
    cells = []
    for family in (*REQUIRED, *OPTIONAL):
        for recipe in RECIPES:
            marks = [] if family in REQUIRED and recipe in DEFAULT_RECIPES else [pytest.mark.slow]
            if (family, recipe) in OPEN:
                marks.append(pytest.mark.xfail(strict=True, reason=OPEN[family, recipe]))
            cells.append(pytest.param(family, recipe, id=f"{family}-{recipe}", marks=marks))
    return cells


@pytest.fixture(scope="session")
def llm_folder(tmp_path_factory: pytest.TempPathFactory):
    """family -> its tiny model's folder, built once per session on first use."""
    root, built = tmp_path_factory.mktemp("llm-families"), {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = build_family(family, root / family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llm-calib") / "calib.txt"  # about 70 windows of 256 tokens
    path.write_text(split_text("train")[:60_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def recipe_files(tmp_path_factory: pytest.TempPathFactory):
    """recipe -> the built-in recipe as a file, its exports less `.pt2` (named like the built-in one)."""
    root, written = tmp_path_factory.mktemp("llm-recipes"), {}

    def get(name: str) -> Path:
        if name not in written:
            spec = load_recipe(name).to_dict()
            spec["export"] = [e for e in spec["export"] if e != "pt2"]
            written[name] = root / f"{name}.yaml"
            written[name].write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        return written[name]

    return get


def run_cell(folder: Path, recipe: str | Path, calib: Path, out: Path, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    argv = ["compress", str(folder), "--recipe", str(recipe), "--data", str(calib), "--out", str(out),
            "--threads", "1", "-b", "1", "--keep-slower", "--json"]  # fmt: skip
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(code: int, err: str, out: Path, reason: str) -> None:
    """Exit 2, one message naming `reason`, no traceback, nothing written in or beside `out`."""
    flat = " ".join(err.split())
    assert code == 2, err
    assert "Traceback" not in err and flat.startswith("error:"), err
    assert re.search(reason, flat), flat
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no partial, no lock


def assert_ok(family: str, recipe: str, exports: list[str], out: Path, err: str) -> dict:
    """Artifacts written and checked, perplexity measured for every form, each export written or explained."""
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    warnings = " | ".join(report.get("warnings", []))
    assert (out / ".modelpress").exists() and (out / "report.md").is_file() and (out / "recipe.yaml").is_file()
    assert (out / "model.onnx").is_file(), warnings
    parity = report["parity"]
    # the gate: the graph computes the compressed model, or differs from it within the model's own spread
    onnx_parity = parity["onnx"]
    assert onnx_parity["mean_cosine"] >= 0.999 or (
        onnx_parity["mean_cosine"] >= 1 - 2 * (1 - onnx_parity["noise_floor"]) and "within its own spread" in warnings
    ), parity
    floor = next(v for k, v in MIN_COSINE_TO_ORIGINAL.items() if recipe.startswith(k))
    assert parity["eager_mean_cosine_to_original"] >= floor, (parity, warnings)
    base = report["baseline"]["quality"]
    assert base["name"] == "perplexity" and math.isfinite(base["value"]) and base["details"]["split"] == "test"
    for row in report["artifacts"]:  # the compressed eager model and each artifact
        value = row["quality"]["value"]
        assert math.isfinite(value) and abs(value - base["value"]) < 0.25 * base["value"], (row["name"], value)
    for kind in exports:  # written, or the report says why not
        name = "genai" if kind == "genai" else f"model.{kind}"
        written = (out / name).exists()
        assert written or re.search(rf"{re.escape(name)}/? not written", warnings), (kind, warnings)
        if kind == "gguf":
            assert written == (family in GGUF_LAYOUTS), warnings
            gguf = next((p for p in report["passes"] if p["name"] == "export/gguf"), None)
            assert not written or gguf["stats"]["readback_mean_cosine"] >= 0.999
            if not written:
                assert (
                    "GGUF export writes llama, mistral, qwen2 models (llama.cpp's llama / qwen2 layout), not '"
                    in warnings
                )
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return report


@pytest.mark.parametrize(("family", "recipe"), _cells())
def test_recipe_on_family(family, recipe, llm_folder, calib_text, recipe_files, tmp_path, capsys):
    out = tmp_path / "out"
    rec = recipe_files(recipe)
    code, _, err = run_cell(llm_folder(family), rec, calib_text, out, capsys)
    reason = expected_refusal(family, recipe)
    if reason is not None:
        assert_refused(code, err, out, reason)
        return
    assert code == 0, err
    assert_ok(family, recipe, yaml.safe_load(rec.read_text())["export"], out, err)


@pytest.mark.slow
@pytest.mark.parametrize("family", REQUIRED)
def test_pt2_package_per_family(family, llm_folder, calib_text, tmp_path, capsys):
    """The shipped int8-dynamic recipe, `.pt2` included: AOTInductor compiles each family's graph."""
    out = tmp_path / "out"
    code, _, err = run_cell(llm_folder(family), "int8-dynamic", calib_text, out, capsys)
    assert code == 0, err
    report = assert_ok(family, "int8-dynamic", ["onnx", "pt2"], out, err)
    assert (out / "model.pt2").is_file() and report["parity"]["pt2"]["mean_cosine"] >= 0.995


def test_every_causal_lm_recipe_is_in_the_matrix():
    """A new built-in recipe for causal LMs joins the matrix (or is named here as not one)."""
    from modelpress.recipes.recipe import builtin_names

    not_for_llms = {"distill-cnn-quarter", "distill-l3-int8", "distill-l4-int8", "distill-minilm-l3",
                    "medical-mixed", "speech-ondevice", "vision-realtime"}  # fmt: skip
    assert set(builtin_names()) - not_for_llms <= set(RECIPES)
    assert set(FAMILIES) == {*REQUIRED, *OPTIONAL}


# ---- bad input on the command line: one clear message, exit 2, nothing written -------------------------


def _compress(model: Path | str, out: Path, capsys, *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["compress", str(model), "--out", str(out), "--threads", "1", "-b", "1", *extra])
    return code, capsys.readouterr().err


def test_a_gguf_of_an_architecture_we_cannot_map_is_refused(tmp_path, capsys):
    import gguf
    import numpy as np

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "not-an-arch")
    writer.add_tensor("w", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    code, err = _compress(path, tmp_path / "out", capsys, "--recipe", "w4-gptq")
    assert_refused(
        code, err, tmp_path / "out", r"GGUF architecture 'not-an-arch' cannot be mapped .*supported: .*llama"
    )


def test_a_folder_without_its_tokenizer_is_refused(llm_folder, tmp_path, capsys):
    import shutil

    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(llm_folder("qwen2") / name, folder / name)
    code, err = _compress(folder, tmp_path / "out", capsys, "--recipe", "int8-dynamic")
    assert_refused(code, err, tmp_path / "out", r"cannot load the tokenizer of .*needs its tokenizer")


def test_calibration_text_shorter_than_one_sequence_is_refused(llm_folder, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Only a few words of calibration text.", encoding="utf-8")
    code, err = _compress(llm_folder("llama"), tmp_path / "out", capsys, "--recipe", "w4-gptq", "--data", str(short))
    assert_refused(code, err, tmp_path / "out", r"holds \d+ tokens, shorter than one sequence of 256")


def test_a_group_size_wider_than_every_layer_is_refused(llm_folder, calib_text, tmp_path, capsys):
    recipe = tmp_path / "wide.yaml"  # the tiny models' Linear layers read 64 or 128 values
    recipe.write_text("passes:\n  - {type: GPTQConfig, bits: 4, group_size: 512}\nexport: [onnx]\n", encoding="utf-8")
    code, err = _compress(
        llm_folder("llama"), tmp_path / "out", capsys, "--recipe", str(recipe), "--data", str(calib_text)
    )
    reason = r"group_size 512 is larger than the input width of every layer it quantizes \(the widest reads 128"
    assert_refused(code, err, tmp_path / "out", reason)


def test_an_lm_too_large_for_the_memory_left_is_refused_before_loading(llm_folder, tmp_path, capsys, monkeypatch):
    import psutil

    class Little:
        available = 2**18  # 0.25 MiB left

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Little())
    loaded = []
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loaded.append(a))
    code, err = _compress(llm_folder("llama"), tmp_path / "out", capsys, "--recipe", "w4-gptq")
    reason = (
        r"has about [\d,.]+M? parameters: compressing it in float32 needs about [\d.]+ MiB of memory "
        r"\(3x its float32 weights\), and 0\.2 MiB is available; nothing was loaded"
    )
    assert_refused(code, err, tmp_path / "out", reason)
    assert not loaded  # refused from the config alone
