"""Evaluate policies (the base, and the base + DPO adapter) on the test VQA and report files.

    bash scripts/evaluate.sh [CONFIG.yaml] [--key value ...]     # = python -m evaluation.evaluate

Every query record of the test retrieval JSONL files (listed by ``<retrieval_dir>/index.json``,
or given as ``files``) is answered under four conditions:

- ``no_rag``: the image and the question, no retrieved reports (condition c of the pair builder);
- ``rag_fixed``: plus the top ``fixed_k`` retrieved reports (condition a);
- ``rag_adaptive``: plus the reports an adaptive k rule keeps (``adaptive``, applied here to the
  stored ``reference_scores``: it cuts among the reports the retrieval stage kept, so retrieve
  with a fixed k_max and one retrieval serves every rule);
- ``noised_rag``: the ``rag_fixed`` prompt with the noised image x_v* (condition b; by default a
  different image of the same domain plus Gaussian noise, seeded by the image: deterministic).

Prompts name the routed domain (the record's ``domain``), as the deployed system would. Metrics
per (policy, condition, file): VQA accuracy and F1 (yes positive) over the rows whose
gold answer is yes/no (the others are counted, ``n_not_yes_no``, and left out); reports: BLEU
(coco-caption corpus BLEU-4, and BLEU-1..3), ROUGE-L, CIDEr-D and METEOR 1.5 (pycocoevalcap;
METEOR runs a Java jar: without ``java`` the run stops before generating, or set
``meteor: false``). Per policy, the misalignment diagnostics over all yes/no questions: copy rate
(accuracy of ``noised_rag``) and over-reliance rate (right in ``no_rag``, wrong in ``rag_fixed``;
``over_reliance_rate_adaptive`` against ``rag_adaptive``). Retrieval recall is copied from the
retrieval stage's ``retrieval_metrics.json``.

Answers are decoded greedily by default; ``decoding: beam`` searches ``num_beams`` beams,
``decoding: vcd`` contrasts each step's logits with those under the record's x_v* (visual
contrastive decoding), and ``decoding: dola`` the final layer's with an earlier layer's (DoLa;
both in policy.decoding). Under ``noised_rag`` the image shown is already x_v*, so
VCD contrasts it with itself and answers as greedy does: VCD's copy rate is greedy's.

Every prompt is fitted to ``max_length`` with ``max_new_tokens`` after it (policy.budget): references
are dropped from the last one or the last kept one shortened, and a prompt that cannot fit is not
run. A row's ``k`` is the references its prompt held; ``results.json``'s ``budget`` counts what was
cut and names what was refused.

Writes into ``out`` (replaced atomically): ``results.json``, ``results.md``, ``predictions.jsonl``
(every record x condition x policy), ``gallery.html`` (one card per record, evaluation.gallery), PNG
plots (evaluation.plots) and ``run_config.yaml``.
"""

from __future__ import annotations

import gc
import json
import shutil
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

from PIL import Image
from tqdm import tqdm

from common.config import ConfigError, cli_main, doc, load_config, save_config
from common.io import InputError, atomic_dir, atomic_write_json, atomic_write_jsonl, atomic_write_text
from data.answers import yes_no
from data.datasets import first_image
from data.images import BadImageError, BadImageLog, load_image, resolve_image
from data.noise import NoiseConfig, make_x_v_star
from data.readers import bad_records_summary, read_index, read_records
from data.records import ReportRecord, VqaRecord
from evaluation.gallery import CaseMedia, gallery_html
from evaluation.metrics import report_metrics, tokenize, vqa_metrics
from pairs.rules import copy_rate, over_reliance_rate
from policy.adapters import check_adapter_base, find_adapter, load_with_adapters
from policy.budget import BudgetLog, PromptParts, fit_prompt
from policy.decoding import dola_generate, vcd_generate
from policy.policy import PolicySpec
from policy.prompts import OPTION_TEXT_HELP, own_options
from retriever.select_k import KRule, select_k

