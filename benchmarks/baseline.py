"""Baseline figures of the zoo models, measured in one run with fixed threads.

    python benchmarks/baseline.py --threads 2 [--stsb ../shared/data/stsb]

Writes benchmarks/results/baseline.json and prints the Markdown table recorded in BENCHMARKS.md.
Later benchmarks (quantization, pruning, distillation) compare compressed models and peer tools
against these baselines in the same run.
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
    print(f"\nCPU: {env['cpu']['model']} ({', '.join(env['cpu']['features'])}), threads {env['threads']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))


if __name__ == "__main__":
    main()
