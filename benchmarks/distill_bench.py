"""Knowledge distillation: distilled students against labels-only training and against their teachers.

    python benchmarks/distill_bench.py                       # both parts
    python benchmarks/distill_bench.py --part digits
    python benchmarks/distill_bench.py --part minilm --layers 0,2,4 --bucket --out /tmp/minilm-024.json

(a) digits-cnn → a student with ≤ 1/4 of its parameters (channels sliced by L1 importance):
    distilled test accuracy vs the same student trained on labels alone (same trainer, init, epochs
    and seeds; each method at two learning rates, its better one kept) and vs the teacher.
(b) MiniLM (6 layers) → 3 layers initialised from the teacher's, distilled offline on unlabelled
    sentences (STS-B train + Python docs; never STS-B test) with an embedding loss; the best epoch
    is chosen on STS-B dev; reported: STS-B test Spearman, latency at batch 32 / 128 tokens
    (interleaved medians, fixed threads) and the wall time of the whole distillation.

Writes benchmarks/results/distill.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).parent / "results" / "distill.json"


def _params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def bench_digits(seeds: int, epochs: int, width_ratio: float, threads: int) -> dict[str, Any]:
    import torch

    from modelpress.core.context import Context
    from modelpress.core.options import RunOptions
    from modelpress.distill import DistillConfig, distill, narrower_cnn
    from modelpress.zoo.digits import accuracy, load_digits_cnn, load_digits_split

    torch.set_num_threads(threads)
    teacher = load_digits_cnn()
    train, (Xt, yt) = load_digits_split("train"), load_digits_split("test")
    ctx = Context(options=RunOptions(progress=False))
    kd = {"temperature": 3.0, "alpha": 0.7}
    lrs = (3e-3, 5e-3)  # both methods get the same two learning rates; each keeps its better one
    runs: dict[str, list[float]] = {}
    start = time.perf_counter()
    for seed in range(seeds):
        for lr in lrs:
            # alpha 0: cross-entropy on the labels only, through the same trainer, schedule and init
            for method, kw in (("distilled", kd), ("labels", {"alpha": 0.0})):
                cfg = DistillConfig(epochs=epochs, batch_size=64, seed=seed, lr=lr, **kw)
                student = distill(teacher, narrower_cnn(teacher, width_ratio), train, cfg, ctx=ctx).student
                runs.setdefault(f"{method}_lr{lr:g}", []).append(accuracy(student, Xt, yt))

    def best(method: str) -> str:
        return max((k for k in runs if k.startswith(method)), key=lambda k: statistics.mean(runs[k]))

    d_key, l_key = best("distilled"), best("labels")
    teacher_acc = accuracy(teacher, Xt, yt)
    student_params = _params(narrower_cnn(teacher, width_ratio))
    distilled, labels = statistics.mean(runs[d_key]), statistics.mean(runs[l_key])
    return {
        "teacher_accuracy": teacher_acc,
        "teacher_params": _params(teacher),
        "student_params": student_params,
        "param_ratio": student_params / _params(teacher),
        "width_ratio": width_ratio,
        "epochs": epochs,
        "seeds": seeds,
        "kd": kd,
        "per_seed": runs,
        "means": {k: statistics.mean(v) for k, v in runs.items()},
        "distilled_accuracy": distilled,
        "distilled_best": d_key,
        "labels_only_accuracy": labels,
        "labels_only_best": l_key,
        "gain_points": (distilled - labels) * 100,
        "fraction_of_teacher": distilled / teacher_acc,
        "seconds": time.perf_counter() - start,
    }


def _interleaved_latency(models: dict[str, Any], inputs: tuple, threads: int, rounds: int, calls: int) -> dict:
    """Median ms per call of each model, alternating models round by round (fair under background load)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():  # warm-up
            for _ in range(3):
                m(*inputs)
        for _ in range(rounds):
            for name, m in models.items():
                for _ in range(calls):
                    t0 = time.perf_counter()
                    m(*inputs)
                    times[name].append((time.perf_counter() - t0) * 1e3)
    torch.set_num_threads(before)
    return {k: {"p50_ms": statistics.median(v), "runs": len(v)} for k, v in times.items()}


