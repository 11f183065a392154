"""Room for the effect: how much could the base policy gain by knowing when to trust its references?

RAG preference tuning can raise accuracy with retrieval only where the base, given references,
answers worse than its own image reading and those references combined well would. This
measures that room on one chain (pipeline.demo's folder). Per yes/no question:

- what the base reads in the image: its "Yes" minus "No" logit without references (the first
  answer word decides a yes/no answer, toy.reading_probe.answer_rows);
- what the references say: the share of them whose study has the asked finding (the world's
  ground-truth labels, so toy worlds only);
- what the base does with them: its margin with the references in the prompt.

A logistic combiner of the first two, one per domain, is fitted on the validation questions and
scored on the evaluated ones (out of fold when those are the validation questions themselves).
Its accuracy is what this base would get by trusting its references exactly as much as they
deserve; minus the base's accuracy with references (same questions, paired bootstrap interval) it
is the room. Where the room is below the effect the study looks for, no tuning that only teaches
trust can show that effect; where it is above and tuning takes none of it, the tuning fails.

Why the room is what it is: ``where_they_fail`` says whether the references are right where the
base's reading is wrong (the vote's accuracy on the questions it reads right and on those it reads
wrong), and both accuracies by the asked finding (present and subtle, present and marked,
absent). Two sources that fail on the same questions combine to little more than the better one.
``--eval DIR`` splits an evaluation's answers (base and tuned, every condition) by whether the
vote is right (``by_reference``): a policy that copies is right where the vote is and wrong where
it is not, and a tuning's gain shows as following right references or resisting wrong ones.

    python -m toy.room --chain outputs/toy [--roles test_vqa] [--limit 0] [--eval outputs/toy/eval] [--out FILE]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from common.io import InputError, atomic_write_json, read_jsonl
from common.stats import paired_interval, resamples, wilson
from data.images import load_image, resolve_image
from data.readers import read_index, read_records
from policy.policy import Policy, load_policy
from policy.prompts import build_prompt, load_prompt_templates, prompts_for
from toy.make_toy import SUBTLE_BELOW
from toy.oracle_retrieval import load_corpus
from toy.reading_probe import answer_rows

FIT_ROLES = ["val_vqa"]  # the combiner is fitted here, never on test
FOLDS = 5  # out-of-fold scoring when the evaluated questions are the fitted ones
KINDS = ("subtle", "marked", "absent")  # what a question asks about: a present finding, hard or easy to see, or none


@dataclass
class Question:
    domain: str
    question: str
    references: list[str]
    image: Path  # loaded only where the policy scores the question
    yes: bool  # the ground truth
    share: float  # references whose study has the asked finding
    kind: str  # the asked finding: "subtle" or "marked" when present, "absent"
    key: tuple[str, int]  # (file, index) as evaluation.evaluate names the question in predictions.jsonl


def read_questions(chain: Path, roles: list[str], limit: int = 0) -> list[Question]:
    """The yes/no questions (those naming a ``finding``) of the chain's retrieval files of ``roles``,
    the first ``limit`` records of each file (0 = all), as evaluation.evaluate takes them: in the
    domain the retriever routed them to."""
    corpora: dict[str, dict[str, frozenset[str]]] = {}
    out = []
    for entry in read_index(chain / "retrieval" / "index.json", roles):
        for index, rec in enumerate(read_records(entry["path"], kind="vqa")[: limit or None]):
            finding = rec.meta.get("finding")
            if finding is None:
                continue
            domain = rec.meta.get("domain") or entry["domain"]  # routed: its prompt and its corpus
            if domain not in corpora:
                corpora[domain] = {ref.text: ref.findings for ref in reversed(load_corpus(chain / "world", domain))}
            refs = rec.meta["reference_reports"]
            unknown = [r for r in refs if r not in corpora[domain]]
            if unknown:
                raise InputError(f"{rec.source}: reference {unknown[0]!r} is not a report of {chain / 'world'}")
            share = float(np.mean([finding in corpora[domain][r] for r in refs])) if refs else 0.5
            image = resolve_image(rec.images[0], rec.image_root, entry.get("image_root"))
            severity = dict(zip(rec.meta.get("findings", []), rec.meta.get("severities", []))).get(finding)
            kind = "absent" if severity is None else "subtle" if severity < SUBTLE_BELOW else "marked"
            out.append(Question(domain, rec.question, list(refs), image, rec.answer.lower().startswith("yes"), share, kind,
                                (Path(entry["path"]).stem, index)))
    if not out:
        raise InputError(f"{chain / 'retrieval' / 'index.json'}: no yes/no questions with a finding under roles {roles}")
    return out


@torch.inference_mode()
def yes_margins(policy: Policy, questions: list[Question], images: list[Image.Image], references: bool,
                batch_size: int = 32, progress: bool = False) -> np.ndarray:
    """The policy's "Yes" minus "No" logit at the first answer position, per question (``images``: theirs)."""
    no, yes = answer_rows(policy.tokenizer, policy.path).tolist()
    templates = load_prompt_templates(prompts_for(policy.path))
    texts = [policy.render(build_prompt(q.domain, "vqa", q.question, q.references if references else None, templates))
             for q in questions]
    out = []
    starts = range(0, len(questions), batch_size)
    for s in tqdm(starts, desc="score", disable=not progress):
        enc = policy.process(images[s:s + batch_size], texts[s:s + batch_size], "left")
        logits = policy.model(**enc, logits_to_keep=1).logits[:, -1, [no, yes]].float()  # not [batch, length, vocab]
        out.append((logits[:, 1] - logits[:, 0]).cpu().numpy())
    return np.concatenate(out)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, std, weights + bias) of an L2-regularised logistic regression on standardised
    features. Written here: a fit of three parameters, and scikit-learn is not a dependency."""
    mean, std = x.mean(0), x.std(0) + 1e-9
    z = torch.tensor((x - mean) / std, dtype=torch.float64)
    t = torch.tensor(y, dtype=torch.float64)
    w = torch.zeros(z.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        opt.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(z @ w[:-1] + w[-1], t) + l2 * (w[:-1] ** 2).sum()
        value.backward()
        return value

    opt.step(loss)
    return mean, std, w.detach().numpy()


def predict_logistic(model: tuple[np.ndarray, np.ndarray, np.ndarray], x: np.ndarray) -> np.ndarray:
    mean, std, w = model
    return ((x - mean) / std) @ w[:-1] + w[-1] > 0


def combine(fit_x: np.ndarray, fit_y: np.ndarray, fit_domains: list[str], x: np.ndarray, domains: list[str]) -> np.ndarray:
    """Yes/no per question of ``x`` from one combiner per domain fitted on the ``fit_*`` questions
    (a domain without fitted questions: one combiner over all of them)."""
    pred = np.zeros(len(x), dtype=bool)
    fit_d, d = np.array(fit_domains), np.array(domains)
    everything = fit_logistic(fit_x, fit_y)
    for domain in sorted(set(domains)):
        rows, fit_rows = d == domain, fit_d == domain
        model = fit_logistic(fit_x[fit_rows], fit_y[fit_rows]) if len(set(fit_y[fit_rows])) == 2 else everything
        pred[rows] = predict_logistic(model, x[rows])
    return pred


def folds(n: int, k: int = FOLDS) -> list[np.ndarray]:
    """k disjoint sets of question positions covering all n (every k-th question)."""
    return [np.arange(i, n, k) for i in range(min(k, n))]


def combine_out_of_fold(x: np.ndarray, y: np.ndarray, domains: list[str]) -> np.ndarray:
    """Each question answered by combiners fitted on the other folds only."""
    pred = np.zeros(len(x), dtype=bool)
    d = np.array(domains)
    for held in folds(len(x)):
        keep = np.ones(len(x), dtype=bool)
        keep[held] = False
        pred[held] = combine(x[keep], y[keep], list(d[keep]), x[held], list(d[held]))
    return pred


def _rate(correct: np.ndarray) -> dict[str, float]:
    low, high = wilson(int(correct.sum()), len(correct))
    return {"accuracy": float(correct.mean()), "low": low, "high": high}


def where_they_fail(reading_right: np.ndarray, vote_right: np.ndarray, kinds: list[str]) -> dict[str, Any]:
    """The references' vote accuracy where the reading is right and where it is wrong, and both
    accuracies per kind of asked finding: whether the two sources fail on the same questions."""
    kinds_ = np.array(kinds)

    def part(mask: np.ndarray) -> dict[str, Any]:
        n = int(mask.sum())
        return {"n": n, "reading": float(reading_right[mask].mean()) if n else None,
                "vote": float(vote_right[mask].mean()) if n else None}

    right, wrong = part(reading_right), part(~reading_right)
    return {"vote_where_reading": {"right": right["vote"], "wrong": wrong["vote"], "n_right": right["n"], "n_wrong": wrong["n"]},
            "by_finding": {k: part(kinds_ == k) for k in KINDS}}


def by_reference(questions: list[Question], predictions: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Per policy and condition of an evaluation's ``predictions.jsonl``: accuracy where the
    references' vote is right and where it is wrong, each also by the asked finding's kind, and
    how often the answer says what the vote says. It shows whether a policy copies its references
    and where a tuning gains: by following right ones or by resisting wrong ones (which it can only
    do where the image tells it: a marked finding, not a subtle one). Scored as evaluation scored
    them (an answer that is neither yes nor no is wrong); empty when none of the predictions is one
    of ``questions``."""
    asked = {q.key: q for q in questions}
    got: dict[tuple[str, str], list[tuple[bool, bool, bool, str]]] = {}
    for row in read_jsonl(predictions):
        q = asked.get((row["file"], row["index"]))
        if q is None or row.get("correct") is None:  # not asked here, or not scored
            continue
        says_vote = row.get("pred_label") == ("yes" if q.share > 0.5 else "no")
        got.setdefault((row["policy"], row["condition"]), []).append(
            ((q.share > 0.5) == q.yes, row["correct"], says_vote, q.kind))
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (policy, condition), rows in sorted(got.items()):
        *flags, kinds = (np.array(c) for c in zip(*rows))
        right, correct, agrees = (f.astype(bool) for f in flags)

        def part(mask: np.ndarray) -> dict[str, Any]:
            return {"n": int(mask.sum()), "accuracy": float(correct[mask].mean()) if mask.any() else None}

        def side(mask: np.ndarray) -> dict[str, Any]:
            return {**part(mask), "by_kind": {k: part(mask & (kinds == k)) for k in KINDS}}

        out.setdefault(policy, {})[condition] = {
            "n": len(rows), "accuracy": float(correct.mean()), "agrees_with_vote": float(agrees.mean()),
            "vote_right": side(right), "vote_wrong": side(~right)}
    return out


