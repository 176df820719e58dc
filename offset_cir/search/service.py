"""REST service and web page over a read-only search index (FastAPI; run with ``offset serve``).

Routes: ``POST /search`` (multipart: ``text``, ``k``, and either an uploaded ``image`` [+ ``mask``] or a gallery
``ref_id``), ``GET /images/{id}`` (gallery images by id only: no client string ever becomes a file path),
``GET /gallery`` (ids, paged, for picking a reference), ``GET /health``, ``GET /metrics`` (Prometheus text format)
and ``GET /`` (the page).

Load: at most ``max_concurrency`` searches run at once; the others wait for a slot, and one that has not started
within ``queue_timeout`` seconds gets a JSON 503. Nothing else is limited by the search load: thumbnails, the
gallery, health and the page are answered while searches run. The only connection cap (``make_server``'s
``max_connections``, hundreds) guards the process against exhaustion.

Robustness: request bodies over ``max_upload_bytes`` are refused while they stream in (413), and a body that has
not arrived within ``body_timeout`` seconds gets 408; request heads that take longer than ``header_timeout`` are
cut off by the HTTP protocol (``make_server``); images over ``max_pixels`` are refused before decoding (413, so
decompression bombs never expand); unreadable uploads get 415; malformed fields 422 (a malformed multipart body
400), with a message that quotes no server path and at most 80 characters of any client string. Requests whose
``Host`` header is not the bound address, ``localhost``, ``127.0.0.1``, ``[::1]`` or an allowed host are refused
(DNS rebinding); every response carries a Content-Security-Policy and the other security headers.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import ipaddress
import json
import logging
import re
import time
import urllib.parse
import warnings
from importlib import resources
from pathlib import Path
from typing import Iterable

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from offset_cir.errors import UserInputError
from offset_cir.search.index import Index, _clip, uses_query_mask

log = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 10 << 20
MAX_PIXELS = 40_000_000
MAX_K = 100
MAX_TEXT_CHARS = 500
QUEUE_TIMEOUT = 30.0
#: seconds for a request body to arrive in full (10 MiB in 30 s is 350 KB/s)
BODY_TIMEOUT = 30.0
#: seconds for a request's head (request line + headers) to arrive, from the connection or the previous response
HEADER_TIMEOUT = 10.0
#: seconds a client may read nothing of a response (its socket buffer full) before it is disconnected
WRITE_TIMEOUT = 30.0
#: open connections beyond which uvicorn answers 503 at once (exhaustion guard, not a load limit)
MAX_CONNECTIONS = 512
KEEP_ALIVE = 5
#: host names every server answers to (besides the address it is bound to and --allowed-host values)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
#: image formats accepted from clients (PIL would otherwise also try e.g. EPS, which runs Ghostscript)
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
#: methods counted by name in the request metrics; any other is counted as "other"
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
#: absolute POSIX paths inside a message (library errors name files; a client must not see server paths)
_ABS_PATH = re.compile(r"(?<![\w:/.~>-])/(?:[^\s'\"/,;()]+/)*[^\s'\"/,;()]+")


def public_message(message: str, known: Iterable[tuple[str, str]] = ()) -> str:
    """``message`` with every absolute path replaced, for a client's eyes.

    ``known`` pairs (folder on the server, public name) are replaced literally first, so a folder whose name holds
    spaces, commas or parentheses (``/home/J Smith/My Pictures``) cannot leak in pieces past the pattern; what
    follows such a folder is a path relative to it (a gallery id), which a client may see."""
    for folder, name in sorted(known, key=lambda kv: -len(kv[0])):
        if folder and folder != "/":
            message = message.replace(folder.rstrip("/"), name)
    return _ABS_PATH.sub("<file on the server>", message)


async def _json_reply(send, status: int, detail: str, extra_headers=()):
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *extra_headers]})
    await send({"type": "http.response.body", "body": body})


# ----------------------------------------------------------------------------------------------- body limits


class _BodyTooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass


class BodyLimit:
    """ASGI middleware: refuse request bodies larger than ``limit`` bytes with 413, by header or while streaming,
    and bodies that have not arrived in full within ``timeout`` seconds with 408."""

    def __init__(self, app, limit: int, timeout: float | None = None):
        self.app = app
        self.limit = int(limit)
        self.timeout = float(timeout) if timeout else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    return await _json_reply(send, 400, "Content-Length is not a number")
                if too_big:
                    return await _json_reply(send, 413, self._msg())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout if self.timeout else None
        seen = 0
        body_done = False
        started = False

        async def limited_receive():
            nonlocal seen, body_done
            if body_done or deadline is None:
                message = await receive()
            else:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise _BodyTimeout()
                try:
                    message = await asyncio.wait_for(receive(), remaining)
                except (asyncio.TimeoutError, TimeoutError):
                    raise _BodyTimeout() from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge()
                if not message.get("more_body", False):
                    body_done = True  # later receives (disconnect listeners) have no deadline
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _json_reply(send, 413, self._msg())
        except _BodyTimeout:
            log.info("request body of %s %s did not arrive within %.3g s; closing the connection",
                     scope.get("method"), scope.get("path"), self.timeout)
            if not started:
                await _json_reply(send, 408, f"the request body did not arrive within {self.timeout:g} s")

    def _msg(self) -> str:
        return f"request body is larger than the limit of {self.limit} bytes"


# ----------------------------------------------------------------------------------------------- hosts, headers


def _normal_host(name: str) -> str | None:
    """A host name as compared: lower case, no trailing dot, IP literals in canonical form, IPv6 in brackets."""
    name = name.strip().lower().rstrip(".")
    bare = name[1:-1] if name.startswith("[") and name.endswith("]") else name
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        return name if re.fullmatch(r"[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?", name) else None
    return f"[{ip.compressed}]" if ip.version == 6 else ip.compressed


def host_of_header(value: str) -> str | None:
    """The host part of a ``Host`` header (``example.org:8000`` -> ``example.org``, ``[::1]:80`` -> ``[::1]``)."""
    m = re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+)(?::\d{1,5})?", value.strip())
    return _normal_host(m.group(1)) if m else None


def allowed_host_names(bound_host: str | None = None, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The names a ``Host`` header may carry; None when ``extra`` holds ``*`` (any host, e.g. behind a proxy)."""
    names = set(LOOPBACK_HOSTS)
    for h in ([bound_host] if bound_host else []) + list(extra):
        if h.strip() == "*":
            return None
        n = _normal_host(h)
        if n is None:
            raise UserInputError(f"--allowed-host {h!r} is not a host name or IP address")
        names.add(n)
    return frozenset(names)


