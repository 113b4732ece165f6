"""Fixtures for distillation tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def digits_teacher(cache_dir):  # noqa: ANN001, ANN201
    from modelpress.zoo.digits import load_digits_cnn

    return load_digits_cnn(cache_dir)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # noqa: ANN001, ANN202 - every distillation test: tiny models, one thread
    yield
