"""The web page at ``/`` in a real headless Chromium (Selenium) against a live uvicorn server on 127.0.0.1: a photo
of one's own uploaded, dropped or pasted, the part that matters painted with pointer events or the keyboard, a
gallery reference repainted, the suggested mask, results with their masks, a 390 px window, no console errors.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make browser``); skipped with the reason when absent.
"""
from __future__ import annotations

import base64
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from offset_cir.testing.browser import answers, console_errors, missing_browser, record_answers, start_chromium

pytestmark = pytest.mark.browser
if missing_browser():
    pytest.skip(f"browser test {missing_browser()}", allow_module_level=True)
pytest.importorskip("uvicorn")

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from offset_cir.testing.photos import BoxMaskGenerator, make_photo  # noqa: E402
from offset_cir.testing.search import PixelModel, index_gallery  # noqa: E402
from offset_cir.testing.service import serve_in_thread  # noqa: E402

from offset_cir.search import Index  # noqa: E402
from offset_cir.search.service import create_app  # noqa: E402

torch.set_num_threads(1)
PHOTO_SIZE = (320, 240)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """The app under `offset serve`'s own server (service.make_server), with its Host check and CSP."""
    base = tmp_path_factory.mktemp("web")
    index = Index.open(base / "idx", model=index_gallery(base, n=12))
    make_photo(base / "photo.png", PHOTO_SIZE, seed=7)
    with serve_in_thread(create_app(index, host="127.0.0.1"), log_level="warning") as url:
        yield base, index, url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")
    driver = start_chromium(profile)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _open(browser, url, images=12, pick=None):
    """Load the page (its console emptied first) and wait for its gallery; ``pick`` a gallery reference."""
    browser.set_window_size(1200, 900)
    browser.get("about:blank")
    console_errors(browser)  # start each test's console afresh, before the page loads
    browser.get(url + "/")
    wait = WebDriverWait(browser, 20)
    wait.until(lambda d: f"{images} images" in d.find_element(By.ID, "info").text)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .pick")) == images)
    record_answers(browser)
    if pick is not None:
        _pick(browser, wait, pick)
    return wait


def _upload(browser, wait, path):
    browser.find_element(By.ID, "image").send_keys(str(path))
    wait.until(lambda d: d.find_element(By.ID, "view").is_displayed())
    wait.until(lambda d: "your photo" in d.find_element(By.ID, "ref-label").text)


def _search(browser, wait, text, k=None):
    field = browser.find_element(By.ID, "text")
    field.clear()
    field.send_keys(text)
    if k is not None:
        kf = browser.find_element(By.ID, "k")
        kf.clear()
        kf.send_keys(str(k))
    before = len(answers(browser))
    browser.find_element(By.ID, "go").click()
    wait.until(lambda d: len(answers(d)) > before)
    answer = answers(browser)[-1]
    assert answer["status"] == 200, answer
    wait.until(lambda d: len(_result_ids(d)) == len(answer["body"]["results"]))
    return answer["body"]


def _pick(browser, wait, image_id):
    """Pick gallery image ``image_id`` as the reference and wait for its stored mask on the canvas."""
    browser.find_element(By.CSS_SELECTOR, f'#gallery .pick[data-id="{image_id}"]').click()
    wait.until(lambda d: "the stored mask" in d.find_element(By.ID, "mask-state").text)


def _result_ids(driver):
    return [e.get_attribute("data-id") for e in driver.find_elements(By.CSS_SELECTOR, "#results figure.result")]


def _choose_tool(browser, name):
    browser.find_element(By.CSS_SELECTOR, f'input[name=tool][value="{name}"]').click()


