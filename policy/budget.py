"""One token budget for every prompt the policy reads: pairs, SFT, DPO, evaluation, inference.

A sequence is the prompt (template, question, retrieved references, and the tokens the processor
expands the image into) followed by the answer in training, or by ``max_new_tokens`` in
generation. ``fit_prompt`` returns the prompt that keeps that sequence within ``max_length``:
references are dropped from the last one, and the first one dropped comes back shortened to as
many words as still fit. The image tokens, the question and the answer are never cut. A sequence
that cannot fit even without references is refused (``Fit.refused`` says why): the run skips
and counts it instead of training or generating on a truncated sequence. ``BudgetLog`` counts
what was cut, once per prompt however often it is encoded, for the run's summary.

The budget defaults to the model's own position limit and never exceeds it (``budget_for``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from PIL import Image
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from common.config import ConfigError
from common.io import InputError
from policy.policy import Policy, Prompt
from policy.prompts import PromptTemplates, build_prompt

log = logging.getLogger(__name__)

BUDGET_KEY = "budget"  # batch key: [(name, Note)] of the samples a collate function fitted
MIN_WORDS = 5  # a shortened reference keeps at least this many words: a shorter stub only costs tokens


@dataclass(frozen=True)
class PromptParts:
    """A prompt as its parts, so that the budget can cut the references and nothing else.

    ``text`` set: a finished user text (released pairs, conversation files) in which references
    cannot be told apart from the question: it is kept whole or refused.
    """

    domain: str = "default"
    task: str = "vqa"
    question: str | None = None
    references: tuple[str, ...] = ()
    text: str | None = None
    options: str | None = None  # the record's own option text (policy.prompts.own_options)

    def prompt(self, templates: PromptTemplates, references: Sequence[str] | None = None) -> Prompt:
        """The user turn holding ``references`` (default: all of this prompt's)."""
        if self.text is not None:
            return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.text}]}]
        refs = self.references if references is None else references
        return build_prompt(self.domain, self.task, self.question, list(refs) or None, templates, self.options)


class Note(NamedTuple):
    """What the budget did to one prompt; JSON-able as a dict (``_asdict``) for resumable rows."""

    prompt_tokens: int  # the prompt as run, image tokens included (refused: the shortest one tried)
    references: int  # references asked for
    dropped: int  # references left out whole
    shortened: int  # 1 when the last reference in the prompt was cut to fewer words
    refused: str = ""  # why the sequence cannot fit; empty when it fits


@dataclass(frozen=True)
class Fit:
    """A fitted prompt (None when refused) and the references it holds, the last maybe shortened."""

    prompt: Prompt | None
    references: tuple[str, ...]
    note: Note

    @property
    def refused(self) -> str:
        return self.note.refused


def model_limit(config: Any, tokenizer: Any) -> int | None:
    """The longest sequence a model takes: its text config's ``max_position_embeddings``, else the
    tokenizer's ``model_max_length`` when that is a real number (not transformers' "no limit")."""
    positions = getattr(config.get_text_config(), "max_position_embeddings", None) if config is not None else None
    if positions:
        return int(positions)
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if isinstance(n, int) and 0 < n < VERY_LARGE_INTEGER else None


def policy_limit(policy: Policy) -> int | None:
    """``model_limit`` of a loaded policy (a model-free one: its tokenizer's)."""
    return model_limit(getattr(policy.model, "config", None), policy.tokenizer)


def checkpoint_limit(path: str | Path, trust_remote_code: bool = False) -> int | None:
    """``model_limit`` of a checkpoint folder, read from its config and processor (no weights)."""
    from transformers import AutoConfig, AutoProcessor

    if not Path(path).is_dir():
        raise InputError(f"{path}: policy checkpoint folder does not exist")
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model_limit(config, getattr(processor, "tokenizer", processor))


def budget_for(requested: int, limit: int | None) -> int | None:
    """The max_length a run uses: ``requested`` (0: the model's ``limit``), never above ``limit``."""
    if requested < 0:
        raise ConfigError(f"max_length: must be >= 0 (0 = the model's own limit), got {requested}")
    if not requested:
        return limit
    return min(requested, limit) if limit else requested


