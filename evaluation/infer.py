"""Answer a question about an image with the whole MMed-RAG path (the released code never shipped it).

    bash scripts/infer.sh --image PATH [--question TEXT]          # one query, printed
    bash scripts/infer.sh --queries FILE.jsonl [--out FILE]        # many, written as JSONL

Steps: F(x_v) names the image's domain (or ``--domain`` fixes it); that domain's CLIP retrieves
reports from its corpus; the k rule (``k``; by default the paper's adaptive gap rule, at most 5)
keeps some; the prompt (policy.prompts) joins question and reports; the policy with its DPO adapter
answers. Without ``--question`` the policy writes a report. Printed per query: the domain, the
kept reports with their scores, the answer.

``--queries``: one JSON object per line with ``image`` (or ``image_path``) and optionally
``question``, ``id`` (or ``question_id``), ``task`` (vqa | report), ``domain``; a MMed-RAG test
VQA JSONL works as it is. Relative image paths are taken under ``image_root``. Output: every
input field plus ``domain``, ``reference_reports``, ``reference_ids``, ``reference_scores``,
``retrieve_k``, ``budget`` and ``prediction`` (``error`` for a query whose image cannot be read or
whose prompt cannot fit). The prompt is fitted to ``max_length`` with ``max_new_tokens`` after it
(policy.budget): references are dropped from the last one or the last kept one shortened; ``budget``
says what was cut, and ``<out>.budget.json`` sums it over the queries.

Defaults are the toy pipeline's outputs (outputs/toy/clip, outputs/toy/policy, the DPO adapter
in outputs/toy/dpo/adapter when there is one); a missing one stops with exit code 2 naming the
script that makes it. That adapter is applied only to the toy policy: another ``--policy.path`` gets
an adapter only from ``--adapter PATH``. The first line printed names the policy and the adapter
used, and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

from PIL import Image

from common.config import ConfigError, cli_main, doc, load_config
from common.io import InputError, atomic_write_json, atomic_write_jsonl, read_jsonl
from data.images import BadImageError, inside_root, load_image
from policy.adapters import check_adapter_base, find_adapter, load_with_adapters
from policy.budget import BudgetLog, PromptParts, describe, fit_prompt
from policy.policy import PolicySpec
from policy.prompts import OPTION_TEXT_HELP, own_options
from retriever.select_k import KRule

TASKS = ("vqa", "report")
TOY_POLICY = "outputs/toy/policy"


@dataclass
class AnswerConfig:
    """The answering path's models and settings, shared by inference and the web demo (evaluation.serve)."""

    k: KRule = doc(KRule(rule="gap", k=5, gamma=0.1), "how many retrieved reports to keep (retriever.select_k)")
    clip_dir: str = doc("outputs/toy/clip", "the retrievers and domain classifier (bash scripts/finetune_clip.sh)")
    checkpoint: str = doc("best", "which checkpoint of each retriever: best | latest")
    cache_dir: str = doc("outputs/toy/retrieval/cache", "corpus embedding cache (shared with the retrieval stage)")
    match: Literal["text", "image"] = doc("text", "what the query image is scored against: each report's text | the image of each report's study (as the retrieval stage's `match`)")
    policy: PolicySpec = doc(PolicySpec(), "the policy before `adapter`: checkpoint (the toy one: bash "
                                           "scripts/make_toy_policy.sh), adapter merged into it (as train_dpo's "
                                           "policy.init_adapter), dtype, prompts")
    adapter: str = doc("", "PEFT adapter; empty = outputs/toy/dpo/adapter if present and the policy is the toy one, "
                           "else none; `none` = the base policy")
    option_text: bool = doc(False, OPTION_TEXT_HELP)
    max_new_tokens_vqa: int = doc(16, "answer length cap for questions")
    max_new_tokens_report: int = doc(96, "answer length cap for reports")
    max_length: int = doc(0, "token budget of prompt (image tokens included) + max_new_tokens; references are dropped or "
                             "shortened to fit, a query that cannot fit gets an error (0 = the model's own limit)")
    batch_size: int = doc(8, "generation batch size")
    device: str = doc("cpu", "device for the policy")


@dataclass
class InferConfig(AnswerConfig):
    image: str = doc("", "query image (with --question, or alone for a report)")
    question: str = doc("", "question about --image; empty = write a report")
    queries: str = doc("", "JSONL of queries (image, question, id, task, domain) instead of --image")
    out: str = doc("", "answers JSONL for --queries; empty = outputs/toy/infer/<queries stem>.answers.jsonl")
    image_root: str = doc("", "folder for relative image paths in --queries (empty: as written)")
    task: str = doc("", "vqa | report for every query; empty = vqa when there is a question, else report")
    domain: str = doc("", "skip F(x_v) and use this domain's retriever for every query")
    rag: bool = doc(True, "retrieve reports (false: answer from the image and question alone)")


@dataclass
class Query:
    row: dict[str, Any]  # the input fields, copied to the output
    image_path: str
    question: str | None
    task: str
    domain: str | None
    options: str | None = None  # the row's own option text, when option_text is on


