"""Our GGUF files in llama.cpp against llama.cpp's own quantizations of the same model (SmolLM2-135M).

    HF_HUB_OFFLINE=1 python benchmarks/llm_gguf.py --llama-python /tmp/llvenv/bin/python [--threads 2]

llama.cpp is an anchor, never a dependency: it runs from another Python environment that has
`llama-cpp-python` (`pip install llama-cpp-python`, which builds llama.cpp from source), given with
`--llama-python`. This script (in modelpress's environment) writes the GGUF files; a child process
in that environment loads each with llama.cpp and measures, with llama.cpp itself:

- perplexity per token on the held-out documentation text (the last 10% of `pydoc_data.topics`,
  windows of 256 tokens, 32 windows; tokens by the file's own tokenizer, the same in every file);
- decode tokens/s at batch 1 (greedy, one token per `eval` after a 128-token prompt, median of 3).

Rows: llama.cpp's `Q4_0` and `Q4_K_M` quantized by llama.cpp from an F16 GGUF of the float model (the
anchors), ours: round-to-nearest and GPTQ (activation order) 4-bit symmetric, group 32 -> `Q4_0` blocks
from our codes, each twice: with the tied embedding table int8 in groups of 32 (`quantize_embeddings`,
the head holding the same codes) -> one `Q8_0` `token_embd`, and with the table left float (F16,
`-f16table`); GPTQ's with the head calibrated at 4 bits too (`head_bits`, symmetric group 32) and the
table taking its codes -> one `Q4_0` `token_embd` (`-q4table`); GPTQ 5-bit symmetric group 32 -> `Q5_0`
blocks with the `Q8_0` table (`ours-gptq-q5_0`, at about Q4_K_M's size: on this model, whose 576-wide rows
K-quants' 256-value super-blocks do not divide, llama.cpp's Q4_K_M falls back to Q5_0 for most tensors);
the F16 file; the packaged Q4_1 file. `lm_head` is tied to the embedding table and stays so in every file.
Torch fp32 eager decode tokens/s (KV cache, batch 1) is measured in this process for the 3x target.

Targets (issue: real LLMs): our GGUF at Q4_0's bits per weight gives lower perplexity than llama.cpp's
Q4_0 at equal decode speed; better perplexity per MB than its Q4_K_M; best 4-bit decode >= 3x torch fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).parent))
from quant_onnx import cpu_results_dir  # noqa: E402

CHILD = r"""
import json, math, sys, time
import numpy as np
import llama_cpp
job = json.loads(sys.argv[1])
if job.get("quantize"):
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, job["ftype"])
    params.nthread = job["threads"]
    rc = llama_cpp.llama_model_quantize(job["src"].encode(), job["dst"].encode(), params)
    print(json.dumps({"rc": rc}))
    sys.exit(0)
llm = llama_cpp.Llama(model_path=job["path"], n_ctx=512, n_threads=job["threads"], n_batch=256,
                      logits_all=True, verbose=False)
text = open(job["text"], encoding="utf-8").read()
ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
n, w = job["windows"], job["window"]
nll, count = 0.0, 0
for i in range(n):
    chunk = ids[i * w:(i + 1) * w]
    llm.reset()
    llm.eval(chunk)
    logits = np.asarray(llm.scores[: len(chunk)], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    nll -= float(sum(logp[j, chunk[j + 1]] for j in range(len(chunk) - 1)))
    count += len(chunk) - 1
prompt = ids[:128]
speeds = []
for _ in range(3):
    llm.reset()
    llm.eval(prompt)
    start = time.perf_counter()
    for _ in range(32):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([tok])
    speeds.append(32 / (time.perf_counter() - start))
llm.reset(); llm.eval(ids[:8])
greedy = []
for _ in range(12):
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1])); greedy.append(tok); llm.eval([tok])
print(json.dumps({"perplexity": math.exp(nll / count), "tokens": count, "decode_tokens_per_s": sorted(speeds)[1],
                  "greedy": llm.detokenize(greedy).decode("utf-8", "replace")}))
"""


def float_table(model: Any, fp32: Any) -> Any:
    """A copy of `model` with `fp32`'s float embedding table and the head tied to it (the blocks as they are)."""
    import copy

    from torch import nn

    names = [n for n, m in fp32.named_modules() if isinstance(m, nn.Embedding) or n.endswith("lm_head")]
    out = copy.deepcopy(model)
    for name, module in zip(names, copy.deepcopy([fp32.get_submodule(n) for n in names]), strict=True):
        parent, _, child_name = name.rpartition(".")
        setattr(out.get_submodule(parent) if parent else out, child_name, module)  # deep-copied together: still tied
    return out


