"""The runoff: measured forms too close to call by one full measurement are timed again, together.

Two forms whose full measurements lie within `RUNOFF_SHARE` of each other are inside the run-to-run spread
of one measurement (MiniLM's 4-layer student: its `.pt2` measured 78 ms and its `.onnx` 81 ms in one run,
85 and 72 ms in the next). Before the choice they are timed again at the largest batch size, each in a child
process as the speed gate times them (`measure.gate.probe`), interleaved over `RUNOFF_ROUNDS` rounds; the
lowest median wins. The report keeps every round (`auto.runoff`). With the decode objective the contenders are
GenAI folders: each round decodes `RUNOFF_TOKENS` tokens at batch 1 with each (ms per token).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from modelpress.auto.table import artifact_name
from modelpress.auto.trial import Setting, Trial, recipe_key

RUNOFF_SHARE = 0.15  # measured forms within this share of the best one are timed again before the choice
RUNOFF_ROUNDS = 3
RUNOFF_CALLS = 5  # timed calls per form and round (after one warm-up call)
RUNOFF_TOKENS = 17  # decode objective: a prefill and 16 decode steps per folder and round

Contender = tuple[float, Trial, str]  # (measured p50 ms at the largest batch size, trial, form)


def contenders(measured: list[Contender]) -> list[Contender]:
    """The measured forms within RUNOFF_SHARE of the fastest, fastest first."""
    if not measured:
        return []
    ranked = sorted(measured, key=lambda c: c[0])
    return [c for c in ranked if c[0] <= ranked[0][0] * (1 + RUNOFF_SHARE)]


def runoff(setting: Setting, close: list[Contender]) -> Contender | None:
    """Time `close` again, interleaved in child processes; the contender with the lowest median, None where
    fewer than two can run or the time budget does not afford it. Records the rounds in `setting.runoff`."""
    if len(close) < 2 or setting.loaded.entry is None:
        return None
    largest = setting.key
    names = {name_of(c): c for c in close}
    key = {"runoff": {n: recipe_key(c[1].cand.recipe) + c[2] for n, c in names.items()}, "batch_size": largest}
    cached = setting.cache.get("runoff", key)
    if cached is not None and cached.get("chosen") in names:  # a second run decides as the first did
        setting.runoff = cached
        return names[cached["chosen"]]
    names = {n: c for n, c in names.items() if _on_disk(c[1].forms[c[2]].get("path"))}
    if len(names) < 2:  # files of an earlier run, not rebuilt: the measured choice stands
        return None
    decoding = largest == "decode"
    calls = 2 * RUNOFF_TOKENS if decoding else RUNOFF_CALLS + 1  # a prefill counted as a step, plus a warm-up
    per_round = sum(c[0] / 1e3 * calls for c in names.values()) + 3.0 * len(names)  # + a load each
    if not setting.clock.affords(RUNOFF_ROUNDS * per_round):
        setting.runoff = {"skipped": f"the time budget does not afford it (about {RUNOFF_ROUNDS * per_round:.0f} s)"}
        return None
    times: dict[str, list[float]] = {}
    for _ in range(RUNOFF_ROUNDS):
        for name, (_, trial, kind) in names.items():
            ms = decode_ms(setting, trial.forms[kind]["path"]) if decoding else timed(setting, trial, kind)
            if ms is not None:
                times.setdefault(name, []).append(ms)
    medians = {name: statistics.median(v) for name, v in times.items() if len(v) == RUNOFF_ROUNDS}
    if not medians:
        return None
    winner = min(medians, key=lambda n: medians[n])
    setting.runoff = {"batch_size": 1 if decoding else int(largest), "rounds": RUNOFF_ROUNDS,
                      "calls": RUNOFF_TOKENS - 1 if decoding else RUNOFF_CALLS,
                      "unit": "ms/token" if decoding else "ms",
                      "measured_ms": {n: round(c[0], 3) for n, c in names.items()},
                      "ms": {n: [round(t, 3) for t in v] for n, v in times.items()},
                      "median_ms": {n: round(m, 3) for n, m in medians.items()}, "chosen": winner}  # fmt: skip
    setting.cache.put("runoff", key, setting.runoff)
    return names[winner]


def timed(setting: Setting, trial: Trial, kind: str) -> float | None:
    """One round of a form at the largest batch size, in a child process (None where it did not run)."""
    from modelpress.measure.gate import probe

    assert setting.loaded.entry is not None
    largest = setting.key
    inputs = {largest: tuple(setting.loaded.entry.example_inputs(int(largest)))}
    limit = {largest: max(10.0, 3 * trial.best_ms(largest) / 1e3)}
    result = probe(kind, trial.forms[kind]["path"], inputs, limit, setting.options.threads, calls=RUNOFF_CALLS)
    return result.ms.get(largest)


def decode_ms(setting: Setting, path: str) -> float | None:
    """One round of a GenAI folder: ms per token decoding RUNOFF_TOKENS tokens at batch 1 (None where it failed)."""
    from modelpress.auto.decode import ms_per_token, speed

    try:
        return ms_per_token(speed(path, setting, RUNOFF_TOKENS, 1))
    except Exception:  # noqa: BLE001 - a folder that stops running leaves the others in the runoff
        return None


def _on_disk(path: str | None) -> bool:
    """Whether a form's file (or a GenAI folder) is there to time again: forms from an earlier run have no path."""
    return bool(path) and Path(str(path)).exists()


def name_of(contender: Contender) -> str:
    return f"{contender[1].cand.name} {artifact_name(contender[2])}"
