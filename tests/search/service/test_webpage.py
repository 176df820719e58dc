"""The web page at ``/`` in a real headless Chromium (Selenium) against a live uvicorn server on 127.0.0.1.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make browser``); skipped with the reason when absent.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
DRIVER = Path("/usr/bin/chromedriver")
if not CHROMIUM.exists() or not DRIVER.exists():
    pytest.skip(f"browser test needs {CHROMIUM} and {DRIVER} (Debian chromium + chromium-driver: `make browser`)",
                allow_module_level=True)
pytest.importorskip("selenium")
pytest.importorskip("uvicorn")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from offset_cir.testing.search import index_gallery  # noqa: E402
from offset_cir.testing.service import serve_in_thread  # noqa: E402

from offset_cir.search import Index  # noqa: E402
from offset_cir.search.service import create_app  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The app under `offset serve`'s own server (service.make_server), with its Host check and CSP."""
    base = tmp_path_factory.mktemp("web")
    index = Index.open(base / "idx", model=index_gallery(base, n=12))
    with serve_in_thread(create_app(index, host="127.0.0.1"), log_level="warning") as url:
        yield base, index, url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--no-proxy-server",
                 f"--user-data-dir={profile}", "--window-size=1200,900"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP violations are reported to the console
    driver = webdriver.Chrome(service=Service(executable_path=str(DRIVER)), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _result_ids(driver):
    return [e.get_attribute("data-id") for e in driver.find_elements(By.CSS_SELECTOR, "#results figure.result")]


def test_upload_type_and_see_the_grid(live, browser):
    base, index, url = live
    browser.get(url + "/")
    wait = WebDriverWait(browser, 20)
    wait.until(lambda d: "12 images" in d.find_element(By.ID, "info").text)
    ref, mask = base / "g" / "img003.png", base / "g" / "img003-segmask.png"
    browser.find_element(By.ID, "image").send_keys(str(ref))
    browser.find_element(By.ID, "mask").send_keys(str(mask))
    browser.find_element(By.ID, "text").send_keys("make it green")
    k = browser.find_element(By.ID, "k")
    k.clear()
    k.send_keys("6")
    browser.find_element(By.ID, "go").click()
    wait.until(lambda d: len(_result_ids(d)) == 6)
    assert _result_ids(browser) == [h.id for h in index.search(ref, "make it green", k=6, mask=mask)]
    # the result images were served by id and decoded by the browser
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
    assert "results in" in browser.find_element(By.ID, "status").text


def test_pick_a_gallery_reference_and_see_errors(live, browser):
    base, index, url = live
    browser.get(url + "/")
    wait = WebDriverWait(browser, 20)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery figure.pick")) == 12)
    browser.find_element(By.CSS_SELECTOR, '#gallery figure.pick[data-id="img002"]').click()
    # empty text: the service's 422 message is shown, no grid
    browser.find_element(By.ID, "go").click()
    wait.until(lambda d: "error 422" in d.find_element(By.ID, "status").text)
    assert "'text' is required" in browser.find_element(By.ID, "status").text
    browser.find_element(By.ID, "text").send_keys("more yellow")
    browser.find_element(By.ID, "go").click()
    wait.until(lambda d: len(_result_ids(d)) == 10)
    assert _result_ids(browser) == [h.id for h in index.search_id("img002", "more yellow", k=10)]
    assert "mask: stored" in browser.find_element(By.ID, "results-title").text


def test_page_works_under_its_content_security_policy(live, browser):
    base, index, url = live
    browser.get_log("browser")  # drop what earlier tests left
    browser.get(url + "/")
    wait = WebDriverWait(browser, 20)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery figure.pick")) == 12)
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#gallery img')].every(i => i.complete && i.naturalWidth > 0)"))
    browser.find_element(By.CSS_SELECTOR, '#gallery figure.pick[data-id="img005"]').click()
    # the inline style applied (the stylesheet is allowed by its hash): the reference preview is shown
    assert browser.find_element(By.ID, "ref-preview").is_displayed()
    violations = [e["message"] for e in browser.get_log("browser")
                  if "Content Security Policy" in e["message"] or "Refused to" in e["message"]]
    assert violations == []
