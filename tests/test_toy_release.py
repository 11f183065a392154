"""The toy world in the MMed-RAG release's layout: every file, the quirks, images found."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data.images import resolve_image
from data.readers import read_records
from data.release import RELEASE_FILES, image_search_path
from toy.make_toy import make_world
from toy.toy_release import BAD_IUXRAY_LINES, write_release

PROMPTS = Path(__file__).resolve().parent.parent / "configs" / "prompts" / "default.yaml"


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("release")
    world = make_world(base / "world", seed=0, size="tiny", progress=False)
    return write_release(world, base / "release", PROMPTS) and base / "release"


def test_every_release_file_is_written(release):
    for f in RELEASE_FILES:
        assert (release / "data" / f.path).is_file(), f.path
        assert read_records(release / "data" / f.path, kind=f.kind, bad_record="skip", skipped=[])


def test_iuxray_test_file_has_the_two_image_token_questions(release):
    lines = (release / "data/test/vqa/iuxray_test.jsonl").read_text().splitlines()
    bad = [n for n, ln in enumerate(lines, 1) if json.loads(ln)["question"] == "<image>"]
    assert bad == list(BAD_IUXRAY_LINES)
    assert all(json.loads(lines[n - 1])["answer"].endswith("?") for n in bad)


def test_alignment_files_are_released_style_pairs(release):
    rows = json.loads((release / "data/training/alignment/radiology/radiology_vqa.json").read_text())
    cm = [r for r in rows if r["rejected_noised"] == 1]
    oa = [r for r in rows if r["rejected_noised"] == 0]
    assert cm and oa
    assert all(r["id"] for r in cm) and not any(r["id"] for r in oa)
    assert all(r["conversations"][1]["value"] == r["rejected_conversations"][1]["value"] for r in cm)
    assert all(r["conversations"][1]["value"] != r["rejected_conversations"][1]["value"] for r in oa)
    assert all(r["conversations"][0]["value"].startswith("<image>\n") for r in rows)


def test_images_are_found_along_the_search_path(release):
    roots = image_search_path(release / "images")
    for f in RELEASE_FILES:
        rec = read_records(release / "data" / f.path, kind=f.kind, bad_record="skip", skipped=[])[0]
        rel = rec.image if f.kind == "preference" else (rec.images[0] if rec.images else rec.npz)
        assert resolve_image(rel, rec.image_root, roots).is_file(), (f.path, rel)
