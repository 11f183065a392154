"""The effect study: its figures (evaluation.effect) on hand-made evaluation files, its driver
(pipeline.effect) with the chain and stage runs stubbed, and (slow) the whole study on a tiny world."""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

import numpy as np
import pytest

import pipeline.demo as demo
import pipeline.effect as driver
from common.io import LOCK_FILE, InputError, atomic_write_json
from common.stages import plan, stamp_path
from evaluation.effect import (
    CONDITIONS, CONTROLS, assemble, control_figures, markdown, paired_differences, question_outcomes, reference_vote,
    regime, run_figures, summarise, table,
)
from evaluation.evaluate import diagnostics
from tests.test_run_lock import holder

METRICS = ("accuracy_no_rag", "accuracy_rag_fixed", "copy_rate", "over_reliance_rate")


def test_summarise_means_and_sample_std_per_policy_and_metric():
    runs = {
        0: {"base": {"copy_rate": 0.6, "accuracy_rag_fixed": 0.5}, "dpo": {"copy_rate": 0.4, "accuracy_rag_fixed": 0.7}},
        1: {"base": {"copy_rate": 0.6, "accuracy_rag_fixed": 0.5}, "dpo": {"copy_rate": 0.5, "accuracy_rag_fixed": 0.6}},
        2: {"base": {"copy_rate": 0.6, "accuracy_rag_fixed": 0.5}, "dpo": {"copy_rate": 0.6, "accuracy_rag_fixed": 0.5}},
    }
    s = summarise(runs)
    assert s["dpo"]["copy_rate"]["mean"] == pytest.approx(0.5)
    assert s["dpo"]["copy_rate"]["std"] == pytest.approx(0.1)  # sample std of 0.4, 0.5, 0.6
    assert s["base"]["copy_rate"] == {"mean": pytest.approx(0.6), "std": 0.0, "n": 3}
    assert "accuracy_no_rag" not in s["dpo"]  # not measured: not invented
    md = table(s, [0, 1, 2])
    assert "| dpo | n/a | 0.600 ± 0.100 | 0.500 ± 0.100 | n/a |" in md


def test_one_seed_has_zero_spread():
    s = summarise({3: {"dpo": {"copy_rate": 0.25}}})
    assert s["dpo"]["copy_rate"] == {"mean": 0.25, "std": 0.0, "n": 1}


def _rows(policy: str, by_condition: dict[str, list], file: str = "f") -> list[dict]:
    return [{"policy": policy, "condition": c, "file": file, "index": i, "task": "vqa", "correct": bool(ok)}
            for c, oks in by_condition.items() for i, ok in enumerate(oks)]


def _predictions(path, base: dict[str, list[bool]], dpo: dict[str, list[bool]]):
    rows = _rows("base", base) + _rows("dpo", dpo)
    rows.append({"policy": "base", "condition": "no_rag", "file": "f", "index": 99, "task": "vqa", "correct": True})  # unpaired
    rows.append({"policy": "dpo", "condition": "no_rag", "file": "r", "index": 0, "task": "report", "correct": None})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_question_outcomes_pair_questions_and_derive_over_reliance(tmp_path):
    path = _predictions(tmp_path / "p.jsonl",
                        {"no_rag": [True, True, False, False], "rag_fixed": [True, False, True, False], "noised_rag": [1, 1, 0, 0]},
                        {"no_rag": [True, True, True, False], "rag_fixed": [True, True, True, False], "noised_rag": [0, 0, 0, 0]})
    got = question_outcomes(path)
    assert len(got["base"]["copy_rate"]) == 4  # index 99 (base only) and the report row left out
    np.testing.assert_array_equal(got["base"]["over_reliance_rate"], [0, 1, 0, 0])
    d = paired_differences(got)
    assert d["copy_rate"]["diff"] == pytest.approx(-0.5) and d["accuracy_rag_fixed"]["diff"] == pytest.approx(0.25)
    assert d["over_reliance_rate"]["diff"] == pytest.approx(-0.25)
    for m in d.values():
        assert m["low"] <= m["diff"] <= m["high"] and m["n"] == 4


def test_bootstrap_interval_shrinks_with_questions_and_excludes_zero_for_a_clear_gain():
    rng = np.random.default_rng(1)
    def outcomes(n, p_base, p_dpo):
        b, d = (rng.random(n) < p_base).astype(float), (rng.random(n) < p_dpo).astype(float)
        return {"base": {m: b for m in METRICS}, "dpo": {m: d for m in METRICS}}
    small = paired_differences(outcomes(100, 0.5, 0.5))["copy_rate"]
    large = paired_differences(outcomes(4000, 0.5, 0.6))["copy_rate"]
    assert large["high"] - large["low"] < (small["high"] - small["low"]) / 3
    assert large["low"] > 0  # a 0.1 gain over 4000 questions is not noise
    assert paired_differences({"base": {}}) == {}
    md = table(summarise({0: {"base": {"copy_rate": 0.5}}}), [0], {0: paired_differences(outcomes(100, 0.5, 0.5))})
    assert "paired bootstrap interval over 100 questions" in md and "| 0 | " in md


# ---------------------------------------------------------------- hand-made evaluations