CONDITIONS = ("no_rag", "rag_fixed", "rag_adaptive", "noised_rag")
POLICIES = ("base", "dpo")
METRIC_KEYS = ("accuracy", "f1", "bleu", "rouge_l", "meteor")
TEST_ROLES = ("test_vqa", "test_report")


@dataclass
class EvalConfig:
    retrieval_dir: str = doc("outputs/toy/retrieval", "retrieval stage output: index.json lists the query JSONL files, retrieval_metrics.json the recall")
    roles: list[str] = doc(list(TEST_ROLES), "which index.json roles to evaluate")
    files: list[str] = doc([], "retrieval JSONL files to evaluate instead of the index (task told by the records' keys)")
    image_root: str = doc("", "image folder for records without a usable image_root (when index.json gives none)")
    policy: PolicySpec = doc(PolicySpec(), "the `base` policy: checkpoint, adapter merged into it (as train_dpo's "
                                           "policy.init_adapter), dtype, prompts")
    adapter: str = doc("", "PEFT adapter of the `dpo` policy; empty = the DPO stage's output if present (else `dpo` is skipped with a note)")
    policies: list[str] = doc(list(POLICIES), "policies to evaluate: [base], [dpo] or [base, dpo]")
    conditions: list[str] = doc(list(CONDITIONS), f"conditions to run, from {list(CONDITIONS)}")
    fixed_k: int = doc(5, "reports in the prompt for rag_fixed and noised_rag (at most as many as retrieved)")
    k_by_domain: dict[str, int] = doc({}, "fixed_k of a routed domain, where given (RULE's calibrated k, chosen on "
                                          "validation questions: retriever.select_k.calibrated_k)")
    adaptive: KRule = doc(KRule(rule="gap", k=10, gamma=0.1), "k rule of rag_adaptive, applied to the stored reference_scores")
    noise: NoiseConfig = doc(NoiseConfig(), "x_v* of noised_rag, made as the pair builder makes it (pairs.build_pairs)")
    decoding: Literal["greedy", "beam", "vcd", "dola"] = doc("greedy", "greedy; beam (num_beams beams); vcd: visual "
                                                                        "contrastive decoding against the record's x_v*; "
                                                                        "dola: layer-contrastive decoding (policy.decoding)")
    num_beams: int = doc(3, "beams of decoding: beam")
    vcd_alpha: float = doc(1.0, "VCD's contrast: (1 + alpha) * logit(real image) - alpha * logit(x_v*); 0 = greedy")
    vcd_beta: float = doc(0.1, "VCD's plausibility cut: tokens under beta x the top probability with the real image are dropped")
    dola_layers: str | list[int] = doc("high", "DoLa's candidate early layers: high, low or a list (0 = the embeddings)")
    option_text: bool = doc(False, OPTION_TEXT_HELP)
    max_new_tokens_vqa: int = doc(16, "answer length cap for VQA")
    max_new_tokens_report: int = doc(96, "answer length cap for reports")
    max_length: int = doc(0, "token budget of prompt (image tokens included) + max_new_tokens; references are dropped or "
                             "shortened to fit, a prompt that cannot fit is not run (0 = the model's own limit)")
    batch_size: int = doc(16, "generation batch size")
    chunk: int = doc(64, "records whose images are held in memory at once")
    limit: int = doc(0, "evaluate only the first N records of each file (0 = all): quick runs")
    meteor: bool = doc(True, "compute METEOR (needs Java)")
    bad_image: Literal["skip", "error"] = doc("skip", "an unreadable image: skip the record (counted) or stop")
    bad_record: Literal["skip", "error"] = doc("skip", "a query record that cannot be used: skip it (named in results.json) or stop")
    device: str = doc("cpu", "device for the policy")
    clip_dir: str = doc("outputs/toy/clip", "CLIP fine-tuning output (its <domain>/metrics.jsonl are plotted)")
    dpo_dir: str = doc("outputs/toy/dpo", "DPO run output (its metrics.jsonl is plotted)")
    plots: bool = doc(True, "write PNG plots")
    gallery: int = doc(500, "cases in gallery.html (evaluation.gallery), the first N in evaluation order; 0 = no gallery")
    out: str = doc("outputs/toy/eval", "output folder (replaced atomically)")


# ---------------------------------------------------------------- inputs


@dataclass
class EvalFile:
    """One query file: its retrieval JSONL, display name, task, domain and default image root."""

    path: Path
    name: str
    task: str  # "vqa" | "report"
    domain: str | None
    image_root: str | None
    records: list[VqaRecord | ReportRecord] = field(default_factory=list)


def eval_files(cfg: EvalConfig, skipped: list[str] | None = None) -> list[EvalFile]:
    """The query files to evaluate, records read (every usable record: x_v* candidates come from
    all; bad records go to ``skipped``)."""
    default_root = cfg.image_root or None
    if cfg.files:
        specs = [{"path": Path(f)} for f in cfg.files]
    else:
        specs = read_index(Path(cfg.retrieval_dir) / "index.json", cfg.roles)
    files = []
    for spec in specs:
        path = Path(spec["path"])
        records = read_records(path, spec.get("kind"), spec.get("image_root") or default_root, cfg.bad_record, skipped)
        if not records:
            raise InputError(f"{path}: no records")
        if "reference_reports" not in records[0].meta:
            raise InputError(f"{records[0].source}: not a retrieval JSONL (no `reference_reports`); run `bash scripts/retrieve.sh`")
        if not isinstance(records[0], (VqaRecord, ReportRecord)):
            raise InputError(f"{path}: not a VQA or report file")
        task = "vqa" if isinstance(records[0], VqaRecord) else "report"
        domain = spec.get("domain") or _majority(r.meta.get("domain") for r in records)
        files.append(EvalFile(path, path.stem, task, domain, spec.get("image_root") or default_root, records))
    return files


def _majority(values: Iterable[Any]) -> Any:
    counts: dict[Any, int] = defaultdict(int)
    for v in values:
        if v is not None:
            counts[v] += 1
    return max(counts, key=counts.get) if counts else None


def references(record: VqaRecord | ReportRecord) -> tuple[list[str], list[str], list[float]]:
    """(reports, ids, scores) of a retrieval record, best first, equal length."""
    reports = list(record.meta.get("reference_reports") or [])
    ids = list(record.meta.get("reference_ids") or [""] * len(reports))
    scores = list(record.meta.get("reference_scores") or [])
    if scores and len(scores) != len(reports):
        raise InputError(f"{record.source}: {len(scores)} reference_scores for {len(reports)} reference_reports")
    return reports, ids, scores


def condition_k(condition: str, scores: list[float], n_refs: int, cfg: EvalConfig, domain: str = "") -> int:
    """How many retrieved reports a condition puts in the prompt of a record routed to ``domain``."""
    if condition == "no_rag":
        return 0
    if condition == "rag_adaptive" and n_refs:
        if not scores:
            raise InputError("rag_adaptive needs `reference_scores` in the retrieval JSONL")
        return select_k(scores, cfg.adaptive)
    return min(cfg.k_by_domain.get(domain, cfg.fixed_k), n_refs)


# ---------------------------------------------------------------- images


