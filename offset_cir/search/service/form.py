"""What clients send, checked: the ``POST /search`` form turned into a :class:`SearchQuery` (and the reference form
of ``POST /suggest-mask``), which mask a query uses (:func:`choose_mask_mode`), uploaded images decoded under the
pixel limit, the gallery's paging parameters, and the forms as OpenAPI documents them. Every refusal is a
:class:`FormError` naming the field.

Status codes: 422 a missing, repeated or malformed field (or a mask the request cannot have), 404 a ``ref_id`` the
gallery does not have, 400 a malformed multipart body, 413 an image over the pixel limit, 415 a body that is not a
form or an upload that is not an image. Messages quote at most 80 characters of any client string and no server path.
"""
from __future__ import annotations

import dataclasses
import re
import unicodedata
from typing import Container

from fastapi import HTTPException

from offset_cir.search.inputs import short_repr
from offset_cir.search.query_mask import MASK_MODES
from offset_cir.search.service.guards import public_message
from offset_cir.search.service.state import ServiceLimits

#: the fields of the search form
FIELDS = ("text", "k", "image", "mask", "ref_id", "mask_mode")
#: the fields of the reference form (``POST /suggest-mask``)
REFERENCE_FIELDS = ("image", "ref_id")
#: image formats accepted from clients (PIL would otherwise also try e.g. EPS, which runs Ghostscript)
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
#: form parser bounds: files, fields, bytes of one non-file part
MAX_FILES, MAX_FIELDS, MAX_PART_SIZE = 2, 8, 64 * 1024
#: most gallery entries one page may ask for, and a page's entries when it does not say
MAX_PAGE, GALLERY_PAGE = 200, 24
#: Unicode categories of the characters a text needs one of: letters, numbers, punctuation, symbols (not only
#: spaces, controls, format characters such as zero-width spaces, or marks)
VISIBLE_CATEGORIES = ("L", "N", "P", "S")


class FormError(HTTPException):
    """A refused request, about ``field`` (None: the body as a whole); answered with ``status`` and ``detail``."""

    def __init__(self, field: str | None, detail: str, status: int = 422, headers: dict | None = None):
        super().__init__(status, detail, headers=headers)
        self.field = field


@dataclasses.dataclass(frozen=True)
class SearchQuery:
    """A validated search request: the text, k, one reference (a gallery ``ref_id`` or an uploaded ``image``,
    still undecoded), an optional uploaded ``mask`` (for either reference) and the ``mask_mode`` asked for (None:
    the server chooses, :func:`choose_mask_mode`)."""

    text: str
    k: int
    ref_id: str | None = None
    image: bytes | None = None
    mask: bytes | None = None
    mask_mode: str | None = None


# ----------------------------------------------------------------------------------------------- the form


async def read_search_form(request, limits: ServiceLimits, gallery: Container[str]) -> SearchQuery:
    """The search form of ``request`` (multipart or urlencoded), checked field by field; ``gallery`` holds the
    ids a ``ref_id`` may name."""
    form = await _read_form(request, "fields text, k, image [, mask] or ref_id")
    try:
        return await parse_search_fields(form, limits, gallery)
    finally:
        await form.close()


async def read_reference_form(request, limits: ServiceLimits, gallery: Container[str]) -> SearchQuery:
    """The form of ``POST /suggest-mask`` (one reference: ``image`` or ``ref_id``) as a :class:`SearchQuery`
    without text."""
    form = await _read_form(request, "field image or ref_id")
    try:
        values = _single_values(form, REFERENCE_FIELDS)
        ref_id, image = await _reference(values, gallery)
        return SearchQuery("", 0, ref_id=ref_id, image=image)
    finally:
        await form.close()


