"""The service's routes: ``POST /search``, ``POST /suggest-mask``, ``GET /images/{id}``, ``GET /masks/{id}``,
``GET /gallery``, ``GET /health``, ``GET /metrics`` and ``GET /`` (the page). Each reads the app's
:class:`~offset_cir.search.service.state.Service`.

``/images/{id}`` and ``/masks/{id}`` serve gallery images and their stored masks by id only: no client string ever
becomes a file path. A search (and a suggested mask) decodes uploads, makes the mask and encodes its query in a
worker thread, under the concurrency cap (``SearchSlots``). Refused forms answer ``{"detail", "field"}``.
"""
from __future__ import annotations

import io
import time
import urllib.parse
import weakref
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, Response

from offset_cir.errors import UserInputError
from offset_cir.search.inputs import load_pil, short_repr
from offset_cir.search.query_mask import QueryMask, offered_mask_modes, query_mask
from offset_cir.search.service.document import (
    FormRefusal,
    GalleryPage,
    Health,
    SearchAnswer,
    form_answers,
    image_answer,
)
from offset_cir.search.service.form import (
    GALLERY_PAGE,
    FormError,
    SearchQuery,
    choose_mask_mode,
    decode_upload,
    gallery_page_openapi,
    parse_gallery_page,
    read_reference_form,
    read_search_form,
    reference_form_openapi,
    search_form_openapi,
)
from offset_cir.search.service.state import Service, service_of

#: the methods of the routes that only read: HEAD is answered as GET without the body (monitors probe with HEAD)
READ = ["GET", "HEAD"]