def fit_prompt(
    policy: Policy,
    parts: PromptParts,
    templates: PromptTemplates,
    images: Sequence[Image.Image],
    max_length: int | None,
    reserve: int,
) -> Fit:
    """The prompt of ``parts`` whose sequence -- the prompt with each of ``images``, then ``reserve``
    answer or new tokens -- fits ``max_length`` (None: no budget, the whole prompt is counted).

    Lengths are counted with the policy's processor (``Policy.prompt_length``), on the text the
    chat template renders, so what is counted is what runs.
    """
    refs = list(parts.references) if parts.text is None else []

    def length(kept: list[str]) -> tuple[Prompt, int]:
        prompt = parts.prompt(templates, kept)
        return prompt, max(policy.prompt_length(prompt, im) for im in images)

    kept = refs
    prompt, n = length(kept)
    room = None if max_length is None else max_length - reserve
    while room is not None and n > room and kept:
        kept = kept[:-1]
        prompt, n = length(kept)
    if room is not None and n > room:
        why = f"prompt {n} tokens{' without references' if refs else ''} + {reserve} answer tokens > max_length {max_length}"
        if parts.text is not None:
            why += " (a plain-text prompt: references in it cannot be cut)"
        return Fit(None, (), Note(n, len(refs), len(refs), 0, why))
    shortened = 0
    if len(kept) < len(refs):  # the first reference dropped comes back with as many words as fit
        words = refs[len(kept)].split()
        lo, hi = MIN_WORDS, len(words) - 1
        best = kept
        while lo <= hi:
            mid = (lo + hi) // 2
            cut = kept + [" ".join(words[:mid])]
            p, m = length(cut)
            if m <= room:
                best, prompt, n, lo = cut, p, m, mid + 1
            else:
                hi = mid - 1
        shortened = int(len(best) > len(kept))
        kept = best
    return Fit(prompt, tuple(kept), Note(n, len(refs), len(refs) - len(kept), shortened))


def answer_tokens(policy: Policy, answers: Sequence[str]) -> int:
    """Tokens the longest answer takes in a training row (EOS included)."""
    return max(len(ids) for ids in policy.answer_ids(answers))


def percentiles(values: Sequence[int]) -> dict[str, int | None]:
    """p50, p90 and max by nearest rank: each is a value that occurred."""
    ordered = sorted(values)
    if not ordered:
        return {"p50": None, "p90": None, "max": None}
    rank = {q: ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] for q in (50, 90)}
    return {"p50": rank[50], "p90": rank[90], "max": ordered[-1]}


class BudgetLog:
    """What the budget did, per prompt name (a record, a record x condition), for the run's summary.

    A prompt is counted once however often it is encoded (epochs, evaluations); notes made in
    DataLoader workers ride in batches under ``BUDGET_KEY`` and are recorded by ``take`` in the
    main process. A refused prompt is logged by name (the first ``max_logged``) and listed in the
    summary (the first ``max_listed``).
    """

    def __init__(self, max_length: int | None, model_limit: int | None, max_logged: int = 50, max_listed: int = 1000):
        self.max_length = max_length
        self.model_limit = model_limit
        self.notes: dict[str, Note] = {}
        self.max_logged = max_logged
        self.max_listed = max_listed
        self._refused = 0

    @classmethod
    def of(cls, policy: Policy, requested: int) -> BudgetLog:
        """An empty log with the budget ``requested`` resolves to for ``policy`` (``budget_for``)."""
        limit = policy_limit(policy)
        return cls(budget_for(requested, limit), limit)

    def record(self, name: str, note: Note) -> None:
        if name in self.notes:
            return
        self.notes[name] = note
        if note.refused:
            self._refused += 1
            if self._refused <= self.max_logged:
                log.warning("refused %s: %s", name, note.refused)
            elif self._refused == self.max_logged + 1:
                log.warning("more prompts refused for length: counted in the summary, not logged")

    def take(self, batch: Any) -> Any:
        """Record a collated batch's notes; the batch without them, None if nothing is left."""
        if batch is None:
            return None
        for name, note in batch.pop(BUDGET_KEY, ()):
            self.record(name, note)
        return batch if len(batch) else None

    def merged(self, accelerator: Any) -> BudgetLog:
        """Every process's notes in one log. Collective: all processes call it."""
        logs = [self]
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            logs = gather_object([self])
        total = BudgetLog(self.max_length, self.model_limit, self.max_logged, self.max_listed)
        for other in logs:
            for name, note in other.notes.items():
                total.notes.setdefault(name, note)
        return total

    def summary(self) -> dict[str, Any]:
        """``prompts``: every prompt fitted; ``refused``: those that could not fit (named); the
        cuts and ``prompt_tokens`` (nearest-rank p50/p90/max) are over the prompts that ran."""
        ran = [n for n in self.notes.values() if not n.refused]
        refused = [{"record": name, "reason": n.refused} for name, n in self.notes.items() if n.refused]
        return {
            "max_length": self.max_length,
            "model_limit": self.model_limit,
            "prompts": len(self.notes),
            "prompts_trimmed": sum(1 for n in ran if n.dropped or n.shortened),
            "references_dropped": sum(n.dropped for n in ran),
            "references_shortened": sum(n.shortened for n in ran),
            "refused": len(refused),
            "refused_records": refused[: self.max_listed],
            "prompt_tokens": percentiles([n.prompt_tokens for n in ran]),
            "prompt_tokens_with_references": percentiles([n.prompt_tokens for n in ran if n.references]),
        }


def describe(summary: dict[str, Any]) -> str:
    """One line for the console: what the budget cut and refused."""
    tokens = summary["prompt_tokens"]
    return (f"budget max_length {summary['max_length']}: {summary['prompts']} prompts, "
            f"{summary['references_dropped']} references dropped, {summary['references_shortened']} shortened, "
            f"{summary['refused']} refused; prompt tokens p50 {tokens['p50']} p90 {tokens['p90']} max {tokens['max']}")