async def _read_form(request, expected: str):
    """The parsed form of ``request``; a FormError for a body that is not a form, a multipart body cut short, or a
    part whose headers are over the parser's limit (naming the part's field)."""
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import Request

    ctype = request.headers.get("content-type", "")
    if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        raise FormError(None, f"send the query as multipart/form-data ({expected})", 415)
    watch = None
    if ctype.startswith("multipart/form-data"):
        from python_multipart.multipart import parse_options_header

        boundary = parse_options_header(ctype)[1].get(b"boundary")
        if not boundary:
            raise FormError(None, "malformed multipart body: the Content-Type names no boundary", 400)
        watch = _MultipartWatch(request.receive, boundary)
        request = Request(request.scope, watch)
    try:
        form = await request.form(max_files=MAX_FILES, max_fields=MAX_FIELDS, max_part_size=MAX_PART_SIZE)
    except StarletteHTTPException as exc:
        if watch is not None and _header_overflow(exc):
            raise await watch.header_overflow_error() from None
        raise
    if watch is not None and not watch.found:
        await form.close()
        raise FormError(None, "malformed multipart body: it ends before its closing boundary (the request was "
                              "cut short)", 400)
    return form


def _header_overflow(exc) -> bool:
    """Whether Starlette's 400 comes from python-multipart's limit on the size of one part header."""
    cause = getattr(exc.__context__, "__cause__", None)
    return cause is not None and "header size" in str(cause).lower()


def _single_values(form, allowed: tuple[str, ...]) -> dict:
    """The form's fields as a dict, refusing unknown and repeated fields (a repeated field would silently take
    one of its values)."""
    items = list(form.multi_items())
    unknown = sorted({k for k, _ in items} - set(allowed))
    if unknown:
        names = ", ".join(short_repr(u, 40) for u in unknown[:5])
        raise FormError(names, f"unknown field(s) {names}; expected {', '.join(allowed)}")
    seen: dict = {}
    for key, value in items:
        if key in seen:
            count = sum(1 for k, _ in items if k == key)
            raise FormError(key, f"field {key!r} was sent {count} times; send it once")
        seen[key] = value
    return seen


async def parse_search_fields(form, limits: ServiceLimits, gallery: Container[str]) -> SearchQuery:
    """A parsed form (``multi_items()``; uploads have an async ``read()``) -> :class:`SearchQuery`."""
    values = _single_values(form, FIELDS)
    text = _text(values.get("text"), limits.max_text_chars)
    k = _k(values.get("k", "10"), limits.max_k)
    mode = values.get("mask_mode")
    if mode is not None and not isinstance(mode, str):
        raise FormError("mask_mode", f"field 'mask_mode' must be text: one of {', '.join(MASK_MODES)}")
    mask_up = values.get("mask")
    if isinstance(mask_up, str):
        raise FormError("mask", "fields 'image' and 'mask' must be file uploads")
    ref_id, image = await _reference(values, gallery)
    mask = await mask_up.read() if mask_up is not None else None
    if mask is not None and not mask:
        raise FormError("mask", "field 'mask' is an empty file")
    return SearchQuery(text, k, ref_id=ref_id, image=image, mask=mask, mask_mode=mode or None)


async def _reference(values: dict, gallery: Container[str]) -> tuple[str | None, bytes | None]:
    """(ref_id, image bytes) of a form: exactly one of a known gallery id and a non-empty uploaded file."""
    upload, ref_id = values.get("image"), values.get("ref_id")
    if isinstance(upload, str):
        raise FormError("image", "fields 'image' and 'mask' must be file uploads")
    if isinstance(ref_id, str) and not ref_id:
        ref_id = None
    if ref_id is not None and not isinstance(ref_id, str):
        raise FormError("ref_id", "field 'ref_id' must be text (a gallery id)")
    if (upload is None) == (ref_id is None):
        raise FormError("image, ref_id", "give exactly one reference: an uploaded 'image' or a gallery 'ref_id'")
    if ref_id is not None:
        if ref_id not in gallery:
            raise FormError("ref_id", f"no gallery image with id {short_repr(ref_id)}", 404)
        return ref_id, None
    # decoded later, in a worker thread under the concurrency limit (never on the event loop)
    image = await upload.read()
    if not image:
        raise FormError("image", "field 'image' is an empty file")
    return None, image


