import re
from pathlib import Path

import pytest

from common.io import InputError
from policy.prompts import (
    DEFAULT_PROMPTS,
    build_prompt,
    enumerate_references,
    keep_prompts,
    load_prompt_templates,
    own_options,
    plain_text,
    prompts_for,
)

Q = "Is there pleural effusion in this image?"
REFS = ["The heart size is normal.\nNo   effusion.", "Small left pleural effusion."]
MMED_RAG = Path(__file__).resolve().parent.parent / "configs" / "prompts" / "mmed_rag.yaml"
TOY = MMED_RAG.with_name("toy.yaml")
OPTIONS = "Please choose from the following two options: [yes, no]"


def _text(messages):
    (msg,) = messages
    assert msg["role"] == "user"
    assert msg["content"][0] == {"type": "image"}
    return msg["content"][1]["text"]


def test_with_references_enumerates_them_in_order():
    text = _text(build_prompt("radiology", "vqa", Q, REFS))
    first = text.index("1. The heart size is normal. No effusion.")
    second = text.index("2. Small left pleural effusion.")
    assert first < second < text.index(Q)
    assert "reference only" in text


def test_without_references_has_no_reference_block():
    for refs in (None, []):
        text = _text(build_prompt("radiology", "vqa", Q, refs))
        assert Q in text
        assert "1. " not in text and "reference" not in text


def test_domains_and_tasks_fill_in():
    rad = _text(build_prompt("radiology", "report", None, None))
    eye = _text(build_prompt("ophthalmology", "report", None, None))
    unknown = _text(build_prompt("dermatology", "report", None, None))
    templates = load_prompt_templates()
    assert templates.tasks["report"].default_question in rad
    assert rad != eye and templates.domains["ophthalmology"]["expert"] in eye
    assert templates.domains["default"]["expert"] in unknown
    with pytest.raises(ValueError):
        build_prompt("radiology", "caption", Q, None)


def test_enumerate_references():
    assert enumerate_references(["a  b", "c"]) == "1. a b\n2. c"
    assert enumerate_references([]) == ""


def test_user_templates_replace_the_wording(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "domains:\n  default: {expert: doctor, image: picture}\n"
        "tasks:\n"
        "  vqa: {with_references: 'R {references} Q {question}', without_references: 'Q {question} ({expert})'}\n"
        "  report: {with_references: '{references}', without_references: 'describe the {image}'}\n"
    )
    assert _text(build_prompt("radiology", "vqa", "q?", ["x"], templates=path)) == "R 1. x Q q?"
    assert _text(build_prompt("radiology", "vqa", "q?", None, templates=path)) == "Q q? (doctor)"
    assert _text(build_prompt("pathology", "report", "", None, templates=path)) == "describe the picture"


def test_a_policy_is_prompted_with_its_own_templates_unless_told(tmp_path):
    policy, mine = tmp_path / "policy", tmp_path / "mine.yaml"
    policy.mkdir()
    mine.write_text(DEFAULT_PROMPTS.read_text())
    assert prompts_for(policy) == DEFAULT_PROMPTS  # a folder without its own (a downloaded checkpoint)
    keep_prompts(TOY, policy)
    assert prompts_for(policy) == policy / "prompts.yaml" and load_prompt_templates(prompts_for(policy)).tasks == \
        load_prompt_templates(TOY).tasks
    assert prompts_for(policy, mine) == mine  # an explicit file wins
    keep_prompts(policy / "prompts.yaml", policy)  # a policy saved over itself keeps its file
    assert (policy / "prompts.yaml").read_text() == TOY.read_text()


def test_the_toy_wording_is_short_and_names_the_image():
    full = _text(build_prompt("pathology", "vqa", Q, REFS))
    short = _text(build_prompt("pathology", "vqa", Q, REFS, templates=TOY))
    assert len(short) < 0.6 * len(full)
    assert short.startswith("A pathology slide image.") and short.endswith(f"Question: {Q}")
    assert "2. Small left pleural effusion." in short


@pytest.mark.parametrize(
    "body, needle",
    [
        ("domains: {default: {expert: a, image: b}}\ntasks: {vqa: {with_references: '{nope}', "
         "without_references: x}, report: {with_references: x, without_references: x}}\n", "nope"),
        ("domains: {default: {expert: a, image: b}}\ntasks: {vqa: {with_references: x, "
         "without_references: x}}\n", "report"),
        ("domains: {radiology: {expert: a, image: b}}\ntasks: {}\n", "default"),
        ("domains: [\n", "YAML"),
    ],
)
def test_bad_template_files_name_the_file(tmp_path, body, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(InputError) as e:
        load_prompt_templates(path)
    assert str(path) in str(e.value) and needle in str(e.value)


def test_plain_text_fallback():
    messages = build_prompt("radiology", "vqa", Q, None)
    text = plain_text(messages, "<img>")
    assert text.startswith("USER: <img>\n") and text.endswith("\nASSISTANT:")
    assert Q in text


def _released_pattern(template: str) -> str:
    """A regex as a converter of released prompts builds it from a with_references template:
    the literal text escaped, {references} and {question} as groups."""
    parts = re.split(r"\{(references|question)\}", template)
    assert parts[1::2] == ["references", "question"]  # each once, the question after the references
    return "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>.+?)" for i, p in enumerate(parts))


@pytest.mark.parametrize("task", ["vqa", "report"])
def test_mmed_rag_wording_matches_back_and_drops_only_the_references(task):
    templates = load_prompt_templates(MMED_RAG)
    fill = templates.domains["radiology"]
    t = templates.tasks[task]
    question = Q if task == "vqa" else None
    text = _text(build_prompt("radiology", task, question, REFS, MMED_RAG))
    assert fill["expert"] in text and fill["image"] in text
    template = t.with_references.replace("{expert}", fill["expert"]).replace("{image}", fill["image"])
    match = re.fullmatch(_released_pattern(template), text, re.S)
    assert match and match["references"] == enumerate_references(REFS)
    assert match["question"] == (question or t.default_question)
    with_lines, without_lines = t.with_references.splitlines(), t.without_references.splitlines()
    dropped = [line for line in with_lines if line not in without_lines]
    assert [line for line in with_lines if line not in dropped] == without_lines
    assert dropped and all("reference" in line.lower() for line in dropped)
    assert "reference" not in _text(build_prompt("radiology", task, question, None, MMED_RAG)).lower()


def test_option_text_follows_the_question_once():
    with_options = _text(build_prompt("radiology", "vqa", Q, REFS, options=own_options(OPTIONS, Q)))
    assert f"{Q} {OPTIONS}" in with_options and with_options.count("[yes, no]") == 1
    plain = _text(build_prompt("radiology", "vqa", Q, REFS))
    assert _text(build_prompt("radiology", "vqa", Q, REFS, options=own_options(OPTIONS, Q, False))) == plain
    assert OPTIONS not in plain
    assert own_options(None, Q) is None  # a record without `text`: its prompt is unchanged
    assert own_options(f"{Q}\n<image>", Q) is None  # `text` that only repeats the question
    assert own_options(f"<image>\n{Q}  {OPTIONS}", Q) == OPTIONS  # the question is not doubled
    assert own_options(OPTIONS, None) is None  # a report has no question to follow
