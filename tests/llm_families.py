"""Tiny random-weight Hugging Face causal-LM folders, one per family transformers ships.

Each folder holds `config.json`, `model.safetensors` and a 512-token byte-level BPE tokenizer trained
on the documentation's train split (the same tokenizer for every family: the families differ in their
blocks, not in how text becomes ids). Hidden 64, 2 layers: built and saved in about a second.

    >>> folder = build_family("gemma3", tmp_path / "gemma3")    # Gemma3ForCausalLM, text only
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

HIDDEN, LAYERS, HEADS, INTERMEDIATE, POSITIONS = 64, 2, 4, 128, 512
SPECIAL = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}  # the tokenizer's <|endoftext|>


@lru_cache(maxsize=1)
def tokenizer() -> Any:
    """A byte-level BPE tokenizer (512 tokens) trained on the first 100k characters of the train split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from modelpress.zoo.causal_lm import split_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    tok.train_from_iterator([split_text("train")[:100_000]], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def _llama_like(config_cls: str, model_cls: str, **extra: Any) -> Callable[[int], Any]:
    def build(vocab: int) -> Any:
        import transformers

        config = getattr(transformers, config_cls)(
            vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=POSITIONS, **SPECIAL, **extra,
        )  # fmt: skip
        return getattr(transformers, model_cls)(config)

    return build


def _gpt2(vocab: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=POSITIONS, **SPECIAL)
    return GPT2LMHeadModel(config)


def _opt(vocab: int) -> Any:
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=vocab, hidden_size=HIDDEN, ffn_dim=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=POSITIONS, word_embed_proj_dim=HIDDEN,
        **SPECIAL,
    )  # fmt: skip
    return OPTForCausalLM(config)


def _phi(vocab: int) -> Any:
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(
        vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=POSITIONS, partial_rotary_factor=0.5, **SPECIAL,
    )  # fmt: skip
    return PhiForCausalLM(config)


def _falcon(vocab: int) -> Any:
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(
        vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False,
        max_position_embeddings=POSITIONS, **SPECIAL,
    )  # fmt: skip
    return FalconForCausalLM(config)


# family -> builder(vocab) of a random-weight model; the keys are the matrix's rows
FAMILIES: dict[str, Callable[[int], Any]] = {
    "llama": _llama_like("LlamaConfig", "LlamaForCausalLM", tie_word_embeddings=True),
    "qwen2": _llama_like("Qwen2Config", "Qwen2ForCausalLM", tie_word_embeddings=True),
    "mistral": _llama_like("MistralConfig", "MistralForCausalLM", sliding_window=None),
    "phi3": _llama_like("Phi3Config", "Phi3ForCausalLM"),
    "gemma": _llama_like("GemmaConfig", "GemmaForCausalLM", head_dim=HIDDEN // HEADS),
    "gemma3": _llama_like(
        "Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=HIDDEN // HEADS, sliding_window=64, query_pre_attn_scalar=16
    ),
    "qwen3": _llama_like("Qwen3Config", "Qwen3ForCausalLM", head_dim=HIDDEN // HEADS, tie_word_embeddings=True),
    "gpt2": _gpt2,
    "opt": _opt,
    "phi": _phi,
    "falcon": _falcon,
}


def build_family(family: str, folder: Path, seed: int = 0) -> Path:
    """A random-weight `family` causal LM with its tokenizer, saved in `folder` (seeded: the same bytes each run)."""
    tok = tokenizer()
    torch.manual_seed(seed)
    model = FAMILIES[family](len(tok)).eval()
    folder.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder
