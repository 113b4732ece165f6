"""Causal LMs: a Hugging Face *ForCausalLM folder or a GGUF loads as one, is scored by held-out perplexity
with a greedy continuation beside it, and compresses end to end."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch

from modelpress.cli import main
from modelpress.core.errors import ModelLoadError
from modelpress.loading import resolve
from modelpress.zoo.causal_lm import CausalLM, split_text


def _tiny_llama(folder: Path, layers: int = 2, seed: int = 0) -> Path:
    """A random-weight Llama (GQA, tied embeddings) with a 512-token BPE tokenizer trained on the train split."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llm_families import tokenizer

    fast = tokenizer()
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=fast.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=512,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


def test_a_causal_lm_folder_loads_as_one_with_its_head_tied(tiny_llama):
    loaded = resolve(str(tiny_llama))
    assert loaded.kind == "causal-lm" and isinstance(loaded.model, CausalLM)
    lm = loaded.model.lm
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()  # tied, not copied
    ids, mask = loaded.entry.example_inputs(2)
    assert ids.shape == (2, 128) and bool(mask.all())
    assert loaded.model(ids, mask).shape == (2, 128, lm.config.vocab_size)


def test_perplexity_on_held_out_text_with_a_greedy_continuation(tiny_llama, tmp_path):
    loaded = resolve(str(tiny_llama))
    entry, model = loaded.entry, loaded.model
    test, val = entry.evaluate(model), entry.validation_quality(model)
    assert test.name == "perplexity" and not test.higher_is_better
    vocab = model.config.vocab_size
    # random weights: close to (and below or near) a uniform guess over the vocabulary, never absurd
    assert 0.5 * vocab < test.value < 2 * vocab and val is not None and val.value != test.value
    assert test.details["split"] == "test" and test.details["tokens"] == 32 * 256
    assert isinstance(test.details["greedy"], str) and test.details["greedy"]
    # the splits are disjoint parts of the text
    train, valid, held = split_text("train"), split_text("validation"), split_text("test")
    assert held not in train and valid not in train and len(train) > 7 * len(held)
    # the user's own text
    text = tmp_path / "mine.txt"
    text.write_text(split_text("test")[:20_000], encoding="utf-8")
    own = entry.evaluate(model, text)
    assert own.details["split"] == str(text) and own.value > 0


def test_weights_for_more_layers_than_the_config_are_refused(tiny_llama, tmp_path):
    bigger = _tiny_llama(tmp_path / "six", layers=3)
    config = json.loads((bigger / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (bigger / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="belong to no part of the model"):
        resolve(str(bigger))


def test_a_folder_without_its_tokenizer_is_refused(tiny_llama, tmp_path, capsys):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_llama / name, folder / name)
    assert main(["bench", str(folder), "--no-quality"]) == 2
    assert "needs its tokenizer" in capsys.readouterr().err.replace("\n", " ")


def test_a_gguf_of_an_unknown_architecture_is_refused(tmp_path):
    import gguf

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "not-an-arch")
    writer.add_tensor("w", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="GGUF architecture 'not-an-arch' cannot be mapped.*llama"):
        resolve(str(path))


