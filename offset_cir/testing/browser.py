"""A headless Chromium driven by Selenium, for the tests of the search page and ``docs/screenshots.py``: where the
browser is (``missing_browser``), starting it (``start_chromium``), the JSON answers the page received
(``record_answers`` / ``answers``) and the console's errors (``console_errors``)."""
from __future__ import annotations

from pathlib import Path

#: Debian's chromium and chromium-driver (``make browser``)
CHROMIUM = Path("/usr/bin/chromium")
DRIVER = Path("/usr/bin/chromedriver")

#: wraps the page's fetch so that the JSON of every answer to a POST lands in ``window.offsetAnswers`` (run
#: through the driver, outside the page's Content-Security-Policy)
_RECORD = """
if (!window.offsetAnswers) {
  window.offsetAnswers = [];
  const real = window.fetch;
  window.fetch = async (url, opts) => {
    const r = await real(url, opts);
    if (opts && opts.method === "POST") {
      const body = r.headers.get("content-type") === "application/json" ? await r.clone().json() : null;
      window.offsetAnswers.push({url: String(url), status: r.status, body: body});
    }
    return r;
  };
}
"""


def missing_browser() -> str | None:
    """Why the browser checks cannot run here (None when they can)."""
    if not CHROMIUM.exists() or not DRIVER.exists():
        return f"needs {CHROMIUM} and {DRIVER} (Debian chromium + chromium-driver: `make browser`)"
    import importlib.util

    if importlib.util.find_spec("selenium") is None:
        return "needs selenium (the 'dev' extra)"
    return None


def start_chromium(profile: Path, width: int = 1200, height: int = 900):
    """A headless Chromium (a fresh profile under ``profile``) with its console log kept; the caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--no-proxy-server", "--hide-scrollbars", "--force-device-scale-factor=1",
                 f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP violations are reported to the console
    driver = webdriver.Chrome(service=Service(executable_path=str(DRIVER)), options=opts)
    driver.set_page_load_timeout(30)
    return driver


def record_answers(driver) -> None:
    """From now on (until the page is loaded again) keep the JSON answers of the page's POST requests."""
    driver.execute_script(_RECORD)


def answers(driver) -> list[dict]:
    """The answers kept since :func:`record_answers`: ``{"url", "status", "body"}`` each, oldest first."""
    return driver.execute_script("return window.offsetAnswers || [];")


def console_errors(driver) -> list[str]:
    """The console's errors (level SEVERE, CSP refusals among them) since the last call."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
