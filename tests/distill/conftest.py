"""Fixtures for distillation tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def digits_teacher(cache_dir):  # noqa: ANN001, ANN201
    from modelpress.zoo.digits import load_digits_cnn

    return load_digits_cnn(cache_dir)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one thread is faster than two, and far faster on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