def test_compress_a_causal_lm_folder_end_to_end(tiny_llama, tmp_path, capsys):
    """w4 on a causal LM: ONNX, .pt2, a GGUF for llama.cpp and a folder for onnxruntime-genai, each checked
    against the compressed model."""
    out = tmp_path / "out"
    argv = ["compress", str(tiny_llama), "--recipe", "w4", "--out", str(out), "--threads", "1", "-b", "1", "--json"]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    base = report["baseline"]["quality"]
    assert base["name"] == "perplexity" and "greedy" in base["details"]
    onnx = next(a for a in report["artifacts"] if a["name"].startswith("model.onnx"))
    # 4-bit weights (sensitive layers at 8): the perplexity moves little (measured on the held-out split)
    assert abs(onnx["quality"]["value"] - base["value"]) / base["value"] < 0.02
    assert report["parity"]["onnx"]["mean_cosine"] > 0.999
    assert report["data"]["evaluation"]["split"] == "test" and report["data"]["calibration"]["split"] == "train"
    gguf = next(p for p in report["passes"] if p["name"] == "export/gguf")["stats"]
    assert (out / "model.gguf").is_file() and gguf["quantized"] > 0 and gguf["readback_mean_cosine"] > 0.999
    genai = next(p for p in report["passes"] if p["name"] == "export/genai")["stats"]  # onnxruntime-genai folder
    assert genai["matmul_nbits"] > 0 and genai["parity_mean_cosine"] > 0.999
    assert {"model.onnx", "genai_config.json", "tokenizer.json"} <= {p.name for p in (out / "genai").iterdir()}
    generation = report["baseline"]["throughput"]["generation"]  # eager forms: greedy decoding with the KV cache
    assert generation["bs1"]["decode_tokens_per_s"] > 0 and generation["bs8"]["prefill_tokens_per_s"] > 0
    markdown = (out / "report.md").read_text()
    assert "## Generation (128-token prompt, greedy, KV cache)" in markdown
    assert "## Greedy continuation of 'The Python interpreter is'" in markdown and "| model.onnx" in markdown


@pytest.mark.slow
def test_smollm2_loads_from_its_package_and_scores_a_sane_perplexity(cache_dir):
    from modelpress.zoo import get_entry

    entry = get_entry("smollm2-135m")
    model = entry.load()
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    quality = entry.evaluate(model)
    assert 5 < quality.value < 30, quality  # measured 12.19 per token on the held-out documentation
    assert len(quality.details["greedy"].split()) >= 3


def test_calibration_text_for_a_causal_lm_is_cut_into_sequences(tiny_llama, tmp_path):
    from modelpress.calibration import load_calibration
    from modelpress.core.errors import DataError

    loaded = resolve(str(tiny_llama))
    text = tmp_path / "calib.txt"
    text.write_text(split_text("train")[:40_000], encoding="utf-8")
    batches = load_calibration(text, loaded.entry)
    ids, mask = batches[0]
    assert ids.shape[1] == loaded.entry.eval_length and ids.shape == mask.shape
    short = tmp_path / "short.txt"
    short.write_text("Only a few words.", encoding="utf-8")
    with pytest.raises(DataError, match="shorter than one sequence of 256"):
        load_calibration(short, loaded.entry)


def test_magnitude_pruning_of_a_causal_lm_is_recovered_by_distillation_from_the_original(tiny_llama):
    """2:4 magnitude pruning cut without recovery moves the logits far from the original's; the entry's
    recovery (distillation from the original on the train split) brings them back, and the 2:4 pattern holds."""
    from modelpress.core.context import Context
    from modelpress.prune import NMPruneConfig, prune

    loaded = resolve(str(tiny_llama))
    entry, original = loaded.entry, loaded.model
    ids = entry.example_inputs(4)[0]

    def cosine(model: torch.nn.Module) -> float:
        with torch.no_grad():
            a, b = original(ids).float(), model(ids).float()
        return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())

    cut = prune(original, NMPruneConfig(n=2, m=4, importance="magnitude", finetune_epochs=0))
    ctx = Context(train_fn=functools.partial(entry.finetune, lr=1e-3))  # random weights: a larger step than 1e-4
    recovered = prune(original, NMPruneConfig(n=2, m=4, importance="magnitude", finetune_epochs=4), ctx=ctx)
    assert ctx.report.passes[-1].stats["finetuned"] is True
    # the tied head and its table stay dense: the recovery closes at least a third of what the cut moved
    assert 1 - cosine(recovered) < (2 / 3) * (1 - cosine(cut)), (cosine(recovered), cosine(cut))
    weight = recovered.lm.model.layers[0].mlp.down_proj.weight.detach()
    assert ((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all()  # the pruned weights stayed zero
    with pytest.raises(Exception, match="epochs must be >= 1"):
        entry.finetune(recovered, epochs=0)
    record = entry.data_record("training")  # what the report names: the train split's windows, all drawn from
    assert record["split"] == "train" and record["unit"] == "windows of 256 tokens" and record["count"] > 8
