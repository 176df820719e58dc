"""The service's routes: ``POST /search``, ``GET /images/{id}``, ``GET /gallery``, ``GET /health``, ``GET /metrics``
and ``GET /`` (the page). Each reads the app's :class:`~offset_cir.search.service.state.Service`.

``/images/{id}`` serves gallery images by id only: no client string ever becomes a file path. A search decodes
uploads and encodes its query in a worker thread, under the concurrency cap (``SearchSlots``).
"""
from __future__ import annotations

import time
import urllib.parse
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, Response

from offset_cir.errors import UserInputError
from offset_cir.search.inputs import short_repr
from offset_cir.search.service.form import SearchQuery, decode_upload, parse_gallery_page, read_search_form
from offset_cir.search.service.state import Service, service_of

#: the methods of the routes that only read: HEAD is answered as GET without the body (monitors probe with HEAD)
READ = ["GET", "HEAD"]


def add_routes(app: FastAPI) -> None:
    """The routes, on ``app`` itself (so each is matched, and counted in the metrics, by its own template)."""
    app.add_api_route("/", home, methods=READ, response_class=HTMLResponse)
    app.add_api_route("/health", health, methods=READ)
    app.add_api_route("/metrics", metrics_page, methods=READ)
    app.add_api_route("/gallery", gallery, methods=READ)
    app.add_api_route("/images/{image_id:path}", image, methods=READ)
    app.add_api_route("/search", search, methods=["POST"])


def image_url(image_id: str) -> str:
    """The URL of a gallery image (``GET /images/{id}``)."""
    return "/images/" + urllib.parse.quote(image_id, safe="/")


async def home(request: Request):
    return HTMLResponse(service_of(request).page, headers={"Cache-Control": "no-store"})


async def health(request: Request):
    svc = service_of(request)
    index = svc.index
    uses_mask = index.uses_query_mask
    return {"status": "ok", "images": len(index), "dim": index.manifest["dim"],
            "search": index.manifest.get("search", {}).get("kind", "exact"),
            "checkpoint_hash": index.manifest["checkpoint"]["hash"],
            # whether a query needs a mask; "needs_masks" is the same, for clients that read that name
            "uses_masks": uses_mask, "needs_masks": uses_mask,
            "mask_pipeline": index.mask_generator is not None, "read_only": True,
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


async def gallery(request: Request, offset: str = "0", limit: str = "24"):
    index = service_of(request).index
    start, count = parse_gallery_page(offset, limit)
    return {"total": len(index), "offset": start,
            "images": [{"id": it["id"], "url": image_url(it["id"]), "has_mask": bool(it.get("mask"))}
                       for it in index.items[start:start + count]]}


async def image(request: Request, image_id: str):
    index = service_of(request).index
    if image_id not in index:  # the only way from a request to a file: a known id
        raise HTTPException(404, f"no gallery image with id {short_repr(image_id)}")
    path = Path(index.item(image_id)["path"])
    if not path.is_file():
        raise HTTPException(404, f"gallery image {short_repr(image_id)} is no longer on disk")
    return FileResponse(path, headers={"Cache-Control": "max-age=3600"})


async def search(request: Request):
    t0 = time.perf_counter()
    svc = service_of(request)
    query = await read_search_form(request, svc.limits, svc.index)
    reference, mask_used = describe_reference(svc, query)
    async with svc.slots.slot():
        try:
            hits, stages = await run_in_threadpool(run_search, svc, query)
        except UserInputError as exc:  # MaskRequiredError, a mask of another size, an unreadable stored file
            raise HTTPException(422, svc.public(str(exc))) from None
    svc.metrics.observe_stages(stages)
    took = time.perf_counter() - t0
    svc.metrics.seconds.labels("total").observe(took)
    return {
        "query": {"text": query.text, "k": query.k, "reference": reference, "mask": mask_used},
        "results": [{"rank": i + 1, "id": h.id, "score": h.score, "url": image_url(h.id)} for i, h in enumerate(hits)],
        "took_ms": round(took * 1000.0, 2),
    }


def describe_reference(svc: Service, query: SearchQuery) -> tuple[dict, str]:
    """The answer's ``reference`` and which mask the search uses; refuses (before queueing) a gallery reference
    whose file is gone and an upload without the mask the model needs when no mask pipeline can make one."""
    index = svc.index
    uses_mask = index.uses_query_mask
    if query.ref_id is not None:
        if not Path(index.item(query.ref_id)["path"]).is_file():
            raise HTTPException(404, f"gallery image {short_repr(query.ref_id)} is no longer on disk; the index "
                                     f"needs an update (`offset index`)")
        stored = bool(index.item(query.ref_id).get("mask"))
        used = "stored" if uses_mask and stored else ("generated" if uses_mask else "not used by this model")
        return {"kind": "gallery", "id": query.ref_id, "url": image_url(query.ref_id)}, used
    if uses_mask and query.mask is None and index.mask_generator is None:
        raise HTTPException(
            422, "this model was trained with masks and no 'mask' was uploaded; upload one (grayscale, white = the "
                 "part that matters, the size of the image) or pick a gallery reference (it has a stored mask); the "
                 "mask pipeline is not configured on this server")
    used = ("uploaded" if query.mask is not None else "generated") if uses_mask else "not used by this model"
    return {"kind": "upload"}, used


def run_search(svc: Service, query: SearchQuery):
    """Decode the uploads, encode the query and rank the gallery (in a worker thread): (hits, seconds by stage)."""
    index, stages = svc.index, {}
    s = time.perf_counter()
    if query.ref_id is not None:
        q = index.query_for_id(query.ref_id, query.text)
    else:
        pil = decode_upload(query.image, "image", svc.limits.max_pixels)
        mask = decode_upload(query.mask, "mask", svc.limits.max_pixels, mode="L") if query.mask is not None else None
        stages["decode"] = time.perf_counter() - s
        s = time.perf_counter()
        q = index.encode_query(pil, query.text, mask=mask)
    stages["encode"] = time.perf_counter() - s
    s = time.perf_counter()
    hits = index.rank(q, query.k, exclude_id=query.ref_id)
    stages["search"] = time.perf_counter() - s
    return hits, stages
