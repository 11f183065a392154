"""The effect study's figures: base vs DPO and its controls, per seed and per world setting.

``pipeline.effect`` (``bash scripts/effect.sh``) makes the runs; this module reads what
``evaluation.evaluate`` wrote for each of them (``results.json``, ``predictions.jsonl``) and turns
it into ``effect.json`` and ``effect.md``. Everything here is a function of those files, so the
tables are tested on hand-made ones.

Two spreads are reported because they answer different questions: the mean ± sample standard
deviation over seeds says how much a whole re-run moves a figure, and the paired difference DPO −
base with a 95% bootstrap interval over questions, per seed, says how many questions a difference
rests on. A control is evaluated alone and paired with its seed's base on the same questions.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from common.io import read_jsonl
from common.stats import paired_interval, resamples, wilson

METRICS = ("accuracy_no_rag", "accuracy_rag_fixed", "copy_rate", "over_reliance_rate")
CONDITIONS = ("no_rag", "rag_fixed", "noised_rag")  # what the study evaluates; rag_adaptive is left out
CONTROL_METRICS = ("accuracy_rag_fixed", "copy_rate")  # the paper's two claims
CONTROLS = {  # what each control changes against the main method (pipeline.effect trains them)
    "dpo_cm": "DPO on D_cm alone",
    "dpo_oa": "DPO on D_oa1 + D_oa2 alone",
    "dpo_ordered": "DPO in the paper's order: each epoch D_cm first, then D_oa",
    "sft_chosen": "supervised tuning on the chosen answers (loss_type sft)",
}
LABELS = {"accuracy_no_rag": "acc no RAG", "accuracy_rag_fixed": "acc RAG", "copy_rate": "copy rate",
          "over_reliance_rate": "over-reliance"}
# The regime in which the paper's effect can show on the toy (docs/DESIGN.md, the effect study).
MIN_BASE_NO_RAG = 0.70  # the base reads the image: there is something for D_cm to protect
VOTE_RANGE = (0.70, 0.90)  # the references carry the answer often, not always: D_oa has both cases
MAX_COPY_GAP = 0.05  # RAG accuracy - copy rate: a noised image barely hurts the base, so it copies
MIN_EFFECT = 0.05  # DPO - base: RAG accuracy up and copy rate down by at least this much

Outcomes = dict[str, dict[str, np.ndarray]]
Differences = dict[str, dict[str, float]]


def question_outcomes(predictions: Path | Mapping[str, Path | tuple[Path, str]]) -> Outcomes:
    """{policy: {metric: 0/1 per question}} over the yes/no questions every policy answered in
    no_rag, rag_fixed and noised_rag, in one question order (``evaluation.evaluate`` predictions).

    ``predictions`` is one evaluation's file, or {policy: file} taking each policy from its own
    evaluation (a control's ``dpo`` paired with the main run's ``base``), or {name: (file,
    policy)} taking that policy under another name (the main ``dpo`` against a control's)."""
    if isinstance(predictions, (str, Path)):
        sources: dict[str | None, tuple[Path, str | None]] = {None: (Path(predictions), None)}
    else:
        sources = {name: (Path(src[0]), src[1]) if isinstance(src, tuple) else (Path(src), name)
                   for name, src in predictions.items()}
    rows = {path: read_jsonl(path) for path, _ in sources.values()}  # each file read once
    correct: dict[tuple, bool] = {}
    for name, (path, policy) in sources.items():
        for row in rows[path]:
            if row["task"] == "vqa" and row.get("correct") is not None and policy in (None, row["policy"]):
                key = row["policy"] if name is None else name
                correct[(key, row["condition"], row["file"], row["index"])] = bool(row["correct"])
    policies = sorted({k[0] for k in correct})
    questions = sorted({k[2:] for k in correct
                        if all((p, c, *k[2:]) in correct for p in policies for c in CONDITIONS)})
    out = {}
    for p in policies:
        got = {c: np.array([correct[(p, c, *q)] for q in questions], dtype=float) for c in CONDITIONS}
        out[p] = {"accuracy_no_rag": got["no_rag"], "accuracy_rag_fixed": got["rag_fixed"],
                  "copy_rate": got["noised_rag"], "over_reliance_rate": got["no_rag"] * (1 - got["rag_fixed"])}
    return out


def paired_differences(outcomes: Outcomes, n_boot: int = 2000, seed: int = 0,
                       policy: str = "dpo", minus: str = "base") -> Differences:
    """``policy`` − ``minus`` (DPO − base by default) per metric with a 95% percentile bootstrap
    interval: questions are resampled, and each resample scores both policies on the same
    questions (a paired comparison)."""
    if not {policy, minus} <= outcomes.keys():
        return {}
    n = len(outcomes[minus]["copy_rate"])
    if n == 0:
        return {}
    draws = resamples(n, n_boot, seed)
    out = {}
    for m in METRICS:
        diff = outcomes[policy][m] - outcomes[minus][m]
        low, high = paired_interval(diff, draws)
        out[m] = {"diff": float(diff.mean()), "low": low, "high": high, "n": n}
    return out


def summarise(runs: dict[int, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """{policy: {metric: {"mean", "std", "n"}}} over seeds (std: sample, 0 for one seed)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for policy in sorted({p for diag in runs.values() for p in diag}):
        out[policy] = {}
        for m in METRICS:
            xs = [diag[policy][m] for diag in runs.values()
                  if policy in diag and diag[policy].get(m) is not None]
            if xs:
                out[policy][m] = {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
                                  "n": len(xs)}
    return out


# ---------------------------------------------------------------- one evaluation's figures


def _results(eval_dir: Path) -> dict[str, Any]:
    return json.loads((Path(eval_dir) / "results.json").read_text(encoding="utf-8"))


def reference_vote(results: dict[str, Any]) -> float | None:
    """The references' own yes/no accuracy (``reference_vote_accuracy``), n-weighted over the VQA
    files the evaluation scored, from its copy of the retrieval stage's ``retrieval_metrics.json``.
    The vote covers every record of a file, not only the first ``--limit``."""
    scored = {r["file"] for r in results.get("rows", []) if r["task"] == "vqa"}
    per_file = (results.get("retrieval") or {}).get("files") or {}
    votes = [(v["reference_vote_accuracy"], v["reference_vote_n"]) for name, v in per_file.items()
             if Path(name).stem in scored and "reference_vote_accuracy" in v]
    total = sum(n for _, n in votes)
    return sum(a * n for a, n in votes) / total if total else None


def run_figures(eval_dir: Path) -> dict[str, Any]:
    """{"diagnostics", "differences", "reference_vote_accuracy"} of an evaluation of base and DPO."""
    results = _results(eval_dir)
    return {"diagnostics": results["diagnostics"],
            "differences": paired_differences(question_outcomes(Path(eval_dir) / "predictions.jsonl")),
            "reference_vote_accuracy": reference_vote(results)}


def control_figures(base_eval: Path, control_eval: Path) -> dict[str, Any]:
    """{"diagnostics", "differences", "method_minus_control"} of a control evaluated alone (as
    policy ``dpo``): its own diagnostics, control − base paired with the main evaluation's base on
    the same questions, and the main method − control, paired the same way (does DPO beat it?)."""
    main = Path(base_eval) / "predictions.jsonl"
    outcomes = question_outcomes({"base": main, "method": (main, "dpo"),
                                  "dpo": Path(control_eval) / "predictions.jsonl"})
    return {"diagnostics": _results(control_eval)["diagnostics"].get("dpo", {}),
            "differences": paired_differences(outcomes),
            "method_minus_control": paired_differences(outcomes, policy="method", minus="dpo")}


# ---------------------------------------------------------------- the study


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _check(check: str, target: str, measured: float | None, holds: Callable[[float], bool]) -> dict[str, Any]:
    return {"check": check, "target": target, "measured": measured,
            "holds": None if measured is None else bool(holds(measured))}


def _effect_check(check: str, differences: dict[int, Differences], metric: str, sign: int) -> dict[str, Any]:
    """Mean DPO − base over seeds at least MIN_EFFECT in the direction ``sign``, and every seed's
    95% interval on that side of zero."""
    per_seed = [d[metric] for d in differences.values() if d and metric in d]
    side = "above" if sign > 0 else "below"
    row = _check(check, f"{'≥ +' if sign > 0 else '≤ −'}{MIN_EFFECT:.2f}, every seed's 95% interval {side} 0",
                 _mean([d["diff"] for d in per_seed]), lambda x: sign * x >= MIN_EFFECT)
    excluding = sum(1 for d in per_seed if (d["low"] > 0 if sign > 0 else d["high"] < 0))
    row.update(seeds=len(per_seed), seeds_excluding_zero=excluding)
    if row["holds"] is not None:
        row["holds"] = row["holds"] and excluding == len(per_seed)
    return row


def regime(runs: dict[int, dict[str, dict[str, Any]]], differences: dict[int, Differences],
           votes: dict[int, float | None], rooms: dict[int, dict[str, Any] | None] | None = None) -> list[dict[str, Any]]:
    """Whether the study ran in the regime where the paper's effect can show, and whether it
    showed: one row per check with its target, the measured mean over seeds, and whether it holds
    (None when not measured). ``rooms``: each seed's toy.room figures."""
    base = [d["base"] for d in runs.values() if "base" in d]

    def per_seed(f: Callable[[dict[str, Any]], float]) -> float | None:
        return _mean([f(b) for b in base if all(b.get(m) is not None for m in METRICS[:3])])

    low, high = VOTE_RANGE
    return [
        _check("base accuracy without retrieval", f"≥ {MIN_BASE_NO_RAG:.2f}",
               _mean([b.get("accuracy_no_rag") for b in base]), lambda x: x >= MIN_BASE_NO_RAG),
        _check("reference vote accuracy", f"{low:.2f}–{high:.2f}", _mean(list(votes.values())),
               lambda x: low <= x <= high),
        _check("base RAG − no-RAG accuracy", "> 0",
               per_seed(lambda b: b["accuracy_rag_fixed"] - b["accuracy_no_rag"]), lambda x: x > 0),
        _check("base RAG accuracy − copy rate (it copies)", f"≤ {MAX_COPY_GAP:.2f}",
               per_seed(lambda b: b["accuracy_rag_fixed"] - b["copy_rate"]), lambda x: x <= MAX_COPY_GAP),
        _check("base over-reliance", "> 0", _mean([b.get("over_reliance_rate") for b in base]), lambda x: x > 0),
        _check("room: combined − base RAG accuracy", f"≥ {MIN_EFFECT:.2f}",
               _mean([r["room"]["diff"] for r in (rooms or {}).values() if r]), lambda x: x >= MIN_EFFECT),
        _effect_check("DPO − base RAG accuracy", differences, "accuracy_rag_fixed", +1),
        _effect_check("DPO − base copy rate", differences, "copy_rate", -1),
    ]


def assemble(seeds: dict[int, dict[str, Any]], controls: dict[str, dict[int, dict[str, Any]]],
             knob: str | None = None, points: list[dict[str, Any]] = ()) -> dict[str, Any]:
    """effect.json from each seed's ``run_figures`` (with its toy.room figures as ``room`` when
    measured), each control's ``control_figures`` per seed and each map point's ``run_figures``
    with its ``value`` and ``room`` (no map without ``knob``)."""
    runs = {s: f["diagnostics"] for s, f in seeds.items()}
    differences = {s: f["differences"] for s, f in seeds.items()}
    votes = {s: f["reference_vote_accuracy"] for s, f in seeds.items()}
    rooms = {s: f.get("room") for s, f in seeds.items()}
    effect = {"seeds": runs, "summary": summarise(runs), "differences": differences,
              "reference_vote_accuracy": votes, "room": rooms, "controls": controls}
    if knob is not None:
        effect["map"] = {"knob": knob, "points": list(points)}
    effect["regime"] = regime(runs, differences, votes, rooms)
    return effect


# ---------------------------------------------------------------- effect.md


def _interval(d: dict[str, float] | None) -> str:
    return f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if d else "n/a"


def _n(differences: list[Differences]) -> str:
    """The question count(s) the intervals rest on: "848" or "190–200"."""
    ns = sorted({d[m]["n"] for d in differences if d for m in d})
    return "no" if not ns else str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"


def rate_interval(diag: dict[str, Any], metric: str) -> tuple[float, float, float] | None:
    """(rate, low, high): a rate of ``diag`` (one policy's diagnostics) and its 95% Wilson interval
    over the diagnostics' n questions; None when not measured."""
    x, n = diag.get(metric), diag.get("n")
    return None if x is None or not n else (x, *wilson(x * n, n))


def _with_interval(diag: dict[str, Any], metric: str) -> str:
    got = rate_interval(diag, metric)
    return "n/a" if got is None else "{:.3f} [{:.3f}, {:.3f}]".format(*got)


def seed_table(runs: dict[int, dict[str, dict[str, Any]]]) -> str:
    """Each seed's figures per policy, each with its n and 95% Wilson interval over questions."""
    lines = ["Per seed, each rate with its 95% Wilson interval over the seed's n questions.", "",
             "| seed | policy | n | " + " | ".join(LABELS[m] for m in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for s, diag in runs.items():
        for policy, d in diag.items():
            lines.append(f"| {s} | {policy} | {d.get('n', 'n/a')} | "
                         + " | ".join(_with_interval(d, m) for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


def _mean_table(summary: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines = ["| policy | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for policy, ms in summary.items():
        cells = [f"{ms[m]['mean']:.3f} ± {ms[m]['std']:.3f}" if m in ms else "n/a" for m in METRICS]
        lines.append(f"| {policy} | " + " | ".join(cells) + " |")
    return lines


def table(summary: dict[str, dict[str, dict[str, float]]], seeds: list[int],
          differences: dict[int, Differences] | None = None) -> str:
    """Mean ± sample std per policy over seeds, then DPO − base per seed with its interval."""
    lines = [f"Mean ± sample std over seeds {seeds}.", "", *_mean_table(summary)]
    rows = {s: d for s, d in (differences or {}).items() if d}
    if rows:
        n = _n(list(rows.values()))
        lines += ["", f"DPO − base per seed, 95% paired bootstrap interval over {n} questions.", "",
                  "| seed | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
        for s, d in rows.items():
            lines.append(f"| {s} | " + " | ".join(_interval(d.get(m)) for m in METRICS) + " |")
    return "\n".join(lines) + "\n"


def controls_table(effect: dict[str, Any]) -> str:
    """Each control beside the main method on the seeds the controls ran on: mean ± std over
    those seeds, then per seed its paired difference from base in RAG accuracy and copy rate."""
    controls = effect.get("controls") or {}
    if not controls:
        return ""
    seeds = {s for per in controls.values() for s in per}
    runs = {s: {**diag, **{name: per[s]["diagnostics"] for name, per in controls.items() if s in per}}
            for s, diag in effect["seeds"].items() if s in seeds}
    per_seed = {"dpo": {s: d for s, d in effect["differences"].items() if s in seeds}}
    per_seed.update({name: {s: f["differences"] for s, f in per.items()} for name, per in controls.items()})
    all_diffs = [d for by_seed in per_seed.values() for d in by_seed.values()]
    meaning = "; ".join(f"`{name}` {CONTROLS.get(name, '')}".rstrip() for name in controls)
    lines = ["## Controls", "",
             f"On the main method's pairs, base policy, engine, LoRA, prompts and images: {meaning}. "
             f"Mean ± sample std over seeds {', '.join(map(str, sorted(runs)))}.", "",
             *_mean_table(summarise(runs)), "",
             f"Method − base per seed, and the main method (dpo) − the control, 95% paired bootstrap "
             f"interval over {_n(all_diffs)} questions.", "",
             "| method | seed | acc RAG (95% Wilson) | " + " | ".join(f"Δ {LABELS[m]}" for m in CONTROL_METRICS)
             + " | " + " | ".join(f"dpo − it, {LABELS[m]}" for m in CONTROL_METRICS) + " |",
             "|---|---|---|" + "---|" * 2 * len(CONTROL_METRICS)]
    for name, by_seed in per_seed.items():
        for s, d in by_seed.items():
            own = _with_interval(runs.get(s, {}).get(name, {}), "accuracy_rag_fixed")
            vs = controls[name][s].get("method_minus_control") or {} if name in controls else None
            lines.append(f"| {name} | {s} | {own} | "
                         + " | ".join(_interval((d or {}).get(m)) for m in CONTROL_METRICS) + " | "
                         + " | ".join(_interval(vs.get(m)) if vs is not None else "—" for m in CONTROL_METRICS) + " |")
    return "\n".join(lines) + "\n"


def room_table(effect: dict[str, Any]) -> str:
    """Per seed and map point: what the base's image reading and its references, combined as well
    as a per-domain logistic rule fitted on validation questions allows, would answer (toy.room),
    beside what the base and DPO answer with references."""
    rows = [(f"seed {s}", r, effect["differences"].get(s)) for s, r in (effect.get("room") or {}).items() if r]
    knob = (effect.get("map") or {}).get("knob")
    rows += [(f"{knob} = {_value(p['value'])}", p["room"], p["differences"])
             for p in (effect.get("map") or {}).get("points", []) if p.get("room")]
    if not rows:
        return ""
    lines = ["## Room for the effect", "",
             "What the base would answer by trusting its references as much as they deserve: a logistic combiner of "
             "its own image reading (yes − no logit without references) and the references' vote share, one per "
             "domain, fitted on val_vqa (toy.room). Room = combined − base RAG accuracy, 95% paired bootstrap "
             "interval; beside it what DPO took of it, and base and DPO accuracy with references where their vote "
             "is right / wrong (n of each): a base that copies is right only where they are. Last, where the vote "
             "is wrong about a finding the image shows plainly (a marked one): the base without references, with "
             "them, and DPO with them; DPO can resist wrong references only where the image tells.", "",
             "| run | n | base acc RAG | reference vote | combined (95% Wilson) | room | DPO − base acc RAG "
             "| vote right / wrong | base RAG there | DPO RAG there | vote wrong, marked (n): base no RAG / RAG, DPO RAG |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, r, d in rows:
        combined = r["combined"]
        split = r.get("by_reference") or {}
        alone, base, dpo = ((split.get(p) or {}).get(c)
                            for p, c in (("base", "no_rag"), ("base", "rag_fixed"), ("dpo", "rag_fixed")))
        lines.append(f"| {label} | {r['n']} | {r['base_rag']['accuracy']:.3f} | {r['reference_vote']['accuracy']:.3f} | "
                     f"{combined['accuracy']:.3f} [{combined['low']:.3f}, {combined['high']:.3f}] | "
                     f"{_interval(r['room'])} | {_interval((d or {}).get('accuracy_rag_fixed'))} | "
                     f"{_where(base, 'n')} | {_where(base, 'accuracy')} | {_where(dpo, 'accuracy')} | "
                     f"{_marked_wrong(alone, base, dpo)} |")
    return "\n".join(lines) + "\n"


def _where(split: dict[str, Any] | None, key: str) -> str:
    """``key`` where the vote is right / where it is wrong, from a toy.room.by_reference entry."""
    if not split:
        return "–"
    right, wrong = split["vote_right"][key], split["vote_wrong"][key]
    return " / ".join(str(v) if key == "n" else _fmt(v) for v in (right, wrong))


def _marked_wrong(*splits: dict[str, Any] | None) -> str:
    """Accuracy where the vote is wrong on a marked finding, from toy.room.by_reference entries
    (base without and with references, DPO with them)."""
    cells = [(s or {}).get("vote_wrong", {}).get("by_kind", {}).get("marked") for s in splits]
    if not all(cells):  # a study made before the split by kind
        return "–"
    return f"({cells[0]['n']}) {_fmt(cells[0]['accuracy'])} / {_fmt(cells[1]['accuracy'])}, {_fmt(cells[2]['accuracy'])}"


def _value(v: float | str) -> str:
    """A map value as the tables print it: 0.9, not 0.900000."""
    return f"{v:g}" if isinstance(v, float) else str(v)


def _fmt(x: float | None, signed: bool = False) -> str:
    return "n/a" if x is None else f"{x:+.3f}" if signed else f"{x:.3f}"


def map_table(effect_map: dict[str, Any] | None) -> str:
    """One row per knob value: the references' vote, base and DPO RAG accuracy, DPO − base."""
    if not effect_map or not effect_map["points"]:
        return ""
    knob, points = effect_map["knob"], effect_map["points"]
    lines = [f"## Effect map: {knob}", "",
             f"One whole chain (seed 0) per value of `{knob}`; DPO − base with a 95% paired bootstrap interval "
             f"over {_n([p['differences'] for p in points])} questions per point. Plot: effect_map.png.", "",
             f"| {knob} | reference vote | base acc RAG (95% Wilson) | DPO acc RAG (95% Wilson) | Δ acc RAG | Δ copy rate |",
             "|---|---|---|---|---|---|"]
    for p in points:
        diag, d = p["diagnostics"], p["differences"] or {}
        lines.append(f"| {_value(p['value'])} | {_fmt(p['reference_vote_accuracy'])} | "
                     f"{_with_interval(diag.get('base', {}), 'accuracy_rag_fixed')} | "
                     f"{_with_interval(diag.get('dpo', {}), 'accuracy_rag_fixed')} | "
                     f"{_interval(d.get('accuracy_rag_fixed'))} | {_interval(d.get('copy_rate'))} |")
    return "\n".join(lines) + "\n"


def regime_table(rows: list[dict[str, Any]]) -> str:
    lines = ["## Regime", "",
             "Means over seeds. The first six say whether the toy is in the regime where the paper's effect can "
             "show; the last two whether it showed.", "",
             "| check | target | measured | holds |", "|---|---|---|---|"]
    for r in rows:
        measured = _fmt(r["measured"], signed="seeds" in r or "−" in r["check"])
        if "seeds" in r:
            measured += f" ({r['seeds_excluding_zero']} of {r['seeds']} seeds' intervals exclude 0)"
        holds = "n/a" if r["holds"] is None else "yes" if r["holds"] else "**no**"
        lines.append(f"| {r['check']} | {r['target']} | {measured} | {holds} |")
    return "\n".join(lines) + "\n"


def markdown(effect: dict[str, Any]) -> str:
    """effect.md: the main table, the controls, the effect map, the room and the regime check."""
    intro = ("# Effect study\n\nBase vs DPO, each seed a whole chain (world, base policy, retrievers, pairs, DPO) "
             "with that seed. Conditions no_rag, rag_fixed, noised_rag (copy rate = accuracy with a noised image and "
             "retrieval); over-reliance = right without retrieval and wrong with it.\n")
    sections = [intro, table(effect["summary"], list(effect["seeds"]), effect["differences"]),
                seed_table(effect["seeds"]), controls_table(effect), map_table(effect.get("map")), room_table(effect),
                regime_table(effect["regime"])]
    return "\n".join(s for s in sections if s)