def _drag_box(browser, start, end):
    """Drag on the photo from ``start`` to ``end`` (CSS pixels from the canvas's top-left corner) with pointer
    events; returns the box (x0, y0, x1, y1) in the image's own pixels that the pointer went over."""
    view = browser.find_element(By.ID, "view")
    rect = browser.execute_script("const r = arguments[0].getBoundingClientRect();"
                                  "return [r.left, r.top, r.width, r.height];", view)
    left, top, width, height = rect
    cx, cy = int(width / 2), int(height / 2)  # Selenium's offsets are from the element's centre
    (ActionChains(browser).move_to_element_with_offset(view, start[0] - cx, start[1] - cy).click_and_hold()
     .move_by_offset((end[0] - start[0]) // 2, (end[1] - start[1]) // 2)
     .move_by_offset(end[0] - start[0] - (end[0] - start[0]) // 2, end[1] - start[1] - (end[1] - start[1]) // 2)
     .release().perform())
    sx, sy = PHOTO_SIZE[0] / width, PHOTO_SIZE[1] / height
    return start[0] * sx, start[1] * sy, end[0] * sx, end[1] * sy


def _mask_of_box(size, box):
    a = np.zeros((size[1], size[0]), dtype=np.uint8)
    x0, y0, x1, y1 = box
    a[y0:y1, x0:x1] = 255
    return Image.fromarray(a, "L")


def test_upload_type_and_see_the_grid(live, browser):
    """A photo of one's own, "Whole image", a text: the grid is the Python API's ranking with an all-white mask."""
    base, index, url = live
    wait = _open(browser, url)
    _upload(browser, wait, base / "photo.png")
    browser.find_element(By.ID, "whole").click()
    wait.until(lambda d: "100.0 %" in d.find_element(By.ID, "mask-state").text)
    body = _search(browser, wait, "make it green", k=6)
    assert body["query"]["mask"] == {"mode": "whole", "coverage": 1.0, "box": [0, 0, 320, 240], "size": [320, 240]}
    photo = Image.open(base / "photo.png")
    assert _result_ids(browser) == [h.id for h in index.search(photo, "make it green", k=6,
                                                                mask=Image.new("L", PHOTO_SIZE, 255))]
    # the result images were served by id and decoded by the browser
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
    assert "results in" in browser.find_element(By.ID, "status").text
    assert "mask: whole, 100.0 %" in browser.find_element(By.ID, "summary-mask").text
    assert console_errors(browser) == []


def test_paint_a_rectangle_and_search(live, browser):
    """The box painted with pointer events is the mask searched with, at the photo's own pixel size."""
    base, index, url = live
    wait = _open(browser, url)
    _upload(browser, wait, base / "photo.png")
    _choose_tool(browser, "box")
    painted = _drag_box(browser, (40, 30), (190, 150))
    wait.until(lambda d: "Marked:" in d.find_element(By.ID, "mask-state").text)
    body = _search(browser, wait, "more blue", k=5)
    mask = body["query"]["mask"]
    assert mask["mode"] == "uploaded" and mask["size"] == [320, 240]
    assert np.allclose(mask["box"], painted, atol=2), (mask["box"], painted)
    area = (painted[2] - painted[0]) * (painted[3] - painted[1]) / (320 * 240)
    assert abs(mask["coverage"] - area) <= 0.02 * area, (mask["coverage"], area)
    want = index.search(Image.open(base / "photo.png"), "more blue", k=5, mask=_mask_of_box(PHOTO_SIZE, mask["box"]))
    assert _result_ids(browser) == [h.id for h in want]
    assert console_errors(browser) == []


def test_brush_eraser_undo_and_clear(live, browser):
    """A brush stroke marks, the eraser takes part of it back, undo restores it, clear empties the mask; with
    nothing marked the page asks for a mark next to the tools and sends nothing."""
    base, _, url = live
    wait = _open(browser, url)
    _upload(browser, wait, base / "photo.png")

    def coverage():
        return float(browser.find_element(By.ID, "mask-state").text.split("Marked: ")[1].split(" %")[0])

    _drag_box(browser, (30, 60), (200, 60))  # brush (the default tool), 24 px wide
    wait.until(lambda d: "Marked:" in d.find_element(By.ID, "mask-state").text)
    brushed = coverage()
    _choose_tool(browser, "eraser")
    _drag_box(browser, (60, 60), (120, 60))
    wait.until(lambda d: coverage() < brushed)
    browser.find_element(By.ID, "undo").click()
    wait.until(lambda d: coverage() == brushed)
    browser.find_element(By.ID, "clear").click()
    wait.until(lambda d: "Nothing marked" in d.find_element(By.ID, "mask-state").text)
    browser.find_element(By.ID, "text").send_keys("red")
    browser.find_element(By.ID, "go").click()
    wait.until(lambda d: "Mark the part that matters" in d.find_element(By.ID, "err-mask").text)
    assert answers(browser) == []  # the page knew the server would refuse it
    assert console_errors(browser) == []


def test_pick_a_gallery_reference_and_see_errors(live, browser):
    """A gallery reference with its stored mask; an empty text is refused next to its field without a request."""
    base, index, url = live
    wait = _open(browser, url, pick="img002")
    browser.find_element(By.ID, "go").click()
    wait.until(lambda d: "Say what should change" in d.find_element(By.ID, "err-text").text)
    assert browser.find_element(By.ID, "text").get_attribute("aria-invalid") == "true"
    assert answers(browser) == []
    body = _search(browser, wait, "more yellow")
    assert _result_ids(browser) == [h.id for h in index.search_id("img002", "more yellow", k=10)]
    assert body["query"]["mask"]["mode"] == "stored"
    assert "mask: stored" in browser.find_element(By.ID, "results-title").text
    # a result shows its stored mask over it, and hides it again
    first = browser.find_element(By.CSS_SELECTOR, "#results figure.result button")
    first.click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results figure.result canvas"))
    overlay = browser.find_element(By.CSS_SELECTOR, "#results figure.result canvas")
    assert overlay.is_displayed() and first.get_attribute("aria-pressed") == "true"
    assert (overlay.get_attribute("width"), overlay.get_attribute("height")) == ("24", "24")
    first.click()
    assert not overlay.is_displayed()
    assert console_errors(browser) == []


def test_a_repainted_gallery_reference_uses_the_painted_mask(live, browser):
    base, index, url = live
    wait = _open(browser, url, pick="img002")
    browser.find_element(By.ID, "clear").click()
    _choose_tool(browser, "box")
    view = browser.find_element(By.ID, "view").rect
    _drag_box(browser, (2, 2), (int(view["width"] * 0.4), int(view["height"] * 0.9)))
    wait.until(lambda d: "repainted" in d.find_element(By.ID, "mask-state").text)
    body = _search(browser, wait, "more yellow", k=5)
    mask = body["query"]["mask"]
    assert body["query"]["reference"]["id"] == "img002" and mask["mode"] == "uploaded"
    assert mask["size"] == [24, 24] and mask["box"][0] <= 1 and 8 <= mask["box"][2] <= 11
    gallery = Image.open(base / "g" / "img002.png")
    q = index.encode_query(gallery, "more yellow", mask=_mask_of_box((24, 24), mask["box"]))
    painted = index.rank(q, 5, exclude_id="img002")
    assert _result_ids(browser) == [h.id for h in painted]
    stored = index.search_id("img002", "more yellow", k=5)
    assert [r["score"] for r in body["results"]] != pytest.approx([h.score for h in stored])
    assert console_errors(browser) == []


def test_keyboard_alone(live, browser):
    """Labels on every control, a visible focus ring, the tools and the photo worked from the keyboard: a box
    marked with the arrow keys and Space, the search sent with Enter."""
    base, _, url = live
    wait = _open(browser, url)
    unlabelled = browser.execute_script(
        "return [...document.querySelectorAll('input, button, canvas[tabindex]')].filter(e => !e.hidden && "
        "!(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim() && "
        "!(e.querySelector('img[alt]'))).map(e => e.outerHTML.slice(0, 80));")
    assert unlabelled == []
    _upload(browser, wait, base / "photo.png")
    brush = browser.find_element(By.CSS_SELECTOR, 'input[name=tool][value="brush"]')
    brush.click()
    ActionChains(browser).send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT).perform()  # brush -> eraser -> box
    assert browser.find_element(By.CSS_SELECTOR, 'input[name=tool][value="box"]').is_selected()
    # Tab order: the tools come after the photo; Shift+Tab from the first tool lands on the photo
    ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.TAB).key_up(Keys.SHIFT).perform()
    assert browser.switch_to.active_element.get_attribute("id") == "view"
    outline = browser.execute_script("const s = getComputedStyle(document.activeElement);"
                                     "return [s.outlineStyle, s.outlineWidth];")
    assert outline[0] == "solid" and outline[1] == "3px"
    steps = [Keys.SPACE] + [Keys.ARROW_RIGHT] * 5 + [Keys.ARROW_DOWN] * 5 + [Keys.SPACE]
    ActionChains(browser).send_keys(*steps).perform()
    wait.until(lambda d: "box 160, 120, 190, 150" in d.find_element(By.ID, "mask-state").text)
    text = browser.find_element(By.ID, "text")
    text.send_keys("make it red", Keys.ENTER)
    wait.until(lambda d: len(answers(d)) == 1)
    assert answers(browser)[0]["body"]["query"]["mask"]["box"] == [160, 120, 190, 150]
    assert console_errors(browser) == []


