"""Benchmark several models side by side in one run, with the same threads: size, latency, memory, quality.

Baseline and compressed forms are measured in the same process and run, so their figures compare.

    >>> stats = bench(["digits-cnn", "minilm"], batch_sizes=(1, 32))
    >>> rich.print(stats_table(stats))
    >>> write_json(stats, "bench.json", environment(threads))
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from torch import nn

from modelpress.core.atomic import atomic_write_text
from modelpress.core.environment import check_threads
from modelpress.core.environment import environment as current_environment
from modelpress.core.errors import BadInputError
from modelpress.core.report import ModelStats, speed_cell
from modelpress.core.runtime import OnnxModel
from modelpress.measure.gate import call_limits, stopped_gate, verdict
from modelpress.measure.latency import MAX_BATCH_SIZE, check_runs, measure_latency, measure_throughput, threads_scope
from modelpress.measure.memory import peak_memory
from modelpress.measure.size import artifact_size_bytes, count_onnx_params, count_params
from modelpress.zoo.base import ModelFn, ZooEntry, get_entry

Resolved = tuple[str, ModelFn, ZooEntry | None]
# a name, (name, model, entry), or (name, model, entry, path of the artifact whose size is reported)
ModelSpec = str | Resolved | tuple[str, ModelFn, ZooEntry | None, str | Path | None]
Resolver = Callable[[str], Resolved]

MAX_THROUGHPUT_ITEMS = 512  # enough real batches for a stable figure, few enough to stay quick
THROUGHPUT_MIN_TIME_S = 0.5  # fast models repeat the batches until timing noise is small
THROUGHPUT_MAX_TIME_S = 15.0  # slow models (a causal LM at batch 32) take fewer real batches, at least one
LATENCY_MAX_TIME_S = 20.0  # per batch size: slow calls stop being timed past this (3 timed calls at least)


def resolve_zoo(name: str) -> Resolved:
    """Default resolver: a zoo name to (name, loaded fp32 model, its entry)."""
    entry = get_entry(name)
    return name, entry.load(), entry


def bench(
    models: Sequence[ModelSpec],
    *,
    batch_sizes: Sequence[int] = (1, 32),
    threads: int | None = None,
    repeats: int = 30,
    warmup: int = 5,
    quality: bool = True,
    validation: bool = False,
    eval_data: Path | None = None,
    throughput: bool = True,
    memory: bool = True,
    progress: bool = True,
    resolve: Resolver | None = None,
    reference: ModelStats | None = None,
    max_time_s: float | None = LATENCY_MAX_TIME_S,
) -> list[ModelStats]:
    """Measure each model in turn, all with the same `threads` (default: `torch.get_num_threads()`).

    A spec is a name, resolved by `resolve` (default: the zoo), or a tuple `(name, model_fn, entry)`
    with an optional 4th item, the path of the saved artifact whose size is reported. Per model:
    params / non-zero (eager modules), artifact size, peak memory at the largest batch size,
    latency per batch size on `entry.example_inputs(bs)`, throughput over up to
    512 items of `entry.real_batches(largest bs)`, and `entry.evaluate` (with `validation`, also
    `entry.validation_quality`, the split that choices are made on). Without an
    entry only params and size are measured. Named models are loaded one at a time.

    `reference` (the original, measured earlier in this run) turns on the speed gate
    (`measure/gate.py`): a model whose first call at a batch size runs past the limit derived from
    the reference is not measured further (`speed_gate` status "stopped"), and every model's medians
    are compared with the reference's (`speed_gate` status "ok" or "slower", with the speedups).

    `max_time_s` bounds the timing of slow models: at each batch size, warm-up stops after a quarter of
    it and timing once the timed calls add up to it (at least 3 are timed; `Latency.runs` says how many);
    throughput then takes only the real batches that fit in `THROUGHPUT_MAX_TIME_S`. None: always
    `warmup` + `repeats` calls and up to 512 items.

        >>> bench(["digits-cnn"], batch_sizes=(1, 64), threads=2, quality=False)
        [ModelStats(name='digits-cnn', size_bytes=..., latency_ms={'1': Latency(...), '64': ...}, ...)]
    """
    if isinstance(models, str):
        models = [models]
    if not batch_sizes or any(not isinstance(b, int) or not 1 <= b <= MAX_BATCH_SIZE for b in batch_sizes):
        raise BadInputError(
            f"batch_sizes must be positive integers of at most {MAX_BATCH_SIZE}, got {tuple(batch_sizes)!r}"
        )
    check_threads(threads)
    check_runs(repeats, warmup)
    threads = torch.get_num_threads() if threads is None else threads
    resolve = resolve or resolve_zoo
    steps = 2 + len(batch_sizes) + throughput + memory + quality  # per model: load, size, measurements

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    results: list[ModelStats] = []
    with (
        Progress(*columns, TimeElapsedColumn(), transient=True, disable=not progress) as bar,
        threads_scope(threads),
    ):
        task = bar.add_task("bench", total=steps * len(models))
        for spec in models:
            bar.update(task, description=f"{spec if isinstance(spec, str) else spec[0]}: loading")
            name, model, entry, artifact = _resolve(spec, resolve)
            bar.advance(task)

            def phase(what: str, name: str = name) -> None:
                bar.update(task, description=f"{name}: {what}")

            phase("size")
            stats = ModelStats(name=name, artifact=None if artifact is None else str(artifact))
            if isinstance(model, nn.Module):
                stats.params, stats.nonzero_params = count_params(model)
            elif isinstance(model, OnnxModel):
                stats.params, stats.nonzero_params = count_onnx_params(model.path)
            if artifact is not None:
                stats.size_bytes = artifact_size_bytes(artifact)
            elif isinstance(model, nn.Module):
                stats.size_bytes = artifact_size_bytes(model)
            bar.advance(task)
            if entry is None:  # no inputs to run it on: only params and size
                bar.advance(task, steps - 2)
                results.append(stats)
                continue

            largest = max(batch_sizes)
            if memory:  # first: warm allocator caches would hide the growth
                phase(f"peak memory @bs{largest}")
                stats.peak_memory_bytes = peak_memory(model, _runnable_inputs(model, entry, largest, name), threads)
                bar.advance(task)
            limits = call_limits(reference) if reference is not None else {}
            for bs in batch_sizes:
                phase(f"latency @bs{bs}")
                start = time.perf_counter()
                inputs = _runnable_inputs(model, entry, bs, name)
                first = time.perf_counter() - start
                limit = limits.get(str(bs))
                if limit is not None and first > 2 * limit:  # the warm-up call's limit, as in the probe
                    stats.speed_gate = stopped_gate(name, str(bs), 2 * limit, reference, took_s=first)
                    break
                stats.latency_ms[str(bs)] = measure_latency(
                    model, inputs, warmup=warmup, repeats=repeats, max_time_s=max_time_s, threads=threads
                )
                bar.advance(task)
            if stats.speed_gate is not None:  # stopped: nothing more is run on it
                bar.advance(task, steps - 2 - len(stats.latency_ms) - memory)
                results.append(stats)
                continue
            if reference is not None:
                stats.speed_gate = verdict(stats, reference)
            if throughput:
                phase(f"throughput @bs{largest}")
                per_batch = stats.latency_ms[str(largest)].p50 / 1e3 if max_time_s is not None else None
                stats.throughput = _throughput(model, entry, largest, threads, per_batch)
                generation = entry.generation_speed(model)  # causal LMs: prefill / decode tokens/s
                if generation is not None:
                    stats.throughput = {**(stats.throughput or {}), "generation": generation}
                bar.advance(task)
            if quality and entry.has_quality:
                phase("evaluating")
                stats.quality = entry.evaluate(model, eval_data)
                if validation:
                    stats.validation_quality = entry.validation_quality(model, eval_data)
                bar.advance(task)
            results.append(stats)
            del model  # a named model is dropped before the next one is loaded
    return results


def _resolve(spec: ModelSpec, resolve: Resolver) -> tuple[str, ModelFn, ZooEntry | None, str | Path | None]:
    if isinstance(spec, str):
        return (*resolve(spec), None)
    if isinstance(spec, tuple) and len(spec) in (3, 4) and isinstance(spec[0], str):
        return (spec[0], spec[1], spec[2], spec[3] if len(spec) == 4 else None)  # type: ignore[misc]
    raise BadInputError(f"a model spec is a name or a tuple (name, model_fn, entry[, artifact_path]), got {spec!r:.80}")


def _runnable_inputs(model: ModelFn, entry: ZooEntry, batch_size: int, name: str) -> tuple[torch.Tensor, ...]:
    """Example inputs at `batch_size`, checked by one call so a model that cannot take them fails clearly."""
    inputs = entry.example_inputs(batch_size)
    try:
        with torch.inference_mode():
            model(*inputs)
    except Exception as e:
        shapes = ", ".join(str(tuple(t.shape)) for t in inputs)
        raise BadInputError(
            f"{name} cannot run on inputs of shape {shapes} (batch size {batch_size}): "
            f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''} "
            "- check --batch-sizes (a program exported with a static batch runs only at that size) "
            "and --input-shape / --like"
        ) from None
    return inputs


def _throughput(
    model: ModelFn, entry: ZooEntry, batch_size: int, threads: int, per_batch_s: float | None = None
) -> dict[str, Any] | None:
    """Items/s over up to MAX_THROUGHPUT_ITEMS real items; where a batch is known to take `per_batch_s`,
    only the batches that fit in THROUGHPUT_MAX_TIME_S (one at least), after one warm-up batch if slow."""
    batches = entry.real_batches(batch_size)
    if batches is None:
        return None
    most = None if per_batch_s is None else max(1, int(THROUGHPUT_MAX_TIME_S / max(per_batch_s, 1e-9)))
    taken, items = [], 0
    for b in batches:
        taken.append(b)
        items += entry.items_per_batch(b)
        if items >= MAX_THROUGHPUT_ITEMS or (most is not None and len(taken) >= most):
            break
    if not taken:
        return None
    slow = per_batch_s is not None and per_batch_s > 1.0
    measured = measure_throughput(
        model, taken, entry.items_per_batch, threads=threads, warmup_batches=1 if slow else 2,
        min_time_s=THROUGHPUT_MIN_TIME_S,
    )  # fmt: skip
    return {"batch_size": batch_size, **measured}


def stats_table(stats: Sequence[ModelStats]) -> Table:
    """A rich table of several models side by side: one row per model, one latency column per batch size.

    >>> rich.print(stats_table(bench(["digits-cnn", "minilm"])))
    """
    batches = sorted({b for s in stats for b in s.latency_ms}, key=int)
    table = Table(title="modelpress bench")
    table.add_column("model", style="bold", no_wrap=True)
    for head in ("size MB", "params", "non-zero"):
        table.add_column(head, justify="right", no_wrap=True)
    for b in batches:
        table.add_column(f"bs{b} p50/p90 ms", justify="right", no_wrap=True)
    gated = any(s.speed_gate for s in stats)
    if gated:
        table.add_column("vs original", no_wrap=True)
    table.add_column("items/s", justify="right", no_wrap=True)
    table.add_column("mem +MB", justify="right", no_wrap=True)
    table.add_column("quality", no_wrap=True)

    def num(value: float | None, fmt: str, scale: float | None = None) -> str:
        if value is None:
            return "-"
        return format(value if scale is None else value / scale, fmt)

    for s in stats:
        tp = s.throughput or {}
        table.add_row(
            s.name,
            num(s.size_bytes, ".2f", 1e6),
            _count(s.params),
            _count(s.nonzero_params),
            *(f"{s.latency_ms[b].p50:.2f}/{s.latency_ms[b].p90:.2f}" if b in s.latency_ms else "-" for b in batches),
            *([speed_cell(s, batches)] if gated else []),
            num(tp.get("items_per_s"), ",.1f"),
            num(s.peak_memory_bytes, ".1f", 1e6),
            f"{s.quality.name} {s.quality.value:.4f}" if s.quality else "-",
        )
    return table


def _count(n: int | None) -> str:
    """Compact parameter count for the table (exact counts are in the JSON)."""
    if n is None:
        return "-"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}"
    return str(n)


def write_json(
    stats: Sequence[ModelStats], path: str | os.PathLike[str], environment: dict[str, Any] | None = None
) -> Path:
    """Write `{"environment": ..., "models": [...]}` to `path` atomically; returns the path.

    `environment` defaults to `modelpress.core.environment.environment()` (pass the bench threads).

        >>> write_json(stats, "bench.json", environment(threads=2))
    """
    env = environment if environment is not None else current_environment()
    doc = {"environment": env, "models": [s.to_dict() for s in stats]}
    path = Path(path)
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    return path
