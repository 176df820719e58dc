"""What clients send, checked: the ``POST /search`` form turned into a :class:`SearchQuery`, uploaded images decoded
under the pixel limit, and the gallery's paging parameters. Every refusal is a :class:`FormError` naming the field.

Status codes: 422 a missing or malformed field, 404 a ``ref_id`` the gallery does not have, 400 a malformed
multipart body, 413 an image over the pixel limit, 415 a body that is not a form or an upload that is not an image.
Messages quote at most 80 characters of any client string and no server path.
"""
from __future__ import annotations

import dataclasses
import io
import warnings
from typing import Container

from fastapi import HTTPException

from offset_cir.search.inputs import short_repr
from offset_cir.search.service.guards import public_message
from offset_cir.search.service.state import ServiceLimits

#: the fields of the search form
FIELDS = ("text", "k", "image", "mask", "ref_id")
#: image formats accepted from clients (PIL would otherwise also try e.g. EPS, which runs Ghostscript)
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
#: form parser bounds: files, fields, bytes of one non-file part
MAX_FILES, MAX_FIELDS, MAX_PART_SIZE = 2, 8, 64 * 1024
#: most gallery entries one page may ask for
MAX_PAGE = 200


class FormError(HTTPException):
    """A refused request, about ``field`` (None: the body as a whole); answered with ``status`` and ``detail``."""

    def __init__(self, field: str | None, detail: str, status: int = 422, headers: dict | None = None):
        super().__init__(status, detail, headers=headers)
        self.field = field


@dataclasses.dataclass(frozen=True)
class SearchQuery:
    """A validated search request: the text, k, and one reference (a gallery ``ref_id``, or an uploaded ``image``
    with an optional ``mask``, still undecoded)."""

    text: str
    k: int
    ref_id: str | None = None
    image: bytes | None = None
    mask: bytes | None = None


# ----------------------------------------------------------------------------------------------- the form


async def read_search_form(request, limits: ServiceLimits, gallery: Container[str]) -> SearchQuery:
    """The search form of ``request`` (multipart or urlencoded), checked field by field; ``gallery`` holds the
    ids a ``ref_id`` may name."""
    from starlette.requests import Request

    ctype = request.headers.get("content-type", "")
    if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise FormError(None, "send the query as multipart/form-data (fields text, k, image [, mask] or ref_id)",
                        415)
    watch = None
    if ctype.startswith("multipart/form-data"):
        from python_multipart.multipart import parse_options_header

        boundary = parse_options_header(ctype)[1].get(b"boundary")
        if not boundary:
            raise FormError(None, "malformed multipart body: the Content-Type names no boundary", 400)
        watch = _ClosingBoundaryWatch(request.receive, boundary)
        request = Request(request.scope, watch)
    form = await request.form(max_files=MAX_FILES, max_fields=MAX_FIELDS, max_part_size=MAX_PART_SIZE)
    try:
        if watch is not None and not watch.found:
            raise FormError(None, "malformed multipart body: it ends before its closing boundary (the request was "
                                  "cut short)", 400)
        return await parse_search_fields(form, limits, gallery)
    finally:
        await form.close()


async def parse_search_fields(form, limits: ServiceLimits, gallery: Container[str]) -> SearchQuery:
    """A parsed form (``keys()``, ``get()``; uploads have an async ``read()``) -> :class:`SearchQuery`."""
    unknown = sorted(set(form.keys()) - set(FIELDS))
    if unknown:
        names = ", ".join(short_repr(u, 40) for u in unknown[:5])
        raise FormError(names, f"unknown field(s) {names}; expected {', '.join(FIELDS)}")
    text = _text(form.get("text"), limits.max_text_chars)
    k = _k(form.get("k", "10"), limits.max_k)
    upload, ref_id, mask_up = form.get("image"), form.get("ref_id"), form.get("mask")
    if isinstance(upload, str) or isinstance(mask_up, str):
        raise FormError("image" if isinstance(upload, str) else "mask",
                        "fields 'image' and 'mask' must be file uploads")
    if isinstance(ref_id, str) and not ref_id:
        ref_id = None
    if ref_id is not None and not isinstance(ref_id, str):
        raise FormError("ref_id", "field 'ref_id' must be text (a gallery id)")
    if (upload is None) == (ref_id is None):
        raise FormError("image, ref_id", "give exactly one reference: an uploaded 'image' or a gallery 'ref_id'")
    if ref_id is not None:
        if ref_id not in gallery:
            raise FormError("ref_id", f"no gallery image with id {short_repr(ref_id)}", 404)
        if mask_up is not None:
            raise FormError("mask", "a gallery reference uses its stored mask; do not upload a 'mask'")
        return SearchQuery(text, k, ref_id=ref_id)
    # decoded later, in a worker thread under the concurrency limit (never on the event loop)
    image = await upload.read()
    mask = await mask_up.read() if mask_up is not None else None
    for field, data in (("image", image), ("mask", mask)):
        if data is not None and not data:
            raise FormError(field, f"field '{field}' is an empty file")
    return SearchQuery(text, k, image=image, mask=mask)


