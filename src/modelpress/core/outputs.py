"""Where results go: an output location is checked, locked and written so that no user file is lost.

The rules, enforced before any heavy work (each refusal is a `BadInputError`, exit code 2):

- `--out` is never the working directory (or a folder above it), never an input (model, data,
  recipe, weights), never a folder that contains an input, never a path inside an input folder;
- an existing output is replaced only with `overwrite`, and a folder only if modelpress wrote it:
  every folder it writes carries a `.modelpress` marker (a folder without one is accepted only if it
  is empty or holds nothing but the files modelpress writes);
- a folder is asked for where a folder is written, a file where a file is written;
- the location must be writable (probed by creating and removing a temporary entry: read-only
  filesystems, `/proc`, missing permissions are caught) and have room for the result;
- one run at a time writes a given output: a lock file beside it (`.NAME.lock`) is held for the
  whole run; a second run is refused with the first one's pid;
- a run killed without a chance to clean up (SIGKILL, power loss) leaves at most hidden
  `.NAME.*.partial` entries; the next run writing the same output removes them. The output itself
  is always either absent, the old content, or the complete new one (see `core.atomic`).

    >>> with claim_output("out/minilm-int8", kind="folder", overwrite=False, inputs=[model_dir]) as final:
    ...     with atomic_dir(final) as tmp:
    ...         ...  # write into tmp
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from modelpress._version import __version__
from modelpress.core.errors import BadInputError

MARKER = ".modelpress"
# Files modelpress writes into an output folder: a folder holding nothing else (written before the
# marker existed) may be replaced too.
KNOWN_FILES = frozenset(
    {
        "model.onnx",
        "model.onnx.data",
        "model.pt2",
        "model.gguf",
        "report.json",
        "report.md",
        "report.html",
        "recipe.yaml",
    }
)
# Errors that say "this location cannot take the output", not "modelpress is broken".
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
_WRITE_MESSAGES = (
    "No space left on device",
    "Disk quota exceeded",
    "File too large",
    "File size limit exceeded",
    "Read-only file system",
)
Kind = Literal["folder", "file"]


def marker_text() -> str:
    return json.dumps({"written_by": "modelpress", "version": __version__}) + "\n"


def written_by_modelpress(folder: Path) -> bool:
    """True where `folder` carries the marker, or holds only files modelpress writes."""
    if (folder / MARKER).is_file():
        return True
    entries = list(folder.iterdir())
    return all(e.is_file() and not e.is_symlink() and e.name in KNOWN_FILES for e in entries)


def check_output(
    out: str | Path,
    *,
    kind: Kind,
    overwrite: bool,
    inputs: Iterable[str | Path | None] = (),
    suffixes: tuple[str, ...] = (),
    option: str = "--out",
) -> Path:
    """The absolute path `out` names, after every check in the module docstring but the lock and space."""
    raw = str(out)
    if not raw.strip():
        raise BadInputError(f"{option} is empty; name a {kind}")
    final = Path(raw).expanduser().resolve()
    if final == Path(final.anchor):
        raise BadInputError(f"{option} {raw} is the filesystem root; name a new {kind} for the results")
    cwd = Path.cwd().resolve()
    if final == cwd or final in cwd.parents:
        raise BadInputError(
            f"{option} {raw} is the working directory{'' if final == cwd else ' or a folder above it'}; "
            f"replacing it would delete your files: name a new {kind} for the results"
        )
    _check_inputs(final, raw, inputs, option)
    if final.exists() or final.is_symlink():
        _check_existing(final, raw, kind, overwrite, option)
    if suffixes and final.suffix not in suffixes:
        raise BadInputError(f"{option} {raw}: the file name must end in {' or '.join(suffixes)}")
    _probe_writable(final.parent, raw, option)
    return final


def _check_inputs(final: Path, raw: str, inputs: Iterable[str | Path | None], option: str) -> None:
    for item in inputs:
        if item is None or not str(item).strip():
            continue
        try:
            source = Path(item).expanduser().resolve()
        except (OSError, RuntimeError):  # a symlink loop: the loader reports it
            continue
        if not source.exists():
            continue
        if source == final:
            raise BadInputError(f"{option} {raw} is the input {item}: writing there would destroy it; name a new place")
        if source.is_relative_to(final):
            raise BadInputError(
                f"{option} {raw} contains the input {item}: replacing it would delete the input; name a new place"
            )
        if source.is_dir() and final.is_relative_to(source):
            raise BadInputError(
                f"{option} {raw} lies inside the input folder {item}: write the results outside the model's folder"
            )


def _check_existing(final: Path, raw: str, kind: Kind, overwrite: bool, option: str) -> None:
    try:
        mode = os.stat(final).st_mode
    except OSError as e:
        raise BadInputError(f"{option} {raw}: {e.strerror}") from None
    if kind == "folder":
        if not stat.S_ISDIR(mode):
            raise BadInputError(f"{option} {raw} is a file, not a folder; {option} names the folder the results go to")
        if not any(final.iterdir()):
            return
        if not overwrite:
            raise BadInputError(f"{option} {raw} exists; pass --overwrite to replace it")
        if not written_by_modelpress(final):
            raise BadInputError(
                f"{option} {raw} exists and was not written by modelpress (no {MARKER} marker, and it holds other "
                "files): refusing to replace it. Name a new folder, or remove this one yourself"
            )
        return
    if stat.S_ISDIR(mode):
        raise BadInputError(f"{option} {raw} is a folder; {option} names the file to write")
    if not stat.S_ISREG(mode):
        raise BadInputError(f"{option} {raw} is not a regular file (a device, FIFO or socket); name a new file")
    if not overwrite:
        raise BadInputError(f"{option} {raw} exists; pass --overwrite to replace it")


def _first_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _probe_writable(parent: Path, raw: str, option: str) -> None:
    """Create and remove a temporary entry where the output will be created (read-only, /proc, permissions)."""
    base = _first_existing(parent)
    if not base.is_dir():
        raise BadInputError(f"{option} {raw}: {base} is a file, so no folder can be created under it")
    try:
        probe = tempfile.mkdtemp(prefix=".modelpress-probe.", dir=base)
        os.rmdir(probe)
    except OSError as e:
        raise BadInputError(f"{option} {raw}: cannot write in {base}: {e.strerror or e}") from None


def check_space(final: Path, need_bytes: int, raw: str | None = None, option: str = "--out") -> None:
    """Refuse where the filesystem of `final` has less than `need_bytes` free."""
    if need_bytes <= 0:
        return
    free = shutil.disk_usage(_first_existing(final.parent)).free
    if free < need_bytes:
        raise BadInputError(
            f"{option} {raw or final}: {free / 2**20:.0f} MiB free on its filesystem; "
            f"the results need about {need_bytes / 2**20:.0f} MiB. Free some space or write elsewhere"
        )


@contextlib.contextmanager
def output_lock(final: Path, option: str = "--out") -> Iterator[None]:
    """Hold `.NAME.lock` beside `final` for the block; refuse if another run holds it."""
    created = _make_parents(final.parent)
    lock = final.parent / f".{final.name}.lock"
    fd = _acquire(lock, final, option)
    try:
        _remove_stale(final)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)
        if not final.exists():  # nothing was written: leave no empty parents behind
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()


def _make_parents(parent: Path) -> list[Path]:
    missing = []
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    created = []
    for folder in reversed(missing):
        folder.mkdir()
        created.append(folder)
    return created


def _acquire(lock: Path, final: Path, option: str) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BadInputError(
                f"{option} {final} is being written by another modelpress run (pid {holder}); "
                "wait for it to finish or choose another output"
            ) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:  # the previous holder removed it as we opened it: take a fresh one
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return fd
        os.close(fd)


def _remove_stale(final: Path) -> None:
    """Entries a killed run left beside `final` (we hold the lock: no live run is writing them)."""
    # the temporary names of core.atomic: mkdtemp / mkstemp add 8 random characters
    folder = re.compile(rf"^\.{re.escape(final.name)}\.([a-z0-9_]{{8}}\.partial|old)$")
    file = re.compile(rf"^\.{re.escape(final.stem)}\.[a-z0-9_]{{8}}\.partial{re.escape(final.suffix)}$")
    for item in final.parent.iterdir():
        if folder.match(item.name) or file.match(item.name):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    item.unlink()


@contextlib.contextmanager
def claim_output(
    out: str | Path,
    *,
    kind: Kind,
    overwrite: bool,
    inputs: Iterable[str | Path | None] = (),
    need_bytes: int = 0,
    suffixes: tuple[str, ...] = (),
    option: str = "--out",
) -> Iterator[Path]:
    """Check `out`, lock it and yield its absolute path; a full or read-only disk becomes `BadInputError`."""
    final = check_output(out, kind=kind, overwrite=overwrite, inputs=inputs, suffixes=suffixes, option=option)
    check_space(final, need_bytes, str(out), option)
    with output_lock(final, option):
        try:
            yield final
        except OSError as e:
            if e.errno not in _WRITE_ERRNOS:
                raise
            raise BadInputError(f"cannot write {option} {out}: {e.strerror} ({e.filename or final})") from None
        except BadInputError:
            raise
        except Exception as e:  # torch's C++ writers and the compiler it runs report a full disk in words
            reason = next((m for m in _WRITE_MESSAGES if m in str(e)), None)
            if reason is None:
                raise
            raise BadInputError(
                f"cannot write {option} {out}: {reason} (while writing it or compiling into the temporary folder "
                f"{tempfile.gettempdir()})"
            ) from None


def estimate_bytes(model: object) -> int:
    """Room to ask for before writing a model's artifacts: two float copies of its parameters and 32 MiB."""
    params = getattr(model, "parameters", None)
    total = 0
    if callable(params):
        total = sum(p.numel() * 4 for p in params())
    return 2 * total + 32 * 2**20
