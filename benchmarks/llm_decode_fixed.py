"""Decode speed at batch 1 of a causal LM's deployable forms, in one process, interleaved: auto mode's choice (a
GenAI folder, `compress --auto`) against each fixed recipe's fastest decoder, and the original.

    python benchmarks/llm_decode_fixed.py smollm2-135m --auto-dir OUT --recipes w8,int8-dynamic,int8-smooth \
        --rounds 5 --threads 2

A fixed recipe's decoder is its GenAI folder where its weights are weight-only codes (MatMulNBits), else its
eager model with transformers' KV cache (int8 activations: no folder runs them); both are timed where both
exist. Every recipe's perplexity is measured on the validation split (auto mode's budget split) and on the test
split, against the original's, so "meets the budget" is decided here on the same figures. Each round decodes
33 tokens (a prefill and 32 steps) after the entry's 128-token prompt with every form in turn; medians of the
rounds. Writes JSON (`--out`). CPU flags are recorded; compare ratios, on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from modelpress.auto.decode import ms_per_token
from modelpress.core.environment import cpu_info, environment
from modelpress.core.errors import BadInputError
from modelpress.core.options import RunOptions
from modelpress.export.genai import DecoderModel, decode_speed, export_genai, folder_spec
from modelpress.loading import resolve
from modelpress.pipeline import apply_recipe
from modelpress.recipes.recipe import load_recipe

NEW_TOKENS = 33


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--auto-dir", type=Path, help="a `compress --auto` output folder whose genai/ is timed too")
    ap.add_argument("--recipes", default="w8,int8-dynamic,int8-smooth")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    options = RunOptions(threads=args.threads, progress=False)
    loaded = resolve(args.model)
    entry = loaded.entry
    prompt = entry.example_inputs(1)[0]
    forms: dict[str, dict] = {}  # name -> {"kind": "eager" | "genai", "model" | "path", quality...}

    def quality(model) -> dict:  # noqa: ANN001
        return {"validation": entry.validation_quality(model).value, "test": entry.evaluate(model).value}

    start = time.perf_counter()
    forms["original (eager, KV cache)"] = {"kind": "eager", "model": loaded.model, **quality(loaded.model)}
    work = Path(tempfile.mkdtemp(prefix="llm-decode-"))
    for name in filter(None, args.recipes.split(",")):
        t = time.perf_counter()
        model, _, _ = apply_recipe(loaded, load_recipe(name), None, options)
        q = quality(model)
        forms[f"{name} (eager, KV cache)"] = {"kind": "eager", "model": model, **q, "build_s": time.perf_counter() - t}
        try:
            written = export_genai(model, work / name, prompt_ids=prompt, threads=args.threads)
            g = quality(DecoderModel(work / name, args.threads))
            forms[f"{name} (genai/)"] = {"kind": "genai", "path": work / name, **g,
                                         "cosine": written["parity"]["mean_cosine"]}  # fmt: skip
        except BadInputError as e:
            forms[f"{name} (eager, KV cache)"]["genai"] = f"no GenAI folder: {e}"[:200]
    if args.auto_dir is not None:
        folder = args.auto_dir / "genai"
        auto = json.loads((args.auto_dir / "report.json").read_text())["auto"]
        forms[f"auto choice: {auto['chosen']}"] = {"kind": "genai", "path": folder,
                                                  **quality(DecoderModel(folder, args.threads))}  # fmt: skip
    setup_s = time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in forms}
    for _ in range(args.rounds):
        for name, form in forms.items():
            if form["kind"] == "eager":
                gen = entry.generation_speed(form["model"], new_tokens=NEW_TOKENS, batches=(1,))
            else:
                spec = folder_spec(form["path"])
                gen = decode_speed(form["path"] / spec["filename"], prompt, spec, threads=args.threads,
                                   new_tokens=NEW_TOKENS, batches=(1,), repeats=1)  # fmt: skip
            times[name].append(ms_per_token(gen))
    base = forms["original (eager, KV cache)"]
    rows = []
    original_ms = statistics.median(times["original (eager, KV cache)"])
    for name, form in forms.items():
        ms = statistics.median(times[name])
        rows.append({"form": name, "decode_tok_s": 1e3 / ms, "vs_original": original_ms / ms, "rounds_ms": times[name],
                     "validation_ppl": form["validation"], "test_ppl": form["test"],
                     "validation_increase": form["validation"] / base["validation"] - 1,
                     "test_increase": form["test"] / base["test"] - 1,
                     **{k: form[k] for k in ("cosine", "genai", "build_s") if k in form}})  # fmt: skip
    print("| form | decode tok/s bs1 | vs original | perplexity val / test | increase val / test |")
    print("|---|---:|---:|---|---|")
    for r in rows:
        print(
            f"| {r['form']} | {r['decode_tok_s']:.1f} | {r['vs_original']:.2f}x | {r['validation_ppl']:.3f} / "
            f"{r['test_ppl']:.3f} | {100 * r['validation_increase']:+.2f}% / {100 * r['test_increase']:+.2f}% |"
        )
    result = {
        "model": args.model,
        "rounds": args.rounds,
        "new_tokens": NEW_TOKENS,
        "threads": args.threads,
        "setup_s": round(setup_s, 1),
        "cpu": cpu_info(),
        "environment": environment(args.threads),
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
