"""Readers: every annotation variant reads into records; malformed input names FILE:LINE."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from common.io import InputError
from data import readers
from data.readers import detect_kind, read_records
from data.records import PreferenceRecord, ReportRecord, VqaRecord
from tests.fixtures_data import (
    PATHOLOGY_MIXED, PREFERENCE_RECORDS, REPORT_RECORDS, RETRIEVAL_EXTRA, VQA_RECORDS, write_json,
    write_jsonl,
)


def test_report_variants(tmp_path):
    path = write_json(tmp_path / "train.json", REPORT_RECORDS)
    iu, mimic, harvard = read_records(path)
    assert isinstance(iu, ReportRecord) and iu.images == ["rgb.png", "gray.png"]
    assert iu.text == "The heart is normal. No effusion." and iu.meta == {"split": "train"}
    assert iu.source == f"{path}:[0]" and iu.raw is not None and iu.raw["id"] == "iu-1"
    assert mimic.images == ["rgba.png"] and mimic.meta["study_id"] == 5 and mimic.meta["subject_id"] == 9
    assert harvard.images == [] and harvard.npz == "fundus.npz" and harvard.meta["filename"] == "fundus.npz"


def test_mixed_pathology_file(tmp_path):
    pmc, quilt, quilt_summary = read_records(write_json(tmp_path / "path.json", PATHOLOGY_MIXED))
    assert (pmc.text, pmc.images) == ("Tumour cells in sheets.", ["palette.png"])
    assert (quilt.text, quilt.images) == ("Granuloma with giant cells.", ["cmyk.jpg"])
    assert quilt.meta == {"metadata": {"source": "youtube"}}
    # empty `caption`/`report` and empty `image` fall through to `gpt4_summary` and `image_path`
    assert (quilt_summary.text, quilt_summary.images) == ("Necrosis.", ["rgb.jpg"])


def test_vqa_jsonl_strips_image_marker_and_keeps_extras(tmp_path):
    recs = read_records(write_jsonl(tmp_path / "test.jsonl", VQA_RECORDS))
    assert all(isinstance(r, VqaRecord) for r in recs)
    assert [r.question for r in recs] == ["Is there pleural effusion?", "Is the heart enlarged?",
                                          "Are the lungs clear?"]
    assert [r.id for r in recs] == ["1", "2", "q3"]
    assert recs[0].meta == {"text": "extra"} and recs[0].report == "Small effusion."
    assert recs[2].answer == "Maybe"  # not a yes/no answer: readers do not judge answers
    assert recs[1].source == f"{tmp_path / 'test.jsonl'}:2"


def test_retrieval_jsonl_reads_as_base_kind(tmp_path):
    rows = [dict(r, **RETRIEVAL_EXTRA) for r in VQA_RECORDS]
    recs = read_records(write_jsonl(tmp_path / "retrieved.jsonl", rows))
    assert all(isinstance(r, VqaRecord) for r in recs)
    for key, value in RETRIEVAL_EXTRA.items():
        assert recs[0].meta[key] == value
    report_rows = [dict(r, **RETRIEVAL_EXTRA) for r in REPORT_RECORDS]
    (rec, *_) = read_records(write_jsonl(tmp_path / "retrieved_report.jsonl", report_rows))
    assert isinstance(rec, ReportRecord) and rec.meta["retrieve_k"] == 2


def test_preference_json(tmp_path):
    p1, p2, p3 = read_records(write_json(tmp_path / "pairs.json", PREFERENCE_RECORDS))
    assert isinstance(p1, PreferenceRecord)
    assert (p1.prompt, p1.chosen, p1.rejected, p1.rejected_noised) == ("Is there effusion?", "Yes.", "Yes.", True)
    assert (p1.pair_type, p1.domain, p1.task) == ("cm", "radiology", "vqa")
    assert (p2.rejected, p2.rejected_noised, p2.chosen_noised) == ("Effusion.", False, False)
    assert p3.rejected_image == "palette.png" and p3.image_root == "/nonexistent/authors/root"


def test_detect_kind(tmp_path):
    assert detect_kind(write_json(tmp_path / "r.json", REPORT_RECORDS)) == "report"
    assert detect_kind(write_jsonl(tmp_path / "v.jsonl", VQA_RECORDS)) == "vqa"
    assert detect_kind(PREFERENCE_RECORDS) == "preference"
    assert detect_kind(PATHOLOGY_MIXED[1]) == "report"
    with pytest.raises(InputError, match="cannot tell the kind"):
        detect_kind({"foo": 1})


def test_kind_override(tmp_path):
    # VQA records carry `report` and `image`: read as report records on request
    recs = read_records(write_jsonl(tmp_path / "v.jsonl", VQA_RECORDS), kind="report")
    assert isinstance(recs[0], ReportRecord) and recs[0].text == "Small effusion."
    with pytest.raises(InputError, match="unknown kind"):
        read_records(tmp_path / "v.jsonl", kind="images")


def test_default_image_root_only_fills_records_without_one(tmp_path):
    recs = read_records(write_json(tmp_path / "p.json", PREFERENCE_RECORDS), default_image_root=tmp_path)
    assert [r.image_root for r in recs] == [str(tmp_path), str(tmp_path), "/nonexistent/authors/root"]


def test_several_default_roots_pick_the_folder_holding_the_image(tmp_path):
    mimic, iu = tmp_path / "mimic", tmp_path / "iu"
    mimic.mkdir()
    iu.mkdir()
    (iu / "gray.png").touch()
    (mimic / "gray.png").touch()
    (iu / "palette.png").touch()
    roots = [str(mimic), str(iu)]
    recs = read_records(write_json(tmp_path / "p.json", PREFERENCE_RECORDS), default_image_root=roots)
    # p1 (rgb.png) is nowhere: the first folder; p2 in both: the first; p3's own root is missing here
    assert [r.image_root for r in recs] == [str(mimic), str(mimic), str(mimic)]
    rows = [dict(PREFERENCE_RECORDS[0], image="palette.png"), dict(PREFERENCE_RECORDS[1], image_root=str(iu))]
    recs = read_records(write_json(tmp_path / "q.json", rows), default_image_root=roots)
    assert [r.image_root for r in recs] == [str(iu), str(iu)]


def test_a_relative_image_root_is_taken_beside_the_file(tmp_path):
    rows = [dict(PREFERENCE_RECORDS[0], image_root="../images"), dict(PREFERENCE_RECORDS[0], image_root="/abs/root")]
    (tmp_path / "run").mkdir()
    recs = read_records(write_json(tmp_path / "run" / "p.json", rows), default_image_root="/configured")
    assert [r.image_root for r in recs] == [str(tmp_path / "images"), "/abs/root"]


def test_repeated_values_are_stored_once(tmp_path):
    rows = [dict(VQA_RECORDS[0], question_id=i) for i in range(3)]
    recs = read_records(write_jsonl(tmp_path / "v.jsonl", rows))
    assert recs[0].report is recs[2].report and recs[0].images[0] is recs[2].images[0]
    assert recs[2].raw["report"] is recs[2].report


def test_blank_lines_bom_and_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "_CHUNK_BYTES", 64)  # many chunks
    lines = [json.dumps(dict(VQA_RECORDS[1], question_id=i)) for i in range(20)]
    path = tmp_path / "v.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\n\n".join(lines).encode() + b"\n")
    recs = read_records(path)
    assert [r.id for r in recs] == [str(i) for i in range(20)]
    assert recs[19].source == f"{path}:39"


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("broken.json", '[\n {"id": "a", "report": "x", "image": "a.png"},\n {"id": \n]', r"broken\.json:4:1: not valid JSON"),
        ("top.json", '{\n "id": "a",\n "report": "x"\n}\n', r"top\.json: top level is a dict"),
        ("number.json", "42", r"number\.json: top level is a int"),
        ("empty.json", "  \n", r"empty\.json:1: empty file"),
    ],
)
def test_unreadable_file_raises_under_either_policy(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    for policy in ("skip", "error"):
        with pytest.raises(InputError, match=expected):
            read_records(path, bad_record=policy)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("noimage.json", json.dumps([REPORT_RECORDS[0], {"id": "b", "report": "text", "image_path": ""}]),
         r"noimage\.json:\[1\]: no image"),
        ("notext.json", json.dumps([{"id": "b", "report": "", "caption": "", "image": "a.png"}]),
         r"notext\.json:\[0\]: no text"),
        ("badpath.json", json.dumps([{"id": "b", "report": "t", "image_path": {"a": 1}}]),
         r"badpath\.json:\[0\]: `image_path` must be a path"),
        ("nonobject.json", json.dumps([REPORT_RECORDS[0], "text"]), r"nonobject\.json:\[1\]: expected a JSON object"),
    ],
)
def test_bad_json_list_record(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError, match=expected):
        read_records(path, bad_record="error")
    skipped: list[str] = []
    recs = read_records(path, skipped=skipped)
    assert len(recs) == len(json.loads(content)) - 1
    assert len(skipped) == 1 and re.match(expected, skipped[0].removeprefix(str(tmp_path) + "/"))


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ('{"question_id": 3, "question": "Is it?", ', r"v\.jsonl:3: not valid JSON"),
        ('{"question_id": 3, "question": "a?", "image": "a.png"} {"x": 1}', r"v\.jsonl:3: not valid JSON"),
        ('{"question_id": 3, "question": "a?", "image": "a.png"}, {"x": 1}', r"v\.jsonl:3: not valid JSON"),
    ],
)
def test_broken_jsonl_line_raises(tmp_path, bad_line, expected):
    path = tmp_path / "v.jsonl"
    path.write_text("\n".join([json.dumps(VQA_RECORDS[0]), json.dumps(VQA_RECORDS[1]), bad_line]) + "\n")
    with pytest.raises(InputError, match=expected):
        read_records(path)


@pytest.mark.parametrize(
    "bad_line, expected",
    [
        ("[1, 2]", r"v\.jsonl:3: expected a JSON object"),
        ('{"question_id": 3, "question": "\\n<image>", "image": "a.png"}', r"v\.jsonl:3: no text"),
        ('{"question_id": 3, "question": "Is it?", "image": ""}', r"v\.jsonl:3: no image"),
        ('{"question_id": 3, "question": "Is it?", "image": "a.png", "answer": {"a": 1}}',
         r"v\.jsonl:3: `answer` is a dict"),
    ],
)
def test_bad_jsonl_record_names_the_line(tmp_path, bad_line, expected):
    path = tmp_path / "v.jsonl"
    path.write_text("\n".join([json.dumps(VQA_RECORDS[0]), json.dumps(VQA_RECORDS[1]), bad_line]) + "\n")
    with pytest.raises(InputError, match=expected):
        read_records(path, bad_record="error")
    skipped: list[str] = []
    assert [r.id for r in read_records(path, skipped=skipped)] == ["1", "2"]
    assert len(skipped) == 1 and re.search(expected, skipped[0])


def iu_xray_quirk(path: Path) -> Path:
    """Like the IU-Xray test file: two records whose `question` is only the image mark (their
    question text sits in `answer`), at lines 3 and 6 among good ones."""
    rows = [dict(VQA_RECORDS[i % 2], question_id=i) for i in range(1, 8)]
    for n in (3, 6):
        rows[n - 1] = dict(rows[n - 1], question="<image>", answer="Is the heart enlarged?")
    return write_jsonl(path, rows)


def test_bad_records_are_skipped_and_named(tmp_path, caplog):
    path = iu_xray_quirk(tmp_path / "iuxray_test.jsonl")
    skipped: list[str] = []
    with caplog.at_level("WARNING", logger="data.readers"):
        recs = read_records(path, skipped=skipped)
    assert [r.id for r in recs] == ["1", "2", "4", "5", "7"]
    assert skipped == [f"{path}:3: no text: `question` is missing or empty",
                       f"{path}:6: no text: `question` is missing or empty"]
    assert [r.getMessage() for r in caplog.records] == [f"{m} (record skipped)" for m in skipped]
    assert len(read_records(path)) == 5  # no collector: skipped all the same
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}:3: no text"):
        read_records(path, bad_record="error")


def test_logging_of_bad_records_is_capped(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(readers, "MAX_LOGGED", 1)
    path = iu_xray_quirk(tmp_path / "v.jsonl")
    skipped: list[str] = []
    with caplog.at_level("WARNING", logger="data.readers"):
        read_records(path, skipped=skipped)
    assert len(skipped) == 2 and len(caplog.records) == 2
    assert "more bad records" in caplog.records[1].getMessage()


def test_bad_first_record_does_not_decide_the_kind(tmp_path):
    path = write_json(tmp_path / "p.json", ["text", {"foo": 1}, *PREFERENCE_RECORDS])
    skipped: list[str] = []
    assert len(read_records(path, skipped=skipped)) == 3 and len(skipped) == 2


def test_malformed_preference(tmp_path):
    bad = dict(PREFERENCE_RECORDS[1], rejected_conversations=[{"from": "human", "value": "q"}])
    with pytest.raises(InputError, match=r"\[1\]: `rejected_conversations` needs a human turn followed by a gpt"):
        read_records(write_json(tmp_path / "p.json", [PREFERENCE_RECORDS[0], bad]), bad_record="error")
    bad = dict(PREFERENCE_RECORDS[1], rejected_noised="yes")
    with pytest.raises(InputError, match=r"\[0\]: `rejected_noised` must be 0 or 1"):
        read_records(write_json(tmp_path / "p.json", [bad]), bad_record="error")


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_records(tmp_path / "nope.json")


def test_read_index_filters_roles_and_resolves_paths(tmp_path):
    from data.readers import read_index

    index = tmp_path / "index.json"
    index.write_text(json.dumps({"files": [{"path": "a.jsonl", "role": "test_vqa"},
                                           {"path": "/abs/b.jsonl", "role": "test_vqa"},
                                           {"path": "c.jsonl", "role": "alignment_vqa"}]}))
    assert [e["path"] for e in read_index(index, ["test_vqa"])] == [tmp_path / "a.jsonl", Path("/abs/b.jsonl")]
    with pytest.raises(InputError, match="no entry with role"):
        read_index(index, ["test_report"])
    index.write_text("{ broken")
    with pytest.raises(InputError, match=r"index.json:1:\d+: not valid JSON"):
        read_index(index, ["test_vqa"])
