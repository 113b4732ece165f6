"""Knowledge-distillation losses: pure functions on tensors, no modules, no I/O.

    >>> loss = kd_loss(student_logits, teacher_logits, labels, temperature=4.0, alpha=0.9)
    >>> loss = embedding_loss(student_emb, teacher_emb, kind="cosine")

Conventions: the last dimension of logits is the class dimension; every loss is a mean over the
real items (masked positions excluded) and returns a scalar.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from modelpress.core.errors import BadInputError

EMBEDDING_LOSSES = ("cosine", "mse", "cosine+mse")


def _same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise BadInputError(
            f"{what}: student shape {tuple(student.shape)} does not match teacher shape {tuple(teacher.shape)}"
        )


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of `values` (any shape) over the positions where `mask` (same leading shape) is nonzero."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    while mask.dim() < values.dim():
        mask = mask.unsqueeze(-1)
    mask = mask.expand_as(values)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def soft_target_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened distributions, times T².

    The T² factor keeps the gradient magnitude independent of T (Hinton et al., 2015), so the
    soft term can be mixed with a hard-label loss at a fixed weight whatever the temperature.
    Logits: (..., C); `mask` (...) selects the positions that count (e.g. real tokens).
    """
    _same_shape(student_logits, teacher_logits, "soft-target KL")
    if temperature <= 0:
        raise BadInputError(f"temperature must be > 0, got {temperature}")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # (...)
    return _masked_mean(kl, mask) * temperature**2


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """`alpha` * soft-target KL (T² scaled) + (1 - alpha) * cross-entropy on hard `labels`.

    Without labels the soft term alone is returned (weight 1); items labelled `ignore_index` are
    unlabelled (they still count in the soft term). Logits (..., C), labels (...); `mask` (...)
    leaves padded positions out of the soft term.

        >>> kd_loss(s, t, y, temperature=4.0, alpha=0.9)
    """
    if not 0.0 <= alpha <= 1.0:
        raise BadInputError(f"alpha must be in [0, 1], got {alpha}")
    soft = soft_target_kl(student_logits, teacher_logits, temperature, mask)
    if labels is None or not bool((labels != ignore_index).any()):  # no labelled item in this batch
        return soft
    hard = F.cross_entropy(
        student_logits.float().reshape(-1, student_logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index
    )
    return alpha * soft + (1.0 - alpha) * hard


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error between feature maps of equal shape (project the student first if widths differ).

    States (B, T, H) with `mask` (B, T), or any equal shapes without a mask.
    """
    _same_shape(student, teacher, "hidden-state matching")
    return _masked_mean((student.float() - teacher.float()).pow(2), mask)


def attention_kl(
    student_attn: torch.Tensor, teacher_attn: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-12
) -> torch.Tensor:
    """KL(teacher || student) between attention distributions, averaged over heads and real queries.

    Attentions (B, heads, T, T) hold probabilities over the last axis (as returned by Hugging Face
    models); `mask` (B, T) marks real tokens: padded query rows are left out.
    """
    _same_shape(student_attn, teacher_attn, "attention transfer")
    p_t = teacher_attn.float()
    kl = (p_t * (torch.log(p_t + eps) - torch.log(student_attn.float() + eps))).sum(-1)  # (B, heads, T)
    if mask is not None:
        mask = mask[:, None, :].expand_as(kl)
    return _masked_mean(kl, mask)


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """Sentence-embedding matching (B, H): `cosine` (1 - cos), `mse`, or their sum `cosine+mse`."""
    _same_shape(student, teacher, "embedding matching")
    if kind not in EMBEDDING_LOSSES:
        raise BadInputError(f"embedding loss must be one of {', '.join(EMBEDDING_LOSSES)}, got {kind!r}")
    s, t = student.float(), teacher.float()
    loss = s.new_zeros(())
    if "cosine" in kind:
        loss = loss + (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    if "mse" in kind:
        loss = loss + F.mse_loss(s, t)
    return loss
