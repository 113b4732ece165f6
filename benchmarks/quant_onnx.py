"""int8 ONNX MiniLM: ours against ONNX Runtime's best int8, in one run with fixed threads.

    HF_HUB_OFFLINE=1 python benchmarks/quant_onnx.py --threads 2 --rounds 16 [--only ours-sq-static ...]

Rows, all measured in this process, interleaved round by round: torch fp32 eager (the baseline of every
ratio); ORT fp32 exported plain, with our fused Attention (`export_onnx` default), and with ORT's BERT
optimizer; the anchor "ORT int8" (BERT optimizer + `quantize_dynamic`, per-channel int8 weights: ORT's
best int8 recipe); and ours: MiniLM with every Linear a QLinear (int8 per-channel symmetric weights),
built here, exported by `export_quantized_onnx`:

- `ours-dyn`: every Linear dynamic per tensor (the anchor's scheme);
- `ours-sq-dyn`: SmoothQuant (alpha 0.5) on the Q/K/V and FFN1 inputs, dynamic per tensor; FFN2
  (input = GELU output, token outliers) dynamic per token;
- `ours-sq-static`: as ours-sq-dyn, with static per-tensor ranges (min/max over 128 STS-B train
  sentences) instead of dynamic ones;
- `ours-sq-static-mixed`: as ours-sq-static, FFN2 per token only in layers 0-2 (the sensitive ones);
- `recipe-int8-smooth`: the built-in `int8-smooth` recipe applied by its passes (SmoothQuantConfig,
  then StaticQuantConfig) exactly as `modelpress compress` applies it; its quantization time is
  reported as `quantize_s` (export excluded).
- `recipe-distill-l4-int8`, `recipe-distill-l3-int8`: the built-in recipes that distil MiniLM to 4 / 3
  layers (frozen embeddings), then SmoothQuant + static int8 with 4-bit embedding tables; the student
  is trained once and reused from the cache dir (`build_recipe`).

Per row: p50 (and min) latency at batch 1 and 32 (seq 128, real sentences), its ratio to torch fp32,
file size, STS-B test Spearman x100, mean cosine of sentence embeddings to fp32 (and, for ours, to the
eager quantized model) on 256 sentences. ORT sessions: 2 intra-op threads, graph optimizations ALL,
denormals as zero (masked softmax is ~6x slower on denormals); `:default` rows run the same file with
ORT's default options.

Timing on a shared machine: each round waits for idle CPUs and is repeated when other processes used
more than `--max-foreign` of the CPU time during it (`LoadGate`); each timed block starts after a short
pause, so the previous engine's spinning threads are idle.

SmoothQuant on a post-LN encoder: the LayerNorm output is both the next Linear's input and the
residual, so 1/s is folded into the LayerNorm, s into the Linear weights, and the residual is
multiplied by s again before the next residual Add (a per-channel Mul on the residual path).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

BATCHES = (1, 32)
CALIBRATION_SENTENCES = 128
SETTLE_S = 0.03  # pause before each timed block: the previous engine's spinning threads go idle
# name[:default]: ":default" runs the same file with ORT's default session options (others: denormals as zero)
ROWS = (
    "ort-fp32-plain", "ort-fp32", "ort-fp32-bert", "anchor-ort-int8", "anchor-ort-int8:default",
    "ours-dyn", "ours-sq-dyn", "ours-sq-static", "ours-sq-static:default", "ours-sq-static-mixed",
    "recipe-int8-smooth", "recipe-distill-l4-int8", "recipe-distill-l3-int8",
)  # fmt: skip


# ---------------------------------------------------------------- building our quantized models


def _input_absmax(model: nn.Module, modules: dict[str, nn.Module], batches: list[Any]) -> dict[str, torch.Tensor]:
    """Per-channel max |x| of each module's input over the calibration batches (real tokens only)."""
    stats: dict[str, torch.Tensor] = {}
    hooks = []
    for key, module in modules.items():

        def hook(m: nn.Module, args: tuple[Any, ...], key: str = key) -> None:
            x = args[0].detach().flatten(0, -2).abs().amax(0)
            stats[key] = torch.maximum(stats[key], x) if key in stats else x

        hooks.append(module.register_forward_pre_hook(hook))
    with torch.inference_mode():
        for batch in batches:
            model(*batch)
    for h in hooks:
        h.remove()
    return stats