# ---------------------------------------------------------------- inputs


def _task(explicit: str, question: str | None, where: str) -> str:
    task = explicit or ("vqa" if question else "report")
    if task not in TASKS:
        raise InputError(f"{where}: task {task!r} is not one of {list(TASKS)}")
    return task


def read_queries(cfg: InferConfig) -> list[Query]:
    """The queries of ``--image``/``--question`` or of the ``--queries`` JSONL."""
    if bool(cfg.image) == bool(cfg.queries):
        raise ConfigError("give --image PATH (with --question TEXT for a question) or --queries FILE.jsonl")
    if cfg.image:
        question = cfg.question.strip() or None
        return [Query({"image": cfg.image, "question": question}, cfg.image, question,
                      _task(cfg.task, question, "--task"), cfg.domain or None)]
    path = Path(cfg.queries)
    if not path.is_file():
        raise InputError(f"{path}: queries file does not exist")
    queries = []
    for n, row in enumerate(read_jsonl(path), 1):
        where = f"{path}:{n}"
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object")
        image = row.get("image") or row.get("image_path")
        if isinstance(image, list):
            image = image[0] if image else None
        if not isinstance(image, str) or not image:
            raise InputError(f"{where}: no `image`")
        question = row.get("question")
        if question is not None and not isinstance(question, str):
            raise InputError(f"{where}: `question` must be a string")
        question = (question or "").replace("<image>", "").strip() or None
        resolved = str(inside_root(image, cfg.image_root or None)) if not Path(image).is_absolute() else image
        options = own_options(row.get("text"), question, cfg.option_text)
        queries.append(Query(row, resolved, question, _task(cfg.task or row.get("task") or "", question, where),
                             cfg.domain or row.get("domain") or None, options))
    if not queries:
        raise InputError(f"{path}: no queries")
    return queries


# ---------------------------------------------------------------- loading


def load_retriever(cfg: AnswerConfig, require_router: bool = True) -> Any:
    """retriever.retrieve.Retriever of ``clip_dir``; InputError naming finetune_clip.sh if absent."""
    from retriever.retrieve import Retriever

    if not Path(cfg.clip_dir).is_dir():
        raise InputError(f"{cfg.clip_dir}: no retrievers here; make them with `bash scripts/finetune_clip.sh`")
    try:
        return Retriever.load(cfg.clip_dir, cfg.checkpoint, cache_dir=cfg.cache_dir,
                              require_router=require_router, match=cfg.match)
    except FileNotFoundError as e:
        raise InputError(f"{e} (`bash scripts/finetune_clip.sh` makes it)") from None


def pick_adapter(cfg: AnswerConfig) -> tuple[str | None, str]:
    """The DPO adapter to apply and why (for the header). The toy's adapter is a default only for
    the toy policy: on any other policy it would change the answers unasked."""
    if cfg.adapter == "none":
        return None, "--adapter none"
    if cfg.adapter:
        return find_adapter(cfg.adapter), "--adapter"
    if Path(cfg.policy.path).resolve() != Path(TOY_POLICY).resolve():
        return None, "not the toy policy: pass --adapter PATH to apply one"
    adapter = find_adapter("")
    return adapter, "the toy policy's DPO adapter" if adapter else "no toy DPO adapter yet: bash scripts/train_dpo.sh"


def load_answerer(cfg: AnswerConfig) -> tuple[Any, str]:
    """The policy (with its adapters, merged) and the header line naming the policy and adapter."""
    if not Path(cfg.policy.path).is_dir():
        raise InputError(f"{cfg.policy.path}: policy checkpoint folder does not exist; make the toy one with `bash scripts/make_toy_policy.sh`")
    adapter, why = pick_adapter(cfg)
    if adapter:
        check_adapter_base(adapter, cfg.policy.init_adapter)
    policy = load_with_adapters(cfg.policy, adapter, cfg.device)
    used = f" + adapter {adapter}" if adapter else ", no DPO adapter"
    return policy, f"policy: {cfg.policy.path}{used} ({why})"


# ---------------------------------------------------------------- the path


def domains_of(retriever: Any, images: Sequence[Image.Image], fixed: Sequence[str | None]) -> list[str]:
    """Each image's domain: the fixed one where given, else F(x_v)."""
    todo = [i for i, d in enumerate(fixed) if d is None]
    if todo and retriever is None:
        raise InputError("no retriever loaded to route with: pass --domain")
    routed = iter(retriever.route([images[i] for i in todo]) if todo else [])
    domains = [d if d is not None else next(routed) for d in fixed]
    if retriever is not None:
        unknown = sorted({d for d in domains if d not in retriever.domains})
        if unknown:
            raise InputError(f"domain(s) {unknown} have no retriever in this clip_dir; known: {retriever.domains}")
    return domains