def bench_minilm(
    layers: list[int],
    epochs: int,
    lr: float,
    batch_size: int,
    hidden_weight: float,
    threads: int,
    train_threads: int,
    bucket: bool = False,
) -> dict[str, Any]:
    import torch

    import modelpress
    from modelpress.core.context import Context
    from modelpress.core.options import RunOptions
    from modelpress.distill import DistillConfig, distill, fewer_layers, zoo_training_data
    from modelpress.zoo.minilm import MiniLMEntry
    from modelpress.zoo.stsb import default_stsb_dir, load_split, spearman_score
    from modelpress.zoo.text import embed

    folder = default_stsb_dir()
    if folder is None:
        raise SystemExit("STS-B not found: set MODELPRESS_STSB or place it in ../shared/data/stsb")
    teacher = modelpress.load_model("minilm")
    tok = teacher.tokenizer

    def score(model: Any, split: str) -> float:
        fn = lambda s: embed(model, tok, s, 64, 256, teacher.pooling, teacher.normalize)  # noqa: E731
        return spearman_score(fn, load_split(folder, split))

    start = time.perf_counter()
    torch.set_num_threads(train_threads)
    test_sentences = {s for a, b, _ in load_split(folder, "test") for s in (a, b)}
    candidates = zoo_training_data(teacher)  # STS-B train + Python docs
    # A few short sentences occur in both STS-B train and test: leave them out, so no test sentence is seen.
    sentences = [s for s in candidates if s not in test_sentences]
    leaked = len(candidates) - len(sentences)
    student = fewer_layers(teacher, layers)
    init_dev = score(student, "dev")
    cfg = DistillConfig(
        mode="offline",
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        warmup=0.1,
        embedding_loss="cosine",
        hidden_weight=hidden_weight,
        weight_decay=0.01,
        bucket_by_length=bucket,
    )
    result = distill(
        teacher,
        student,
        sentences,
        cfg,
        ctx=Context(options=RunOptions(progress=True)),
        metric=lambda m: score(m, "dev"),
    )
    train_seconds = time.perf_counter() - start
    student = result.student.eval()
    teacher_test, student_test = score(teacher, "test"), score(student, "test")
    wall = time.perf_counter() - start

    example = MiniLMEntry().example_inputs(32)  # (32, 128) real sentences padded to 128 tokens
    lat = _interleaved_latency({"teacher": teacher, "student": student}, example, threads, rounds=8, calls=3)
    return {
        "layers": layers,
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "hidden_weight": hidden_weight,
        "bucket_by_length": bucket,
        "train_sentences": len(sentences),
        "train_sentences_dropped_as_in_stsb_test": leaked,
        "teacher_params": _params(teacher),
        "student_params": _params(student),
        "student_init_dev_spearman": init_dev,
        "history": result.history,
        "teacher_test_spearman": teacher_test,
        "student_test_spearman": student_test,
        "latency_b32_s128": lat,
        "speedup": lat["teacher"]["p50_ms"] / lat["student"]["p50_ms"],
        "latency_threads": threads,
        "train_threads": train_threads,
        "distill_seconds": train_seconds,
        "wall_seconds": wall,
    }


def table(results: dict[str, Any]) -> list[str]:
    rows = ["| benchmark | metric | distilled student | reference | result | target |", "|---|---|---|---|---|---|"]
    if d := results.get("digits"):
        rows += [
            f"| digits-cnn → {d['student_params']} params ({d['param_ratio']:.1%} of {d['teacher_params']}) "
            f"| test accuracy, mean of {d['seeds']} seeds | {d['distilled_accuracy']:.2%} "
            f"| labels only {d['labels_only_accuracy']:.2%} | {d['gain_points']:+.2f} pts | ≥ +0.5 pts |",
            f"| | vs teacher | {d['distilled_accuracy']:.2%} | teacher {d['teacher_accuracy']:.2%} "
            f"| {d['fraction_of_teacher']:.1%} of teacher | ≥ 99% |",
        ]
    if m := results.get("minilm"):
        lat = m["latency_b32_s128"]
        rows += [
            f"| MiniLM 6 → {len(m['layers'])} layers {m['layers']} | STS-B test Spearman "
            f"| {m['student_test_spearman']:.2f} | teacher {m['teacher_test_spearman']:.2f} "
            f"| {m['student_test_spearman'] - m['teacher_test_spearman']:+.2f} | ≥ 80.0 |",
            f"| | latency b32 s128, {m['latency_threads']} threads (p50) | {lat['student']['p50_ms']:.1f} ms "
            f"| teacher {lat['teacher']['p50_ms']:.1f} ms | {m['speedup']:.2f}x | ≥ 1.8x |",
            f"| | wall time (cache + {m['epochs']} epochs + evals) | {m['wall_seconds'] / 60:.1f} min | | | ≤ 20 min |",
        ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("digits", "minilm", "all"), default="all")
    parser.add_argument("--threads", type=int, default=2, help="threads for latency")
    parser.add_argument("--train-threads", type=int, default=2, help="threads for training")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--digits-epochs", type=int, default=30)
    parser.add_argument("--width-ratio", type=float, default=0.48)
    parser.add_argument("--layers", default="0,3,5", help="teacher layers kept (0,3,5 scored best at init)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden-weight", type=float, default=0.0)
    parser.add_argument("--bucket", action="store_true", help="batch sentences of similar length")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from modelpress.core.environment import environment

    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.part in ("digits", "all"):
        results["digits"] = bench_digits(args.seeds, args.digits_epochs, args.width_ratio, args.train_threads)
    if args.part in ("minilm", "all"):
        layers = [int(x) for x in args.layers.split(",")]
        results["minilm"] = bench_minilm(
            layers,
            args.epochs,
            args.lr,
            args.batch_size,
            args.hidden_weight,
            args.threads,
            args.train_threads,
            args.bucket,
        )
    results["environment"] = environment(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print("\n".join(table(results)))
    env = results["environment"]
    print(
        f"\nCPU: {env['cpu']['model']}, {env['cpu']['logical_cores']} logical cores; torch {env['versions']['torch']}"
    )


if __name__ == "__main__":
    main()
