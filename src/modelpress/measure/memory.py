"""Peak memory of forward calls, as the operating system sees it (resident set size)."""

from __future__ import annotations

import gc
import resource
import sys
import threading
from collections.abc import Callable
from typing import Any

import psutil
import torch

from modelpress.measure.latency import threads_scope


def _ru_maxrss_bytes() -> int:
    """This process's lifetime peak RSS (kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def peak_memory(
    fn: Callable[..., Any],
    inputs: tuple[Any, ...] | torch.Tensor,
    threads: int | None,
    *,
    calls: int = 3,
    interval_s: float = 0.001,
) -> int:
    """Peak growth in bytes of this process's RSS above its pre-run level during `calls` forward calls.

    What it measures: resident memory of the whole process, sampled by a background thread every
    `interval_s`, minus the RSS just before the first call. Weights loaded before the call are not
    counted; activations, workspaces, one-time kernel/packing caches and allocator caches are. When
    the kernel's exact high-water mark (`ru_maxrss`) rises during the run it is used too, catching
    spikes shorter than the sampling interval. Run it before other measurements of the same model
    (warm allocator caches hide growth) and read it as an estimate: other threads of the process count.

        >>> peak_memory(model, entry.example_inputs(32), threads=2) / 2**20  # MiB
    """
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    proc = psutil.Process()
    gc.collect()
    base = proc.memory_info().rss
    ru_before = _ru_maxrss_bytes()
    sampled = [base]  # written only by the sampler thread
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            sampled[0] = max(sampled[0], proc.memory_info().rss)
            done.wait(interval_s)

    sampler = threading.Thread(target=sample, name="modelpress-rss-sampler", daemon=True)
    sampler.start()
    peak = base
    try:
        with threads_scope(threads), torch.inference_mode():
            for _ in range(calls):
                fn(*args)
                peak = max(peak, proc.memory_info().rss)
    finally:
        done.set()
        sampler.join()
    peak = max(peak, sampled[0])
    ru_after = _ru_maxrss_bytes()
    if ru_after > ru_before:  # a new lifetime high was reached during the run: exact peak
        peak = max(peak, ru_after)
    return max(0, peak - base)
