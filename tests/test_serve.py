"""The web demo (evaluation.serve): the answering path and page with stand-in models, its bad inputs,
and (slow) the app in headless Chromium on tiny trained stand-ins: an example runs end to end."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

from common.config import cli_main
from evaluation.evaluate import EvalFile
from evaluation.gallery import group_cases
from evaluation.serve import Models, ServeConfig, k_rule, main, pick_examples, preview, respond, upload_name
from policy.budget import BudgetLog
from policy.policy import Policy
from tests.test_infer import BRIGHT, DARK, Hit, _image
from tests.test_retriever_retrieve import trained  # noqa: F401 -- the tiny world and retrievers of `tiny`

REPO = Path(__file__).resolve().parents[1]
SCREENSHOTS = REPO / "outputs" / "screenshots"


class StubRetriever:
    """Everything is radiology; three reports that all say effusion."""

    domains = ["radiology", "pathology"]

    def route_confidence(self, images):
        return [{"radiology": 0.9, "pathology": 0.1} for _ in images]

    def search(self, images, domain=None, k_rule=None):
        hits = [Hit(f"r{i}", f"Effusion <b>{i}</b>.", 0.9 - 0.1 * i) for i in range(3)]
        return [hits[: k_rule.k] for _ in images]


class Scripted(Policy):
    """``copies``: with references it says what they say (yes); otherwise it reads the image (bright = yes)."""

    def __init__(self, processor, copies: bool):
        super().__init__(model=None, processor=processor)
        self.copies = copies

    def generate(self, images, prompts, max_new_tokens=64, batch_size=8, progress=False):
        def one(image, prompt):
            if self.copies and "1. " in prompt[0]["content"][1]["text"]:
                return "Yes."
            return "Yes." if np.asarray(image).mean() > 128 else "No."

        return [one(i, p) for i, p in zip(images, prompts)]


class DarkNoise:
    """Stands in for evaluation's ImageSource: x_v* is a dark image."""

    def noised(self, name, image, domain):
        return Image.new("RGB", image.size, (DARK,) * 3)


@pytest.fixture
def models(toy_processor):
    base, dpo = Scripted(toy_processor, copies=True), Scripted(toy_processor, copies=False)
    return Models(StubRetriever(), {"base": base, "dpo": dpo}, "policy P + adapter A", DarkNoise(),
                  BudgetLog.of(base, 0), ServeConfig().policy.templates())


def test_an_answer_shows_domain_references_k_both_policies_and_the_copy_test(models, tmp_path):
    bright = str(_image(tmp_path / "b.png", BRIGHT))
    page, noised = respond(models, ServeConfig(), bright, "Is there effusion?", "Yes", "x/b.png", "fixed", 2)
    assert np.asarray(noised).mean() == DARK
    assert "<span id='domain'>radiology</span>" in page and "radiology 0.90, pathology 0.10" in page
    assert "k = <span id='k'>2</span>" in page and "fixed: the top 2" in page
    assert "0.900</span> Effusion &lt;b&gt;0&lt;/b&gt;." in page and "Effusion <b>" not in page
    assert page.count("<tr><th>base</th>") == 1 and page.count("<tr><th>DPO</th>") == 1
    assert "RAG, fixed k" in page and "noised image + same refs" in page
    # bright image, gold yes: both right on the real image; under x_v* the copier says yes, the reader no
    assert "<b>base</b> with x_v* and the same references: unchanged" in page
    assert "<b>DPO</b> with x_v* and the same references: changed" in page
    assert page.count("class='wrong'") == 1  # the reader's answer to the dark x_v*


def test_adaptive_k_a_report_and_an_upload_without_gold(models, tmp_path):
    cfg = ServeConfig()
    assert k_rule(cfg, "adaptive", 3) == type(cfg.k)(rule="gap", k=3, gamma=cfg.k.gamma)
    assert k_rule(ServeConfig(k=type(cfg.k)(rule="fixed")), "adaptive", 4).rule == "gap"
    dark = str(_image(tmp_path / "d.png", DARK))
    page, _ = respond(models, cfg, dark, "", "", "", "adaptive", 5)
    assert "RAG, adaptive k" in page and "No gold answer" in page and "class='right'" not in page
    image = Image.open(dark)
    assert upload_name(image) == upload_name(image.copy()) != upload_name(Image.new("RGB", (16, 16)))


def test_bad_inputs_give_one_line_not_a_traceback(models, tmp_path):
    page, noised = respond(models, ServeConfig(), None, "Q?", "", "", "fixed", 2)
    assert "Upload an image" in page and noised is None
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    page, _ = respond(models, ServeConfig(), str(text), "Q?", "", "", "fixed", 2)
    assert "notes.png is not an image the models can read (unreadable)" in page and "Traceback" not in page
    assert preview(str(text)) == (None, page) and preview(None)[0] is None
    assert np.asarray(preview(str(_image(tmp_path / "d.png", DARK)))[0]).mean() == DARK

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory")

    models.policies["dpo"].generate = boom
    page, _ = respond(models, ServeConfig(), str(_image(tmp_path / "b.png", BRIGHT)), "Q?", "", "", "fixed", 2)
    assert "Internal error (RuntimeError: out of memory)" in page and "Traceback" not in page


