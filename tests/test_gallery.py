"""The case gallery (evaluation.gallery): flags by hand, the page's content and escaping, and (slow)
the page in headless Chromium: one card per case, filters change what is shown."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.evaluate import judge_vqa
from evaluation.gallery import CaseMedia, counts, gallery_html, group_cases

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "outputs" / "screenshots"


def _row(case: int, policy: str, condition: str, prediction: str, gold: str = "No", task: str = "vqa") -> dict:
    row = {"policy": policy, "condition": condition, "file": "f", "index": case, "id": f"q{case}", "task": task,
           "domain": "radiology", "question": "Is there <b>effusion</b>?" if task == "vqa" else None, "answer": gold,
           "prediction": prediction, "k": 0 if condition == "no_rag" else 5}
    return {**row, **judge_vqa(prediction, gold)} if task == "vqa" else row


def predictions() -> list[dict]:
    """Case 0: base wrong and unchanged under noise (copied), DPO right and reading the image: DPO fixed a
    copied answer. Case 1: DPO broke it. Case 2: a report both get right. Case 3: answers with no yes/no."""
    answers = {
        0: {("base", "rag_fixed"): "Yes", ("base", "noised_rag"): "Yes", ("dpo", "rag_fixed"): "No",
            ("dpo", "noised_rag"): "Yes"},
        1: {("base", "rag_fixed"): "No", ("base", "noised_rag"): "Yes", ("dpo", "rag_fixed"): "Yes",
            ("dpo", "noised_rag"): "Yes"},
        3: {("base", "rag_fixed"): "maybe", ("base", "noised_rag"): "maybe", ("dpo", "rag_fixed"): "maybe",
            ("dpo", "noised_rag"): "maybe"},
    }
    rows = []
    for case, by in answers.items():
        for policy in ("base", "dpo"):
            rows.append(_row(case, policy, "no_rag", "No"))
            rows += [_row(case, policy, c, by[(policy, c)]) for c in ("rag_fixed", "noised_rag")]
    report = "the heart is normal . no effusion ."
    rows += [_row(2, p, c, report, gold=report, task="report") for p in ("base", "dpo")
             for c in ("no_rag", "rag_fixed", "noised_rag")]
    return rows


def media(file: str, index: int) -> CaseMedia:
    image = Image.fromarray(np.full((64, 64, 3), 40 * index, np.uint8))
    return CaseMedia(image, image.rotate(90), ["a report <script>alert(1)</script>", "another"], [0.91, 0.87])


def test_flags_by_hand():
    cases = {c.index: c for c in group_cases(predictions())}
    assert cases[0].flags() == {"fixed": True, "broke": False, "copied-base": True, "copied-dpo": False}
    assert cases[1].flags() == {"fixed": False, "broke": True, "copied-base": False, "copied-dpo": True}
    assert cases[2].right("base", "rag_fixed") is True and cases[2].flags()["copied-base"] is True
    assert cases[3].right("base", "rag_fixed") is False and cases[3].copied("base") is None  # no yes/no: not a copy
    assert counts(list(cases.values())) == {"fixed": 1, "broke": 1, "copied-base": 2, "copied-dpo": 2,
                                            "fixed+copied-base": 1}


def test_page_is_self_contained_escaped_and_has_one_card_per_case():
    page = gallery_html(predictions(), media, title="T <x>")
    assert page.count("<article class='card'") == 4
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "Is there &lt;b&gt;effusion&lt;/b&gt;?" in page and "<title>T &lt;x&gt;</title>" in page
    assert not re.search(r"""(src|href)=['"]?(https?:)?//""", page)  # nothing fetched from a network
    assert page.count("src='data:image/jpeg;base64,") == 8  # x_v and x_v* per case
    assert "data-fixed='1' data-broke='0' data-copied-base='1' data-copied-dpo='0'" in page
    assert "DPO fixed it (1)" in page and "0.910" in page
    cut = gallery_html(predictions(), lambda f, i: None, max_cases=2)
    assert cut.count("<article class='card'") == 2 and "the first 2 of 4" in cut and "<img" not in cut


@pytest.mark.slow
def test_gallery_in_a_browser(tmp_path, chromium):
    """The page opens from disk, shows one card per case, and its filters change (and combine on) what is shown."""
    from selenium.webdriver.common.by import By

    path = tmp_path / "gallery.html"
    path.write_text(gallery_html(predictions(), media), encoding="utf-8")
    chromium.get(path.as_uri())

    def visible() -> int:
        return sum(card.is_displayed() for card in chromium.find_elements(By.CSS_SELECTOR, "article.card"))

    def press(label: str) -> None:
        chromium.find_element(By.XPATH, f"//div[@class='filters']/button[starts-with(., '{label}')]").click()

    assert len(chromium.find_elements(By.CSS_SELECTOR, "article.card")) == 4 and visible() == 4
    press("copied (base)")
    assert visible() == 2 and chromium.find_element(By.ID, "shown").text == "2"
    press("DPO fixed it")  # combined with copied (base): the DPO fix of a copied answer
    assert visible() == 1 and "f #0" in next(c for c in chromium.find_elements(By.CSS_SELECTOR, "article.card")
                                              if c.is_displayed()).text
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    chromium.save_screenshot(str(SCREENSHOTS / "gallery.png"))
    press("DPO fixed it")
    press("copied (base)")
    assert visible() == 4
