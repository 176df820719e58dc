"""The web page at ``/`` in a real headless Chromium (Selenium) against a live uvicorn server on 127.0.0.1.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make browser``); skipped with the reason when absent.
"""
from __future__ import annotations

import shutil
import socket
import sys
import threading
import time
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
uvicorn = pytest.importorskip("uvicorn")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_search_support import FakeModel, make_gallery  # noqa: E402

from offset_cir.search import Index, build_index  # noqa: E402
from offset_cir.search.service import create_app  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    base = tmp_path_factory.mktemp("web")
    make_gallery(base / "g", n=12)
    model = FakeModel()
    build_index(base / "idx", base / "g", model=model, progress=False, device="cpu", distributed=False)
    index = Index.open(base / "idx", model=model)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # loopback only, a free port chosen by the OS
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(index), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):  # bounded wait for the server to come up
        if server.started:
            break
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield base, index, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


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