def _pattern(n: int, right: float, shift: int = 0) -> list[bool]:
    """n answers, the first round(right * n) of them (rotated by ``shift``) right."""
    k = round(right * n)
    return [(i + shift) % n < k for i in range(n)]


def _outcomes(acc: dict[str, float], n: int, shift: int = 0) -> dict[str, list[bool]]:
    return {c: _pattern(n, acc[c], shift) for c in CONDITIONS}


def _vote_files(votes: dict[str, tuple[float, int]]) -> dict:
    """A retrieval_metrics.json ``files`` block: {file name: {reference_vote_accuracy, reference_vote_n}}."""
    return {f"{name}.jsonl": {"reference_vote_accuracy": a, "reference_vote_n": n} for name, (a, n) in votes.items()}


def write_eval(folder: Path, policies: dict[str, dict[str, list[bool]]], files=("radiology_test_vqa",),
               votes: dict[str, tuple[float, int]] | None = None) -> Path:
    """An evaluation folder as evaluation.evaluate writes it: predictions.jsonl and results.json
    (rows per file, diagnostics, the retrieval stage's metrics)."""
    predictions = [r for p, by_cond in policies.items() for f in files for r in _rows(p, by_cond, f)]
    rows = [{"policy": p, "condition": c, "file": f, "task": "vqa", "n": len(policies[p][c])}
            for p in policies for c in CONDITIONS for f in files]
    if votes is None:
        votes = {f: (0.8, 10) for f in files}
    results = {"rows": rows, "diagnostics": diagnostics(predictions), "retrieval": {"files": _vote_files(votes)}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in predictions))
    (folder / "results.json").write_text(json.dumps(results))
    return folder


BASE = {"no_rag": 0.75, "rag_fixed": 0.80, "noised_rag": 0.78}
GOOD_DPO = {"no_rag": 0.80, "rag_fixed": 0.95, "noised_rag": 0.55}


def test_reference_vote_is_n_weighted_over_the_scored_vqa_files():
    results = {"rows": [{"file": "a", "task": "vqa"}, {"file": "b", "task": "vqa"}, {"file": "r", "task": "report"}],
               "retrieval": {"files": {**_vote_files({"a": (0.9, 30), "b": (0.5, 10), "c": (0.0, 99)}),
                                       "r.jsonl": {"mean_k": 5}}}}
    assert reference_vote(results) == pytest.approx((0.9 * 30 + 0.5 * 10) / 40)  # c was not evaluated
    assert reference_vote({"rows": results["rows"], "retrieval": None}) is None


def test_controls_pair_with_the_main_base_on_the_same_questions(tmp_path):
    main = write_eval(tmp_path / "eval", {"base": _outcomes(BASE, 100), "dpo": _outcomes(GOOD_DPO, 100)})
    control = write_eval(tmp_path / "control", {"dpo": _outcomes(BASE, 100)})  # learned nothing
    got = control_figures(main, control)
    assert got["diagnostics"]["copy_rate"] == pytest.approx(0.78)
    for m in METRICS:
        assert got["differences"][m]["diff"] == 0 and got["differences"][m]["n"] == 100
    versus = got["method_minus_control"]  # the main dpo against the control, paired on the same questions
    assert versus["accuracy_rag_fixed"]["diff"] == pytest.approx(0.15) and versus["copy_rate"]["diff"] == pytest.approx(-0.23)
    assert versus["copy_rate"]["high"] < 0 < versus["accuracy_rag_fixed"]["low"]
    main_figures = run_figures(main)
    assert main_figures["differences"]["accuracy_rag_fixed"]["diff"] == pytest.approx(0.15)
    assert main_figures["reference_vote_accuracy"] == pytest.approx(0.8)


def _differences(diff: float, low: float, high: float) -> dict:
    return {m: {"diff": diff, "low": low, "high": high, "n": 100} for m in METRICS}


def test_regime_rows_say_target_measured_and_holds():
    runs = {s: {"base": {"accuracy_no_rag": 0.72 + 0.02 * s, "accuracy_rag_fixed": 0.80, "copy_rate": 0.78,
                         "over_reliance_rate": 0.05}} for s in (0, 1)}
    rows = {r["check"]: r for r in regime(runs, {0: _differences(0.08, 0.02, 0.14), 1: _differences(0.06, -0.01, 0.12)},
                                          {0: 0.75, 1: None})}
    assert rows["base accuracy without retrieval"]["measured"] == pytest.approx(0.73)
    assert rows["base accuracy without retrieval"]["holds"] is True
    assert rows["reference vote accuracy"]["measured"] == pytest.approx(0.75)  # a seed without a vote left out
    assert rows["base RAG − no-RAG accuracy"]["measured"] == pytest.approx(0.07)
    assert rows["base RAG accuracy − copy rate (it copies)"]["holds"] is True
    gain = rows["DPO − base RAG accuracy"]
    assert gain["measured"] == pytest.approx(0.07) and gain["seeds_excluding_zero"] == 1
    assert gain["holds"] is False  # big enough on average, but seed 1's interval spans zero
    copy = rows["DPO − base copy rate"]
    assert copy["holds"] is False and copy["seeds_excluding_zero"] == 0  # it went up
    room = rows["room: combined − base RAG accuracy"]
    assert room["measured"] is None and room["holds"] is None  # not measured
    rooms = {0: {"room": {"diff": 0.08}}, 1: {"room": {"diff": 0.01}}}
    room = next(r for r in regime(runs, {}, {}, rooms) if r["check"].startswith("room"))
    assert room["measured"] == pytest.approx(0.045) and room["holds"] is False and room["target"] == "≥ 0.05"
    nothing = regime({}, {}, {})
    assert all(r["measured"] is None and r["holds"] is None for r in nothing)


