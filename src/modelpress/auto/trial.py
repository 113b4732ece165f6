"""One candidate through the search: built, screened cheaply, and measured in full if it can still win.

Screening exports the `.onnx` form only, scores it once on the validation split (a causal LM on
`SCREEN_WINDOWS` of its windows), and times it in a child process with a few calls on short inputs
(`measure.gate.probe`), each call stopped past a limit derived from the original's time: a
pathological artifact costs seconds. Full measurement is `compress`'s: every form of a finalist
through the speed gate, quality on the test and validation splits.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelpress.auto.budget import Clock
from modelpress.auto.cache import SearchCache
from modelpress.auto.space import Candidate
from modelpress.core.errors import BadInputError
from modelpress.core.model_stats import ModelStats, Quality
from modelpress.core.options import RunOptions
from modelpress.loading import LoadedModel
from modelpress.recipes.recipe import Recipe

SCREEN_CALLS = 3  # timed calls per batch size when screening, after one warm-up call
SCREEN_TOKENS = 32  # a causal LM is screened on sequences this long (its full measurement: the entry's own)
SCREEN_WINDOWS = 4  # ... and scored on this many of its validation windows
SCREEN_LIMIT_FACTOR = 3.0  # a screened call may take this many times the original's median...
SCREEN_MIN_LIMIT_S = 2.0  # ...and at least this long


@dataclass
class Setting:
    """What every trial of one search shares: the model, data, options, clock, cache and reference figures."""

    loaded: LoadedModel
    data: Any
    options: RunOptions  # the inner runs': no progress bars of their own
    clock: Clock
    cache: SearchCache
    budget: tuple[float, bool]  # (amount, relative)
    screen_entry: Any = None  # the entry scoring screened candidates (a subset for causal LMs)
    screen_inputs: dict[str, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    original_ms: dict[str, float] = field(default_factory=dict)  # the original on the screening inputs
    original_screen: Quality | None = None
    baseline: ModelStats | None = None  # the original, measured in full
    repeats: int = 20
    measure_s: float = 0.0  # estimated seconds of one form's full measurement (the original's)
    subset: bool = False  # screening quality on a subset of the validation split
    runoff: dict[str, Any] | None = None  # the finalists timed again before the choice (`auto.runoff`)
    pt2_costs: list[float] = field(default_factory=list)  # seconds each .pt2 compiled so far took (and its screening)
    objective: str = "latency"  # latency, size or decode (`auto.decode`)
    note: str | None = None  # why the objective is not the one asked for, for the report

    @property
    def key(self) -> str:
        """The figure forms are timed by: the largest batch size, or `decode` (ms per token at batch 1)."""
        return "decode" if self.objective == "decode" else str(max(self.options.batch_sizes))


@dataclass
class Trial:
    """A candidate's state: status, figures per form, the files built for it."""

    cand: Candidate
    folder: Path
    status: str = "pending"  # screened, dropped, refused, stopped, skipped, measured, chosen
    why: str = ""
    build_s: float = 0.0
    forms: dict[str, dict[str, Any]] = field(default_factory=dict)  # kind -> path, ms, size_bytes, status, why
    screen_quality: float | None = None
    screen_drop: float | None = None
    screen_within: bool = False  # the screened drop meets the budget itself (not screening's wider margin)
    measured: dict[str, ModelStats] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)  # passes, warnings, parity of its build
    model: Any = None  # the compressed model, kept while it may still be needed
    cached: bool = False
    student: str | None = None  # the kept student a trained candidate loads (`auto.search.reuse_students`)

    def best_ms(self, batch: str) -> float:
        times = [f["ms"][batch] for f in self.forms.values() if f.get("status") == "ok" and batch in f.get("ms", {})]
        return min(times, default=float("inf"))

    def size_mb(self) -> float:
        sizes = [f["size_bytes"] for f in self.forms.values() if f.get("size_bytes")]
        return min(sizes, default=0) / 1e6


def drop_of(original: float, value: float, higher_is_better: bool, budget: tuple[float, bool]) -> tuple[float, bool]:
    """The drop from `original` to `value` in the metric's units, and whether it meets `budget`."""
    sign = 1.0 if higher_is_better else -1.0
    drop = sign * (original - value)
    amount, relative = budget
    scaled = drop / abs(original) if relative and original else drop
    return drop, scaled <= amount + 1e-12


