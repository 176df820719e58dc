"""Screenshots of the search page for docs/search.md: before a search (a photo of one's own with a painted box) and
after it (the query summary and the results grid, two results showing their stored masks).

    python docs/screenshots.py                 # writes docs/images/search-before.png and search-after.png
    python docs/screenshots.py --out /tmp/shots

Everything shown is generated here: placeholder photos (``offset_cir.testing.photos.make_photo``) and their box
masks, indexed with the pixel stand-in model (``offset_cir.testing.search.PixelModel``), served by ``offset
serve``'s own server on 127.0.0.1 and photographed by headless Chromium (``make browser``). No benchmark image,
no weights. Each PNG is reduced to 128 colours so that it stays under about 200 KB.
"""
from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WINDOW = (1280, 1100)
PHOTO = (480, 360)


def make_gallery(root: Path, n: int, seed: int = 0) -> None:
    """``n`` placeholder photos (160x120) under ``root``, each with a box mask ``<stem>-segmask.png`` beside it."""
    from PIL import Image

    from offset_cir.testing.photos import make_photo

    rng = np.random.default_rng(seed)
    for i in range(n):
        make_photo(root / f"photo{i:02d}.png", (160, 120), seed=100 + i)
        x0, y0 = int(rng.integers(0, 80)), int(rng.integers(0, 60))
        mask = Image.new("L", (160, 120), 0)
        mask.paste(255, (x0, y0, x0 + int(rng.integers(40, 80)), y0 + int(rng.integers(30, 60))))
        mask.save(root / f"photo{i:02d}-segmask.png")


def small_png(png: bytes, path: Path) -> int:
    """Save a screenshot with 128 colours (optimised); returns its size in bytes."""
    from PIL import Image

    im = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="PNG", optimize=True)
    return path.stat().st_size


def photograph(url: str, photo: Path, out: Path, profile: Path) -> list[tuple[Path, int]]:
    """Drive the page at ``url``: upload ``photo``, paint a box, type a text (before), search and show two results'
    masks (after). Returns the files written with their sizes."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from offset_cir.testing.browser import console_errors, start_chromium

    driver = start_chromium(profile, *WINDOW)
    written = []
    try:
        driver.get(url + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery .pick img")) > 0)
        driver.find_element(By.ID, "image").send_keys(str(photo))
        wait.until(lambda d: d.find_element(By.ID, "view").is_displayed())
        driver.find_element(By.CSS_SELECTOR, 'input[name=tool][value="box"]').click()
        view = driver.find_element(By.ID, "view")
        w, h = view.rect["width"], view.rect["height"]
        (ActionChains(driver).move_to_element_with_offset(view, int(-w * 0.3), int(-h * 0.25)).click_and_hold()
         .move_by_offset(int(w * 0.35), int(h * 0.55)).release().perform())
        driver.find_element(By.ID, "text").send_keys("the same shapes, but in red")
        wait.until(lambda d: "Marked:" in d.find_element(By.ID, "mask-state").text)
        written.append((out / "search-before.png", small_png(driver.get_screenshot_as_png(),
                                                             out / "search-before.png")))
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results figure.result")) == 10)
        for button in driver.find_elements(By.CSS_SELECTOR, "#results figure.result button")[:2]:
            button.click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results figure.result canvas")) == 2)
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
        written.append((out / "search-after.png", small_png(driver.get_screenshot_as_png(), out / "search-after.png")))
        errors = console_errors(driver)
        if errors:
            raise SystemExit(f"the page logged errors: {errors}")
    finally:
        driver.quit()
    return written


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "images", help="folder for the PNGs (default docs/images)")
    ap.add_argument("--gallery", type=int, default=24, help="placeholder gallery images")
    args = ap.parse_args(argv)

    import torch

    from offset_cir.search import Index, build_index
    from offset_cir.search.service import create_app
    from offset_cir.testing.browser import missing_browser
    from offset_cir.testing.photos import make_photo
    from offset_cir.testing.search import PixelModel
    from offset_cir.testing.service import serve_in_thread

    if missing_browser():
        raise SystemExit(f"screenshots {missing_browser()}")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="offset-shots-") as tmp:
        tmp = Path(tmp)
        make_gallery(tmp / "gallery", args.gallery)
        model = PixelModel(dim=32)
        build_index(tmp / "idx", tmp / "gallery", model=model, progress=False, device="cpu", distributed=False)
        photo = make_photo(tmp / "my-photo.png", PHOTO, seed=42)
        index = Index.open(tmp / "idx", model=model)
        with serve_in_thread(create_app(index, host="127.0.0.1"), log_level="warning") as url:
            written = photograph(url, photo, args.out, tmp / "profile")
    print(f"{'file':<40} {'bytes':>8}")
    for path, size in written:
        print(f"{str(path):<40} {size:>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