def test_study_assembles_seeds_controls_map_and_regime(tmp_path):
    seeds, controls = {}, {"sft_chosen": {}}
    for s in (0, 1, 2):
        main = write_eval(tmp_path / f"seed{s}" / "eval", {"base": _outcomes(BASE, 200, s),
                                                          "dpo": _outcomes(GOOD_DPO, 200, s)})
        seeds[s] = run_figures(main)
        control = write_eval(tmp_path / f"seed{s}" / "sft", {"dpo": _outcomes({**BASE, "rag_fixed": 0.85}, 200, s)})
        controls["sft_chosen"][s] = control_figures(main, control)
    points = [{"value": v, **run_figures(write_eval(tmp_path / f"map{v}", {"base": _outcomes(BASE, 100),
                                                                           "dpo": _outcomes(dpo, 100)},
                                                     votes={"radiology_test_vqa": (vote, 50)}))}
              for v, dpo, vote in ((0.0, BASE, 0.6), (0.9, GOOD_DPO, 0.85))]
    effect = assemble(seeds, controls, "prior_share", points)
    assert set(effect) == {"seeds", "summary", "differences", "reference_vote_accuracy", "room", "controls", "map",
                           "regime"}
    assert effect["controls"]["sft_chosen"][1]["differences"]["accuracy_rag_fixed"]["diff"] == pytest.approx(0.05)
    assert [p["reference_vote_accuracy"] for p in effect["map"]["points"]] == [0.6, 0.85]
    assert effect["map"]["points"][0]["differences"]["copy_rate"]["diff"] == 0
    holds = {r["check"]: r["holds"] for r in effect["regime"]}
    assert holds["base accuracy without retrieval"] and holds["reference vote accuracy"]
    assert holds["DPO − base RAG accuracy"] and holds["DPO − base copy rate"]  # +0.15 and −0.23 on 200 questions
    md = markdown(json.loads(json.dumps(effect)))  # as read back from effect.json
    assert "`sft_chosen` supervised tuning on the chosen answers" in md and "`dpo_cm`" not in md
    assert "## Controls" in md and "| sft_chosen | 1 | 0.850 [0.794, 0.893] | +0.050 [" in md
    sft_row = next(line for line in md.splitlines() if line.startswith("| sft_chosen | 1 |"))
    assert sft_row.split(" | ")[5].startswith("+0.100 [")  # dpo − sft_chosen in RAG accuracy: 0.95 − 0.85
    assert "| dpo | 0 | 0.950 [0.910, 0.973] | +0.150 [" in md
    assert "| 0 | base | 200 | 0.750 [0.686, 0.805] | 0.800 [" in md  # every rate with its n and interval
    assert "| sft_chosen | 0.750 ± 0.000 | 0.850 ± 0.000 |" in md
    assert "## Effect map: prior_share" in md and "| 0.9 | 0.850 | 0.800 [0.711, 0.867] | 0.950 [0.888, 0.978] | +0.150 [" in md
    assert "over 100 questions per point" in md
    assert "| DPO − base copy rate | ≤ −0.05, every seed's 95% interval below 0 | -0.230 (3 of 3" in md
    assert "| base over-reliance | > 0 | 0.000 | **no** |" in md  # never right alone and wrong with references

    from evaluation.plots import plot_effect_map

    png = plot_effect_map(effect["map"], tmp_path / "effect_map.png")
    assert png is not None and png.stat().st_size > 1000
    assert plot_effect_map({"knob": "k", "points": []}, tmp_path / "none.png") is None


def test_no_controls_and_no_map_leave_their_sections_out(tmp_path):
    main = write_eval(tmp_path / "eval", {"base": _outcomes(BASE, 20), "dpo": _outcomes(BASE, 20)})
    effect = assemble({0: run_figures(main)}, {})
    assert "map" not in effect and effect["controls"] == {}
    md = markdown(effect)
    assert "## Controls" not in md and "## Effect map" not in md and "## Regime" in md
    assert "| DPO − base RAG accuracy | ≥ +0.05, every seed's 95% interval above 0 | +0.000 (0 of 1" in md


# ---------------------------------------------------------------- the driver, stages stubbed


def test_every_control_has_its_options_and_its_meaning():
    assert set(driver.CONTROLS) == set(CONTROLS)


def test_world_label_and_chain_folders(tmp_path):
    assert driver.world_label(["--size", "tiny", "--subtle_share", "0.5"]) == "size=tiny_subtle_share=0.5"
    runs = driver.seed_runs([0, 1], tmp_path, [])
    assert runs[0].chain == demo.OUT and runs[1].chain == tmp_path / "chains" / "seed1"  # seed 0: after the demo
    tiny = driver.seed_runs([0], tmp_path, ["--size", "tiny"])[0]
    assert tiny.chain == tmp_path / "chains" / "seed0_size=tiny" and tiny.eval_dir == tmp_path / "seed0" / "eval"
    point = driver.map_runs("subtle_share", ["0.5"], tmp_path, ["--size", "tiny"])[0]
    assert point.seed == 0 and point.world_args == ["--size", "tiny", "--subtle_share", "0.5"]
    assert point.chain == tmp_path / "chains" / "seed0_size=tiny_subtle_share=0.5"
    assert point.folder == tmp_path / "map" / "subtle_share=0.5"
    default, other = driver.map_runs("prior_share", ["0.0", "0.5"], tmp_path, [], runs)
    assert default is runs[0] and other.chain == tmp_path / "chains" / "seed0_prior_share=0.5"  # 0.0: the demo's world
    big = driver.seed_runs([0], tmp_path, ["--alignment_studies", "2000"])[0]
    assert big.chain == tmp_path / "chains" / "seed0_alignment_studies=2000"
    small, same = driver.map_runs("alignment_studies", ["200", "2000"], tmp_path, ["--alignment_studies", "2000"], [big])
    assert small.chain == demo.OUT and small.folder == tmp_path / "map" / "alignment_studies=200" and same is big
    earlier = tmp_path / "earlier" / "chains"  # --chains: a sweep on an earlier study's chains, its results its own
    swept = driver.seed_runs([0], tmp_path, ["--alignment_studies", "2000"], chains=earlier)[0]
    assert swept.chain == earlier / "seed0_alignment_studies=2000" and swept.eval_dir == tmp_path / "seed0" / "eval"
    mapped = driver.map_runs("prior_share", ["0.5"], tmp_path, [], chains=earlier)[0]  # the map's chains there too
    assert mapped.chain == earlier / "seed0_prior_share=0.5" and mapped.folder == tmp_path / "map" / "prior_share=0.5"
    assert driver.with_knob(["--report_miss", "0.3", "--size", "tiny"], "report_miss", "0.0") == [
        "--report_miss", "0.0", "--size", "tiny"]  # in place: the chain is named like a seed's in that world
    assert driver.with_knob(["--size", "tiny"], "report_miss", "0.0") == ["--size", "tiny", "--report_miss", "0.0"]
    assert driver.parse_args(["--chains", str(earlier)]).chains == earlier and driver.parse_args([]).chains is None


def test_stage_options_make_the_studys_own_chains(tmp_path):
    """Chains whose policy or retrieval differ from the configs' are never the demo's, nor a seed's made by the configs."""
    options = demo.stage_options("--reference_k 1", "--match image --k.k 1")
    by_image = ["--match", "image", "--k.k", "1"]
    assert options == {"make_toy_policy": ["--reference_k", "1"], "retrieve": by_image}
    assert demo.stage_options("", "") == {}
    seed0, = driver.seed_runs([0], tmp_path, [], options)
    assert seed0.chain == tmp_path / "chains" / "seed0_reference_k=1_match=image_k.k=1" and seed0.options == options
    default, point = driver.map_runs("prior_share", ["0.0", "0.5"], tmp_path, [], [seed0], options)
    assert default is seed0 and point.options == options
    assert point.chain == tmp_path / "chains" / "seed0_prior_share=0.5_reference_k=1_match=image_k.k=1"
    assert driver.map_runs("prior_share", ["0.0"], tmp_path, [], [seed0])[0].chain == demo.OUT
    chain = {s.name: s for s in demo.stages(seed0.chain, 0, [], "retrieve", options)}
    assert chain["retrieve"].cmd[-4:] == by_image and chain["make_toy_policy"].cmd[-2:] == ["--reference_k", "1"]
    study = driver.Study(driver.DPO_CONFIG, "configs/toy/evaluate.yaml", 0, ["val_vqa"], [], [])
    assert driver.settings(seed0, study)["stage_options"] == options
    assert "stage_options" not in driver.settings(driver.seed_runs([0], tmp_path, [])[0], study)  # earlier studies' results stand


