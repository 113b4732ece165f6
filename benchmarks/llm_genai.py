"""Our ONNX Runtime GenAI export against onnxruntime-genai's own model builder (int4), on SmolLM2-135M.

    HF_HUB_OFFLINE=1 python benchmarks/llm_genai.py --genai-python /tmp/genaivenv/bin/python [--time]

onnxruntime-genai is an anchor, never a dependency: it runs from another Python environment given with
`--genai-python` (one with `onnxruntime-genai` and its model builder's needs: `pip install
onnxruntime-genai onnx onnx_ir torch transformers`). This script (in modelpress's environment) writes our
folders; a child process in that environment runs the builder and the generator. Rows:

- `builder-int4`: `python -m onnxruntime_genai.models.builder -i <SmolLM2 HF folder> -p int4 -e cpu`
  (round to nearest, symmetric, blocks of 32, lm_head int4 shared with the embedding, accuracy level 4);
- `ours-w4-gptq`: the `w4-gptq` recipe's pass (GPTQ, 4-bit asymmetric, group 128; the tied embedding
  and lm_head one int8 table in groups of 32; accuracy level 4), `export_genai`;
- `ours-gptq-head4`: the same, but the head calibrated by GPTQ at 4 bits (symmetric, group 32; `head_bits`)
  and the tied table taking its codes: one 4-bit table, as the builder's;
- with `--g32`, `ours-gptq-g32-sym`: GPTQ 4-bit symmetric group 32, the builder's own format.

Measured: perplexity per token on the held-out documentation (the test split: 32 windows x 256 tokens,
SmolLM2's tokenizer, the same tokens for every row), computed with plain ONNX Runtime on each folder's
`model.onnx` (empty KV cache, full-sequence logits); with `--time`, decode tokens/s at batch 1 through
onnxruntime-genai's generator (greedy, 128-token prompt, 64 new tokens, the prefill's first token left
out), rows interleaved round by round after a warm-up round, median of `--rounds`; then each folder's graph in
plain ONNX Runtime with the KV cache fed back (`modelpress.export.genai.decode_speed`, the figure `compress`
reports for its genai/ folder; median of `--rounds` after a warm-up). Sizes are the folder's
model.onnx(.data). Timings mean something only on a quiet machine: the script records the load average.

Target (issue: ONNX Runtime GenAI): our folder decodes at >= the builder's tokens/s with lower perplexity.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).parent))
from quant_onnx import cpu_results_dir  # noqa: E402

CHILD = r"""
import json, statistics, sys, time
import onnxruntime_genai as og
job = json.loads(sys.argv[1])
speeds = {name: [] for name in job["folders"]}
models = {}
for name, folder in job["folders"].items():
    config = og.Config(folder)
    config.clear_providers()
    models[name] = og.Model(config)
def decode(model):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(job["prompt"]) + job["new_tokens"], do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(job["prompt"])
    gen.generate_next_token()  # the prefill's token
    start = time.perf_counter()
    n = 0
    while not gen.is_done():
        gen.generate_next_token()
        n += 1
    return n / (time.perf_counter() - start)
for r in range(job["rounds"] + 1):
    for name, model in models.items():
        tps = decode(model)
        if r:  # round 0 warms up
            speeds[name].append(tps)
