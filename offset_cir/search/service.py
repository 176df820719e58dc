"""REST service and web page over a read-only search index (FastAPI; run with ``offset serve``).

Routes: ``POST /search`` (multipart: ``text``, ``k``, and either an uploaded ``image`` [+ ``mask``] or a gallery
``ref_id``), ``GET /images/{id}`` (gallery images by id only: no client string ever becomes a file path),
``GET /gallery`` (ids, paged, for picking a reference), ``GET /health`` and ``GET /`` (the page).

Robustness: request bodies over ``max_upload_bytes`` are refused while they stream in (413); images over
``max_pixels`` are refused before decoding (413, so decompression bombs never expand); unreadable uploads get 415;
malformed fields 422 with a message; at most ``max_concurrency`` searches run at once and a request that waits
longer than ``queue_timeout`` gets 503.
"""
from __future__ import annotations

import asyncio
import io
import logging
import time
import urllib.parse
import warnings
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse

from offset_cir.errors import UserInputError
from offset_cir.search.index import Index, MaskRequiredError, query_needs_mask

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 10 << 20
MAX_PIXELS = 40_000_000
MAX_K = 100
MAX_TEXT_CHARS = 500
#: image formats accepted from clients (PIL would otherwise also try e.g. EPS, which runs Ghostscript)
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuse request bodies larger than ``limit`` bytes with 413, by header or while streaming."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = int(limit)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    return await self._reply(send, 400, "Content-Length is not a number")
                if too_big:
                    return await self._reply(send, 413, self._msg())
        seen = 0
        started = False

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._reply(send, 413, self._msg())

    def _msg(self) -> str:
        return f"request body is larger than the limit of {self.limit} bytes"

    @staticmethod
    async def _reply(send, status: int, detail: str):
        import json

        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def decode_upload(data: bytes, field: str, max_pixels: int, mode: str = "RGB"):
    """Bytes of an uploaded file -> PIL image, or an HTTPException (415 not an image, 413 too many pixels)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise HTTPException(422, f"field '{field}' is an empty file")
    try:
        im = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except UnidentifiedImageError:
        raise HTTPException(415, f"field '{field}' is not an image this service can read (PNG, JPEG, WebP, ...)")
    except Image.DecompressionBombError as exc:
        raise HTTPException(413, f"field '{field}': {exc}")
    except Exception as exc:
        raise HTTPException(415, f"field '{field}' could not be read as an image: {exc}")
    w, h = im.size
    if w * h > max_pixels:
        raise HTTPException(413, f"field '{field}' is {w}x{h} = {w * h} pixels; the limit is {max_pixels} pixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
            return im.convert(mode)
    except Exception as exc:
        raise HTTPException(415, f"field '{field}' could not be decoded as an image: {exc}")


def page_html() -> str:
    return resources.files("offset_cir.search").joinpath("static/index.html").read_text(encoding="utf-8")


def create_app(index: Index, *, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS,
               max_concurrency: int = 2, max_k: int = MAX_K, queue_timeout: float = 30.0,
               max_text_chars: int = MAX_TEXT_CHARS):
    """The FastAPI application over an opened ``index`` (never written to)."""
    app = FastAPI(title="offset-cir search", docs_url=None, redoc_url=None, openapi_url=None)
    sem = asyncio.Semaphore(max(1, int(max_concurrency)))
    html = page_html()
    model = index.model  # load now, not on the first request
    needs = query_needs_mask(model)

    def _url(image_id: str) -> str:
        return "/images/" + urllib.parse.quote(image_id, safe="/")

    @app.get("/", response_class=HTMLResponse)
    async def home():
        return HTMLResponse(html, headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "images": len(index), "dim": index.manifest["dim"],
                "search": index.manifest.get("search", {}).get("kind", "exact"),
                "checkpoint_hash": index.manifest["checkpoint"]["hash"], "needs_masks": needs,
                "mask_pipeline": index.mask_generator is not None, "read_only": True,
                "limits": {"max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels, "max_k": max_k,
                           "max_concurrency": max_concurrency}}

    @app.get("/gallery")
    async def gallery(offset: int = 0, limit: int = 24):
        if offset < 0 or not 1 <= limit <= 200:
            raise HTTPException(422, "offset must be >= 0 and limit between 1 and 200")
        items = index.items[offset:offset + limit]
        return {"total": len(index), "offset": offset,
                "images": [{"id": it["id"], "url": _url(it["id"]), "has_mask": bool(it.get("mask"))}
                           for it in items]}

    @app.get("/images/{image_id:path}")
    async def image(image_id: str):
        row = index.row_of.get(image_id)  # the only way from a request to a file: a known id
        if row is None:
            raise HTTPException(404, f"no gallery image with id {image_id!r}")
        path = Path(index.items[row]["path"])
        if not path.is_file():
            raise HTTPException(404, f"gallery image {image_id!r} is no longer on disk")
        return FileResponse(path, headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "max-age=3600"})

    @app.post("/search")
    async def search(request: Request):
        t0 = time.perf_counter()
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            raise HTTPException(415, "send the query as multipart/form-data (fields text, k, image [, mask] or "
                                     "ref_id)")
        form = await request.form(max_files=2, max_fields=8, max_part_size=64 * 1024)
        try:
            unknown = sorted(set(form.keys()) - {"text", "k", "image", "mask", "ref_id"})
            if unknown:
                raise HTTPException(422, f"unknown field(s) {', '.join(unknown)}; expected text, k, image, mask, "
                                         f"ref_id")
            text = form.get("text")
            if not isinstance(text, str) or not text.strip():
                raise HTTPException(422, "field 'text' is required: the modification text (e.g. 'make it red')")
            if len(text) > max_text_chars:
                raise HTTPException(422, f"field 'text' is {len(text)} characters; the limit is {max_text_chars}")
            k_raw = form.get("k", "10")
            try:
                k = int(k_raw) if isinstance(k_raw, str) else None
            except ValueError:
                k = None
            if k is None or not 1 <= k <= max_k:
                raise HTTPException(422, f"field 'k' must be a whole number from 1 to {max_k}, got {k_raw!r}")
            upload, ref_id, mask_up = form.get("image"), form.get("ref_id"), form.get("mask")
            if isinstance(upload, str) or isinstance(mask_up, str):
                raise HTTPException(422, "fields 'image' and 'mask' must be file uploads")
            if isinstance(ref_id, str) and not ref_id:
                ref_id = None
            if ref_id is not None and not isinstance(ref_id, str):
                raise HTTPException(422, "field 'ref_id' must be text (a gallery id)")
            if (upload is None) == (ref_id is None):
                raise HTTPException(422, "give exactly one reference: an uploaded 'image' or a gallery 'ref_id'")
            if ref_id is not None:
                if ref_id not in index.row_of:
                    raise HTTPException(404, f"no gallery image with id {ref_id!r}")
                if mask_up is not None:
                    raise HTTPException(422, "a gallery reference uses its stored mask; do not upload a 'mask'")
                image_bytes = mask_bytes = None
            else:
                # decoded later, in a worker thread under the concurrency limit (never on the event loop)
                image_bytes = await upload.read()
                mask_bytes = await mask_up.read() if mask_up else None
                for field, data in (("image", image_bytes), ("mask", mask_bytes)):
                    if data is not None and not data:
                        raise HTTPException(422, f"field '{field}' is an empty file")
        finally:
            await form.close()

        if ref_id is not None:
            reference = {"kind": "gallery", "id": ref_id, "url": _url(ref_id)}
            has = bool(index.item(ref_id).get("mask"))
            mask_used = "stored" if needs and has else ("generated" if needs else "not used by this model")
        else:
            reference = {"kind": "upload"}
            mask_used = ("uploaded" if mask_bytes is not None else "generated") if needs else "not used by this model"
            if needs and mask_bytes is None and index.mask_generator is None:
                raise HTTPException(
                    422, "this model was trained with masks and no 'mask' was uploaded; upload one (grayscale, "
                         "white = the part that matters) or pick a gallery reference (it has a stored mask); the "
                         "mask pipeline is not configured on this server")

        def work():
            if ref_id is not None:
                return index.search_id(ref_id, text, k)
            pil = decode_upload(image_bytes, "image", max_pixels)
            mask = decode_upload(mask_bytes, "mask", max_pixels, mode="L") if mask_bytes is not None else None
            return index.search(pil, text, k, mask=mask)

        try:
            await asyncio.wait_for(sem.acquire(), timeout=queue_timeout)
        except (asyncio.TimeoutError, TimeoutError):
            raise HTTPException(503, "the server is busy; try again shortly")
        try:
            hits = await run_in_threadpool(work)
        except MaskRequiredError as exc:
            raise HTTPException(422, str(exc))
        except UserInputError as exc:
            raise HTTPException(422, str(exc))
        finally:
            sem.release()
        return {
            "query": {"text": text, "k": k, "reference": reference, "mask": mask_used},
            "results": [{"rank": i + 1, "id": h.id, "score": h.score, "url": _url(h.id)} for i, h in enumerate(hits)],
            "took_ms": round((time.perf_counter() - t0) * 1000.0, 2),
        }

    app.add_middleware(BodyLimit, limit=max_upload_bytes)
    return app
