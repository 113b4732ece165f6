"""Auto mode's search against an exhaustive run over the same space, on one model, in one process.

    python benchmarks/auto_search.py minilm --max-drop 0.5 --time-budget 5m --threads 2
    python benchmarks/auto_search.py digits-cnn --max-drop 0.005 --time-budget 1m
    python benchmarks/auto_search.py smollm2-135m --max-drop 5% --time-budget 15m --no-exhaustive \
        --fixed w8,int8-dynamic,int8-smooth,w4 --retime 5 --threads 2

Runs the search (wall time against its budget), then `--exhaustive` over the same candidates without a
budget (the reference), and optionally each fixed recipe of `--fixed`; prints both choices with their p50 at
the largest batch size, validation and test drops, and the ratio of the search's choice to the best the
exhaustive run found within budget. `--retime N` then times every run's chosen artifact again, and the
original, in one process, interleaved, N rounds (medians): the runs' own figures were taken minutes apart.
Writes the figures as JSON (`--out`). Timings on a shared machine are noisy: compare ratios, re-time on a
quiet one.
"""

from __future__ import annotations

import argparse
import contextlib
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
    out = work / label.replace(" ", "-")
    _, report = auto_compress(model, search, out_dir=out, options=options)
    row = chosen_row(report)
    artifact = next((str(p) for p in (out / "model.onnx", out / "model.pt2") if p.exists()), None)
    return {"label": label, "wall_s": round(time.perf_counter() - start, 1), "chosen": report.auto["chosen"],
            "p50_ms": row["p50_ms"], "drop": row["drop"], "test_drop": row["test_drop"],
            "relative_drop": row.get("relative_drop"), "measured": report.auto["measured"],
            "cache_hits": report.auto["cache"]["hits"], "artifact": artifact,
            "candidates": [{k: r.get(k) for k in ("recipe", "artifact", "stage", "status", "p50_ms", "drop", "why",
                                                  "build_s")} for r in report.auto["candidates"]]}  # fmt: skip


def retime(model: str, results: list[dict], options: RunOptions, rounds: int) -> dict:
    """Every chosen artifact (in a child process, as the speed gate times it: no ONNX Runtime threads spinning
    beside torch's) and the original (here), interleaved round by round: medians of `rounds`."""
    import statistics

    from modelpress.measure import measure_latency
    from modelpress.measure.gate import probe
    from modelpress.zoo import get_entry

    entry = get_entry(model)
    original = entry.load()
    inputs = {str(bs): tuple(entry.example_inputs(bs)) for bs in options.batch_sizes}
    paths = {r["label"]: r["artifact"] for r in results if r.get("artifact")}
    times: dict[str, dict[str, list[float]]] = {"original (torch eager)": {}, **{label: {} for label in paths}}
    for _ in range(rounds):
        for bs, batch in inputs.items():
            lat = measure_latency(original, batch, warmup=1, repeats=3, threads=options.threads)
            times["original (torch eager)"].setdefault(bs, []).append(lat.p50)
        for label, path in paths.items():
            kind = "onnx" if path.endswith(".onnx") else "pt2"
            result = probe(kind, path, inputs, {bs: 600.0 for bs in inputs}, options.threads, calls=3)
            for bs, ms in result.ms.items():
                times[label].setdefault(bs, []).append(ms)
    return {name: {bs: round(statistics.median(v), 2) for bs, v in per.items()} for name, per in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--max-drop", required=True)
    ap.add_argument("--time-budget", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-sizes", default="1,32")
    ap.add_argument("--fixed", default="", help="comma-separated built-in recipes measured alone for comparison")
    ap.add_argument("--no-exhaustive", action="store_true")
    ap.add_argument("--retime", type=int, default=0, help="rounds of interleaved re-timing of the chosen artifacts")
    ap.add_argument("--reuse", type=Path, default=None, help="a kept work folder (--keep): re-time its runs only")
    ap.add_argument("--keep", type=Path, default=None, help="keep the runs' folders here (default: a temporary one)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    drop = args.max_drop if args.max_drop.endswith("%") else float(args.max_drop)
    options = RunOptions(threads=args.threads, batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")))
    results = []
    if args.reuse is not None:  # the runs' figures from their reports; the artifacts re-timed
        results = [reused(folder) for folder in sorted(args.reuse.iterdir()) if (folder / "report.json").exists()]
        timed = retime(args.model, results, options, args.retime or 3)
        report(results, timed, options, args.out)
        return
    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)  # kept: --reuse re-times them later
        work = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="auto-bench.")))
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
        timed = retime(args.model, results, options, args.retime) if args.retime else None
    report(results, timed, options, args.out)


def reused(folder: Path) -> dict:
    """A run's figures read back from its folder's report."""
    doc = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    row = next(r for r in doc["auto"]["candidates"] if r["status"] == "chosen")
    label = "search" if folder.name == "search" else folder.name.replace("-", " ", 1)
    artifact = next((str(p) for p in (folder / "model.onnx", folder / "model.pt2") if
                     p.name.startswith(row["artifact"].split()[0]) and p.exists()), None)  # fmt: skip
    return {"label": label, "wall_s": doc["auto"]["elapsed_s"], "chosen": doc["auto"]["chosen"],
            "p50_ms": row["p50_ms"], "drop": row["drop"], "test_drop": row.get("test_drop"),
            "relative_drop": row.get("relative_drop"), "measured": doc["auto"]["measured"],
            "artifact": artifact}  # fmt: skip


def report(results: list[dict], timed: dict | None, options: RunOptions, out: Path | None) -> None:
    for r in results:
        print(json.dumps(r))
    if len(results) > 1 and "p50_ms" in results[1] and not results[1]["label"].startswith("fixed"):
        print(f"search / exhaustive p50 at the largest batch: {results[0]['p50_ms'] / results[1]['p50_ms']:.3f}")
    if timed is not None:
        largest = str(max(options.batch_sizes))
        ours = timed.get("search", {}).get(largest)
        for name, per in timed.items():
            ratio = f", search's choice / this: {ours / per[largest]:.3f}" if ours and largest in per else ""
            print(f"re-timed {name}: {per} ms{ratio}")
    if out is not None:
        doc = {"runs": results, "retimed_ms": timed}
        out.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