def add_routes(app: FastAPI) -> None:
    """The routes, on ``app`` itself (so each is matched, and counted in the metrics, by its own template), with
    the answers the OpenAPI document gives them (``document``)."""
    svc = app.state.service
    app.add_api_route("/", home, methods=READ, response_class=HTMLResponse, summary="The web page")
    app.add_api_route("/favicon.ico", favicon, methods=READ, status_code=204, response_class=Response,
                      summary="No icon")
    app.add_api_route("/health", health, methods=READ, response_model=Health, summary="What this server serves")
    app.add_api_route("/metrics", metrics_page, methods=READ, response_class=PlainTextResponse,
                      summary="Prometheus metrics (text format)")
    app.add_api_route("/gallery", gallery, methods=READ, response_model=GalleryPage, summary="The gallery, paged",
                      openapi_extra=gallery_page_openapi(),
                      responses={422: {"description": "offset or limit out of range or not a whole number",
                                       "model": FormRefusal}})
    app.add_api_route("/images/{image_id:path}", image, methods=READ, response_class=Response,
                      summary="A gallery image, by id", responses=image_answer("the image file"))
    app.add_api_route("/masks/{image_id:path}", stored_mask, methods=READ, response_class=Response,
                      summary="A gallery image's stored mask, by id",
                      responses=image_answer("the mask file (grayscale, the image's size)"))
    app.add_api_route("/search", search, methods=["POST"], response_model=SearchAnswer,
                      response_model_exclude_unset=True, summary="Search the gallery", responses=form_answers(),
                      openapi_extra=search_form_openapi(svc.limits, mask_modes(svc.index)))
    app.add_api_route("/suggest-mask", suggest_mask, methods=["POST"], openapi_extra=reference_form_openapi(),
                      response_class=Response, summary="The mask pipeline's mask for a reference",
                      responses={200: {"description": "the mask, grayscale, the reference's size",
                                       "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
                                 **form_answers()})
    app.add_exception_handler(FormError, form_error_answer)


def image_url(image_id: str) -> str:
    """The URL of a gallery image (``GET /images/{id}``)."""
    return "/images/" + urllib.parse.quote(image_id, safe="/")


def mask_url(image_id: str) -> str:
    """The URL of a gallery image's stored mask (``GET /masks/{id}``)."""
    return "/masks/" + urllib.parse.quote(image_id, safe="/")


async def home(request: Request):
    return HTMLResponse(service_of(request).page, headers={"Cache-Control": "no-store"})


async def favicon(request: Request):
    """No icon: 204, so that a browser's request for one is answered without a console error."""
    return Response(status_code=204, headers={"Cache-Control": "max-age=86400"})


async def health(request: Request):
    svc = service_of(request)
    index = svc.index
    uses_mask = index.uses_query_mask
    return {"status": "ok", "images": len(index), "dim": index.manifest["dim"],
            "search": index.manifest.get("search", {}).get("kind", "exact"),
            "checkpoint_hash": index.manifest["checkpoint"]["hash"],
            "baseline": index.baseline,  # the training-free baseline queries use (mode, backbone ...), or null
            # whether a query needs a mask; "needs_masks" is the same, for clients that read that name
            "uses_masks": uses_mask, "needs_masks": uses_mask,
            "mask_pipeline": index.mask_generator is not None, "mask_modes": list(mask_modes(index)), "read_only": True,
            "runtime": getattr(index.model, "runtime", "torch"), "precision": precision_json(index),
            "limits": svc.limits.to_json()}


def precision_json(index) -> dict:
    """``/health``'s ``precision``: what the query encoder runs in, why, and the calibration's measures."""
    if index.precision is not None:
        return index.precision.to_json()
    return {"precision": "fp32", "requested": "fp32", "reason": "the model as given", "fp32_seconds": None,
            "bf16_seconds": None, "cosine": None}


async def metrics_page(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(service_of(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def gallery(request: Request):
    index = service_of(request).index
    start, count = parse_gallery_page(request.query_params.get("offset", "0"),
                                      request.query_params.get("limit", str(GALLERY_PAGE)))
    return {"total": len(index), "offset": start,
            "images": [{"id": it["id"], "url": image_url(it["id"]), "has_mask": bool(it.get("mask")),
                        "mask_url": mask_url(it["id"]) if it.get("mask") else None}
                       for it in index.items[start:start + count]]}


class WholeFile(FileResponse):
    """A gallery file, always whole: a ``Range`` header is ignored (200 with the file; Starlette would otherwise
    answer 206, a 416, or a plain-text 400 for a malformed range, none of them one of this service's answers)."""

    def __init__(self, path):
        super().__init__(path, headers={"Cache-Control": "max-age=3600", "Accept-Ranges": "none"})

    async def __call__(self, scope, receive, send):
        headers = [(k, v) for k, v in scope.get("headers", []) if k not in (b"range", b"if-range")]
        await super().__call__({**scope, "headers": headers}, receive, send)


async def image(request: Request, image_id: str):
    index = service_of(request).index
    if image_id not in index:  # the only way from a request to a file: a known id
        raise HTTPException(404, f"no gallery image with id {short_repr(image_id)}")
    path = Path(index.item(image_id)["path"])
    if not path.is_file():
        raise HTTPException(404, f"gallery image {short_repr(image_id)} is no longer on disk")
    return WholeFile(path)


async def stored_mask(request: Request, image_id: str):
    """A gallery image's stored mask, by id (404 when it has none)."""
    index = service_of(request).index
    if image_id not in index:
        raise HTTPException(404, f"no gallery image with id {short_repr(image_id)}")
    mask = index.item(image_id).get("mask")
    if not mask or not Path(mask).is_file():
        raise HTTPException(404, f"gallery image {short_repr(image_id)} has no stored mask on disk")
    return WholeFile(mask)


async def search(request: Request):
    t0 = time.perf_counter()
    svc = service_of(request)
    query = await read_search_form(request, svc.limits, svc.index)
    reference, mode = describe_reference(svc, query)
    async with svc.slots.slot():
        try:
            hits, stages, used = await run_in_threadpool(run_search, svc, query, mode)
        except UserInputError as exc:  # a stored mask file gone, an unreadable gallery file
            raise refused_reference(svc, query, exc) from None
    svc.metrics.observe_stages(stages)
    took = time.perf_counter() - t0
    svc.metrics.seconds.labels("total").observe(took)
    index = svc.index
    return {
        "query": {"text": query.text, "k": query.k, "reference": reference, "mask": used.to_json()},
        "results": [{"rank": i + 1, "id": h.id, "score": h.score, "url": image_url(h.id),
                     "mask_url": mask_url(h.id) if index.item(h.id).get("mask") else None}
                    for i, h in enumerate(hits)],
        "took_ms": round(took * 1000.0, 2),
    }


def describe_reference(svc: Service, query: SearchQuery) -> tuple[dict, str]:
    """The answer's ``reference`` and the mask mode the search uses (``choose_mask_mode``); refuses (before
    queueing) a gallery reference whose file is gone and a request whose mask no mode offered here can make."""
    index = svc.index
    if query.ref_id is None:
        return {"kind": "upload"}, choose_mask_mode(query, mask_modes(index), stored=False)
    item = require_on_disk(svc, query.ref_id)
    reference = {"kind": "gallery", "id": query.ref_id, "url": image_url(query.ref_id)}
    if item.get("mask"):
        reference["mask_url"] = mask_url(query.ref_id)
    return reference, choose_mask_mode(query, mask_modes(index), stored=bool(item.get("mask")))


def require_on_disk(svc: Service, ref_id: str) -> dict:
    """The index's item of gallery reference ``ref_id``; a 404 when its file is gone (the index needs an update)."""
    item = svc.index.item(ref_id)
    if not Path(item["path"]).is_file():
        raise HTTPException(404, f"gallery image {short_repr(ref_id)} is no longer on disk; the index needs an "
                                 f"update (`offset index`)")
    return item


def refused_reference(svc: Service, query: SearchQuery, exc: UserInputError) -> FormError:
    """The 422 of a reference the library could not read (a gallery file or stored mask unreadable or gone), naming
    ``ref_id`` for a gallery reference."""
    return FormError("ref_id" if query.ref_id is not None else None, svc.public(str(exc)))


_MODES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def mask_modes(index) -> tuple[str, ...]:
    """The ``mask_mode`` values ``index``'s service offers (``query_mask.offered_mask_modes``), worked out once."""
    modes = _MODES.get(index)
    if modes is None:
        stored = any(it.get("mask") for it in index.items)
        modes = _MODES[index] = offered_mask_modes(index.uses_query_mask, index.mask_generator is not None, stored)
    return modes


def reference_image(svc: Service, query: SearchQuery):
    """The reference of ``query`` as a PIL image: the decoded upload or the gallery file."""
    if query.ref_id is not None:
        return load_pil(svc.index.item(query.ref_id)["path"], "reference image")
    return decode_upload(query.image, "image", svc.limits.max_pixels)


def make_query_mask(svc: Service, query: SearchQuery, image, mode: str) -> QueryMask:
    """The query's mask as ``mode`` says (``query_mask``); an uploaded mask of another size is refused naming
    the ``mask`` field."""
    index = svc.index
    if mode == "uploaded":
        mask = decode_upload(query.mask, "mask", svc.limits.max_pixels, mode="L")
        try:
            return query_mask(image, "uploaded", mask=mask)
        except UserInputError as exc:
            raise FormError("mask", f"field 'mask': {exc}") from None
    if mode == "stored":
        item = index.item(query.ref_id)
        return query_mask(image, "stored", mask=item["mask"], image_source=item["path"])
    return query_mask(image, mode, generator=index.mask_generator)


def run_search(svc: Service, query: SearchQuery, mode: str):
    """Decode the uploads, make the mask, encode the query and rank the gallery (in a worker thread):
    (hits, seconds by stage, the :class:`QueryMask` used)."""
    index, stages = svc.index, {}
    s = time.perf_counter()
    image = reference_image(svc, query)
    used = make_query_mask(svc, query, image, mode)
    if query.image is not None or query.mask is not None:  # uploads were decoded
        stages["decode"] = time.perf_counter() - s
        s = time.perf_counter()
    q = index.encode_query(image, query.text, mask=used.image)
    stages["encode"] = time.perf_counter() - s
    s = time.perf_counter()
    hits = index.rank(q, query.k, exclude_id=query.ref_id)
    stages["search"] = time.perf_counter() - s
    return hits, stages, used


async def suggest_mask(request: Request):
    """The mask pipeline's mask for a reference (``image`` or ``ref_id``), as a grayscale PNG of its size."""
    svc = service_of(request)
    query = await read_reference_form(request, svc.limits, svc.index)
    if svc.index.mask_generator is None:
        raise FormError("mask_mode", f"this server has no mask pipeline to suggest a mask; "
                                     f"it offers mask_mode {', '.join(mask_modes(svc.index)) or 'none'}")
    if query.ref_id is not None:
        require_on_disk(svc, query.ref_id)
    async with svc.slots.slot():
        try:
            png = await run_in_threadpool(_suggested_png, svc, query)
        except UserInputError as exc:  # an unreadable gallery file
            raise refused_reference(svc, query, exc) from None
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


def _suggested_png(svc: Service, query: SearchQuery) -> bytes:
    image = reference_image(svc, query)
    made = query_mask(image, "generated", generator=svc.index.mask_generator)
    buf = io.BytesIO()
    made.image.save(buf, format="PNG")
    return buf.getvalue()


async def form_error_answer(request: Request, exc: FormError):
    """A refused form: ``{"detail", "field"}`` (the field the page shows the message beside)."""
    return JSONResponse({"detail": exc.detail, "field": exc.field}, status_code=exc.status_code,
                        headers=exc.headers)
