"""Recovery after pruning: fine-tune through the context's training loop, or distill a text encoder.

`finetune` runs `ctx.train_fn` (a zoo entry's `finetune`, or any `fn(model) -> model`), passing
`epochs` when the function takes it. `distill_text_encoder` is a training loop for sentence
encoders without labels: the pruned model learns to reproduce the unpruned model's sentence
embeddings on real sentences (teacher embeddings are computed once).

    >>> ctx = Context(train_fn=functools.partial(distill_text_encoder, teacher=original, sentences=train))
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelpress.core.context import Context
from modelpress.core.errors import DataError, NotAvailableError
from modelpress.core.options import RunOptions
from modelpress.primitives.tokens import dynamic_batches, embed


def _takes_epochs(fn: Any) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "epochs" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def finetune(model: nn.Module, ctx: Context, epochs: int, what: str) -> tuple[nn.Module, bool]:
    """Fine-tune `model` with `ctx.train_fn` for `epochs` (when the function takes it); returns (model, ran).

    A model without a training loop is returned as is, with a warning the report lists.
    """
    if ctx.train_fn is None:
        raise DataError(
            f"{what} needs a training loop: use a zoo model with training data, or Context(train_fn=...) / "
            "prune(..., train_fn=...); set finetune_epochs: 0 to prune without recovery"
        )
    try:
        out = ctx.train_fn(model, epochs=epochs) if _takes_epochs(ctx.train_fn) else ctx.train_fn(model)
    except NotAvailableError as e:
        ctx.warn(f"{what}: no fine-tuning ({e}); the pruned model is not recovered")
        return model, False
    return (out if isinstance(out, nn.Module) else model), True


def distill_text_encoder(
    model: nn.Module,
    teacher: nn.Module | None = None,
    sentences: Sequence[str] = (),
    epochs: int = 1,
    lr: float = 1e-4,
    batch_size: int = 32,
    seed: int = 0,
    threads: int | None = None,
    teacher_embeddings: torch.Tensor | None = None,
) -> nn.Module:
    """Train a `TextEncoder` in place so its sentence embeddings match `teacher`'s (1 - cosine loss).

    `model.tokenizer`, `max_seq_length`, `pooling` and `normalize` are used for both. Pass
    `teacher_embeddings` ([len(sentences), hidden]) to reuse them across runs. Returns the model in eval mode.
    """
    if not sentences:
        raise DataError("distill_text_encoder needs real training sentences")
    if teacher_embeddings is None:
        if teacher is None:
            raise DataError("distill_text_encoder needs a teacher model or its embeddings")
        teacher_embeddings = embed(
            teacher, model.tokenizer, sentences, 64, model.max_seq_length, model.pooling, model.normalize
        )
    targets = teacher_embeddings.detach()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    steps = epochs * -(-len(sentences) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    ctx = Context(options=RunOptions(threads=threads, progress=False))
    model.train()
    with ctx.threads_scope():
        for _ in range(epochs):
            order = torch.randperm(len(sentences), generator=gen).tolist()
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = [sentences[i] for i in idx]
                input_ids, mask = next(dynamic_batches(model.tokenizer, batch, len(batch), model.max_seq_length))
                pooled = model.pool(model(input_ids, mask), mask)  # (B, hidden)
                loss = (1.0 - F.cosine_similarity(pooled, targets[idx], dim=-1)).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return model.eval()