class ImageSource:
    """Loads the records' images and makes x_v* exactly as the pair builder does
    (data.noise.make_x_v_star: same other-image pool per domain, same seeds).

    A record whose image (or every other image for its x_v*) is bad is skipped under every
    policy and condition: logged once (``bad``) and counted per file (``skipped``); with
    ``bad_image: error`` it stops the run.
    """

    def __init__(self, files: list[EvalFile], cfg: EvalConfig):
        self.cfg = cfg
        self.bad = BadImageLog()
        self.skipped: dict[str, set[int]] = defaultdict(set)
        self._bad: dict[str, BadImageError] = {}
        # domain -> image as written -> (image, record root, default root): the pool x_v* draws from
        self.pool: dict[str, dict[str, tuple[str, str | None, str | None]]] = defaultdict(dict)
        for f in files:
            for r in f.records:
                rel = first_image(r)
                if rel:
                    self.pool[f.domain or ""].setdefault(rel, (rel, r.image_root, f.image_root))

    def _load(self, rel: str, record_root: str | None, default_root: str | None) -> Image.Image:
        """Decode an image; BadImageError (remembered, so a bad file is tried once) if it is bad."""
        path = str(resolve_image(rel, record_root, default_root))
        if path in self._bad:
            raise self._bad[path]
        try:
            return load_image(path)
        except BadImageError as e:
            self._bad[path] = e
            raise

    def noised(self, name: str, image: Image.Image, domain: str) -> Image.Image:
        """x_v* of the image ``name`` (as written) from its domain's pool; BadImageError when the
        pool has no readable other image."""
        return make_x_v_star(name, image, self.cfg.noise, self.pool[domain], lambda other: self._load(*other),
                             domain=domain)

    def load(self, f: EvalFile, index: int) -> tuple[str, Image.Image, Image.Image | None] | None:
        """(image as written, x_v, x_v* if noised_rag or VCD needs it) of record ``index``; None if skipped."""
        record = f.records[index]
        rel = first_image(record) or ""
        try:
            if not rel:
                raise BadImageError(record.source, "missing", "the record names no image")
            img = self._load(rel, record.image_root, f.image_root)
            wanted = "noised_rag" in self.cfg.conditions or self.cfg.decoding == "vcd"
            noised = self.noised(rel, img, f.domain or "") if wanted else None
            return rel, img, noised
        except BadImageError as e:
            if self.cfg.bad_image == "error":
                raise InputError(f"{record.source}: {e}") from None
            if index not in self.skipped[f.name]:
                self.skipped[f.name].add(index)
                self.bad.record(e.path, e.reason, e.detail)
            return None


# ---------------------------------------------------------------- generation


def _question(record: VqaRecord | ReportRecord) -> str | None:
    return record.question if isinstance(record, VqaRecord) else None


def _gold(record: VqaRecord | ReportRecord) -> str:
    return record.answer if isinstance(record, VqaRecord) else record.text


def judge_vqa(prediction: str, answer: str) -> dict[str, Any]:
    """A VQA answer's prediction-row fields: gold and predicted yes/no labels, and ``correct``
    (None when the gold answer is not yes/no)."""
    gold, pred = yes_no(answer), yes_no(prediction)
    return {"gold_label": gold, "pred_label": pred, "correct": pred == gold if gold != "other" else None}


def decode(policy: Any, images: list[Image.Image], prompts: list[Any], noised: list[Image.Image | None],
           max_new: int, cfg: EvalConfig) -> list[str]:
    """The answers to (image, prompt) under ``cfg.decoding``; ``noised``: each image's record's x_v*, VCD's distortion."""
    if cfg.decoding == "vcd":
        return vcd_generate(policy, images, noised, prompts, max_new, cfg.vcd_alpha, cfg.vcd_beta, cfg.batch_size)
    if cfg.decoding == "dola":
        return dola_generate(policy, images, prompts, max_new, cfg.dola_layers, batch_size=cfg.batch_size)
    beams = {"num_beams": cfg.num_beams} if cfg.decoding == "beam" else {}
    return policy.generate(images, prompts, max_new_tokens=max_new, batch_size=cfg.batch_size, **beams)