def _inline_hashes(html: str, tag: str) -> list[str]:
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
    return [f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks]


def security_headers(html: str) -> list[tuple[bytes, bytes]]:
    """Headers sent with every response. The page's inline script and style are allowed by their hashes."""
    csp = "; ".join([
        "default-src 'none'",
        "script-src " + (" ".join(_inline_hashes(html, "script")) or "'none'"),
        "style-src " + (" ".join(_inline_hashes(html, "style")) or "'none'"),
        "img-src 'self' blob:",  # gallery thumbnails and the preview of an uploaded file
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ])
    return [(b"content-security-policy", csp.encode()), (b"x-frame-options", b"DENY"),
            (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]


class Guard:
    """Outer ASGI middleware: Host check, security headers on every response, request metrics, and quiet handling
    of clients that go away (one log line, not a traceback)."""

    def __init__(self, app, *, hosts: frozenset[str] | None, headers, metrics, route_of):
        self.app = app
        self.hosts = hosts
        self.headers = list(headers)
        self.names = {k for k, _ in self.headers}
        self.metrics = metrics
        self.route_of = route_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = self.route_of(scope)
        status = None

        async def secured_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in self.names]
                message = dict(message, headers=kept + self.headers)
            await send(message)

        try:
            if self.hosts is not None:
                host = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"), None)
                name = host_of_header(host) if host is not None else None
                if name not in self.hosts:
                    shown = _clip(host, 60) if host is not None else "(none)"
                    log.warning("refused a request with Host %s (allowed: %s; see --allowed-host)", shown,
                                ", ".join(sorted(self.hosts)))
                    return await _json_reply(secured_send, 400, f"Host {shown} is not a name this server answers to")
            await self.app(scope, receive, secured_send)
        except ClientDisconnect:
            log.info("client %s went away during %s %s", _client(scope), scope.get("method"), scope.get("path"))
            status = status or 499  # the client closed the request (nginx's code)
        except Exception:
            log.exception("error while answering %s %s", scope.get("method"), scope.get("path"))
            if status is None:
                await _json_reply(secured_send, 500, "internal error; the server log has the details")
            status = 500
        finally:
            method = scope.get("method", "")  # h11 accepts any token: a label per invented method would grow forever
            self.metrics.requests.labels(route, method if method in HTTP_METHODS else "other",
                                         str(status or 500)).inc()


