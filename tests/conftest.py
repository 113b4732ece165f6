"""Shared fixtures: offline mode, a private cache dir, fixed threads."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _fixed_threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield


@pytest.fixture(autouse=True)
def _denormals_back_on():
    """Each test starts with IEEE denormals: an ONNX Runtime session created with our graphs' hint
    (`session.set_denormal_as_zero`) turns them off for the calling thread for the rest of the process."""
    yield
    torch.set_flush_denormal(False)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory):
    """One cache for the session, so trained zoo weights are reused across tests."""
    path = tmp_path_factory.mktemp("modelpress-cache")
    os.environ["MODELPRESS_CACHE"] = str(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Small models: one torch thread is as fast on idle cores and far faster on a busy, shared CPU.

    Modules opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_lm(cache_dir):
    """The small tiny-lm, trained once per session (cached in the session cache dir), and its perplexity."""
    from modelpress.zoo.tinylm import SMALL_SPEC, load_tiny_lm, perplexity

    model = load_tiny_lm(cache_dir, SMALL_SPEC)
    return model, perplexity(model)
