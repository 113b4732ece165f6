"""The speed gate: every artifact timed against the original in the same run, and stopped when pathological.

Beside the parity gate (an artifact computes what the model computes) this one checks that it is
not slower than the original. Each batch size gets a per-call time limit derived from the
original's median there (`SPEED_LIMIT_FACTOR` times it, at least `MIN_CALL_LIMIT_S`):

- A saved artifact (`.onnx`, `.pt2`) is first run in a child process (`probe`), one warm-up call and
  a few timed calls per batch size. A call that runs past its limit has the child killed: the
  artifact is *stopped*, never loaded in this process, and its row says why. A kernel that runs for
  minutes (seen: a `.pt2` whose int8 GEMMs fell back to oneDNN's reference kernel) costs seconds.
- In-process models (the compressed eager model) are gated by their first call: past the limit,
  nothing more is timed (a call cannot be interrupted in-process, so one call is spent).
- After measurement `verdict` compares the medians: an artifact slower than the original at any
  batch size is flagged ("slower than the original: X ms against Y ms at batch 32") in the CLI
  table, report.json / md / html and `--json`; auto mode never chooses a flagged artifact.

    >>> limits = call_limits(baseline)                      # {"1": 5.0, "32": 5.8} seconds
    >>> result = probe("pt2", "out/model.pt2", {1: x1, 32: x32}, limits, threads=2)
    >>> result.stopped, result.ms
"""

from __future__ import annotations

import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelpress.core.report import ModelStats
from modelpress.measure.size import artifact_size_bytes

SPEED_LIMIT_FACTOR = 10.0  # a call may take this many times the original's median...
MIN_CALL_LIMIT_S = 5.0  # ...and at least this long (a busy machine stalls a call for a second or two)
PROBE_CALLS = 3  # timed calls per batch size in the child, after one warm-up call
LOAD_LIMIT_S = 300.0  # loading an artifact in the child (a large .pt2 unpacks and dlopens a library)


@dataclass
class ProbeResult:
    """What the child process measured: median ms per batch size, or where it was stopped."""

    ms: dict[str, float] = field(default_factory=dict)
    stopped: str | None = None  # batch size whose call ran past its limit
    limit_s: float | None = None  # that call's limit
    error: str | None = None  # the child failed (load error, crash): the in-process run will say more


def call_limits(reference: ModelStats, factor: float = SPEED_LIMIT_FACTOR) -> dict[str, float]:
    """Seconds one call may take per batch size: `factor` x the original's median, at least MIN_CALL_LIMIT_S."""
    return {bs: max(MIN_CALL_LIMIT_S, factor * lat.p50 / 1e3) for bs, lat in reference.latency_ms.items()}