def recipe_key(rec: Recipe) -> str:
    return rec.to_yaml()


def build(setting: Setting, trial: Trial, export: tuple[str, ...]) -> None:
    """Apply the candidate's passes and export the forms `export` into its folder (`trial.model` kept). An ONNX
    model's candidate is its graph through ONNX Runtime's quantizer (`pipeline.build_onnx`): `.onnx` only. A
    decoder candidate's timed form, its GenAI folder, is written by `auto.decode.build`."""
    from modelpress.artifacts import export_artifacts, parity_of, recipe_lowering
    from modelpress.pipeline import apply_recipe, build_onnx

    loaded, entry = setting.loaded, setting.loaded.entry
    assert entry is not None
    rec = trial.cand.recipe
    if "genai" in export and "genai" in trial.cand.forms:
        from modelpress.auto import decode

        decode.build(setting, trial)
        export = tuple(e for e in export if e != "genai")
        if not export:
            return
    start = time.perf_counter()
    if loaded.kind == "onnx":
        if other := sorted(set(export) - {"onnx"}):
            raise BadInputError(f"an ONNX model has only its .onnx form, not {', '.join(other)}")
        trial.folder.mkdir(parents=True, exist_ok=True)
        trial.report["report"] = build_onnx(loaded, rec, setting.data, trial.folder / "model.onnx", setting.options)
        trial.report["parity"] = dict(trial.report["report"].parity or {})
        trial.forms["onnx"] = {"path": str(trial.folder / "model.onnx"), "status": "built"}
        trial.build_s += time.perf_counter() - start
        return
    if trial.model is None:
        trial.model, report, trial.report["ctx"] = apply_recipe(loaded, rec, setting.data, setting.options)
        trial.report["report"] = report
    ctx = trial.report["ctx"]
    trial.folder.mkdir(parents=True, exist_ok=True)
    only = Recipe(rec.name, rec.description, rec.passes, export, rec.order, rec.lowering)
    lowering = recipe_lowering(only) if "pt2" in export else None
    example = entry.example_inputs(2)
    artifacts = export_artifacts(trial.model, example, only, trial.folder, ctx, entry.batch_axes, lowering)
    parity = parity_of(loaded.model, trial.model, artifacts, example, setting.options.threads) if artifacts else {}
    trial.report.setdefault("parity", {}).update(parity)
    for kind, path in artifacts.items():
        trial.forms[kind] = {"path": str(path), "status": "built"}
    trial.build_s += time.perf_counter() - start


def runtime(kind: str, path: str | Path, threads: int | None) -> Any:
    from modelpress.core.runtime import AotiModel, OnnxModel

    if kind == "genai":  # a decoder folder: the logits of a prefill through its own graph
        from modelpress.export.genai import DecoderModel

        return DecoderModel(path, threads)
    return OnnxModel(Path(path), threads=threads) if kind == "onnx" else AotiModel(Path(path))


def screen_quality(setting: Setting, trial: Trial, kind: str) -> None:
    """Score the form `kind` on the screening split; the candidate is dropped where it misses the budget."""
    assert setting.original_screen is not None
    model = runtime(kind, trial.forms[kind]["path"], setting.options.threads)
    quality = screen_score(setting, model)
    trial.screen_quality = quality.value
    trial.screen_drop, ok = drop_of(setting.original_screen.value, quality.value, quality.higher_is_better,
                                    screen_budget(setting))  # fmt: skip
    trial.screen_within = drop_of(setting.original_screen.value, quality.value, quality.higher_is_better,
                                  setting.budget)[1]  # fmt: skip
    if not ok:
        trial.status, trial.why = "dropped", f"over the quality budget when screened (drop {trial.screen_drop:.4g})"


def screen_budget(setting: Setting) -> tuple[float, bool]:
    """The budget screening drops by: a subset's score is noisier, so a candidate keeps a quarter more room."""
    amount, relative = setting.budget
    return (amount * 1.25 if setting.subset else amount), relative


def screen_score(setting: Setting, model: Any) -> Quality:
    entry = setting.screen_entry
    with torch.inference_mode():
        quality = entry.validation_quality(model, setting.options.eval_data)
        return quality if quality is not None else entry.evaluate(model, setting.options.eval_data)


