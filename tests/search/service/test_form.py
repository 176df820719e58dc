"""The search form (offset_cir.search.service.form) on its own: a parsed form -> SearchQuery, and every refusal a
FormError that names its field, with the status the service answers."""
from __future__ import annotations

import asyncio
import io
import struct
import zlib

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from offset_cir.search.service.form import (  # noqa: E402
    FormError,
    SearchQuery,
    decode_upload,
    parse_gallery_page,
    parse_search_fields,
)
from offset_cir.search.service.state import ServiceLimits  # noqa: E402

LIMITS = ServiceLimits(max_k=20, max_text_chars=30, max_pixels=10_000)
GALLERY = {"img001", "sub/img004"}


class Upload:
    """Stands in for Starlette's UploadFile: ``read()`` is a coroutine."""

    def __init__(self, data: bytes):
        self.data = data

    async def read(self) -> bytes:
        return self.data


class Form(dict):
    """A parsed form: ``keys()`` and ``get()`` like Starlette's FormData."""


def _parse(**fields) -> SearchQuery:
    return asyncio.run(parse_search_fields(Form(fields), LIMITS, GALLERY))


def _png(size=(8, 8), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def test_a_valid_form_becomes_a_search_query():
    assert _parse(text="make it red", k="5", ref_id="sub/img004") == SearchQuery("make it red", 5, ref_id="sub/img004")
    png, mask = _png(), _png(mode="L")
    q = _parse(text="red", image=Upload(png), mask=Upload(mask))
    assert (q.text, q.k, q.ref_id, q.image, q.mask) == ("red", 10, None, png, mask)  # k defaults to 10
    assert _parse(text="red", ref_id="", image=Upload(png)).ref_id is None  # an empty ref_id is no reference


@pytest.mark.parametrize("fields, field, status, phrase", [
    ({"k": "3", "ref_id": "img001"}, "text", 422, "field 'text' is required"),
    ({"text": "  ", "ref_id": "img001"}, "text", 422, "field 'text' is required"),
    ({"text": "x" * 31, "ref_id": "img001"}, "text", 422, "the limit is 30"),
    ({"text": "red", "k": "0", "ref_id": "img001"}, "k", 422, "field 'k' must be a whole number from 1 to 20"),
    ({"text": "red", "k": "21", "ref_id": "img001"}, "k", 422, "got '21'"),
    ({"text": "red", "k": "9" * 40, "ref_id": "img001"}, "k", 422, "characters)"),
    ({"text": "red", "evil": "1", "ref_id": "img001"}, "'evil'", 422, "unknown field(s) 'evil'"),
    ({"text": "red", "image": "a string"}, "image", 422, "must be file uploads"),
    ({"text": "red", "ref_id": "img001", "mask": "a string"}, "mask", 422, "must be file uploads"),
    ({"text": "red"}, "image, ref_id", 422, "exactly one reference"),
    ({"text": "red", "ref_id": "nope"}, "ref_id", 404, "no gallery image with id 'nope'"),
    ({"text": "red", "ref_id": "img001", "mask": Upload(b"x")}, "mask", 422, "do not upload a 'mask'"),
    ({"text": "red", "image": Upload(b"")}, "image", 422, "field 'image' is an empty file"),
    ({"text": "red", "image": Upload(b"x"), "mask": Upload(b"")}, "mask", 422, "field 'mask' is an empty file"),
])
def test_each_refusal_names_its_field(fields, field, status, phrase):
    with pytest.raises(FormError) as err:
        _parse(**fields)
    assert (err.value.field, err.value.status_code) == (field, status)
    assert phrase in err.value.detail


def _png_claiming(width: int, height: int) -> bytes:
    raw = bytearray(_png((1, 1)))
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])) & 0xFFFFFFFF)
    return bytes(raw)


def test_uploads_are_decoded_under_the_pixel_limit_naming_the_field():
    assert decode_upload(_png((10, 20)), "image", 10_000).size == (10, 20)
    assert decode_upload(_png((10, 20)), "mask", 10_000, mode="L").mode == "L"
    cases = [(b"%PDF-1.4", "image", 415, "field 'image' is not an image"),
             (_png((200, 60)), "mask", 413, "field 'mask' is 200x60 = 12000 pixels; the limit is 10000"),
             (_png_claiming(100_000, 100_000), "image", 413, "field 'image' is 100000x100000"),
             (b"", "mask", 422, "field 'mask' is an empty file")]
    for data, field, status, phrase in cases:
        with pytest.raises(FormError) as err:
            decode_upload(data, field, 10_000)
        assert (err.value.field, err.value.status_code) == (field, status) and phrase in err.value.detail


def test_gallery_paging_names_its_parameters():
    assert parse_gallery_page("10", "4") == (10, 4)
    for offset, limit in (("x", "4"), ("-1", "4"), ("0", "0"), ("0", "201")):
        with pytest.raises(FormError) as err:
            parse_gallery_page(offset, limit)
        assert err.value.field == "offset, limit" and err.value.status_code == 422
