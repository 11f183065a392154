"""Supervised fine-tuning of the policy, LoRA or full: ``bash scripts/train_sft.sh [CONFIG.yaml] [--key value ...]``.

The loss is on the answer only (labels -100 on prompt and padding: ``Policy.encode_for_training``).
Training records come from
- retrieval JSONL (docs/DESIGN.md contract 2: VQA or report records + ``reference_reports``), found by
  role in an ``index.json`` (scripts/retrieve.sh, ``python -m toy.oracle_retrieval``) or given as
  ``data.files``: the prompt lists the references, except for a ``no_reference_rate`` share of
  records (fixed by seed and record id) trained without them, so the model answers both ways;
- plain VQA JSONL / report JSON (prompts without references);
- LLaVA conversation JSON (first human turn = prompt, the gpt turn after it = answer).

Writes into ``train.output_dir`` the model as from_pretrained loads it (a PEFT adapter with
LoRA, else a full model) with its processor, ``merged/`` with ``--merge`` (LoRA folded in), and
run_config.yaml, metrics.jsonl, tensorboard/, checkpoints/, run_summary.json (the step reached and
``budget``: what fitting prompts to ``data.max_length`` cut or refused, policy.budget; answers are never
cut). With ``measure.roles`` set, the
trained model is then measured (``reliance.json``, see ``measure_reliance``); ``--eval_only``
measures ``policy`` (+ ``adapter``) without training.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from tqdm.auto import tqdm

from common.config import ConfigError, cli_main, doc, load_config, save_config
from common.engine import EngineConfig, LoraConfig, apply_lora, build_accelerator, save_model, train
from common.io import InputError, atomic_write_json, run_lock
from data.answers import yes_no
from data.datasets import QueryDataset
from data.images import SKIPPED_KEY, BadImageError, BadImageLog, SkippedSample, load_image, pick_root, resolve_image
from data.loader import StagedSampler, make_loader
from data.noise import NoiseConfig, make_x_v_star, stable_seed
from data.readers import bad_records_summary, detect_kind, read_index, read_records, skip_record, strip_image_mark
from data.records import ReportRecord, VqaRecord
from policy.adapters import load_with_adapters, save_merged
from policy.align import FindingAligner
from policy.answers import vqa_correct
from policy.budget import (
    BUDGET_KEY, BudgetLog, PromptParts, answer_tokens, budget_for, describe, fit_prompt, policy_limit,
)
from policy.policy import IGNORE, Policy, PolicySpec, sequence_logps
from policy.prompts import PromptTemplates, keep_prompts


@dataclass
class SftDataConfig:
    retrieval_index: str = doc("outputs/toy/oracle_retrieval/index.json", "index.json listing retrieval JSONL files by role")
    roles: list[str] = doc(["policy_train"], "index roles to train on (used when `files` is empty)")
    files: list[str] = doc([], "training files instead of the index: retrieval JSONL, VQA JSONL, report JSON, conversation JSON")
    image_root: str = doc("", "image folder for records without a usable own root ({domain} is filled in)")
    domain: str = doc("", "domain of records that name none (retrieval rows and index entries do)")
    no_reference_rate: float = doc(0.3, "share of retrieval records trained without their references")
    noised_reference_rate: float = doc(0.0, "share of the records trained with references whose image is x_v* "
                                            "(another image of the domain + noise, as the copy check's) under the "
                                            "same answer: a policy that learns to answer from its references when "
                                            "its image says otherwise, as Med-LVLMs over-trust retrieval")
    max_references: int = doc(0, "use at most this many references per record (0 = all)")
    val_fraction: float = doc(0.0, "share of images held out with all their records, for eval_loss and eval_reading")
    val_reading: int = doc(0, "held-out VQA questions (at most) asked without references at each evaluation: their "
                              "accuracy is eval_reading, how well the policy reads the image (0 = not asked)")
    max_length: int = doc(0, "token budget of prompt (image tokens included) + answer, and of prompt + max_new_tokens "
                             "when measuring; references are dropped or shortened to fit, a record that cannot fit is "
                             "refused (0 = the model's own limit)")
    limit: int = doc(0, "use the first N records of each file (0 = all)")
    bad_image: Literal["skip", "error"] = doc("skip", "an unreadable image: skip the sample, or stop")
    bad_record: Literal["skip", "error"] = doc("skip", "a record that cannot be used: skip it (named in bad_records.json), or stop")


@dataclass
class MeasureConfig:
    roles: list[str] = doc([], "index roles to measure after training, e.g. [val_vqa] (empty = none)")
    limit: int = doc(0, "measure the first N VQA records of each file (0 = all)")
    sigma: float = doc(0.1, "Gaussian noise std on the other image that replaces the real one")
    seed: int = doc(0, "seed of the other-image pick and the noise")
    batch_size: int = doc(32, "generation batch size")
    max_new_tokens: int = doc(16, "generated tokens per answer")


@dataclass
class SftConfig:
    policy: PolicySpec = doc(PolicySpec(), "the policy to start from: checkpoint, adapter merged into it, dtype, prompts")
    adapter: str = doc("", "PEFT adapter on the policy, for --eval_only")
    merge: bool = doc(False, "LoRA: also write the merged full model to <output_dir>/merged")
    eval_only: bool = doc(False, "only measure the policy (+ adapter) on measure.roles; no training")
    align_findings: float = doc(0.0, "weight of the finding-alignment loss (policy.align; records need `findings`): the toy policy's stand-in for LLaVA's stage-1 alignment")
    data: SftDataConfig = doc(SftDataConfig(), "training data")
    train: EngineConfig = doc(EngineConfig(output_dir="outputs/sft"), "optimization, checkpoints, logging")
    lora: LoraConfig = doc(LoraConfig(), "what is trained")
    measure: MeasureConfig = doc(MeasureConfig(), "reliance on retrieval, measured after training")


@dataclass
class Example:
    """One training sample: the record (id, image, root) and the prompt/answer it is trained on."""

    record: VqaRecord | ReportRecord
    domain: str
    task: str  # "vqa" | "report" | "conversation"
    question: str | None  # None: the template's report instruction
    answer: str
    references: list[str] | None  # None: prompt without retrieval
    noised: bool = False  # trained on x_v* instead of its own image (data.noised_reference_rate)

    def parts(self) -> PromptParts:
        if self.task == "conversation":
            return PromptParts(text=self.question)
        return PromptParts(self.domain, self.task, self.question, tuple(self.references or ()))


@dataclass
class Source:
    path: str
    domain: str | None
    image_root: str | None
    role: str | None = None


def index_sources(index: str | Path, roles: list[str], domain: str = "") -> list[Source]:
    """The files of ``roles`` listed in an ``index.json`` (retrieve.sh, toy.oracle_retrieval)."""
    return [Source(str(e["path"]), domain or e.get("domain"), e.get("image_root"), e.get("role"))
            for e in read_index(index, roles)]


def training_sources(cfg: SftDataConfig) -> list[Source]:
    """``cfg.files`` if given, else the index entries of ``cfg.roles``."""
    if cfg.files:
        return [Source(p, cfg.domain or None, None) for p in cfg.files]
    return index_sources(cfg.retrieval_index, cfg.roles, cfg.domain)


def keep(key: str, rate: float, seed: int, purpose: str) -> bool:
    """A fixed pseudo-random draw per (record, purpose): True with probability 1 - rate."""
    return stable_seed(purpose, key, seed) % 1_000_000 >= rate * 1_000_000


def _root(src: Source, cfg: SftDataConfig, domain: str) -> str | None:
    """Image folder for a source's records without a usable own root: the index's, else the config's."""
    return src.image_root or (cfg.image_root.format(domain=domain) if cfg.image_root else None)


