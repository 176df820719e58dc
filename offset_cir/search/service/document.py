"""The service's OpenAPI document (``GET /openapi.json``): its JSON answers as pydantic models, the answers every
route may give besides its own, and the assembly of the document (:func:`openapi_document`).

The routes declare their answers with these models (``response_model``), so an answer that strays from the document
fails loudly in the tests instead of reaching a client. Answers the application and the server give to any request
(a refused ``Host``, a request that is not valid HTTP, a late head or body, a body over the limit, the connection
and request caps, an unexpected error) are in :data:`EVERY_ROUTE`; the security headers are documented on every
answer. No documentation page is served: Swagger UI and ReDoc load their scripts from a CDN, which the service's
Content-Security-Policy forbids (docs/search.md, "OpenAPI").
"""
from __future__ import annotations

import mimetypes
import warnings
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from offset_cir.masks.layout import IMAGE_EXTENSIONS
from offset_cir.search.query_mask import MASK_MODES

#: what the document says of the service as a whole
DESCRIPTION = (
    "Composed image retrieval over a read-only gallery index: a reference image (uploaded, or a gallery id), a mask "
    "of its part that matters and a modification text find gallery images.\n\n"
    "Every answer carries the security headers documented on it. A method a path does not list is answered 405 "
    "(`Allow` names the methods it has), an unknown path 404, both as `{\"detail\"}`; a path with a slash added is "
    "redirected (307) to the path without. Messages never contain a server path and quote at most 80 characters of "
    "any client string. Load, robustness and security rules: docs/search.md.")


class _Answer(BaseModel):
    """An answer's JSON object: exactly these keys (a key the document does not name is an error)."""

    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------------------------- refusals


class Refusal(_Answer):
    """A refused request, or an error: what was wrong, for a person."""

    detail: str = Field(description="the reason, for a person (no server path; at most 80 characters of any "
                                    "client string)")
    field: str | None = Field(None, description="in refusals of a form: the field the message is about, null for "
                                                "the body as a whole (see FormRefusal); absent from the refusals "
                                                "of the guards and the server")


class FormRefusal(_Answer):
    """A refused form or parameter: the reason and the field it is about."""

    detail: str = Field(description="the reason, naming the field and what was expected")
    field: str | None = Field(description="the field the message is about (several: comma-separated); null: the "
                                          "body as a whole")


# ----------------------------------------------------------------------------------------------- POST /search


class MaskUsed(_Answer):
    """The mask a query was searched with, as the server counted it."""

    mode: Literal[MASK_MODES + ("none",)] = Field(description="how the mask was made (`none`: the model uses no "
                                                              "mask)")
    coverage: float | None = Field(ge=0.0, le=1.0, description="the fraction of dominant pixels (level >= 128); "
                                                               "null for mode none")
    box: Annotated[list[int], Field(min_length=4, max_length=4)] | None = Field(
        description="[x0, y0, x1, y1] around the dominant pixels, in the reference's pixels, x1 and y1 exclusive; "
                    "null when no pixel is dominant, and for mode none")
    size: Annotated[list[int], Field(min_length=2, max_length=2)] | None = Field(
        description="[width, height] of the reference (and its mask); null for mode none")


class UploadReference(_Answer):
    """The reference was the uploaded ``image``."""

    kind: Literal["upload"]


class GalleryReference(_Answer):
    """The reference was a gallery image (``ref_id``)."""

    kind: Literal["gallery"]
    id: str = Field(description="its gallery id")
    url: str = Field(description="GET it here")
    mask_url: str = Field(None, description="its stored mask (GET); absent when it has none")


class QueryEcho(_Answer):
    """The query as the server understood it."""

    text: str
    k: int = Field(ge=1)
    reference: Union[UploadReference, GalleryReference] = Field(discriminator="kind")
    mask: MaskUsed


class SearchResult(_Answer):
    """One gallery image found."""

    rank: int = Field(ge=1, description="1 for the best")
    id: str = Field(description="its gallery id")
    score: float = Field(description="the cosine of the query's and the image's features (higher is better)")
    url: str = Field(description="the image (GET)")
    mask_url: str | None = Field(description="its stored mask (GET); null when it has none")


class SearchAnswer(_Answer):
    """``POST /search``: the query as understood and the gallery images found, best first (at most ``k``)."""

    query: QueryEcho
    results: list[SearchResult]
    took_ms: float = Field(ge=0.0, description="milliseconds the server took, from the form read to the ranking")


# ----------------------------------------------------------------------------------------------- GET /gallery


