"""pairs.release_sources: the release's alignment pairs back into query files (synthetic files only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.io import InputError
from data.readers import read_records
from data.records import ReportRecord, VqaRecord
from pairs.release_sources import ReleaseSourcesConfig, main, recover_question, run, template_regex
from policy.prompts import DEFAULT_PROMPTS, load_prompt_templates

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = load_prompt_templates(DEFAULT_PROMPTS)
REFS = ["Heart size normal.\nNo effusion.", "Small left effusion."]  # a reference of two lines
RAD_VQA = "training/alignment/radiology/radiology_vqa.json"
RAD_REPORT = "training/alignment/radiology/radiology_report.json"


def prompt(task: str, question: str | None, domain: str = "radiology") -> str:
    return TEMPLATES.text(domain, task, question, REFS)


def pair(image: str, text: str, chosen: str, rejected: str, pid: str = "", noised: int = 0) -> dict:
    human = {"from": "human", "value": f"<image>\n{text}"}
    return {"id": pid, "image": image, "conversations": [human, {"from": "gpt", "value": chosen}],
            "rejected_conversations": [human, {"from": "gpt", "value": rejected}], "rejected_noised": noised}


@pytest.fixture
def release(tmp_path) -> Path:
    """Radiology VQA and report alignment files; pathology and ophthalmology files are absent."""
    q = "Is there a pleural effusion?"
    vqa = [
        pair("iu/1.png", prompt("vqa", q), "Yes.", "Yes.", pid="7", noised=1),  # D_cm
        pair("iu/1.png", prompt("vqa", q), "Yes.", "No."),  # D_oa of the same question, no id
        pair("iu/2.png", prompt("vqa", "Is the heart enlarged?"), "No.", "Yes."),
        pair("iu/3.png", "Other wording here.\nQuestion: Is there a pneumothorax?", "No.", "Yes."),  # no match
        pair("iu/4.png", "Describe the image.", "Normal.", "Effusion."),  # no question at all
        {"id": "broken", "image": "iu/5.png", "conversations": []},  # a bad record
    ]
    report = [
        pair("mimic/a.jpg", prompt("report", None), "No acute findings.", "Effusion.", noised=1),
        pair("mimic/a.jpg", prompt("report", None), "No acute findings.", "Cardiomegaly."),
        pair("mimic/b.jpg", "Write a report.", "Clear lungs.", "Edema.", pid="r2"),  # no match
    ]
    for rel, rows in ((RAD_VQA, vqa), (RAD_REPORT, report)):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps(rows))
    return tmp_path


def test_template_regex_recovers_the_question():
    vqa = template_regex(TEMPLATES.tasks["vqa"].with_references)
    found = vqa.fullmatch(prompt("vqa", "Is there a mass?", domain="pathology"))
    assert found["question"] == "Is there a mass?" and "Small left effusion." in found["references"]
    report = template_regex(TEMPLATES.tasks["report"].with_references)
    assert report.fullmatch(prompt("report", "Describe the findings."))["question"] == "Describe the findings."
    assert vqa.fullmatch("Is there a mass?") is None
    assert recover_question("Intro.\nIs it?\nQuestion: Is there a mass?", vqa, "vqa", "") == (
        "Is there a mass?", "last_question_line")
    assert recover_question("Write.", report, "report", "Default.") == ("Default.", "default_question")
    assert recover_question("Describe.", vqa, "vqa", "") is None


def test_release_pairs_become_queries(release, tmp_path):
    out = tmp_path / "out"
    summary = run(ReleaseSourcesConfig(data_root=str(release), out=str(out), prompts=str(DEFAULT_PROMPTS)))
    vqa = read_records(out / "radiology_alignment_vqa.jsonl")
    assert all(isinstance(r, VqaRecord) for r in vqa)
    # the D_cm and D_oa pair of one question give one query, with the first pair's id
    assert [(r.id, r.question, r.answer, r.images) for r in vqa] == [
        ("7", "Is there a pleural effusion?", "Yes.", ["iu/1.png"]),
        (vqa[1].id, "Is the heart enlarged?", "No.", ["iu/2.png"]),
        (vqa[2].id, "Is there a pneumothorax?", "No.", ["iu/3.png"]),
    ]
    report = read_records(out / "radiology_alignment_report.json")
    assert all(isinstance(r, ReportRecord) for r in report)
    assert [(r.text, r.images) for r in report] == [("No acute findings.", ["mimic/a.jpg"]),
                                                    ("Clear lungs.", ["mimic/b.jpg"])]
    assert report[1].id == "r2"
    saved = json.loads((out / "sources.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    by_file = {Path(f["path"]).name: f for f in saved["files"]}
    v, r = by_file["radiology_vqa.json"], by_file["radiology_report.json"]
    assert (v["pairs"], v["queries"], v["question_from"]) == (
        5, 3, {"template": 3, "last_question_line": 1, "default_question": 0})
    assert v["bad_records"]["count"] == 2
    assert v["bad_records"]["records"][0].endswith("[5]: `conversations` needs a human turn followed by a gpt turn")
    assert "[4]: no question in the prompt" in v["bad_records"]["records"][1]
    assert (r["pairs"], r["queries"], r["question_from"]) == (
        3, 2, {"template": 2, "last_question_line": 0, "default_question": 1})
    # the absent files are named, the present ones still written
    assert saved["missing"] == ["training/alignment/pathology/pathology_vqa.json",
                                "training/alignment/ophthalmology/harvard_vqa.json",
                                "training/alignment/ophthalmology/harvard_report.json"]
    assert [(Path(o["path"]).name, o["role"], o["records"]) for o in saved["outputs"]] == [
        ("radiology_alignment_vqa.jsonl", "alignment_vqa", 3), ("radiology_alignment_report.json", "alignment_report", 2)]


def test_bad_record_error_stops(release, tmp_path):
    cfg = ReleaseSourcesConfig(data_root=str(release), out=str(tmp_path / "out"), prompts=str(DEFAULT_PROMPTS),
                               bad_record="error")
    with pytest.raises(InputError, match=r"radiology_vqa\.json:\[5\]: `conversations` needs"):
        run(cfg)
    path = release / RAD_VQA
    path.write_text(json.dumps(json.loads(path.read_text())[:5]))
    with pytest.raises(InputError, match=r"radiology_vqa\.json:\[4\]: no question"):
        run(cfg)
    assert not (tmp_path / "out" / "sources.json").exists()


def test_cli(release, tmp_path, capsys):
    main([f"--data_root={release}", f"--out={tmp_path / 'out'}", f"--prompts={DEFAULT_PROMPTS}", "--domains", "[radiology]"])
    printed = capsys.readouterr().out
    assert "radiology_vqa.json: 5 pairs -> 3 new queries" in printed and "missing" not in printed
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pairs.release_sources", "--data_root", str(empty), "--out",
                           str(tmp_path / "o2"), "--prompts", str(DEFAULT_PROMPTS)], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "none of the release's alignment files" in proc.stderr
