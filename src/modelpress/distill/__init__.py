"""Knowledge distillation: train a smaller student to imitate a teacher, online or from cached outputs.

    >>> from modelpress.distill import DistillConfig, StudentConfig, distill
    >>> cfg = DistillConfig(temperature=4.0, alpha=0.9, epochs=20, student=StudentConfig(width_ratio=0.5))
    >>> student = distill(teacher, data=(X, y), config=cfg).student

Losses live in `modelpress.primitives.kd`; students built from the teacher in `students`;
the training loop (warm-up + decay, early stopping, checkpoints, DDP) in `trainer`.
"""

from modelpress.distill.api import DistillResult, distill, distill_pass, zoo_training_data
from modelpress.distill.cache import TeacherCache, teacher_cache
from modelpress.distill.config import DistillConfig, StudentConfig
from modelpress.distill.data import Batch, Samples, TensorSamples, TokenSamples, as_samples
from modelpress.distill.losses import Objective, Projection, layer_map
from modelpress.distill.students import build_student, fewer_layers, narrower_cnn

__all__ = [
    "Batch",
    "DistillConfig",
    "DistillResult",
    "Objective",
    "Projection",
    "Samples",
    "StudentConfig",
    "TeacherCache",
    "TensorSamples",
    "TokenSamples",
    "as_samples",
    "build_student",
    "distill",
    "distill_pass",
    "fewer_layers",
    "layer_map",
    "narrower_cnn",
    "teacher_cache",
    "zoo_training_data",
]
