"""The one image decoder (offset_cir.images): sources, modes, the pixel limit checked before decoding, messages that
name the file or field, pixels as stored; and the loaders that read through it."""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from offset_cir.errors import DatasetError, UserInputError
from offset_cir.images import (ImageMissingError, ImageReadError, ImageTooLargeError, read_header,
                               read_image)


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A small PNG whose header claims ``width`` x ``height`` pixels (its pixel data is that of a 1 x 1 image):
    decoding it fails, so only a check made on the header can refuse it for its size."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (9, 9, 9)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    start = data.index(b"IHDR")
    data[start + 4:start + 12] = struct.pack(">II", width, height)
    data[start + 17:start + 21] = struct.pack(">I", zlib.crc32(bytes(data[start:start + 17])))
    path.write_bytes(bytes(data))
    return path


@pytest.fixture
def files(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    whole = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[:len(whole) // 2])
    return tmp_path, rgb


def test_a_path_bytes_and_a_file_object_decode_to_the_same_pixels(files):
    folder, rgb = files
    data = (folder / "a.png").read_bytes()
    for source in (folder / "a.png", str(folder / "a.png"), data, io.BytesIO(data)):
        im = read_image(source)
        assert im.mode == "RGB" and np.array_equal(np.asarray(im), rgb)
    gray = read_image(folder / "a.png", "L")
    assert gray.mode == "L" and gray.size == (30, 20)
    assert read_image(folder / "a.png", None).mode == "RGB"  # as stored
    assert read_header(data) == ((30, 20), "RGB", "PNG")


def test_pixels_come_as_stored_without_exif_rotation(tmp_path):
    # an image, its mask and its features keep the file's geometry: no orientation tag is applied
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees to display"
    Image.new("RGB", (40, 10), (200, 10, 10)).save(tmp_path / "tagged.jpg", exif=exif)
    assert read_image(tmp_path / "tagged.jpg").size == (40, 10)


def test_what_is_not_an_image_is_refused_naming_the_file(files):
    folder, _ = files
    with pytest.raises(ImageMissingError, match="image not found: .*nope.png") as missing:
        read_image(folder / "nope.png")
    assert isinstance(missing.value, FileNotFoundError) and isinstance(missing.value, UserInputError)
    cases = {"notes.txt": "not an image format", "bad.jpg": "", "cut.png": "truncated"}
    for name, reason in cases.items():
        with pytest.raises(ImageReadError, match=f"mask cannot be read .*{name}.*{reason}"):
            read_image(folder / name, "L", what="mask")
    with pytest.raises(ImageReadError, match="it is a folder"):
        read_image(folder)


def test_a_header_read_checks_the_file_on_request_without_decoding(files):
    folder, _ = files
    assert read_header(folder / "a.png", verify=True).size == (30, 20)
    data = bytearray((folder / "a.png").read_bytes())
    data[-20] ^= 0xFF  # a flipped byte in the last chunk: the header still reads, the checksum does not match
    (folder / "flipped.png").write_bytes(bytes(data))
    assert read_header(folder / "flipped.png").size == (30, 20)
    with pytest.raises(ImageReadError, match="image cannot be read .*flipped.png"):
        read_header(folder / "flipped.png", verify=True)


def test_an_upload_is_named_by_its_field_and_checked_against_its_formats(files):
    folder, _ = files
    data = (folder / "a.png").read_bytes()
    with pytest.raises(ImageReadError, match=r"^field 'image' cannot be read .*: not one of JPEG, WEBP$"):
        read_image(data, what="field 'image'", formats=("JPEG", "WEBP"))
    with pytest.raises(ImageReadError, match=r"^field 'mask' cannot be read .*not an image format"):
        read_image(b"", "L", what="field 'mask'")
    assert read_image(data, what="field 'image'", formats=("PNG",)).size == (30, 20)


def test_the_pixel_limit_is_checked_on_the_header_before_decoding(tmp_path):
    # 2000 x 2000 claimed, the data of 1 x 1: decoding would fail as truncated; the limit refuses it first
    claim = png_claiming(tmp_path / "claims.png", 2000, 2000)
    with pytest.raises(ImageTooLargeError, match=r"image .*claims.png is 2000x2000 = 4,000,000 pixels; "
                                                 r"the limit is 1,000,000 pixels") as err:
        read_image(claim, max_pixels=1_000_000)
    assert (err.value.size, err.value.limit) == ((2000, 2000), 1_000_000)
    with pytest.raises(ImageTooLargeError, match=r"^field 'image' is 2000x2000"):
        read_image(claim.read_bytes(), what="field 'image'", max_pixels=1_000_000)
    with pytest.raises(ImageReadError, match="truncated|broken|cannot be read"):  # under the limit: decoded, fails
        read_image(claim, max_pixels=5_000_000)


def test_beyond_pils_own_limit_the_claimed_size_is_still_named(tmp_path):
    bomb = png_claiming(tmp_path / "bomb.png", 50_000, 50_000)  # 2.5e9 pixels: PIL refuses to open it
    limit = 2 * Image.MAX_IMAGE_PIXELS
    for source, what in ((bomb, "image"), (bomb.read_bytes(), "field 'image'")):
        with pytest.raises(ImageTooLargeError, match=f"50000x50000 = 2,500,000,000 pixels; the limit is {limit:,}"):
            read_image(source, what=what)


# ------------------------------------------------------------------ the loaders that read through it
def test_datasets_name_the_file_and_its_size_when_it_is_too_large(tmp_path, monkeypatch):
    from offset_cir.data.common import open_image

    png_claiming(tmp_path / "huge.png", 30_000, 30_000)
    with pytest.raises(DatasetError, match=r"image .*huge.png is 30000x30000 = 900,000,000 pixels; the limit is"):
        open_image(tmp_path / "huge.png")


def test_the_mask_run_reports_a_file_too_large_and_goes_on(tmp_path):
    from offset_cir.masks import MaskGenerator, find_images, get_layout, plan, run_masks

    class FlatSegmenter:
        input_size = (16, 16)

        def segment(self, images, prompts):
            return np.full((len(images), 16, 16), 0.8, dtype=np.float32)

    src = tmp_path / "imgs"
    src.mkdir()
    Image.new("RGB", (24, 16), (10, 200, 10)).save(src / "good.png")
    png_claiming(src / "huge.png", 30_000, 30_000)
    jobs = plan(find_images("images", src), src, get_layout("images"), tmp_path / "out")
    gen = MaskGenerator(captioner=None, segmenter=FlatSegmenter(), fixed_prompt="thing")
    report = run_masks(jobs, gen, progress=False, workers=1)
    assert report.written == 1
    [(path, reason)] = report.failed
    assert path.endswith("huge.png") and "30000x30000" in reason and "the limit is" in reason
