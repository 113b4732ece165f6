"""Pruning: ours against Torch-Pruning, in one run with fixed threads.

    HF_HUB_OFFLINE=1 python benchmarks/prune_bench.py --threads 2 [--only digits minilm sparse] [--rounds 15]

Parts (each prints its rows; all go to benchmarks/results/prune.json and a Markdown table):

- `digits`: digits-cnn with half of every conv's channels removed (`StructuredPruneConfig(channel_ratio=0.5)`,
  L2 magnitude), fine-tuned 20 epochs with the zoo entry's loop; the anchor is Torch-Pruning's
  `MagnitudePruner` (its DependencyGraph, `GroupMagnitudeImportance(p=2)`, `pruning_ratio=0.5`, classifier
  ignored) with the same fine-tune. Latency at batch 32, params ratio, test accuracy.
- `minilm`: all-MiniLM-L6-v2 with a third of the heads (12 -> 8) and half the FFN neurons removed in
  every layer; latency at batch 32, sequence 128; STS-B test Spearman before pruning, right after, and
  after recovery (`distill_text_encoder`: 1 - cosine to the unpruned model's sentence embeddings on the
  unique STS-B train sentences, one epoch). Torch-Pruning's `MetaPruner` is tried on the same targets.
- `sparse`: 80% unstructured magnitude sparsity on digits-cnn (global ranking), one-shot + 20 epochs and
  gradual (cubic schedule over 300 steps, 30 epochs); test accuracy, size of the `save_sparse` file
  against the dense safetensors file, and eager latency (dense kernels: no speed-up expected).

`runs` in the JSON records, per part, the threads, rounds, seconds and the load average of the run
that measured it (parts run separately are merged into one file).

Latency: eager PyTorch, `--threads` intra-op threads, inference mode, warm-up, then `--rounds` rounds
in which every model runs `--per-round` calls back to back (interleaved, so all share the machine's
load); the median and the minimum over all calls are reported, and each speed-up is a ratio of
medians (and of minimums: on a machine shared with other work the minimum is the steadier figure)
from one run.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from modelpress.core import Context, RunOptions  # noqa: E402
from modelpress.measure.size import artifact_size_bytes, count_params  # noqa: E402
from modelpress.prune import (  # noqa: E402
    PolynomialSchedule,
    StructuredPruneConfig,
    UnstructuredPruneConfig,
    distill_text_encoder,
    prune,
    save_sparse,
)
from modelpress.prune.stats import count_flops  # noqa: E402
from modelpress.zoo import get_entry  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "prune.json"
FINETUNE_EPOCHS = 20


def interleaved_p50(fns: dict[str, Callable[[], Any]], rounds: int, per_round: int) -> dict[str, dict[str, float]]:
    """Median and min latency (ms) of each fn, timed in interleaved rounds after a warm-up."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    gc.collect()
    gc.disable()
    try:
        with torch.inference_mode():
            for fn in fns.values():
                for _ in range(5):
                    fn()
            for _ in range(rounds):
                for key, fn in fns.items():
                    for _ in range(per_round):
                        start = time.perf_counter()
                        fn()
                        times[key].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return {k: {"p50": statistics.median(v) * 1e3, "min": min(v) * 1e3, "calls": len(v)} for k, v in times.items()}


# ---------------------------------------------------------------- digits-cnn, structured


