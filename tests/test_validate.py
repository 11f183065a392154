"""``python -m data.validate``: problem lines, the JSON summary line, exit codes (run as a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures_data import (
    PATHOLOGY_MIXED, PREFERENCE_RECORDS, REPORT_RECORDS, RETRIEVAL_EXTRA, VQA_RECORDS, bad_images,
    good_images, write_json, write_jsonl,
)

REPO = Path(__file__).resolve().parents[1]


def run(*args) -> tuple[int, list[str], str]:
    proc = subprocess.run([sys.executable, "-m", "data.validate", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout.splitlines(), proc.stderr


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    good_images(root)
    bad_images(root / "bad")
    return root


def test_vqa_warning_for_a_non_yes_no_answer(tmp_path, root):
    path = write_jsonl(tmp_path / "v.jsonl", VQA_RECORDS)
    code, out, _ = run(path, "--image-root", root)
    assert code == 0
    assert out[:-1] == [f"{path}:3: yes/no question but the answer is 'Maybe'"]
    assert json.loads(out[-1]) == {"file": str(path), "kind": "vqa", "records": 3, "bad_records": 0,
                                   "images_checked": 0, "images_missing": 0, "images_unreadable": 0,
                                   "warnings": 1}


def test_retrieval_jsonl_reference_reports_checked(tmp_path, root):
    rows = [dict(VQA_RECORDS[0], **RETRIEVAL_EXTRA), dict(VQA_RECORDS[1], reference_reports="one text")]
    path = write_jsonl(tmp_path / "retrieved.jsonl", rows)
    code, out, _ = run(path, "--image-root", root)
    assert code == 0 and out[:-1] == [f"{path}:2: `reference_reports` is not a list of texts"]


def test_clean_files_with_all_images(tmp_path, root):
    for name, rows, write in [("r.json", REPORT_RECORDS + PATHOLOGY_MIXED, write_json),
                              ("p.json", PREFERENCE_RECORDS[:2], write_json)]:
        code, out, _ = run(write(tmp_path / name, rows), "--image-root", root, "--check-images")
        summary = json.loads(out[-1])
        assert code == 0 and out[:-1] == [] and summary["warnings"] == 0, out
        assert summary["images_checked"] == {"r.json": 7, "p.json": 2}[name]


def test_missing_and_unreadable_images_exit_1(tmp_path, root):
    rows = [dict(REPORT_RECORDS[1], id=str(i), image_path=f"bad/{name}")
            for i, name in enumerate(["missing.png", "truncated.jpg", "text.png"])]
    rows.append(dict(REPORT_RECORDS[1], id="up", image_path="../../etc/passwd"))
    rows.append(dict(REPORT_RECORDS[1], id="ok"))
    path = write_json(tmp_path / "r.json", rows)
    code, out, _ = run(path, "--image-root", root, "--check-images")
    assert code == 1
    summary = json.loads(out[-1])
    assert (summary["images_checked"], summary["images_missing"], summary["images_unreadable"]) == (5, 1, 3)
    problems = out[:-1]
    assert f"{path}:[3]: image refused:" in problems[0] and "outside the image root" in problems[0]
    assert problems[1].startswith(f"{path}:[0]: image missing: ") and "missing.png" in problems[1]
    assert problems[2].startswith(f"{path}:[1]: image unreadable: ") and "truncated.jpg" in problems[2]
    assert problems[3].startswith(f"{path}:[2]: image unreadable: ")


def test_preference_warnings(tmp_path, root):
    rows = PREFERENCE_RECORDS + [dict(PREFERENCE_RECORDS[0], id="p1", pair_type="xx", rejected_noised=0)]
    path = write_json(tmp_path / "p.json", rows)
    code, out, _ = run(path, "--image-root", root)
    assert code == 0 and json.loads(out[-1])["warnings"] == 4
    assert out[0] == f"{path}:[3]: pair_type 'xx' is not one of ('cm', 'oa1', 'oa2')"
    assert out[1] == f"{path}:[3]: chosen and rejected have the same text and image: the pair teaches nothing"
    assert out[2] == f"{path}:[3]: duplicate id 'p1' (first at {path}:[0])"
    assert "/nonexistent/authors/root" in out[3] and "does not exist on this machine" in out[3]


def test_every_bad_record_is_listed_and_exits_1(tmp_path, root):
    from tests.test_readers import iu_xray_quirk

    path = iu_xray_quirk(tmp_path / "iuxray_test.jsonl")
    code, out, _ = run(path, "--image-root", root)
    assert code == 1
    assert out[:2] == [f"{path}:3: no text: `question` is missing or empty",
                       f"{path}:6: no text: `question` is missing or empty"]
    summary = json.loads(out[-1])
    assert (summary["records"], summary["bad_records"]) == (5, 2)


def test_several_image_roots(tmp_path, root):
    """Two image sets: each image is found in the folder that holds it; a missing one is named
    under the first folder."""
    other = tmp_path / "iuxray"
    other.mkdir()
    (other / "only_here.png").write_bytes((root / "rgb.png").read_bytes())
    rows = [dict(REPORT_RECORDS[1], id="a", image_path="rgb.png"),
            dict(REPORT_RECORDS[1], id="b", image_path="only_here.png"),
            dict(REPORT_RECORDS[1], id="c", image_path="nowhere.png")]
    path = write_json(tmp_path / "r.json", rows)
    code, out, _ = run(path, "--image-root", root, "--image-root", other, "--check-images")
    summary = json.loads(out[-1])
    assert code == 1 and (summary["images_checked"], summary["images_missing"]) == (3, 1)
    assert out[:-1] == [f"{path}:[2]: image missing: {root / 'nowhere.png'}: missing"]


def test_malformed_file_exits_2_naming_the_line(tmp_path):
    path = tmp_path / "v.jsonl"
    path.write_text(json.dumps(VQA_RECORDS[0]) + "\n{not json\n")
    code, out, err = run(path)
    assert code == 2 and out == [] and f"{path}:2: not valid JSON" in err
    code, _, err = run(tmp_path / "absent.json")
    assert code == 2 and "does not exist" in err


def test_help():
    code, out, _ = run("--help")
    assert code == 0 and any("--check-images" in line for line in out) and any("Exit codes" in line for line in out)


def test_manifest_validates_every_file_of_a_world(tmp_path):
    from toy.make_toy import make_world

    root = make_world(tmp_path / "world", seed=0, size="tiny")
    r = subprocess.run([sys.executable, "-m", "data.validate", "--manifest", str(root / "manifest.json"),
                        "--check-images"], capture_output=True, text=True)
    summaries = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(summaries) == len(json.loads((root / "manifest.json").read_text())["files"])
    assert all(s["images_missing"] == 0 and s["images_unreadable"] == 0 for s in summaries)