print(json.dumps({"speeds": speeds, "version": og.__version__}))
"""


def run_child(python: str, args: list[str], timeout: int = 3600) -> str:
    out = subprocess.run([python, *args], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"child {args[:3]} failed: {out.stderr[-3000:]}")
    return out.stdout


def set_threads(folder: Path, threads: int) -> None:
    """Pin the generator's ONNX Runtime session to `threads` intra-op threads (genai_config's session options)."""
    path = folder / "genai_config.json"
    config = json.loads(path.read_text())
    config["model"]["decoder"]["session_options"] |= {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    path.write_text(json.dumps(config, indent=4))


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.glob("model.onnx*")) / 1e6


def onnx_perplexity(folder: Path, data: Any, threads: int) -> float:
    """exp(mean NLL per predicted token) of `data` (n, T) windows, each one prefill with an empty KV cache."""
    import numpy as np
    import onnxruntime as ort

    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(folder / decoder["filename"]), options, providers=["CPUExecutionProvider"])
    empty = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), np.float32)
    past = {decoder["inputs"][f"past_{kv}_names"] % i: empty for i in range(decoder["num_hidden_layers"])
            for kv in ("key", "value")}  # fmt: skip
    nll, count = 0.0, 0
    for row in data.numpy():
        ids = row[None].astype(np.int64)
        logits = session.run(["logits"], past | {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]
        logits = logits[:-1].astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= float(logp[np.arange(len(row) - 1), row[1:]].sum())
        count += len(row) - 1
    return math.exp(nll / count)


def plain_ort_decode(folder: Path, prompt: list[int], new_tokens: int, rounds: int, threads: int) -> float:
    """Decode tokens/s at batch 1 of the folder's graph in plain ONNX Runtime, greedy with the KV cache fed back
    (`modelpress.export.genai.decode_speed`, the figure a compress run reports for its genai/ folder)."""
    import torch

    from modelpress.export.genai import decode_speed

    decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    spec = {"kv_heads": decoder["num_key_value_heads"], "head_dim": decoder["head_size"],
            "layers": decoder["num_hidden_layers"], "context": 2048}  # fmt: skip
    speed = decode_speed(folder / "model.onnx", torch.tensor([prompt]), spec, threads=threads, new_tokens=new_tokens,
                         batches=(1,), repeats=rounds)  # fmt: skip
    return speed["bs1"]["decode_tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--genai-python", required=True, help="python of an environment with onnxruntime-genai")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/llm_genai"), help="folders kept here for reruns")
    parser.add_argument("--g32", action="store_true", help="also GPTQ symmetric group 32 (the builder's format)")
    parser.add_argument("--time", action="store_true", help="measure decode tokens/s (needs a quiet machine)")
    parser.add_argument("--reuse", action="store_true", help="reuse our folders of an earlier run in --work")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from modelpress.core.context import Context, default_cache_dir
    from modelpress.core.environment import environment
    from modelpress.core.options import RunOptions
    from modelpress.export.genai import export_genai
    from modelpress.quant import GPTQConfig, quantize
    from modelpress.zoo import get_entry
    from modelpress.zoo.causal_lm import perplexity, windows
    from modelpress.zoo.smollm2 import _digest, gguf_path

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    entry = get_entry("smollm2-135m")
    fp32 = entry.load()
    hf_folder = Path(default_cache_dir()) / "smollm2-135m" / _digest(gguf_path())
    data = windows(entry.tokens("test"), entry.eval_length, entry.eval_windows)
    folders: dict[str, Path] = {}
    rows: dict[str, dict[str, Any]] = {}

    builder = work / "builder-int4"
    if not (builder / "genai_config.json").is_file():
        start = time.perf_counter()
        run_child(args.genai_python, ["-m", "onnxruntime_genai.models.builder", "-i", str(hf_folder), "-o",
                                      str(builder), "-p", "int4", "-e", "cpu"])  # fmt: skip
        print(f"builder: {time.perf_counter() - start:.0f} s", flush=True)
    folders["builder-int4"] = builder
    rows["builder-int4"] = {"scheme": "builder: RTN int4 sym block 32, lm_head int4 (tied), accuracy_level 4"}

    ctx = Context(options=RunOptions(threads=args.threads, progress=False))
    # the w4-gptq recipe's pass: the tied embedding and lm_head int8 in groups of 32, one table for both
    variants = {
        "ours-w4-gptq": GPTQConfig(bits=4, group_size=128, embedding_bits=8, embedding_group_size=32),
        "ours-gptq-head4": GPTQConfig(bits=4, group_size=128, head_bits=4, embedding_group_size=32),
    }
    if args.g32:
        variants["ours-gptq-g32-sym"] = GPTQConfig(bits=4, group_size=32, symmetric=True)
    for name, cfg in variants.items():
        folder = work / name
        if args.reuse and (folder / "row.json").is_file():  # quantized, exported and checked by an earlier run
            rows[name] = json.loads((folder / "row.json").read_text())
            folders[name] = folder
            continue
        start = time.perf_counter()
        with ctx.threads_scope():
            qmodel = quantize(fp32, cfg, data=entry.calibration_data(128, 8), ctx=ctx)
        print(f"{name}: GPTQ in {time.perf_counter() - start:.0f} s", flush=True)
        report = export_genai(qmodel, folder, prompt_ids=entry.example_inputs(1)[0], threads=args.threads)
        if cfg.head_bits is not None:
            table = f"lm_head GPTQ int{cfg.head_bits} sym group {cfg.embedding_group_size}, the tied table its codes"
        elif cfg.embedding_bits is not None:
            table = f"embedding + tied lm_head int{cfg.embedding_bits} group {cfg.embedding_group_size} (one table)"
        else:
            table = "embedding + tied lm_head float (one table)"
        rows[name] = {"scheme": f"GPTQ {cfg.bits}-bit {'sym' if cfg.symmetric else 'asym'} group {cfg.group_size}, "
                                f"{table}, accuracy_level 4",
                      "export_parity": report["parity"],
                      "torch_perplexity": perplexity(qmodel, data)}  # fmt: skip
        (folder / "row.json").write_text(json.dumps(rows[name], indent=2) + "\n")
        folders[name] = folder

    for name, folder in folders.items():
        start = time.perf_counter()
        rows[name] |= {"perplexity": onnx_perplexity(folder, data, args.threads), "size_mb": folder_mb(folder)}
        print(f"{name}: perplexity {rows[name]['perplexity']:.4f} ({time.perf_counter() - start:.0f} s), "
              f"{rows[name]['size_mb']:.1f} MB", flush=True)  # fmt: skip
    torch_fp32 = perplexity(fp32, data)

    genai_version = run_child(args.genai_python, ["-c", "import onnxruntime_genai as og; print(og.__version__)"])
    load_before = os.getloadavg()
    if args.time:
        for folder in folders.values():
            set_threads(folder, args.threads)
        prompt = entry.example_inputs(1)[0][0].tolist()
        job = {"folders": {k: str(v) for k, v in folders.items()}, "prompt": prompt, "rounds": args.rounds,
               "new_tokens": args.new_tokens}  # fmt: skip
        timed = json.loads(run_child(args.genai_python, ["-c", CHILD, json.dumps(job)]).strip().splitlines()[-1])
        for name, speeds in timed["speeds"].items():
            rows[name] |= {"decode_tokens_per_s": statistics.median(speeds), "decode_rounds": speeds}
        for name, folder in folders.items():  # the same graphs in plain ONNX Runtime: what `compress` reports
            speed = plain_ort_decode(folder, prompt, args.new_tokens, args.rounds, args.threads)
            rows[name] |= {"plain_ort_decode_tokens_per_s": speed}
    anchor = rows["builder-int4"]
    targets: dict[str, Any] = {}
    for name in variants:  # each of our folders against the builder's: both at once for the target
        ours = rows[name]
        targets[f"{name}_lower_perplexity"] = ours["perplexity"] < anchor["perplexity"]
        if args.time:
            targets[f"{name}_decode_ge_builder"] = ours["decode_tokens_per_s"] >= anchor["decode_tokens_per_s"]
    env = environment(args.threads)
    env["versions"]["onnxruntime-genai"] = genai_version.strip()
    env["load_average"] = {"before_timing": load_before, "after": os.getloadavg()}
    evaluation = {"split": "test", "windows": int(data.shape[0]), "window": int(data.shape[1])}
    doc = {"rows": rows, "torch_fp32_perplexity": torch_fp32, "targets": targets, "timed": args.time,
           "eval": evaluation, "environment": env}  # fmt: skip
    out = cpu_results_dir() / "llm_genai.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print("\n| folder | perplexity (ORT) | decode tok/s bs1 (genai) | plain ORT | MB |\n|---|---:|---:|---:|---:|")
    for k, r in rows.items():
        tps = f"{r['decode_tokens_per_s']:.1f}" if "decode_tokens_per_s" in r else "not timed"
        plain = f"{r['plain_ort_decode_tokens_per_s']:.1f}" if "plain_ort_decode_tokens_per_s" in r else "not timed"
        print(f"| {k} | {r['perplexity']:.3f} | {tps} | {plain} | {r['size_mb']:.1f} |")
    print(f"\ntorch fp32 perplexity {torch_fp32:.3f}; targets: {targets}")
    print(f"CPU: {env['cpu']['model']}, {args.threads} threads; onnxruntime-genai {genai_version.strip()}; "
          f"load average {load_before}")  # fmt: skip


if __name__ == "__main__":
    main()
