"""Run a chain of stages, skipping those whose output is there and whose inputs are unchanged.

A stage is a command with an output folder. When it succeeds, a stamp file is written in that
folder holding its fingerprint: a hash of its command, the text of the config files it reads,
the text of its code (every ``.py`` file under the folders it names, and any file it names), a
listing of its inputs (a file by its content; a folder by the relative path, size and mtime of
every file under it, not their content, to stay fast; stamp files left out) and the fingerprints
of the stages it follows (``after``; by default the one before it); the Python running it counts
by its version, not its path. A rerun skips a stage whose
stamp matches, so a changed config, code file or input (or a redone stage it follows) redoes it
and every stage that follows it.

A stage follows only the stages it reads (the demo's retrievers need the world, not the policy),
so a new policy does not redo the retrievers. Stages run one at a time: on 2 cores, the
retrievers on one thread beside the policy on two slowed the policy threefold (docs/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from common.io import atomic_write_json, run_lock


@dataclass
class Stage:
    name: str
    cmd: list[str]  # the command, run from the repository root
    output: Path  # folder the stage writes; holds the stamp
    configs: list[Path] = field(default_factory=list)  # files whose content is part of the fingerprint
    code: list[Path] = field(default_factory=list)  # source: a folder's .py files (content) or a file (content)
    inputs: list[Path] = field(default_factory=list)  # data read: a file (content) or a folder (paths, sizes, mtimes)
    after: tuple[str, ...] | None = None  # stages whose outputs it reads (None: the stage before it)


def stamp_path(stage: Stage) -> Path:
    return stage.output / f".stage-{stage.name}.json"


def _hash_file(h: "hashlib._Hash", path: Path) -> None:
    h.update(str(path).encode())
    h.update(path.read_bytes() if path.is_file() else b"<missing>")


def _hash_code(h: "hashlib._Hash", path: Path) -> None:
    """A file's content, or the content of every .py file under a folder (sorted by path)."""
    if not path.is_dir():
        return _hash_file(h, path)
    for f in sorted(path.rglob("*.py")):
        _hash_file(h, f)


def _hash_input(h: "hashlib._Hash", path: Path) -> None:
    """A file's content, or a folder's listing: relative path, size and mtime of each file under it."""
    if not path.is_dir():
        return _hash_file(h, path)
    h.update(f"{path}/".encode())
    for f in sorted(path.rglob("*")):
        if f.is_file() and not (f.name.startswith(".stage-") and f.name.endswith(".json")):
            st = f.stat()
            h.update(json.dumps([str(f.relative_to(path)), st.st_size, st.st_mtime_ns]).encode())


def _interpreter(arg: str) -> str:
    """This process's Python named by its version, not its path: a chain made with one clone's
    .venv (or before its folder moved) is still up to date under another with the same Python."""
    return f"<python {sys.version.split()[0]}>" if arg == sys.executable else arg


def fingerprint(stage: Stage, upstream: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([stage.name, [_interpreter(a) for a in stage.cmd], upstream]).encode())
    for cfg in stage.configs:
        _hash_file(h, Path(cfg))
    h.update(b"code")
    for code in stage.code:
        _hash_code(h, Path(code))
    h.update(b"inputs")
    for inp in stage.inputs:
        _hash_input(h, Path(inp))
    return h.hexdigest()


def is_done(stage: Stage, fp: str) -> bool:
    stamp = stamp_path(stage)
    try:
        return json.loads(stamp.read_text())["fingerprint"] == fp
    except (OSError, ValueError, KeyError):
        return False


def _follows(stages: list[Stage]) -> dict[str, tuple[str, ...]]:
    """Each stage's ``after``, the stage before it when not given; unknown or later names refused."""
    names = [s.name for s in stages]
    follows = {}
    for i, s in enumerate(stages):
        after = s.after if s.after is not None else tuple(names[i - 1: i])
        bad = [a for a in after if a not in names[:i]]
        if bad:
            raise ValueError(f"stage {s.name!r} follows {bad}: not among the stages before it")
        follows[s.name] = after
    return follows


def _redo(stages: list[Stage], force: bool, start: str | None) -> dict[str, bool]:
    """Which stages are redone whatever their stamps say: all with ``force``, from ``start`` on."""
    names = [s.name for s in stages]
    if start is not None and start not in names:
        raise ValueError(f"--from {start!r}: no such stage; stages are {names}")
    first = 0 if force else names.index(start) if start is not None else len(names)
    return {n: i >= first for i, n in enumerate(names)}


def _walk(stages: list[Stage], force: bool, start: str | None) -> Iterator[tuple[Stage, str, bool]]:
    """(stage, fingerprint, run?) one stage at a time; a stage runs when a stage it follows ran.
    A fingerprint is taken only when its stage is reached: iterated by ``run``, that is after the
    stages before it have written the inputs it reads (taken up front, a fresh chain would stamp
    the listing of folders not yet written, and the next run would redo everything)."""
    follows, redo = _follows(stages), _redo(stages, force, start)
    done: dict[str, tuple[str, bool]] = {}  # name -> (fingerprint, ran)
    for s in stages:
        after = follows[s.name]
        fp = fingerprint(s, "|".join(done[a][0] for a in after))
        todo = redo[s.name] or any(done[a][1] for a in after) or not is_done(s, fp)
        done[s.name] = (fp, todo)
        yield s, fp, todo


def plan(stages: list[Stage], force: bool = False, start: str | None = None) -> list[tuple[Stage, str, bool]]:
    """(stage, fingerprint, run?) for each stage, as things stand now."""
    return list(_walk(stages, force, start))


def run(stages: list[Stage], force: bool = False, start: str | None = None, lock: Path | None = None) -> None:
    """Run the stages that need it, in order; a failure exits with its code. With ``lock`` (the
    chain's folder), a second run that would rebuild the chain while one does stops with one line
    (common.io.run_lock); a run with nothing to do takes no lock, so studies can read one chain at once.
    The lock is taken at the first stage to run, so the chain is fingerprinted once."""
    with contextlib.ExitStack() as held:
        for stage, fp, todo in _walk(stages, force, start):
            if not todo:
                print(f"[{stage.name}] up to date, skipped ({stage.output})", flush=True)
                continue
            if lock is not None:  # taken once, held to the end
                held.enter_context(run_lock(lock))
                lock = None
            print(f"[{stage.name}] running: {' '.join(stage.cmd)}", flush=True)
            t0 = time.time()
            stamp_path(stage).unlink(missing_ok=True)
            result = subprocess.run(stage.cmd)
            if result.returncode != 0:
                print(f"[{stage.name}] failed (exit {result.returncode})", file=sys.stderr)
                raise SystemExit(result.returncode)
            stage.output.mkdir(parents=True, exist_ok=True)
            atomic_write_json(stamp_path(stage), {"fingerprint": fp, "seconds": round(time.time() - t0, 1)})
            print(f"[{stage.name}] done in {time.time() - t0:.0f} s", flush=True)
