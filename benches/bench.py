"""Run every benchmark (benches/bench_*.py, each with ``run(quick) -> list[row]``) and write
benches/RESULTS.md: benchmark, ours, anchor, ratio, machine. Never part of the test suite.

Usage: python -m benches.bench [--quick] [--only NAME ...]

``--only`` reruns the named benchmarks and keeps the other rows of the existing file (a row is
known by its benchmark name: a rerun row replaces the old one in place, a new one is appended).
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import time
import traceback
from pathlib import Path

from common.io import atomic_write_text

HERE = Path(__file__).parent


def machine() -> str:
    import torch

    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {'CUDA' if torch.cuda.is_available() else 'CPU'}"


def fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))


def merged_rows(path: Path, new: list[str]) -> list[str]:
    """The table rows of ``path`` with ``new`` rows replacing those of the same benchmark name
    (in place) and the others appended."""
    def name(row: str) -> str:
        return row.split("|")[1].strip()

    old = [line for line in path.read_text(encoding="utf-8").splitlines()
           if line.startswith("| ") and not line.startswith("| benchmark |")] if path.is_file() else []
    fresh = {name(r): r for r in new}
    kept = [fresh.pop(name(r), r) for r in old]
    return kept + [r for r in new if name(r) in fresh]


def text_after_table(path: Path) -> list[str]:
    """The lines of ``path`` after its table (notes on earlier runs), kept by ``--only``."""
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    last = max((i for i, line in enumerate(lines) if line.startswith("|")), default=len(lines))
    return lines[last + 1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    ap.add_argument("--only", nargs="*", default=None,
                    help="module names (e.g. bench_retrieval); the file's other rows are kept")
    ap.add_argument("--out", default=str(HERE / "RESULTS.md"))
    args = ap.parse_args()
    names = sorted(p.stem for p in HERE.glob("bench_*.py"))
    if args.only:
        names = [n for n in names if n in args.only]
    rows, failed = [], []
    for name in names:
        t0 = time.time()
        print(f"== {name}", flush=True)
        try:
            got = importlib.import_module(f"benches.{name}").run(quick=args.quick)
        except Exception:  # one broken benchmark must not lose the others' figures
            traceback.print_exc()
            failed.append(name)
            continue
        for r in got:
            print("  ", {k: fmt(v) for k, v in r.items()}, flush=True)
        rows += got
        print(f"   ({time.time() - t0:.0f} s)", flush=True)
    m = machine()
    table = [
        f"| {r['benchmark']} | {fmt(r.get('ours'))} | {fmt(r.get('anchor'))} | {fmt(r.get('ratio'))} "
        f"| {r.get('unit', '')} | {m} | {r.get('note', '')} |"
        for r in rows
    ]
    if args.only:
        table = merged_rows(Path(args.out), table)
    lines = [
        "# Benchmark results",
        "",
        f"Written by `bash scripts/bench.sh`{' --quick' if args.quick else ''}"
        f"{' --only ' + ' '.join(names) if args.only else ''} on {time.strftime('%Y-%m-%d')}"
        f"{' (the other rows are from earlier runs)' if args.only else ''}. "
        "Ratios are ours against the anchor measured in the same run (see each row's note for the direction).",
        "",
        "| benchmark | ours | anchor | ratio | unit | machine | note |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += table
    if args.only:
        lines += [line for line in text_after_table(Path(args.out)) if not line.startswith("Failed: ")]
    if failed:
        lines += ["", f"Failed: {', '.join(failed)} (see the run's output)."]
    atomic_write_text(args.out, "\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