def predict_file(policy: Any, name: str, f: EvalFile, images: ImageSource, cfg: EvalConfig,
                 budget: BudgetLog) -> Iterable[dict[str, Any]]:
    """Prediction rows of one policy on one file, every condition; records with a bad image skipped,
    prompts fitted to ``budget`` (recorded there; one that cannot fit gets no row)."""
    templates = cfg.policy.templates()
    records = f.records[: cfg.limit] if cfg.limit > 0 else f.records
    max_new = cfg.max_new_tokens_vqa if f.task == "vqa" else cfg.max_new_tokens_report
    bar = tqdm(total=len(records), desc=f"{name} {f.name}", unit="rec")
    for start in range(0, len(records), cfg.chunk):
        jobs: list[tuple[Image.Image, Any, dict[str, Any], Image.Image | None]] = []  # image, prompt, row, x_v*
        for index in range(start, min(start + cfg.chunk, len(records))):
            r = records[index]
            loaded = images.load(f, index)
            if loaded is None:
                continue
            image, real, noised = loaded
            reports, ids, scores = references(r)
            domain = r.meta.get("domain") or f.domain or "default"
            question = _question(r)
            options = own_options(r.meta.get("text"), question, cfg.option_text)
            base = {"policy": name, "file": f.name, "task": f.task, "index": index, "id": r.id,
                    "domain": domain, "image": image, "question": question, "answer": _gold(r)}
            for cond in cfg.conditions:
                k = condition_k(cond, scores, len(reports), cfg, domain)
                image = noised if cond == "noised_rag" else real
                parts = PromptParts(domain, f.task, question, tuple(reports[:k]), options=options)
                fit = fit_prompt(policy, parts, templates, [image], budget.max_length, max_new)
                budget.record(f"{r.source}/{name}/{cond}", fit.note)
                if fit.refused:
                    continue
                k = len(fit.references)
                row = {**base, "condition": cond, "k": k, "reference_ids": ids[:k], "budget": fit.note._asdict()}
                jobs.append((image, fit.prompt, row, noised))
        answers = decode(policy, [j[0] for j in jobs], [j[1] for j in jobs], [j[3] for j in jobs], max_new, cfg) if jobs else []
        for (_, _, row, _), pred in zip(jobs, answers):
            row["prediction"] = pred
            if f.task == "vqa":
                row.update(judge_vqa(pred, row["answer"]))
            yield row
        bar.update(min(cfg.chunk, len(records) - start))
    bar.close()


# ---------------------------------------------------------------- scoring


class MeteorSession:
    """One METEOR jar for the whole run: pycocoevalcap's Meteor() starts Java and loads its
    paraphrase tables (~10 s) on construction; one per group would make a 32-group evaluation
    spend minutes starting Java. Scores are computed on
    the same tokenisation as report_metrics."""

    def __init__(self) -> None:
        self._scorer = None

    def score(self, pred: list[str], ref: list[str]) -> float:
        if self._scorer is None:
            from pycocoevalcap.meteor.meteor import Meteor

            self._scorer = Meteor()
        res = {i: [tokenize(p) or "."] for i, p in enumerate(pred)}
        gts = {i: [tokenize(r) or "."] for i, r in enumerate(ref)}
        return float(self._scorer.compute_score(gts, res)[0])


def check_java(cfg: EvalConfig, files: list[EvalFile]) -> None:
    """Fail before any generation when METEOR is asked for and cannot run."""
    if cfg.meteor and any(f.task == "report" for f in files) and shutil.which("java") is None:
        raise ConfigError(
            "METEOR runs pycocoevalcap's Java jar and no `java` is on PATH: install a JRE "
            "(e.g. apt-get install default-jre-headless) or pass --meteor false"
        )


def score_group(rows: list[dict[str, Any]], task: str, meteor: MeteorSession | None) -> dict[str, Any]:
    """The metrics of one (policy, condition, file) group of prediction rows."""
    out: dict[str, Any] = dict.fromkeys(METRIC_KEYS)
    if task == "vqa":
        out.update(vqa_metrics([r["pred_label"] for r in rows], [r["gold_label"] for r in rows]))
    else:
        pred, ref = [r["prediction"] for r in rows], [r["answer"] for r in rows]
        out.update(report_metrics(pred, ref))
        if meteor is not None and rows:
            out["meteor"] = meteor.score(pred, ref)
    out["n_records"] = len(rows)
    out["mean_k"] = sum(r["k"] for r in rows) / len(rows) if rows else 0.0
    return out