def test_drop_and_paste_a_photo(live, browser):
    """A photo dropped on the canvas area, then another pasted, becomes the reference at its own size."""
    base, _, url = live
    wait = _open(browser, url)
    make_photo(base / "drop.png", (200, 100), seed=2)
    data = base64.b64encode((base / "drop.png").read_bytes()).decode()
    script = ("const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));"
              "const dt = new DataTransfer(); dt.items.add(new File([bytes], 'drop.png', {type: 'image/png'}));"
              "if (arguments[1] === 'drop') document.getElementById('stage').dispatchEvent("
              "  new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));"
              "else document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true}));")
    browser.execute_script(script, data, "drop")
    wait.until(lambda d: "drop.png, 200x100" in d.find_element(By.ID, "ref-label").text)
    view = browser.find_element(By.ID, "view")
    assert (view.get_attribute("width"), view.get_attribute("height")) == ("200", "100")
    make_photo(base / "paste.png", (90, 120), seed=3)
    browser.execute_script(script, base64.b64encode((base / "paste.png").read_bytes()).decode(), "paste")
    wait.until(lambda d: d.find_element(By.ID, "view").get_attribute("width") == "90")
    assert browser.find_element(By.ID, "view").get_attribute("height") == "120"
    assert console_errors(browser) == []


