"""Two processes under torchrun (gloo) train exactly like one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from . import _ddp_worker

WORKER = Path(_ddp_worker.__file__)


def test_two_processes_match_one(tmp_path: Path) -> None:
    single = _ddp_worker.run(tmp_path / "single")

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(WORKER), str(tmp_path / "out.pt"), str(tmp_path / "ddp")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ranks = [torch.load(tmp_path / f"out.rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["steps"] == single["steps"] == 2 * 5
    for r in ranks:
        for name, value in single["state"].items():
            torch.testing.assert_close(r["state"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    # per-epoch loss is the mean over each process's own batches; rank 0 and 1 average to the single run's
    for epoch, rec in enumerate(single["history"]):
        both = (ranks[0]["history"][epoch]["loss"] + ranks[1]["history"][epoch]["loss"]) / 2
        assert abs(both - rec["loss"]) < 1e-3 * max(1.0, rec["loss"])
    # only rank 0 wrote: one cache file and one checkpoint, nothing half-written
    assert len(list((tmp_path / "ddp" / "cache" / "distill").glob("*.safetensors"))) == 1
    assert [p.name for p in (tmp_path / "ddp" / "ckpt").iterdir()] == ["checkpoint.pt"]
