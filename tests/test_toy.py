"""The toy world generator: determinism, splits, balance, every annotation format, visibility."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.config import ConfigError, cli_main
from common.io import InputError
from data.manifest import load_manifest, manifest_files
from toy import make_toy
from toy.make_toy import FINDINGS, ROLES, make_world
from toy.render import render_study


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return make_world(tmp_path_factory.mktemp("toy") / "world", seed=0, size="tiny", progress=False)


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _records(entry: dict) -> list[dict]:
    text = Path(entry["path"]).read_text(encoding="utf-8")
    return (
        [json.loads(line) for line in text.splitlines()]
        if entry["kind"] == "vqa"
        else json.loads(text)
    )


def test_same_seed_gives_identical_files(world, tmp_path):
    again = make_world(tmp_path / "again", seed=0, size="tiny", progress=False)
    other = make_world(tmp_path / "other", seed=1, size="tiny", progress=False)
    first = _hashes(world)
    assert any(k.endswith(".npz") for k in first) and any(k.endswith(".jpg") for k in first)
    assert _hashes(again) == first
    assert _hashes(other) != first
    assert not list(tmp_path.glob(".*.tmp")), "temporary folders left behind"


def test_studies_disjoint_across_splits(world):
    by_split: dict[str, set[str]] = {}
    for e in manifest_files(world):
        split = ROLES[e["role"]][0]
        by_split.setdefault(f"{e['domain']}/{split}", set()).update(r["study"] for r in _records(e))
    keys = sorted(by_split)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert not by_split[a] & by_split[b], (a, b)
    counts = {k.split("/")[1]: len(v) for k, v in by_split.items()}
    assert counts == make_toy.SIZES["tiny"]


def test_yes_no_balanced_and_answers_match_truth(world):
    yes = no = 0
    for e in manifest_files(world, kind="vqa"):
        rows = _records(e)
        for r in rows:
            assert set(r) >= {
                "question_id",
                "question",
                "answer",
                "image",
                "report",
                "findings",
                "finding",
                "study",
            }
            assert r["question"].endswith("\n<image>") == (e["domain"] != "pathology")
            if r["finding"] is None:
                assert ROLES[e["role"]][0] in make_toy.EVALUATION_SPLITS and r["answer"].rstrip(".").lower() in r["findings"]
                continue
            said_yes = r["answer"].lower().startswith("yes")
            assert said_yes or r["answer"].lower().startswith("no")
            assert said_yes == (r["finding"] in r["findings"]), r
            yes, no = yes + said_yes, no + (not said_yes)
        assert len({r["question_id"] for r in rows}) == len(rows)
    assert 0.42 < yes / (yes + no) < 0.58, (yes, no)
    open_rows = [
        r
        for e in manifest_files(world, role="test_vqa")
        for r in _records(e)
        if r["finding"] is None
    ]
    assert open_rows, "test files should hold some non-yes/no questions"


def test_every_format_variant(world):
    fmts = {(e["domain"], e["format"]) for e in manifest_files(world)}
    assert fmts == {
        ("radiology", "iu_xray"),
        ("radiology", "mimic"),
        ("pathology", "pmc_oa+quilt"),
        ("ophthalmology", "fairvlmed"),
    } | {(d, "vqa_jsonl") for d in FINDINGS}
    for e in manifest_files(world, kind="report"):
        root = Path(e["image_root"])
        rows = _records(e)
        for r in rows:
            assert {"id", "findings", "study"} <= set(r)
        if e["format"] == "iu_xray":
            for r in rows:
                assert set(r) >= {"report", "image_path", "split"} and len(r["image_path"]) == 2
                a, b = (np.asarray(Image.open(root / p)) for p in r["image_path"])
                assert a.shape == b.shape == (64, 64, 3) and not np.array_equal(a, b)
        elif e["format"] == "mimic":
            for r in rows:
                assert isinstance(r["study_id"], int) and isinstance(r["subject_id"], int)
                assert len(r["image_path"]) == 1 and (root / r["image_path"][0]).is_file()
                assert Path(r["image_root"]).is_absolute() and not Path(r["image_root"]).exists()
        elif e["format"] == "pmc_oa+quilt":
            pmc = [r for r in rows if "image" in r]
            quilt = [r for r in rows if "caption" in r]
            assert pmc and quilt and len(pmc) + len(quilt) == len(rows)
            assert all(r["report"] and (root / r["image"]).is_file() for r in pmc)
            for r in quilt:
                assert (
                    r["gpt4_summary"] == "" and isinstance(r["metadata"], dict) and r["pathology"]
                )
                assert (root / r["image_path"]).is_file() and not Path(r["image_root"]).exists()
        else:
            for r in rows:
                assert r["image_path"].endswith(".jpg") and (
                    r.get("report") or r.get("gpt4_summary")
                )
                with np.load(root / r["filename"]) as npz:
                    assert npz["fundus"].shape == (64, 64, 3) and npz["fundus"].dtype == np.uint8
                    present = [
                        n for n, v in zip(npz["label_names"], npz["labels"], strict=True) if v
                    ]
                assert present == r["findings"]


def test_manifest_counts_and_images(world):
    manifest = load_manifest(world)
    assert manifest["seed"] == 0 and manifest["size"] == "tiny"
    assert {d: v["findings"] for d, v in manifest["domains"].items()} == FINDINGS
    for d in FINDINGS:
        assert {e["role"] for e in manifest_files(world, domain=d)} == set(ROLES)
    for e in manifest_files(world):
        rows = _records(e)
        assert e["records"] == len(rows) > 0
        for r in rows:
            image = r.get("image") or r.get("image_path")
            for p in [image] if isinstance(image, str) else image:
                assert (Path(e["image_root"]) / p).is_file(), p
            text = r.get("report") or r.get("caption") or r.get("gpt4_summary")
            assert text and ("findings" in r)
    assert len(manifest_files(world, role="policy_train", domain="pathology")) == 2
    assert len(manifest_files(world, role="test_report", domain="radiology")) == 2


def said(domain: str, name: str, text: str) -> bool:
    """Whether a report's text says the finding is there."""
    finding = next(f for f in make_toy.VOCAB[domain] if f.name == name)
    patterns = (
        re.escape(t).replace(r"\{sev\}", ".+").replace(r"\{Sev\}", ".+") for t in finding.says
    )
    return any(re.search(p, text, re.IGNORECASE) for p in patterns)