def has_visible_text(text: str) -> bool:
    """Whether ``text`` has a letter, number, punctuation mark or symbol (not only spaces, zero-width or other
    format characters, controls or combining marks)."""
    return any(unicodedata.category(c)[0] in VISIBLE_CATEGORIES for c in text)


def _text(value, max_chars: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise FormError("text", "field 'text' is required: the modification text (e.g. 'make it red')")
    if len(value) > max_chars:
        raise FormError("text", f"field 'text' is {len(value)} characters; the limit is {max_chars}")
    if not has_visible_text(value):
        raise FormError("text", "field 'text' has no visible character (only spaces, zero-width or other "
                                "invisible characters): say what should change (e.g. 'make it red')")
    return value


def _k(value, max_k: int) -> int:
    """``k``: ASCII digits only (``int()`` would also take ``" 5 "``, ``"1_0"`` and other scripts' digits)."""
    k = int(value) if isinstance(value, str) and re.fullmatch(r"[0-9]{1,11}", value) else None
    if k is None or not 1 <= k <= max_k:
        shown = short_repr(value, 20) if isinstance(value, str) else "a file"
        raise FormError("k", f"field 'k' must be a whole number from 1 to {max_k} in the digits 0-9, got {shown}")
    return k


def choose_mask_mode(query: SearchQuery, offered: tuple[str, ...], stored: bool) -> str:
    """Which mask ``query`` uses, given the ``mask_mode`` values this server ``offers`` (none: the model uses no
    mask, "none") and whether its gallery reference has a ``stored`` mask. Without ``mask_mode`` the request
    implies one: an uploaded mask, else a gallery reference's stored mask, else the mask pipeline's; where none
    fits, a 422 listing the modes offered. A ``mask_mode`` the request cannot have is refused the same way."""
    mode = query.mask_mode
    if mode is not None and mode not in MASK_MODES:
        raise FormError("mask_mode", f"field 'mask_mode' is {short_repr(mode, 20)}; {_offer(offered)}")
    if not offered:
        return "none"
    if mode is None:
        if query.mask is not None:
            return "uploaded"
        if query.ref_id is not None and stored:
            return "stored"
        if "generated" in offered:
            return "generated"
        raise FormError("mask_mode", "this model needs a mask of the reference (white = the part that matters) "
                                     f"and the request gives none: send one as 'mask', or choose how the server "
                                     f"makes it with 'mask_mode'; {_offer(offered)}")
    if mode not in offered:
        raise FormError("mask_mode", f"mask_mode {mode!r} is not offered by this server; {_offer(offered)}")
    if (mode == "uploaded") != (query.mask is not None):
        raise FormError("mask", "mask_mode 'uploaded' needs a 'mask' file" if mode == "uploaded" else
                                f"mask_mode {mode!r} makes the mask on the server: send no 'mask' (or use "
                                f"mask_mode 'uploaded')")
    if mode == "stored" and query.ref_id is None:
        raise FormError("mask_mode", f"mask_mode 'stored' uses a gallery reference's mask: give 'ref_id' (or "
                                     f"choose another mode); {_offer(offered)}")
    if mode == "stored" and not stored:
        raise FormError("mask_mode", f"gallery image {short_repr(query.ref_id)} has no stored mask; "
                                     f"{_offer(offered)}")
    return mode


def _offer(offered: tuple[str, ...]) -> str:
    if not offered:
        return "this server's model uses no mask: leave 'mask_mode' out"
    return "this server offers mask_mode " + ", ".join(offered)


class _MultipartWatch:
    """Wraps ``receive``: notes whether the multipart close delimiter ``--<boundary>--`` went by (python-multipart
    silently drops a last part that is cut short), and keeps the latest body bytes to name the part whose headers
    overflow the parser's limit."""

    def __init__(self, receive, boundary: bytes):
        from python_multipart.multipart import DEFAULT_MAX_HEADER_SIZE

        self.receive = receive
        self.boundary = boundary
        self.delimiter = b"--" + boundary + b"--"
        self.header_limit = DEFAULT_MAX_HEADER_SIZE
        self.tail = b""
        self.found = False
        self.previous, self.current = b"", b""
        self.more = True

    async def __call__(self):
        message = await self.receive()
        if message["type"] == "http.request":
            body = message.get("body", b"")
            self.more = message.get("more_body", False)
            keep = 2 * self.header_limit
            self.previous = (self.previous[-keep:] + self.current[-keep:])[-keep:]
            self.current = body
            if not self.found:
                data = self.tail + body
                self.found = self.delimiter in data
                self.tail = data[-(len(self.delimiter) - 1):]
        return message

    async def header_overflow_error(self) -> FormError:
        """The refusal of a part whose header lines are longer than python-multipart takes, naming its field (the
        rest of its name is read from the body still to come, at most ``16 * header_limit`` bytes more)."""
        limit = self.header_limit
        data = self.previous + self.current
        found = self._long_header(data)
        while found is not None and not found[1] and self.more and len(data) < 32 * limit:
            message = await self.receive()
            data += message.get("body", b"")
            self.more = message["type"] == "http.request" and message.get("more_body", False)
            found = self._long_header(data)
        if found is None:
            return FormError(None, f"malformed multipart body: a part's header is longer than {limit} bytes")
        shown = short_repr(found[0].decode("utf-8", "replace"), 40)
        return FormError(shown, f"field name {shown} is too long: the headers of one part (its field name "
                                f"included) may be at most {limit} bytes; expected {', '.join(FIELDS)}")

    def _long_header(self, data: bytes) -> tuple[bytes, bool] | None:
        """The field name of the first part in ``data`` with a header line over the limit, and whether the name is
        complete in ``data`` (its closing quote seen); None when no such part names its field."""
        for m in re.finditer(re.escape(b"--" + self.boundary) + rb"\r\n", data):
            block = data[m.end():]
            end = block.find(b"\r\n\r\n")
            block = block if end < 0 else block[:end]
            if max(map(len, block.split(b"\r\n"))) <= self.header_limit:
                continue
            name = re.search(rb'[;\s]name="([^"\r\n]*)("?)', block)
            return (name.group(1), bool(name.group(2))) if name else None
        return None


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


# ----------------------------------------------------------------------------------------------- OpenAPI


#: the media types of the uploads a form reads (one per :data:`UPLOAD_FORMATS`)
UPLOAD_MEDIA_TYPES = ", ".join(f"image/{f.lower()}" for f in UPLOAD_FORMATS)
#: a form's one reference: an uploaded ``image`` (``ref_id`` absent or empty) or a gallery ``ref_id`` (no image)
_ONE_REFERENCE = [
    {"title": "an uploaded reference", "required": ["image"], "properties": {"ref_id": {"maxLength": 0}}},
    {"title": "a gallery reference", "required": ["ref_id"], "properties": {"ref_id": {"minLength": 1},
                                                                          "image": False}},
]


def _form_body(properties: dict, required: list[str]) -> dict:
    """An OpenAPI ``requestBody`` for a form with one reference, sent as multipart (uploads) or urlencoded (a
    gallery reference)."""
    schema = {"type": "object", "properties": properties, "required": required, "oneOf": _ONE_REFERENCE,
              "additionalProperties": False}
    uploads = [k for k, v in properties.items() if v.get("format") == "binary"]
    texts = {k: v for k, v in properties.items() if k not in uploads}
    plain = {"type": "object", "properties": {**texts, "ref_id": {**texts["ref_id"], "minLength": 1}},
             "required": required + ["ref_id"], "additionalProperties": False}
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": schema, "encoding": {k: {"contentType": UPLOAD_MEDIA_TYPES}
                                                               for k in uploads}},
        "application/x-www-form-urlencoded": {"schema": plain}}}}


