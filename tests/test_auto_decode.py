"""Auto mode's decode objective: a causal LM's candidates ranked by the tokens/s their GenAI folders decode."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from modelpress.auto import AutoSearch, auto_compress
from modelpress.auto.decode import ms_per_token, recompute_generation
from modelpress.cli import main
from modelpress.core.errors import BadInputError
from modelpress.core.options import RunOptions

QUIET = {"threads": 1, "batch_sizes": (1, 8), "repeats": 3, "progress": False}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llm_families import build_family

    return build_family("llama", tmp_path_factory.mktemp("lm") / "llama")


def test_a_causal_lm_is_searched_by_decode_speed_and_gets_a_genai_folder(tmp_path: Path, llama: Path) -> None:
    search = AutoSearch(max_drop="5%", candidates=("float", "rtn-w8-g128", "rtn-w4-g32", "int8-dynamic"),
                        cache=False)  # fmt: skip
    chosen, report = auto_compress(str(llama), search, out_dir=tmp_path / "out", options=RunOptions(**QUIET))
    auto = report.auto
    assert auto["objective"] == "decode" and auto["batch_size"] == 1
    rows = {r["recipe"]: r for r in auto["candidates"]}
    # int8 activations have no decoder with a KV cache: refused before anything is built, with the reason
    assert rows["int8-dynamic"]["status"] == "refused" and "KV cache" in rows["int8-dynamic"]["why"]
    assert all(r["artifact"].startswith("genai/") for name, r in rows.items() if name != "int8-dynamic")
    # the original's decode (eager, with transformers' KV cache) is the speed every folder is held to
    base = ms_per_token(report.baseline.throughput["generation"])
    assert 0 < base < float("inf")
    win = next(r for r in auto["candidates"] if r["status"] == "chosen")
    assert win["stage"] == "measured" and win["relative_drop"] <= 0.05 and 0 < win["p50_ms"] < float("inf")
    measured = [r for r in auto["candidates"] if r["stage"] == "measured" and r["within_budget"]]
    assert win["p50_ms"] == min(r["p50_ms"] for r in measured) or auto["runoff"].get("chosen")
    gen = chosen.throughput["generation"]["bs1"]
    assert win["p50_ms"] == pytest.approx(1e3 / gen["decode_tokens_per_s"])
    assert chosen.speed_gate["speedup"]["decode"] == pytest.approx(base / win["p50_ms"], rel=1e-2)
    # the quality shown is the folder's own graph on held-out text, not the torch model's
    assert chosen.quality.name == "perplexity" and chosen.validation_quality is not None
    out = tmp_path / "out"
    assert (out / "genai" / "genai_config.json").is_file() and (out / "genai" / "tokenizer.json").is_file()
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["export"][0] == "genai"
    if win["recipe"].startswith("rtn"):  # group-wise codes: llama.cpp's file beside it
        assert recipe["export"] == ["genai", "gguf"] and (out / "model.gguf").is_file()
    assert not (out / "model.onnx").exists() and not (out / "model.pt2").exists()
    md = (out / "report.md").read_text()
    assert "ms/token (decode bs1)" in md and "x decode" in md
    assert json.loads((out / "report.json").read_text())["auto"]["objective"] == "decode"


def test_the_decode_objective_is_refused_for_a_model_without_a_decoder(tmp_path: Path, cache_dir: Path, capsys) -> None:
    with pytest.raises(BadInputError, match="decode objective is for causal language models"):
        auto_compress("digits-cnn", AutoSearch(max_drop=0.01, objective="decode"), out_dir=tmp_path / "a",
                      options=RunOptions(**QUIET))  # fmt: skip
    assert not (tmp_path / "a").exists()
    code = main(["compress", "digits-cnn", "--auto", "--max-drop", "0.01", "--objective", "fastest", "--out",
                 str(tmp_path / "b")])  # fmt: skip
    assert code == 2 and "auto, latency, size or decode" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_an_original_without_a_kv_cache_decodes_by_recomputing_the_sequence() -> None:
    import torch

    calls = []

    def model(ids: torch.Tensor) -> torch.Tensor:
        calls.append(ids.shape[1])
        return torch.nn.functional.one_hot(ids % 7, 7).float()

    out = recompute_generation(model, torch.arange(5), new_tokens=4, repeats=1)
    assert out["kv_cache"] is False and out["prompt_tokens"] == 5 and out["bs1"]["decode_tokens_per_s"] > 0
    assert calls == [5, 6] + [5, 6, 7, 8]  # a warm-up of 2, then every new token re-reads the whole sequence


@pytest.mark.slow
def test_a_second_decode_search_reuses_what_the_first_measured(tmp_path: Path, llama: Path, cache_dir: Path) -> None:
    search = AutoSearch(max_drop="5%", candidates=("rtn-w8-g128", "rtn-w8-channel"))
    options = RunOptions(**QUIET, cache_dir=cache_dir)
    _, first = auto_compress(str(llama), search, out_dir=tmp_path / "a", options=options)
    _, second = auto_compress(str(llama), search, out_dir=tmp_path / "b", options=options)
    assert first.auto["chosen"] == second.auto["chosen"] and second.auto["cache"]["hits"] > 0
    assert (tmp_path / "b" / "genai" / "genai_config.json").is_file() and (tmp_path / "b" / "model.gguf").is_file()