def _text(value, max_chars: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise FormError("text", "field 'text' is required: the modification text (e.g. 'make it red')")
    if len(value) > max_chars:
        raise FormError("text", f"field 'text' is {len(value)} characters; the limit is {max_chars}")
    return value


def _k(value, max_k: int) -> int:
    try:
        k = int(value) if isinstance(value, str) and len(value) < 12 else None
    except ValueError:
        k = None
    if k is None or not 1 <= k <= max_k:
        shown = short_repr(value, 20) if isinstance(value, str) else "a file"
        raise FormError("k", f"field 'k' must be a whole number from 1 to {max_k}, got {shown}")
    return k


class _ClosingBoundaryWatch:
    """Wraps ``receive``: notes whether the multipart close delimiter ``--<boundary>--`` went by (python-multipart
    silently drops a last part that is cut short)."""

    def __init__(self, receive, boundary: bytes):
        self.receive = receive
        self.delimiter = b"--" + boundary + b"--"
        self.tail = b""
        self.found = False

    async def __call__(self):
        message = await self.receive()
        if message["type"] == "http.request" and not self.found:
            data = self.tail + message.get("body", b"")
            self.found = self.delimiter in data
            self.tail = data[-(len(self.delimiter) - 1):]
        return message


def parse_gallery_page(offset: str, limit: str) -> tuple[int, int]:
    """``GET /gallery``'s ``offset`` (>= 0) and ``limit`` (1..200), parsed here rather than by FastAPI's
    validation, whose 422 would echo the client's value whole."""
    try:
        offset_n, limit_n = int(offset), int(limit)
    except ValueError:
        raise FormError("offset, limit", f"offset and limit must be whole numbers, got offset={short_repr(offset)} "
                                         f"limit={short_repr(limit)}") from None
    if offset_n < 0 or not 1 <= limit_n <= MAX_PAGE:
        raise FormError("offset, limit", f"offset must be >= 0 and limit between 1 and {MAX_PAGE}")
    return offset_n, limit_n


# ----------------------------------------------------------------------------------------------- uploads


def _claimed_size(data: bytes) -> tuple[int, int] | None:
    """Width and height an image file's header claims, read without PIL's bomb check (nothing is decoded)."""
    from PIL import Image

    Image.init()
    for fmt in UPLOAD_FORMATS:
        factory, accept = Image.OPEN.get(fmt, (None, None))
        if factory is None or (accept is not None and accept(data[:16]) is not True):
            continue
        try:
            return tuple(factory(io.BytesIO(data)).size)
        except Exception:
            continue
    return None


def _too_many_pixels(field: str, size: tuple[int, int] | None, max_pixels: int) -> FormError:
    if size is None:
        return FormError(field, f"field '{field}' has more pixels than the limit of {max_pixels} pixels", 413)
    w, h = size
    return FormError(field, f"field '{field}' is {w}x{h} = {w * h} pixels; the limit is {max_pixels} pixels", 413)


def decode_upload(data: bytes, field: str, max_pixels: int, mode: str = "RGB"):
    """Bytes of an uploaded file -> PIL image; a FormError otherwise (415 not an image, 413 too many pixels,
    checked from the header before anything is decoded)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise FormError(field, f"field '{field}' is an empty file")
    try:
        im = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except UnidentifiedImageError:
        raise FormError(field, f"field '{field}' is not an image this service can read (PNG, JPEG, WebP, ...)",
                        415) from None
    except Image.DecompressionBombError:  # PIL's own, larger limit; report the service's
        raise _too_many_pixels(field, _claimed_size(data), max_pixels) from None
    except Exception as exc:
        raise FormError(field, f"field '{field}' could not be read as an image: {public_message(str(exc))}",
                        415) from None
    if im.size[0] * im.size[1] > max_pixels:
        raise _too_many_pixels(field, im.size, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
            return im.convert(mode)
    except Exception as exc:
        raise FormError(field, f"field '{field}' could not be decoded as an image: {public_message(str(exc))}",
                        415) from None
