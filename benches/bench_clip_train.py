"""CLIP fine-tuning throughput: ours (retriever.finetune_clip) against open_clip's own trainer.

The anchor is ``open_clip_train.main`` (shipped in open_clip_torch; its imports need the
``[training]`` extra's ``braceexpand`` and ``webdataset``), run from a three-line wrapper that
registers our tiny model config first, with ``--dataset-type csv --device cpu``. Both train the
same model (toy-clip), on the same toy data (one domain's retriever_train pairs, exported to
open_clip's CSV format), with the same batch size, precision (fp32), optimizer settings, one
process and no loader workers.

Throughput is samples per second of training alone: each trainer runs for E1 and E2 epochs in
fresh subprocesses and the time difference covers (E2 - E1) epochs, so start-up, the epoch-0
validation (ours), and the final checkpoint (both) cancel out.

    python -m benches.bench_clip_train [--quick]
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DOMAIN = "pathology"
BATCH = 64
LR, WD, WARMUP = 5e-4, 0.1, 10
WRAPPER = "import sys, open_clip; open_clip.add_model_config(sys.argv[1]); from open_clip_train.main import main; main(sys.argv[2:])"


def _world(tmp: Path, quick: bool) -> Path:
    """The default toy world if it exists, else a fresh one in ``tmp``."""
    default = Path("outputs/toy/world")
    if (default / "manifest.json").is_file():
        return default
    from toy.make_toy import make_world

    return make_world(tmp / "world", size="tiny" if quick else "small", progress=False)


def export_csv(world: Path, out: Path) -> int:
    """One row per (image view, report) of the domain's retriever_train files; returns the row count."""
    from data.images import resolve_image
    from retriever.clip_data import DataSpec

    rows = [(str(resolve_image(view, r.image_root, root)), r.text)
            for r, root in DataSpec(world=str(world)).records(DOMAIN, "retriever_train") for view in r.images]
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["filepath", "title"])
        w.writerows(rows)
    return len(rows)


def _timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def ours(world: Path, tmp: Path, epochs: int) -> float:
    return _timed([
        sys.executable, "-m", "retriever.finetune_clip", "configs/toy/clip.yaml", "--data.world", str(world),
        "--domains", f"[{DOMAIN}]", "--output_dir", str(tmp / f"ours{epochs}"), "--epochs", str(epochs),
        "--val_every", "1000", "--domain_classifier", "false", "--batch_size", str(BATCH),
        "--optim.lr", str(LR), "--optim.weight_decay", str(WD), "--optim.warmup_steps", str(WARMUP),
        "--num_workers", "0", "--log_every", "1000",  # mixed_precision: "no" (the toy config)
    ])


def anchor(config: Path, data: Path, tmp: Path, epochs: int) -> float:
    return _timed([
        sys.executable, "-c", WRAPPER, str(config), "--dataset-type", "csv", "--train-data", str(data),
        "--csv-img-key", "filepath", "--csv-caption-key", "title", "--csv-separator", "\t",
        "--model", config.stem, "--batch-size", str(BATCH), "--epochs", str(epochs), "--lr", str(LR), "--wd", str(WD),
        "--warmup", str(WARMUP), "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6", "--grad-clip-norm", "1.0",
        "--precision", "fp32", "--workers", "0", "--device", "cpu", "--seed", "0", "--report-to", "",
        "--logs", str(tmp / "anchor_logs"), "--name", f"run{epochs}", "--log-every-n-steps", "1000",
    ])


def run(quick: bool = False) -> list[dict]:
    from retriever.model import TOY_CONFIG, TOY_MODEL

    e1, e2 = (1, 2) if quick else (1, 4)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        world = _world(tmp, quick)
        data = tmp / "train.csv"
        n = export_csv(world, data)
        config = tmp / f"{TOY_MODEL}.json"
        config.write_text(__import__("json").dumps(TOY_CONFIG))
        steps = n // BATCH  # both drop the last partial batch
        t_ours = ours(world, tmp, e2) - ours(world, tmp, e1)
        t_anchor = anchor(config, data, tmp, e2) - anchor(config, data, tmp, e1)
    samples = (e2 - e1) * steps * BATCH
    ours_sps, anchor_sps = samples / t_ours, samples / t_anchor
    return [{
        "benchmark": f"CLIP fine-tuning throughput (toy-clip, batch {BATCH}, fp32, 1 process, {DOMAIN} toy pairs)",
        "ours": ours_sps, "anchor": anchor_sps, "ratio": ours_sps / anchor_sps, "unit": "samples/s",
        "note": f"anchor: open_clip_train.main (csv, --device cpu); ratio = ours/anchor (target >= 1); "
                f"{e2 - e1} epochs of {steps} steps timed as the difference of {e2}- and {e1}-epoch runs",
    }]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    for row in run(ap.parse_args().quick):
        print(row)
