"""The page of `vistra serve` in a real browser (Debian's chromium and chromedriver, driven
by selenium; nothing downloaded): upload a Fashion-MNIST image, see its top class and the
probability bars; upload a corrupt file, see a readable error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from serve_helpers import CLASSES, fashion_images, running_server, tiny_checkpoint

from vistra.data.images import load_rgb
from vistra.runtime import load_classifier
from vistra.serve import ServeSettings, create_app

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.fixture
def browser(tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("chromium is not installed (/usr/bin/chromium)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "1"  # selenium-manager must never download a driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--window-size=1100,760",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)),
                              options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.slow
def test_page_classifies_an_uploaded_image_and_explains_a_corrupt_one(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    classifier = load_classifier(tiny_checkpoint(tmp_path / "m.safetensors"))
    image = fashion_images(10)[9]  # a Trouser
    logits = classifier(classifier.transform(load_rgb(image)).unsqueeze(0))[0]
    top1 = (classifier.classes or CLASSES)[int(torch.argmax(logits))]

    with running_server(create_app(classifier, ServeSettings())) as base:
        browser.get(base + "/")
        wait = WebDriverWait(browser, 20)
        wait.until(seen.text_to_be_present_in_element((By.ID, "status"), "ready"))
        browser.find_element(By.ID, "file").send_keys(str(image))
        wait.until(seen.text_to_be_present_in_element((By.ID, "top1"), top1))
        bars = browser.find_elements(By.CSS_SELECTOR, "#classes .bar")
        assert len(bars) == 5 and bars[0].find_element(By.CLASS_NAME, "name").text == top1
        widths = [bar.find_element(By.CLASS_NAME, "fill").size["width"] for bar in bars]
        assert widths == sorted(widths, reverse=True) and widths[0] > 0
        assert "ms" in browser.find_element(By.ID, "latency").text
        assert browser.find_element(By.ID, "preview").get_attribute("naturalWidth") == "28"
        shot = tmp_path / "page.png"
        assert browser.save_screenshot(str(shot))

        corrupt = tmp_path / "broken.png"
        corrupt.write_bytes(image.read_bytes()[:len(image.read_bytes()) // 2])  # truncated
        browser.find_element(By.ID, "file").send_keys(str(corrupt))
        wait.until(seen.visibility_of_element_located((By.ID, "error")))
        message = browser.find_element(By.ID, "error").text
        assert "broken.png" in message and "cannot be read" in message.lower()
        assert not browser.find_element(By.ID, "result").is_displayed()
        browser.save_screenshot(str(tmp_path / "error.png"))
