"""Checkpoint manager: `latest` and `best` with rotation, atomic saves, exact resume.

The state itself (model or adapter weights in safetensors, optimizer, scheduler, grad scaler,
RNG of every process, DeepSpeed shards) is written and read by ``accelerator.save_state`` /
``load_state``, which load with ``weights_only=True``. What this module adds is what accelerate
leaves to the caller: a step folder appears only once complete (written under a temporary name,
renamed by the main process), ``latest``/``best`` are small pointer files replaced atomically,
old folders are rotated away (never the best), and a trainer-state JSON (epoch, step, metric,
anything the trainer wants back) travels with each folder.

Every trainer (common.engine, retriever.finetune_clip) writes the same trainer state:
``{"epoch", "batches_in_epoch", "metrics"}`` (the epoch being run, the batches of it already
consumed, the evaluation this checkpoint was judged by) plus ``"step"`` and ``"metric"``, added
here.

Layout::

    <root>/step-00000120/   accelerate state + trainer_state.json (+ exported files)
    <root>/latest.json      {"name": "step-00000120", "step": 120}
    <root>/best.json        {"name": "step-00000080", "step": 80, "metric": 0.71}
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from common.io import InputError, atomic_write_json

STATE_FILE = "trainer_state.json"
LOW_DISK_BYTES = 64 << 20  # a failed save with less free space than this is taken for a full disk


class CheckpointManager:
    """Saves and finds checkpoints under ``root``; all processes call ``save``/``load``."""

    def __init__(self, root: str | Path, keep: int = 2, higher_is_better: bool = True):
        self.root = Path(root)
        self.keep = max(1, keep)
        self.higher_is_better = higher_is_better

    def _pointer(self, which: str) -> dict[str, Any] | None:
        path = self.root / f"{which}.json"
        if not path.is_file():
            return None
        info = json.loads(path.read_text())
        return info if (self.root / info["name"] / STATE_FILE).is_file() else None

    def resolve(self, spec: str | Path | None) -> Path | None:
        """``"latest"`` / ``"best"`` / a folder path -> the checkpoint folder, or None if absent."""
        if spec in (None, "", "none"):
            return None
        if spec in ("latest", "best"):
            info = self._pointer(str(spec))
            return self.root / info["name"] if info else None
        path = Path(spec)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{path}: not a checkpoint folder (no {STATE_FILE})")
        return path

    def _is_better(self, metric: float) -> bool:
        best = self._pointer("best")
        if best is None or best.get("metric") is None:
            return True
        return metric > best["metric"] if self.higher_is_better else metric < best["metric"]

    def save(
        self,
        accelerator: Any,
        step: int,
        trainer_state: dict[str, Any],
        metric: float | None = None,
        export: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write a complete checkpoint for ``step``; returns its folder.

        ``export(folder)`` runs on the main process before the rename, for files a user loads
        directly (e.g. open_clip weights, a PEFT adapter), so they are never seen half-written.
        """
        name = f"step-{step:08d}"
        final = self.root / name
        tmp = self.root / f".{name}.tmp"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(tmp))
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                if export is not None:
                    export(tmp)
                atomic_write_json(tmp / STATE_FILE, {**trainer_state, "step": step, "metric": metric})
        except Exception as e:  # noqa: BLE001 - whatever failed, the partial checkpoint must go
            free = shutil.disk_usage(self.root).free  # before the partial checkpoint is removed
            shutil.rmtree(tmp, ignore_errors=True)
            # torch reports a full disk as a RuntimeError ("unexpected pos"), safetensors as a
            # SafetensorError: told apart from other failures by the free space left
            code = e.errno if isinstance(e, OSError) else errno.ENOSPC if free < LOW_DISK_BYTES else None
            if not code:
                raise
            raise OSError(code, f"{os.strerror(code)}: checkpoint of step {step} not written "
                                f"({free} bytes free; {e})", str(tmp)) from e
        if accelerator.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            atomic_write_json(self.root / "latest.json", {"name": name, "step": step})
            if metric is not None and self._is_better(metric):
                atomic_write_json(self.root / "best.json", {"name": name, "step": step, "metric": metric})
            self._rotate()
        accelerator.wait_for_everyone()
        return final

    def clear(self) -> int:
        """Remove every checkpoint and pointer (main process): a fresh run into a folder that holds
        an earlier run's checkpoints would otherwise be judged against its `best` and rotate
        around its steps. Returns how many checkpoint folders went."""
        steps = [p for p in self.root.glob("step-*") if p.is_dir()] if self.root.is_dir() else []
        for path in [*steps, *self.root.glob(".step-*.tmp")]:
            shutil.rmtree(path, ignore_errors=True)
        for which in ("latest", "best"):
            (self.root / f"{which}.json").unlink(missing_ok=True)
        return len(steps)

    def roll_back(self, step: int) -> Path | None:
        """Remove the checkpoints after ``step`` (a diverged run's) and point ``latest`` at the newest
        that is left, ``best`` (if it pointed at a removed one) at the best left; returns the newest
        left. Main process only."""
        best_name = (self._pointer("best") or {}).get("name")
        steps = sorted(p for p in self.root.glob("step-*") if p.is_dir() and (p / STATE_FILE).is_file())
        for path in [p for p in steps if int(p.name.split("-")[1]) > step]:
            shutil.rmtree(path)
        kept = [p for p in steps if int(p.name.split("-")[1]) <= step]
        if not kept:
            for which in ("latest", "best"):
                (self.root / f"{which}.json").unlink(missing_ok=True)
            return None
        atomic_write_json(self.root / "latest.json", {"name": kept[-1].name, "step": int(kept[-1].name.split("-")[1])})
        if best_name and not (self.root / best_name).is_dir():
            (self.root / "best.json").unlink()
            for folder in kept:
                state = json.loads((folder / STATE_FILE).read_text())
                if state.get("metric") is not None and self._is_better(state["metric"]):
                    atomic_write_json(self.root / "best.json", {"name": folder.name, "step": state["step"],
                                                                "metric": state["metric"]})
            if self._pointer("best") is None:
                self.mark_best(kept[-1])
        return kept[-1]

    def mark_best(self, folder: Path) -> None:
        """Point ``best`` at ``folder`` with no metric: a run that could not validate still names its
        final weights; any measured checkpoint replaces it. Main process only."""
        step = json.loads((folder / STATE_FILE).read_text()).get("step")
        atomic_write_json(self.root / "best.json", {"name": folder.name, "step": step, "metric": None})

    def _rotate(self) -> None:
        protected = {p["name"] for p in (self._pointer("latest"), self._pointer("best")) if p}
        steps = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in steps[: max(0, len(steps) - self.keep)]:
            if old.name not in protected:
                shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(".step-*.tmp"):  # left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)

    def load(self, accelerator: Any, spec: str | Path) -> dict[str, Any]:
        """Restore accelerate state from ``spec`` and return its trainer state."""
        folder = self.resolve(spec)
        if folder is None:
            raise FileNotFoundError(f"{self.root}: no '{spec}' checkpoint to resume from")
        _check_rng_state(folder / f"random_states_{accelerator.process_index}.pkl")
        accelerator.load_state(str(folder))
        return json.loads((folder / STATE_FILE).read_text())


def _check_rng_state(path: Path) -> None:
    """Refuse an unreadable RNG file: accelerate would log it at info level and resume with the
    wrong random state, so the run would silently not continue exactly."""
    from accelerate.utils import load

    if not path.is_file():
        return
    try:
        load(path)  # accelerate's own reader: weights_only=True with numpy's RNG types allowed
    except Exception as e:  # noqa: BLE001 - unpickling fails in many ways; each one means the same
        raise InputError(
            f"{path}: unreadable RNG state ({type(e).__name__}); resuming would not repeat the run "
            "exactly. Delete the file to resume with a fresh random state."
        ) from None
