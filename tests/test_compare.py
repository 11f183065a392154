import json
from pathlib import Path

import pytest

from evaluation.compare import ALL, Answers, comparison_rows, markdown, method_outcomes
from pipeline import compare


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(policy: str, answers: dict[str, list[int]], files=("a", "a", "b", "b"), domain="radiology") -> list[dict]:
    """Prediction rows: per condition, one 0/1 (right/wrong) per question (file, index)."""
    return [{"policy": policy, "condition": c, "file": f, "index": i, "task": "vqa", "correct": bool(x), "domain": domain}
            for c, xs in answers.items() for i, (f, x) in enumerate(zip(files, xs))]


def _option(args: tuple[str, ...], key: str) -> str:
    """The value a command line gives ``key``: its last occurrence's (a later option wins)."""
    return args[len(args) - args[::-1].index(key)]


def test_outcomes_and_rows_by_hand(tmp_path):
    preds = _write(tmp_path / "p.jsonl", _rows("base", {"no_rag": [1, 1, 0, 0], "rag_fixed": [1, 0, 1, 0],
                                                        "noised_rag": [1, 0, 0, 0]})
                   + _rows("dpo", {"no_rag": [1, 1, 1, 0], "rag_fixed": [1, 1, 1, 0], "noised_rag": [0, 0, 0, 0]})
                   + [{"policy": "base", "condition": "rag_fixed", "file": "a", "index": 9, "task": "report",
                       "correct": None}])  # a report row: not a yes/no question
    anchor = method_outcomes(Answers(preds, "base", "rag_fixed", True))
    assert anchor["over_reliance_rate"] == {("a", 0): 0.0, ("a", 1): 1.0, ("b", 2): 0.0, ("b", 3): 0.0}
    plain = method_outcomes(Answers(preds, "base", "no_rag", False))
    assert set(plain) == {"accuracy"}  # no retrieval: no copy or over-reliance rate
    tuned = method_outcomes(Answers(preds, "dpo", "rag_fixed", True))
    rows = comparison_rows({"rag_fixed": anchor, "greedy": plain, "tuned": tuned}, "rag_fixed", ("tuned",), n_boot=200)
    by = {(r["method"], r["file"]): r for r in rows}
    assert by[("tuned", ALL)]["accuracy"] == 0.75 and by[("tuned", ALL)]["diff"] == pytest.approx(0.25)
    assert by[("tuned", ALL)]["copy_rate"] == 0.0 and by[("tuned", ALL)]["over_reliance_rate"] == 0.0
    assert by[("rag_fixed", ALL)]["copy_rate"] == 0.25 and by[("rag_fixed", ALL)]["over_reliance_rate"] == 0.25
    assert by[("rag_fixed", ALL)]["low"] == by[("rag_fixed", ALL)]["high"] == 0.0  # the anchor against itself
    assert by[("greedy", "b")]["accuracy"] == 0.0 and by[("greedy", "b")]["copy_rate"] is None
    assert by[("tuned", "a")]["n"] == 2 and by[("tuned", "a")]["diff"] == pytest.approx(0.5)
    assert by[("tuned", ALL)]["low"] <= 0.25 <= by[("tuned", ALL)]["high"]
    assert by[("rag_fixed", ALL)]["versus"]["tuned"]["diff"] == pytest.approx(-0.25)  # the same pairs, seen from tuned
    assert by[("greedy", "b")]["versus"]["tuned"] == pytest.approx({"diff": -0.5, "low": -1.0, "high": 0.0})
    text = markdown(rows, {"tuned": "a tuned policy"}, "rag_fixed")
    assert "| tuned | 1.000 | 0.500 | 0.750 |" in text and "| tuned | a tuned policy | 0.750 [" in text
    assert "| − anchor [95% paired] | − tuned [95% paired] | copy rate |" in text
    with pytest.raises(ValueError, match="no `dpo` answers under rag_adaptive"):
        method_outcomes(Answers(preds, "dpo", "rag_adaptive", True))


def test_rows_stand_on_the_questions_every_method_answered(tmp_path):
    a = _write(tmp_path / "a.jsonl", _rows("base", {"rag_fixed": [1, 0, 1, 0]}))
    b = _write(tmp_path / "b.jsonl", _rows("base", {"rag_fixed": [1, 1]}, files=("a", "a")))  # file b not answered
    rows = comparison_rows({"rag_fixed": method_outcomes(Answers(a, "base", "rag_fixed", True)),
                            "other": method_outcomes(Answers(b, "base", "rag_fixed", True))}, "rag_fixed", n_boot=50)
    assert {r["file"] for r in rows} == {"a", ALL} and all(r["n"] == 2 for r in rows)
    with pytest.raises(ValueError, match="reference method 'rag_fixed'"):
        comparison_rows({"other": {"accuracy": {}}}, "rag_fixed")