def _reference_properties() -> dict:
    return {
        "image": {"type": "string", "format": "binary", "minLength": 1, "description": "the reference photo (PNG, "
                  "JPEG, WebP, GIF, BMP or TIFF; turned upright by its EXIF orientation); or give ref_id"},
        "ref_id": {"type": "string", "description": "a gallery image id as the reference; or give image (an empty "
                   "ref_id counts as none)"},
    }


def gallery_page_openapi() -> dict:
    """``openapi_extra`` of ``GET /gallery``: its query parameters (read by :func:`parse_gallery_page`)."""
    return {"parameters": [
        {"name": "offset", "in": "query", "required": False, "description": "the first image's position",
         "schema": {"type": "integer", "minimum": 0, "default": 0}},
        {"name": "limit", "in": "query", "required": False, "description": "images on the page at most",
         "schema": {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": GALLERY_PAGE}}]}


def search_form_openapi(limits: ServiceLimits, offered: tuple[str, ...]) -> dict:
    """``openapi_extra`` of ``POST /search``: the form's fields with this app's limits and mask modes."""
    props = {
        "text": {"type": "string", "minLength": 1, "maxLength": limits.max_text_chars,
                 "description": "the modification text; needs a visible character (not only spaces or zero-width "
                                "characters)"},
        "k": {"type": "integer", "minimum": 1, "maximum": limits.max_k, "default": 10,
              "description": "number of results, written in the digits 0-9 only"},
        **_reference_properties(),
        "mask": {"type": "string", "format": "binary", "minLength": 1,
                 "description": "grayscale mask of the reference at its own pixel size, white = the part that "
                                "matters; with ref_id it replaces the stored mask"},
        "mask_mode": {"type": "string", "enum": list(MASK_MODES),
                      "description": "which mask the query uses; this server offers: "
                                     + (", ".join(offered) or "none (its model uses no mask)")
                                     + ". Left out: the mask sent, else a gallery reference's stored mask, else "
                                       "the mask pipeline's; 422 listing the modes where none fits"},
    }
    return _form_body(props, ["text"])


def reference_form_openapi() -> dict:
    """``openapi_extra`` of ``POST /suggest-mask``: one reference."""
    return _form_body(_reference_properties(), [])


# ----------------------------------------------------------------------------------------------- uploads


def _too_many_pixels(field: str, size: tuple[int, int] | None, max_pixels: int) -> FormError:
    if size is None:
        return FormError(field, f"field '{field}' has more pixels than the limit of {max_pixels} pixels", 413)
    w, h = size
    return FormError(field, f"field '{field}' is {w}x{h} = {w * h} pixels; the limit is {max_pixels} pixels", 413)


def decode_upload(data: bytes, field: str, max_pixels: int, mode: str = "RGB"):
    """Bytes of an uploaded file -> PIL image, turned upright by its EXIF orientation (as browsers show it, so a
    mask painted over it fits); a FormError otherwise (415 not an image, 413 too many pixels, checked from the
    header before anything is decoded)."""
    from offset_cir.images import ImageReadError, ImageTooLargeError, read_image

    if not data:
        raise FormError(field, f"field '{field}' is an empty file")
    try:
        return read_image(data, mode, what=f"field '{field}'", max_pixels=max_pixels, formats=UPLOAD_FORMATS,
                          upright=True)
    except ImageTooLargeError as exc:
        raise _too_many_pixels(field, exc.size, max_pixels) from None
    except ImageReadError as exc:
        raise FormError(field, f"field '{field}' is not an image this service can read "
                               f"({', '.join(UPLOAD_FORMATS)}): {public_message(exc.reason)}", 415) from None