def score_rows(predictions: list[dict[str, Any]], meteor: MeteorSession | None = None) -> list[dict[str, Any]]:
    """results.json rows: one per (policy, condition, file), in first-seen order."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for p in predictions:
        groups.setdefault((p["policy"], p["condition"], p["file"]), []).append(p)
    rows = []
    for (policy, condition, file), group in groups.items():
        task = group[0]["task"]
        rows.append({"policy": policy, "condition": condition, "file": file, "task": task,
                     **score_group(group, task, meteor)})
    return rows


def diagnostics(predictions: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per policy, over every VQA record with a yes/no gold answer (all files pooled).

    copy_rate: accuracy with x_v* + retrieval; over_reliance_rate: right in no_rag and wrong in
    rag_fixed (``_adaptive``: in rag_adaptive). A rate is None when a condition it needs was not run.
    """
    correct: dict[str, dict[str, dict[tuple[str, int], bool]]] = defaultdict(lambda: defaultdict(dict))
    for p in predictions:
        if p["task"] == "vqa" and p.get("correct") is not None:
            correct[p["policy"]][p["condition"]][(p["file"], p["index"])] = p["correct"]
    out = {}
    for policy, by_cond in correct.items():
        d: dict[str, Any] = {"n": max(len(v) for v in by_cond.values())}
        noised = by_cond.get("noised_rag")
        d["copy_rate"] = copy_rate(list(noised.values())) if noised else None
        for key, cond in (("over_reliance_rate", "rag_fixed"), ("over_reliance_rate_adaptive", "rag_adaptive")):
            without, with_ = by_cond.get("no_rag"), by_cond.get(cond)
            if without and with_:
                keys = [k for k in without if k in with_]
                d[key] = over_reliance_rate([without[k] for k in keys], [with_[k] for k in keys])
            else:
                d[key] = None
        for cond, values in by_cond.items():
            d[f"accuracy_{cond}"] = sum(values.values()) / len(values)
        out[policy] = d
    return out


# ---------------------------------------------------------------- tables


def _fmt(v: Any) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])


def _task_table(rows: list[dict[str, Any]], task: str, cells: tuple[str, ...]) -> str:
    rows = [r for r in rows if r["task"] == task]
    files = list(dict.fromkeys(r["file"] for r in rows))
    keys = list(dict.fromkeys((r["policy"], r["condition"]) for r in rows))
    by = {(r["policy"], r["condition"], r["file"]): r for r in rows}
    header = ["policy", "condition"] + [f"{f} (n={next(r['n'] for r in rows if r['file'] == f)})" for f in files]
    body = [[p, c] + [" / ".join(_fmt(by[(p, c, f)].get(m)) if (p, c, f) in by else "–" for m in cells)
                      for f in files] for p, c in keys]
    return _table(header, body)


RETRIEVAL_COLUMNS = ("routing_accuracy", "own_R@1", "own_R@5", "own_R@10", "findings_R@1", "findings_R@5",
                     "findings_R@10", "mean_k", "reference_vote_accuracy")


def retrieval_table(metrics: dict[str, Any], files: Iterable[str]) -> str:
    """The retrieval stage's per-file numbers (retrieval_metrics.json ``files``) of the evaluated files."""
    wanted = set(files)
    per_file = {Path(k).stem: v for k, v in (metrics.get("files") or {}).items()
                if isinstance(v, dict) and Path(k).stem in wanted}
    cols = [c for c in RETRIEVAL_COLUMNS if any(c in v for v in per_file.values())]
    if not per_file or not cols:
        return ""
    return _table(["file"] + cols, [[name] + [_fmt(v.get(c)) for c in cols] for name, v in per_file.items()])


