"""Top-k retrieval: our chunked search against the released MMed-RAG approach.

The anchor (retrieve_clip_report.py in the MMed-RAG release) holds one logits matrix of
queries x corpus in memory and takes its top-k; ours (retriever.index.topk_chunked) keeps one
(query chunk x corpus chunk) block. Both run on the same random unit vectors (200k-report
corpus, 5k queries, dimension 1024; ``quick``: 20k x 500 x 256), each in a fresh subprocess.

Memory is peak RSS measured by the kernel: after the inputs are made, the subprocess resets its
high-water mark (``/proc/self/clear_refs``) and reads ``VmHWM`` after the search; the figure is
that peak minus the RSS holding the inputs (identical for both), i.e. the search's own working
memory. Total peaks are given in the note. Top-k indices must be identical. Each method runs
twice, alternating, and its fastest run is kept (wall time; the machine may be shared).

    python -m benches.bench_retrieval [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {"full": (200_000, 5_000, 1024), "quick": (20_000, 500, 256)}
K = 10
REPEATS = 2  # alternating runs, the fastest of each kept (the machine may be shared)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _unit(n: int, d: int, seed: int):
    import torch

    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x.div_(x.norm(dim=1, keepdim=True))  # in place: no second copy in the peak


def worker(method: str, size: str, out: str) -> None:
    """Run one search in this (fresh) process; write time, memory and indices."""
    import torch

    n_c, n_q, d = SIZES[size]
    corpus, queries = _unit(n_c, d, 0), _unit(n_q, d, 1)
    base = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS high-water mark
    t0 = time.perf_counter()
    if method == "anchor":  # the released approach: full logits matrix, then top-k
        logits = queries @ corpus.T
        _, idx = logits.topk(K, dim=1)
        del logits
    else:
        from retriever.index import topk_chunked

        _, idx = topk_chunked(queries, corpus, K)
    seconds = time.perf_counter() - t0
    peak = _status_kb("VmHWM")
    torch.save(idx, out + ".pt")
    Path(out).write_text(json.dumps({"seconds": seconds, "extra_mb": (peak - base) / 1024, "peak_mb": peak / 1024, "inputs_mb": base / 1024}))


def _measure(method: str, size: str, tmp: str) -> dict:
    out = str(Path(tmp) / method)
    subprocess.run([sys.executable, "-m", "benches.bench_retrieval", "--worker", method, "--size", size, "--out", out], check=True)
    return json.loads(Path(out).read_text())


def run(quick: bool = False) -> list[dict]:
    import torch

    size = "quick" if quick else "full"
    n_c, n_q, d = SIZES[size]
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(_measure("ours", size, tmp), _measure("anchor", size, tmp)) for _ in range(REPEATS)]
        ours = min((r[0] for r in runs), key=lambda m: m["seconds"])
        anchor = min((r[1] for r in runs), key=lambda m: m["seconds"])
        same = torch.equal(torch.load(Path(tmp) / "ours.pt", weights_only=True), torch.load(Path(tmp) / "anchor.pt", weights_only=True))
    shape = f"{n_c // 1000}k corpus x {n_q} queries x {d}, top-{K}"
    return [
        {"benchmark": f"retrieval time ({shape})", "ours": ours["seconds"], "anchor": anchor["seconds"],
         "ratio": anchor["seconds"] / ours["seconds"], "unit": "s",
         "note": f"ratio = anchor/ours (>1: ours faster); identical top-{K} indices: {same}"},
        {"benchmark": f"retrieval peak memory ({shape})", "ours": ours["extra_mb"], "anchor": anchor["extra_mb"],
         "ratio": ours["extra_mb"] / anchor["extra_mb"], "unit": "MB",
         "note": (f"peak RSS over the inputs (VmHWM, fresh subprocess); ratio = ours/anchor (target < 0.1); "
                  f"total peaks {ours['peak_mb']:.0f} vs {anchor['peak_mb']:.0f} MB incl. {ours['inputs_mb']:.0f} MB of inputs")},
    ]


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", choices=["ours", "anchor"], help=argparse.SUPPRESS)
    ap.add_argument("--size", default="full", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.size, args.out)
    else:
        for row in run(args.quick):
            print(row)
