"""toy.room: the combiner trusts each signal where it is right, and the room is measured on a chain."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from common.io import InputError
from toy.make_toy import make_world
from toy.oracle_retrieval import ToyRetrievalConfig, write_oracle_retrieval
from toy.room import Question, by_reference, combine, combine_out_of_fold, folds, main, read_questions, room, where_they_fail
from toy.toy_policy import ToyPolicyConfig, build_toy_policy, world_texts


def _two_domains(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """In "eye" the image margin gives the answer and the vote is noise; in "skin" the other way."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.5
    domains = ["eye" if i % 2 else "skin" for i in range(n)]
    image = np.where(y, 1.0, -1.0) + 0.3 * rng.standard_normal(n)
    vote = np.where(y, 0.8, 0.2) + 0.05 * rng.standard_normal(n)
    noise_image, noise_vote = 3 * rng.standard_normal(n), rng.random(n)
    eye = np.array(domains) == "eye"
    x = np.stack([np.where(eye, image, noise_image), np.where(eye, noise_vote, vote)], 1)
    return x, y, domains


def test_the_combiner_trusts_each_signal_in_the_domain_where_it_is_right():
    x, y, d = _two_domains(400, 0)
    tx, ty, td = _two_domains(400, 1)
    assert (combine(x, y, d, tx, td) == ty).mean() > 0.97
    assert (combine_out_of_fold(tx, ty, td) == ty).mean() > 0.97
    image_only = (tx[:, 0] > 0) == ty  # right in "eye" only
    assert image_only.mean() < 0.8


def test_where_they_fail_splits_the_vote_by_the_reading_and_both_by_the_asked_finding():
    reading = np.array([True, True, False, False, True, False])
    vote = np.array([True, False, False, True, True, False])
    got = where_they_fail(reading, vote, ["absent", "marked", "subtle", "subtle", "absent", "marked"])
    assert got["vote_where_reading"] == {"right": 2 / 3, "wrong": 1 / 3, "n_right": 3, "n_wrong": 3}
    assert got["by_finding"]["subtle"] == {"n": 2, "reading": 0.0, "vote": 0.5}
    assert got["by_finding"]["absent"] == {"n": 2, "reading": 1.0, "vote": 1.0}
    assert got["by_finding"]["marked"] == {"n": 2, "reading": 0.5, "vote": 0.0}
    none = where_they_fail(np.array([True]), np.array([True]), ["absent"])
    assert none["by_finding"]["subtle"] == {"n": 0, "reading": None, "vote": None}
    assert none["vote_where_reading"]["wrong"] is None


def test_by_reference_splits_each_policy_and_condition_by_whether_the_vote_is_right(tmp_path):
    def q(index: int, yes: bool, share: float) -> Question:
        return Question("eye", "Is there a spot?", [], None, yes, share, "marked" if yes else "absent", ("f", index))

    def row(policy: str, condition: str, index: int, label: str | None, correct: bool | None) -> dict:
        return {"policy": policy, "condition": condition, "file": "f", "index": index, "pred_label": label,
                "correct": correct}

    # votes: right, right, wrong, wrong (the truth is yes, no, yes, no)
    questions = [q(0, True, 1.0), q(1, False, 0.0), q(2, True, 0.0), q(3, False, 1.0)]
    truth = ["yes", "no", "yes", "no"]
    rows = [row("base", "rag", i, label, label == truth[i]) for i, label in enumerate(["yes", "no", "no", "yes"])]  # copies
    rows += [row("dpo", "rag", i, label, label == truth[i]) for i, label in enumerate(["yes", "other", "yes", "no"])]
    rows += [row("dpo", "rag", 9, "yes", True), row("base", "no_rag", 0, "yes", None)]  # not asked here; not scored
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = by_reference(questions, path)
    assert set(got) == {"base", "dpo"} and set(got["base"]) == {"rag"}
    none, one = {"n": 0, "accuracy": None}, {"n": 1}
    assert got["base"]["rag"] == {
        "n": 4, "accuracy": 0.5, "agrees_with_vote": 1.0,
        "vote_right": {"n": 2, "accuracy": 1.0, "by_kind": {"subtle": none, "marked": one | {"accuracy": 1.0},
                                                             "absent": one | {"accuracy": 1.0}}},
        "vote_wrong": {"n": 2, "accuracy": 0.0, "by_kind": {"subtle": none, "marked": one | {"accuracy": 0.0},
                                                             "absent": one | {"accuracy": 0.0}}}}
    dpo = got["dpo"]["rag"]  # an answer neither yes nor no is wrong, and says nothing the vote says
    assert dpo["vote_right"]["accuracy"] == 0.5 and dpo["vote_wrong"]["accuracy"] == 1.0 and dpo["agrees_with_vote"] == 0.25
    assert dpo["vote_right"]["by_kind"]["absent"]["accuracy"] == 0.0 and dpo["vote_right"]["by_kind"]["marked"]["accuracy"] == 1.0
    path.write_text(json.dumps(row("base", "rag", 0, "yes", True) | {"file": "g"}) + "\n")
    assert by_reference(questions, path) == {}


