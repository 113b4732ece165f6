"""The distillation training loop: AdamW, warm-up + decay, evaluation, early stopping, checkpoints, DDP.

Under `torchrun` (WORLD_SIZE > 1) each process takes its share of every global batch
(`DistributedSampler`, batch_size / world_size per process), gradients are averaged by
`DistributedDataParallel` (gloo on CPU, nccl on CUDA), and only rank 0 writes checkpoints.
The loss of each process is weighted by its share of the global batch, so an uneven last batch
averages exactly as in one process.

Checkpoints (student + projections, optimizer, scheduler, RNG, epoch/step, best metric) are
written atomically; a run restarted with the same config resumes where the last one stopped
and ends with the same weights as an uninterrupted run.

The batch order comes from generators seeded with `cfg.seed`. Dropout in the student's forward draws
from torch's global RNG, so the loop runs in `seeded_rng(cfg.seed)`: seeded inside a fork, the
caller's global RNG states (torch's and Python's) are as before once training ends.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modelpress.core.atomic import atomic_path
from modelpress.core.errors import ConfigError
from modelpress.distill.config import DistillConfig
from modelpress.distill.data import Batch, Samples
from modelpress.distill.losses import Objective
from modelpress.distill.outputs import Outputs, model_outputs

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: epoch, loss, metric, lr
    best_metric: float | None = None
    steps: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    resumed_from_step: int = 0


class StudentWithObjective(nn.Module):
    """The trained unit (what DDP wraps): the student and the objective's projections."""

    def __init__(
        self, student: nn.Module, objective: Objective, layers: list[int], features: list[str], attentions: bool
    ) -> None:
        super().__init__()
        self.student, self.objective = student, objective
        self.layers, self.features, self.attentions = layers, features, attentions

    def forward(self, batch: Batch, targets: Outputs) -> tuple[torch.Tensor, dict[str, float]]:
        out = model_outputs(self.student, batch, self.layers, self.features, self.attentions)
        return self.objective(out, targets, batch)


# ---------------------------------------------------------------- processes


