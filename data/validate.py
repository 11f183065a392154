"""Check an annotation file before a run: ``python -m data.validate FILE [options]``.

Prints one problem per line (``FILE:LINE: ...``), then, as the last line, a JSON summary:
{"file", "kind", "records", "bad_records", "images_checked", "images_missing", "images_unreadable",
"warnings"}. ``records`` counts the usable records; every bad record (one that parses but cannot
be used, data.readers) is listed.

Exit codes: 0 the file reads (warnings allowed), 1 some records are bad, or some images are
missing or unreadable (with --check-images), 2 the file cannot be read at all (the message names
FILE:LINE).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tqdm import tqdm

from common.config import cli_main
from data.answers import is_yes_no_question, yes_no
from data.images import BadImageError, Roots, inside_root, load_image, pick_root
from data.readers import read_records
from data.records import DOMAINS, PreferenceRecord, Record, ReportRecord, VqaRecord

PAIR_TYPES = ("cm", "oa1", "oa2")
TASKS = ("vqa", "report")


def record_warnings(rec: Record) -> Iterator[str]:
    """What is suspicious (not invalid) in one record."""
    refs = rec.meta.get("reference_reports")  # retrieval JSONL (contract 2)
    if refs is not None and not (isinstance(refs, list) and all(isinstance(t, str) for t in refs)):
        yield "`reference_reports` is not a list of texts"
    if isinstance(rec, VqaRecord):
        if not rec.answer:
            yield "no answer"
        elif is_yes_no_question(rec.question) and yes_no(rec.answer) == "other":
            yield f"yes/no question but the answer is {rec.answer!r:.60}"
    elif isinstance(rec, PreferenceRecord):
        if rec.pair_type is not None and rec.pair_type not in PAIR_TYPES:
            yield f"pair_type {rec.pair_type!r} is not one of {PAIR_TYPES}"
        if rec.task is not None and rec.task not in TASKS:
            yield f"task {rec.task!r} is not one of {TASKS}"
        if rec.domain is not None and rec.domain not in DOMAINS:
            yield f"domain {rec.domain!r} is not one of {DOMAINS}"
        same_image = not (rec.rejected_noised or rec.rejected_image or rec.chosen_noised)
        if rec.chosen == rec.rejected and same_image:
            yield "chosen and rejected have the same text and image: the pair teaches nothing"


def image_refs(rec: Record) -> list[str]:
    """Every image file a record uses (all views, the .npz, a stored rejected image)."""
    if isinstance(rec, PreferenceRecord):
        return [rec.image] + ([rec.rejected_image] if rec.rejected_image else [])
    if isinstance(rec, ReportRecord) and not rec.images:
        return [rec.npz]
    return list(rec.images)


def _check(path: str, npz_key: str | None) -> BadImageError | None:
    try:
        load_image(path, npz_key)
    except BadImageError as e:
        return e
    return None


def check_images(
    records: list[Record], image_root: Roots, npz_key: str | None
) -> tuple[list[str], dict[str, int]]:
    """Decode every distinct image once (threads: PIL decodes outside the GIL)."""
    first_use: dict[str, str] = {}  # resolved path -> where it is first used
    problems: list[str] = []
    counts = {"images_checked": 0, "images_missing": 0, "images_unreadable": 0}
    for rec in records:
        for rel in image_refs(rec):
            try:
                full = inside_root(rel, pick_root(rec.image_root, image_root, rel))
                first_use.setdefault(str(full), rec.source)
            except BadImageError as e:
                counts["images_checked"] += 1
                counts["images_unreadable"] += 1
                problems.append(f"{rec.source}: image refused: {e}")
    paths = list(first_use)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = pool.map(_check, paths, [npz_key] * len(paths), chunksize=64)
        for path, err in zip(paths, tqdm(results, total=len(paths), desc="images", file=sys.stderr,
                                         disable=len(paths) < 1000)):
            counts["images_checked"] += 1
            if err is None:
                continue
            missing = err.reason == "missing"
            counts["images_missing" if missing else "images_unreadable"] += 1
            what = "missing" if missing else "unreadable"
            problems.append(f"{first_use[path]}: image {what}: {err}")
    return problems, counts


class _Collect(logging.Handler):
    """Turns the data layer's logged warnings (e.g. a missing image_root) into problem lines."""

    def __init__(self, lines: list[str], prefix: str):
        super().__init__(logging.WARNING)
        self.lines, self.prefix = lines, prefix

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{self.prefix}: {record.getMessage()}")


