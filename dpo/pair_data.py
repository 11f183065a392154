"""Preference pairs for DPO: reading, the held-out split, stages, per-side images, the 2B batch.

Both our pairs (with ``pair_type``, ``rejected_image``) and the released MMed-RAG alignment files
(``rejected_noised`` = 1, no ``pair_type``) are read by data.readers. Each side of a pair has its
own image: the chosen side sees x_v, the rejected side ``rejected_image`` when the record names
one, else pure Gaussian noise when ``rejected_noised`` = 1 (made at load time, the same for a
record in every run, worker and process: ``pure_noise(size, stable_seed(id, seed))``), else x_v.
``chosen_noised`` = 1 puts noise on the chosen side the same way. For mDPO every pair also gets
a corrupted image m_l, pure noise of x_v's size made the same way (``stable_seed(id, seed,
"corrupted")``), under which the chosen answer is scored again.

A batch is ONE forward pass scored as 2B answers: [0, B) the chosen answers, [B, 2B) the rejected
ones (policy.policy.Policy.encode_preference); for mDPO 3B, [2B, 3B) the chosen ones under m_l,
a row each. A pair whose sides see different images takes two rows, each with its image; with
``share_prompt`` a pair whose sides see the same image and prompt takes one row [prompt, chosen,
rejected], the rejected answer hidden from the chosen one and its positions restarting where the
prompt ends: the same log-probs, the prompt computed once.

Every pair is fitted to the token budget (policy.budget) with its longer answer: our pairs name their
question and references, so references are dropped or shortened; a released pair is plain text
and is refused when it does not fit. Neither answer is ever cut. A shared row holds more tokens than
that budget, but no position beyond it: each answer's positions are those of its own two-row row.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from common.io import InputError
from data.datasets import CollateSkip, PreferenceDataset, StringColumn
from data.images import BadImagePolicy, Roots
from data.noise import pure_noise, stable_seed
from data.readers import BadRecordPolicy, read_records
from data.records import PreferenceRecord
from policy.budget import BUDGET_KEY, PromptParts, answer_tokens, fit_prompt
from policy.policy import Policy, answer_token_counts
from policy.prompts import PromptTemplates

PAIR_TYPES = ("cm", "oa1", "oa2")


def pair_type_of(record: PreferenceRecord) -> str:
    """The record's ``pair_type``; for released files (which have none) ``cm`` when the rejected
    side sees a noised image, else ``oa`` (those files do not tell D_oa1 from D_oa2)."""
    if record.pair_type:
        return record.pair_type
    return "cm" if record.rejected_noised or record.rejected_image else "oa"


def load_pairs(
    paths: Sequence[str | Path],
    image_root: Roots = None,
    bad_record: BadRecordPolicy = "skip",
    skipped: list[str] | None = None,
) -> list[PreferenceRecord]:
    """All usable pairs of the given preference files, in file order (bad records: data.readers)."""
    if not paths:
        raise InputError("no preference file given (pairs: [FILE.json, ...])")
    records: list[PreferenceRecord] = []
    for path in paths:
        got = read_records(path, "preference", image_root, bad_record, skipped)
        if not got:
            raise InputError(f"{path}: no preference pairs in the file")
        records += got  # type: ignore[arg-type]
    return records


def is_heldout(record_id: str, fraction: float, seed: int) -> bool:
    """Whether a pair is held out: decided by its id alone, so the split never depends on file
    order or path, and the pairs of one question (a released file's pairs without an id share
    one derived from the question: data.readers.content_id) fall on the same side."""
    return stable_seed("heldout", record_id, seed) % 1_000_000 < round(fraction * 1_000_000)


def split_heldout(
    records: Sequence[PreferenceRecord], fraction: float, seed: int
) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """(train, held-out) pairs; ``fraction`` of the ids (deterministically) are held out."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {fraction}")
    train, heldout = [], []
    for r in records:
        (heldout if is_heldout(r.id, fraction, seed) else train).append(r)
    if not train:
        raise InputError(f"{records[0].source}: every pair was held out; lower heldout_fraction")
    return train, heldout