class GalleryImage(_Answer):
    """One gallery image."""

    id: str
    url: str = Field(description="the image (GET)")
    has_mask: bool = Field(description="whether it has a stored mask")
    mask_url: str | None = Field(description="its stored mask (GET); null when it has none")


class GalleryPage(_Answer):
    """``GET /gallery``: one page of the gallery's images, in the index's order."""

    total: int = Field(ge=0, description="images in the gallery")
    offset: int = Field(ge=0, description="the first image's position")
    images: list[GalleryImage]


# ----------------------------------------------------------------------------------------------- GET /health


class Precision(_Answer):
    """The precision the query encoder runs in, and why."""

    precision: Literal["fp32", "bf16"] = Field(description="what runs")
    requested: Literal["fp32", "bf16", "auto"] = Field(description="what was asked (`offset serve --precision`)")
    reason: str = Field(description="why, in words")
    fp32_seconds: float | None = Field(description="seconds of one calibration pass in fp32; null: not measured")
    bf16_seconds: float | None = Field(description="seconds of one calibration pass in bf16; null: not measured")
    cosine: float | None = Field(description="the lowest cosine of bf16 with fp32 features in the calibration; "
                                             "null: not measured")


class Limits(_Answer):
    """The limits this server enforces (``offset serve``'s flags)."""

    max_upload_bytes: int = Field(ge=1, description="largest request body (413 beyond)")
    max_pixels: int = Field(ge=1, description="largest uploaded image in pixels (413 beyond)")
    max_k: int = Field(ge=1, description="most results one search may ask for")
    max_text_chars: int = Field(ge=1, description="longest modification text in characters")
    max_concurrency: int = Field(ge=1, description="searches running at once")
    queue_timeout_s: float = Field(description="seconds a search may wait for a slot (503 beyond)")
    body_timeout_s: float | None = Field(description="seconds for a request body to arrive (408 beyond); null: "
                                                     "no deadline")
    max_batch: int = Field(ge=1, description="queries encoded together in one model call at most")
    batch_wait_ms: float = Field(ge=0.0, description="milliseconds the encoder waits for queries on their way")


class Baseline(_Answer):
    """The training-free baseline queries are encoded with: the backbone's own features, no trained modules."""

    mode: Literal["image", "text", "image+text"] = Field(description="what a query is scored by")
    backbone: str | None = Field(description="the backbone's name (null when `checkpoint` gives it)")
    pretrained: str | None = Field(description="its weights: an OpenCLIP tag, a local file, `packaged`, or null")
    checkpoint: str | None = Field(description="a checkpoint whose backbone is used, or null")
    seed: int = Field(description="the seed of the backbone's new projections, where it has any")


class Health(_Answer):
    """``GET /health``: what this server serves and how."""

    status: Literal["ok"]
    images: int = Field(ge=0, description="images in the gallery")
    dim: int = Field(ge=1, description="feature width")
    search: str = Field(description="the search engine (`exact`, or the approximate index's kind)")
    checkpoint_hash: str | None = Field(description="the served checkpoint's content hash (`sha256:<hex>`)")
    uses_masks: bool = Field(description="whether a query needs a mask of its reference")
    # the wire key is needs_masks (an older name of uses_masks); the Python name says what it is
    uses_masks_older_key: bool = Field(alias="needs_masks",
                                       description="the same as uses_masks, for clients that read this name")
    mask_pipeline: bool = Field(description="whether the server can make masks (mask_mode generated, "
                                            "POST /suggest-mask)")
    mask_modes: list[Literal[MASK_MODES]] = Field(description="the mask_mode values this server offers (none for "
                                                              "a model without masks)")
    read_only: Literal[True] = Field(description="the index is never written to")
    runtime: str = Field(description="what encodes queries (`torch`, `onnx`)")
    precision: Precision
    baseline: Baseline | None = Field(description="the training-free baseline served (an index built with "
                                                  "`offset index --baseline`), or null for a trained model")
    limits: Limits


# ----------------------------------------------------------------------------------------------- answers


def _refusal(description: str, model=Refusal, retry: bool = False) -> dict:
    answer = {"description": description, "model": model}
    if retry:
        answer["headers"] = {"Retry-After": {"description": "seconds to wait before trying again", "required": True,
                                             "schema": {"type": "integer", "minimum": 0}}}
    return answer