def probe(
    kind: str,
    path: str | Path,
    inputs: dict[str, tuple[torch.Tensor, ...]],
    limits: dict[str, float],
    threads: int | None = None,
    calls: int = PROBE_CALLS,
) -> ProbeResult:
    """Time the artifact at `path` (`kind` "onnx" or "pt2") in a child process within `limits` per call."""
    from safetensors.torch import save_file

    result = ProbeResult()
    with tempfile.TemporaryDirectory(prefix="modelpress-probe.") as work:
        # cloned: inputs of several batch sizes may be views of one tensor, which safetensors refuses to save
        tensors = {f"{bs}.{i}": t.clone().contiguous() for bs, batch in inputs.items() for i, t in enumerate(batch)}
        save_file(tensors, str(Path(work) / "inputs.safetensors"))
        cmd = [sys.executable, "-m", "modelpress.measure.probe", kind, str(path),
               str(Path(work) / "inputs.safetensors"), str(threads or torch.get_num_threads()), str(calls)]  # fmt: skip
        errors = open(Path(work) / "stderr.txt", "w+", encoding="utf-8")  # a file: a full pipe would block the child
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True, start_new_session=True)
        lines: queue.Queue[str | None] = queue.Queue()

        def read() -> None:
            assert child.stdout is not None
            for line in child.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        timed: dict[str, list[float]] = {}
        try:
            deadline = LOAD_LIMIT_S
            current = None
            while True:
                try:
                    line = lines.get(timeout=deadline)
                except queue.Empty:
                    if current is None:
                        result.error = f"loading took more than {LOAD_LIMIT_S:.0f} s"
                    else:
                        result.stopped, result.limit_s = current, deadline
                    break
                if line is None:
                    if child.wait() != 0:
                        errors.seek(0)
                        result.error = (errors.read().strip().splitlines() or [f"exit code {child.returncode}"])[-1]
                    break
                msg = json.loads(line)
                if msg["event"] == "next":  # the child is about to call at this batch size
                    current = msg["batch_size"]
                    deadline = limits[current] * (2 if msg["warmup"] else 1)
                elif msg["event"] == "call":
                    if msg["ms"] / 1e3 > deadline:  # it finished, but past its limit (lines can lag behind)
                        result.stopped, result.limit_s = msg["batch_size"], deadline
                        break
                    if not msg["warmup"]:
                        timed.setdefault(msg["batch_size"], []).append(msg["ms"])
        finally:
            _kill(child)
            errors.close()
        result.ms = {bs: statistics.median(v) for bs, v in timed.items() if v}
    return result


def _kill(child: subprocess.Popen[str]) -> None:
    if child.poll() is None:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            child.kill()
    child.wait()
    if child.stdout is not None:
        child.stdout.close()


def stopped_gate(
    name: str, batch_size: str, limit_s: float, reference: ModelStats | None, took_s: float | None = None
) -> dict[str, Any]:
    """The `speed_gate` of a form stopped at `batch_size` (`took_s`: how long its one in-process call took)."""
    ref = reference.latency_ms.get(batch_size) if reference is not None else None
    call = (
        f"a call at batch {batch_size} ran past" if took_s is None
        else f"its first call at batch {batch_size} took {took_s:.1f} s, past"
    )  # fmt: skip
    message = (
        f"{name}: stopped, {call} the {limit_s:.1f} s limit "
        f"(the original takes {ref.p50 if ref else float('nan'):.1f} ms): not measured further"
    )
    return {"status": "stopped", "batch_size": batch_size, "limit_s": limit_s, "message": message}


def stopped_stats(name: str, artifact: Path, result: ProbeResult, reference: ModelStats) -> ModelStats:
    """The row of an artifact the probe stopped: its size, no latency, the reason in `speed_gate`."""
    assert result.stopped is not None and result.limit_s is not None
    stats = ModelStats(name=name, artifact=str(artifact), size_bytes=artifact_size_bytes(artifact))
    stats.speed_gate = stopped_gate(name, result.stopped, result.limit_s, reference)
    return stats


def verdict(stats: ModelStats, reference: ModelStats) -> dict[str, Any]:
    """Compare medians per batch size: status "ok" or "slower" with the figures and a message."""
    if stats.speed_gate and stats.speed_gate.get("status") == "stopped":
        return stats.speed_gate
    speedup: dict[str, float] = {}
    slower: list[str] = []
    for bs, ref in reference.latency_ms.items():
        lat = stats.latency_ms.get(bs)
        if lat is None or lat.p50 <= 0:
            continue
        speedup[bs] = ref.p50 / lat.p50
        if lat.p50 > ref.p50:
            slower.append(f"{lat.p50:.2f} ms against {ref.p50:.2f} ms at batch {bs}")
    out: dict[str, Any] = {"status": "slower" if slower else "ok", "speedup": speedup}
    if slower:
        out["message"] = f"{stats.name}: slower than the original: " + "; ".join(slower)
    return out


def gate_message(stats: ModelStats) -> str | None:
    """The gate's message for a flagged row (None when it passed)."""
    gate = stats.speed_gate or {}
    return gate.get("message") if gate.get("status") in ("slower", "stopped") else None