def test_folds_are_disjoint_and_cover_every_question():
    got = folds(12, 5)
    assert sorted(np.concatenate(got).tolist()) == list(range(12)) and len(got) == 5
    assert folds(3, 5) == [np.array([0]), np.array([1]), np.array([2])]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """A tiny world, oracle references as its retrieval and an untrained tiny policy: a chain's folders."""
    root = tmp_path_factory.mktemp("room")
    world = make_world(root / "world", size="tiny", progress=False)
    write_oracle_retrieval(ToyRetrievalConfig(world=str(world), out=str(root / "retrieval"),
                                              roles=["val_vqa", "test_vqa"]))
    cfg = ToyPolicyConfig(vocab_size=500, vision_width=32, vision_layers=1, text_width=32, text_layers=1,
                          text_heads=2, vision_heads=2)
    build_toy_policy(world_texts(world), root / "policy", cfg)
    return root


def test_room_is_combined_minus_base_rag_on_the_same_questions(chain):
    got = room(chain, ["test_vqa"], limit=6)
    n = got["n"]
    assert 0 < n <= 6 * 4 and got["fit_roles"] == ["val_vqa"]
    r = got["room"]
    assert r["diff"] == pytest.approx(got["combined"]["accuracy"] - got["base_rag"]["accuracy"])
    assert r["low"] <= r["diff"] <= r["high"] and r["n"] == n
    for k in ("base_no_rag", "base_rag", "reference_vote", "combined"):
        assert got[k]["low"] <= got[k]["accuracy"] <= got[k]["high"]
    shares = [q.share for q in read_questions(chain, ["test_vqa"], limit=6)]
    assert got["reference_vote"]["accuracy"] > 0.6 and all(0 <= s <= 1 for s in shares)  # oracle references know
    kinds = [q.kind for q in read_questions(chain, ["test_vqa"], limit=6)]
    w = got["where_they_fail"]
    assert {k: v["n"] for k, v in w["by_finding"].items()} == {k: kinds.count(k) for k in ("subtle", "marked", "absent")}
    assert w["vote_where_reading"]["n_right"] + w["vote_where_reading"]["n_wrong"] == n
    assert kinds.count("absent") == sum(not q.yes for q in read_questions(chain, ["test_vqa"], limit=6))


def test_validation_questions_are_scored_out_of_fold_and_mixing_roles_is_refused(chain):
    assert room(chain, ["val_vqa"], limit=6)["n"] > 0
    with pytest.raises(ValueError, match="either the fitting roles"):
        room(chain, ["val_vqa", "test_vqa"])


def _copy_with(chain: Path, to: Path, change) -> None:
    """``to`` a chain whose one test_vqa retrieval file has ``change(rows)`` applied (world shared)."""
    (to / "retrieval").mkdir(parents=True)
    (to / "world").symlink_to(chain / "world")
    index = json.loads((chain / "retrieval" / "index.json").read_text())
    entry = next(e for e in index["files"] if e["role"] == "test_vqa" and e["domain"] == "radiology")
    name = Path(entry["path"]).name
    rows = [json.loads(line) for line in (chain / "retrieval" / name).read_text().splitlines()]
    change(rows)
    (to / "retrieval" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    entry.update(path=name, image_root=str((chain / "retrieval" / entry["image_root"]).resolve()))
    (to / "retrieval" / "index.json").write_text(json.dumps({"files": [entry]}))


def test_a_misrouted_question_is_read_in_its_routed_domain(chain, tmp_path):
    pathology = json.loads(next((chain / "retrieval").glob("pathology_test_vqa*.jsonl")).read_text().splitlines()[0])

    def misroute(rows):  # the retriever sent it to pathology: pathology's references
        rows[0].update(domain="pathology", reference_reports=pathology["reference_reports"], finding=pathology["finding"])

    _copy_with(chain, tmp_path / "chain", misroute)
    got = read_questions(tmp_path / "chain", ["test_vqa"], limit=2)
    assert got[0].domain == "pathology" and got[1].domain == "radiology"


def test_a_reference_from_another_world_is_named(chain, tmp_path):
    bad = tmp_path / "chain"
    _copy_with(chain, bad, lambda rows: rows[1].update(reference_reports=["A report of no world."]))
    with pytest.raises(InputError, match=r"/retrieval/radiology_test_vqa\w*\.jsonl:2: reference 'A report of no world\.' "
                                         "is not a report"):
        read_questions(bad, ["test_vqa"])


def test_main_writes_the_figures(chain, tmp_path, capsys):
    out = tmp_path / "room.json"
    main(["--chain", str(chain), "--limit", "4", "--out", str(out)])
    assert json.loads(out.read_text())["room"]["n"] > 0 and "room" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="toy.room: .*nowhere/policy: policy checkpoint folder does not exist"):
        main(["--chain", str(tmp_path / "nowhere")])
    evaluated = tmp_path / "eval"
    evaluated.mkdir()
    (evaluated / "predictions.jsonl").write_text("".join(
        json.dumps({"policy": "base", "condition": "rag_fixed", "file": q.key[0], "index": q.key[1], "pred_label": "yes",
                    "correct": q.yes}) + "\n"
        for q in read_questions(chain, ["test_vqa"], 4)))
    main(["--chain", str(chain), "--limit", "4", "--eval", str(evaluated), "--out", str(out)])
    split = json.loads(out.read_text())["by_reference"]["base"]["rag_fixed"]
    assert split["vote_right"]["n"] + split["vote_wrong"]["n"] == split["n"] > 0
    assert "base rag_fixed" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="toy.room: .*predictions.jsonl"):
        main(["--chain", str(chain), "--limit", "4", "--eval", str(tmp_path / "missing")])
    (evaluated / "predictions.jsonl").write_text("")
    with pytest.raises(SystemExit, match="toy.room: .*predictions.jsonl: no scored answer"):
        main(["--chain", str(chain), "--limit", "4", "--eval", str(evaluated)])
