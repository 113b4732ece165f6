"""Auto mode's search against an exhaustive run over the same space, on one model, in one process.

    python benchmarks/auto_search.py minilm --max-drop 0.5 --time-budget 5m --threads 2
    python benchmarks/auto_search.py digits-cnn --max-drop 0.005 --time-budget 1m
    python benchmarks/auto_search.py smollm2-135m --max-drop 5% --time-budget 15m --fixed w4-gptq,w4-awq,w4,w8

Runs the search (wall time against its budget), then `--exhaustive` over the same candidates without a
budget (the reference), and optionally each fixed recipe of `--fixed`; prints both choices with their p50 at
the largest batch size, validation and test drops, and the ratio of the search's choice to the best the
exhaustive run found within budget. Writes the figures as JSON (`--out`). Timings on a shared machine are
noisy: compare ratios, re-time on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from modelpress.auto import AutoSearch, auto_compress
from modelpress.core.options import RunOptions


def chosen_row(report) -> dict:  # noqa: ANN001
    return next(r for r in report.auto["candidates"] if r["status"] == "chosen")


def run(model: str, search: AutoSearch, options: RunOptions, work: Path, label: str) -> dict:
    start = time.perf_counter()
    _, report = auto_compress(model, search, out_dir=work / label, options=options)
    row = chosen_row(report)
    return {"label": label, "wall_s": round(time.perf_counter() - start, 1), "chosen": report.auto["chosen"],
            "p50_ms": row["p50_ms"], "drop": row["drop"], "test_drop": row["test_drop"],
            "measured": report.auto["measured"], "cache_hits": report.auto["cache"]["hits"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--max-drop", required=True)
    ap.add_argument("--time-budget", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--fixed", default="", help="comma-separated built-in recipes measured alone for comparison")
    ap.add_argument("--no-exhaustive", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    drop = args.max_drop if args.max_drop.endswith("%") else float(args.max_drop)
    options = RunOptions(threads=args.threads, batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")))
    results = []
    with tempfile.TemporaryDirectory(prefix="auto-bench.") as tmp:
        work = Path(tmp)
        results.append(
            run(args.model, AutoSearch(max_drop=drop, time_budget=args.time_budget), options, work, "search")
        )
        if not args.no_exhaustive:
            ex = AutoSearch(max_drop=drop, strategy="exhaustive")
            results.append(run(args.model, ex, options, work, "exhaustive"))
        for name in filter(None, args.fixed.split(",")):
            fixed = AutoSearch(max_drop=drop, candidates=(f"recipe:{name}",), cache=False)
            try:
                results.append(run(args.model, fixed, options, work, f"fixed {name}"))
            except Exception as e:  # noqa: BLE001 - a fixed recipe over the budget is a result too
                results.append({"label": f"fixed {name}", "error": str(e)[:300]})
    for r in results:
        print(json.dumps(r))
    if len(results) > 1 and "p50_ms" in results[1]:
        print(f"search / exhaustive p50 at the largest batch: {results[0]['p50_ms'] / results[1]['p50_ms']:.3f}")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