def _residual_times(module: nn.Module, s: torch.Tensor) -> None:
    """BertSelfOutput / BertOutput (forward(hidden_states, input_tensor)): multiply the residual by s."""
    module.register_buffer("residual_scale", s.clone())

    def hook(m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if len(args) >= 2:
            args = (args[0], args[1] * m.residual_scale, *args[2:])
        else:
            kwargs = {**kwargs, "input_tensor": kwargs["input_tensor"] * m.residual_scale}
        return args, kwargs

    module.register_forward_pre_hook(hook, with_kwargs=True)


@torch.no_grad()
def smooth_bert(model: nn.Module, batches: list[Any], alpha: float = 0.5) -> None:
    """SmoothQuant for a post-LN BERT encoder (the model's output is unchanged up to float rounding)."""
    bert = model.backbone
    layers = bert.encoder.layer
    targets = {}
    for i, layer in enumerate(layers):
        targets[f"{i}.qkv"] = layer.attention.self.query
        targets[f"{i}.ffn1"] = layer.intermediate.dense
    act = _input_absmax(model, targets, batches)
    for i, layer in enumerate(layers):
        sa = layer.attention.self
        ln_before = bert.embeddings.LayerNorm if i == 0 else layers[i - 1].output.LayerNorm
        groups = [
            ("qkv", [sa.query, sa.key, sa.value], ln_before, layer.attention.output),
            ("ffn1", [layer.intermediate.dense], layer.attention.output.LayerNorm, layer.output),
        ]
        for key, linears, ln, residual_user in groups:
            a = act[f"{i}.{key}"].clamp(min=1e-5)
            w = torch.cat([lin.weight.abs() for lin in linears]).amax(0).clamp(min=1e-5)
            s = (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)  # (in_features,)
            ln.weight.div_(s)
            ln.bias.div_(s)
            for lin in linears:
                lin.weight.mul_(s)
            _residual_times(residual_user, s)


def _input_ranges(model: nn.Module, names: list[str], batches: list[Any]) -> dict[str, tuple[float, float]]:
    ranges: dict[str, tuple[float, float]] = {}
    modules = dict(model.named_modules())
    hooks = []
    for name in names:

        def hook(m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            lo, hi = ranges.get(name, (0.0, 0.0))
            ranges[name] = (min(lo, float(args[0].min())), max(hi, float(args[0].max())))

        hooks.append(modules[name].register_forward_pre_hook(hook))
    with torch.inference_mode():
        for batch in batches:
            model(*batch)
    for h in hooks:
        h.remove()
    return ranges


def _is_ffn2(name: str) -> bool:
    return name.endswith("output.dense") and ".attention." not in name


def build_ours(entry: Any, variant: str, batches: list[Any]) -> nn.Module:
    """MiniLM with every Linear a QLinear (int8 per-channel symmetric weights), per `variant`."""
    from modelpress.primitives.affine import QuantScheme
    from modelpress.quant.modules import ActSpec, QLinear

    model = entry.load()
    if variant != "ours-dyn":
        smooth_bert(model, batches, alpha=0.5)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    ranges = _input_ranges(model, linears, batches) if "static" in variant else {}
    weights = QuantScheme(bits=8, symmetric=True, granularity="channel")
    per_tensor, per_token = ActSpec(mode="dynamic"), ActSpec(mode="dynamic", granularity="token")

    def spec(name: str) -> tuple[ActSpec, tuple[float, float] | None]:
        if variant == "ours-dyn":
            return per_tensor, None
        if _is_ffn2(name):
            early = any(f"layer.{i}." in name for i in range(3))
            return (per_tensor if variant.endswith("mixed") and not early else per_token), None
        return (ActSpec(mode="static"), ranges[name]) if "static" in variant else (per_tensor, None)

    for name in linears:
        parent, _, child = name.rpartition(".")
        act, act_range = spec(name)
        q = QLinear.from_float(model.get_submodule(name), weights, act, act_range)
        setattr(model.get_submodule(parent), child, q)
    return model


def build_recipe(entry: Any, recipe: str, batches: list[Any]) -> tuple[nn.Module, float]:
    """MiniLM compressed by a built-in recipe's passes, as `compress` applies them; (model, seconds).

    A distilled student is saved by its pass under the cache dir, so a second benchmark that builds
    the same recipe reuses it; its seconds are then those of the other passes.
    """
    from modelpress.core import Context, RunOptions, apply
    from modelpress.recipes.recipe import load_recipe

    model = entry.load().eval()
    ctx = Context(data=batches, options=RunOptions(progress=False))
    start = time.perf_counter()
    for cfg in load_recipe(recipe).passes:
        model = apply(model, cfg, ctx)
    return model, time.perf_counter() - start


def build_anchor(fp32_bert_onnx: Path, out: Path) -> Path:
    """ORT's best int8: BERT-optimized fp32 graph, `quantize_dynamic` with per-channel int8 weights."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        fp32_bert_onnx,
        out,
        per_channel=True,
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},  # the fused contrib ops have no type info
    )
    return out


# ---------------------------------------------------------------- measuring


def _cpu_jiffies() -> tuple[int, int]:
    """(total, idle) jiffies of all CPUs since boot, from /proc/stat (Linux)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values), values[3] + values[4]


class LoadGate:
    """Runs a block only while other processes leave the CPUs alone (shared machines).

    `foreign()` is the CPU time other processes used during the block, as a fraction of all CPUs'
    time: busy time from /proc/stat minus this process's CPU time. Rounds above `max_foreign` are
    repeated (up to `tries`); a round that never gets a quiet machine is kept and counted as noisy.
    """

    def __init__(self, max_foreign: float = 0.1, tries: int = 8) -> None:
        self.max_foreign, self.tries = max_foreign, tries
        self.enabled = Path("/proc/stat").exists()
        self.quiet = self.noisy = 0

    def run(self, block: Callable[[], dict[str, list[float]]]) -> dict[str, list[float]]:
        for attempt in range(self.tries):
            self._wait_idle()
            total0, idle0 = _cpu_jiffies() if self.enabled else (0, 0)
            own0 = time.process_time()
            out = block()
            if not self.enabled:
                return out
            total1, idle1 = _cpu_jiffies()
            busy_s = ((total1 - total0) - (idle1 - idle0)) / os.sysconf("SC_CLK_TCK")
            all_s = (total1 - total0) / os.sysconf("SC_CLK_TCK")
            foreign = max(0.0, busy_s - (time.process_time() - own0)) / max(all_s, 1e-9)
            if foreign <= self.max_foreign:
                self.quiet += 1
                return out
            if attempt == self.tries - 1:
                self.noisy += 1
        return out

    def _wait_idle(self, timeout_s: float = 60.0) -> None:
        """Wait (up to `timeout_s`) for a 0.3 s window in which the CPUs are at most 5% busy."""
        deadline = time.monotonic() + timeout_s
        while self.enabled and time.monotonic() < deadline:
            total0, idle0 = _cpu_jiffies()
            time.sleep(0.3)
            total1, idle1 = _cpu_jiffies()
            if 1 - (idle1 - idle0) / max(total1 - total0, 1) <= 0.05:
                return


def cpu_results_dir(info: dict[str, Any] | None = None) -> Path:
    """results/<cpu model and family>/: one folder per CPU, so no table mixes two CPUs' figures."""
    if info is None:
        from modelpress.core.environment import cpu_info

        info = cpu_info()
    slug = re.sub(r"[^a-z0-9]+", "-", f"{info['model']} {info.get('family', '')}".lower()).strip("-")
    return Path(__file__).parent / "results" / slug


def record_batch(
    results: dict[str, dict[str, Any]],
    rounds: dict[str, Any],
    bs: int,
    lat: dict[str, dict[str, float]],
    gate: LoadGate,
    base_row: str = "torch-fp32",
) -> None:
    """Store one batch size's latencies with their ratio to `base_row`, count its rounds, print a line."""
    rounds[f"bs{bs}"] = {"quiet": gate.quiet, "noisy": gate.noisy}
    base = lat[base_row]["p50"]
    for row, v in lat.items():
        results[row][f"bs{bs}"] = {**v, "speedup_p50": base / v["p50"]}
    figures = ", ".join(f"{r} {v['p50']:.1f} ms ({base / v['p50']:.2f}x)" for r, v in lat.items())
    print(f"batch {bs} ({gate.quiet} quiet rounds, {gate.noisy} noisy): {figures}", flush=True)


def interleaved_latency(
    fns: dict[str, Callable[[], Any]], rounds: int, per_round: int, gate: LoadGate
) -> dict[str, dict[str, float]]:
    """p50 and min (ms) of each fn; every round runs every fn `per_round` times, so all share the load."""
    times: dict[str, list[float]] = {k: [] for k in fns}

    def one_round() -> dict[str, list[float]]:
        out: dict[str, list[float]] = {k: [] for k in fns}
        for key, fn in fns.items():
            time.sleep(SETTLE_S)
            for _ in range(per_round):
                start = time.perf_counter()
                fn()
                out[key].append(time.perf_counter() - start)
        return out

    gc.collect()
    gc.disable()
    try:
        with torch.inference_mode():
            for fn in fns.values():  # warm up
                for _ in range(3):
                    fn()
            for _ in range(rounds):
                for key, values in gate.run(one_round).items():
                    times[key] += values
    finally:
        gc.enable()
    return {k: {"p50": statistics.median(v) * 1e3, "min": min(v) * 1e3} for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=12, help="interleaved rounds (batch 1 runs 5 calls a round)")
    parser.add_argument("--only", nargs="*", default=None, help="rows to build and measure (torch fp32 always runs)")
    parser.add_argument(
        "--max-foreign", type=float, default=0.1, help="CPU share of other processes that voids a round"
    )
    parser.add_argument("--no-quality", action="store_true", help="skip STS-B and cosine (timing and size only)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the ONNX files go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quant_onnx.json")
    args = parser.parse_args()

    from modelpress.core.environment import environment
    from modelpress.export.onnx import export_float, export_onnx, optimize_graph
    from modelpress.export.onnx_quant import export_quantized_onnx
    from modelpress.zoo import get_entry
    from modelpress.zoo.text import embed, sample_sentences

    torch.set_num_threads(args.threads)
    entry = get_entry("minilm")
    fp32 = entry.load()
    batches = entry.calibration_data(CALIBRATION_SENTENCES, 32)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="quant_onnx."))
    x1 = entry.example_inputs(1)

    rows = [r for r in ROWS if args.only is None or r.split(":")[0] in args.only]
    paths: dict[str, Path] = {}
    eager: dict[str, nn.Module] = {}
    build_s: dict[str, float] = {}
    quantize_s: dict[str, float] = {}
    for row in rows:
        name, _, options = row.partition(":")
        path = workdir / f"{name}.onnx"
        start = time.perf_counter()
        if options:  # the same file as row `name`, another session setting
            paths[row], build_s[row] = paths[name], 0.0
            continue
        if name == "ort-fp32-plain":
            export_onnx(fp32, x1, path, optimize=False)
        elif name == "ort-fp32":
            export_onnx(fp32, x1, path)  # our default: one fused Attention op per layer
        elif name in ("ort-fp32-bert", "anchor-ort-int8"):
            bert = workdir / "ort-fp32-bert.onnx"
            if not bert.exists():  # ORT's transformer optimizer on the eager-attention graph
                export_float(fp32, x1, bert, fuse_attention=False)
                optimize_graph(bert, fp32, x1)
            if name == "anchor-ort-int8":
                build_anchor(bert, path)
        elif name.startswith("recipe-"):
            eager[row], quantize_s[row] = build_recipe(entry, name.removeprefix("recipe-"), batches)
            export_quantized_onnx(eager[row], x1, path)
        else:
            eager[row] = build_ours(entry, name, batches)
            export_quantized_onnx(eager[row], x1, path, embeddings="int8")  # tables int8 in the export only
        paths[row] = path
        build_s[row] = time.perf_counter() - start
        print(f"built {row} in {build_s[row]:.1f}s ({path.stat().st_size / 1e6:.2f} MB)", flush=True)

    sessions = {row: OrtFn(p, args.threads, denormals_as_zero=not row.endswith(":default")) for row, p in paths.items()}
    results: dict[str, dict[str, Any]] = {"torch-fp32": {"size_mb": _param_mb(fp32)}}
    results |= {row: {"size_mb": p.stat().st_size / 1e6, "build_s": build_s[row]} for row, p in paths.items()}
    for row, seconds in quantize_s.items():
        results[row]["quantize_s"] = seconds
    rounds: dict[str, dict[str, int]] = {}
    for bs in BATCHES:
        inputs = entry.example_inputs(bs)
        fns: dict[str, Callable[[], Any]] = {"torch-fp32": lambda inputs=inputs: fp32(*inputs)}
        fns |= {row: (lambda s=s, inputs=inputs: s(*inputs)) for row, s in sessions.items()}
        gate = LoadGate(max_foreign=args.max_foreign)
        lat = interleaved_latency(fns, args.rounds if bs == 1 else max(3, args.rounds // 2), 5 if bs == 1 else 1, gate)
        record_batch(results, rounds, bs, lat, gate)

    if not args.no_quality:
        sentences = sample_sentences(256)

        def embeddings(fn: Any) -> torch.Tensor:
            return embed(fn, fp32.tokenizer, sentences, 32, fp32.max_seq_length, fp32.pooling, fp32.normalize)

        reference = embeddings(fp32)
        for row, fn in {"torch-fp32": fp32, **sessions}.items():
            if row.endswith(":default"):
                continue  # same file as the row measured with tuned session options
            q = entry.evaluate(fn)
            e = embeddings(fn)
            results[row]["quality"] = {"name": q.name, "value": q.value}
            results[row]["mean_cosine_to_fp32"] = float(F.cosine_similarity(e, reference).mean())
            if row in eager:  # the ONNX artifact against the eager quantized model it came from
                results[row]["mean_cosine_to_eager"] = float(F.cosine_similarity(e, embeddings(eager[row])).mean())
            cosines = ", ".join(f"{k} {v:.5f}" for k, v in results[row].items() if k.startswith("mean_"))
            print(f"quality {row}: {q.name} {q.value:.3f}, {cosines}", flush=True)

    print()
    print("\n".join(table(results)))
    env = environment(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "rounds": rounds, "environment": env}, indent=2) + "\n")
    print(f"\nCPU: {env['cpu']['model']} ({', '.join(env['cpu']['features'])}), threads {env['threads']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()))


class OrtFn:
    """An ORT session as a callable on torch tensors; `denormals_as_zero` is the tuned setting.

    Denormals flushed to zero: the masked attention logits' exp() results are denormals, which makes
    ORT's softmax ~6x slower; our exports carry this setting in their metadata (`SESSION_HINTS`).
    """

    def __init__(self, path: Path, threads: int, denormals_as_zero: bool = True) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if denormals_as_zero:
            opts.add_session_config_entry("session.set_denormal_as_zero", "1")
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.names = [i.name for i in self.session.get_inputs()]

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        feed = {n: x.numpy() for n, x in zip(self.names, inputs, strict=True)}
        return torch.from_numpy(self.session.run(None, feed)[0])


def _param_mb(model: nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6


def table(results: dict[str, dict[str, Any]]) -> list[str]:
    lines = [
        "| row | size MB | bs1 p50 ms | bs1 x | bs32 p50 ms | bs32 x | STS-B | cosine to fp32 | cosine to eager |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row, r in results.items():
        quality = r.get("quality", {}).get("value")
        cos = r.get("mean_cosine_to_fp32")
        cells = [row, f"{r['size_mb']:.2f}"]
        for bs in BATCHES:
            lat = r.get(f"bs{bs}", {})
            cells += [f"{lat.get('p50', float('nan')):.1f}", f"{lat.get('speedup_p50', float('nan')):.2f}x"]
        eager = r.get("mean_cosine_to_eager")
        cells += ["-" if quality is None else f"{quality:.2f}", "-" if cos is None else f"{cos:.5f}"]
        cells += ["-" if eager is None else f"{eager:.5f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
