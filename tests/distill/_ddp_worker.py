"""Runs one distillation under torchrun (or alone) and saves the student; used by test_ddp.py.

torchrun --standalone --nproc_per_node 2 _ddp_worker.py OUT.pt WORKDIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _models import blobs, mlp  # noqa: E402

from modelpress.core.context import Context  # noqa: E402
from modelpress.core.options import RunOptions
from modelpress.distill import DistillConfig, distill  # noqa: E402
from modelpress.distill.trainer import dist_info  # noqa: E402

# 100 samples, global batch 20: 10 per process and a full last batch, so one and two processes see the same batches.
CONFIG = DistillConfig(
    mode="offline", epochs=2, batch_size=20, lr=5e-3, hidden_weight=1.0, features={"body.1": "body.1"}, warmup=0.2
)


def run(workdir: Path) -> dict:
    torch.set_num_threads(1)
    teacher, data = mlp(32), blobs(100)
    ctx = Context(options=RunOptions(progress=False, cache_dir=workdir / "cache"))
    res = distill(teacher, mlp(8, seed=1), data, CONFIG, ctx=ctx, checkpoint_dir=workdir / "ckpt")
    return {"state": res.student.state_dict(), "history": res.history, "steps": res.steps}


if __name__ == "__main__":
    out, workdir = Path(sys.argv[1]), Path(sys.argv[2])
    result = run(workdir)
    rank, world = dist_info()
    torch.save({**result, "world": world}, out.with_suffix(f".rank{rank}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