def _client(scope) -> str:
    c = scope.get("client")
    return f"{c[0]}:{c[1]}" if c else "?"


# ----------------------------------------------------------------------------------------------- metrics


class Metrics:
    """The service's Prometheus metrics, in a registry of their own (several apps can live in one process)."""

    def __init__(self, index: Index, registry=None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("offset_http_requests", "HTTP requests answered, by route template, method and "
                                "status (499: the client went away)", ["route", "method", "status"], registry=r)
        self.seconds = Histogram(
            "offset_search_seconds", "search time by stage: queue (waiting for a slot), decode (uploaded images), "
            "encode (the composed query), search (ranking the gallery), total (the whole request)", ["stage"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r)
        self.queue_depth = Gauge("offset_search_queue_depth", "searches waiting for a slot", registry=r)
        self.in_progress = Gauge("offset_search_in_progress", "searches running", registry=r)
        self.busy = Counter("offset_search_busy", "searches refused with 503 (no slot within the queue timeout)",
                            registry=r)
        Gauge("offset_index_images", "images in the served index", registry=r).set(len(index))
        Info("offset_model", "the served model and index", registry=r).info({
            "checkpoint_hash": str(index.manifest["checkpoint"]["hash"]), "dim": str(index.manifest["dim"]),
            "search": str(index.manifest.get("search", {}).get("kind", "exact"))})

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


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


def decode_upload(data: bytes, field: str, max_pixels: int, mode: str = "RGB"):
    """Bytes of an uploaded file -> PIL image, or an HTTPException (415 not an image, 413 too many pixels)."""
    from PIL import Image, UnidentifiedImageError

    def too_many(size):
        if size is None:
            return HTTPException(413, f"field '{field}' has more pixels than the limit of {max_pixels} pixels")
        w, h = size
        return HTTPException(413, f"field '{field}' is {w}x{h} = {w * h} pixels; the limit is {max_pixels} pixels")

    if not data:
        raise HTTPException(422, f"field '{field}' is an empty file")
    try:
        im = Image.open(io.BytesIO(data), formats=UPLOAD_FORMATS)
    except UnidentifiedImageError:
        raise HTTPException(415, f"field '{field}' is not an image this service can read (PNG, JPEG, WebP, ...)")
    except Image.DecompressionBombError:  # PIL's own, larger limit; report the service's
        raise too_many(_claimed_size(data))
    except Exception as exc:
        raise HTTPException(415, f"field '{field}' could not be read as an image: {public_message(str(exc))}")
    w, h = im.size
    if w * h > max_pixels:
        raise too_many((w, h))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.load()
            return im.convert(mode)
    except Exception as exc:
        raise HTTPException(415, f"field '{field}' could not be decoded as an image: {public_message(str(exc))}")


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


def page_html() -> str:
    return resources.files("offset_cir.search").joinpath("static/index.html").read_text(encoding="utf-8")


# ----------------------------------------------------------------------------------------------- the app


def create_app(index: Index, *, max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS,
               max_concurrency: int = 2, max_k: int = MAX_K, queue_timeout: float = QUEUE_TIMEOUT,
               max_text_chars: int = MAX_TEXT_CHARS, body_timeout: float | None = BODY_TIMEOUT,
               host: str | None = None, allowed_hosts: Iterable[str] = (), registry=None):
    """The FastAPI application over an opened ``index`` (never written to).

    ``host`` is the address the server is bound to; requests must name it, a loopback name or one of
    ``allowed_hosts`` (``"*"``: any) in their ``Host`` header. ``registry``: the prometheus_client
    CollectorRegistry for ``/metrics`` (default: a new one per app, ``app.state.metrics.registry``)."""
    from python_multipart.multipart import parse_options_header

    app = FastAPI(title="offset-cir search", docs_url=None, redoc_url=None, openapi_url=None)
    slots = max(1, int(max_concurrency))
    sem = asyncio.Semaphore(slots)
    html = page_html()
    model = index.model  # load now, not on the first request
    needs = uses_query_mask(model)
    metrics = Metrics(index, registry)
    app.state.metrics = metrics
    hosts = allowed_host_names(host, allowed_hosts)
    # server folders named in library messages, replaced by public names before a message reaches a client
    known = [(str(Path(index.manifest.get("images_root", "")).resolve()), "<gallery>"),
             (str(Path(index.manifest.get("images_root", ""))), "<gallery>"),
             (str(Path(index.path).resolve()), "<index>"), (str(index.path), "<index>")]
    known = [(f, n) for f, n in known if f not in ("", ".")]
    if index.mask_generator is not None:  # build the mask models now, once, not racing in two worker threads
        index.mask_generator.load()

    from fastapi.exceptions import RequestValidationError

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):  # FastAPI's own 422 would echo the client's value whole
        names = ", ".join(".".join(str(p) for p in e.get("loc", ())[1:]) or "request" for e in exc.errors()[:5])
        return JSONResponse({"detail": f"invalid value for {_clip(names)}"}, status_code=422)

    def _url(image_id: str) -> str:
        return "/images/" + urllib.parse.quote(image_id, safe="/")

    @app.get("/", response_class=HTMLResponse)
    async def home():
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "images": len(index), "dim": index.manifest["dim"],
                "search": index.manifest.get("search", {}).get("kind", "exact"),
                "checkpoint_hash": index.manifest["checkpoint"]["hash"],
                "needs_masks": needs,  # the /health field the page reads (wire format unchanged)
                "mask_pipeline": index.mask_generator is not None, "read_only": True,
                "runtime": getattr(model, "runtime", "torch"),
                "limits": {"max_upload_bytes": max_upload_bytes, "max_pixels": max_pixels, "max_k": max_k,
                           "max_concurrency": slots, "queue_timeout_s": queue_timeout,
                           "body_timeout_s": body_timeout}}

    @app.get("/metrics")
    async def metrics_page():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/gallery")
    async def gallery(offset: str = "0", limit: str = "24"):
        # parsed here, not by FastAPI's validation, whose 422 would echo the client's value whole
        try:
            offset_n, limit_n = int(offset), int(limit)
        except ValueError:
            raise HTTPException(422, f"offset and limit must be whole numbers, got offset={_clip(offset)} "
                                     f"limit={_clip(limit)}") from None
        if offset_n < 0 or not 1 <= limit_n <= 200:
            raise HTTPException(422, "offset must be >= 0 and limit between 1 and 200")
        offset, limit = offset_n, limit_n
        items = index.items[offset:offset + limit]
        return {"total": len(index), "offset": offset,
                "images": [{"id": it["id"], "url": _url(it["id"]), "has_mask": bool(it.get("mask"))}
                           for it in items]}

    @app.get("/images/{image_id:path}")
    async def image(image_id: str):
        row = index.row_of.get(image_id)  # the only way from a request to a file: a known id
        if row is None:
            raise HTTPException(404, f"no gallery image with id {_clip(image_id)}")
        path = Path(index.items[row]["path"])
        if not path.is_file():
            raise HTTPException(404, f"gallery image {_clip(image_id)} is no longer on disk")
        return FileResponse(path, headers={"Cache-Control": "max-age=3600"})

    @app.post("/search")
    async def search(request: Request):
        t0 = time.perf_counter()
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            raise HTTPException(415, "send the query as multipart/form-data (fields text, k, image [, mask] or "
                                     "ref_id)")
        watch = None
        if ctype.startswith("multipart/form-data"):
            boundary = parse_options_header(ctype)[1].get(b"boundary")
            if not boundary:
                raise HTTPException(400, "malformed multipart body: the Content-Type names no boundary")
            watch = _ClosingBoundaryWatch(request.receive, boundary)
            request = Request(request.scope, watch)
        form = await request.form(max_files=2, max_fields=8, max_part_size=64 * 1024)
        try:
            if watch is not None and not watch.found:
                raise HTTPException(400, "malformed multipart body: it ends before its closing boundary "
                                         "(the request was cut short)")
            unknown = sorted(set(form.keys()) - {"text", "k", "image", "mask", "ref_id"})
            if unknown:
                raise HTTPException(422, f"unknown field(s) {', '.join(_clip(u, 40) for u in unknown[:5])}; "
                                         f"expected text, k, image, mask, ref_id")
            text = form.get("text")
            if not isinstance(text, str) or not text.strip():
                raise HTTPException(422, "field 'text' is required: the modification text (e.g. 'make it red')")
            if len(text) > max_text_chars:
                raise HTTPException(422, f"field 'text' is {len(text)} characters; the limit is {max_text_chars}")
            k_raw = form.get("k", "10")
            try:
                k = int(k_raw) if isinstance(k_raw, str) and len(k_raw) < 12 else None
            except ValueError:
                k = None
            if k is None or not 1 <= k <= max_k:
                shown = _clip(k_raw, 20) if isinstance(k_raw, str) else "a file"
                raise HTTPException(422, f"field 'k' must be a whole number from 1 to {max_k}, got {shown}")
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
                    raise HTTPException(404, f"no gallery image with id {_clip(ref_id)}")
                if mask_up is not None:
                    raise HTTPException(422, "a gallery reference uses its stored mask; do not upload a 'mask'")
                if not Path(index.item(ref_id)["path"]).is_file():
                    raise HTTPException(404, f"gallery image {_clip(ref_id)} is no longer on disk; the index "
                                             f"needs an update (`offset index`)")
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
                         "white = the part that matters, the size of the image) or pick a gallery reference (it "
                         "has a stored mask); the mask pipeline is not configured on this server")

        def work():
            stages = {}
            s = time.perf_counter()
            if ref_id is not None:
                q = index.query_for_id(ref_id, text)
                exclude = [index.row_of[ref_id]]
            else:
                pil = decode_upload(image_bytes, "image", max_pixels)
                mask = decode_upload(mask_bytes, "mask", max_pixels, mode="L") if mask_bytes is not None else None
                stages["decode"] = time.perf_counter() - s
                s = time.perf_counter()
                q = index.encode_query(pil, text, mask=mask)
                exclude = None
            stages["encode"] = time.perf_counter() - s
            s = time.perf_counter()
            scores, rows = index.search_features(q[None], k, exclude=exclude)
            hits = index._hits(scores[0], rows[0])
            stages["search"] = time.perf_counter() - s
            return hits, stages

        waited = time.perf_counter()
        metrics.queue_depth.inc()
        try:
            await asyncio.wait_for(sem.acquire(), timeout=queue_timeout)
        except (asyncio.TimeoutError, TimeoutError):
            metrics.busy.inc()
            raise HTTPException(503, f"the server is busy: {slots} search(es) running and this one found no slot "
                                     f"within {queue_timeout:g} s; try again shortly", headers={"Retry-After": "1"})
        finally:
            metrics.queue_depth.dec()
        metrics.seconds.labels("queue").observe(time.perf_counter() - waited)
        metrics.in_progress.inc()
        try:
            hits, stages = await run_in_threadpool(work)
        except UserInputError as exc:  # MaskRequiredError, a mask of another size, an unreadable stored file
            raise HTTPException(422, public_message(str(exc), known))
        finally:
            sem.release()
            metrics.in_progress.dec()
        for stage, seconds in stages.items():
            metrics.seconds.labels(stage).observe(seconds)
        took = time.perf_counter() - t0
        metrics.seconds.labels("total").observe(took)
        return {
            "query": {"text": text, "k": k, "reference": reference, "mask": mask_used},
            "results": [{"rank": i + 1, "id": h.id, "score": h.score, "url": _url(h.id)} for i, h in enumerate(hits)],
            "took_ms": round(took * 1000.0, 2),
        }

    def route_of(scope) -> str:
        partial = None
        for r in app.router.routes:
            match, _ = r.matches(scope)
            if match == Match.FULL:
                return getattr(r, "path", "?")
            if match == Match.PARTIAL and partial is None:
                partial = getattr(r, "path", "?")
        return partial or "unmatched"

    app.add_middleware(BodyLimit, limit=max_upload_bytes, timeout=body_timeout)
    app.add_middleware(Guard, hosts=hosts, headers=security_headers(html), metrics=metrics, route_of=route_of)
    return app


