"""tiny-lm: data splits, deterministic training, perplexity, the weights cache and its corruption handling."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from modelpress.core.errors import DataError
from modelpress.zoo.base import get_entry, zoo_names
from modelpress.zoo.tinylm import (
    DEFAULT_SPEC,
    SMALL_SPEC,
    TinyLM,
    TinyLMEntry,
    cache_path,
    decode,
    encode,
    load_tiny_lm,
    perplexity,
    text_tokens,
    windows,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small(cache_dir):
    return load_tiny_lm(cache_dir, SMALL_SPEC)


def test_registered_in_the_zoo():
    assert "tiny-lm" in zoo_names()
    entry = get_entry("tiny-lm")
    assert entry.name == "tiny-lm" and entry.input_names == ("input_ids",)


def test_held_out_text_is_the_last_tenth_and_disjoint():
    train, test = text_tokens("train"), text_tokens("test")
    total = len(train) + len(test)
    assert abs(len(test) / total - 0.1) < 1e-3
    assert int(train.max()) < 256 and int(test.min()) >= 0
    assert decode(encode("Python's docs ✓")) == "Python's docs ✓"
    with pytest.raises(DataError, match="split must be 'train' or 'test'"):
        text_tokens("dev")
    with pytest.raises(DataError, match="asked for 0"):
        windows(test, 128, 0)


def test_fingerprint_follows_the_spec():
    assert SMALL_SPEC.fingerprint() != DEFAULT_SPEC.fingerprint()
    assert dataclasses.replace(SMALL_SPEC, steps=251).fingerprint() != SMALL_SPEC.fingerprint()
    assert SMALL_SPEC.fingerprint() == dataclasses.replace(SMALL_SPEC).fingerprint()


def test_trained_model_predicts_held_out_text(small):
    ppl = perplexity(small)
    untrained = perplexity(TinyLM(SMALL_SPEC).eval(), max_windows=8)
    assert ppl < 7.0  # bytes: uniform is 256, a unigram model ~ 25
    assert untrained > 100
    assert math.isfinite(ppl)


def test_entry_inputs_and_quality(cache_dir, small):
    entry = TinyLMEntry(SMALL_SPEC)
    (x,) = entry.example_inputs(3)
    assert x.shape == (3, SMALL_SPEC.seq_len) and x.dtype == torch.long
    batches = entry.calibration_data(20, 8)
    assert [b[0].shape[0] for b in batches] == [8, 8, 4]
    quality = entry.evaluate(small)
    assert quality.name == "perplexity" and quality.higher_is_better is False
    assert quality.value == pytest.approx(perplexity(small))
    with torch.no_grad():
        logits = small(x)
    assert logits.shape == (3, SMALL_SPEC.seq_len, 256)


def test_cache_is_reused_and_a_corrupt_file_is_retrained(cache_dir, small):
    path = cache_path(SMALL_SPEC, cache_dir)
    assert path.is_file()
    again = load_tiny_lm(cache_dir, SMALL_SPEC)
    assert all(torch.equal(a, b) for a, b in zip(small.state_dict().values(), again.state_dict().values(), strict=True))
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # a flipped byte in the weights: the checksum no longer matches
    quick = dataclasses.replace(SMALL_SPEC, steps=2)
    quick_path = cache_path(quick, cache_dir)
    quick_path.parent.mkdir(parents=True, exist_ok=True)
    quick_path.write_bytes(bytes(data))  # a corrupt file under a (2-step) spec's name
    with pytest.warns(UserWarning, match="corrupt tiny-lm cache"):
        load_tiny_lm(cache_dir, quick)
    assert len(quick_path.read_bytes()) == len(data) and quick_path.read_bytes() != bytes(data)  # retrained
