"""PNG plots of a pipeline run: training curves (CLIP, DPO) and the evaluation per condition.

Curves are read from each run's ``metrics.jsonl`` (common.metrics); metric names are matched by
pattern (``loss``, ``rewards/accuracies``... with an optional ``train/`` or ``eval/`` prefix), so
training and held-out curves share a panel. matplotlib's Agg backend: no display needed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.io import atomic_path  # noqa: E402
from evaluation.effect import rate_interval  # noqa: E402

Rows = list[dict[str, Any]]
CLIP_RECALL = re.compile(r"^val/(i2t_R@\d+|mean_recall|findings_mean_recall)$")


def read_metrics(path: str | Path) -> Rows:
    """Rows of a metrics.jsonl; a line that does not parse (a run killed mid-write) is skipped."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def series(rows: Rows, key: str, x: str = "step") -> tuple[list[float], list[float]]:
    """(x, y) of the rows holding a number under ``key`` (and ``x``)."""
    pts = [(r[x], r[key]) for r in rows if _num(r.get(key)) and _num(r.get(x))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _keys(rows: Rows, pattern: re.Pattern[str] | str) -> list[str]:
    pat = re.compile(pattern) if isinstance(pattern, str) else pattern
    return sorted({k for r in rows for k, v in r.items() if _num(v) and pat.search(k)})


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_clip_curves(clip_dir: str | Path, path: str | Path) -> Path | None:
    """Validation recall over epochs, one panel per domain (``<clip_dir>/<domain>/metrics.jsonl``)."""
    runs = {p.parent.name: read_metrics(p) for p in sorted(Path(clip_dir).glob("*/metrics.jsonl"))}
    runs = {d: rows for d, rows in runs.items() if _keys(rows, CLIP_RECALL)}
    if not runs:
        return None
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.4), squeeze=False, sharey=True)
    for ax, (domain, rows) in zip(axes[0], runs.items()):
        for key in _keys(rows, CLIP_RECALL):
            xs, ys = series(rows, key, x="epoch")
            ax.plot(xs, ys, marker="o", ms=3, label=key.removeprefix("val/"))
        ax.set_title(domain)
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation recall")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle("CLIP retrievers: validation recall")
    return _save(fig, Path(path))


_SPLIT = r"^(train/|eval/)?"  # training rows and held-out evaluations; per-pair-type keys left out
DPO_PANELS = (
    ("loss", re.compile(_SPLIT + r"loss$")),
    ("reward accuracy", re.compile(_SPLIT + r"rewards?/accurac")),
    ("reward margin", re.compile(_SPLIT + r"rewards?/margins?$")),
    ("rewards (chosen / rejected)", re.compile(_SPLIT + r"rewards?/(chosen|rejected)$")),
)


def plot_dpo_curves(metrics_path: str | Path, path: str | Path) -> Path | None:
    """DPO loss, reward accuracy, reward margin (and chosen/rejected rewards) over steps."""
    if not Path(metrics_path).is_file():
        return None
    rows = read_metrics(metrics_path)
    panels = [(title, keys) for title, pat in DPO_PANELS if (keys := _keys(rows, pat))]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            xs, ys = series(rows, key)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("DPO training")
    return _save(fig, Path(path))


def plot_conditions(results: dict[str, Any], path: str | Path) -> Path | None:
    """VQA accuracy per condition and policy (all files pooled), and copy / over-reliance rates."""
    diag = results.get("diagnostics") or {}
    if not diag:
        return None
    policies = list(diag)
    conditions = [c for c in ("no_rag", "rag_fixed", "rag_adaptive", "noised_rag")
                  if any(f"accuracy_{c}" in d for d in diag.values())]
    rates = [("copy_rate", "copy rate"), ("over_reliance_rate", "over-reliance\n(fixed k)"),
             ("over_reliance_rate_adaptive", "over-reliance\n(adaptive k)")]
    rates = [(k, label) for k, label in rates if any(d.get(k) is not None for d in diag.values())]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [len(conditions) or 1, len(rates) or 1]})
    width = 0.8 / len(policies)
    for panel, (ax, groups, title) in enumerate(((axes[0], [(c, c) for c in conditions], "VQA accuracy per condition"),
                                                 (axes[1], rates, "misalignment diagnostics"))):
        for i, p in enumerate(policies):
            keys = [f"accuracy_{k}" if panel == 0 else k for k, _ in groups]
            ys = [diag[p].get(k) or 0.0 for k in keys]
            xs = [j + (i - (len(policies) - 1) / 2) * width for j in range(len(groups))]
            bars = ax.bar(xs, ys, width, label=p)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_xticks(range(len(groups)), [label for _, label in groups], fontsize=8)
        ax.set_ylim(0, 1.1)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("share of yes/no questions")
    axes[0].legend(fontsize=8)
    n = max(d.get("n", 0) for d in diag.values())
    fig.suptitle(f"Evaluation ({n} yes/no questions per condition)")
    return _save(fig, Path(path))