def read_conversations(path: str, domain: str, root: str | None, bad_record: str = "skip",
                       skipped: list[str] | None = None) -> list[Example]:
    """LLaVA conversation JSON (a list): first human turn -> prompt, the next gpt turn -> answer.
    A record without them is skipped and named in ``skipped`` (``bad_record: error`` stops)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of conversation records")
    out, n_bad = [], 0
    for n, raw in enumerate(data):
        try:
            out.append(_conversation(raw, f"{path}:[{n}]", n, domain, root))
        except InputError as e:
            if bad_record == "error":
                raise
            n_bad += 1
            skip_record(str(e), n_bad, Path(path), skipped)
    return out


def _conversation(raw: Any, where: str, n: int, domain: str, root: str | None) -> Example:
    turns = raw.get("conversations") if isinstance(raw, dict) else None
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise InputError(f"{where}: `conversations` must be a list of {{from, value}} turns")
    h = next((i for i, t in enumerate(turns) if t.get("from") == "human"), None)
    gpt = next((t for t in turns[(h or 0) + 1:] if t.get("from") == "gpt"), None)
    image = raw.get("image")
    if h is None or gpt is None or not isinstance(image, str) or not image:
        raise InputError(f"{where}: needs `image` and a human turn followed by a gpt turn")
    prompt, answer = strip_image_mark(str(turns[h].get("value", ""))), str(gpt.get("value", "")).strip()
    rec = VqaRecord(id=str(raw.get("id", n)), question=prompt, answer=answer, images=[image],
                    image_root=pick_root(raw.get("image_root"), root), source=where)
    return Example(rec, str(raw.get("domain") or domain), "conversation", prompt, answer, None)


def read_examples(
    sources: list[Source], cfg: SftDataConfig, seed: int, vqa_only: bool = False, skipped: list[str] | None = None
) -> list[Example]:
    """Every usable record of every source as an Example (references dropped per
    ``no_reference_rate``, images to be noised per ``noised_reference_rate``; bad records go to ``skipped``)."""
    examples: list[Example] = []
    for src in sources:
        kind = detect_kind(src.path)
        if kind == "preference":
            if not vqa_only:
                domain = src.domain or "default"
                examples += read_conversations(src.path, domain, _root(src, cfg, domain), cfg.bad_record,
                                                skipped)[: cfg.limit or None]
            continue
        if vqa_only and kind != "vqa":
            continue
        for rec in read_records(src.path, kind=kind, bad_record=cfg.bad_record, skipped=skipped)[: cfg.limit or None]:
            domain = src.domain or rec.meta.get("domain") or "default"
            rec = dataclasses.replace(rec, image_root=pick_root(rec.image_root, _root(src, cfg, domain)))
            refs = rec.meta.get("reference_reports")
            if refs is not None and not (isinstance(refs, list) and all(isinstance(r, str) for r in refs)):
                raise InputError(f"{rec.source}: `reference_reports` must be a list of strings")
            if refs and cfg.max_references:
                refs = refs[: cfg.max_references]
            if refs and not keep(f"{domain}/{rec.id}", cfg.no_reference_rate, seed, "no-reference"):
                refs = None
            noised = bool(refs) and not keep(f"{domain}/{rec.id}", cfg.noised_reference_rate, seed, "noised-reference")
            if isinstance(rec, VqaRecord):
                examples.append(Example(rec, domain, "vqa", rec.question, rec.answer, refs or None, noised))
            else:
                examples.append(Example(rec, domain, "report", None, rec.text, refs or None, noised))
    if not examples:
        raise InputError(f"{sources[0].path}: no training records found" if sources else "no training files")
    return examples


def held_out(examples: list[Example], fraction: float, seed: int) -> list[bool]:
    """Which examples are held out: about ``fraction`` of the images, with every record of each.
    A question whose image was trained on with other questions or its report would measure memory,
    not reading."""
    return [not keep(f"{e.domain}/{_image_name(e) or e.record.id}", fraction, seed, "val") for e in examples]


def _rgb(img: Image.Image) -> Image.Image:
    return img.convert("RGB")


FINDING_LABELS = "finding_labels"  # batch key of the alignment targets (popped before the forward)


class SftCollate:
    """Dataset items (images) + their examples (prompts, answers) -> a training batch.

    Each prompt is fitted to ``max_length`` with its answer (policy.budget); the notes ride in the
    batch under ``budget`` (named by the record's source) and a refused record is left out.
    With an ``aligner`` the batch also carries each image's finding labels (policy.align), none
    (NaN) for an x_v*, whose findings are not the record's. An x_v* is built as the copy check
    builds it (data.noise.make_x_v_star, seeded by the record); one that cannot be built (no
    readable other image) drops its sample, carried under ``skipped`` for ``BadImageLog.take``.
    """

    def __init__(self, policy: Policy, examples: list[Example], templates: PromptTemplates, max_length: int | None,
                 aligner: FindingAligner | None = None, noise: NoiseConfig | None = None):
        self.policy, self.examples, self.templates, self.max_length = policy, examples, templates, max_length
        self.aligner, self.noise = aligner, noise or NoiseConfig()
        self.pool = x_v_star_pool(examples) if any(e.noised for e in examples) else {}

    def _x_v_star(self, e: Example, image: Image.Image) -> Image.Image:
        return make_x_v_star(_image_name(e), image, self.noise, self.pool[e.domain], load_image,
                             domain=e.domain, salt="sft")

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        notes, exs, prompts, images, skipped = [], [], [], [], []
        for it in items:
            e = self.examples[it["index"]]
            try:
                image = self._x_v_star(e, it["image"]) if e.noised else it["image"]
            except BadImageError as err:
                skipped.append(SkippedSample(err.path, err.reason, err.detail))
                continue
            reserve = answer_tokens(self.policy, [e.answer])
            fit = fit_prompt(self.policy, e.parts(), self.templates, [image], self.max_length, reserve)
            notes.append((e.record.source, fit.note))
            if not fit.refused:
                exs.append(e)
                prompts.append(fit.prompt)
                images.append(image)
        if not exs:
            return {BUDGET_KEY: notes, SKIPPED_KEY: skipped}
        batch: dict[str, Any] = self.policy.encode_for_training(prompts, [e.answer for e in exs], images)
        if self.aligner is not None:
            labels = self.aligner.labels([e.record for e in exs], [e.domain for e in exs])
            labels[[e.noised for e in exs]] = float("nan")
            batch[FINDING_LABELS] = labels
        batch[BUDGET_KEY] = notes
        batch[SKIPPED_KEY] = skipped
        return batch


def example_length(e: Example) -> int:
    """Characters of an example's question, references and answer: the sort key of length-grouped
    batches, standing in for tokens (the image's tokens are the same for every example)."""
    return len(e.question or "") + sum(len(r) for r in e.references or ()) + len(e.answer)


def make_sft_loader(policy: Policy, examples: list[Example], cfg: SftConfig, shuffle: bool, bad_log: BadImageLog,
                    aligner: FindingAligner | None = None):
    """Shuffled (``shuffle``) batches, length-grouped with ``train.group_by_length``, else in order."""
    templates = cfg.policy.templates()
    dataset = QueryDataset([e.record for e in examples], None, _rgb, bad_image=cfg.data.bad_image, bad_log=bad_log)
    collate = SftCollate(policy, examples, templates, budget_for(cfg.data.max_length, policy_limit(policy)), aligner,
                         NoiseConfig(seed=cfg.train.seed))
    sampler = None
    if shuffle and cfg.train.group_by_length:
        sampler = StagedSampler([range(len(examples))], cfg.train.seed, lengths=[example_length(e) for e in examples],
                                batch_size=cfg.train.batch_size)
    return make_loader(dataset, cfg.train.batch_size, shuffle=shuffle and sampler is None,
                       num_workers=cfg.train.num_workers, collate_fn=collate, seed=cfg.train.seed, sampler=sampler)


def answer_loss(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy over the batch's answer tokens, their count): the model's own loss,
    from the chunked answer log-probs (policy.sequence_logps) instead of the full logits."""
    n = (batch["labels"][:, 1:] != IGNORE).sum()
    return -sequence_logps(model, batch).sum() / n.clamp(min=1), n


def sft_loss_fn(aligner: FindingAligner | None = None, weight: float = 0.0):
    """The engine's loss: mean cross-entropy over answer tokens, plus ``weight`` x the
    finding-alignment loss when there is an aligner."""

    def loss_fn(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        targets = batch.pop(FINDING_LABELS, None)
        loss, n = answer_loss(model, batch)
        metrics = {"answer_tokens": float(n)}
        if aligner is not None and targets is not None:
            align = aligner.loss(targets)
            metrics["answer_loss"], metrics["align_loss"] = loss.item(), align.item()
            loss = loss + weight * align
        return loss, metrics

    return loss_fn


def eval_loss_fn(accelerator: Any, loader: Any, take_batch: Any):
    """eval_fn for the engine: token-weighted mean answer loss on ``loader``, over all processes."""

    @torch.no_grad()
    def evaluate(model: Any) -> dict[str, float]:
        model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        for batch in loader:
            batch = take_batch(batch)
            if batch is None:
                continue
            loss, n = answer_loss(model, batch)
            total += torch.stack([loss.double() * n, n.double()])
        total = accelerator.reduce(total, "sum")
        return {"eval_loss": (total[0] / total[1].clamp(min=1)).item()}

    return evaluate


def reading_fn(policy: Policy, examples: list[Example], templates: PromptTemplates, max_length: int | None,
               cfg: MeasureConfig):
    """eval_fn for the engine: ``eval_reading``, the accuracy on ``examples`` (VQA) asked without
    references, i.e. how well the policy answers from the image alone. Every process asks the
    same questions (identical forwards, as ZeRO-3's gathered layers need), so nothing is reduced."""
    images, prompts, golds = [], [], []
    for e in examples:
        try:
            image = load_image(str(_image_path(e)))
        except BadImageError:
            continue
        fit = fit_prompt(policy, dataclasses.replace(e.parts(), references=()), templates, [image], max_length,
                         cfg.max_new_tokens)
        if not fit.refused:
            images.append(image)
            prompts.append(fit.prompt)
            golds.append(e.answer)

    def evaluate(model: Any) -> dict[str, float]:
        answers = policy.generate(images, prompts, cfg.max_new_tokens, cfg.batch_size)
        return {"eval_reading": _mean([vqa_correct(a, g) for a, g in zip(answers, golds)])}

    return evaluate


# ---------------------------------------------------------------- reliance on retrieval


def measure_reliance(policy: Policy, examples: list[Example], cfg: MeasureConfig, templates: PromptTemplates,
                     budget: BudgetLog) -> dict[str, Any]:
    """VQA accuracy under three conditions, overall and per domain (a quick check, not the evaluation):

    - ``no_retrieval``: real image, no references;
    - ``retrieval``: real image + the record's references;
    - ``noised_retrieval``: a different image of the same domain + Gaussian noise, + references.
      Its accuracy is the copy rate: answers that survive losing the image came from the text.
    Records without references are left out, and so are records whose prompts cannot fit
    ``budget`` (its notes are the result's ``budget``). ``yes_rate`` (share of "yes" answers) shows a
    model that answers the same whatever it sees.
    """
    examples = [e for e in examples if e.task == "vqa" and e.references]
    pool = x_v_star_pool(examples)
    images, prompts, keys = [], [], []
    noise = NoiseConfig("other_image+gaussian", sigma=cfg.sigma, seed=cfg.seed)
    for e in tqdm(examples, desc="measure: images", disable=len(examples) < 200):
        try:
            real = load_image(str(_image_path(e)))
            noised = make_x_v_star(_image_name(e), real, noise, pool[e.domain], load_image, domain=e.domain,
                                   salt="measure")
        except BadImageError:
            continue
        parts = e.parts()
        with_refs = fit_prompt(policy, parts, templates, [real, noised], budget.max_length, cfg.max_new_tokens)
        without = fit_prompt(policy, dataclasses.replace(parts, references=()), templates, [real], budget.max_length,
                             cfg.max_new_tokens)
        budget.record(f"{e.record.source}/retrieval", with_refs.note)
        budget.record(f"{e.record.source}/no_retrieval", without.note)
        if with_refs.refused or without.refused:
            continue
        images += [real, real, noised]
        prompts += [without.prompt, with_refs.prompt, with_refs.prompt]
        keys.append(e)
    answers = policy.generate(images, prompts, cfg.max_new_tokens, cfg.batch_size, progress=True)
    conditions = ("no_retrieval", "retrieval", "noised_retrieval")
    right: dict[str, dict[str, list[bool]]] = {}
    yes: dict[str, dict[str, list[bool]]] = {}
    for i, e in enumerate(keys):
        for j, c in enumerate(conditions):
            answer = answers[3 * i + j]
            for group in ("all", e.domain):
                right.setdefault(group, {}).setdefault(c, []).append(vqa_correct(answer, e.answer))
                yes.setdefault(group, {}).setdefault(c, []).append(yes_no(answer) == "yes")
    result: dict[str, Any] = {
        g: {"n": len(v["retrieval"]), **{c: _mean(v[c]) for c in conditions},
            "yes_rate": {c: _mean(yes[g][c]) for c in conditions}}
        for g, v in right.items()
    }
    result["examples"] = [{"id": e.record.id, "domain": e.domain, "answer": e.answer,
                           **{c: answers[3 * i + j] for j, c in enumerate(conditions)}} for i, e in enumerate(keys[:30])]
    result["budget"] = budget.summary()
    return result


def _mean(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def _image_name(e: Example) -> str | None:
    """The record's image as written (None: it has none): x_v* and the held-out split are drawn by
    it (as the pair builder and the evaluation draw theirs), so a chain gets the same draws
    wherever its folder is."""
    rec = e.record
    return rec.images[0] if rec.images else getattr(rec, "npz", None)


def _image_path(e: Example) -> Path:
    return resolve_image(_image_name(e), e.record.image_root, None)


def x_v_star_pool(examples: list[Example]) -> dict[str, dict[str, str]]:
    """domain -> image (as written) -> its path: the other images x_v* is drawn from (data.noise.make_x_v_star)."""
    pool: dict[str, dict[str, str]] = {}
    for e in examples:
        pool.setdefault(e.domain, {}).setdefault(_image_name(e), str(_image_path(e)))
    return pool


def run_measure(cfg: SftConfig, spec: PolicySpec, adapter: str | None) -> dict[str, Any]:
    """Measure the policy of ``spec`` (+ ``adapter``) on ``measure.roles``; writes reliance.json."""
    policy = load_with_adapters(spec, adapter)
    data = dataclasses.replace(cfg.data, limit=cfg.measure.limit, no_reference_rate=0.0)
    sources = index_sources(data.retrieval_index, cfg.measure.roles, data.domain)
    examples = read_examples(sources, data, cfg.train.seed, vqa_only=True)
    result = measure_reliance(policy, examples, cfg.measure, spec.templates(),
                              BudgetLog.of(policy, cfg.data.max_length))
    atomic_write_json(Path(cfg.train.output_dir) / "reliance.json", result)
    a = result.get("all", {})
    print(f"reliance on {a.get('n', 0)} VQA records: accuracy without retrieval {a.get('no_retrieval', 0):.3f}, "
          f"with retrieval {a.get('retrieval', 0):.3f}, noised image + retrieval (copy rate) "
          f"{a.get('noised_retrieval', 0):.3f}")
    return result


# ---------------------------------------------------------------- training


def run_sft(cfg: SftConfig) -> Path:
    out = Path(cfg.train.output_dir)
    accelerator = build_accelerator(cfg.train)  # before the model: ZeRO-3 loads it sharded
    policy = load_with_adapters(cfg.policy)
    budget = BudgetLog.of(policy, cfg.data.max_length)
    policy.model = apply_lora(policy.model, cfg.lora, cfg.train.gradient_checkpointing)
    if accelerator.is_main_process:
        save_config(cfg, out / "run_config.yaml")
    bad_records: list[str] = []
    examples = read_examples(training_sources(cfg.data), cfg.data, cfg.train.seed, skipped=bad_records)
    held = held_out(examples, cfg.data.val_fraction, cfg.train.seed)
    train_ex = [e for e, h in zip(examples, held) if not h]
    val_ex = [e for e, h in zip(examples, held) if h]
    with_refs = sum(e.references is not None for e in train_ex)
    noised = sum(e.noised for e in train_ex)
    accelerator.print(f"SFT on {len(train_ex)} records ({with_refs} with references, {noised} of them on x_v*), "
                      f"{len(val_ex)} held out")
    bad_log = BadImageLog()

    def take(batch: Any) -> Any:
        return budget.take(bad_log.take(batch))

    aligner = None
    if cfg.align_findings:
        aligner = FindingAligner([e.record for e in train_ex], [e.domain for e in train_ex], policy.tokenizer)
        hook = aligner.attach(policy.model)
    loader = make_sft_loader(policy, train_ex, cfg, shuffle=True, bad_log=bad_log, aligner=aligner)
    evals = []
    if val_ex:
        val_loader = accelerator.prepare(make_sft_loader(policy, val_ex, cfg, shuffle=False, bad_log=bad_log))
        evals.append(eval_loss_fn(accelerator, val_loader, take))
    questions = [e for e in val_ex if e.task == "vqa"]
    if cfg.data.val_reading and questions:
        questions = random.Random(cfg.train.seed).sample(questions, min(cfg.data.val_reading, len(questions)))
        evals.append(reading_fn(policy, questions, cfg.policy.templates(),
                                budget_for(cfg.data.max_length, policy_limit(policy)), cfg.measure))
    eval_fn = (lambda model: {k: v for fn in evals for k, v in fn(model).items()}) if evals else None
    start = time.perf_counter()
    result = train(cfg.train, accelerator, policy.model, loader, sft_loss_fn(aligner, cfg.align_findings), eval_fn,
                   policy.processor, take)
    if aligner is not None:
        hook.remove()
    save_model(accelerator, result.model, out, policy.processor)
    bad_log.write(accelerator, out / "bad_images.json")
    summary = budget.merged(accelerator).summary()
    if accelerator.is_main_process:
        keep_prompts(cfg.policy.prompts_file(), out)
        atomic_write_json(out / "bad_records.json", {"bad_records": bad_records_summary(bad_records)})
        atomic_write_json(out / "run_summary.json", {"step": result.step, "metrics": result.metrics, "budget": summary})
    accelerator.print(describe(summary))
    accelerator.print(f"SFT: {result.step} steps in {time.perf_counter() - start:.0f} s -> {out}")
    if accelerator.is_main_process and cfg.lora.enabled and cfg.merge:
        save_merged(load_with_adapters(cfg.policy, out), out / "merged", cfg.policy.prompts_file())
    if accelerator.is_main_process and cfg.measure.roles:
        if cfg.lora.enabled:
            run_measure(cfg, cfg.policy, str(out))
        else:  # the full model written to out already holds init_adapter
            run_measure(cfg, dataclasses.replace(cfg.policy, path=str(out), init_adapter=""), None)
    accelerator.wait_for_everyone()
    return out


def main() -> None:
    cfg = load_config(SftConfig, description=__doc__)
    rates = (cfg.data.no_reference_rate, cfg.data.noised_reference_rate)
    if not all(0.0 <= r <= 1.0 for r in rates) or not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError("data.no_reference_rate and data.noised_reference_rate must be in [0, 1], "
                          "data.val_fraction in [0, 1)")
    if cfg.eval_only and not cfg.measure.roles:
        raise ConfigError("--eval_only needs --measure.roles, e.g. [val_vqa]")
    with run_lock(cfg.train.output_dir):
        if cfg.eval_only:
            run_measure(cfg, cfg.policy, cfg.adapter or None)
        else:
            run_sft(cfg)


if __name__ == "__main__":
    cli_main(main)