def test_the_default_study_is_the_regime_chosen_on_validation(tmp_path):
    """The defaults: the study's world with priors, a base tuned with one reference, one report by image."""
    args = driver.parse_args([])
    options = demo.stage_options(args.policy_args, args.retrieve_args, args.clip_args)
    assert options == {"make_toy_policy": ["--reference_k", "1", "--p_correct", "1.0", "--train.stop_at", "0.72",
                                           "--data.noised_reference_rate", "0.3"],
                       "finetune_clip": ["--epochs", "3"], "retrieve": ["--match", "image", "--k.k", "1"]}
    seed0, = driver.seed_runs([0], tmp_path, shlex.split(args.world_args), options)
    assert seed0.chain.name == ("seed0_alignment_studies=750_prior_share=0.9_report_miss=0.3"
                                "_reference_k=1_p_correct=1.0_train.stop_at=0.72_data.noised_reference_rate=0.3_epochs=3_match=image_k.k=1")
    chain = {s.name: s for s in demo.stages(seed0.chain, 0, seed0.world_args, "retrieve", options)}
    assert chain["finetune_clip"].cmd[-2:] == ["--epochs", "3"]
    low, middle, high = driver.map_runs(args.map_knob, args.map_values, tmp_path, seed0.world_args, [seed0], options)
    assert middle is seed0  # 0.3: seed 0's own world
    assert low.chain.name == seed0.chain.name.replace("report_miss=0.3", "report_miss=0.0")
    assert high.world_args[-2:] == ["--report_miss", "0.6"]
    # a corpus knob: the map's chains start from seed 0's tower, which only seed 0 pretrains
    assert low.tower_from == high.tower_from == seed0.chain and seed0.tower_from is None
    shared = {s.name: s for s in demo.stages(low.chain, 0, low.world_args, "retrieve", options, low.tower)}
    assert "pretrain_clip_tower" not in shared
    for name in ("make_toy_policy", "finetune_clip"):
        assert str(seed0.chain / "clip_init" / demo.TOWER) in shared[name].cmd, name
        assert shared[name].inputs == [low.chain / "world", seed0.chain / "clip_init" / demo.TOWER]
        assert "pretrain_clip_tower" not in shared[name].after
    other, = driver.map_runs("subtle_share", ["0.1"], tmp_path, seed0.world_args, [seed0], options)
    assert other.tower_from is None  # it draws other images: its own tower
    again = driver.parse_args(["--world_args", "", "--policy_args", "", "--clip_args", "", "--retrieve_args", ""])
    options = demo.stage_options(again.policy_args, again.retrieve_args, again.clip_args)
    assert driver.seed_runs([0], tmp_path, [], options)[0].chain == demo.OUT


class Stub:
    """Records chain runs and stage commands; a stubbed evaluation writes hand-made results."""

    def __init__(self):
        self.chains: list[tuple] = []
        self.commands: list[tuple[str, list[str]]] = []
        self.rooms: list[tuple] = []
        self.stages = {"build_pairs": "fingerprint 0", "train_dpo": "fingerprint 1"}  # every chain's plan

    def chain_plan(self, run):
        return [(name, fp, False) for name, fp in self.stages.items()]

    def room(self, chain, roles, limit=0):
        self.rooms.append((Path(chain), list(roles), limit))
        rate = {"accuracy": 0.9, "low": 0.8, "high": 0.95}
        return {"n": 30, "roles": list(roles), "fit_roles": ["val_vqa"], "base_no_rag": rate, "base_rag": rate,
                "reference_vote": rate, "combined": rate, "room": {"diff": 0.06, "low": 0.01, "high": 0.11, "n": 30}}

    def reference_split(self, run, study):
        where = lambda acc: {"n": 30, "accuracy": acc, "agrees_with_vote": 0.9,  # noqa: E731
                             "vote_right": {"n": 27, "accuracy": acc + 0.05},
                             "vote_wrong": {"n": 3, "accuracy": 0.1, "by_kind": {"marked": {"n": 2, "accuracy": acc - 0.35}}}}
        return {"base": {"rag_fixed": where(0.85), "no_rag": where(0.95)}, "dpo": {"rag_fixed": where(0.87)}}

    def run_chain(self, out, seed, world_args=(), force=False, start=None, until=None, options=None, tower=None):
        self.chains.append((Path(out), seed, list(world_args), until) + ((options,) if options else ())
                           + ((tower,) if tower else ()))

    def python(self, module: str, *args: str) -> None:
        self.commands.append((module, list(args)))
        if module != "evaluation.evaluate":
            return
        opt = {args[i]: args[i + 1] for i in range(1, len(args) - 1) if args[i].startswith("--")}  # last one wins
        policies = opt["--policies"].strip("[]").split(",")
        write_eval(Path(opt["--out"]), {p: _outcomes(BASE if p == "base" else GOOD_DPO, 30) for p in policies})
        (Path(opt["--out"]) / "threads.txt").write_text(os.environ.get("OMP_NUM_THREADS", "unset"))


def stubbed(monkeypatch) -> Stub:
    """The driver with its chains, stage commands and room measurement recorded instead of run."""
    stub = Stub()
    monkeypatch.setattr(demo, "run_chain", stub.run_chain)
    monkeypatch.setattr(driver, "_python", stub.python)
    monkeypatch.setattr(driver, "room", stub.room)
    monkeypatch.setattr(driver, "reference_split", stub.reference_split)
    monkeypatch.setattr(driver, "chain_plan", stub.chain_plan)
    return stub


def run_driver(argv: list[str]) -> None:
    """The driver in this process (``--jobs 1`` unless the test gives more), so the stubs record what it runs."""
    driver.main(["--jobs", "1", *argv])


