"""Atomic file writes and the user-facing input error.

Outputs are written to a temporary name in the same folder and renamed into place, so a killed
run never leaves a half-written file that looks complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator


class InputError(ValueError):
    """Bad user input (annotation file, image, path); message starts with ``FILE:LINE:``.

    Entry points turn it into exit code 2 (see common.config.cli_main).
    """


class RunStopped(RuntimeError):
    """A run stopped on purpose (e.g. it diverged); the message is the one line to show.

    Entry points turn it into exit code 1 (see common.config.cli_main).
    """


LOCK_FILE = ".writer.lock"
_held: set[Path] = set()  # run folders this process holds (a second flock from it would fail)


@contextlib.contextmanager
def run_lock(folder: str | Path, enabled: bool | None = None) -> Iterator[None]:
    """One writer per run folder: hold an exclusive ``flock`` on ``<folder>/.writer.lock`` for the block.

    A second run into a folder a live run holds stops at once with one line (InputError, exit 2).
    The kernel releases the lock when its process dies, so the file a killed run leaves behind
    blocks nobody; a clean exit removes it, and the folders the lock made that stayed empty. A
    nested call for a folder this process already holds is a no-op. Only the main process locks
    (``enabled``, by default: RANK unset or 0, as torchrun and accelerate set it).
    (Hand-written on fcntl.flock: filelock's FileLock keeps its file after release, which would be
    left in every output folder; removing it is safe here because each flock is checked to hold
    the file that is on disk.)
    """
    folder = Path(folder).resolve()
    if enabled is None:
        enabled = os.environ.get("RANK", "0") == "0"
    if not enabled or folder in _held:
        yield
        return
    made = [f for f in (folder, *folder.parents) if not f.exists()]  # the folders the lock makes, deepest first
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise InputError(f"{folder}: another run is writing here ({holder}); wait for it to end or choose "
                             "another output folder") from None
        # the holder before us may have removed the file between our open and flock: lock the file on disk
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}\n".encode(), 0)
    _held.add(folder)
    try:
        yield
    finally:
        _held.discard(folder)
        path.unlink(missing_ok=True)
        os.close(fd)  # closing the descriptor releases the lock
        for f in made:
            if any(f.iterdir()):
                break
            f.rmdir()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | Path, rows: Any) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_path(value: Any, folder: str | Path) -> Any:
    """How a file in ``folder`` names ``value`` (a path, a list of them, or None) so its outputs can move.

    A path in the same outputs tree as ``folder`` (the top folder under the working directory that
    holds ``folder``, e.g. ``outputs/``; ``folder`` itself if it lies elsewhere) is written relative
    to ``folder``; any other path (the release, image sets) absolute. ``read_path`` undoes it.
    """
    if not value:
        return value
    if isinstance(value, (list, tuple)):
        return [write_path(v, folder) for v in value]
    target, here, cwd = Path(value).resolve(), Path(folder).resolve(), Path.cwd().resolve()
    tree = cwd / here.relative_to(cwd).parts[0] if here.is_relative_to(cwd) and here != cwd else here
    return os.path.relpath(target, here) if target.is_relative_to(tree) else str(target)


def read_path(value: Any, folder: str | Path) -> Any:
    """A path (a list of them, or None) named by a file in ``folder``: a relative one lies under ``folder``."""
    if not value:
        return value
    if isinstance(value, (list, tuple)):
        return [read_path(v, folder) for v in value]
    return os.path.normpath(os.path.join(folder, value))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL file; a line that does not parse raises InputError naming FILE:LINE."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: not valid JSON: {e.msg}") from None
    return rows
