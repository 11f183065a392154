"""One writer per run folder (common.io.run_lock): a live holder refuses a second run at once, a
killed one blocks nobody, a clean exit leaves nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.io import LOCK_FILE, InputError, run_lock

ROOT = Path(__file__).resolve().parent.parent
HOLD = "import sys, time; from common.io import run_lock\nwith run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)"


def holder(folder: Path) -> subprocess.Popen:
    """Another process holding the lock of ``folder`` (returns once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_while_the_first_lives(tmp_path):
    proc = holder(tmp_path / "run")
    try:
        start = time.monotonic()
        with pytest.raises(InputError, match=rf"{tmp_path / 'run'}: another run is writing here \(pid {proc.pid} "):
            with run_lock(tmp_path / "run"):
                pass
        assert time.monotonic() - start < 5  # at once, no waiting
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_writers_lock_blocks_nobody(tmp_path):
    proc = holder(tmp_path / "run")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "run" / LOCK_FILE).exists()  # left behind, but its flock died with the process
    with run_lock(tmp_path / "run"):
        (tmp_path / "run" / "out.txt").write_text("x")
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    assert (tmp_path / "run" / "out.txt").exists()


def test_clean_exit_leaves_nothing_and_nesting_is_allowed(tmp_path):
    with run_lock(tmp_path / "new"):
        assert (tmp_path / "new" / LOCK_FILE).is_file()
        with run_lock(tmp_path / "new"):  # the same process again (a stage calling another stage's code)
            pass
        assert (tmp_path / "new" / LOCK_FILE).is_file()
    assert not (tmp_path / "new").exists()  # made by the lock and left empty: removed
    with run_lock(tmp_path / "other", enabled=False):  # a non-main process of a distributed run
        pass
    assert not (tmp_path / "other").exists()
    with run_lock(tmp_path / "a" / "b" / "c"):  # e.g. a CLIP domain folder under a new output folder
        pass
    assert not (tmp_path / "a").exists()
