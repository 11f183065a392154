"""Tiny models run fastest single-threaded, and tests share the machine's cores."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def toy_processor():
    """A tiny LLaVA processor without a model, for stand-in policies: the token budget counts with it.

    Its tokenizer's ``model_max_length`` (1024) is then the stand-in's own limit.
    """
    from policy.prompts import DEFAULT_PROMPTS
    from toy.toy_policy import ToyPolicyConfig, build_processor, template_texts, train_tokenizer

    texts = template_texts(DEFAULT_PROMPTS) + ["Is there a finding? Yes finding. No finding. Normal study."] * 5
    return build_processor(train_tokenizer(texts, 400, 1024), ToyPolicyConfig())


@pytest.fixture
def chromium():
    """Headless Debian Chromium driven by selenium; the test skips, saying how to get it, without one.

    The system's chromium and chromedriver are used as they are (no browser download at test time).
    """
    import os
    import shutil

    browser, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not browser or not driver:
        missing = "no headless browser: apt-get install chromium chromium-driver (Debian), then rerun"
        if os.environ.get("CI"):  # .ci/run installs them: in CI a missing browser is a failure, not a skip
            pytest.fail(missing)
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1200"):
        options.add_argument(arg)
    session = webdriver.Chrome(service=Service(driver), options=options)
    yield session
    session.quit()