def test_a_390px_window_shows_the_search_button_without_horizontal_scrolling(live, browser):
    base, _, url = live
    wait = _open(browser, url)
    browser.set_window_size(390, 844)
    try:
        wait.until(lambda d: d.execute_script("return window.innerWidth") <= 390)
        _upload(browser, wait, base / "photo.png")
        width, scroll = browser.execute_script(
            "return [window.innerWidth, document.documentElement.scrollWidth]")
        assert scroll <= width, (scroll, width)
        go = browser.find_element(By.ID, "go")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", go)
        box = browser.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.left, r.right];", go)
        assert go.is_displayed() and 0 <= box[0] and box[1] <= width, box
        assert browser.execute_script("return window.scrollX") == 0
    finally:
        browser.set_window_size(1200, 900)
    assert console_errors(browser) == []


def test_page_works_under_its_content_security_policy(live, browser):
    base, index, url = live
    wait = _open(browser, url)
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#gallery img')].every(i => i.complete && i.naturalWidth > 0)"))
    browser.find_element(By.CSS_SELECTOR, '#gallery .pick[data-id="img005"]').click()
    # the inline style applied (the stylesheet is allowed by its hash): the reference canvas is shown, scaled up
    wait.until(lambda d: d.find_element(By.ID, "view").is_displayed())
    assert browser.find_element(By.ID, "view").rect["width"] > 100
    violations = [e["message"] for e in browser.get_log("browser")
                  if "Content Security Policy" in e["message"] or "Refused to" in e["message"]]
    assert violations == []