def test_reports_mention_every_present_finding(world):
    for e in manifest_files(world, kind="report"):
        for r in _records(e):
            text = r.get("report") or r.get("caption") or r.get("gpt4_summary")
            assert all(said(e["domain"], n, text) for n in r["findings"]), (r["findings"], text)
            if not r["findings"]:
                assert any(s in text for s in make_toy.NORMAL[e["domain"]]), text


def test_prior_studies_share_patient_anatomy_and_findings(world, tmp_path):
    with_priors = make_world(tmp_path / "priors", seed=0, size="tiny", prior_share=1.0, progress=False)
    assert load_manifest(with_priors)["config"]["prior_share"] == 1.0
    queried = {}
    for kind in ("report", "vqa"):  # a study by its report record, or by its questions where its split has no reports
        for e in manifest_files(with_priors, kind=kind):
            if ROLES[e["role"]][0] in make_toy.PRIOR_SPLITS:
                for r in _records(e):
                    queried.setdefault(r["study"], (r, e))
    priors = [(r, e) for e in manifest_files(with_priors, role="retriever_train") for r in _records(e) if "prior_of" in r]
    assert {r["prior_of"] for r, _ in priors} == set(queried), "share 1.0: every queried study has its prior"

    def pixels(rec, entry):
        path = rec.get("image_path") or rec["image"]
        path = path[0] if isinstance(path, list) else path
        return np.asarray(Image.open(Path(entry["image_root"]) / path).convert("L"), np.float32)

    near, far = [], []
    for prior, entry in priors:
        later, later_entry = queried[prior["prior_of"]]
        def text(r):
            return r.get("report") or r.get("caption") or r.get("gpt4_summary")

        assert prior["findings"] == later["findings"] and text(prior) != text(later)
        near.append(np.abs(pixels(prior, entry) - pixels(later, later_entry)).mean())
        other = next(r for r, e in priors if e["domain"] == entry["domain"] and r["prior_of"] != prior["prior_of"])
        far.append(np.abs(pixels(prior, entry) - pixels(*queried[other["prior_of"]])).mean())
    assert np.median(near) < 0.5 * np.median(far), "a prior looks like its patient's later study, not like others"
    # the studies of the default world are untouched by the knob
    for plain, grown in zip(manifest_files(world), manifest_files(with_priors), strict=True):
        assert _records(plain) == [r for r in _records(grown) if "prior_of" not in r], plain["path"]


def test_changed_priors_differ_in_one_finding_and_still_look_like_their_patient(tmp_path):
    kept = make_world(tmp_path / "kept", seed=0, size="tiny", prior_share=1.0, progress=False)
    changed = make_world(tmp_path / "changed", seed=0, size="tiny", prior_share=1.0, prior_change=1.0, progress=False)
    assert load_manifest(changed)["config"]["prior_change"] == 1.0

    def priors(root):
        return {r["prior_of"]: (r, e) for e in manifest_files(root, role="retriever_train") for r in _records(e)
                if "prior_of" in r}

    def pixels(rec, entry, root):
        path = rec.get("image_path") or rec["image"]
        path = path[0] if isinstance(path, list) else path
        return np.asarray(Image.open(root / entry["image_root"] / path).convert("L"), np.float32)

    same, other = priors(kept), priors(changed)
    assert same.keys() == other.keys()
    near, far = [], []
    for later, (prior, entry) in other.items():
        was, was_entry = same[later]
        assert len(set(prior["findings"]) ^ set(was["findings"])) == 1, (prior["findings"], was["findings"])
        assert prior["findings"] == [f for f in FINDINGS[entry["domain"]] if f in prior["findings"]]
        near.append(np.abs(pixels(prior, entry, changed) - pixels(was, was_entry, kept)).mean())
        stranger = next(p for k, (p, e) in same.items() if e["domain"] == entry["domain"] and k != later)
        far.append(np.abs(pixels(prior, entry, changed) - pixels(stranger, entry, kept)).mean())
    assert np.median(near) < 0.5 * np.median(far), "a changed prior still looks like its patient"
    for plain, grown in zip(manifest_files(kept), manifest_files(changed), strict=True):  # the rest is untouched
        assert [r for r in _records(plain) if "prior_of" not in r] == [r for r in _records(grown) if "prior_of" not in r]


