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
from starlette.datastructures import FormData  # noqa: E402

from offset_cir.search.service.form import (  # noqa: E402
    FormError,
    SearchQuery,
    choose_mask_mode,
    decode_upload,
    parse_gallery_page,
    parse_search_fields,
    read_search_form,
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


def _parse(**fields) -> SearchQuery:
    return _parse_items(list(fields.items()))


def _parse_items(items: list) -> SearchQuery:
    """The form of ``(name, value)`` pairs, in order and with repeats, as Starlette parses it."""
    return asyncio.run(parse_search_fields(FormData(items), LIMITS, GALLERY))


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
    # a gallery reference with a mask of its own (a repainted stored mask), and the mask mode asked for
    q = _parse(text="red", ref_id="img001", mask=Upload(mask), mask_mode="uploaded")
    assert (q.ref_id, q.image, q.mask, q.mask_mode) == ("img001", None, mask, "uploaded")
    assert _parse(text="red", ref_id="img001", mask_mode="").mask_mode is None  # empty: the server chooses


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


@pytest.mark.parametrize("items, field, phrase", [
    ([("text", "red"), ("text", "blue"), ("ref_id", "img001")], "text", "field 'text' was sent 2 times"),
    ([("text", "red"), ("k", "3"), ("k", "4"), ("k", "5"), ("ref_id", "img001")], "k", "'k' was sent 3 times"),
    ([("text", "red"), ("ref_id", "img001"), ("ref_id", "sub/img004")], "ref_id", "'ref_id' was sent 2 times"),
    ([("text", "red"), ("image", Upload(b"a")), ("image", Upload(b"b"))], "image", "'image' was sent 2 times"),
    ([("text", "red"), ("ref_id", "img001"), ("mask_mode", "whole"), ("mask_mode", "stored")], "mask_mode",
     "'mask_mode' was sent 2 times"),
])
def test_repeated_fields_are_refused_naming_the_field(items, field, phrase):
    """A field sent twice would silently take one of its values (text=red&text=blue searched "blue")."""
    with pytest.raises(FormError) as err:
        _parse_items(items)
    assert (err.value.field, err.value.status_code) == (field, 422) and phrase in err.value.detail


@pytest.mark.parametrize("k", ["1_0", " 5 ", "5 ", "+5", "5.0", "\uff15", "\u0665", "1e1", "0x5", ""])
def test_k_is_written_in_ascii_digits_only(k):
    """int() reads "1_0" as 10, " 5 " as 5 and other scripts' digits ("\uff15" fullwidth 5): all refused."""
    with pytest.raises(FormError) as err:
        _parse(text="red", ref_id="img001", k=k)
    assert (err.value.field, err.value.status_code) == ("k", 422) and "in the digits 0-9" in err.value.detail
    assert _parse(text="red", ref_id="img001", k="05").k == 5


@pytest.mark.parametrize("text", ["\u200b", "\u200b\u200c\u200d", "\u2060\ufeff\u200b", " \u200b ", "\u0301\u0301",
                                  "\u00ad", "\u180e\u200e\u200f"])
def test_text_of_invisible_characters_is_refused(text):
    """Zero-width spaces and joiners, word joiners, BOMs, soft hyphens, direction marks or lone combining marks
    are not a modification text."""
    with pytest.raises(FormError) as err:
        _parse(text=text, ref_id="img001")
    assert (err.value.field, err.value.status_code) == ("text", 422) and "no visible character" in err.value.detail


def test_text_with_a_visible_character_is_kept_whole():
    for text in ("\u200bred", "\U0001f534", "\u7ea2\u8272", "5", "!"):
        assert _parse(text=text, ref_id="img001").text == text


OFFER = ("uploaded", "whole", "stored")


@pytest.mark.parametrize("query, offered, stored, want", [
    (SearchQuery("t", 1, image=b"i", mask=b"m"), OFFER, False, "uploaded"),
    (SearchQuery("t", 1, ref_id="a", mask=b"m"), OFFER, True, "uploaded"),  # a repainted stored mask
    (SearchQuery("t", 1, ref_id="a"), OFFER, True, "stored"),
    (SearchQuery("t", 1, ref_id="a"), OFFER + ("generated",), False, "generated"),
    (SearchQuery("t", 1, image=b"i"), OFFER + ("generated",), False, "generated"),
    (SearchQuery("t", 1, image=b"i", mask_mode="whole"), OFFER, False, "whole"),
    (SearchQuery("t", 1, ref_id="a", mask_mode="whole"), OFFER, True, "whole"),
    (SearchQuery("t", 1, ref_id="a", mask_mode="stored"), OFFER, True, "stored"),
    (SearchQuery("t", 1, image=b"i", mask=b"m", mask_mode="uploaded"), OFFER, False, "uploaded"),
    (SearchQuery("t", 1, image=b"i", mask_mode="generated"), OFFER + ("generated",), False, "generated"),
    (SearchQuery("t", 1, image=b"i"), (), False, "none"),  # a model that uses no mask
    (SearchQuery("t", 1, image=b"i", mask=b"m", mask_mode="whole"), (), False, "none"),
])
def test_the_mask_mode_a_request_implies(query, offered, stored, want):
    assert choose_mask_mode(query, offered, stored) == want


@pytest.mark.parametrize("query, offered, stored, field, phrase", [
    (SearchQuery("t", 1, image=b"i"), OFFER, False, "mask_mode", "the request gives none"),
    (SearchQuery("t", 1, ref_id="a"), OFFER, False, "mask_mode", "the request gives none"),
    (SearchQuery("t", 1, image=b"i", mask_mode="generated"), OFFER, False, "mask_mode", "'generated' is not offered"),
    (SearchQuery("t", 1, image=b"i", mask_mode="painted"), OFFER, False, "mask_mode", "'mask_mode' is 'painted'"),
    (SearchQuery("t", 1, image=b"i", mask_mode="painted"), (), False, "mask_mode", "uses no mask"),
    (SearchQuery("t", 1, image=b"i", mask_mode="uploaded"), OFFER, False, "mask", "needs a 'mask' file"),
    (SearchQuery("t", 1, image=b"i", mask=b"m", mask_mode="whole"), OFFER, False, "mask", "send no 'mask'"),
    (SearchQuery("t", 1, image=b"i", mask_mode="stored"), OFFER, False, "mask_mode", "give 'ref_id'"),
    (SearchQuery("t", 1, ref_id="a", mask_mode="stored"), OFFER, False, "mask_mode", "has no stored mask"),
])
def test_a_mask_mode_that_cannot_be_had_is_refused_listing_the_offer(query, offered, stored, field, phrase):
    with pytest.raises(FormError) as err:
        choose_mask_mode(query, offered, stored)
    assert (err.value.field, err.value.status_code) == (field, 422) and phrase in err.value.detail
    if field == "mask_mode" and offered:
        assert "this server offers mask_mode " + ", ".join(offered) in err.value.detail


def _multipart(parts: list[tuple[str, bytes]], boundary: bytes = b"BOUNDARY") -> bytes:
    body = b"".join(b"--" + boundary + b'\r\nContent-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n'
                    + value + b"\r\n" for name, value in parts)
    return body + b"--" + boundary + b"--\r\n"


def _read_form_in_chunks(body: bytes, chunk: int, boundary: bytes = b"BOUNDARY") -> SearchQuery:
    """read_search_form over an ASGI request whose body arrives in pieces of ``chunk`` bytes."""
    from starlette.requests import Request

    pieces = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/search", "query_string": b"", "app": object(),
             "headers": [(b"content-type", b"multipart/form-data; boundary=" + boundary)]}
    return asyncio.run(read_search_form(Request(scope, receive), LIMITS, GALLERY))


@pytest.mark.parametrize("chunk", [100_000, 1000, 97])
def test_an_overlong_field_name_is_named(chunk):
    """A 5,000-character field name overflows the multipart parser's header limit: the answer names the field (cut
    to 40 characters, with its length), wherever the body's pieces split it."""
    name = "z" * 5000
    body = _multipart([("text", b"red"), ("ref_id", b"img001"), (name, b"1")])
    with pytest.raises(FormError) as err:
        _read_form_in_chunks(body, chunk)
    assert err.value.status_code == 422 and err.value.field == repr("z" * 40) + "\u2026 (5000 characters)"
    assert "field name 'zzzz" in err.value.detail and "(5000 characters) is too long" in err.value.detail
    assert len(err.value.detail) < 300
    ok = _read_form_in_chunks(_multipart([("text", b"red"), ("ref_id", b"img001")]), chunk)
    assert (ok.text, ok.ref_id) == ("red", "img001")