def child(python: str, job: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run([python, "-c", CHILD, json.dumps(job)], capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"llama.cpp child failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def retime(args: argparse.Namespace) -> None:
    """Decode tokens/s of every GGUF in `args.retime` and of torch fp32 eager, interleaved, medians of rounds."""
    import statistics

    import torch

    torch.set_num_threads(args.threads)
    from modelpress.core.environment import environment
    from modelpress.zoo import get_entry

    entry = get_entry("smollm2-135m")
    fp32 = entry.load()
    files = sorted(args.retime.glob("*.gguf"))
    speeds: dict[str, list[float]] = {f.stem: [] for f in files} | {"torch-fp32-eager": []}
    for r in range(args.rounds):
        for f in files:
            res = child(args.llama_python, {"path": str(f), "text": str(args.retime / "test.txt"), "windows": 1,
                                            "window": 256, "threads": args.threads})  # fmt: skip
            speeds[f.stem].append(res["decode_tokens_per_s"])
        speeds["torch-fp32-eager"].append(entry.generation_speed(fp32)["bs1"]["decode_tokens_per_s"])
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in speeds.items()), flush=True)
    medians = {k: statistics.median(v) for k, v in speeds.items()}
    base = medians["torch-fp32-eager"]
    print("\n| file | decode tok/s bs1 (median) | vs torch fp32 eager |\n|---|---:|---:|")
    for k, v in medians.items():
        print(f"| {k} | {v:.1f} | {v / base:.1f}x |")
    env = environment(args.threads)
    doc = {"decode_tokens_per_s": speeds, "medians": medians, "rounds": args.rounds, "environment": env}
    out = cpu_results_dir() / "llm_gguf_decode.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-python", required=True, help="python of an environment with llama-cpp-python")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-gptq", action="store_true")
    parser.add_argument(
        "--retime", type=Path, default=None, help="an earlier run's work folder: time decode only, interleaved"
    )
    parser.add_argument("--rounds", type=int, default=3, help="with --retime: interleaved rounds")
    args = parser.parse_args()
    if args.retime is not None:
        retime(args)
        return

    import torch

    torch.set_num_threads(args.threads)
    from modelpress.core.context import Context
    from modelpress.core.environment import environment
    from modelpress.core.options import RunOptions
    from modelpress.export.gguf import export_gguf
    from modelpress.quant import LayerFilter, WeightOnlyConfig, quantize
    from modelpress.quant.gptq import GPTQConfig
    from modelpress.quant.ptq import quantize_embeddings
    from modelpress.zoo import get_entry
    from modelpress.zoo.causal_lm import split_text
    from modelpress.zoo.smollm2 import gguf_path

    work = Path(tempfile.mkdtemp(prefix="llm_gguf."))
    text = work / "test.txt"
    text.write_text(split_text("test"), encoding="utf-8")
    entry = get_entry("smollm2-135m")
    fp32 = entry.load()
    source = gguf_path()
    blocks = LayerFilter(exclude=(r"lm_head$",))
    ctx = Context(options=RunOptions(threads=args.threads, progress=False))
    files: dict[str, Path] = {"packaged-q4_1": source}
    with ctx.threads_scope():
        export_gguf(fp32, work / "f16.gguf", source_gguf=source, float_type="f16")
        files["f16"] = work / "f16.gguf"

        def both_tables(model: Any, name: str) -> None:
            """The file with the float table, then with the table (and the tied head) int8 in groups of 32."""
            export_gguf(model, work / f"{name}-f16table.gguf", source_gguf=source)
            files[f"{name}-f16table"] = work / f"{name}-f16table.gguf"
            quantize_embeddings(model, 8, 32, ctx)
            export_gguf(model, work / f"{name}.gguf", source_gguf=source)
            files[name] = work / f"{name}.gguf"

        rtn = quantize(fp32, WeightOnlyConfig(bits=4, symmetric=True, granularity="group", group_size=32,
                                              layers=blocks), ctx=ctx)  # fmt: skip
        both_tables(rtn, "ours-rtn-q4_0")
        if not args.skip_gptq:
            start = time.perf_counter()
            cfg = GPTQConfig(bits=4, group_size=32, symmetric=True, layers=blocks, head_bits=4)
            gptq = quantize(fp32, cfg, data=entry.calibration_data(128, 8), ctx=ctx)
            print(f"GPTQ in {time.perf_counter() - start:.0f} s", flush=True)
            export_gguf(gptq, work / "ours-gptq-q4_0-q4table.gguf", source_gguf=source)
            files["ours-gptq-q4_0-q4table"] = work / "ours-gptq-q4_0-q4table.gguf"
            both_tables(float_table(gptq, fp32), "ours-gptq-q4_0")  # the same block codes, the float table back
            cfg = GPTQConfig(bits=5, group_size=32, symmetric=True, layers=blocks, embedding_bits=8,
                             embedding_group_size=32)  # fmt: skip
            gptq5 = quantize(fp32, cfg, data=entry.calibration_data(128, 8), ctx=ctx)
            export_gguf(gptq5, work / "ours-gptq-q5_0.gguf", source_gguf=source)
            files["ours-gptq-q5_0"] = work / "ours-gptq-q5_0.gguf"
        torch_decode = entry.generation_speed(fp32)["bs1"]["decode_tokens_per_s"]
    anchors = (("llama.cpp-q4_0", "LLAMA_FTYPE_MOSTLY_Q4_0"), ("llama.cpp-q4_k_m", "LLAMA_FTYPE_MOSTLY_Q4_K_M"))
    for name, ftype in anchors:
        dst = work / f"{name}.gguf"
        child(args.llama_python, {"quantize": True, "src": str(files["f16"]), "dst": str(dst), "ftype": ftype,
                                  "threads": args.threads})  # fmt: skip
        files[name] = dst
    rows: dict[str, Any] = {}
    for name, path in files.items():
        r = child(args.llama_python, {"path": str(path), "text": str(text), "windows": 32, "window": 256,
                                      "threads": args.threads})  # fmt: skip
        r["size_mb"] = path.stat().st_size / 1e6
        rows[name] = r
        print(f"{name}: perplexity {r['perplexity']:.4f}, {r['decode_tokens_per_s']:.1f} tok/s, "
              f"{r['size_mb']:.1f} MB, {r['greedy']!r}", flush=True)  # fmt: skip
    best4 = max((r["decode_tokens_per_s"] for k, r in rows.items() if "q4" in k), default=0.0)
    targets = {"best_4bit_decode_ge_3x_torch_fp32": best4 >= 3 * torch_decode}
    if "ours-gptq-q4_0" in rows:
        ours, anchor = rows["ours-gptq-q4_0"], rows["llama.cpp-q4_0"]
        targets["ours_q4_0_lower_perplexity_than_llama_q4_0"] = ours["perplexity"] < anchor["perplexity"]
        targets["ours_q4_0_decode_within_5pct"] = ours["decode_tokens_per_s"] >= 0.95 * anchor["decode_tokens_per_s"]
        f16 = rows["f16"]["perplexity"]
        # perplexity per MB: the increase over F16 times the size (lower is better), for each of our GPTQ files
        per_mb = {k: (r["perplexity"] - f16) * r["size_mb"] for k, r in rows.items()}
        for name in [k for k in rows if k.startswith("ours-gptq")]:
            targets[f"{name}_beats_q4_k_m_per_mb"] = per_mb[name] < per_mb["llama.cpp-q4_k_m"]
        for r, v in zip(rows.values(), per_mb.values(), strict=True):
            r["increase_x_mb"] = v
    llama_version = subprocess.run([args.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                   capture_output=True, text=True).stdout.strip()  # fmt: skip
    env = environment(args.threads)
    env["versions"]["llama-cpp-python"] = llama_version
    doc = {"rows": rows, "torch_fp32_decode_tokens_per_s": torch_decode, "targets": targets, "environment": env}
    out = cpu_results_dir() / "llm_gguf.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print("\n| file | perplexity (llama.cpp) | decode tok/s bs1 | MB | increase x MB |\n|---|---:|---:|---:|---:|")
    for k, r in rows.items():
        per_mb = f"{r['increase_x_mb']:.1f}" if "increase_x_mb" in r else "-"
        print(f"| {k} | {r['perplexity']:.3f} | {r['decode_tokens_per_s']:.1f} | {r['size_mb']:.1f} | {per_mb} |")
    print(f"\ntorch fp32 eager decode: {torch_decode:.1f} tok/s; targets: {targets}")
    print(f"CPU: {env['cpu']['model']}, {args.threads} threads; llama-cpp-python {llama_version}")


if __name__ == "__main__":
    main()
