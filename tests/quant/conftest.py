"""Fixtures shared by the weight-quantization tests."""

from __future__ import annotations

import pytest

from modelpress.zoo.tinylm import SMALL_SPEC, load_tiny_lm, perplexity


@pytest.fixture(scope="module")
def tiny_lm(cache_dir):
    """The small tiny-lm, trained once per session (cached in the session cache dir), and its perplexity."""
    model = load_tiny_lm(cache_dir, SMALL_SPEC)
    return model, perplexity(model)
