"""Per-run logging: ``metrics.jsonl`` (one JSON object per logged step or epoch) + TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from common.io import atomic_write_text


class MetricsLogger:
    """Appends metric rows to ``<out>/metrics.jsonl`` and mirrors scalars to TensorBoard.

    Only the main process should hold one (pass ``enabled=False`` elsewhere). A new run starts
    a new file. A run resumed from the checkpoint of step ``resumed_at`` keeps the rows up to that
    step and drops the later ones (logged before a crash, then redone), in TensorBoard too, so
    every step appears once.
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True,
                 resumed_at: int | None = None):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = [] if resumed_at is None else [r for r in _rows(self.path) if r.get("step", 0) <= resumed_at]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step drops the events of later steps the next time the writer logs
                purge = None if resumed_at is None else resumed_at + 1
                self._tb = SummaryWriter(str(Path(out_dir) / "tensorboard"), purge_step=purge)

    def log(self, row: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **row}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _rows(path: Path) -> list[dict[str, Any]]:
    """The rows of an earlier metrics file; a line cut by a crash mid-write is dropped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in rows if isinstance(r, dict)]