@contextlib.contextmanager
def _collected(lines: list[str], prefix: str) -> Iterator[None]:
    """data.images' warnings go to ``lines`` instead of the log while the block runs."""
    images_log = logging.getLogger("data.images")
    handler = _Collect(lines, prefix)
    images_log.addHandler(handler)
    images_log.propagate = False
    try:
        yield
    finally:
        images_log.removeHandler(handler)
        images_log.propagate = True


def validate(
    path: str, kind: str | None, image_root: Roots, images: bool, npz_key: str | None
) -> tuple[list[str], dict[str, Any]]:
    """(problem lines, summary) for one file; InputError if the file cannot be read at all."""
    bad: list[str] = []
    root_warnings: list[str] = []  # a missing image_root
    problems: list[str] = []
    counts = {"images_checked": 0, "images_missing": 0, "images_unreadable": 0}
    with _collected(root_warnings, path):
        records = read_records(path, kind=kind, default_image_root=image_root, skipped=bad)
        for root in {r.image_root for r in records}:
            pick_root(root, image_root)
        if images:
            problems, counts = check_images(records, image_root, npz_key)
    warnings: list[str] = []
    seen: dict[str, str] = {}
    for rec in records:
        warnings.extend(f"{rec.source}: {w}" for w in record_warnings(rec))
        if not _own_id(rec):
            continue
        if (first := seen.setdefault(rec.id, rec.source)) != rec.source:
            warnings.append(f"{rec.source}: duplicate id {rec.id!r} (first at {first})")
    warnings += root_warnings
    names = {ReportRecord: "report", VqaRecord: "vqa", PreferenceRecord: "preference"}
    summary = {
        "file": path,
        "kind": kind or (names[type(records[0])] if records else None),
        "records": len(records),
        "bad_records": len(bad),
        **counts,
        "warnings": len(warnings),
    }
    return bad + warnings + problems, summary


def _own_id(rec: Record) -> bool:
    """Whether the id comes from the file: the pairs of one question share a derived id."""
    return not isinstance(rec, PreferenceRecord) or rec.raw.get("id") not in (None, "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data.validate",
        description="Check an MMed-RAG annotation file (report JSON, VQA JSONL, preference "
        "JSON, retrieval JSONL). Prints problems as FILE:LINE: ..., then a JSON summary as the "
        "last line.",
        epilog="Exit codes: 0 readable (warnings allowed); 1 bad records, or images missing or "
        "unreadable (--check-images); 2 a file that cannot be read at all.",
    )
    parser.add_argument("file", nargs="?", help="annotation file (JSON list or JSONL)")
    parser.add_argument("--manifest", help="instead of FILE: every file a world's manifest.json "
                        "lists, each with its own image root (one summary line per file)")
    parser.add_argument("--kind", choices=["report", "vqa", "preference"],
                        help="record kind; default: told by the first record's keys")
    parser.add_argument("--image-root", action="append", help="folder image paths are relative "
                        "to (also the fallback for per-record image_root folders that do not exist "
                        "here); repeat it for several image sets: each image is taken from the "
                        "first folder that holds it")
    parser.add_argument("--check-images", action="store_true",
                        help="open and fully decode every distinct image the file uses")
    parser.add_argument("--npz-key", help="array name inside .npz images (default: the first "
                        "2-D or HxWx3 array)")
    args = parser.parse_args(argv)
    if (args.file is None) == (args.manifest is None):
        parser.error("give either FILE or --manifest")
    jobs = [(args.file, args.image_root)]
    if args.manifest:
        root = os.path.dirname(os.path.abspath(args.manifest))
        with open(args.manifest, encoding="utf-8") as f:
            entries = json.load(f)["files"]
        jobs = [(os.path.join(root, e["path"]), [os.path.join(root, e["image_root"])]) for e in entries]
    code = 0
    for path, image_root in jobs:
        lines, summary = validate(path, args.kind, image_root, args.check_images, args.npz_key)
        for line in lines:
            print(line)
        print(json.dumps(summary))
        problems = summary["bad_records"] or summary["images_missing"] or summary["images_unreadable"]
        code = max(code, 1 if problems else 0)
    return code


if __name__ == "__main__":
    cli_main(lambda: sys.exit(main()))