def test_examples_put_dpo_fixes_of_copied_answers_first():
    class Rec(NamedTuple):
        question: str

    files = [EvalFile(Path(f"{d}.jsonl"), d, "vqa", d, None, [Rec(f"q{i}") for i in range(3)]) for d in ("a", "b")]
    files.append(EvalFile(Path("r.jsonl"), "r", "report", "a", None, [Rec("")]))

    def rows(index: int, base: str, base_noised: str, dpo: str) -> list[dict]:
        out = []
        for policy, rag, noised in (("base", base, base_noised), ("dpo", dpo, "no")):
            for condition, answer in (("rag_fixed", rag), ("noised_rag", noised)):
                out.append({"file": "b", "index": index, "policy": policy, "condition": condition, "task": "vqa",
                            "answer": "no", "pred_label": answer, "correct": answer == "no"})
        return out

    cases = group_cases(rows(2, "yes", "yes", "no") + rows(1, "yes", "no", "no"))  # 2: fixed + copied; 1: fixed
    picked = [(f.name, i, star) for f, i, star in pick_examples(files, cases, 4)]
    assert picked == [("b", 2, True), ("b", 1, False), ("a", 0, False), ("b", 0, False)]


def test_missing_models_stop_at_start_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["serve", "--clip_dir", str(tmp_path / "none"), "--retrieval_dir", ""])
    with pytest.raises(SystemExit) as stop:
        cli_main(main)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "finetune_clip.sh" in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- the app in a browser


@pytest.fixture(scope="module")
def tiny(trained):
    """``trained`` (a tiny world, three one-epoch retrievers + domain classifier), retrieval of its test
    files, an untrained tiny policy and a random LoRA adapter as its DPO."""
    import torch
    from peft import LoraConfig, get_peft_model

    from policy.policy import load_policy
    from retriever import retrieve
    from toy.toy_policy import ToyPolicyConfig, build_toy_policy, world_texts

    root, world = trained
    retrieve.main(["--clip_dir", str(root / "clip"), "--data.world", str(world), "--output_dir",
                   str(root / "retrieval"), "--query_roles", "[test_vqa,test_report]"])
    torch.manual_seed(0)
    build_toy_policy(world_texts(world), root / "policy",
                     ToyPolicyConfig(vocab_size=400, vision_width=32, vision_layers=1, text_width=32, text_layers=1))
    lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(load_policy(root / "policy").model, lora).save_pretrained(root / "dpo" / "adapter")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def app(tiny, tmp_path):
    """`python -m evaluation.serve` on the tiny stand-ins at a free local port; its URL."""
    port = _free_port()
    cmd = [sys.executable, "-m", "evaluation.serve", "--port", str(port), "--clip_dir", str(tiny / "clip"),
           "--cache_dir", str(tmp_path / "cache"), "--policy.path", str(tiny / "policy"),
           "--adapter", str(tiny / "dpo" / "adapter"), "--retrieval_dir", str(tiny / "retrieval"),
           "--eval_dir", "", "--max_new_tokens_vqa", "4", "--max_new_tokens_report", "8"]
    log = tmp_path / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"the app stopped:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the app did not answer in 180 s:\n{log.read_text()[-3000:]}"
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                time.sleep(1)
        yield url, log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_app_in_a_browser(app, chromium, tmp_path):
    """Pick an example, ask, and the routed domain, the references and both policies' answers appear;
    a file that is not an image gets one line in the page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, log = app
    chromium.get(url)
    wait = WebDriverWait(chromium, 120)
    example = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "button.gallery-item"))[0]
    label = example.text
    example.click()
    question = chromium.find_element(By.CSS_SELECTOR, "#question textarea, #question input")
    wait.until(lambda d: question.get_attribute("value") and question.get_attribute("value") in label)
    chromium.find_element(By.ID, "ask").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#answer-panel table.answers"))
    panel = chromium.find_element(By.ID, "answer-panel").text
    assert chromium.find_element(By.ID, "domain").text in ("radiology", "pathology", "ophthalmology"), panel
    assert 1 <= int(chromium.find_element(By.ID, "k").text) <= 5
    rows = chromium.find_elements(By.CSS_SELECTOR, "#answer-panel table.answers tr")
    assert [r.find_element(By.TAG_NAME, "th").text for r in rows[1:]] == ["base", "DPO"], panel
    assert "noised image + same refs" in panel and "with x_v* and the same references" in panel
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    chromium.save_screenshot(str(SCREENSHOTS / "serve.png"))

    bad = tmp_path / "scan.png"
    bad.write_text("not an image")
    chromium.find_element(By.CSS_SELECTOR, "#image button[aria-label='Clear']").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))[0].send_keys(str(bad))
    wait.until(lambda d: "scan.png is not an image the models can read" in d.find_element(By.ID, "answer-panel").text)
    assert "Traceback" not in log.read_text()