def room(chain: Path, roles: list[str], limit: int = 0, policy: Policy | None = None,
         progress: bool = False) -> dict[str, Any]:
    """The room on the chain's base policy over the questions of ``roles`` (``limit`` per file)."""
    chain = Path(chain)
    if set(roles) & set(FIT_ROLES) and set(roles) != set(FIT_ROLES):
        raise ValueError(f"roles {roles}: evaluate either the fitting roles {FIT_ROLES} alone or none of them")
    policy = policy or load_policy(chain / "policy")

    def features(qs: list[Question], images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """(image margin, reference share) per question, and the truth: what the combiner sees."""
        image = yes_margins(policy, qs, images, references=False, progress=progress)
        return np.stack([image, [q.share for q in qs]], 1), np.array([q.yes for q in qs])

    questions = read_questions(chain, roles, limit)
    images = [load_image(q.image) for q in questions]
    x, y = features(questions, images)
    with_refs = yes_margins(policy, questions, images, references=True, progress=progress)
    domains = [q.domain for q in questions]
    if set(roles) == set(FIT_ROLES):
        combined = combine_out_of_fold(x, y, domains)
    else:
        fit = read_questions(chain, FIT_ROLES)
        fit_x, fit_y = features(fit, [load_image(q.image) for q in fit])
        combined = combine(fit_x, fit_y, [q.domain for q in fit], x, domains)
    right = {"base_no_rag": (x[:, 0] > 0) == y, "base_rag": (with_refs > 0) == y,
             "reference_vote": (x[:, 1] > 0.5) == y, "combined": combined == y}
    diff = right["combined"].astype(float) - right["base_rag"]
    low, high = paired_interval(diff, resamples(len(diff)))
    return {"n": len(y), "roles": roles, "fit_roles": FIT_ROLES, **{k: _rate(v) for k, v in right.items()},
            "room": {"diff": float(diff.mean()), "low": low, "high": high, "n": len(y)},
            "where_they_fail": where_they_fail(right["base_no_rag"], right["reference_vote"],
                                               [q.kind for q in questions])}


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chain", type=Path, default=Path("outputs/toy"), help="a chain's folder (world/, retrieval/, policy/)")
    ap.add_argument("--roles", nargs="+", default=["test_vqa"], help="index roles to measure (default test_vqa)")
    ap.add_argument("--limit", type=int, default=0, help="records per file (0 = all)")
    ap.add_argument("--eval", type=Path, help="an evaluation folder of this chain (predictions.jsonl): also split its "
                                              "answers by whether the references' vote is right")
    ap.add_argument("--out", type=Path, help="write the figures here as JSON (default: print only)")
    args = ap.parse_args(argv)
    try:
        got = room(args.chain, args.roles, args.limit, progress=True)
        if args.eval:
            predictions = args.eval / "predictions.jsonl"
            got["by_reference"] = by_reference(read_questions(args.chain, args.roles, args.limit), predictions)
            if not got["by_reference"]:
                raise InputError(f"{predictions}: no scored answer to the yes/no questions of {args.chain} under {args.roles}")
    except (InputError, ValueError, OSError) as e:
        raise SystemExit(f"toy.room: {e}") from None
    if args.out:
        atomic_write_json(args.out, got)
    r = got["room"]
    print(f"n = {got['n']}: base no RAG {got['base_no_rag']['accuracy']:.3f}, base RAG {got['base_rag']['accuracy']:.3f}, "
          f"reference vote {got['reference_vote']['accuracy']:.3f}, combined {got['combined']['accuracy']:.3f}; "
          f"room {r['diff']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]")
    w = got["where_they_fail"]
    parts = ", ".join(f"{k} (n = {v['n']}) {_fmt(v['reading'])} / {_fmt(v['vote'])}" for k, v in w["by_finding"].items())
    print(f"reference vote where the base reads right {_fmt(w['vote_where_reading']['right'])}, wrong "
          f"{_fmt(w['vote_where_reading']['wrong'])}; reading / vote by asked finding: {parts}")
    for policy, conditions in got.get("by_reference", {}).items():
        for condition, s in conditions.items():
            print(f"{policy} {condition} (n = {s['n']}): {_fmt(s['accuracy'])}, agrees with the vote {s['agrees_with_vote']:.3f}; "
                  f"where the vote is right (n = {s['vote_right']['n']}) {_fmt(s['vote_right']['accuracy'])}, "
                  f"wrong (n = {s['vote_wrong']['n']}) {_fmt(s['vote_wrong']['accuracy'])}")
            for side in ("vote_right", "vote_wrong"):
                print(f"  {side.replace('_', ' ')}: " + ", ".join(
                    f"{kind} {_fmt(k['accuracy'])} (n = {k['n']})" for kind, k in s[side]["by_kind"].items()))


if __name__ == "__main__":
    main()
