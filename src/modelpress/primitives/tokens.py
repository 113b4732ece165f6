"""Token states and their attention masks: which positions are real, sentence embeddings by pooling, padded
tokenizer batches, and the sentence embeddings of any model callable.

Shared by the zoo's text encoders, recovery after pruning (`prune.recovery.distill_text_encoder`), the
export parity gates and ONNX quantization, which compare outputs at the real token positions only.

    >>> emb = embed(model, model.tokenizer, sentences, pooling="mean", normalize=True)   # (n, hidden)
    >>> mask = real_positions((input_ids, attention_mask), token_states)                 # (B, T) bool, or None
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from modelpress.core.errors import DataError

POOLING_MODES = ("mean", "cls")


def real_positions(inputs: Sequence[torch.Tensor], output: torch.Tensor) -> torch.Tensor | None:
    """The attention mask (B, T) as booleans when `inputs` are (input_ids, attention_mask) of `output`'s rows."""
    if len(inputs) != 2 or inputs[1].is_floating_point() or output.dim() < 3:
        return None
    mask = inputs[1]
    if tuple(mask.shape) != tuple(output.shape[:2]) or not bool(((mask == 0) | (mask == 1)).all()):
        return None
    return mask.bool()


def pool(
    token_states: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean", normalize: bool = False
) -> torch.Tensor:
    """Mean over the real (mask == 1) tokens, or the first ([CLS]) token; then L2-normalize if asked."""
    if pooling == "mean":
        mask = attention_mask.unsqueeze(-1).to(token_states.dtype)  # (B, S, 1)
        out = (token_states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    elif pooling == "cls":
        out = token_states[:, 0]
    else:
        raise ValueError(f"pooling must be one of {POOLING_MODES}, got {pooling!r}")
    return F.normalize(out, p=2, dim=-1) if normalize else out


# ---------------------------------------------------------------- tokenizing and embedding


def dynamic_batches(
    tokenizer: Any, sentences: Sequence[str], batch_size: int, max_seq_length: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`(input_ids, attention_mask)` int64 batches, each padded to its longest sentence."""
    for start in range(0, len(sentences), batch_size):
        enc = tokenizer(
            list(sentences[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_seq_length,
            return_tensors="pt",
        )
        yield enc["input_ids"].long(), enc["attention_mask"].long()


def embed(
    model_fn: Callable[..., Any],
    tokenizer: Any,
    sentences: Sequence[str],
    batch_size: int = 64,
    max_seq_length: int = 256,
    pooling: str = "mean",
    normalize: bool = True,
) -> torch.Tensor:
    """Sentence embeddings `[n, hidden]` (float32) of `sentences`, in their order.

    `model_fn(input_ids, attention_mask)` may return the token states as a tensor, a numpy array
    (e.g. ONNX Runtime), or a tuple/list whose first element they are.
    """
    # Batching sentences of similar length wastes less compute on padding.
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    ordered = [sentences[i] for i in order]
    chunks = []
    with torch.inference_mode():
        for input_ids, attention_mask in dynamic_batches(tokenizer, ordered, batch_size, max_seq_length):
            out = model_fn(input_ids, attention_mask)
            if isinstance(out, (tuple, list)):
                out = out[0]
            states = torch.from_numpy(np.asarray(out)) if not isinstance(out, torch.Tensor) else out
            chunks.append(pool(states.float(), attention_mask, pooling, normalize))
    if not chunks:
        raise DataError("embed needs at least one sentence")
    result = torch.empty_like(torch.cat(chunks))
    result[torch.tensor(order)] = torch.cat(chunks)
    return result