def dist_info() -> tuple[int, int]:
    """(rank, world_size) of this process: from torch.distributed if initialised, else the torchrun env."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed() -> torch.device:
    """Join the process group torchrun describes (gloo on CPU, nccl with CUDA); the device to train on."""
    rank, world = dist_info()
    cuda = torch.cuda.is_available()
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _broadcast(value: Any) -> Any:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def bucketed(order: list[int], lengths: list[int], batch_size: int, seed: int, window: int = 32) -> list[int]:
    """`order` regrouped so each batch holds items of similar length; deterministic for a seed.

    Items are sorted by length within windows of `window` batches; the batches are then shuffled.
    """
    batches: list[list[int]] = []
    span = batch_size * window
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    gen = torch.Generator().manual_seed(seed)
    # the short last batch stays last so that every other batch is full
    head = batches[:-1] if len(batches[-1]) < batch_size else batches
    perm = torch.randperm(len(head), generator=gen).tolist()
    shuffled = [head[i] for i in perm] + batches[len(head) :]
    return [i for b in shuffled for i in b]


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run the block with torch's (CPU and every CUDA device) and Python's global RNGs seeded with `seed`;
    the states they had before come back when it ends, however it ends."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    python_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=devices):
            torch.random.default_generator.manual_seed(seed)
            if devices:
                torch.cuda.manual_seed_all(seed)
            random.seed(seed)
            yield
    finally:
        random.setstate(python_state)


# ---------------------------------------------------------------- schedule


def lr_lambda(cfg: DistillConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up over `warmup` of the steps, then cosine / linear decay to 0 (or constant)."""
    warm = int(cfg.warmup * total_steps)

    def fn(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.decay == "constant":
            return 1.0
        p = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.5 * (1.0 + math.cos(math.pi * p)) if cfg.decay == "cosine" else 1.0 - p

    return fn


# ---------------------------------------------------------------- checkpoints


def _save(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load(path: Path, cfg: DistillConfig) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(
            f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); delete it to start over"
        ) from None
    if state.get("config") != cfg.to_dict():
        raise ConfigError(
            f"checkpoint {path} was written with another config; delete it or pass resume=False to start over"
        )
    return state


# ---------------------------------------------------------------- loop


def _to(batch: Batch, device: torch.device) -> Batch:
    if device.type == "cpu":
        return batch
    labels = batch.labels.to(device) if batch.labels is not None else None
    return Batch(batch.index, tuple(t.to(device) for t in batch.inputs), labels)


def train(
    unit: StudentWithObjective,
    samples: Samples,
    targets: Callable[[Batch], Outputs],
    cfg: DistillConfig,
    *,
    metric: Callable[[nn.Module], float] | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    device: torch.device | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train `unit` (student + projections) on `samples` against `targets(batch)` (teacher outputs).

    Torch's and Python's global RNGs are seeded with `cfg.seed` for the run (dropout) and restored afterwards.
    """
    with seeded_rng(cfg.seed):
        return _train(
            unit,
            samples,
            targets,
            cfg,
            metric=metric,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            progress=progress,
            device=device,
            on_step=on_step,
        )


def _train(
    unit: StudentWithObjective,
    samples: Samples,
    targets: Callable[[Batch], Outputs],
    cfg: DistillConfig,
    *,
    metric: Callable[[nn.Module], float] | None,
    checkpoint_dir: str | Path | None,
    resume: bool,
    progress: bool,
    device: torch.device | None,
    on_step: Callable[[int, float], None] | None,
) -> TrainResult:
    """`train` inside `seeded_rng(cfg.seed)`."""
    from torch.utils.data.distributed import DistributedSampler

    rank, world = dist_info()
    device = device or torch.device("cpu")
    if cfg.batch_size % world:
        raise ConfigError(f"batch_size {cfg.batch_size} must be divisible by the {world} processes")
    local_bs = cfg.batch_size // world
    # One sampler for any world size: with one process it yields the global order the ranks share.
    sampler = DistributedSampler(samples, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    steps_per_epoch = math.ceil(len(sampler) / local_bs)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total = min(total, cfg.max_steps)

    unit.to(device).train()
    model: nn.Module = unit
    if world > 1:
        model = nn.parallel.DistributedDataParallel(unit, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in unit.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))

    result = TrainResult()
    best_state: dict[str, torch.Tensor] | None = None
    bad_epochs, start_epoch, skip, global_step = 0, 0, 0, 0
    ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    state = _load(ckpt, cfg) if ckpt is not None and resume else None
    if state is not None:
        unit.load_state_dict(state["unit"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_torch"])
        random.setstate(_tuples(state["rng_python"]))
        start_epoch, skip, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        bad_epochs, best_state = state["bad_epochs"], state["best_state"]
        result.best_metric, result.history = state["best_metric"], state["history"]
        result.resumed_from_step = global_step

    def checkpoint(epoch: int, step_in_epoch: int) -> None:
        if ckpt is None or rank != 0:
            return
        _save(
            ckpt,
            {
                "unit": unit.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng_torch": torch.get_rng_state(),
                "rng_python": random.getstate(),
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "global_step": global_step,
                "bad_epochs": bad_epochs,
                "best_state": best_state,
                "best_metric": result.best_metric,
                "history": result.history,
                "config": cfg.to_dict(),
            },
        )

    start = time.perf_counter()
    bar = _Bar(progress and rank == 0, total, global_step)
    with bar:
        for epoch in range(start_epoch, cfg.epochs):
            if result.stopped_early or global_step >= total:
                break
            sampler.set_epoch(epoch)
            order = list(sampler)
            if cfg.bucket_by_length and hasattr(samples, "lengths"):
                order = bucketed(order, samples.lengths, local_bs, cfg.seed + epoch)
            loss_sum, loss_n = 0.0, 0
            for k in range(skip, steps_per_epoch):
                if global_step >= total:
                    break
                idx = order[k * local_bs : (k + 1) * local_bs]
                batch = _to(samples.collate([samples[i] for i in idx]), device)
                with torch.no_grad():
                    teacher_out = {key: v.to(device) for key, v in targets(batch).items()}
                loss, parts = model(batch, teacher_out)
                if world > 1:  # weight by this process's share of the global batch
                    n_global = torch.tensor([float(len(idx))], device=device)
                    torch.distributed.all_reduce(n_global)
                    loss = loss * (len(idx) * world / float(n_global.item()))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                sched.step()
                global_step += 1
                value = sum(parts.values())
                loss_sum, loss_n = loss_sum + value, loss_n + 1
                bar.advance(f"epoch {epoch + 1}/{cfg.epochs} loss {loss_sum / loss_n:.4f}")
                if cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0 and k + 1 < steps_per_epoch:
                    checkpoint(epoch, k + 1)
                if on_step is not None:
                    on_step(global_step, value)
            skip = 0
            record = {"epoch": epoch + 1, "loss": loss_sum / max(loss_n, 1), "lr": sched.get_last_lr()[0]}
            if metric is not None:
                value = None
                if rank == 0:
                    unit.student.eval()
                    with torch.no_grad():
                        value = float(metric(unit.student))
                    unit.student.train()
                value = _broadcast(value)
                record["metric"] = value
                if result.best_metric is None or value > result.best_metric:
                    result.best_metric, bad_epochs = value, 0
                    if cfg.restore_best:
                        best_state = {k: v.detach().cpu().clone() for k, v in unit.student.state_dict().items()}
                else:
                    bad_epochs += 1
                    result.stopped_early = cfg.patience is not None and bad_epochs >= cfg.patience
            result.history.append(record)
            checkpoint(epoch + 1, 0)
    if (
        best_state is not None
        and result.best_metric is not None
        and result.history[-1].get("metric") != result.best_metric
    ):
        unit.student.load_state_dict(best_state)
    result.steps, result.seconds = global_step, time.perf_counter() - start
    unit.student.eval()
    return result


def _tuples(x: Any) -> Any:
    """`random.setstate` wants tuples; a checkpoint round trip may hand back lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


class _Bar:
    """A rich progress bar over the optimizer steps (rank 0 only; nothing when switched off)."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.enabled, self.total, self.done = enabled, total, done
        self._progress: Any = None

    def __enter__(self) -> _Bar:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                transient=True,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task("distilling", total=self.total, completed=self.done)
        return self

    def advance(self, description: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, description=description)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
