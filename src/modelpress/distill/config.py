"""Distillation configs: what the student is, which losses teach it, and how it trains.

>>> cfg = DistillConfig(temperature=4.0, alpha=0.9, epochs=10, student=StudentConfig(width_ratio=0.5))
>>> cfg = DistillConfig.from_dict({"mode": "offline", "student": {"layers": [0, 2, 4]}})
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from modelpress.core.config import MAX_EPOCHS, Config, check_at_most, check_seed
from modelpress.core.errors import ConfigError
from modelpress.primitives.kd import EMBEDDING_LOSSES


@dataclass(frozen=True)
class StudentConfig(Config):
    """A student built from the teacher: fewer transformer `layers`, or a narrower model (`width_ratio`).

    `layers` lists the teacher layers (0-based) whose weights initialise the student's layers, in
    order; `depth_ratio` keeps that fraction of the teacher's blocks, the ones that change the hidden
    states most on the training data (the least influential are removed); neither, with no
    `width_ratio`, means every other layer (0, 2, 4, ...). `width_ratio` keeps that fraction of a CNN's
    channels, or of a transformer's FFN neurons and attention head groups (grouped-query attention: whole
    K/V heads with their query heads), the units that write the most into the residual stream on the
    training data; `heads_ratio` keeps another fraction of the head groups (1.0: every head).
    """

    layers: tuple[int, ...] = ()
    width_ratio: float | None = None
    depth_ratio: float | None = None
    heads_ratio: float | None = None  # transformers with width_ratio: kept fraction of head groups (default: width)

    def validate(self) -> None:
        given = [n for n in ("layers", "width_ratio", "depth_ratio") if getattr(self, n) not in ((), None)]
        if len(given) > 1:
            raise ConfigError(
                f"student: give one of layers (transformers), depth_ratio (transformers) or width_ratio (CNNs), "
                f"got {' and '.join(given)}"
            )
        if self.depth_ratio is not None and not 0.0 < self.depth_ratio < 1.0:
            raise ConfigError(f"student.depth_ratio must be in (0, 1), got {self.depth_ratio}")
        if any(i < 0 for i in self.layers):
            raise ConfigError(f"student.layers must be teacher layer indices >= 0, got {list(self.layers)}")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"student.layers must not repeat a layer, got {list(self.layers)}")
        if self.width_ratio is not None and not 0.0 < self.width_ratio < 1.0:
            raise ConfigError(f"student.width_ratio must be in (0, 1), got {self.width_ratio}")
        if self.heads_ratio is not None:
            if self.width_ratio is None:
                raise ConfigError("student.heads_ratio narrows a transformer's attention with width_ratio: give both")
            if not 0.0 < self.heads_ratio <= 1.0:
                raise ConfigError(f"student.heads_ratio must be in (0, 1], got {self.heads_ratio}")


@dataclass(frozen=True)
class DistillConfig(Config):
    """Teacher → student training.

    Losses (each term weighted; a weight of 0 switches it off):
    - logits: `alpha` * T²·KL(teacher_T || student_T) + (1 - alpha) * CE(labels); no labels → KL only.
    - `embedding_weight`: sentence-embedding matching (`embedding_loss`: cosine, mse, cosine+mse).
    - `hidden_weight`: hidden-state MSE, through a learned projection when widths differ
      (transformers: student layer i ↔ teacher layer (i+1)·L_t/L_s; other models: `features`,
      student module name → teacher module name).
    - `attention_weight`: KL between attention maps (transformers, online mode only).

    `mode="offline"` runs the teacher once over the data and trains from its outputs cached on disk.
    """

    stage = "distill"

    mode: Literal["online", "offline"] = "online"
    temperature: float = 2.0
    alpha: float = 0.5
    embedding_weight: float = 1.0
    embedding_loss: str = "cosine"
    hidden_weight: float = 0.0
    attention_weight: float = 0.0
    features: dict[str, str] = field(default_factory=dict)
    student: StudentConfig | None = None
    # Embedding tables keep the values they start with (the teacher's): steps skip the largest tensors
    # (MiniLM: 12M of a 3-layer student's 17M values), and the tables stay shared with the teacher.
    freeze_embeddings: bool = False
    epochs: int = 3
    max_steps: int = 0  # stop after this many optimizer steps (the schedule spans them); 0: every epoch
    batch_size: int = 32  # global: split across processes under torchrun
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: float = 0.1  # fraction of the total steps with a linear warm-up
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    grad_clip: float | None = 1.0
    patience: int | None = None  # epochs without a better metric before stopping; None: never stop early
    restore_best: bool = True  # end with the weights of the best-evaluated epoch
    checkpoint_every: int = 0  # steps between checkpoints; 0: at the end of every epoch only
    seed: int = 0  # projections, batch order, dropout; the caller's global RNGs are left as they were
    max_seq_length: int = 128  # text: tokens per sentence
    # Text: batches of similar lengths (sorted within windows of 32 batches, batch order shuffled) pad
    # less and train faster; each process buckets its own share, so batches differ from a 1-process run.
    bucket_by_length: bool = False
    cache_dtype: Literal["float32", "float16"] = "float32"  # offline teacher outputs on disk
    # Recipe pass only. "auto": a recognised zoo teacher trains on its training set (digits-cnn: train
    # split with labels; text encoders: STS-B train + Python-doc sentences), other models on the context's data.
    train_data: Literal["auto", "context"] = "auto"

    def validate(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"alpha must be in [0, 1], got {self.alpha}")
        for name in ("embedding_weight", "hidden_weight", "attention_weight", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.embedding_loss not in EMBEDDING_LOSSES:
            raise ConfigError(
                f"embedding_loss must be one of {', '.join(EMBEDDING_LOSSES)}, got {self.embedding_loss!r}"
            )
        if self.epochs < 1:
            raise ConfigError(f"epochs must be >= 1, got {self.epochs}")
        check_at_most(self, "epochs", MAX_EPOCHS, "training epochs")
        if self.max_steps < 0:
            raise ConfigError(f"max_steps must be >= 0 (0: no limit), got {self.max_steps}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"warmup is a fraction of the total steps in [0, 1), got {self.warmup}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip must be > 0 or null, got {self.grad_clip}")
        if self.patience is not None and self.patience < 1:
            raise ConfigError(f"patience must be >= 1 or null, got {self.patience}")
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.max_seq_length < 2:
            raise ConfigError(f"max_seq_length must be >= 2, got {self.max_seq_length}")
        check_seed(self)
        if self.mode == "offline" and self.attention_weight > 0:
            raise ConfigError(
                f"attention_weight={self.attention_weight} needs mode='online' (attention maps are not cached)"
            )