def select_types(records: Sequence[PreferenceRecord], types: Sequence[str]) -> list[PreferenceRecord]:
    """The pairs of the given types (``[]`` = all): training on D_cm or D_oa alone. A listed type
    with no pair is refused, so a misspelt type cannot silently train on nothing."""
    if not types:
        return list(records)
    present = sorted({pair_type_of(r) for r in records})
    absent = [t for t in types if t not in present]
    if absent:
        raise InputError(f"pair_types: no pair of type(s) {absent}; the pairs have {present}")
    return [r for r in records if pair_type_of(r) in types]


def stage_indices(records: Sequence[PreferenceRecord], stages: Sequence[Sequence[str]]) -> list[list[int]]:
    """Record positions per training stage (data.loader.StagedSampler): ``[]`` = one mixed stage of
    all pairs; else one list per stage of the pair types it takes, e.g. ``[[cm], [oa1, oa2]]``.
    Every pair must fall in exactly one stage (released files have types ``cm`` and ``oa``)."""
    if not stages:
        return [list(range(len(records)))]
    stage_of: dict[str, int] = {}
    for s, types in enumerate(stages):
        for t in types:
            if t in stage_of:
                raise ValueError(f"stages: pair type {t!r} is in two stages")
            stage_of[t] = s
    out: list[list[int]] = [[] for _ in stages]
    unplaced: set[str] = set()
    for i, r in enumerate(records):
        t = pair_type_of(r)
        if t in stage_of:
            out[stage_of[t]].append(i)
        else:
            unplaced.add(t)
    if unplaced:
        raise ValueError(f"stages {list(map(list, stages))}: no stage takes pair type(s) {sorted(unplaced)}")
    return out


def _keep(img: Image.Image) -> Image.Image:
    return img  # the processor resizes and normalises; module level so it pickles into workers


class PairDataset(PreferenceDataset):
    """PreferenceDataset (decoding, bad-image policy) with the noise images filled in; with
    ``corrupted`` (mDPO only: it costs a noise image per pair) also ``corrupted_image``."""

    def __init__(
        self,
        records: Sequence[PreferenceRecord],
        image_root: Roots,
        noise_seed: int = 0,
        bad_image: BadImagePolicy = "skip",
        corrupted: bool = False,
    ):
        super().__init__(records, image_root, _keep, bad_image)
        self.noise_seed = noise_seed
        self.corrupted = corrupted

    def _item(self, i: int) -> dict[str, Any]:
        item = super()._item(i)
        size = item["image"].size
        if item["rejected_noised"] and not self._rejected[i]:  # a stored rejected_image wins
            item["rejected_image"] = pure_noise(size, stable_seed(item["id"], self.noise_seed))
        if item["chosen_noised"]:
            item["image"] = pure_noise(size, stable_seed(item["id"], self.noise_seed, "chosen"))
        if self.corrupted:  # x_v's size, so the prompt takes the tokens its budget counted
            item["corrupted_image"] = pure_noise(size, stable_seed(item["id"], self.noise_seed, "corrupted"))
        return item


def prompt_parts(record: PreferenceRecord, templates: PromptTemplates) -> PromptParts:
    """The parts of a pair's prompt: structured when the record names its ``question``,
    ``references`` and ``options`` (pairs.build_pairs writes them) and ``templates`` write exactly its prompt from them;
    else its prompt as plain text (released pairs, pairs written with other templates)."""
    refs, question, options = (record.meta.get(k) for k in ("references", "question", "options"))
    plain = PromptParts(text=record.prompt)
    if not (record.domain and record.task in templates.tasks and isinstance(refs, list)
            and all(isinstance(r, str) for r in refs) and isinstance(question, (str, type(None)))
            and isinstance(options, (str, type(None)))):
        return plain
    if templates.text(record.domain, record.task, question, refs, options) != record.prompt:
        return plain
    return PromptParts(record.domain, record.task, question, tuple(refs), options=options)


class CpuEncoder(Policy):
    """Policy's batch encoding without the model, for DataLoader workers: CPU float32 tensors
    (accelerate moves them to the device; the vision tower casts pixels to its own dtype)."""

    device = torch.device("cpu")
    dtype = torch.float32

    def __init__(self, processor: Any):
        super().__init__(model=None, processor=processor)


