"""The distillation objective as a module: pure KD losses plus learned projections where widths differ.

>>> objective = Objective.build(cfg, student_out, teacher_out, layer_pairs=[(0, 1), (1, 3)])
>>> loss, parts = objective(student_out, teacher_out, batch)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from modelpress.core.errors import BadInputError
from modelpress.distill.config import DistillConfig
from modelpress.distill.data import Batch
from modelpress.distill.outputs import Outputs
from modelpress.primitives import kd


class Projection(nn.Module):
    """A learned linear map from the student's feature width to the teacher's.

    `channel_dim` is the axis holding the features: -1 for token states (B, T, H), 1 for conv maps (B, C, H, W).
    `generator` draws the initial weights (`nn.Linear`'s default init) instead of torch's global RNG.
    """

    def __init__(
        self, student_dim: int, teacher_dim: int, channel_dim: int = -1, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if generator is None:
            self.linear = nn.Linear(student_dim, teacher_dim)
        else:  # built without drawing, then nn.Linear.reset_parameters' draws from `generator`
            self.linear = torch.nn.utils.skip_init(nn.Linear, student_dim, teacher_dim)
            nn.init.kaiming_uniform_(self.linear.weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(student_dim) if student_dim > 0 else 0
            nn.init.uniform_(self.linear.bias, -bound, bound, generator=generator)
        self.channel_dim = channel_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_dim in (-1, x.dim() - 1):
            return self.linear(x)
        return self.linear(x.movedim(self.channel_dim, -1)).movedim(-1, self.channel_dim)


def layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """Student block i ↔ teacher block (i+1)·L_t/L_s - 1: the last blocks always meet."""
    return [(i, round((i + 1) * teacher_layers / student_layers) - 1) for i in range(student_layers)]


def _channel_dim(t: torch.Tensor) -> int:
    return 1 if t.dim() == 4 else -1  # conv maps (B, C, H, W); otherwise features on the last axis


class Objective(nn.Module):
    """Weighted sum of the configured KD terms; holds the projections (trained with the student)."""

    def __init__(
        self, cfg: DistillConfig, pairs: Sequence[tuple[str, str]], projections: dict[str, Projection]
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.pairs = list(pairs)  # (student key, teacher key) for hidden / feature / attention terms
        self.projections = nn.ModuleDict({k.replace(".", "__"): v for k, v in projections.items()})

    @classmethod
    def build(
        cls,
        cfg: DistillConfig,
        student_out: Outputs,
        teacher_out: Outputs,
        pairs: Sequence[tuple[str, str]] = (),
        generator: torch.Generator | None = None,
    ) -> Objective:
        """Check that the outputs fit together (naming both shapes if not) and create the projections.

        `generator` initialises the projections (default: torch's global RNG).
        """
        for key in ("logits", "embedding"):
            if (key in student_out) != (key in teacher_out):
                have = "student" if key in student_out else "teacher"
                raise BadInputError(
                    f"only the {have} returns {key}: teacher and student must be the same kind of model"
                )
            if key in student_out and student_out[key].shape[1:] != teacher_out[key].shape[1:]:
                raise BadInputError(
                    f"incompatible outputs: student {key} {tuple(student_out[key].shape)} vs teacher "
                    f"{tuple(teacher_out[key].shape)}; they must match after the batch axis"
                )
        projections: dict[str, Projection] = {}
        for s_key, t_key in pairs:
            if s_key.startswith("attentions."):
                continue
            s, t = student_out[s_key], teacher_out[t_key]
            cd = _channel_dim(s)
            if s.shape[cd] != t.shape[cd]:
                projections[s_key] = Projection(s.shape[cd], t.shape[cd], cd, generator)
            s_rest = [d for i, d in enumerate(s.shape) if i not in (0, cd % s.dim())]
            t_rest = [d for i, d in enumerate(t.shape) if i not in (0, cd % t.dim())]
            if s_rest != t_rest:
                raise BadInputError(
                    f"cannot match student {s_key} {tuple(s.shape)} to teacher {t_key} {tuple(t.shape)}: "
                    "only the feature width may differ"
                )
        return cls(cfg, pairs, projections)

    def forward(
        self, student_out: Outputs, teacher_out: Outputs, batch: Batch
    ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        mask = batch.attention_mask  # (B, T) for text, else None
        parts: dict[str, torch.Tensor] = {}
        if "logits" in student_out:
            s, t = student_out["logits"], teacher_out["logits"].to(student_out["logits"].dtype)
            token_mask = mask if mask is not None and s.dim() == 3 and s.shape[:2] == mask.shape else None
            parts["kd"] = kd.kd_loss(s, t, batch.labels, cfg.temperature, cfg.alpha, token_mask)
        if "embedding" in student_out and cfg.embedding_weight > 0:
            e = kd.embedding_loss(student_out["embedding"], teacher_out["embedding"], cfg.embedding_loss)
            parts["embedding"] = cfg.embedding_weight * e
        hidden, attn = [], []
        for s_key, t_key in self.pairs:
            s, t = student_out[s_key], teacher_out[t_key]
            if s_key.startswith("attentions."):
                attn.append(kd.attention_kl(s, t, mask))
                continue
            proj = self.projections[s_key.replace(".", "__")] if s_key.replace(".", "__") in self.projections else None
            s = proj(s) if proj is not None else s
            token_mask = mask if mask is not None and s.dim() == 3 and s.shape[:2] == mask.shape else None
            hidden.append(kd.hidden_mse(s, t.to(s.dtype), token_mask))
        if hidden:
            parts["hidden"] = cfg.hidden_weight * torch.stack(hidden).mean()
        if attn:
            parts["attention"] = cfg.attention_weight * torch.stack(attn).mean()
        if not parts:
            raise BadInputError("no distillation loss is active: every loss weight is 0 for this model")
        total = torch.stack(list(parts.values())).sum()
        return total, {k: float(v.detach()) for k, v in parts.items()}
