"""The user's files are sacred: --out never destroys an input or a foreign file, and no failure, signal
or full disk leaves a half-written output behind."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from modelpress.cli import main
from modelpress.core.outputs import MARKER, claim_output, output_lock

COMPRESS = ["compress", "digits-cnn", "--recipe", "w8", "--threads", "1", "-b", "1"]
ONNX_ONLY = "passes: [{type: WeightOnlyConfig, bits: 8}]\nexport: [onnx]\n"  # w8 without the slower .pt2


def _err(capsys: pytest.CaptureFixture[str]) -> str:
    return " ".join(capsys.readouterr().err.split())


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    """A user's model folder (refused on --out before anything loads it)."""
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "bert"}')
    (folder / "model.safetensors").write_bytes(b"weights the user cannot lose")
    return folder


@pytest.mark.parametrize(
    "out, fragment",
    [
        ("{model}", "is the input"),
        ("{model}/compressed", "lies inside the input folder"),
        ("{tmp}", "contains the input"),
    ],
)
def test_out_never_is_contains_or_sits_in_the_input(capsys, tmp_path, model_folder, out, fragment):
    before = _snapshot(tmp_path)
    target = out.format(model=model_folder, tmp=tmp_path)
    assert main(["compress", str(model_folder), "--recipe", "w8", "--out", target, "--overwrite"]) == 2
    assert fragment in _err(capsys)
    assert _snapshot(tmp_path) == before


def test_data_files_inside_out_are_protected(capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "calib.npy").write_bytes(b"the user's calibration set")
    (out / MARKER).write_text("{}")  # even a folder modelpress wrote
    for option in ("--data", "--eval-data", "--weights"):
        assert main([*COMPRESS, option, str(out / "calib.npy"), "--out", str(out), "--overwrite"]) == 2
        assert "contains the input" in _err(capsys)
    assert (out / "calib.npy").read_bytes() == b"the user's calibration set"


@pytest.mark.parametrize("spelling", [".", "{cwd}", "..", "/"])
def test_the_working_directory_and_above_are_refused(capsys, tmp_path, monkeypatch, spelling):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    assert main([*COMPRESS, "--out", spelling.format(cwd=work), "--overwrite"]) == 2
    message = _err(capsys)
    assert "working directory" in message or "filesystem root" in message
    assert (work / "notes.txt").read_text() == "mine"


def test_a_file_is_not_a_folder_and_a_foreign_folder_is_never_replaced(capsys, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert main([*COMPRESS, "--out", str(notes), "--overwrite"]) == 2
    assert "is a file, not a folder" in _err(capsys)
    assert main([*COMPRESS, "--out", str(notes / "sub"), "--overwrite"]) == 2
    assert "is a file, so no folder can be created" in _err(capsys)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"\xff\xd8")
    assert main([*COMPRESS, "--out", str(foreign), "--overwrite"]) == 2
    assert "not written by modelpress" in _err(capsys)
    assert notes.read_text() == "mine" and (foreign / "cat.jpg").read_bytes() == b"\xff\xd8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "photos"]


def test_unwritable_locations_are_refused_before_any_work(capsys, tmp_path):
    started = time.monotonic()
    assert main([*COMPRESS, "--out", "/proc/modelpress-out"]) == 2
    assert "cannot write in /proc" in _err(capsys)
    assert main(["bench", "digits-cnn", "--out", "/proc/bench.json"]) == 2
    assert "cannot write in /proc" in _err(capsys)
    assert time.monotonic() - started < 10  # refused before measuring anything


def test_a_full_disk_is_refused_up_front(capsys, tmp_path, monkeypatch):
    import shutil

    import modelpress.core.outputs as outputs

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda path: usage._replace(free=1024))
    assert main([*COMPRESS, "--out", str(tmp_path / "out")]) == 2
    assert "MiB free on its filesystem" in _err(capsys)
    assert list(tmp_path.iterdir()) == []


