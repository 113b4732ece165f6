"""Depth or width pruning of a real LLM recovered by distillation: SmolLM2-135M with a third of its blocks,
or of its FFN neurons and attention head groups, cut.

    HF_HUB_OFFLINE=1 python benchmarks/llm_depth.py [--threads 2] [--minutes 30] [--depth-ratio 0.667]
    HF_HUB_OFFLINE=1 python benchmarks/llm_depth.py --width-ratio 0.667 [--heads-ratio 0.667] [--minutes 15]

Depth: the student keeps the `depth-ratio` most influential of the 30 blocks (block influence, `1 - cos(input,
output)` of the hidden states, on 16 train windows) and starts from their weights. Width (`--width-ratio`):
the student keeps every block with `width-ratio` of each FFN's neurons and `heads-ratio` (default: the same)
of each attention layer's K/V head groups with their query heads, the units that write the most into the
residual stream on 16 train windows (`||x|| * |W|` of the output projections' columns), and a config that
says so (results/…/llm_width.json). It is trained to
imitate the original (KL on the next-token distributions, plus MSE between each kept block's output
and the teacher block it came from) on the documentation's train split, 256-token windows, for as many
steps as the time budget allows at the measured speed of the first steps. Quality: perplexity per token
on 8192 tokens of the test split (`CausalLMEntry.evaluate`), disjoint from the training text.

Target (issue: real LLMs): a depth- or width-pruned SmolLM2 with >= 25% fewer parameters recovers at
least half of its perplexity increase by distillation within 30 minutes on 2 cores.

Results go to results/<cpu>/llm_depth.json (llm_width.json) with the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from quant_onnx import cpu_results_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=30.0, help="wall-clock budget of the whole recovery")
    parser.add_argument("--depth-ratio", type=float, default=0.667)
    parser.add_argument("--width-ratio", type=float, default=None, help="width pruning instead of depth")
    parser.add_argument("--heads-ratio", type=float, default=None, help="width: kept head groups (default: width)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--hidden-weight", type=float, default=0.01)
    parser.add_argument("--probe-steps", type=int, default=4, help="steps timed to size the run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from modelpress.core.environment import environment
    from modelpress.distill import DistillConfig, StudentConfig, build_student, distill
    from modelpress.distill.api import _probe_batches, _zoo_training
    from modelpress.distill.data import as_samples
    from modelpress.zoo import get_entry

    entry = get_entry("smollm2-135m")
    teacher = entry.load()
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    ids, record = _zoo_training(teacher)  # the train split's windows (the registry's causal-LM training set)
    samples = as_samples(ids, teacher)
    if args.width_ratio is not None:
        shape = StudentConfig(width_ratio=args.width_ratio, heads_ratio=args.heads_ratio)
    else:
        shape = StudentConfig(depth_ratio=args.depth_ratio)
    start = time.perf_counter()
    student = build_student(teacher, shape, _probe_batches(samples))
    build_seconds = time.perf_counter() - start
    fewer = 1 - params(student) / params(teacher)
    base = entry.evaluate(teacher).value
    cut = entry.evaluate(student).value
    kept = getattr(student, "width_pruned", {}).get("config") or f"blocks {student.teacher_layers}"
    print(f"teacher {params(teacher):,} params, perplexity {base:.3f}; student keeps {kept}:"
          f" {params(student):,} params ({fewer:.1%} fewer), perplexity {cut:.3f}", flush=True)  # fmt: skip

    def config(steps: int) -> DistillConfig:
        return DistillConfig(alpha=1.0, temperature=1.0, hidden_weight=args.hidden_weight, epochs=100,
                             max_steps=steps, batch_size=args.batch_size, lr=args.lr, warmup=0.05,
                             weight_decay=0.0)  # fmt: skip

    start = time.perf_counter()
    probe = build_student(teacher, shape, _probe_batches(samples))
    timed = distill(teacher, probe, samples, config(args.probe_steps))
    per_step = timed.seconds / max(timed.steps, 1)  # the training steps alone (building the probe is not a step)
    del probe
    budget = args.minutes * 60 - (time.perf_counter() - start)
    steps = max(1, int(budget / per_step * 0.92))  # the rest: evaluation-free margin for slower steps
    print(f"{per_step:.1f} s per step of {args.batch_size} windows: {steps} steps in the budget", flush=True)
    result = distill(teacher, student, samples, config(steps))
    seconds = time.perf_counter() - start
    recovered = entry.evaluate(result.student).value
    share = (cut - recovered) / (cut - base)
    print(f"after {result.steps} steps ({seconds / 60:.1f} min incl. sizing): perplexity {recovered:.3f}, "
          f"{share:.1%} of the increase recovered", flush=True)  # fmt: skip
    env = environment(args.threads)
    doc = {
        "teacher": {"params": params(teacher), "perplexity": base},
        "student": {
            "params": params(student),
            "fewer_params": fewer,
            "kept_blocks": list(student.teacher_layers),
            "width": getattr(student, "width_pruned", None),
            "build_seconds": build_seconds,
            "perplexity_cut": cut,
            "perplexity_recovered": recovered,
        },  # fmt: skip
        "training": {
            **record,
            "steps": result.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "hidden_weight": args.hidden_weight,
            "seconds_total": seconds,
            "history": result.history,
        },  # fmt: skip
        "recovered_share": share,
        "targets": {
            "fewer_params_ge_25pct": fewer >= 0.25,
            "recovers_half_within_budget": share >= 0.5 and seconds <= args.minutes * 60,
        },  # fmt: skip
        "environment": env,
    }
    out = cpu_results_dir() / ("llm_width.json" if args.width_ratio is not None else "llm_depth.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"CPU: {env['cpu']['model']}, {args.threads} threads; wrote {out}")


if __name__ == "__main__":
    main()
