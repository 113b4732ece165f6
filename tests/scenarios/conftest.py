"""Scenario fixtures: the example script a test module names in `EXAMPLE`, imported from its path."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> ModuleType:
    """Import `examples/<name>/run.py` as module `<name>_run` (dashes as underscores)."""
    spec = importlib.util.spec_from_file_location(f"{name.replace('-', '_')}_run", EXAMPLES / name / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example(request: pytest.FixtureRequest) -> ModuleType:
    """The run.py of the example whose folder name the test module sets as `EXAMPLE`."""
    return load_example(request.module.EXAMPLE)


@pytest.fixture
def usage_error(example: ModuleType, capsys: pytest.CaptureFixture[str]) -> Callable[[list[str]], str]:
    """Call `example.main(args)`, check that argparse exits 2, and return what it wrote to stderr."""

    def call(args: list[str]) -> str:
        with pytest.raises(SystemExit) as exc:
            example.main(args)
        assert exc.value.code == 2
        return capsys.readouterr().err

    return call


@pytest.fixture
def refuses_bad_out(
    example: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> Callable[[], tuple[str, str]]:
    """Give `example.main` a file and a foreign non-empty folder as --out in `tmp_path`; both must exit 2 and
    stay untouched. Returns the two error messages.

    Leaves `tmp_path` holding the file `results.txt` and the folder `theirs`.
    """

    def attempt() -> tuple[str, str]:
        file = tmp_path / "results.txt"
        file.write_text("keep me")
        assert example.main(["--out", str(file)]) == 2
        file_err = capsys.readouterr().err
        assert file.read_text() == "keep me"
        foreign = tmp_path / "theirs"
        foreign.mkdir()
        (foreign / "notes.md").write_text("keep me")
        assert example.main(["--out", str(foreign)]) == 2
        foreign_err = capsys.readouterr().err
        assert [p.name for p in foreign.iterdir()] == ["notes.md"]
        return file_err, foreign_err

    return attempt