def test_a_disk_that_fills_while_writing_is_exit_2_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """ENOSPC in the middle of writing: a message, no traceback, no partial output."""
    import errno

    import modelpress.pipeline as pipeline

    def no_space(loaded, compressed, artifacts, *args):  # the artifacts are in the temporary folder by now
        assert artifacts
        raise OSError(errno.ENOSPC, "No space left on device", str(next(iter(artifacts.values()))))

    monkeypatch.setattr(pipeline, "_measure", no_space)
    recipe = tmp_path / "w8-onnx.yaml"  # the .onnx alone: nothing slower to build before the failure
    recipe.write_text(ONNX_ONLY)
    argv = ["compress", "digits-cnn", "--recipe", str(recipe), "--threads", "1", "-b", "1"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert "cannot write --out" in _err(capsys)
    assert list(tmp_path.iterdir()) == [recipe]


def test_bench_and_export_outputs(capsys, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    assert main(["bench", "digits-cnn", "--out", str(folder)]) == 2
    assert "is a folder" in _err(capsys)
    assert main(["export", "digits-cnn", "--out", str(folder)]) == 2
    assert "is a folder" in _err(capsys)
    existing = tmp_path / "model.onnx"
    existing.write_bytes(b"the user's own graph")
    assert main(["export", "digits-cnn", "--out", str(existing / "x.onnx")]) == 2
    assert "is a file, so no folder can be created" in _err(capsys)
    assert main(["export", "digits-cnn", "--out", str(existing)]) == 2
    assert "exists; pass --overwrite" in _err(capsys)
    assert main(["export", str(existing), "--out", str(existing), "--overwrite"]) == 2
    assert "is the input" in _err(capsys)
    assert existing.read_bytes() == b"the user's own graph"
    assert main(["export", "digits-cnn", "--out", str(existing), "--overwrite"]) == 0
    assert existing.read_bytes() != b"the user's own graph"  # asked for: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "results"]


def test_a_second_run_on_the_same_out_is_refused(capsys, tmp_path):
    out = (tmp_path / "out").resolve()
    with output_lock(out):
        assert main([*COMPRESS, "--out", str(out)]) == 2
        assert f"being written by another modelpress run (pid {os.getpid()})" in _err(capsys)
    assert list(tmp_path.iterdir()) == []  # the lock is gone with its holder


def test_leftovers_of_a_killed_run_are_removed_by_the_next(tmp_path):
    out = tmp_path / "out"
    (tmp_path / ".out.abcd1234.partial").mkdir()
    (tmp_path / ".out.old").mkdir()
    (tmp_path / ".out.v2.abcd1234.partial").mkdir()  # another output's temporary folder: not ours
    (tmp_path / "out.onnx").write_text("unrelated")
    with claim_output(out, kind="folder", overwrite=False) as final:
        assert final == out.resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.v2.abcd1234.partial", "out.onnx"]


def _complete(out: Path) -> bool:
    """An output folder as a successful run leaves it: marker, report, every artifact it names."""
    report = json.loads((out / "report.json").read_text())
    named = [Path(s["artifact"]).name for s in report.get("artifacts", []) if s.get("artifact")]
    return (out / MARKER).is_file() and (out / "recipe.yaml").is_file() and all((out / n).is_file() for n in named)


def _run(argv: list[str]) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-X", "faulthandler", "-m", "modelpress.cli", *argv]  # a crash prints its stack
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_and_sighup_clean_up_like_ctrl_c(tmp_path):
    for sig, code in ((signal.SIGTERM, 143), (signal.SIGHUP, 129)):
        out = tmp_path / "out"
        proc = _run([*COMPRESS, "--out", str(out)])
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".out.*.partial")):  # work is under way
            assert proc.poll() is None and time.monotonic() < deadline, "compress ended before the signal"
            time.sleep(0.05)
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == code and "interrupted" in stderr, stderr[-2000:]
        assert list(tmp_path.iterdir()) == []