def screen_speed(setting: Setting, trial: Trial, kind: str) -> None:
    """Time the form `kind` in a child process, a few calls per batch size, each within its limit (a GenAI
    folder: a few decode steps, `auto.decode.screen_speed`)."""
    from modelpress.measure.gate import probe
    from modelpress.measure.size import artifact_size_bytes

    if kind == "genai":
        from modelpress.auto import decode

        return decode.screen_speed(setting, trial)

    form = trial.forms[kind]
    form["size_bytes"] = artifact_size_bytes(form["path"])
    limits = {bs: max(SCREEN_MIN_LIMIT_S, SCREEN_LIMIT_FACTOR * ms / 1e3) for bs, ms in setting.original_ms.items()}
    result = probe(kind, form["path"], setting.screen_inputs, limits, setting.options.threads, calls=SCREEN_CALLS)
    form["ms"] = dict(result.ms)
    if result.stopped is not None:
        form["status"] = "stopped"
        form["why"] = (
            f"stopped by the speed gate: a call at batch {result.stopped} ran past {result.limit_s:.1f} s "
            f"(the original takes {setting.original_ms[result.stopped]:.1f} ms)"
        )
    elif result.error is not None:
        form["status"], form["why"] = "refused", f"failed to run: {result.error}"
    else:
        slower = [bs for bs, ms in form["ms"].items() if ms > setting.original_ms[bs]]
        form["status"] = "ok"
        if slower:
            form["status"], form["why"] = "slower", f"slower than the original when screened at batch {slower[0]}"


def screen_inputs(loaded: LoadedModel, batch_sizes: tuple[int, ...], causal: bool) -> dict[str, tuple[Any, ...]]:
    """The inputs screening times: the entry's examples, a causal LM's cut to SCREEN_TOKENS tokens where its
    examples' length is a setting of the entry (`example_length`: its exports take any length; a model built
    for one length, such as tiny-lm, is exported at that length and screened at it)."""
    assert loaded.entry is not None
    cut = causal and hasattr(loaded.entry, "example_length")
    out = {}
    for bs in batch_sizes:
        inputs = tuple(loaded.entry.example_inputs(bs))
        out[str(bs)] = tuple(t[:, :SCREEN_TOKENS].contiguous() for t in inputs) if cut else inputs
    return out


def screening_entry(loaded: LoadedModel, causal: bool) -> tuple[Any, bool]:
    """The entry screening scores with: a causal LM's on SCREEN_WINDOWS windows (a copy), else the entry."""
    entry = loaded.entry
    windows = getattr(entry, "eval_windows", None)
    if causal and isinstance(windows, int) and windows > SCREEN_WINDOWS:
        subset = copy.copy(entry)
        subset.eval_windows = SCREEN_WINDOWS  # type: ignore[union-attr]
        return subset, True
    return entry, False


def measure_form(setting: Setting, trial: Trial, kind: str) -> ModelStats:
    """The form `kind` measured as `compress` measures it: speed gate, latency, test and validation quality (a
    GenAI folder: its decode and quality, `auto.decode.measure`)."""
    from modelpress.pipeline import gated_bench

    if kind == "genai":
        from modelpress.auto import decode

        return decode.measure(setting, trial)

    assert setting.baseline is not None
    common = dict(batch_sizes=setting.options.batch_sizes, threads=setting.options.threads, repeats=setting.repeats,
                  warmup=2, progress=False, memory=False, throughput=False, validation=True,
                  eval_data=setting.options.eval_data)  # fmt: skip
    (row,) = gated_bench([], {kind: Path(trial.forms[kind]["path"])}, setting.loaded.entry, setting.baseline, common)
    return row


def store(trial: Trial) -> dict[str, Any]:
    """What the cache keeps of a screened trial."""
    forms = {k: {kk: vv for kk, vv in f.items() if kk != "path"} for k, f in trial.forms.items()}
    return {"status": trial.status, "why": trial.why, "build_s": trial.build_s, "forms": forms,
            "screen_quality": trial.screen_quality, "screen_drop": trial.screen_drop,
            "screen_within": trial.screen_within}  # fmt: skip


def restore(trial: Trial, value: dict[str, Any]) -> None:
    trial.status, trial.why, trial.build_s = value["status"], value["why"], value["build_s"]
    trial.forms = {k: dict(f) for k, f in value["forms"].items()}
    trial.screen_quality, trial.screen_drop = value["screen_quality"], value["screen_drop"]
    trial.screen_within = bool(value.get("screen_within"))
    trial.cached = True
