"""`distill(teacher, student, data, config)` and the `DistillConfig` recipe pass.

    >>> from modelpress.distill import DistillConfig, StudentConfig, distill
    >>> result = distill(teacher, None, (X, y), DistillConfig(student=StudentConfig(width_ratio=0.5)))
    >>> result.student, result.history[-1]["loss"]

In a recipe the incoming model is the teacher and the student is built from it:

    passes:
      - type: DistillConfig
        mode: offline
        student: {layers: [0, 2, 4]}
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from torch import nn

from modelpress.core.atomic import atomic_path
from modelpress.core.context import Context
from modelpress.core.errors import ConfigError, DataError, NotAvailableError
from modelpress.core.registry import register, training_data
from modelpress.distill.cache import teacher_cache, weights_fingerprint
from modelpress.distill.config import DistillConfig, StudentConfig
from modelpress.distill.data import Batch, Samples, as_samples
from modelpress.distill.losses import Objective, layer_map
from modelpress.distill.outputs import Outputs, eager_attention, model_outputs, transformer_blocks
from modelpress.distill.students import build_student
from modelpress.distill.trainer import StudentWithObjective, barrier, dist_info, init_distributed, train


@dataclass
class DistillResult:
    """The trained student (eval mode) and what the run measured."""

    student: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    best_metric: float | None = None
    steps: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    cache_path: Path | None = None


def _pairs(teacher: nn.Module, student: nn.Module, cfg: DistillConfig) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """(student key, teacher key) pairs for hidden / feature / attention terms, and what each model must output."""
    pairs: list[tuple[str, str]] = []
    io: dict[str, Any] = {"s_layers": [], "t_layers": [], "s_features": [], "t_features": []}
    if cfg.hidden_weight > 0 and cfg.features:
        io["s_features"], io["t_features"] = list(cfg.features), list(cfg.features.values())
        pairs += [(f"feature.{s}", f"feature.{t}") for s, t in cfg.features.items()]
    elif cfg.hidden_weight > 0 or cfg.attention_weight > 0:
        s_blocks, t_blocks = transformer_blocks(student), transformer_blocks(teacher)
        if s_blocks is None or t_blocks is None:
            raise ConfigError(
                "hidden_weight / attention_weight without `features` need transformer teacher and student; "
                "name the modules to match in `features` (student module: teacher module)"
            )
        kept = getattr(student, "teacher_layers", None)  # a student cut from the teacher: block i was kept[i]
        if isinstance(kept, tuple) and len(kept) == len(s_blocks) and all(0 <= t < len(t_blocks) for t in kept):
            mapping = list(enumerate(kept))
        else:
            mapping = layer_map(len(s_blocks), len(t_blocks))
        if cfg.hidden_weight > 0:
            io["s_layers"], io["t_layers"] = [s for s, _ in mapping], [t for _, t in mapping]
            pairs += [(f"hidden.{s}", f"hidden.{t}") for s, t in mapping]
        if cfg.attention_weight > 0:
            pairs += [(f"attentions.{s}", f"attentions.{t}") for s, t in mapping]
    return pairs, io


def distill(
    teacher: nn.Module,
    student: nn.Module | None = None,
    data: Any = None,
    config: DistillConfig | None = None,
    *,
    metric: Callable[[nn.Module], float] | None = None,
    ctx: Context | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    cache_path: str | Path | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> DistillResult:
    """Train `student` (built from `teacher` per `config.student` when None) to imitate `teacher` on `data`.

    `data`: a tensor of inputs, `(inputs, labels)`, a list of sentences, a list of batches or `Samples`
    (default: `ctx.data`). `metric(student)` (higher is better) runs after every epoch for early
    stopping and best-epoch selection. Offline mode caches teacher outputs at `cache_path` (default:
    under `ctx.cache_dir/distill`). Run under `torchrun` to train with several processes. Randomness
    (projections, batch order, dropout) comes from `config.seed`; the caller's global RNG states are
    the same afterwards as before.

        >>> result = distill(teacher, data=(X, y), config=DistillConfig(student=StudentConfig(width_ratio=0.5)))
        >>> result.student
    """
    cfg = config or DistillConfig()
    ctx = ctx or Context()
    if cfg.patience is not None and metric is None:
        raise ConfigError(f"patience={cfg.patience} stops on a metric: pass metric=... or set patience to null")
    device = init_distributed()
    rank, _world = dist_info()
    samples: Samples = as_samples(data if data is not None else ctx.data, teacher, cfg.max_seq_length)
    if student is None:
        student = build_student(teacher, cfg.student or StudentConfig(), _probe_batches(samples))
    teacher = teacher.to(device).eval()
    student = student.to(device)
    frozen = [m.weight for m in student.modules() if isinstance(m, nn.Embedding) and m.weight.requires_grad]
    if not cfg.freeze_embeddings:
        frozen = []
    for weight in frozen:  # trained no further; trainable again afterwards
        weight.requires_grad_(False)
    pairs, io = _pairs(teacher, student, cfg)
    attentions = cfg.attention_weight > 0

    with ctx.threads_scope(), eager_attention(*((teacher, student) if attentions else ())):
        probe = samples.collate([samples[i] for i in range(min(4, len(samples)))])
        probe = Batch(probe.index, tuple(t.to(device) for t in probe.inputs), probe.labels)
        with torch.no_grad():
            t_probe = model_outputs(teacher, probe, io["t_layers"], io["t_features"], attentions)
            was_training = student.training
            s_probe = model_outputs(student.eval(), probe, io["s_layers"], io["s_features"], attentions)
            student.train(was_training)
        # projections start the same in every process and every run, without touching the global RNG
        objective = Objective.build(cfg, s_probe, t_probe, pairs, generator=torch.Generator().manual_seed(cfg.seed))

        cache = None
        targets: Callable[[Batch], Outputs]
        if cfg.mode == "offline":
            path = Path(cache_path) if cache_path is not None else _default_cache(ctx, teacher, samples)
            progress = ctx.progress if rank == 0 else None
            if rank == 0:
                cache = teacher_cache(path, teacher, samples, cfg, io["t_layers"], io["t_features"], progress=progress)
            barrier()
            if rank != 0:
                cache = teacher_cache(path, teacher, samples, cfg, io["t_layers"], io["t_features"], write=False)
            targets = cache.lookup  # type: ignore[union-attr]
        else:

            def targets(batch: Batch) -> Outputs:
                return model_outputs(teacher, batch, io["t_layers"], io["t_features"], attentions)

        unit = StudentWithObjective(student, objective, io["s_layers"], io["s_features"], attentions)
        res = train(
            unit,
            samples,
            targets,
            cfg,
            metric=metric,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            progress=ctx.show_progress,
            device=device,
            on_step=on_step,
        )
    for weight in frozen:
        weight.requires_grad_(True)
    return DistillResult(
        student, res.history, res.best_metric, res.steps, res.seconds, res.stopped_early, cache.path if cache else None
    )


def _probe_batches(samples: Samples, n: int = 16, batch_size: int = 4) -> list[tuple[Any, ...]]:
    """The inputs of the first `n` samples in batches: what a student built from data (depth_ratio) ranks on."""
    count = min(n, len(samples))
    return [samples.collate([samples[j] for j in range(i, min(i + batch_size, count))]).inputs
            for i in range(0, count, batch_size)]  # fmt: skip


def _default_cache(ctx: Context, teacher: nn.Module, samples: Samples) -> Path:
    # Named by the data only: a changed teacher finds the old file, sees the fingerprint differ and replaces it.
    return Path(ctx.cache_dir) / "distill" / f"{type(teacher).__name__}-{samples.fingerprint()[:16]}.safetensors"


def zoo_training_data(teacher: nn.Module) -> Any | None:
    """The training set of a recognised zoo teacher, or None.

    digits-cnn: the train split with labels; text encoders: the unique STS-B train sentences (when the
    STS-B folder is found) followed by the train split of Python's documentation sentences (never the
    validation and test splits their fidelity is measured on).
    """
    return _zoo_training(teacher)[0]


def _zoo_training(teacher: nn.Module) -> tuple[Any | None, dict[str, Any] | None]:
    """`zoo_training_data(teacher)` and the report's record of it (source, split, count).

    The zoo registers a provider for each kind of model it builds (`core.registry.register_training_data`):
    this pass asks for the teacher's training set without knowing the zoo's classes.
    """
    return training_data(teacher)


@register(DistillConfig)
def distill_pass(model: nn.Module, cfg: DistillConfig, ctx: Context) -> nn.Module:
    """Recipe pass: `model` is the teacher; the student is built from it per `cfg.student`; returns the student."""
    start = time.perf_counter()
    samples, record = _training_samples(model, cfg, ctx)
    student = build_student(model, cfg.student or StudentConfig(), _probe_batches(samples))
    # The context's metric (a validation split where the entry has one) picks epochs only when asked to.
    metric = ctx.metric if cfg.patience is not None else None
    if metric is None and cfg.patience is not None:
        raise DataError(f"patience={cfg.patience} needs a task metric; this model has none (Context(metric=...))")
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    ctx.report.data["training"] = record or {
        "source": "the run's data (--data, else calibration)",
        "count": len(samples),
    }
    # Without a metric the trained student depends only on the teacher, the data and the settings: a
    # run of the same recipe reuses it (delete the file to train again).
    saved = _student_path(ctx, model, samples, cfg) if metric is None else None
    if saved is not None and saved.is_file():
        try:
            load_model(student, str(saved))  # tied weights (an LM's head and embeddings) stored once
        except (RuntimeError, OSError, SafetensorError) as e:
            ctx.warn(f"distill: the saved student {saved} could not be read ({e}); training again")
        else:
            ctx.report.add_pass(
                "distill", time.perf_counter() - start, mode=cfg.mode, teacher_params=params(model),
                student_params=params(student), reused_student=str(saved),
            )  # fmt: skip
            return student.eval()
    result = distill(model, student, samples, cfg, metric=metric, ctx=ctx)
    if saved is not None:
        with atomic_path(saved) as tmp:
            save_model(result.student, str(tmp))
    ctx.report.add_pass(
        "distill",
        time.perf_counter() - start,
        mode=cfg.mode,
        teacher_params=params(model),
        student_params=params(result.student),
        steps=result.steps,
        final_loss=result.history[-1]["loss"] if result.history else None,
        best_metric=result.best_metric,
        stopped_early=result.stopped_early,
        saved_student=str(saved) if saved is not None else None,
        **({"student_width": student.width_pruned} if hasattr(student, "width_pruned") else {}),
    )
    return result.student


def _training_samples(model: nn.Module, cfg: DistillConfig, ctx: Context) -> tuple[Samples, dict[str, Any] | None]:
    """The samples the pass trains on (the teacher's own training set where `train_data` is auto, else the run's
    data) and the report's record of them."""
    provider = ctx.training_data or _zoo_training
    data, record = provider(model) if cfg.train_data == "auto" else (None, None)
    if data is None:
        data = ctx.data
    if data is None:
        raise DataError("distillation needs training data: a zoo teacher, or Context(data=...) / --data")
    return as_samples(data, model, cfg.max_seq_length), record


def student_file(teacher: nn.Module, cfg: DistillConfig, ctx: Context) -> Path | None:
    """Where the pass of `cfg` on `teacher` keeps its trained student (None where it keeps none: a pass that
    picks epochs by a metric, or one without training data). The pass on the same teacher, data and settings
    loads the file instead of training."""
    if cfg.patience is not None:
        return None
    try:
        samples, _ = _training_samples(teacher, cfg, ctx)
    except (DataError, NotAvailableError):
        return None
    return _student_path(ctx, teacher, samples, cfg)


def saved_student(teacher: nn.Module, cfg: DistillConfig, ctx: Context) -> Path | None:
    """The file an earlier run of `cfg` on `teacher` kept its trained student in, where there is one."""
    path = student_file(teacher, cfg, ctx)
    return path if path is not None and path.is_file() else None


def _student_path(ctx: Context, teacher: nn.Module, samples: Samples, cfg: DistillConfig) -> Path:
    h = hashlib.sha256(weights_fingerprint(teacher).encode())
    h.update(samples.fingerprint().encode())
    h.update(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    return Path(ctx.cache_dir) / "distill" / "students" / f"{type(teacher).__name__}-{h.hexdigest()[:20]}.safetensors"
