"""Child process of the speed gate (`modelpress.measure.gate.probe`): time one artifact, report each call.

    python -m modelpress.measure.probe KIND PATH INPUTS.safetensors THREADS CALLS

Loads the artifact (`onnx`: ONNX Runtime, `pt2`: AOTInductor), then per batch size found in the
inputs file (tensors named `BATCH.INDEX`) announces each call before making it (so the parent knows
which limit applies and kills this process when a call overruns), one warm-up call and CALLS timed
calls, one JSON line per event on stdout.
"""

from __future__ import annotations

import json
import sys
import time


def _emit(**event: object) -> None:
    print(json.dumps(event), flush=True)


def main(argv: list[str]) -> int:
    kind, path, inputs_path, threads, calls = argv[0], argv[1], argv[2], int(argv[3]), int(argv[4])
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(threads)
    from modelpress.core.runtime import AotiModel, OnnxModel

    model = OnnxModel(path, threads=threads) if kind == "onnx" else AotiModel(path)
    tensors = load_file(inputs_path)
    batches: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, t in tensors.items():
        bs, _, index = name.partition(".")
        batches.setdefault(bs, []).append((int(index), t))
    _emit(event="ready")
    with torch.inference_mode():
        for bs in sorted(batches, key=int):
            args = tuple(t for _, t in sorted(batches[bs], key=lambda p: p[0]))
            for i in range(calls + 1):
                _emit(event="next", batch_size=bs, warmup=i == 0)
                start = time.perf_counter()
                model(*args)
                _emit(event="call", batch_size=bs, ms=(time.perf_counter() - start) * 1e3, warmup=i == 0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
