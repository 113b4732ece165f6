"""Latency and throughput of any callable: an eager `nn.Module`, an ONNX Runtime wrapper, a compiled package.

Both run with a fixed torch thread count (restored after) under `torch.inference_mode()`, warm up first,
and time each call with `time.perf_counter`.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from modelpress.core.environment import check_threads
from modelpress.core.errors import BadInputError
from modelpress.core.options import MAX_BATCH_SIZE as MAX_BATCH_SIZE
from modelpress.core.options import MAX_REPEATS as MAX_REPEATS
from modelpress.core.report import Latency

Batch = Sequence[torch.Tensor]
MAX_WARMUP = 10_000
MIN_TIMED_CALLS = 3  # a median of fewer calls says too little, however slow they are


def check_runs(repeats: int, warmup: int) -> None:
    """Refuse timed `repeats` outside [1, MAX_REPEATS] or `warmup` runs outside [0, MAX_WARMUP]."""
    for name, value, lo, hi in (("repeats", repeats, 1, MAX_REPEATS), ("warmup", warmup, 0, MAX_WARMUP)):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise BadInputError(f"{name} must be an integer in [{lo}, {hi}] (runs per batch size), got {value!r}")


@contextlib.contextmanager
def threads_scope(threads: int | None) -> Iterator[None]:
    """Run the block with `threads` torch intra-op threads (None keeps the current), restoring after."""
    before = torch.get_num_threads()
    check_threads(threads, current=before)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _timing_scope(threads: int | None) -> Iterator[None]:
    """Fixed threads, inference mode, and no garbage-collector pauses inside timed calls (as `timeit`)."""
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        with threads_scope(threads), torch.inference_mode():
            yield
    finally:
        if gc_was_enabled:
            gc.enable()


def measure_latency(
    fn: Callable[..., Any],
    inputs: tuple[Any, ...] | torch.Tensor,
    *,
    warmup: int = 5,
    repeats: int = 30,
    min_time_s: float | None = None,
    max_time_s: float | None = None,
    threads: int | None = None,
) -> Latency:
    """Per-call latency of `fn(*inputs)` in milliseconds.

    Runs `warmup` untimed calls, then at least `repeats` timed calls; with `min_time_s` it keeps going
    until the timed calls add up to that many seconds (so fast models get more samples). With
    `max_time_s` a slow model stops early: warm-up ends once it has taken a quarter of that time (after
    one call at least), timing once the timed calls add up to it (after `MIN_TIMED_CALLS` at least);
    `Latency.runs` says how many calls were timed.

        >>> lat = measure_latency(model, entry.example_inputs(32), threads=2)
        >>> lat.p50, lat.p90  # ms
    """
    check_runs(repeats, warmup)
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    times: list[float] = []
    if max_time_s is not None and not max_time_s > 0:
        raise BadInputError(f"max_time_s must be a positive number of seconds, got {max_time_s!r}")
    with _timing_scope(threads):
        begin = time.perf_counter()
        for _ in range(warmup):
            fn(*args)
            if max_time_s is not None and time.perf_counter() - begin > max_time_s / 4:
                break
        while len(times) < repeats or (min_time_s is not None and sum(times) < min_time_s):
            if max_time_s is not None and len(times) >= MIN_TIMED_CALLS and sum(times) >= max_time_s:
                break
            start = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - start)
    ms = [t * 1e3 for t in times]
    return Latency(
        p50=float(statistics.median(ms)),
        p90=float(np.percentile(ms, 90)),
        mean=float(statistics.fmean(ms)),
        min=float(min(ms)),
        runs=len(ms),
    )


def _attention_mask(batch: Batch) -> torch.Tensor | None:
    """The 2nd tensor when it looks like an attention mask (same shape as the ids, values 0/1)."""
    if len(batch) < 2 or not isinstance(batch[1], torch.Tensor) or not isinstance(batch[0], torch.Tensor):
        return None
    mask = batch[1]
    if mask.shape != batch[0].shape or mask.dtype.is_floating_point or mask.dim() != 2:
        return None
    return mask if bool(((mask == 0) | (mask == 1)).all()) else None


def measure_throughput(
    fn: Callable[..., Any],
    batches: Iterable[Batch],
    items_per_batch: int | Callable[[Batch], int],
    *,
    threads: int | None,
    warmup_batches: int = 2,
    passes: int = 1,
    min_time_s: float | None = None,
) -> dict[str, Any]:
    """Items per second over real batches (text: dynamically padded real sentences).

    `items_per_batch` is a fixed count or a function of the batch (e.g. `entry.items_per_batch`).
    At least `passes` passes run over all batches; with `min_time_s`, more until that much time is timed.
    When the 2nd tensor of each batch is an attention mask, the result also has `tokens` (real,
    non-padding tokens per pass), `tokens_per_s` and `padding_ratio` (share of padded positions).

        >>> measure_throughput(model, entry.real_batches(32), entry.items_per_batch, threads=2)
        {'items_per_s': 812.3, 'items': 512, 'batches': 16, 'seconds': 0.63, 'passes': 1, ...}
    """
    if passes < 1 or warmup_batches < 0:
        raise BadInputError(f"need passes >= 1 and warmup_batches >= 0, got {passes}, {warmup_batches}")
    data = [tuple(b) for b in batches]
    if not data:
        raise BadInputError("measure_throughput needs at least one batch")
    count = items_per_batch if callable(items_per_batch) else (lambda _b: int(items_per_batch))
    items = sum(count(b) for b in data)
    masks = [m for b in data if (m := _attention_mask(b)) is not None]

    with _timing_scope(threads):
        for i in range(warmup_batches):
            fn(*data[i % len(data)])
        done, start = 0, time.perf_counter()
        while done < passes or (min_time_s is not None and time.perf_counter() - start < min_time_s):
            for b in data:
                fn(*b)
            done += 1
        seconds = time.perf_counter() - start

    out: dict[str, Any] = {
        "items_per_s": items * done / seconds,
        "items": items,  # per pass
        "batches": len(data),
        "seconds": seconds,
        "passes": done,
    }
    if len(masks) == len(data):  # every batch has an attention mask
        tokens = sum(int(m.sum().item()) for m in masks)
        positions = sum(int(m.numel()) for m in masks)
        out |= {
            "tokens": tokens,
            "tokens_per_s": tokens * done / seconds,
            "padding_ratio": 1.0 - tokens / positions,
        }
    return out