#: the answers any route may give: the guards' (Host check, body limit, request accounting) and the server's own
EVERY_ROUTE = {
    400: _refusal("the `Host` header names no host this server answers to (`--allowed-host`), or the request is not "
                  "valid HTTP/1.1 (answered by the server, quoting the parser's reason)"),
    408: _refusal("the request head did not arrive within `--header-timeout`, or its body not within "
                  "`--body-timeout`; the connection is closed"),
    413: _refusal("the request body is larger than `--max-upload-mb` (refused from its Content-Length, or while "
                  "it streams in)"),
    431: _refusal("the request head is too large (answered by the server)"),
    500: _refusal("an unexpected error; the server log has the details"),
    501: _refusal("a transfer coding other than chunked (answered by the server)"),
    503: _refusal("the server is at its limit of open connections or of requests in progress", retry=True),
}


def form_answers() -> dict:
    """The refusals of a form route (``POST /search``, ``POST /suggest-mask``) beyond :data:`EVERY_ROUTE`."""
    return {
        400: _refusal("a malformed multipart body (no boundary, cut short before its closing boundary, a part's "
                      "header over the parser's limit; `field` null or the part's name), more files or fields than "
                      "the form has, a refused `Host`, or a request that is not valid HTTP/1.1"),
        404: _refusal("`ref_id` names no gallery image (with `field`), or its file is no longer on disk"),
        413: _refusal("the request body is larger than `--max-upload-mb`, or an uploaded image has more pixels "
                      "than `--max-pixels` (with `field`; read from its header, before decoding)"),
        415: _refusal("the body is not a form (`field` null), or an upload is not an image this service reads "
                      "(PNG, JPEG, WebP, GIF, BMP, TIFF)", FormRefusal),
        422: _refusal("a missing, repeated, unknown or malformed field, a mask the request cannot have (the field "
                      "named; the modes this server offers listed), or a gallery reference the server cannot read",
                      FormRefusal),
        503: _refusal("no search slot within `--queue-timeout`, or the server is at its limit of open connections "
                      "or of requests in progress", retry=True),
    }


def image_answer(what: str) -> dict:
    """The 200 of a route that serves a gallery file: its media type is the file's."""
    types = sorted({mimetypes.guess_type("x" + ext)[0] for ext in IMAGE_EXTENSIONS} - {None})
    return {200: {"description": what, "content": {t: {"schema": {"type": "string", "format": "binary"}}
                                                   for t in types}},
            404: _refusal("no gallery image has this id, or its file is no longer on disk")}


# ----------------------------------------------------------------------------------------------- the document

#: the security headers every answer carries (``guards.security_headers``), as the document describes them
SECURITY_HEADERS = {
    "Content-Security-Policy": "`default-src 'none'`; the page's inline script and style allowed by their sha256",
    "X-Frame-Options": "`DENY`",
    "X-Content-Type-Options": "`nosniff`",
    "Referrer-Policy": "`no-referrer`",
}


def unique_id(route) -> str:
    """A route's name as its operations' id (:func:`openapi_document` prefixes each with its method)."""
    return route.name


def openapi_document(app) -> dict:
    """The OpenAPI document of ``app`` (built once, then cached on it): FastAPI's, with each operation's id
    ``<method>_<route name>`` (a route that answers GET and HEAD has two operations), the security headers on every
    answer, and FastAPI's validation error (documented wherever a route has parameters) as this app answers it:
    a :class:`FormRefusal` (``app._invalid_request``)."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema is not None:
        return app.openapi_schema
    with warnings.catch_warnings():  # GET and HEAD of one route share its id until the loop below tells them apart
        warnings.filterwarnings("ignore", message="Duplicate Operation ID", category=UserWarning)
        doc = get_openapi(title=app.title, version=app.version, openapi_version=app.openapi_version,
                          description=DESCRIPTION, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    fastapi_invalid = "#/components/schemas/HTTPValidationError"
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    doc["components"]["headers"] = {name: {"description": text, "required": True, "schema": {"type": "string"}}
                                    for name, text in SECURITY_HEADERS.items()}
    for operations in doc["paths"].values():
        for method, operation in operations.items():
            operation["operationId"] = f"{method}_{operation['operationId']}"
            for answer in operation["responses"].values():
                json_body = answer.get("content", {}).get("application/json", {})
                if json_body.get("schema", {}).get("$ref") == fastapi_invalid:
                    json_body["schema"] = {"$ref": "#/components/schemas/FormRefusal"}
                    answer["description"] = "a parameter that could not be read (the field named)"
                answer.setdefault("headers", {}).update(
                    {name: {"$ref": f"#/components/headers/{name}"} for name in SECURITY_HEADERS})
    app.openapi_schema = doc
    return doc
