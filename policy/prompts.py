"""Prompt templates per domain x task, with and without retrieved reports.

The wording lives in a YAML file the user can replace (``configs/prompts/default.yaml``); a
policy folder may carry its own as ``prompts.yaml`` (the toy policy carries
``configs/prompts/toy.yaml``), which every stage then uses unless told otherwise
(``prompts_for``). This module only fills it in and returns chat messages in the role/content
form that Hugging Face processors' chat templates take. The image is a content item ``{"type": "image"}``, so the
processor places its own image token; ``plain_text`` is the fallback for processors that have
no chat template.

A question may carry its record's own option text (IU-Xray's ``text``: "Please choose from the
following two options: [yes, no]"): ``own_options`` takes it from the record and ``options``
puts it right after the question, in every template (callers enable it with ``option_text``).
"""

from __future__ import annotations

import shutil
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from common.io import InputError
from data.readers import strip_image_mark

DEFAULT_PROMPTS = Path(__file__).resolve().parent.parent / "configs" / "prompts" / "default.yaml"
POLICY_PROMPTS = "prompts.yaml"  # a policy folder's own templates: the wording it was tuned with
TASKS = ("vqa", "report")
FIELDS = {"expert", "image", "question", "references"}
OPTION_TEXT_HELP = ("put the record's own option text (its `text` field, e.g. IU-Xray's \"Please choose from the "
                    "following two options: [yes, no]\") after the question")
Message = dict[str, Any]


@dataclass(frozen=True)
class TaskTemplates:
    with_references: str
    without_references: str
    default_question: str = ""


@dataclass(frozen=True)
class PromptTemplates:
    """Templates loaded from one YAML file: ``domains`` fill-ins and ``tasks`` texts."""

    domains: dict[str, dict[str, str]]
    tasks: dict[str, TaskTemplates]
    source: str = ""

    def text(
        self,
        domain: str,
        task: str,
        question: str | None,
        references: list[str] | None,
        options: str | None = None,
    ) -> str:
        """The filled-in user text (no image token); ``options`` follows the question."""
        if task not in self.tasks:
            known = sorted(self.tasks)
            raise ValueError(f"{self.source}: no templates for task {task!r}; known: {known}")
        t = self.tasks[task]
        fill = self.domains.get(domain) or self.domains["default"]
        question = (question or "").strip() or t.default_question
        if options:
            question = f"{question} {options}"
        template = t.with_references if references else t.without_references
        return template.format(
            expert=fill["expert"], image=fill["image"], question=question,
            references=enumerate_references(references or []),
        ).strip()

    def all_texts(self) -> list[str]:
        """Every template and fill-in string (the toy tokenizer learns their words)."""
        out = [v for d in self.domains.values() for v in d.values()]
        for t in self.tasks.values():
            out += [t.with_references, t.without_references, t.default_question]
        return out


def enumerate_references(references: list[str]) -> str:
    """``1. first report\\n2. second report`` (whitespace inside each report collapsed)."""
    return "\n".join(f"{i}. {' '.join(r.split())}" for i, r in enumerate(references, 1))


def own_options(text: Any, question: str | None, enabled: bool = True) -> str | None:
    """The option text a record carries for its question (its ``text`` field, without the
    question it may repeat), when ``enabled`` (a run's ``option_text``). None without a question,
    without ``text``, or when ``text`` is only the question (as in the toy world)."""
    asked = " ".join((question or "").split())
    if not (enabled and asked and isinstance(text, str)):
        return None
    return " ".join(strip_image_mark(text).split()).replace(asked, "").strip() or None


def _check_template(text: Any, where: str) -> str:
    if not isinstance(text, str):
        raise InputError(f"{where}: expected a string, got {text!r}")
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(text) if f is not None}
    except ValueError as e:
        raise InputError(f"{where}: bad template ({e}); write a literal brace twice") from None
    unknown = names - FIELDS
    if unknown:
        raise InputError(
            f"{where}: unknown placeholder(s) {sorted(unknown)}; known: {sorted(FIELDS)}"
        )
    return text


def prompts_for(policy_path: str | Path, prompts: str | Path = "") -> Path:
    """The templates a policy is prompted with: ``prompts`` when given, else the policy folder's
    own ``prompts.yaml`` (as a model folder carries its chat template), else default.yaml."""
    if str(prompts):
        return Path(prompts)
    own = Path(policy_path) / POLICY_PROMPTS
    return own if own.is_file() else DEFAULT_PROMPTS


def keep_prompts(prompts: str | Path, out_dir: str | Path) -> None:
    """Write ``prompts`` into a policy folder being saved, so the policy is later prompted as it
    was tuned (``prompts_for``)."""
    target = Path(out_dir) / POLICY_PROMPTS
    if Path(prompts).resolve() != target.resolve():
        shutil.copyfile(prompts, target)


@lru_cache(maxsize=8)
def load_prompt_templates(path: str | Path = DEFAULT_PROMPTS) -> PromptTemplates:
    """Read and check a templates YAML; problems raise InputError naming the file and key."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: prompt templates file does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise InputError(f"{path}:{mark.line + 1 if mark else 1}: not valid YAML") from None
    domains = data.get("domains") or {}
    tasks = data.get("tasks") or {}
    if "default" not in domains:
        raise InputError(f"{path}: domains: needs a 'default' entry (used for unlisted domains)")
    for name, d in domains.items():
        if not isinstance(d, dict) or not {"expert", "image"} <= set(d):
            raise InputError(f"{path}: domains.{name}: needs 'expert' and 'image'")
    parsed = {}
    for name, t in tasks.items():
        if not isinstance(t, dict):
            raise InputError(f"{path}: tasks.{name}: expected a mapping")
        with_refs, without = (
            _check_template(t.get(key), f"{path}: tasks.{name}.{key}")
            for key in ("with_references", "without_references")
        )
        parsed[name] = TaskTemplates(with_refs, without, str(t.get("default_question") or ""))
    missing = [t for t in TASKS if t not in parsed]
    if missing:
        raise InputError(f"{path}: tasks: missing {missing}")
    return PromptTemplates(
        domains={k: {kk: str(vv) for kk, vv in v.items()} for k, v in domains.items()},
        tasks=parsed,
        source=str(path),
    )


def build_prompt(
    domain: str,
    task: str,
    question: str | None,
    references: list[str] | None,
    templates: PromptTemplates | str | Path | None = None,
    options: str | None = None,
) -> list[Message]:
    """One user turn holding the image and the filled-in template.

    ``references`` None or empty gives the no-retrieval prompt (condition c of the pair builder);
    ``options`` is the record's own option text (``own_options``).
    """
    if not isinstance(templates, PromptTemplates):
        templates = load_prompt_templates(templates or DEFAULT_PROMPTS)
    text = templates.text(domain, task, question, references, options)
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def plain_text(messages: list[Message], image_token: str = "<image>") -> str:
    """LLaVA-1.5 style rendering for processors without a chat template.

    ``USER: <image>\\n{text}\\nASSISTANT:`` -- the layout LLaVA and LLaVA-Med v1.5 were tuned on.
    """
    lines = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            body = content
        else:
            images = "".join(f"{image_token}\n" for c in content if c.get("type") == "image")
            body = images + "".join(c.get("text", "") for c in content if c.get("type") == "text")
        lines.append(body if m["role"] == "system" else f"{m['role'].upper()}: {body}")
    return "\n".join(lines) + "\nASSISTANT:"