def results_markdown(results: dict[str, Any]) -> str:
    rows = results["rows"]
    parts = ["# Evaluation results", ""]
    if any(r["task"] == "vqa" for r in rows):
        parts += ["## VQA: accuracy / F1", "",
                  "Yes/no questions only (F1: yes is the positive class); rows whose ground truth is "
                  "not yes/no are left out (`n_not_yes_no` in results.json). n = questions scored.", "",
                  _task_table(rows, "vqa", ("accuracy", "f1")), ""]
    if any(r["task"] == "report" for r in rows):
        parts += ["## Reports: BLEU-4 / ROUGE-L / METEOR", "",
                  "pycocoevalcap: coco-caption corpus BLEU-4 (closest-reference brevity penalty), "
                  "ROUGE-L (beta 1.2), METEOR 1.5 (Java); regex tokenisation, lower-cased.", "",
                  _task_table(rows, "report", ("bleu", "rouge_l", "meteor")), ""]
    if results.get("diagnostics"):
        parts += ["## Misalignment diagnostics (VQA, all files)", "",
                  "copy rate = accuracy with a noised image plus retrieval (lower: the model looks at "
                  "the image); over-reliance = share right without retrieval and wrong with it.", ""]
        header = ["policy", "n", "acc no_rag", "acc rag_fixed", "acc rag_adaptive", "copy rate",
                  "over-reliance (fixed)", "over-reliance (adaptive)"]
        body = [[p, str(d["n"]), _fmt(d.get("accuracy_no_rag")), _fmt(d.get("accuracy_rag_fixed")),
                 _fmt(d.get("accuracy_rag_adaptive")), _fmt(d["copy_rate"]), _fmt(d["over_reliance_rate"]),
                 _fmt(d["over_reliance_rate_adaptive"])]
                for p, d in results["diagnostics"].items()]
        parts += [_table(header, body), ""]
    retrieval = results.get("retrieval")
    if retrieval:
        table = retrieval_table(retrieval, (r["file"] for r in rows))
        acc = retrieval.get("domain_accuracy")
        parts += ["## Retrieval (copied from the retrieval stage)", "",
                  f"Routing: {retrieval.get('routing', '?')}, domain accuracy {_fmt(acc)} over all query files. "
                  "R@k: own = the query's own report among the top k; findings = a report with the "
                  "same ground-truth findings. reference_vote_accuracy = yes/no accuracy of answering "
                  "yes iff most of the k references carry the asked finding: what the references "
                  "alone say about the question, a ceiling for reading them.", ""]
        if table:
            parts += [table, ""]
    notes = results.get("notes") or []
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(parts)


# ---------------------------------------------------------------- run


def policy_plan(cfg: EvalConfig) -> tuple[list[tuple[str, str | None]], list[str]]:
    """[(policy name, adapter or None)] to evaluate, and notes for what was left out."""
    unknown = [p for p in cfg.policies if p not in POLICIES]
    if unknown or not cfg.policies:
        raise ConfigError(f"policies: {unknown or '[]'} not valid; choose from {list(POLICIES)}")
    bad = [c for c in cfg.conditions if c not in CONDITIONS]
    if bad or not cfg.conditions:
        raise ConfigError(f"conditions: {bad or '[]'} not valid; choose from {list(CONDITIONS)}")
    if cfg.decoding == "beam" and cfg.num_beams < 2:
        raise ConfigError(f"num_beams: {cfg.num_beams}; beam search needs 2 or more (decoding greedy is one beam)")
    if not Path(cfg.policy.path).is_dir():
        raise InputError(f"{cfg.policy.path}: policy checkpoint folder does not exist; make the toy one with `bash scripts/make_toy_policy.sh`")
    plan, notes = [], []
    for name in cfg.policies:
        if name == "base":
            plan.append(("base", None))
            continue
        adapter = find_adapter(cfg.adapter, (str(Path(cfg.dpo_dir) / "adapter"), cfg.dpo_dir))
        if adapter is None:
            notes.append(f"policy `dpo` left out: no adapter under {cfg.dpo_dir} (run `bash scripts/train_dpo.sh`)")
        else:
            check_adapter_base(adapter, cfg.policy.init_adapter)
            plan.append(("dpo", adapter))
    if not plan:
        raise InputError("; ".join(notes))
    return plan, notes