def retrieve(retriever: Any, images: Sequence[Image.Image], domains: Sequence[str], k_rule: KRule) -> list[list[Any]]:
    """The kept hits (id, text, score) per image, from its domain's retriever."""
    hits: list[list[Any]] = [[] for _ in images]
    for d in dict.fromkeys(domains):
        rows = [i for i, x in enumerate(domains) if x == d]
        for i, h in zip(rows, retriever.search([images[i] for i in rows], domain=d, k_rule=k_rule)):
            hits[i] = list(h)
    return hits


def answer_queries(queries: list[Query], retriever: Any, policy: Any, cfg: InferConfig,
                   budget: BudgetLog) -> list[dict[str, Any]]:
    """Output rows, one per query, in order; a query whose image is bad, or whose prompt cannot fit
    ``budget`` (each prompt's note is recorded there), gets ``error`` instead."""
    templates = cfg.policy.templates()
    out: list[dict[str, Any]] = [{} for _ in queries]
    good: list[int] = []
    images: list[Image.Image] = []
    for i, q in enumerate(queries):
        try:
            images.append(load_image(q.image_path))
            good.append(i)
        except BadImageError as e:
            out[i] = {**q.row, "error": str(e)}
    if not good:
        return out
    domains = domains_of(retriever, images, [queries[i].domain for i in good])
    hits = retrieve(retriever, images, domains, cfg.k) if cfg.rag else [[] for _ in good]
    for task in TASKS:
        idx = [j for j, i in enumerate(good) if queries[i].task == task]
        if not idx:
            continue
        max_new = cfg.max_new_tokens_vqa if task == "vqa" else cfg.max_new_tokens_report
        fits = {}
        for j in idx:
            q = queries[good[j]]
            parts = PromptParts(domains[j], task, q.question, tuple(h.text for h in hits[j]), options=q.options)
            fit = fit_prompt(policy, parts, templates, [images[j]], budget.max_length, max_new)
            budget.record(f"query {good[j] + 1}: {q.image_path}", fit.note)
            if fit.refused:
                out[good[j]] = {**q.row, "budget": fit.note._asdict(), "error": f"prompt too long: {fit.refused}"}
            else:
                fits[j] = fit
        answers = policy.generate([images[j] for j in fits], [f.prompt for f in fits.values()], max_new_tokens=max_new,
                                  batch_size=cfg.batch_size, progress=True) if fits else []
        for (j, fit), answer in zip(fits.items(), answers):
            out[good[j]] = {
                **queries[good[j]].row, "task": task, "domain": domains[j],
                "reference_reports": [h.text for h in hits[j]], "reference_ids": [h.id for h in hits[j]],
                "reference_scores": [round(h.score, 6) for h in hits[j]], "retrieve_k": len(hits[j]),
                "budget": fit.note._asdict(), "prediction": answer,
            }
    return out


def show(row: dict[str, Any]) -> str:
    """The human-readable account of one answered query."""
    if "error" in row:
        return f"image: {row.get('image') or row.get('image_path')}\nerror: {row['error']}"
    lines = [f"image: {row.get('image') or row.get('image_path')}", f"domain: {row['domain']}"]
    if row.get("question"):
        lines.append(f"question: {row['question']}")
    refs = row["reference_reports"]
    lines.append(f"retrieved reports (k={len(refs)}):" if refs else "retrieved reports: none")
    for n, (text, rid, score) in enumerate(zip(refs, row["reference_ids"], row["reference_scores"]), 1):
        lines.append(f"  {n}. [{score:.3f}] {rid}: {text}")
    cut = row["budget"]
    if cut["dropped"] or cut["shortened"]:
        lines.append(f"to fit max_length: the last {cut['dropped']} reports left out"
                     + (", the last one kept shortened" if cut["shortened"] else "")
                     + f" (prompt {cut['prompt_tokens']} tokens)")
    lines.append(f"answer: {row['prediction']}")
    return "\n".join(lines)


def main() -> None:
    cfg = load_config(InferConfig, description=__doc__)
    queries = read_queries(cfg)
    if cfg.image:
        load_image(cfg.image)  # one bad image is refused before any model loads (exit 2)
    need_retriever = cfg.rag or any(q.domain is None for q in queries)
    retriever = load_retriever(cfg, require_router=not cfg.domain) if need_retriever else None
    policy, header = load_answerer(cfg)
    print(header)
    budget = BudgetLog.of(policy, cfg.max_length)
    rows = answer_queries(queries, retriever, policy, cfg, budget)
    if cfg.queries:
        out = Path(cfg.out or f"outputs/toy/infer/{Path(cfg.queries).stem}.answers.jsonl")
        atomic_write_jsonl(out, rows)
        summary = budget.summary()
        atomic_write_json(out.with_suffix(".budget.json"), summary)
        for row in rows[:3]:
            print(show(row) + "\n")
        failed = sum("error" in r for r in rows)
        print(describe(summary))
        print(f"{len(rows)} answers ({failed} unreadable images or too long prompts) -> {out}")
    else:
        print(show(rows[0]))


if __name__ == "__main__":
    cli_main(main)