# ----------------------------------------------------------------------------------------------- the server


def header_deadline_protocol(header_timeout: float, write_timeout: float = WRITE_TIMEOUT):
    """uvicorn's h11 protocol, plus a deadline for each request head: a connection that has not sent a complete
    request line and headers within ``header_timeout`` seconds of opening (or of the previous response) gets 408
    and is closed. (uvicorn's keep-alive timer stops at the first byte, so a trickling client would hold it.)
    And a write deadline: a client that stops reading a response (the socket's send buffer stays full) for
    ``write_timeout`` seconds is disconnected, so slow readers cannot hold connections either."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    timeout = float(header_timeout)
    write_limit = float(write_timeout)
    reply = json.dumps({"detail": f"the request head did not arrive within {timeout:g} s"}).encode()
    raw_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
               b"content-length: " + str(len(reply)).encode() + b"\r\n\r\n" + reply)

    class HeaderDeadlineProtocol(H11Protocol):
        _head_timer = None
        _write_timer = None

        def pause_writing(self):  # the transport's buffer is full: the client is not reading
            super().pause_writing()
            if self._write_timer is None:
                self._write_timer = self.loop.call_later(write_limit, self._write_deadline_passed)

        def resume_writing(self):
            super().resume_writing()
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None

        def _write_deadline_passed(self):
            self._write_timer = None
            if not self.transport.is_closing():
                self.logger.info("client %s read nothing of its response for %g s; closing the connection",
                                 "%s:%s" % self.client if self.client else "?", write_limit)
                self.transport.abort()

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_head_deadline()

        def on_response_complete(self):
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_deadline()

        def connection_lost(self, exc):
            self._cancel_head_deadline()
            if self._write_timer is not None:
                self._write_timer.cancel()
                self._write_timer = None
            super().connection_lost(exc)

        def _arm_head_deadline(self):
            self._cancel_head_deadline()
            self._head_timer = self.loop.call_later(timeout, self._head_deadline_passed)

        def _cancel_head_deadline(self):
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_deadline_passed(self):
            self._head_timer = None
            if self.transport.is_closing():
                return
            if self.cycle is not None and not self.cycle.response_complete:
                return  # a request is being answered (its body has its own deadline)
            if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
                self.logger.info("request head from %s did not arrive within %g s; closing the connection",
                                 "%s:%s" % self.client if self.client else "?", timeout)
                self.transport.write(raw_408)
            self.transport.close()

    return HeaderDeadlineProtocol


def make_server(app, *, host: str = "127.0.0.1", port: int = 8000, header_timeout: float = HEADER_TIMEOUT,
                write_timeout: float = WRITE_TIMEOUT,
                max_connections: int = MAX_CONNECTIONS, keep_alive: int = KEEP_ALIVE, log_level: str = "info",
                configure_logging: bool = True):
    """The uvicorn server ``offset serve`` runs (``.run()``, or ``.run(sockets=[sock])`` on a bound socket).
    ``configure_logging=False`` leaves logging as it is (uvicorn's records then reach the root logger)."""
    import uvicorn

    extra = {} if configure_logging else {"log_config": None}
    config = uvicorn.Config(app, host=host, port=port, workers=1, log_level=log_level, lifespan="off", **extra,
                            http=header_deadline_protocol(header_timeout, write_timeout),
                            limit_concurrency=int(max_connections),
                            timeout_keep_alive=int(keep_alive), server_header=False)
    return uvicorn.Server(config)