def torch_pruning_digits(model: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    pruner = tp.pruner.MagnitudePruner(
        model,
        example_inputs=example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=[model.classifier],
    )
    pruner.step()
    return model


def bench_digits(args: argparse.Namespace) -> dict[str, Any]:
    entry = get_entry("digits-cnn")
    base = entry.load()
    x32 = entry.example_inputs(32)
    data = entry.calibration_data(256, 32)
    rows: dict[str, Any] = {"unpruned": {"model": base}}

    ctx = Context(train_fn=entry.finetune, options=RunOptions(progress=False))
    start = time.perf_counter()
    ours = prune(base, StructuredPruneConfig(channel_ratio=0.5), data=data, ctx=ctx)
    rows["ours"] = {"model": ours, "acc_pruned": entry.evaluate(ours).value}
    entry.finetune(ours, epochs=FINETUNE_EPOCHS)
    rows["ours"]["prune_s"] = time.perf_counter() - start

    try:
        start = time.perf_counter()
        tp_model = torch_pruning_digits(base, x32[0][:1], 0.5)
        rows["torch-pruning"] = {"model": tp_model, "acc_pruned": entry.evaluate(tp_model).value}
        entry.finetune(tp_model, epochs=FINETUNE_EPOCHS)
        rows["torch-pruning"]["prune_s"] = time.perf_counter() - start
    except Exception as e:  # the anchor is optional: report why it is missing
        rows["torch-pruning"] = {"error": f"{type(e).__name__}: {e}"}

    models = {k: r["model"] for k, r in rows.items() if "model" in r}
    lat = interleaved_p50({k: (lambda m=m: m(*x32)) for k, m in models.items()}, args.rounds, args.per_round * 4)
    base_params = count_params(base)[0]
    out = {}
    for k, r in rows.items():
        if "model" not in r:
            out[k] = {"error": r["error"]}
            continue
        m = r.pop("model")
        params = count_params(m)[0]
        out[k] = {
            **r,
            "accuracy": entry.evaluate(m).value,
            "params": params,
            "params_ratio": params / base_params,
            "flops": count_flops(m, x32),
            "p50_ms_bs32": lat[k]["p50"],
            "min_ms_bs32": lat[k]["min"],
            "speedup": lat["unpruned"]["p50"] / lat[k]["p50"],
            "speedup_min": lat["unpruned"]["min"] / lat[k]["min"],
            "widths": [mod.out_channels for mod in m.modules() if isinstance(mod, nn.Conv2d)],
        }
    return out


# ---------------------------------------------------------------- MiniLM, heads + FFN


def torch_pruning_minilm(model: nn.Module, example: tuple[torch.Tensor, torch.Tensor]) -> nn.Module:
    """Torch-Pruning's MetaPruner on the same targets: heads 12 -> 8, FFN 1536 -> 768, hidden size kept."""
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    bert = model.backbone
    num_heads, ignored = {}, [bert.embeddings]
    for layer in bert.encoder.layer:
        att = layer.attention.self
        for lin in (att.query, att.key, att.value):
            num_heads[lin] = att.num_attention_heads
        ignored += [layer.attention.output.dense, layer.output.dense]  # hidden size stays
    pruner = tp.pruner.MetaPruner(
        model,
        example_inputs=example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.5,
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=1 / 3,
        ignored_layers=ignored,
    )
    pruner.step()
    for layer in bert.encoder.layer:  # Torch-Pruning cuts tensors; the head counts are the caller's job
        att = layer.attention.self
        att.num_attention_heads = att.query.out_features // att.attention_head_size
        att.all_head_size = att.query.out_features
    return model


def bench_minilm(args: argparse.Namespace) -> dict[str, Any]:
    from modelpress.zoo.stsb import default_stsb_dir, load_split

    entry = get_entry("minilm")
    base = entry.load()
    x32 = entry.example_inputs(32)  # (32, 128) real sentences padded to 128 tokens
    folder = default_stsb_dir()
    sentences = list(dict.fromkeys(s for a, b, _ in load_split(folder, "train") for s in (a, b))) if folder else []
    cfg = StructuredPruneConfig(heads_ratio=1 / 3, ffn_ratio=0.5)
    out: dict[str, Any] = {}
    quality = entry.evaluate(base)
    out["unpruned"] = {"quality": quality.name, "value": quality.value}

    start = time.perf_counter()
    ctx = Context(options=RunOptions(progress=False))
    ours = prune(base, cfg, ctx=ctx, example_inputs=entry.example_inputs(2))
    out["ours"] = {"prune_s": time.perf_counter() - start, "value_pruned": entry.evaluate(ours).value}
    if sentences:
        from modelpress.zoo.text import embed

        start = time.perf_counter()
        teacher = embed(base, base.tokenizer, sentences, 64, base.max_seq_length, base.pooling, base.normalize)
        distill_text_encoder(
            ours, sentences=sentences, teacher_embeddings=teacher, epochs=args.recovery_epochs, lr=1e-4
        )
        out["ours"]["recovery_s"] = time.perf_counter() - start
        out["ours"]["recovery"] = f"{args.recovery_epochs} epoch(s) on {len(sentences)} STS-B train sentences"
    out["ours"]["value"] = entry.evaluate(ours).value
    models = {"unpruned": base, "ours": ours}
    try:
        tp_model = torch_pruning_minilm(base, entry.example_inputs(2))
        out["torch-pruning"] = {"value_pruned": entry.evaluate(tp_model).value}
        models["torch-pruning"] = tp_model
    except Exception as e:
        out["torch-pruning"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}

    lat = interleaved_p50({k: (lambda m=m: m(*x32)) for k, m in models.items()}, args.rounds, args.per_round)
    base_params = count_params(base)[0]
    for k, m in models.items():
        params = count_params(m)[0]
        out[k].update(
            params=params,
            params_ratio=params / base_params,
            flops_bs1_seq128=count_flops(m, entry.example_inputs(1)),
            p50_ms_bs32_seq128=lat[k]["p50"],
            min_ms_bs32_seq128=lat[k]["min"],
            speedup=lat["unpruned"]["p50"] / lat[k]["p50"],
            speedup_min=lat["unpruned"]["min"] / lat[k]["min"],
            heads=[layer.attention.self.num_attention_heads for layer in m.backbone.encoder.layer],
            ffn=[layer.intermediate.dense.out_features for layer in m.backbone.encoder.layer],
        )
    return out


# ---------------------------------------------------------------- digits-cnn, unstructured 80%


def bench_sparse(args: argparse.Namespace) -> dict[str, Any]:
    entry = get_entry("digits-cnn")
    base = entry.load()
    data = entry.calibration_data(256, 32)
    x32 = entry.example_inputs(32)
    variants = {
        "one-shot+ft20": UnstructuredPruneConfig(sparsity=0.8, scope="global", finetune_epochs=20),
        "gradual-ft30": UnstructuredPruneConfig(
            sparsity=0.8, scope="global", schedule=PolynomialSchedule(steps=300, frequency=20), finetune_epochs=30
        ),
    }
    out: dict[str, Any] = {"unpruned": {"accuracy": entry.evaluate(base).value}}
    models: dict[str, nn.Module] = {"unpruned": base}
    with tempfile.TemporaryDirectory() as tmp:
        dense = artifact_size_bytes(base)
        out["unpruned"]["file_bytes"] = dense
        for name, cfg in variants.items():
            ctx = Context(options=RunOptions(progress=False))
            start = time.perf_counter()
            m = prune(base, cfg, data=data, ctx=ctx, train_fn=entry.finetune)
            stats = ctx.report.passes[-1].stats
            path = save_sparse(m, Path(tmp) / f"{name}.safetensors")
            out[name] = {
                "prune_s": time.perf_counter() - start,
                "accuracy": entry.evaluate(m).value,
                "sparsity": stats["sparsity"],
                "nonzero_params": stats["nonzero_params"],
                "params": stats["params"],
                "file_bytes": artifact_size_bytes(path),
                "file_ratio": artifact_size_bytes(path) / dense,
            }
            models[name] = m
    lat = interleaved_p50({k: (lambda m=m: m(*x32)) for k, m in models.items()}, args.rounds, args.per_round * 4)
    for k in models:
        out[k]["p50_ms_bs32"] = lat[k]["p50"]
        out[k]["speedup"] = lat["unpruned"]["p50"] / lat[k]["p50"]
        out[k]["speedup_min"] = lat["unpruned"]["min"] / lat[k]["min"]
    return out


# ---------------------------------------------------------------- report


def markdown(results: dict[str, Any]) -> str:
    lines = []
    if "digits" in results:
        d = results["digits"]
        lines += [
            "### digits-cnn, 50% of channels removed (bs 32)",
            "",
            "| model | widths | params | ratio | p50 ms | x p50 | x min | acc pruned | acc after ft |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for k, r in d.items():
            if "error" in r:
                lines.append(f"| {k} | error: {r['error'][:80]} | | | | | | | |")
                continue
            lines.append(
                f"| {k} | {r['widths']} | {r['params']:,} | {r['params_ratio']:.3f} | {r['p50_ms_bs32']:.3f} | "
                f"{r['speedup']:.2f}x | {r.get('speedup_min', float('nan')):.2f}x | "
                f"{r.get('acc_pruned', r['accuracy']):.4f} | {r['accuracy']:.4f} |"
            )
    if "minilm" in results:
        d = results["minilm"]
        lines += [
            "",
            "### MiniLM, heads 12 -> 8 and FFN 1536 -> 768 per layer (bs 32, seq 128)",
            "",
            "| model | params | ratio | p50 ms | x p50 | x min | STS-B pruned | STS-B final |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for k, r in d.items():
            if "error" in r:
                lines.append(f"| {k} | error: {r['error'][:100]} | | | | | | |")
                continue
            lines.append(
                f"| {k} | {r['params']:,} | {r['params_ratio']:.3f} | {r['p50_ms_bs32_seq128']:.1f} | "
                f"{r['speedup']:.2f}x | {r.get('speedup_min', float('nan')):.2f}x | "
                f"{r.get('value_pruned', r.get('value', float('nan'))):.2f} | {r.get('value', float('nan')):.2f} |"
            )
    if "sparse" in results:
        d = results["sparse"]
        lines += [
            "",
            "### digits-cnn, 80% unstructured magnitude sparsity (global)",
            "",
            "| model | accuracy | sparsity | non-zero params | file bytes | file ratio | p50 ms bs32 | speed-up min |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for k, r in d.items():
            lines.append(
                f"| {k} | {r['accuracy']:.4f} | {r.get('sparsity', 0):.3f} | {r.get('nonzero_params', '-')} | "
                f"{r['file_bytes']:,} | {r.get('file_ratio', 1.0):.3f} | {r['p50_ms_bs32']:.3f} | "
                f"{r.get('speedup_min', float('nan')):.2f}x |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--per-round", type=int, default=3, help="calls per model per round (digits: x4)")
    parser.add_argument("--recovery-epochs", type=int, default=1)
    parser.add_argument("--only", nargs="*", default=["digits", "minilm", "sparse"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results: dict[str, Any] = {}
    benches = {"digits": bench_digits, "minilm": bench_minilm, "sparse": bench_sparse}
    for name in args.only:
        start = time.perf_counter()
        results[name] = benches[name](args)
        results[name]["_seconds"] = time.perf_counter() - start
        print(f"{name} done in {results[name]['_seconds']:.0f}s", file=sys.stderr, flush=True)
    from modelpress.core.environment import environment

    seconds = {k: results[k].pop("_seconds") for k in results}
    run = {"threads": args.threads, "rounds": args.rounds, "seconds": seconds, "load_average": os.getloadavg()}
    # Parts not run this time keep their previous results (each part is measured within one run).
    previous = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    merged = {**previous.get("results", {}), **results}
    runs = {**previous.get("runs", {}), **{name: run for name in results}}
    payload = {"results": merged, "runs": runs, "environment": environment(args.threads)}
    try:
        import torch_pruning

        payload["anchor"] = f"torch-pruning {torch_pruning.__version__}"
    except ImportError:
        payload["anchor"] = "torch-pruning not installed"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(markdown(merged))


if __name__ == "__main__":
    main()