def test_driver_runs_chains_controls_and_map_once(tmp_path, monkeypatch, capsys):
    stub = stubbed(monkeypatch)
    out = tmp_path / "effect"
    argv = ["--seeds", "0", "1", "--out", str(out), "--limit", "7", "--controls", "dpo_cm", "sft_chosen",
            "--control_seeds", "0", "1", "--map_knob", "subtle_share", "--map_values", "0.1", "0.6",
            "--world_args", "", "--policy_args", "", "--clip_args", "", "--retrieve_args", ""]
    run_driver(argv)
    assert stub.chains == [(demo.OUT, 0, [], "train_dpo"), (out / "chains" / "seed1", 1, [], "train_dpo"),
                           (out / "chains" / "seed0_subtle_share=0.1", 0, ["--subtle_share", "0.1"], "train_dpo"),
                           (out / "chains" / "seed0_subtle_share=0.6", 0, ["--subtle_share", "0.6"], "train_dpo")]
    trains = [args for module, args in stub.commands if module == "dpo.train_dpo"]
    assert len(trains) == 4  # 2 controls x 2 seeds; the main method is the chain's own DPO
    sft = next(a for a in trains if str(out / "seed1" / "controls" / "sft_chosen" / "dpo") in a)
    assert sft[-4:] == ["--loss_type", "sft", "--sft_weight", "0"] and "--train.seed" in sft
    evals = [args for module, args in stub.commands if module == "evaluation.evaluate"]
    main_eval = next(a for a in evals if str(out / "seed1" / "eval") in a)
    assert str(out / "chains" / "seed1" / "dpo" / "adapter") in main_eval
    assert main_eval[main_eval.index("--limit") + 1] == "7" and "[no_rag,rag_fixed,noised_rag]" in main_eval
    assert main_eval[main_eval.index("--noise.seed") + 1] == "1"

    assert stub.rooms == [(demo.OUT, ["test_vqa"], 7), (out / "chains" / "seed1", ["test_vqa"], 7),
                          (out / "chains" / "seed0_subtle_share=0.1", ["test_vqa"], 7),
                          (out / "chains" / "seed0_subtle_share=0.6", ["test_vqa"], 7)]
    effect = json.loads((out / "effect.json").read_text())
    assert set(effect["controls"]) == {"dpo_cm", "sft_chosen"} and set(effect["controls"]["dpo_cm"]) == {"0", "1"}
    assert [p["value"] for p in effect["map"]["points"]] == [0.1, 0.6]
    assert effect["room"]["1"]["room"]["diff"] == 0.06 and effect["map"]["points"][1]["room"]["n"] == 30
    md = (out / "effect.md").read_text()
    assert "| seed 1 | 30 | 0.900 | 0.900 | 0.900 [0.800, 0.950] | +0.060 [+0.010, +0.110] | +0.133 [" in md
    assert "] | 27 / 3 | 0.900 / 0.100 | 0.920 / 0.100 | (2) 0.600 / 0.500, 0.520 |" in md
    assert effect["room"]["1"]["by_reference"]["dpo"]["rag_fixed"]["vote_right"]["n"] == 27
    assert (out / "effect.md").is_file() and (out / "effect_map.png").is_file()
    printed = capsys.readouterr().out
    assert "[effect] seed 1 sft_chosen: training and evaluation" in printed and "done in" in printed

    stub.chains.clear(), stub.commands.clear(), stub.rooms.clear()
    run_driver(argv)  # everything there: nothing redone
    assert stub.chains == [] and stub.commands == [] and stub.rooms == []
    assert "results exist, not redone" in capsys.readouterr().out
    stub.stages = {"build_pairs": "fingerprint 2", "train_dpo": "fingerprint 3"}  # the pairs changed (code, config or input)
    run_driver(argv)
    assert len(stub.chains) == 4 and len(stub.rooms) == 4
    assert len([c for c in stub.commands if c[0] == "evaluation.evaluate"]) == 4 + 4  # the runs and the controls
    assert "is not as it was when its results were made, redone" in capsys.readouterr().out
    stub.chains.clear(), stub.commands.clear(), stub.rooms.clear()
    with pytest.raises(SystemExit, match=r"seed0/eval: its results were made with other settings \(limit\)"):
        run_driver([*argv[:argv.index("--limit")], "--limit", "8", *argv[argv.index("--limit") + 2:]])
    assert stub.commands == []

    run_driver(["--seeds", "2", "--out", str(out), "--controls", "--map_values", "--dpo_args", "--beta 0.5"])
    # the study's own world and stage options by default; its own DPO: the chain stops before
    label = ("seed2_alignment_studies=750_prior_share=0.9_report_miss=0.3_reference_k=1_p_correct=1.0_train.stop_at=0.72"
             "_data.noised_reference_rate=0.3_epochs=3_match=image_k.k=1")
    options = {"make_toy_policy": ["--reference_k", "1", "--p_correct", "1.0", "--train.stop_at", "0.72",
                                   "--data.noised_reference_rate", "0.3"],
               "finetune_clip": ["--epochs", "3"], "retrieve": ["--match", "image", "--k.k", "1"]}
    world = ["--alignment_studies", "750", "--prior_share", "0.9", "--report_miss", "0.3"]
    assert stub.chains == [(out / "chains" / label, 2, world, "build_pairs", options)]
    (module, train), = [c for c in stub.commands if c[0] == "dpo.train_dpo"]
    assert train[-2:] == ["--beta", "0.5"] and str(out / "seed2" / "dpo") in train
    effect = json.loads((out / "effect.json").read_text())
    assert effect["controls"] == {} and "map" not in effect and list(effect["seeds"]) == ["2"]