class PairCollator(CollateSkip):
    """Items of a PairDataset -> ``{"inputs": model batch of 2B answers, "index", "pair_type", "skipped", "budget"}``.

    Items with a ``corrupted_image`` (mDPO) make 3B answers, the last B the chosen ones under it.

    ``index`` is the pair's position in the dataset (the key of cached reference log-probs),
    ``pair_type`` a code into ``types``, ``budget`` the notes of fitting each pair to
    ``max_length`` (named by the record's source; a refused pair is left out of ``inputs``).
    Texts are kept in packed columns (data.datasets) so workers do not copy the records. When no
    sample could be read or fitted the batch holds only ``skipped`` and ``budget``:
    ``BadImageLog.take`` and ``BudgetLog.take`` count them and turn it into None.
    """

    def __init__(
        self, records: Sequence[PreferenceRecord], processor: Any, types: Sequence[str], templates: PromptTemplates,
        max_length: int | None, share_prompt: bool = False,
    ):
        super().__init__(self.encode)
        self.encoder = CpuEncoder(processor)
        self.templates = templates
        self.max_length = max_length
        self.share_prompt = share_prompt
        self.types = list(types)
        self.names = StringColumn((r.source for r in records), dedupe=False)
        self.prompts = StringColumn(r.prompt for r in records)
        self.parts = StringColumn(_parts_json(prompt_parts(r, templates)) for r in records)
        self.chosen = StringColumn(r.chosen for r in records)
        self.rejected = StringColumn(r.rejected for r in records)
        code = {t: k for k, t in enumerate(self.types)}
        self.type_codes = np.fromiter((code[pair_type_of(r)] for r in records), np.int64, len(records))

    def encode(self, good: list[dict[str, Any]]) -> dict[str, Any]:
        """The batch of the readable samples that fit (CollateSkip sets the unreadable ones aside)."""
        notes, fitted, prompts = [], [], []
        for s in good:
            i = s["index"]
            parts = self._parts(i)
            images = [s["image"]] if s["rejected_image"] is s["image"] else [s["image"], s["rejected_image"]]
            reserve = answer_tokens(self.encoder, [self.chosen[i], self.rejected[i]])
            fit = fit_prompt(self.encoder, parts, self.templates, images, self.max_length, reserve)
            notes.append((self.names[i], fit.note))
            if not fit.refused:
                fitted.append(s)
                prompts.append(fit.prompt)
        if not fitted:
            return {BUDGET_KEY: notes}
        idx = [s["index"] for s in fitted]
        inputs = self.encoder.encode_preference(
            prompts,
            [self.chosen[i] for i in idx],
            [self.rejected[i] for i in idx],
            [s["image"] for s in fitted],
            [s["rejected_image"] for s in fitted],
            share_prompt=self.share_prompt,
            corrupted_images=[s["corrupted_image"] for s in fitted] if "corrupted_image" in fitted[0] else None,
        )
        return {
            "inputs": inputs,
            "index": torch.tensor(idx, dtype=torch.long),
            "pair_type": torch.from_numpy(self.type_codes[idx]),
            BUDGET_KEY: notes,
        }

    def _parts(self, i: int) -> PromptParts:
        packed = self.parts[i]
        if not packed:
            return PromptParts(text=self.prompts[i])
        domain, task, question, refs = json.loads(packed)
        return PromptParts(domain, task, question, tuple(refs))


def _parts_json(parts: PromptParts) -> str:
    """Structured parts packed for a StringColumn; "" for a plain-text prompt (kept in ``prompts``)."""
    if parts.text is not None:
        return ""
    return json.dumps([parts.domain, parts.task, parts.question, list(parts.references)], ensure_ascii=False)


def pair_lengths(records: Sequence[PreferenceRecord]) -> list[int]:
    """Characters of each pair's prompt and longer answer: the sort key of length-grouped batches
    (data.loader.StagedSampler), standing in for tokens, which would need every pair tokenized
    up front; the image's tokens are the same for every pair."""
    return [len(r.prompt) + max(len(r.chosen), len(r.rejected)) for r in records]


def answer_lengths(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Tokens per answer (chosen ones, then rejected ones): what IPO averages over."""
    return answer_token_counts(inputs).float()