def test_driver_calibrates_rule_and_pairs_every_method_with_the_anchor(tmp_path, monkeypatch):
    """The evaluations and trainings stubbed: each evaluate call writes answers that depend on its
    options, so the table shows which call fed which method."""
    calls = []

    def fake_python(module, *args):
        calls.append((module, args))
        opts = {args[i][2:]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
        if module in ("dpo.train_dpo", "dpo.train_grpo"):
            adapter = Path(opts["train.output_dir"]) / "adapter"
            adapter.mkdir(parents=True)
            (adapter / "adapter_config.json").write_text("{}")
            return
        out = Path(opts["out"])
        k = int(opts.get("fixed_k", 5))
        right = {"beam": [1, 1, 1, 1], "vcd": [0, 0, 0, 0], "dola": [1, 1, 1, 0]}.get(opts.get("decoding"), [1, 0, 1, 0])
        if "val_vqa" in opts["roles"]:  # calibration: risk falls with k in radiology
            right = [1] * 40 if k >= 3 else [0] * 40
            files = ("v",) * 40
        else:
            files = ("a", "a", "b", "b")
        policy = opts["policies"].strip("[]")
        conditions = opts["conditions"].strip("[]").split(",")
        _write(out / "predictions.jsonl", _rows(policy, {c: right for c in conditions}, files))
        (out / "results.json").write_text("{}")

    monkeypatch.setattr(compare, "_python", fake_python)
    compare.main(["--chain", str(tmp_path / "chain"), "--out", str(tmp_path / "cmp"), "--rule_alpha", "0.2"])
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert result["rule"]["k_by_domain"] == {"radiology": 3}  # the smallest k proven under alpha
    rule_eval = next(a for m, a in calls if m == "evaluation.evaluate" and str(tmp_path / "cmp" / "rule" / "eval") in a)
    assert json.loads(rule_eval[rule_eval.index("--k_by_domain") + 1]) == {"radiology": 3}
    trained = [a for m, a in calls if m == "dpo.train_dpo"]
    assert len(trained) == 2 and any("mdpo" in a for a in trained) and any("[[oa2]]" in a for a in trained)
    grpo = {Path(_option(a, "--train.output_dir")).parts[-2:]: a for m, a in calls if m == "dpo.train_grpo"}
    assert set(grpo) == {("grpo", "grpo"), ("grpo_copy_penalty", "grpo")}
    assert "--copy_penalty" not in grpo[("grpo", "grpo")] and grpo[("grpo_copy_penalty", "grpo")][-2:] == ("--copy_penalty", "0.5")
    assert all(a[0] == "configs/toy/grpo.yaml" and a[a.index("--pairs_dir") + 1] == str(tmp_path / "chain" / "pairs")
               for a in grpo.values())
    grpo_eval = next(a for m, a in calls if m == "evaluation.evaluate" and str(tmp_path / "cmp" / "grpo" / "eval") in a)
    assert grpo_eval[grpo_eval.index("--adapter") + 1] == str(tmp_path / "cmp" / "grpo" / "grpo" / "adapter")
    assert result["notes"] == [n for n in result["notes"] if n.startswith("rule:")]
    by = {(r["method"], r["file"]): r for r in result["rows"]}
    assert set(m for m, _ in by) == set(compare.METHODS)
    assert by[("beam", ALL)]["diff"] == pytest.approx(0.5) and by[("vcd", ALL)]["diff"] == pytest.approx(-0.5)
    assert by[("dola_rag", ALL)]["diff"] == pytest.approx(0.25)
    assert by[("vcd", ALL)]["copy_rate"] is None and by[("vcd_rag", ALL)]["copy_rate"] == 0.0
    assert (tmp_path / "cmp" / "compare.md").is_file() and (tmp_path / "cmp" / "compare.png").stat().st_size > 0
    n_calls = len(calls)
    compare.main(["--chain", str(tmp_path / "chain"), "--out", str(tmp_path / "cmp"), "--rule_alpha", "0.2"])
    assert len(calls) == n_calls  # nothing redone when results exist