def test_jobs_run_in_workers_with_a_log_each_and_give_the_same_study(tmp_path, monkeypatch, capsys):
    stub = stubbed(monkeypatch)
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # as an empty `OMP_NUM_THREADS= cmd` leaves it: not a number of threads
    argv = ["--seeds", "0", "1", "--limit", "7", "--controls", "sft_chosen", "--control_seeds", "0", "1",
            "--map_knob", "subtle_share", "--map_values", "0.1"]
    run_driver([*argv, "--out", str(tmp_path / "one")])
    capsys.readouterr()
    run_driver([*argv, "--out", str(tmp_path / "two"), "--jobs", "2"])
    printed = capsys.readouterr().out
    assert "seed 1: queued (2 at a time" in printed and "[effect] seed 1 sft_chosen: done in" in printed
    assert "[effect] seed 1: chain" not in printed  # a worker's own lines go to its log
    assert "[effect] seed 1: evaluation" in (tmp_path / "two" / "seed1" / "effect.log").read_text()
    assert "sft_chosen: training" in (tmp_path / "two" / "seed0" / "controls" / "sft_chosen" / "effect.log").read_text()
    one, two = (json.loads((tmp_path / d / "effect.json").read_text()) for d in ("one", "two"))
    assert one == two
    share = str(max(1, len(os.sched_getaffinity(0)) // 2))
    assert (tmp_path / "two" / "seed1" / "eval" / "threads.txt").read_text() == share  # each worker its share


def _timed(path: Path, seconds: float) -> None:
    """A job that takes ``seconds`` and records when it started and ended."""
    start = time.time()
    time.sleep(seconds)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{start} {time.time()}")


def test_a_control_starts_once_its_chain_is_built_and_not_before(tmp_path, monkeypatch):
    """Two workers: the fast chain's worker takes the next chain at once; the control waits for its
    slow chain (the first job on that chain builds it), as does a map point starting from its tower,
    then runs beside whatever runs."""
    stubbed(monkeypatch)

    def job(label: str, seconds: float, chain: str) -> driver.Job:
        run = driver.Run(label, 0, tmp_path / chain, [], tmp_path / label)
        return driver.Job(label, _timed, (tmp_path / "times" / label, seconds), run.eval_dir, run.folder / "effect.log",
                          {}, run, "train_dpo")

    point = job("point", 0.1, "d")
    point.run.tower_from = tmp_path / "a"  # a map point starting from the slow chain's tower
    driver.run_jobs([job("slow", 1.5, "a"), job("fast", 0.1, "b"), point, job("next", 0.1, "c"),
                     job("control", 0.1, "a")], 2)
    times = {p.name: [float(t) for t in p.read_text().split()] for p in (tmp_path / "times").iterdir()}
    assert times["control"][0] >= times["slow"][1] and times["point"][0] >= times["slow"][1]  # after that chain
    assert times["next"][0] < times["slow"][1]  # the other worker did not wait


def test_controls_run_on_the_first_seed_by_default_and_compare_on_it_alone(tmp_path, monkeypatch):
    stub = stubbed(monkeypatch)
    out = tmp_path / "effect"
    run_driver(["--seeds", "3", "1", "--out", str(out), "--controls", "sft_chosen", "--map_values"])
    trains = [args for module, args in stub.commands if module == "dpo.train_dpo"]
    assert len(trains) == 1 and str(out / "seed3" / "controls" / "sft_chosen" / "dpo") in trains[0]
    effect = json.loads((out / "effect.json").read_text())
    assert list(effect["controls"]["sft_chosen"]) == ["3"] and set(effect["seeds"]) == {"1", "3"}
    controls = (out / "effect.md").read_text().split("## Controls")[1]
    assert "over seeds 3." in controls and "| dpo | 1 |" not in controls and "| dpo | 3 |" in controls
    with pytest.raises(SystemExit):
        run_driver(["--seeds", "0", "--control_seeds", "1", "--out", str(out)])


def test_a_failed_run_in_a_worker_stops_the_study_naming_its_log(tmp_path, monkeypatch):
    stub = Stub()
    monkeypatch.setattr(demo, "run_chain", stub.run_chain)

    def python(module: str, *args: str) -> None:
        if "--loss_type" in args and any("seed1" in a for a in args):
            raise SystemExit(1)  # as a failed stage ends
        stub.python(module, *args)

    monkeypatch.setattr(driver, "_python", python)
    out = tmp_path / "effect"
    with pytest.raises(SystemExit, match=r"seed 1 sft_chosen failed \(SystemExit: 1\); its output: .*effect\.log"):
        run_driver(["--seeds", "0", "1", "--out", str(out), "--controls", "sft_chosen", "--control_seeds", "0", "1",
                     "--map_values", "--jobs", "2"])
    assert not (out / "effect.json").exists()


def test_an_unknown_map_knob_stops_before_any_run(monkeypatch, capsys):
    stub = Stub()
    monkeypatch.setattr(demo, "run_chain", stub.run_chain)
    with pytest.raises(SystemExit):
        run_driver(["--map_knob", "no_such_knob"])
    assert "not a make_toy option" in capsys.readouterr().err and stub.chains == []


# ---------------------------------------------------------------- the whole study on a tiny world

TINY = {  # a tiny world's chain in about two minutes on 2 busy cores
    "make_toy_policy": ["--reading_steps", "2", "--train.max_steps", "2", "--measure.limit", "4"],
    "pretrain_clip_tower": ["--epochs", "1"],
    "finetune_clip": ["--epochs", "1", "--classifier.steps", "5"],
    "build_pairs": ["--limit", "12", "--report_threshold", "0"],  # every report right: a 2-step policy still yields D_cm pairs
    "train_dpo": ["--train.max_steps", "2"],
}


@pytest.mark.slow
def test_effect_study_on_a_tiny_world(tmp_path, monkeypatch):
    """One whole-chain seed on a tiny world, its evaluation and the sft_chosen control, as
    `bash scripts/effect.sh` runs them (stage sizes cut through the chain's stage options)."""
    stage_args = demo.stage_args
    monkeypatch.setattr(demo, "stage_args",
                        lambda name, out, seed, tower=None: stage_args(name, out, seed, tower) + TINY.get(name, []))
    out = tmp_path / "effect"
    run_driver(["--seeds", "1", "--out", str(out), "--world_args", "--size tiny", "--limit", "4",
                 "--controls", "sft_chosen", "--map_values"])
    # the default stage options
    chain = out / "chains" / ("seed1_size=tiny_reference_k=1_p_correct=1.0_train.stop_at=0.72"
                              "_data.noised_reference_rate=0.3_epochs=3_match=image_k.k=1")
    assert (chain / "dpo" / "adapter" / "adapter_config.json").is_file() and not (chain / "eval").exists()
    effect = json.loads((out / "effect.json").read_text())
    assert set(effect["seeds"]["1"]) == {"base", "dpo"}
    d = effect["differences"]["1"]["accuracy_rag_fixed"]
    assert d["low"] <= d["diff"] <= d["high"] and d["n"] > 0
    sft = effect["controls"]["sft_chosen"]["1"]
    assert sft["differences"]["copy_rate"]["n"] == d["n"]  # paired with the main base on the same questions
    config = (out / "seed1" / "controls" / "sft_chosen" / "dpo" / "run_config.yaml").read_text()
    assert "loss_type: sft" in config and "seed: 1" in config
    assert 0 <= effect["reference_vote_accuracy"]["1"] <= 1
    assert "## Regime" in (out / "effect.md").read_text()


def test_chain_state_is_the_stages_fingerprints_once_they_all_ran(tmp_path):
    run = driver.Run("seed 0", 0, tmp_path / "chain", [], tmp_path / "seed0")
    assert driver.chain_state(driver.chain_plan(run), "retrieve") is None  # nothing ran yet
    chain = demo.stages(run.chain, 0, [], "retrieve")
    for stage in chain:
        stage.output.mkdir(parents=True, exist_ok=True)
    for stage, fp, _ in plan(chain):  # as if every stage had run
        atomic_write_json(stamp_path(stage), {"fingerprint": fp})
    state = driver.chain_state(driver.chain_plan(run), "retrieve")
    assert list(state) == [s.name for s in chain] and state == {s.name: fp for s, fp, _ in plan(chain)}
    (run.chain / "world" / "more.txt").write_text("a file the world did not have")
    assert driver.chain_state(driver.chain_plan(run), "retrieve") is None  # the world changed: stages would run


def test_a_second_study_into_the_same_folder_stops_at_once(tmp_path, monkeypatch):
    """Two studies in one --out would run the same chains' controls and evaluations twice, over each other."""
    stub = stubbed(monkeypatch)
    out = tmp_path / "effect"
    proc = holder(out)  # another study, alive, holding the folder
    try:
        with pytest.raises(InputError, match=rf"{out}: another run is writing here \(pid {proc.pid} "):
            run_driver(["--seeds", "1", "--out", str(out), "--controls", "--map_values"])
    finally:
        proc.kill()
        proc.wait()
    assert stub.chains == [] and stub.commands == []
    run_driver(["--seeds", "1", "--out", str(out), "--controls", "--map_values"])  # once it has ended
    assert len(stub.chains) == 1 and not (out / LOCK_FILE).exists()


def test_driver_passes_stage_options_to_every_chain(tmp_path, monkeypatch):
    stub = stubbed(monkeypatch)
    out = tmp_path / "effect"
    run_driver(["--seeds", "0", "--out", str(out), "--controls", "--map_knob", "subtle_share", "--map_values", "0.6",
                 "--world_args", "", "--clip_args", "", "--retrieve_args", "--match image", "--policy_args", "--reference_k 1"])
    options = {"make_toy_policy": ["--reference_k", "1"], "retrieve": ["--match", "image"]}
    assert stub.chains == [(out / "chains" / "seed0_reference_k=1_match=image", 0, [], "train_dpo", options),
                           (out / "chains" / "seed0_subtle_share=0.6_reference_k=1_match=image", 0, ["--subtle_share", "0.6"], "train_dpo",
                            options)]
    assert json.loads((out / "seed0" / "eval" / "study.json").read_text())["stage_options"] == options