def test_missed_findings_leave_the_corpus_reports_and_labels_not_the_images(world, tmp_path):
    missed = make_world(tmp_path / "missed", seed=0, size="tiny", report_miss=0.5, progress=False)
    assert load_manifest(missed)["config"]["report_miss"] == 0.5
    before, after = _hashes(world), _hashes(missed)
    assert {k for k in before if before[k] != after[k]} == {
        "manifest.json", *(str(Path(e["path"]).relative_to(world)) for e in manifest_files(world, role="retriever_train"))}, "images and other splits untouched"
    left_out = 0
    for plain, noisy in zip(manifest_files(world, role="retriever_train"), manifest_files(missed, role="retriever_train"),
                            strict=True):
        for was, now in zip(_records(plain), _records(noisy), strict=True):
            gone = now.get("missed", [])
            assert now["findings"] == [f for f in was["findings"] if f not in gone] and set(gone) <= set(was["findings"])
            text = now.get("report") or now.get("caption") or now.get("gpt4_summary")
            denied = {d.format(phrase=make_toy._finding(plain["domain"], f).phrase) for f in gone for d in make_toy.DENY}
            affirmed = " ".join(s for s in re.split(r"(?<=\.) ", text) if s not in denied)  # a reader who missed it may deny it
            assert not any(said(plain["domain"], f, affirmed) for f in gone), text
            left_out += len(gone)
    present = sum(len(r["findings"]) for e in manifest_files(world, role="retriever_train") for r in _records(e))
    assert 0.35 < left_out / present < 0.65, (left_out, present)


@pytest.mark.parametrize("domain", sorted(FINDINGS))
def test_findings_visible_at_32px(domain):
    def small(a):
        return np.asarray(Image.fromarray(a).resize((32, 32), Image.BILINEAR), np.float32)

    for name in FINDINGS[domain]:
        diffs = {}
        for sev in (0.25, 0.8):
            a = small(render_study(domain, [], [], np.random.default_rng(7)))
            b = small(render_study(domain, [name], [sev], np.random.default_rng(7)))
            diffs[sev] = np.abs(a - b).mean(-1)
        assert diffs[0.8].max() > 20 and diffs[0.8].mean() > 0.3, name
        assert diffs[0.8].mean() > diffs[0.25].mean(), (
            f"{name}: subtle should change the image less"
        )


def test_failed_run_leaves_nothing(tmp_path, monkeypatch):
    calls = {"n": 0}

    def broken(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 20:
            raise RuntimeError("killed")
        return render_study(*args, **kwargs)

    monkeypatch.setattr(make_toy, "render_study", broken)
    with pytest.raises(RuntimeError):
        make_world(tmp_path / "world", size="tiny", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_errors_exit_2(tmp_path):
    with pytest.raises(SystemExit) as e:
        cli_main(lambda: make_toy.main(["--out", str(tmp_path / "w"), "--size", "huge"]))
    assert e.value.code == 2
    with pytest.raises(InputError, match="manifest.json"):
        load_manifest(tmp_path)


def test_a_larger_alignment_split_adds_studies_and_changes_nothing_else(world, tmp_path):
    more = make_world(tmp_path / "more", seed=0, size="tiny", alignment_studies=11, progress=False)
    assert load_manifest(more)["config"]["alignment_studies"] == 11
    for e in manifest_files(world):
        other = {**e, "path": str(more / Path(e["path"]).relative_to(world))}
        if ROLES[e["role"]][0] == "alignment":
            small, large = _records(e), _records(other)
            assert large[: len(small)] == small and len(large) > len(small)
        else:
            assert Path(other["path"]).read_bytes() == Path(e["path"]).read_bytes(), e["path"]
    with pytest.raises(ConfigError, match="alignment_studies"):
        make_world(tmp_path / "bad", size="tiny", alignment_studies=-1, progress=False)


@pytest.mark.parametrize("knob", make_toy.CORPUS_KNOBS)
def test_a_corpus_knob_leaves_every_file_but_the_corpus_as_it_was(world, tmp_path, knob):
    """The effect map's points on such a knob start from one pretrained tower (pipeline.effect.map_runs):
    policy_train's images, and every other file outside the corpus, must not move with it."""
    turned = make_world(tmp_path / knob, seed=0, size="tiny", progress=False,
                        **{"prior_share": 1.0, knob: 0.5})  # prior_change acts on priors alone
    before, after = _hashes(world), _hashes(turned)
    corpus = {"manifest.json", *(str(Path(e["path"]).relative_to(world)) for e in manifest_files(world, role="retriever_train"))}
    assert {k for k in before if k not in corpus and before[k] != after.get(k)} == set()
