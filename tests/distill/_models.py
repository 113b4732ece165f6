"""Small models and data for distillation tests: a tiny BERT text encoder, an MLP, blobs."""

from __future__ import annotations

import torch
from torch import nn

from modelpress.distill import TokenSamples


def tiny_bert(layers: int = 4, hidden: int = 32, seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel

    from modelpress.zoo.text import TextEncoder

    config = BertConfig(
        vocab_size=100,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = BertModel(config, add_pooling_layer=False)
    return TextEncoder(backbone.eval(), tokenizer=None, pooling="mean", normalize=True, max_seq_length=64)


def token_samples(n: int = 24, seed: int = 0) -> TokenSamples:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 12, (n,), generator=gen)
    return TokenSamples([torch.randint(1, 100, (int(k),), generator=gen) for k in lengths], pad_id=0)


class MLP(nn.Module):
    """(B, 8) -> logits (B, 4); dropout so that RNG state matters for resume tests."""

    def __init__(self, hidden: int = 16, dropout: float = 0.0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.head = nn.Linear(hidden, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def mlp(hidden: int = 16, seed: int = 0, dropout: float = 0.0) -> MLP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP(hidden, dropout)


def blobs(n: int = 96, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()  # 4 classes
    return x, y
