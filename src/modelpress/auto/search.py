"""Auto mode: a search for the fastest (or smallest) deployable model within a quality budget and a time budget.

Candidates come from the model's family and this CPU (`auto.space`). Each is screened cheaply
(`auto.trial`: its `.onnx` scored once on the validation split and timed with a few calls in a child
process); a candidate over the quality budget, stopped by the speed gate or dominated (another one
within budget is faster by more than screening's noise) is dropped there. The few that can still win
get their `.pt2` form where this CPU makes it worth timing, then the full measurement of `compress`;
the best measured artifact within budget, not flagged by the speed gate, is written with its recipe.
What was measured is cached (`auto.cache`): a second run on the same model, data and machine reuses it.
An ONNX model (given a metric, `--like`) is searched over ONNX Runtime's quantizations of its graph
(`space.onnx_space`), its `.onnx` form only.

    >>> stats, report = auto_compress("minilm", AutoSearch(max_drop=0.5, time_budget="5m"), out_dir="out/a")
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from modelpress.auto import decode
from modelpress.auto.budget import Clock, format_duration, parse_duration, parse_max_drop
from modelpress.auto.cache import SearchCache
from modelpress.auto.display import Display
from modelpress.auto.runoff import contenders, runoff
from modelpress.auto.space import CALIBRATED, TRAINED, TRAINING_STAGES, Candidate, candidates, family, pt2_worth_timing
from modelpress.auto.table import artifact_name, measured_row, screened_rows, summary
from modelpress.auto.trial import (
    SCREEN_CALLS,
    Setting,
    Trial,
    build,
    measure_form,
    recipe_key,
    restore,
    screen_inputs,
    screen_quality,
    screen_score,
    screen_speed,
    screening_entry,
    store,
)  # fmt: skip
from modelpress.core.errors import BadInputError, ConfigError
from modelpress.core.options import RunOptions
from modelpress.core.outputs import check_output
from modelpress.core.report import ModelStats, Report
from modelpress.loading import LoadedModel

Objective = Literal["auto", "latency", "size", "decode"]
Strategy = Literal["search", "exhaustive"]
TOLERANCE = 0.3  # screened timings (3 calls) may be this far off: a candidate this close to the best stays in
MAX_FINALISTS = 3  # candidates measured in full
PT2_SCREENED = 3  # candidates whose .pt2 is compiled and screened (the best .onnx ones)
MEASURE_SHARE = 0.02  # of the time budget, one form's full measurement may take (sets its timed calls)
PT2_FIRST_FACTOR = 4.0  # before any .pt2 was compiled, one is estimated at this many times its .onnx build


@dataclass(frozen=True)
class AutoSearch:
    """What auto mode looks for: the best artifact by `objective` within a quality drop of `max_drop`.

    `max_drop`: in the units of the model's task metric (STS-B Spearman x100: 0.5 = half a point;
    accuracy: 0.005), or a string percentage of the original's value (`"5%"`: a perplexity may rise 5%).
    `objective`: "latency" (p50 at the largest batch size), "size" (bytes on disk), "decode" (a causal LM's
    tokens/s decoding at batch 1 through its ONNX Runtime GenAI folder: `auto.decode`) or "auto" (decode for a
    causal LM whose layout the GenAI decoder maps, else latency). `candidates`: None
    for the space generated for the model and CPU, or names (generated ones, built-in recipes, recipe
    files; `recipe:NAME` forces the recipe, "float": the model as it is). `time_budget`: wall time of the
    whole search (`"90s"`, `"5m"`, `"1h"`, seconds; None: unbounded). `strategy`: "search" (screen, drop,
    measure the finalists) or "exhaustive" (measure every candidate's every form in full). `cache`: reuse
    and keep measurements under `RunOptions.cache_dir`. Every value is checked when made (`ConfigError`).
    """

    max_drop: float | str
    objective: Objective = "auto"
    candidates: tuple[str, ...] | None = None
    time_budget: float | str | None = None
    strategy: Strategy = "search"
    cache: bool = True

    def __post_init__(self) -> None:
        parse_max_drop(self.max_drop)
        if self.objective not in ("auto", "latency", "size", "decode"):
            raise ConfigError(f"objective must be auto, latency, size or decode, got {self.objective!r}")
        if self.strategy not in ("search", "exhaustive"):
            raise ConfigError(f"strategy must be search or exhaustive, got {self.strategy!r}")
        parse_duration(self.time_budget)
        if self.candidates is not None:
            if isinstance(self.candidates, str) or not self.candidates:
                raise ConfigError(f"candidates must be a non-empty list of names, got {self.candidates!r}")
            object.__setattr__(self, "candidates", tuple(self.candidates))

    @property
    def time_budget_s(self) -> float | None:
        return parse_duration(self.time_budget)


def auto_compress(
    model: str | Path | LoadedModel,
    search: AutoSearch | float | str,
    *,
    out_dir: str | Path,
    data: Any | None = None,
    options: RunOptions | None = None,
    overwrite: bool = False,
    trust_code: bool = False,
) -> tuple[Any, Report]:
    """Search the candidates of `search` for `model` and write the best artifact within its budgets to `out_dir`.

    `search`: an `AutoSearch`, or its `max_drop` alone. `data`, `options`, `overwrite`, `trust_code` as for
    `compress`. Returns the chosen artifact's figures (`ModelStats`) and the report, whose `auto` section
    lists every candidate (screened or measured, and why each was dropped). A time budget too small for
    the original's own measurement is refused before any work (`BadInputError`), nothing written.
    """
    from modelpress.pipeline import calibration_for, claim_out_dir, input_paths, load_for_run

    opts = options if options is not None else RunOptions()
    check_output(out_dir, kind="folder", overwrite=overwrite, inputs=input_paths(model, opts.eval_data))
    search = search if isinstance(search, AutoSearch) else AutoSearch(max_drop=search)
    clock = Clock(search.time_budget_s)
    loaded = load_for_run(model, opts, trust_code)
    if loaded.entry is None or not loaded.entry.has_quality:
        raise BadInputError(
            f"{loaded.spec}: auto mode needs a task metric; none is known for this model "
            "(use a zoo model, or give one with --like and its data with --eval-data)"
        )
    if loaded.kind != "onnx" and not hasattr(loaded.model, "state_dict"):
        raise BadInputError(
            f"{loaded.spec}: auto mode searches PyTorch and ONNX models; a {loaded.kind} artifact cannot be "
            "compressed; give its PyTorch or ONNX model"
        )
    objective, note = decode.resolve(search.objective, loaded)
    search = dataclasses.replace(search, objective=objective)  # type: ignore[arg-type]
    space = candidates(loaded, search.candidates)
    space = [decode.as_decode(c) for c in space] if objective == "decode" else space
    batches = calibration_for(loaded, data, [c.recipe for c in space if c.recipe.passes])
    inner = opts.replace(progress=False, validation=True, console=None)
    cache = SearchCache.open(loaded, batches, inner, enabled=search.cache)
    setting = Setting(loaded=loaded, data=batches, options=inner, clock=clock, cache=cache,
                      budget=parse_max_drop(search.max_drop), objective=objective, note=note)  # fmt: skip
    prepare(setting, opts)  # the original's screening figures; a budget too small is refused here
    with (
        claim_out_dir(out_dir, overwrite, loaded, opts.eval_data),
        tempfile.TemporaryDirectory(prefix="modelpress-auto.") as work,
        Display(opts, clock, len(space)) as display,
    ):
        measure_baseline(setting, display)
        trials = [Trial(cand=c, folder=Path(work) / f"{i:02d}-{c.name}") for i, c in enumerate(space)]
        reuse_students(setting, trials)
        run(setting, trials, search, display)
        report = finish(setting, trials, search, Path(out_dir))
    if opts.progress:
        from rich.console import Console

        (opts.console or Console()).print(
            f"auto: chose {report.auto['chosen']} ({report.auto['measured']} measured in full of "
            f"{len(space)} candidates, {format_duration(clock.elapsed())})"  # type: ignore[index]
        )
    return report.compressed, report


def prepare(setting: Setting, opts: RunOptions) -> None:
    """Time the original on the screening inputs and score it on the screening split; refuse a time budget
    smaller than the original's full measurement is estimated to take."""
    from modelpress.measure.latency import measure_latency

    loaded = setting.loaded
    causal = family(loaded) == "causal-lm"
    setting.screen_inputs = screen_inputs(loaded, opts.batch_sizes, causal)
    setting.screen_entry, setting.subset = screening_entry(loaded, causal)
    start = time.perf_counter()
    for bs, inputs in setting.screen_inputs.items():
        lat = measure_latency(loaded.model, inputs, warmup=1, repeats=SCREEN_CALLS, threads=opts.threads)
        setting.original_ms[bs] = lat.p50
    timing_s = time.perf_counter() - start
    start = time.perf_counter()
    setting.original_screen = screen_score(setting, loaded.model)
    score_s = time.perf_counter() - start
    if setting.objective == "decode":  # the original's eager decode, ms per token: what a folder must beat
        start = time.perf_counter()
        setting.original_ms[decode.KEY] = decode.original_ms(loaded, opts.threads)
        timing_s += time.perf_counter() - start
    # the full measurement: (warm-up + timed) calls per batch size on full-length inputs, test + validation
    calls_s = [ms / 1e3 * (4 if causal else 1) for bs, ms in setting.original_ms.items() if bs != decode.KEY]
    per_call_s = sum(calls_s)
    budget_s = setting.clock.budget_s
    setting.repeats = opts.repeats if budget_s is None else \
        max(3, min(opts.repeats, int(MEASURE_SHARE * budget_s / max(per_call_s, 1e-6))))  # fmt: skip
    scale = (loaded.entry.eval_windows / setting.screen_entry.eval_windows) if setting.subset else 1.0  # type: ignore[union-attr]
    if setting.objective == "decode":  # prefills and decode steps of the generations (the original's pace)
        timing_full = (decode.FULL_REPEATS + 1) * decode.FULL_NEW_TOKENS * setting.original_ms[decode.KEY] / 1e3
    else:
        timing_full = sum(call * full_calls(call, setting.repeats) for call in calls_s)
    setting.measure_s = timing_full + 2 * scale * score_s  # a form's full measurement
    estimate = timing_s + score_s + setting.measure_s
    cached = setting.cache.get("baseline", baseline_key(setting))
    if cached is not None:
        estimate = timing_s + score_s
    if budget_s is not None and estimate > budget_s:
        raise BadInputError(
            f"time budget {format_duration(budget_s)} is too small: measuring the original alone takes about "
            f"{format_duration(estimate)} here ({setting.repeats + 3} calls per batch size of "
            f"{1e3 * per_call_s:.1f} ms over the batch sizes, and its quality on the test and validation splits, "
            f"{format_duration(score_s * scale)} each); give a larger --time-budget"
        )


def full_calls(call_s: float, repeats: int, warmup: int = 2) -> int:
    """The calls `bench` makes at one batch size for a call of `call_s`: the input check, the warm-up and the
    timed calls, both bounded in time (`LATENCY_MAX_TIME_S`)."""
    from modelpress.measure.runner import LATENCY_MAX_TIME_S

    call_s = max(call_s, 1e-6)
    warm = min(warmup, max(1, math.ceil(LATENCY_MAX_TIME_S / 4 / call_s)))
    return 1 + warm + min(repeats, max(3, math.ceil(LATENCY_MAX_TIME_S / call_s)))


def baseline_key(setting: Setting) -> dict[str, Any]:
    key = {"repeats": setting.repeats, "warmup": 2, "eval": str(setting.options.eval_data)}
    return key | ({"objective": "decode"} if setting.objective == "decode" else {})


def measure_baseline(setting: Setting, display: Display) -> None:
    """The original, measured in full once (or taken from the cache)."""
    from modelpress.measure import bench

    loaded, opts = setting.loaded, setting.options
    cached = setting.cache.get("baseline", baseline_key(setting))
    if cached is not None:
        setting.baseline = ModelStats.from_dict(cached)
        return
    display.step(f"{loaded.name}: measuring the original")
    if setting.objective == "decode":
        setting.baseline = decode.baseline(setting)
        setting.cache.put("baseline", baseline_key(setting), setting.baseline.to_dict())
        return
    spec = (f"{loaded.name} (original)", loaded.model, loaded.entry, loaded.path)
    (setting.baseline,) = bench([spec], batch_sizes=opts.batch_sizes, threads=opts.threads, repeats=setting.repeats,
                                warmup=2, memory=False, throughput=False, validation=True, eval_data=opts.eval_data,
                                progress=False)  # fmt: skip
    setting.cache.put("baseline", baseline_key(setting), setting.baseline.to_dict())


def run(setting: Setting, trials: list[Trial], search: AutoSearch, display: Display) -> None:
    """Screen the candidates cheapest first (those that train last) while time is left; each one that leads
    when screened is measured in full at once (its `.onnx`), so a result is secured early and no later
    candidate's calibration or training can use up the time its measurement needs; then the finalists' other
    forms (`.pt2`) are measured. `exhaustive`: every candidate screened and every form measured, nothing dropped."""
    exhaustive = search.strategy == "exhaustive"
    costs: dict[int, list[float]] = {}
    best: float | None = None
    for trial in screening_order(trials):
        reserve = (MAX_FINALISTS if best is None else MAX_FINALISTS - 1) * setting.measure_s
        screen_all(setting, [trial], (costs, reserve), search, display)
        if not exhaustive and trial.status == "screened" and leads(setting, trial, trials, search):
            if "pt2" not in trial.forms:  # its fastest form is the one to secure
                add_pt2(setting, trial, display, reserve)
            best = measure_all(setting, [trial], best, search, display)
    finalists = shortlist(setting, trials, search, display)
    measure_all(setting, [t for t in finalists if not t.measured or len(t.measured) < len(t.forms)], best, search,
                display)  # fmt: skip
    for trial in trials:
        if trial.status == "screened":  # screened within budget, not measured: say why
            trial.status, trial.why = "dropped", dominated(setting, trial, trials, search)


def screening_order(trials: list[Trial]) -> list[Trial]:
    """Cheapest cost class first (those that train last); in a class, a candidate with a kept student first."""
    return sorted(trials, key=lambda t: (t.cand.cost, t.student is None))


def reuse_students(setting: Setting, trials: list[Trial]) -> None:
    """A trained candidate whose student an earlier run kept (`distill.api.saved_student`) costs a calibration of
    that smaller model, not a training: it moves to the calibrated class, ahead of the candidates that calibrate
    the whole model."""
    from modelpress.core.context import Context
    from modelpress.distill.api import saved_student
    from modelpress.distill.config import DistillConfig

    loaded, entry = setting.loaded, setting.loaded.entry
    if loaded.kind == "onnx" or entry is None:
        return
    ctx = Context(data=setting.data, options=setting.options, training_data=entry.training_set)
    kept: dict[str, Path | None] = {}  # per distillation config: candidates share a student
    for trial in trials:
        first, *rest = trial.cand.recipe.passes or [None]
        trained_after = any(p.stage in TRAINING_STAGES for p in rest)
        if trial.cand.cost != TRAINED or not isinstance(first, DistillConfig) or trained_after:
            continue
        key = repr(first.to_dict())
        if key not in kept:
            kept[key] = saved_student(loaded.model, first, ctx)
        if (path := kept[key]) is not None:
            trial.cand = dataclasses.replace(trial.cand, cost=CALIBRATED)
            trial.student = str(path)


def leads(setting: Setting, trial: Trial, trials: list[Trial], search: AutoSearch) -> bool:
    """Whether `trial`, just screened within budget, is the best screened or measured candidate so far."""
    value = score(setting, trial, search)
    others = [score(setting, t, search) for t in trials if t is not trial and t.status in ("screened", "measured")]
    return value < float("inf") and all(value < other for other in others)


def screen_all(
    setting: Setting,
    trials: list[Trial],
    spent: tuple[dict[int, list[float]], float],
    search: AutoSearch,
    display: Display,
) -> None:
    """Screen `trials` in order while the time each is estimated to take (the mean of its cost class so far,
    else the longest screening so far) and `spent`'s reserve (for the full measurements still to come) fit
    the budget."""
    costs, reserve = spent
    for trial in trials:
        display.step(f"screening {trial.cand.name}")
        same = costs.get(trial.cand.cost, [])
        seen = [c for cls in costs.values() for c in cls]
        estimate = sum(same) / len(same) if same else max(seen, default=0.0)
        if not setting.clock.affords(estimate + reserve):
            trial.status, trial.why = "skipped", "not tried: the time budget ran out"
        else:
            start = time.perf_counter()
            screen(setting, trial, search.strategy == "exhaustive")
            costs.setdefault(trial.cand.cost, []).append(time.perf_counter() - start)
        display.advance(best_screened(setting, trials, search))


def shortlist(setting: Setting, trials: list[Trial], search: AutoSearch, display: Display) -> list[Trial]:
    """The screened candidates that can still win, best first, their .pt2 screened where worth it."""
    exhaustive = search.strategy == "exhaustive"
    eligible = sorted(
        (t for t in trials if t.status in ("screened", "measured")), key=lambda t: score(setting, t, search)
    )
    for i, trial in enumerate(eligible if exhaustive else eligible[:PT2_SCREENED]):
        if "pt2" not in trial.forms:  # the measurements of the finalists ahead of it are still to come
            add_pt2(setting, trial, display, 0.0 if exhaustive else min(i + 1, MAX_FINALISTS) * setting.measure_s)
    eligible.sort(key=lambda t: score(setting, t, search))
    if exhaustive or not eligible:
        return eligible
    best = score(setting, eligible[0], search)
    return [t for t in eligible if score(setting, t, search) <= best * (1 + TOLERANCE)][:MAX_FINALISTS]


def measure_all(
    setting: Setting, finalists: list[Trial], best: float | None, search: AutoSearch, display: Display
) -> float | None:
    """Measure the forms of `finalists` in full, each finalist's fastest screened form first; a form whose
    screened figure a measured one's screened figure beats by more than TOLERANCE is skipped (screening and
    full measurement can use different inputs: a causal LM is screened on shorter sequences, so like is
    compared with like). Returns the best screened figure of a form measured within budget."""
    exhaustive = search.strategy == "exhaustive"
    display.grow(sum(len(t.forms) for t in finalists))
    for trial in finalists:
        kinds = [k for k, f in trial.forms.items() if (exhaustive or f.get("status") == "ok")]
        for kind in sorted(kinds, key=lambda k: form_score(setting, trial, k, search)):
            screened = form_score(setting, trial, kind, search)
            if kind in trial.measured:
                continue
            if not exhaustive and best is not None and best * (1 + TOLERANCE) < screened:
                trial.forms[kind]["why"] = (f"not measured in full: {screened:.3g} when screened, more than "
                                            f"{TOLERANCE:.0%} behind a measured form's {best:.3g}")  # fmt: skip
                continue
            display.step(f"measuring {trial.cand.name} {artifact_name(kind)}")
            row = measure(setting, trial, kind)
            display.advance(None)
            if row is not None and row["within_budget"] and not row["slower_than_original"]:
                best = screened if best is None else min(best, screened)
                unit = "ms/token" if search.objective == "decode" else "ms"  # p50_ms: a time under every objective
                figure = f"{row['p50_ms']:.2f} {unit}"
                display.best(f"{trial.cand.name} {artifact_name(kind)} {figure}, drop {row['drop']:.3g}")
    return best


def form_score(setting: Setting, trial: Trial, kind: str, search: AutoSearch) -> float:
    """One form's screened figure: its size in MB, or its screened p50 at the largest batch size."""
    form = trial.forms[kind]
    if search.objective == "size":
        return form.get("size_bytes", 0) / 1e6 or float("inf")
    return form.get("ms", {}).get(setting.key, float("inf"))


def dominated(setting: Setting, trial: Trial, trials: list[Trial], search: AutoSearch) -> str:
    """Why a candidate screened within budget was not measured in full."""
    value = score(setting, trial, search)
    if value == float("inf"):
        return "no form faster than the original when screened"
    unit = unit_of(search)
    better = [t for t in trials if t.measured and t is not trial]
    if not better:
        return "not measured in full: the time budget ran out"
    top = min(better, key=lambda t: score(setting, t, search))
    return (
        f"dominated when screened: {top.cand.name} is within budget at {score(setting, top, search):.3g} {unit}, "
        f"this one {value:.3g} {unit}"
    )


def screen(setting: Setting, trial: Trial, exhaustive: bool) -> None:
    """Build the candidate's .onnx (a decoder candidate's GenAI folder), score it, time it (or take all of it
    from the cache)."""
    key = recipe_key(trial.cand.recipe)
    cached = setting.cache.get("screen", key)
    if cached is not None:
        restore(trial, cached)
        return
    kind = "genai" if "genai" in trial.cand.forms else "onnx"
    try:
        build(setting, trial, (kind,))
        if kind not in trial.forms:
            raise BadInputError(f"no {artifact_name(kind)} was written")
        screen_quality(setting, trial, kind)
        if trial.status != "dropped" or exhaustive:
            screen_speed(setting, trial, kind)
            status = trial.forms[kind]["status"]
            if status in ("stopped", "refused"):
                trial.status, trial.why = status, trial.forms[kind]["why"]
            elif trial.status != "dropped":
                trial.status = "screened"
    except Exception as e:  # noqa: BLE001 - one candidate that fails (refused export, a pass that does not
        # apply to this model) is a row of the table, never the end of the search
        trial.status, trial.why = "refused", f"{type(e).__name__}: {e}".strip()[:500]
    if trial.status != "screened" and not exhaustive:
        trial.model = None
    setting.cache.put("screen", key, store(trial))


def add_pt2(setting: Setting, trial: Trial, display: Display, reserve: float = 0.0) -> None:
    """Compile and screen the candidate's .pt2 where this CPU makes it worth timing and the time budget, less
    `reserve` seconds kept for measurements still to come, affords its compilation (estimated from those
    compiled so far, or from its .onnx build before the first). A decoder candidate has no .pt2 form."""
    if "genai" in trial.cand.forms:
        return
    largest = str(max(setting.options.batch_sizes))
    worth, why = pt2_worth_timing(trial.cand, cpu(), setting.original_ms[largest])
    if not worth:
        trial.forms.setdefault("pt2", {"status": "not timed", "why": why})
        return
    key = {"pt2": recipe_key(trial.cand.recipe)}
    cached = setting.cache.get("screen", key)
    if cached is not None:
        trial.forms["pt2"] = cached
        return
    costs = setting.pt2_costs
    estimate = sum(costs) / len(costs) if costs else PT2_FIRST_FACTOR * trial.build_s
    if not setting.clock.affords(estimate + reserve):
        trial.forms["pt2"] = {"status": "not timed", "why": f"not compiled: the time budget ran out (about "
                              f"{format_duration(estimate)} to compile)"}  # fmt: skip
        return
    display.step(f"compiling {trial.cand.name} model.pt2")
    start = setting.clock.now()
    try:
        build(setting, trial, ("pt2",))
        if "pt2" in trial.forms:
            screen_speed(setting, trial, "pt2")
    except Exception as e:  # noqa: BLE001 - a .pt2 that cannot be built leaves the .onnx in the race
        trial.forms["pt2"] = {"status": "refused", "why": f"{type(e).__name__}: {e}".strip()[:500]}
    costs.append(setting.clock.now() - start)
    setting.cache.put("screen", key, {k: v for k, v in trial.forms["pt2"].items() if k != "path"})


def cpu() -> dict[str, Any]:
    from modelpress.core.environment import cpu_info

    return cpu_info()


def score(setting: Setting, trial: Trial, search: AutoSearch) -> float:
    if search.objective == "size":
        return trial.size_mb() or float("inf")
    return trial.best_ms(setting.key)


def unit_of(search: AutoSearch) -> str:
    return {"size": "MB", "decode": "ms/token"}.get(search.objective, "ms")


def measure(setting: Setting, trial: Trial, kind: str) -> dict[str, Any] | None:
    """One form measured in full (or taken from the cache); its row, None where it was not measured."""
    if kind not in trial.cand.forms:  # an ONNX model's .pt2: there is none to measure
        return None
    key = {"full": recipe_key(trial.cand.recipe), "kind": kind, "repeats": setting.repeats}
    cached = setting.cache.get("full", key)
    if cached is not None:
        stats = ModelStats.from_dict(cached)
    else:
        if not setting.clock.affords(setting.measure_s):  # the original's: an upper bound for a faster form
            trial.forms[kind]["why"] = "not measured in full: the time budget ran out"
            return None
        screened = trial.forms[kind]
        if not (screened.get("path") and Path(screened["path"]).exists()):  # screened in an earlier run: rebuild
            build(setting, trial, (kind,))
            trial.forms[kind] = {**screened, "path": trial.forms[kind]["path"]}  # its screened figures kept
        stats = measure_form(setting, trial, kind)
        setting.cache.put("full", key, stats.to_dict())
    trial.measured[kind] = stats
    trial.status = "measured"
    return measured_row(setting, trial, kind, stats)


def best_screened(setting: Setting, trials: list[Trial], search: AutoSearch) -> str | None:
    done = [t for t in trials if t.status == "screened"]
    if not done:
        return None
    t = min(done, key=lambda t: score(setting, t, search))
    return f"{t.cand.name} (screened {score(setting, t, search):.3g} {unit_of(search)})"


def finish(setting: Setting, trials: list[Trial], search: AutoSearch, out_dir: Path) -> Report:
    """Choose among the measured forms, and write the winner's files, recipe and report into `out_dir`."""
    from modelpress.auto.write import write_winner

    rows: list[dict[str, Any]] = []
    winner: tuple[float, Trial, str] | None = None
    eligible: list[tuple[float, Trial, str]] = []
    for trial in trials:
        for kind, stats in trial.measured.items():
            row = measured_row(setting, trial, kind, stats)
            rows.append(row)
            if row["within_budget"] and not row["slower_than_original"]:
                value = row["size_mb"] if search.objective == "size" else row["p50_ms"]
                eligible.append((value, trial, kind))
                if winner is None or value < winner[0]:
                    winner = (value, trial, kind)
        rows += screened_rows(setting, trial)
    if search.objective in ("latency", "decode"):  # forms too close to call by one measurement: timed again
        winner = runoff(setting, contenders(eligible)) or winner
    if winner is None:
        raise BadInputError(
            f"no candidate stays within a quality drop of {search.max_drop} at a speed above the original's: "
            f"{summary(rows)}"
        )
    _, trial, kind = winner
    for row in rows:
        if row["recipe"] == trial.cand.name and row["artifact"].startswith(artifact_name(kind)) and \
                row["stage"] == "measured":  # fmt: skip
            row["status"] = "chosen"
    return write_winner(setting, trial, kind, rows, search, out_dir)


__all__ = ["AutoSearch", "auto_compress", "Candidate"]
