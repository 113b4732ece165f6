"""Auto mode's scheduling, without models: the fastest screened form is measured first, a form that a measured
one beats by more than the tolerance is skipped, and a `.pt2` is compiled only where the time budget affords it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from modelpress.auto import search
from modelpress.auto.budget import Clock
from modelpress.auto.cache import SearchCache
from modelpress.auto.display import Display
from modelpress.auto.space import named
from modelpress.auto.trial import Setting, Trial
from modelpress.core.options import RunOptions


class Now:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def setting(tmp_path: Path, budget_s: float | None, now: Now) -> Setting:
    opts = RunOptions(threads=1, batch_sizes=(1, 8), repeats=3, progress=False)
    s = Setting(loaded=None, data=None, options=opts, clock=Clock(budget_s, now), budget=(0.01, False),  # type: ignore[arg-type]
                cache=SearchCache(tmp_path / "cache", enabled=False))  # fmt: skip
    s.original_ms = {"1": 5.0, "8": 40.0}
    s.measure_s = 10.0
    return s


def trial(tmp_path: Path, name: str, **ms: float) -> Trial:
    t = Trial(cand=named("float"), folder=tmp_path / name)
    t.forms = {
        k: {"status": "ok", "ms": {"8": v}, "size_bytes": 1000, "path": str(tmp_path / k)} for k, v in ms.items()
    }
    t.status = "screened"
    return t


def test_fastest_form_first_and_slow_forms_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    measured: list[tuple[int, str]] = []

    def measure(setting: Setting, t: Trial, kind: str) -> dict[str, Any]:
        measured.append((id(t), kind))
        return {"within_budget": True, "slower_than_original": False, "p50_ms": 4 * t.forms[kind]["ms"]["8"],
                "drop": 0.0}  # fmt: skip

    monkeypatch.setattr(search, "measure", measure)
    s = setting(tmp_path, None, Now())
    a = trial(tmp_path, "a", onnx=20.0, pt2=10.0)
    b = trial(tmp_path, "b", onnx=12.5, pt2=30.0)  # its .onnx is within 30% of a's .pt2 when screened; .pt2 is not
    opts = RunOptions(threads=1, progress=False)
    with Display(opts, s.clock, 2) as display:
        best = search.measure_all(s, [a, b], None, search.AutoSearch(max_drop=0.01), display)
    # a's .pt2 first; a's .onnx (20 ms) and b's .pt2 (30 ms) are beaten by more than 30% by a's .pt2 (10 ms)
    assert measured == [(id(a), "pt2"), (id(b), "onnx")]
    assert best == 10.0  # screened figures compare with screened figures, not with the full measurement's 40 ms
    assert "more than 30% behind a measured form's 10" in a.forms["onnx"]["why"]


def test_pt2_compiled_only_when_the_budget_affords_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []

    def build(setting: Setting, t: Trial, export: tuple[str, ...]) -> None:
        built.append(t.folder.name)
        now.t += 30.0  # a compilation takes 30 s
        t.forms["pt2"] = {"status": "built", "path": str(tmp_path / "p.pt2")}

    def screen_speed(setting: Setting, t: Trial, kind: str) -> None:
        t.forms[kind].update(status="ok", ms={"8": 5.0}, size_bytes=10)

    monkeypatch.setattr(search, "pt2_worth_timing", lambda *a: (True, "worth it"))
    monkeypatch.setattr(search, "build", build)
    monkeypatch.setattr(search, "screen_speed", screen_speed)
    now = Now()
    s = setting(tmp_path, 100.0, now)
    first = trial(tmp_path, "first", onnx=20.0)
    first.build_s = 5.0  # before any compilation: estimated at PT2_FIRST_FACTOR x 5 s = 20 s
    with Display(RunOptions(threads=1, progress=False), s.clock, 3) as display:
        search.add_pt2(s, first, display, reserve=70.0)  # 20 + 70 <= 100
        assert first.forms["pt2"]["status"] == "ok" and s.pt2_costs == [30.0]
        second = trial(tmp_path, "second", onnx=20.0)
        search.add_pt2(s, second, display, reserve=45.0)  # 70 s left: 30 (as the first took) + 45 > 70
        assert second.forms["pt2"]["status"] == "not timed"
        assert "time budget ran out" in second.forms["pt2"]["why"]
        search.add_pt2(s, second, display, reserve=40.0)  # 30 + 40 <= 70
    assert built == ["first", "second"]
    assert second.forms["pt2"]["status"] == "ok"


def test_full_calls_are_bounded_like_bench() -> None:
    assert search.full_calls(0.01, repeats=20) == 1 + 2 + 20  # fast: every repeat
    assert search.full_calls(6.4, repeats=20) == 1 + 1 + 4  # a causal LM at batch 32: 20 s of timed calls
    assert search.full_calls(30.0, repeats=20) == 1 + 1 + 3  # never fewer than three timed


def test_runoff_times_close_forms_again_and_picks_the_lowest_median(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from modelpress.auto import runoff as ro
    from modelpress.measure import gate

    class Entry:
        def example_inputs(self, bs: int) -> tuple[torch.Tensor, ...]:
            return (torch.zeros(bs, 3),)

    class Loaded:
        entry = Entry()

    probed: list[str] = []
    speed = {"a.onnx": 110.0, "b.pt2": 90.0}

    def probe(kind: str, path: str, inputs: dict, limits: dict, threads: Any, calls: int) -> gate.ProbeResult:
        probed.append(Path(path).name)
        assert set(inputs) == {"8"} and calls == ro.RUNOFF_CALLS
        return gate.ProbeResult(ms={"8": speed[Path(path).name]})

    monkeypatch.setattr(gate, "probe", probe)
    s = setting(tmp_path, None, Now())
    s.loaded = Loaded()  # type: ignore[assignment]
    a, b, c = trial(tmp_path, "a", onnx=20.0), trial(tmp_path, "b", pt2=21.0), trial(tmp_path, "c", onnx=30.0)
    for t, kind, name in ((a, "onnx", "a.onnx"), (b, "pt2", "b.pt2"), (c, "onnx", "c.onnx")):
        t.forms[kind]["path"] = str(tmp_path / name)
        (tmp_path / name).write_bytes(b"x")
    measured = [(100.0, a, "onnx"), (105.0, b, "pt2"), (200.0, c, "onnx")]  # c: more than 15% behind
    close = ro.contenders(measured)
    assert [x[1] for x in close] == [a, b]
    won = ro.runoff(s, close)
    assert won is not None and won[1] is b  # measured 5% slower, faster when timed again together
    assert probed == ["a.onnx", "b.pt2"] * ro.RUNOFF_ROUNDS  # interleaved, round by round
    assert s.runoff is not None and s.runoff["chosen"] == "float model.pt2" and s.runoff["median_ms"]
    tight = setting(tmp_path, 1.0, Now())  # a budget that cannot afford the rounds: the measured choice stands
    tight.loaded = Loaded()  # type: ignore[assignment]
    assert ro.runoff(tight, close) is None and "time budget" in tight.runoff["skipped"]  # type: ignore[index]
    assert ro.runoff(s, close[:1]) is None  # nothing to run off