def evaluate(cfg: EvalConfig, load: Any = None) -> dict[str, Any]:
    """Run every planned policy on every file; returns results (also written to ``cfg.out``).

    ``load(adapter)`` returns a policy with ``.generate`` (default: ``cfg.policy`` with ``adapter``
    merged in, policy.adapters.load_with_adapters).
    """
    if load is None:

        def load(adapter: str | None) -> Any:
            return load_with_adapters(cfg.policy, adapter, cfg.device)

    plan, notes = policy_plan(cfg)
    for note in notes:
        print(f"note: {note}")
    bad_records: list[str] = []
    files = eval_files(cfg, bad_records)
    check_java(cfg, files)
    images = ImageSource(files, cfg)
    predictions: list[dict[str, Any]] = []
    budget: BudgetLog | None = None
    for name, adapter in plan:
        policy = load(adapter)
        budget = budget or BudgetLog.of(policy, cfg.max_length)
        for f in files:
            predictions.extend(predict_file(policy, name, f, images, cfg, budget))
        del policy
        gc.collect()
    rows = score_rows(predictions, MeteorSession() if cfg.meteor else None)
    for r in rows:
        r["n_bad_images"] = len(images.skipped.get(r["file"], ()))
    if not cfg.meteor and any(f.task == "report" for f in files):
        notes.append("METEOR not computed (meteor: false)")
    bad = images.bad.summary()
    if bad["skipped"]:
        notes.append(f"records skipped for bad images: {bad['skipped']} ({bad['by_reason']})")
    if bad_records:
        notes.append(f"records skipped as unusable: {len(bad_records)} (bad_records in results.json)")
    cut = budget.summary()
    if cut["refused"]:
        notes.append(f"prompts not run, too long for max_length {cut['max_length']}: {cut['refused']} "
                     "(results.json budget.refused_records)")
    if cut["references_dropped"] or cut["references_shortened"]:
        notes.append(f"references cut to fit max_length {cut['max_length']}: {cut['references_dropped']} dropped, "
                     f"{cut['references_shortened']} shortened, in {cut['prompts_trimmed']} prompts")
    results: dict[str, Any] = {
        "rows": rows,
        "diagnostics": diagnostics(predictions),
        "retrieval": _retrieval_metrics(Path(cfg.retrieval_dir)),
        "policies": {name: {"path": cfg.policy.path, "init_adapter": cfg.policy.init_adapter or None,
                            "adapter": adapter} for name, adapter in plan},
        "bad_images": bad,
        "bad_records": bad_records_summary(bad_records),
        "budget": cut,
        "decoding": {"method": cfg.decoding, **({"num_beams": cfg.num_beams} if cfg.decoding == "beam" else {}),
                     **({"alpha": cfg.vcd_alpha, "beta": cfg.vcd_beta} if cfg.decoding == "vcd" else {}),
                     **({"layers": cfg.dola_layers} if cfg.decoding == "dola" else {})},
        "notes": notes,
    }
    gallery = None
    if cfg.gallery:
        gallery = gallery_html(predictions, case_media(files, images), title=f"Evaluation cases: {cfg.policy.path}",
                               max_cases=cfg.gallery)
    write_outputs(cfg, results, predictions, gallery)
    return results


def case_media(files: list[EvalFile], images: ImageSource) -> Callable[[str, int], CaseMedia | None]:
    """For the gallery: (file name, record index) -> its image, x_v* and references (None if unreadable)."""
    by_name = {f.name: f for f in files}

    def media(name: str, index: int) -> CaseMedia | None:
        f = by_name[name]
        loaded = images.load(f, index)
        if loaded is None:
            return None
        reports, _, scores = references(f.records[index])
        return CaseMedia(loaded[1], loaded[2], reports, scores)

    return media


def _retrieval_metrics(retrieval_dir: Path) -> dict[str, Any] | None:
    path = retrieval_dir / "retrieval_metrics.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None


def write_outputs(cfg: EvalConfig, results: dict[str, Any], predictions: list[dict[str, Any]],
                  gallery: str | None = None) -> None:
    with atomic_dir(cfg.out) as tmp:
        if gallery is not None:
            atomic_write_text(tmp / "gallery.html", gallery)
        atomic_write_json(tmp / "results.json", results)
        atomic_write_text(tmp / "results.md", results_markdown(results))
        atomic_write_jsonl(tmp / "predictions.jsonl", predictions)
        save_config(cfg, tmp / "run_config.yaml")
        if cfg.plots:
            from evaluation.plots import plot_all

            plot_all(tmp, results, clip_dir=cfg.clip_dir, dpo_dir=cfg.dpo_dir)


def main() -> None:
    cfg = load_config(EvalConfig, description=__doc__)
    results = evaluate(cfg)
    print(results_markdown(results))
    print(f"written: {cfg.out}/results.json, results.md, predictions.jsonl" + (", gallery.html" if cfg.gallery else ""))


if __name__ == "__main__":
    cli_main(main)