def plot_effect_map(effect_map: dict[str, Any], path: str | Path) -> Path | None:
    """The effect study's map (effect.json ``map``): DPO − base in RAG accuracy and copy rate with
    their 95% paired intervals; and per knob value the base's accuracy without and with retrieval,
    DPO's with it, the references' vote and the room's ceiling (where the base gains from retrieval,
    and how much trusting it well could add)."""
    points = sorted((p for p in effect_map.get("points", []) if p.get("differences")), key=lambda p: p["value"])
    if not points:
        return None
    xs = [p["value"] for p in points]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("accuracy_rag_fixed", "RAG accuracy"), ("copy_rate", "copy rate")):
        d = [p["differences"][key] for p in points]
        ys = [x["diff"] for x in d]
        err = [[y - x["low"] for y, x in zip(ys, d)], [x["high"] - y for y, x in zip(ys, d)]]
        left.errorbar(xs, ys, yerr=err, marker="o", ms=4, capsize=3, label=label)
    left.axhline(0, color="grey", lw=0.8)
    left.set_title("DPO − base (95% paired interval)")
    left.set_ylabel("difference")
    nan = (float("nan"),) * 3
    for policy, metric, style, color, label in (
            ("base", "accuracy_no_rag", ":o", "tab:blue", "base without retrieval"),
            ("base", "accuracy_rag_fixed", "-o", "tab:blue", "base RAG accuracy"),
            ("dpo", "accuracy_rag_fixed", "-s", "tab:orange", "dpo RAG accuracy")):
        ys, lows, highs = zip(*(rate_interval(p["diagnostics"].get(policy, {}), metric) or nan for p in points))
        err = [[y - lo for y, lo in zip(ys, lows)], [hi - y for y, hi in zip(ys, highs)]]
        right.errorbar(xs, ys, yerr=err, fmt=style, color=color, ms=4, capsize=3, label=label)
    votes = [p.get("reference_vote_accuracy") for p in points]
    right.plot(xs, [float("nan") if v is None else v for v in votes], "k--", lw=1, label="reference vote")
    # the room's ceiling (toy.room): the base trusting its references as much as they deserve
    combined = [(p.get("room") or {}).get("combined", {}).get("accuracy", float("nan")) for p in points]
    right.plot(xs, combined, "-.", color="tab:purple", lw=1, label="base + references combined (room)")
    right.set_title("accuracy (95% Wilson interval)")
    for ax in (left, right):
        ax.set_xlabel(effect_map["knob"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ns = sorted({p["differences"]["copy_rate"]["n"] for p in points})
    n = str(ns[0]) if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
    fig.suptitle(f"Effect map over {effect_map['knob']}: one whole chain (seed 0) per value, "
                 f"n = {n} yes/no questions per point")
    return _save(fig, Path(path))


def plot_all(out: str | Path, results: dict[str, Any], clip_dir: str | Path, dpo_dir: str | Path) -> list[Path]:
    """Every plot whose inputs exist, into ``out``; returns the files written."""
    out = Path(out)
    made = [
        plot_clip_curves(clip_dir, out / "clip_recall.png"),
        plot_dpo_curves(Path(dpo_dir) / "metrics.jsonl", out / "dpo_training.png"),
        plot_conditions(results, out / "conditions.png"),
    ]
    return [p for p in made if p is not None]


def plot_comparison(rows: list[dict[str, Any]], anchor: str, path: str | Path) -> Path | None:
    """compare.json over all files: each method's accuracy − the anchor's, with its 95% paired interval."""
    over_all = [r for r in rows if r["file"] == "all"]
    if not over_all:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 0.35 * len(over_all) + 1.2))
    ys = range(len(over_all))
    diffs = [r["diff"] for r in over_all]
    err = [[d - r["low"] for d, r in zip(diffs, over_all)], [r["high"] - d for d, r in zip(diffs, over_all)]]
    ax.errorbar(diffs, ys, xerr=err, fmt="o", ms=4, capsize=3)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(list(ys), [f"{r['method']} ({r['accuracy']:.3f})" for r in over_all], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"accuracy − {anchor} (95% paired interval), n = {over_all[0]['n']}")
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))