def _wait_for(pattern: str, folder: Path, proc: subprocess.Popen[str]) -> bool:
    """Wait until `pattern` matches under `folder` (False if the run ended first)."""
    deadline = time.monotonic() + 180
    while not list(folder.glob(pattern)):
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _kill_at(tmp_path: Path, moment: tuple[str, float], argv: list[str] = COMPRESS) -> str:
    """SIGKILL `compress --overwrite` over an existing output at `moment` (a file that appears, then a
    delay): the output is the old one or a complete new one, and the next run clears what was left."""
    out = tmp_path / "out"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    (out / MARKER).write_text("{}")
    (out / "report.json").write_text('{"old": true}')
    (out / "recipe.yaml").write_text("old")
    proc = _run([*argv, "--out", str(out), "--overwrite"])
    pattern, delay = moment
    if _wait_for(pattern, tmp_path, proc):
        time.sleep(delay)
    proc.kill()
    proc.communicate(timeout=60)
    old = json.loads((out / "report.json").read_text()).get("old") is True
    assert old or _complete(out), sorted(p.name for p in out.iterdir())
    with claim_output(out, kind="folder", overwrite=True):  # the next run's claim removes leftovers
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    return "old" if old else "new"


# Moments of a run: at start-up, while its temporary folder fills, as its report is written (the last
# step before the temporary folder takes the place of the old output)
_STARTED, _WORKING, _FINISHING = ".out.lock", ".out.*.partial", ".out.*.partial/report.html"


def test_sigkill_at_random_points_leaves_the_old_output_or_a_complete_new_one(tmp_path):
    rng = random.Random()
    moment = rng.choice([(_WORKING, rng.uniform(0, 2)), (_FINISHING, rng.uniform(0, 0.05))])
    recipe = tmp_path.parent / f"{tmp_path.name}-w8-onnx.yaml"  # the .onnx alone: a quicker run to kill
    recipe.write_text(ONNX_ONLY)
    seen = _kill_at(tmp_path, moment, ["compress", "digits-cnn", "--recipe", str(recipe), "--threads", "1", "-b", "1"])
    assert seen in ("old", "new")  # and _kill_at checked that the output is that, whole


@pytest.mark.slow
def test_sigkill_fault_injection_many_points(tmp_path):
    rng = random.Random(15)
    moments = [(_STARTED, rng.uniform(0, 4)) for _ in range(3)]
    moments += [(_WORKING, rng.uniform(0, 10)) for _ in range(4)]
    moments += [(_FINISHING, rng.uniform(0, 0.2)) for _ in range(5)]
    seen = [_kill_at(tmp_path, m) for m in moments]
    print("outputs after each kill:", seen)
    assert "new" in seen  # some kills came after the new output was in place


def test_compressing_an_onnx_model_writes_nothing_beside_it(tmp_path, capsys):
    """ONNX Runtime's quantizer writes NAME-inferred.onnx beside the graph it reads: never the user's."""
    import numpy as np

    folder = tmp_path / "models"
    folder.mkdir()
    assert main(["export", "digits-cnn", "--out", str(folder / "model.onnx")]) == 0
    (folder / "model-inferred.onnx").write_bytes(b"the user's own file")
    np.save(tmp_path / "calib.npy", np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32))
    before = _snapshot(folder)
    os.chmod(folder, 0o555)
    try:
        argv = [
            "compress",
            str(folder / "model.onnx"),
            "--recipe",
            "int8-static",
            "--data",
            str(tmp_path / "calib.npy"),
        ]
        assert main([*argv, "--out", str(tmp_path / "out"), "--threads", "1", "-b", "1"]) == 0, _err(capsys)
    finally:
        os.chmod(folder, 0o755)
    assert _snapshot(folder) == before
    assert (tmp_path / "out" / "model.onnx").is_file()