@pytest.fixture(scope="module")
def live_suggesting(live):
    """A second server over the same index with a mask pipeline (the stand-in)."""
    base, _, _ = live
    generator = BoxMaskGenerator(0.5)
    index = Index.open(base / "idx", model=PixelModel(), mask_generator=generator)
    with serve_in_thread(create_app(index, host="127.0.0.1"), log_level="warning") as url:
        yield index, generator, url


def test_suggest_fills_the_canvas_with_the_generated_mask(live, live_suggesting, browser):
    base, _, _ = live
    index, generator, url = live_suggesting
    wait = _open(browser, url)
    _upload(browser, wait, base / "photo.png")
    suggest = browser.find_element(By.ID, "suggest")
    assert suggest.is_displayed()
    suggest.click()
    wait.until(lambda d: "the suggested mask" in d.find_element(By.ID, "mask-state").text)
    assert "25.0 %" in browser.find_element(By.ID, "mask-state").text
    body = _search(browser, wait, "darker", k=4)
    assert body["query"]["mask"]["box"] == list(generator.box(PHOTO_SIZE))
    assert console_errors(browser) == []


def test_a_refusal_is_shown_next_to_its_field(live, browser):
    """Where the server refuses what the page let through (here: a text limit the page was told wrongly), its
    message appears next to the field the answer names."""
    base, _, url = live
    wait = _open(browser, url, pick="img003")
    browser.execute_script("S.health.limits.max_text_chars = 5000; document.getElementById('text').maxLength = 5000;")
    browser.execute_script("document.getElementById('text').value = 'x'.repeat(501);")
    browser.find_element(By.ID, "go").click()
    wait.until(lambda d: "error 422" in d.find_element(By.ID, "err-text").text)
    assert "the limit is 500" in browser.find_element(By.ID, "err-text").text
    assert answers(browser)[-1]["body"]["field"] == "text"
    assert browser.find_element(By.ID, "status").text == ""


def test_a_rotated_jpeg_is_painted_upright(live, browser, tmp_path):
    """A JPEG whose EXIF orientation turns it is shown upright; the mask painted over it fits what the server
    searches with."""
    base, _, url = live
    raw = Image.open(base / "photo.png")  # 320x240 as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise: 240x320
    raw.save(tmp_path / "turned.jpg", format="JPEG", exif=exif.tobytes(), quality=95)
    wait = _open(browser, url)
    _upload(browser, wait, tmp_path / "turned.jpg")
    view = browser.find_element(By.ID, "view")
    assert (view.get_attribute("width"), view.get_attribute("height")) == ("240", "320")
    _choose_tool(browser, "box")
    _drag_box(browser, (10, 10), (100, 60))
    wait.until(lambda d: "Marked:" in d.find_element(By.ID, "mask-state").text)
    body = _search(browser, wait, "red", k=3)
    assert body["query"]["mask"]["size"] == [240, 320] and body["query"]["mask"]["mode"] == "uploaded"
    assert console_errors(browser) == []


def test_a_model_without_masks_asks_for_none(live, browser):
    """The marking tools are hidden and no mask is sent where the model uses none."""
    base, _, _ = live
    index = Index.open(base / "idx", model=PixelModel(uses_masks=False), verify_checkpoint=False)
    with serve_in_thread(create_app(index, host="127.0.0.1"), log_level="warning") as url:
        wait = _open(browser, url)
        assert not browser.find_element(By.ID, "marking").is_displayed()
        _upload(browser, wait, base / "photo.png")
        body = _search(browser, wait, "red", k=3)
    assert body["query"]["mask"]["mode"] == "none"
    assert console_errors(browser) == []
